"""The numerics: train state, optimizer, loss, the compiled train and predict steps.

Pure functions compiled once per run; no I/O, no TensorFlow, no W&B. The loop
in `training/loop.py` calls them; benchmarks and tests call them directly.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state

from mnist_flax.errors import ConfigError
from mnist_flax.training import distributed, input_pipeline, metrics


class TrainState(train_state.TrainState):
    """Params, optimizer state and step, plus the run's base PRNG key.

    Dropout keys are fold_in(rng, step), so a resumed run draws the same keys.
    """

    rng: jax.Array


# ---------------------------------------------------------------- setup


def total_steps(steps_per_epoch: int, num_epochs: int) -> int:
    """The schedule's length: the run's optimizer steps (at least 1)."""
    return max(1, steps_per_epoch * num_epochs)


def warmup_steps(optimizer_config: ml_collections.ConfigDict, steps_per_epoch: int, num_epochs: int) -> int:
    """Steps of linear warmup in the warmup-cosine schedule: warmup_epochs of them, at most one short of the run."""
    return min(int(optimizer_config.warmup_epochs * steps_per_epoch), total_steps(steps_per_epoch, num_epochs) - 1)


def make_schedule(optimizer_config: ml_collections.ConfigDict, steps_per_epoch: int, num_epochs: int, values=None):
    """The learning-rate schedule: constant, cosine, or linear warmup then cosine.

    Without `values` it is optax's schedule on the config's numbers (warmup-cosine: optax's
    `warmup_cosine_decay_schedule` with an end value of 0, put together from the same pieces). With `values` (from
    `hyperparameters`, traced inside the train step) the peak and the warmup's length are those values.
    """
    total = total_steps(steps_per_epoch, num_epochs)
    name = optimizer_config.schedule
    peak = optimizer_config.learning_rate if values is None else values["learning_rate"]
    if name == "constant":
        return optax.constant_schedule(peak)
    if name == "cosine":
        return optax.cosine_decay_schedule(peak, decay_steps=total)
    if name != "warmup_cosine":
        raise ConfigError(f"optimizer.schedule: unknown schedule {name!r}")
    warmup = warmup_steps(optimizer_config, steps_per_epoch, num_epochs)
    if values is not None and warmup > 0:
        return _warmup_cosine(values)
    # optax tests the peak against 0 in Python, so the peak (which may be traced) goes in through the pieces.
    warm = optax.linear_schedule(init_value=0.0, end_value=peak, transition_steps=warmup)
    decay = optax.cosine_decay_schedule(init_value=peak, decay_steps=total - warmup, alpha=0.0)
    return optax.join_schedules([warm, decay], [warmup])


def _warmup_cosine(values: dict):
    """optax's warmup-cosine schedule (end value 0) with the peak and the warmup's length traced.

    It is the program XLA makes of optax's schedule with the lengths as constants: XLA turns a division by a
    constant into a multiply by its float32 reciprocal, and `pi * count / decay_steps` into
    `count * (pi * (1 / decay_steps))`. Divided by a traced length the numbers would differ in the last bit, so
    `hyperparameters` works those constants out on the host, in float32 as XLA does, and this multiplies by them.
    """
    peak, warmup = values["learning_rate"], values["warmup_steps"]

    def schedule(count):
        # optax.linear_schedule(0, peak, warmup): (0 - peak) * (1 - count / warmup) + peak.
        frac = 1 - jnp.clip(count, 0, warmup).astype(jnp.float32) * values["warmup_reciprocal"]
        warm = (0.0 - peak) * frac + peak
        # optax.cosine_decay_schedule(peak, decay_steps, alpha=0) from step `warmup` on.
        decay_count = jnp.minimum((count - warmup).astype(jnp.float32), values["decay_steps"])
        decay = peak * ((jnp.cos(decay_count * values["decay_angle"]) + 1) * 0.5)
        return jnp.where(count < warmup, warm, decay)  # optax.join_schedules

    return schedule


def make_optimizer(
    optimizer_config: ml_collections.ConfigDict, schedule, values: dict | None = None
) -> optax.GradientTransformation:
    """sgd, momentum, adam or adamw on the schedule, with optional clipping and L2.

    Without `values` these are optax's optimizers on the config's numbers. With `values` (from
    `hyperparameters`, traced inside the train step) weight decay, momentum, b1 and b2 are those values; the
    optimizer's structure (which transformations, and whether weight decay is applied at all) comes from the
    config alone, so the optimizer state is the same either way.
    """
    name = optimizer_config.name
    if name not in ("sgd", "momentum", "adam", "adamw"):
        raise ConfigError(f"optimizer.name: unknown optimizer {name!r}")
    traced = values is not None
    values = values or {}
    decay = values.get("weight_decay", optimizer_config.weight_decay) if optimizer_config.weight_decay else 0.0
    momentum = values.get("momentum", optimizer_config.momentum)
    if name in ("adam", "adamw") and traced:
        # optax.adam / optax.adamw, transformation for transformation, with b1 and b2 traced.
        parts = [_scale_by_adam(values), optax.scale_by_learning_rate(schedule)]
        if name == "adamw":
            parts.insert(1, optax.add_decayed_weights(decay))
        base = optax.chain(*parts)
    elif name == "adamw":
        base = optax.adamw(schedule, b1=optimizer_config.b1, b2=optimizer_config.b2, weight_decay=decay)
    elif name == "adam":
        base = optax.adam(schedule, b1=optimizer_config.b1, b2=optimizer_config.b2)
    elif name == "momentum":
        base = optax.sgd(schedule, momentum=momentum)
    else:
        base = optax.sgd(schedule)
    # Coupled L2 for the non-decoupled optimizers, so weight_decay means something for each.
    coupled = name != "adamw" and optimizer_config.weight_decay
    tx = optax.chain(optax.add_decayed_weights(decay), base) if coupled else base
    if optimizer_config.grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(optimizer_config.grad_clip_norm), tx)
    return tx


def _scale_by_adam(values: dict) -> optax.GradientTransformation:
    """optax.scale_by_adam (eps 1e-8, eps_root 0, its state) with b1 and b2 traced.

    optax computes 1 - b1 from the Python float, in float64 rounded once to float32; 1 - b1 on a float32 b1
    rounds differently. So the complements come computed on the host in `values`, as label smoothing's do,
    and the rest is optax's update operation for operation.
    """
    b1, b2 = values["b1"], values["b2"]
    keep1, keep2 = values["one_minus_b1"], values["one_minus_b2"]

    def update_fn(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda g, t: keep1 * (g**1) + b1 * t, updates, state.mu)
        nu = jax.tree.map(lambda g, t: keep2 * (g**2) + b2 * t, updates, state.nu)
        count = optax.safe_increment(state.count)
        mu_hat = optax.tree.bias_correction(mu, b1, count)
        nu_hat = optax.tree.bias_correction(nu, b2, count)
        updates = jax.tree.map(lambda m, v: m / (jnp.sqrt(v + 0.0) + 1e-8), mu_hat, nu_hat)
        return updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(optax.scale_by_adam().init, update_fn)


# Hyperparameters the compiled train step takes as arguments. The rest of the recipe (optimizer and schedule
# kinds, clipping, focal gamma, eps, whether weight decay, a warmup and dropout are applied at all, the shapes)
# is written into the program.
TRACED_HYPERPARAMETERS = (
    "optimizer.learning_rate",
    "optimizer.weight_decay",
    "optimizer.momentum",
    "optimizer.b1",
    "optimizer.b2",
    "optimizer.warmup_epochs",
    "loss.label_smoothing",
    "model.dropout_rate",
)


def hyperparameters(config: ml_collections.ConfigDict, steps_per_epoch: int) -> dict[str, np.ndarray]:
    """The values of TRACED_HYPERPARAMETERS the train step is passed, as float32 scalars (the warmup's length in
    steps: int32), with the constants derived from them.

    As arguments, not constants, they leave the compiled program the same for every value: the trials of a sweep
    over them share one program, compiled once and then loaded from the compilation cache. The constants optax
    derives from a Python float (label smoothing's 1 - a and a / classes, Adam's 1 - b1 and 1 - b2) are
    computed here in float64 and rounded to float32 once, as optax does, and those XLA folds from the warmup
    and decay lengths in float32, as XLA does (`_warmup_cosine`); so the step's numbers are bit for bit those
    of the values baked in.
    """
    optimizer_config = config.optimizer
    smoothing = config.loss.label_smoothing if config.loss.name == "cross_entropy" else 0.0
    keep, spread = _smoothing(smoothing, input_pipeline.NUM_CLASSES)
    warmup = warmup_steps(optimizer_config, steps_per_epoch, config.num_epochs)
    decay_steps = np.float32(total_steps(steps_per_epoch, config.num_epochs) - warmup)
    dropout_keep = np.float32(1.0 - config.model.dropout_rate)  # flax's 1 - rate, in float64 rounded once
    return {
        "learning_rate": np.float32(optimizer_config.learning_rate),
        "weight_decay": np.float32(optimizer_config.weight_decay),
        "momentum": np.float32(optimizer_config.momentum),
        "b1": np.float32(optimizer_config.b1),
        "b2": np.float32(optimizer_config.b2),
        "one_minus_b1": np.float32(1.0 - optimizer_config.b1),
        "one_minus_b2": np.float32(1.0 - optimizer_config.b2),
        "warmup_steps": np.int32(warmup),
        "warmup_reciprocal": np.float32(1) / np.float32(max(warmup, 1)),
        "decay_steps": decay_steps,
        "decay_angle": np.float32(np.pi) * (np.float32(1) / decay_steps),
        "dropout_keep": dropout_keep,
        "dropout_scale": np.float32(1) / dropout_keep,
        "label_keep": keep,
        "label_spread": spread,
    }


def _smoothing(label_smoothing: float, num_classes: int) -> tuple[np.float32, np.float32]:
    """optax.smooth_labels' (1 - a) and a / classes, in float64 rounded once to float32."""
    return np.float32(1.0 - label_smoothing), np.float32(label_smoothing / num_classes)


def compute_loss(logits: jax.Array, labels: jax.Array, loss_config: ml_collections.ConfigDict, values=None):
    """Mean loss over the batch: cross-entropy (with label smoothing) or focal loss.

    `values` (from `hyperparameters`) carry label smoothing's constants; without them they come from the config.
    """
    num_classes = logits.shape[-1]
    if loss_config.name == "cross_entropy":
        if values is None:
            keep, spread = _smoothing(loss_config.label_smoothing, num_classes)
        else:
            keep, spread = values["label_keep"], values["label_spread"]
        # optax.smooth_labels' formula, on constants that may be traced.
        targets = keep * jax.nn.one_hot(labels, num_classes) + spread
        return optax.softmax_cross_entropy(logits, targets).mean()
    if loss_config.name == "focal":
        # Focal loss (Lin et al. 2017): down-weights examples already classified well.
        log_p = jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
        return (-((1.0 - jnp.exp(log_p)) ** loss_config.focal_gamma) * log_p).mean()
    raise ConfigError(f"loss.name: unknown loss {loss_config.name!r}")


def preprocess(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] images to float32 [0, 1]."""
    return images.astype(jnp.float32) / 255.0


def create_train_state(model, tx, seed: int) -> TrainState:
    """Initialises parameters and optimizer state from the seed."""
    rng = jax.random.PRNGKey(seed)
    init_rng, state_rng = jax.random.split(rng)
    dummy = jnp.zeros((1, *input_pipeline.IMAGE_SHAPE), jnp.float32)
    params = jax.jit(lambda key: model.init(key, dummy, train=False)["params"])(init_rng)
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx, rng=state_rng)


# ---------------------------------------------------------------- compiled steps


def empty_guard() -> dict:
    """Device-side record of non-finite losses: how many, and the first step."""
    return {"count": jnp.zeros((), jnp.int32), "first_step": jnp.full((), -1, jnp.int32)}


def _one_step_fn(config, steps_per_epoch: int, shard, constants: bool):
    """fn(carry, images, labels, order, values) -> carry: one optimizer step on the batch at row
    step % steps_per_epoch of `order`; with `constants`, on the config's numbers instead of `values`."""
    augment_config = config.data.get("augment")

    def one_step(carry, images, labels, order, values):
        values = None if constants else values
        state, train_metrics, guard = carry
        batch_idx = shard(order[state.step % steps_per_epoch])
        batch_images, batch_labels = preprocess(shard(images[batch_idx])), shard(labels[batch_idx])
        dropout_rng = jax.random.fold_in(state.rng, state.step)
        if augment_config is not None:
            batch_images = input_pipeline.augment(
                batch_images,
                jax.random.fold_in(dropout_rng, 1),  # a stream of its own; dropout's draws stay as they were
                flip=augment_config.flip,
                max_shift=augment_config.max_shift,
            )

        def loss_fn(params):
            dropout_values = None if values is None else (values["dropout_keep"], values["dropout_scale"])
            logits = state.apply_fn(
                {"params": params},
                batch_images,
                train=True,
                rngs={"dropout": dropout_rng},
                dropout_values=dropout_values,
            )
            return compute_loss(logits, batch_labels, config.loss, values), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        finite = jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(grads))
        # The optimizer of state.tx, built on the traced values: state.apply_gradients with them.
        schedule = make_schedule(config.optimizer, steps_per_epoch, config.num_epochs, values)
        tx = make_optimizer(config.optimizer, schedule, values)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        updated = state.replace(
            step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state
        )
        state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state)
        state = state.replace(step=updated.step)
        step_metrics = metrics.TrainMetrics.single_from_model_output(loss=loss, logits=logits, labels=batch_labels)
        merged = train_metrics.merge(step_metrics)
        train_metrics = jax.tree.map(lambda m, t: jnp.where(finite, m, t), merged, train_metrics)
        guard = {
            "count": guard["count"] + (~finite).astype(jnp.int32),
            "first_step": jnp.where((guard["first_step"] < 0) & ~finite, updated.step - 1, guard["first_step"]).astype(
                jnp.int32
            ),
        }
        return state, train_metrics, guard

    return one_step


def make_train_step(
    config, steps_per_epoch: int, steps_per_call: int = 1, unroll: int = 1, mesh=None, constants: bool = False
):
    """Returns a jitted fn(carry, images, labels, order, values) -> carry.

    carry = (state, train_metrics, guard); values = `hyperparameters(config, steps_per_epoch)`, replicated with a
    mesh. The recipe comes from `config` (optimizer, schedule over config.num_epochs, loss, config.data.augment,
    which flips and shifts the batch on the device); the values of TRACED_HYPERPARAMETERS are arguments, so one
    program serves them all. Each step gathers its batch on the device from the resident `images`/`labels` by the
    epoch's `order`, at row `state.step % steps_per_epoch`. A step whose loss or gradients are not finite leaves
    params and optimizer state unchanged and is counted in `guard`; the host decides at the next log point whether
    to stop. With steps_per_call > 1 the steps are fused: written out one after another when `unroll` covers them
    all, else with lax.scan; steps past the end of the epoch are masked out, so a call never crosses an epoch and
    nothing recompiles. With a mesh, the batch is split along its "data" axis (the carry and the resident data are
    replicated); without one, it runs on the default device. With `constants` the step ignores `values` and has the
    config's hyperparameters written in as constants, through optax's own optimizers and schedules: the numbers the
    values must reproduce bit for bit (tests compare the two).
    """
    one_step = _one_step_fn(config, steps_per_epoch, _batch_constraint(mesh), constants)
    out_shardings = distributed.replicated(mesh) if mesh is not None else None
    if steps_per_call == 1:
        return jax.jit(one_step, donate_argnums=(0,), out_shardings=out_shardings)

    def unrolled_steps(carry, images, labels, order, values):
        # Straight-line code: every step runs, and a step past the end of the epoch is dropped by a select
        # (a conditional would take XLA's CPU convolutions off their fast path, like a loop).
        remaining = steps_per_epoch - carry[0].step % steps_per_epoch
        for i in range(steps_per_call):
            stepped = one_step(carry, images, labels, order, values)
            if i == 0:  # a call never starts at the end of an epoch
                carry = stepped
            else:
                carry = jax.tree.map(lambda new, old, keep=i < remaining: jnp.where(keep, new, old), stepped, carry)
        return carry

    def fused_steps(carry, images, labels, order, values):
        remaining = steps_per_epoch - carry[0].step % steps_per_epoch

        def body(carry, i):
            carry = jax.lax.cond(
                i < remaining, lambda c: one_step(c, images, labels, order, values), lambda c: c, carry
            )
            return carry, None

        carry, _ = jax.lax.scan(body, carry, jnp.arange(steps_per_call), unroll=unroll)
        return carry

    fused = unrolled_steps if unroll >= steps_per_call else fused_steps
    return jax.jit(fused, donate_argnums=(0,), out_shardings=out_shardings)


def _batch_constraint(mesh):
    """Marks an array as split along the mesh's data axis (identity without a mesh)."""
    if mesh is None:
        return lambda x: x
    return lambda x: jax.lax.with_sharding_constraint(x, distributed.batch_sharded(mesh))


def make_predict(apply_fn, batch_size: int, mesh=None):
    """Returns a jitted fn(params, images, start) -> log-probabilities of one batch (replicated)."""
    shard = _batch_constraint(mesh)

    def predict(params, images, start):
        batch = shard(jax.lax.dynamic_slice_in_dim(images, start, batch_size))
        return jax.nn.log_softmax(apply_fn({"params": params}, preprocess(batch), train=False))

    return jax.jit(predict, out_shardings=distributed.replicated(mesh) if mesh is not None else None)


def evaluate(predict, params, split: input_pipeline.DeviceSplit, batch_size: int) -> tuple[np.ndarray, dict]:
    """Log-probabilities of every example of a (padded) split and its classification report."""
    outputs = [predict(params, split.images, start) for start in range(0, split.images.shape[0], batch_size)]
    log_probs = np.concatenate([distributed.to_host(o) for o in outputs])[: split.num_valid]
    labels = distributed.to_host(split.labels)[: split.num_valid]
    return log_probs, metrics.classification_metrics(log_probs, labels)


class CompileCounter:
    """Counts XLA compilations while active (for tests and reports): `count` the programs asked for (compiled,
    or loaded from the persistent compilation cache), `cached` those loaded from it."""

    EVENT = "/jax/core/compile/backend_compile_duration"
    CACHE_HIT = "/jax/compilation_cache/cache_hits"

    def __init__(self):
        self.count = 0
        self.cached = 0
        self.seconds = 0.0

    def _listener(self, event: str, duration: float, **kwargs) -> None:
        if event == self.EVENT:
            self.count += 1
            self.seconds += duration

    def _hit(self, event: str, **kwargs) -> None:
        if event == self.CACHE_HIT:
            self.cached += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        jax.monitoring.register_event_listener(self._hit)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listener)
        jax.monitoring.unregister_event_listener(self._hit)
