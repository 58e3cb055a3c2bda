"""The train step and the loop: loss falls, one compilation, fused steps agree, guards hold, optax's numbers."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from conftest import make_learnable_split, run_main, tiny_overrides

from configs import default
from mnist_flax import layout, models
from mnist_flax.training import input_pipeline, metrics, steps


def _setup(model_name="cnn", learning_rate=1e-3, batch_size=32, num_examples=256):
    config = default.get_config()
    config.model.name = model_name
    config.optimizer.learning_rate = learning_rate
    config.optimizer.schedule = "constant"
    images, labels = make_learnable_split(num_examples, seed=3)
    images = jnp.asarray(images[..., None])
    labels = jnp.asarray(labels.astype(np.int32))
    model = models.create(config.model, num_classes=10)
    state = steps.create_train_state(
        model, steps.make_optimizer(config.optimizer, 1, 1), seed=0, input_shape=(28, 28, 1)
    )
    return config, state, images, labels


def _carry(state):
    return (state, metrics.TrainMetrics.empty(), steps.empty_guard())


@pytest.mark.parametrize("model_name", ["cnn", "mlp"])
def test_loss_falls_on_a_fixed_batch(model_name):
    config, state, images, labels = _setup(model_name)
    # One step per epoch: every step sees the same batch (row 0 of the order).
    order = jnp.arange(32, dtype=jnp.int32)[None]
    step_fn = steps.make_train_step(config, steps_per_epoch=1)
    carry = _carry(state)
    losses = []
    for _ in range(25):
        carry = step_fn(carry, images, labels, order)
        losses.append(float(carry[1].compute()["loss"]))
        carry = (carry[0], metrics.TrainMetrics.empty(), carry[2])
    assert losses[-1] < 0.5 * losses[0], losses
    assert int(carry[0].step) == 25


def test_epoch_loop_compiles_the_step_once():
    config, state, images, labels = _setup("mlp")
    steps_per_epoch = 256 // 32
    step_fn = steps.make_train_step(config, steps_per_epoch)
    order_fn = jax.jit(input_pipeline.epoch_order, static_argnums=(2, 3))
    carry = _carry(state)
    with steps.CompileCounter() as first_epoch:
        carry = step_fn(
            carry,
            images,
            labels,
            order_fn(jax.random.PRNGKey(0), 0, 256, 32),
        )
    with steps.CompileCounter() as later:
        for epoch in range(3):
            order = order_fn(jax.random.PRNGKey(0), epoch, 256, 32)
            for _ in range(steps_per_epoch):
                carry = step_fn(carry, images, labels, order)
        jax.block_until_ready(carry)
    assert first_epoch.count >= 1  # the counter sees compilations at all
    assert later.count == 0
    assert int(carry[0].step) == 1 + 3 * steps_per_epoch


@pytest.mark.parametrize("unroll", [1, 3], ids=["scan", "unrolled"])
def test_fused_steps_match_single_steps(unroll):
    """3 fused steps a call (with a masked tail: 8 steps/epoch) equal 8 single steps, in a scan or written out."""
    config, state, images, labels = _setup("mlp")
    steps_per_epoch = 8
    order = input_pipeline.epoch_order(jax.random.PRNGKey(1), 0, 256, 32)
    single = steps.make_train_step(config, steps_per_epoch, steps_per_call=1)
    fused = steps.make_train_step(config, steps_per_epoch, steps_per_call=3, unroll=unroll)
    carry_a = _carry(jax.tree.map(jnp.copy, state))
    for _ in range(steps_per_epoch):
        carry_a = single(carry_a, images, labels, order)
    carry_b = _carry(state)
    for _ in range(3):  # 3 + 3 + 2 (the last call masks one step)
        carry_b = fused(carry_b, images, labels, order)
    assert int(carry_b[0].step) == int(carry_a[0].step) == steps_per_epoch
    for a, b in zip(jax.tree.leaves(carry_a[0].params), jax.tree.leaves(carry_b[0].params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(carry_a[1].compute()["loss"], carry_b[1].compute()["loss"], rtol=1e-5)


def test_augmentation_changes_the_step_and_repeats():
    config, state, images, labels = _setup("cnn", num_examples=64)
    order = input_pipeline.epoch_order(jax.random.PRNGKey(1), 0, 64, 32)
    augment = ml_collections.ConfigDict({"flip": True, "max_shift": 2})

    def params_after_two_steps(augment_config):
        if augment_config is not None:
            config.data.augment = augment_config
        step_fn = steps.make_train_step(config, 2)
        carry = _carry(jax.tree.map(jnp.copy, state))
        for _ in range(2):
            carry = step_fn(carry, images, labels, order)
        return jax.tree.leaves(carry[0].params)

    plain, augmented, again = (
        params_after_two_steps(None),
        params_after_two_steps(augment),
        params_after_two_steps(augment),
    )
    assert any(not np.allclose(a, b) for a, b in zip(plain, augmented, strict=True))  # the batch was changed
    for a, b in zip(augmented, again, strict=True):  # by draws from the state's key and step only
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_nonfinite_update_is_skipped_and_counted():
    config, state, images, labels = _setup("mlp")
    bad_images = images.at[:].set(255)
    step_fn = steps.make_train_step(config, steps_per_epoch=1)
    # A NaN parameter makes the loss NaN: the update must not be applied.
    poisoned = state.replace(
        params=jax.tree.map(lambda p: p.at[..., 0].set(jnp.nan) if p.ndim == 2 else p, state.params)
    )
    carry = step_fn(
        _carry(jax.tree.map(jnp.copy, poisoned)),
        bad_images,
        labels,
        jnp.arange(32, dtype=jnp.int32)[None],
    )
    new_state, _, guard = carry
    assert int(guard["count"]) == 1 and int(guard["first_step"]) == 0
    assert int(new_state.step) == 1
    for before, after in zip(jax.tree.leaves(poisoned.opt_state), jax.tree.leaves(new_state.opt_state), strict=True):
        np.testing.assert_array_equal(np.asarray(before), np.asarray(after))


def test_losses_and_optimizers_build():
    logits = jnp.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
    labels = jnp.array([0, 2])
    ce = steps.compute_loss(
        logits, labels, ml_collections.ConfigDict({"name": "cross_entropy", "label_smoothing": 0.0})
    )
    expected = -np.mean([jax.nn.log_softmax(logits[0])[0], jax.nn.log_softmax(logits[1])[2]])
    np.testing.assert_allclose(ce, expected, rtol=1e-6)
    smooth = steps.compute_loss(
        logits, labels, ml_collections.ConfigDict({"name": "cross_entropy", "label_smoothing": 0.2})
    )
    assert float(smooth) > float(ce)
    focal = steps.compute_loss(logits, labels, ml_collections.ConfigDict({"name": "focal", "focal_gamma": 2.0}))
    assert 0 < float(focal) < float(ce)  # focal down-weights confident, correct examples
    for name in ("sgd", "momentum", "adam", "adamw"):
        for schedule in ("constant", "cosine", "warmup_cosine"):
            optimizer_config = default.get_config().optimizer
            optimizer_config.name, optimizer_config.schedule = name, schedule
            sched = steps.make_schedule(optimizer_config, steps_per_epoch=10, num_epochs=2)
            steps.make_optimizer(optimizer_config, 10, 2)
            if schedule == "warmup_cosine":
                assert float(sched(0)) == 0.0 and float(sched(10)) == pytest.approx(optimizer_config.learning_rate)


RECIPES = {
    "adamw_warmup_cosine_smoothing": {"optimizer.name": "adamw", "optimizer.schedule": "warmup_cosine"},
    "adamw_betas": {"optimizer.name": "adamw", "optimizer.b1": 0.8, "optimizer.b2": 0.99},
    "adamw_warmup_2_steps": {"optimizer.name": "adamw", "optimizer.warmup_epochs": 0.7},
    "adamw_no_warmup": {"optimizer.name": "adamw", "optimizer.warmup_epochs": 0.0},
    "momentum_cosine_l2_clip": {
        "optimizer.name": "momentum",
        "optimizer.schedule": "cosine",
        "optimizer.learning_rate": 0.05,
        "optimizer.grad_clip_norm": 1.0,
        "loss.label_smoothing": 0.0,
    },
    "adam_constant_l2_betas": {
        "optimizer.name": "adam",
        "optimizer.schedule": "constant",
        "optimizer.weight_decay": 5e-4,
        "optimizer.b1": 0.7,
        "optimizer.b2": 0.95,
    },
    "sgd_no_decay": {"optimizer.name": "sgd", "optimizer.learning_rate": 0.1, "optimizer.weight_decay": 0.0},
}


def _recipe(overrides: dict) -> ml_collections.ConfigDict:
    config = default.get_config()
    config.model.name, config.num_epochs, config.optimizer.warmup_epochs = "mlp", 2, 1.0
    config.model.dropout_rate = 0.0  # the plain step below draws no dropout
    del config.model.conv_features
    for key, value in overrides.items():
        section, field = key.split(".")
        config[section][field] = value
    return config


def _plain_optax(optimizer_config, total: int, steps_per_epoch: int) -> optax.GradientTransformation:
    """The recipe in optax's own optimizers and schedules on Python floats, nothing injected."""
    peak = optimizer_config.learning_rate
    schedule = {
        "constant": optax.constant_schedule(peak),
        "cosine": optax.cosine_decay_schedule(peak, total),
        "warmup_cosine": optax.warmup_cosine_decay_schedule(
            0.0, peak, int(optimizer_config.warmup_epochs * steps_per_epoch), total
        ),
    }[optimizer_config.schedule]
    name, decay = optimizer_config.name, optimizer_config.weight_decay
    if name == "adamw":
        tx = optax.adamw(schedule, b1=optimizer_config.b1, b2=optimizer_config.b2, weight_decay=decay)
    elif name == "adam":
        tx = optax.adam(schedule, b1=optimizer_config.b1, b2=optimizer_config.b2)
    else:
        tx = optax.sgd(schedule, momentum=optimizer_config.momentum if name == "momentum" else None)
    if name != "adamw" and decay:
        tx = optax.chain(optax.add_decayed_weights(decay), tx)
    if optimizer_config.grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(optimizer_config.grad_clip_norm), tx)
    return tx


@pytest.mark.parametrize("recipe", RECIPES, ids=list(RECIPES))
def test_the_step_with_injected_hyperparameters_trains_as_plain_optax(recipe):
    """The step, its hyperparameters values in the optimizer state (optax.inject_hyperparams), fused 3 a call,
    gives within float tolerance the parameters of optax's own optimizer, schedule and label smoothing on Python
    floats with flax's apply_gradients, over 6 steps across warmup's end."""
    config = _recipe(RECIPES[recipe])
    steps_per_epoch, batch = 3, 32
    images, labels = make_learnable_split(steps_per_epoch * batch, seed=3)
    images, labels = jnp.asarray(images[..., None]), jnp.asarray(labels.astype(np.int32))
    order = input_pipeline.epoch_order(jax.random.PRNGKey(1), 0, steps_per_epoch * batch, batch)
    model = models.create(config.model, num_classes=10)
    total = steps_per_epoch * config.num_epochs
    plain = steps.create_train_state(
        model, _plain_optax(config.optimizer, total, steps_per_epoch), seed=0, input_shape=(28, 28, 1)
    )

    @jax.jit
    def plain_step(state, batch_images, batch_labels):
        def loss_fn(params):
            logits = state.apply_fn({"params": params}, steps.preprocess(batch_images), train=True)
            targets = optax.smooth_labels(jax.nn.one_hot(batch_labels, 10), config.loss.label_smoothing)
            return optax.softmax_cross_entropy(logits, targets).mean()

        return state.apply_gradients(grads=jax.grad(loss_fn)(state.params))

    tx = steps.make_optimizer(config.optimizer, steps_per_epoch, config.num_epochs)
    step_fn = steps.make_train_step(config, steps_per_epoch, steps_per_call=3, unroll=3)
    carry = _carry(steps.create_train_state(model, tx, seed=0, input_shape=(28, 28, 1)))
    for step in range(total):
        rows = order[step % steps_per_epoch]
        plain = plain_step(plain, images[rows], labels[rows])
    for _ in range(config.num_epochs):
        carry = step_fn(carry, images, labels, order)
    assert int(carry[0].step) == int(plain.step) == total
    for ours, theirs in zip(jax.tree.leaves(carry[0].params), jax.tree.leaves(plain.params), strict=True):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("optimizer", ["momentum", "adamw"])
def test_a_sweep_over_the_injected_hyperparameters_shares_one_program(optimizer):
    """Two configs that differ in every injected hyperparameter lower to the same program (their values are in
    the optimizer state); a change of the clipping norm, which is written into the program, does not (so the
    comparison can tell)."""

    def program(**overrides):
        config = _recipe({"optimizer.name": optimizer, "optimizer.grad_clip_norm": 1.0, **overrides})
        model = models.create(config.model, num_classes=10)
        carry = _carry(
            steps.create_train_state(
                model, steps.make_optimizer(config.optimizer, 3, 2), seed=0, input_shape=(28, 28, 1)
            )
        )
        images, labels = jnp.zeros((96, 28, 28, 1), jnp.uint8), jnp.zeros((96,), jnp.int32)
        order = jnp.zeros((3, 32), jnp.int32)
        step_fn = steps.make_train_step(config, 3, steps_per_call=3, unroll=3)
        return step_fn.lower(carry, images, labels, order).as_text()

    base = program()
    swept = {
        "optimizer.learning_rate": 0.02,
        "optimizer.weight_decay": 3e-3,
        "optimizer.momentum": 0.8,
        "optimizer.b1": 0.85,
        "optimizer.b2": 0.98,
    }
    assert {k.removeprefix("optimizer.") for k in swept} == set(steps.INJECTED_HYPERPARAMETERS)
    assert program(**swept) == base
    assert program(**{"optimizer.grad_clip_norm": 2.0}) != base


def test_a_resumed_state_trains_with_its_configs_hyperparameters():
    config = _recipe({})
    model = models.create(config.model, num_classes=10)
    saved = steps.create_train_state(
        model, steps.make_optimizer(config.optimizer, 3, 2), seed=0, input_shape=(28, 28, 1)
    )
    config.optimizer.learning_rate = 0.5
    fresh = steps.create_train_state(
        model, steps.make_optimizer(config.optimizer, 3, 2), seed=0, input_shape=(28, 28, 1)
    )
    resumed = steps.with_config_hyperparameters(saved, fresh)
    assert float(saved.opt_state.hyperparams["learning_rate"]) == pytest.approx(3e-3)
    assert float(resumed.opt_state.hyperparams["learning_rate"]) == 0.5


@pytest.mark.parametrize("steps_per_epoch", [1, 7, 469])
@pytest.mark.parametrize("warmup_epochs", [0.5, 1.0, 2.5])
def test_the_warmup_cosine_schedule_on_a_traced_peak_is_optaxs(steps_per_epoch, warmup_epochs):
    """The warmup-cosine schedule, its peak traced as inject_hyperparams passes it, gives optax's
    warmup_cosine_decay_schedule within float tolerance at every step of a 3-epoch run and one past the end."""
    config = default.get_config()
    config.num_epochs, config.optimizer.warmup_epochs = 3, warmup_epochs
    total = steps_per_epoch * 3
    warmup = steps.warmup_steps(config.optimizer, steps_per_epoch, 3)
    peak = config.optimizer.learning_rate
    # optax's warmup-cosine needs a warmup of at least 1 step; with none, it is the cosine alone.
    theirs = (
        optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total)
        if warmup
        else optax.cosine_decay_schedule(peak, total)
    )
    ours = jax.jit(lambda count, p: steps.make_schedule(config.optimizer, steps_per_epoch, 3, peak=p)(count))
    counts = np.arange(total + 2)
    got = np.array([ours(jnp.int32(c), jnp.float32(peak)) for c in counts])
    expected = np.array([theirs(c) for c in counts])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-9)


def test_run_compiles_nothing_after_the_first_epoch(tiny_data_dir, tmp_path):
    result = run_main(
        ["--config=configs/cnn.py", f"--workdir={tmp_path}", *tiny_overrides(tiny_data_dir, num_epochs=3)]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / layout.FINAL_METRICS).read_text())
    assert report["compilations"]["per_epoch"][1:] == [0, 0]
    assert report["test"]["accuracy"] > 0.9  # the tiny set is easy: the pipeline works end to end
    assert "compiled in" in result.stdout and "epoch 3/3" in result.stdout


def test_huge_learning_rate_stops_with_a_clear_error(tiny_data_dir, tmp_path):
    args = [
        "--config=configs/mlp.py",
        f"--workdir={tmp_path}",
        *tiny_overrides(
            tiny_data_dir,
            **{
                "optimizer.learning_rate": 1e12,
                "optimizer.name": "sgd",
                "optimizer.schedule": "constant",
                "num_epochs": 1,  # every step is non-finite: one epoch shows the stop and the skipping
            },
        ),
    ]
    result = run_main(args)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "non-finite at step" in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    skipped = run_main(args[:1] + [f"--workdir={tmp_path}/skip"] + args[2:] + ["--config.train.on_nonfinite=skip"])
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    history = [json.loads(line) for line in open(os.path.join(tmp_path, "skip", layout.METRICS))]
    assert sum(r.get("train/nonfinite_steps", 0) for r in history) > 0
