"""The numerics: train state, optimizer, loss, the compiled train and predict steps.

Pure functions compiled once per run; no I/O, no TensorFlow, no W&B. The loop
in `training/loop.py` calls them; benchmarks and tests call them directly. The model is
any Linen module with flax's contract: `__call__(x, train)`, the "dropout" rng,
and any collections besides "params" (BatchNorm's "batch_stats"), which the
state carries. What makes a step fast on CPU is done around the model here
(`apply_in_pieces`: the batch split; `make_train_step`: fused steps), so every
model gets it without knowing.
"""

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state

from mnist_flax.errors import ConfigError
from mnist_flax.training import distributed, input_pipeline, metrics


class TrainState(train_state.TrainState):
    """Params, optimizer state and step, the run's base PRNG key, and the model's other collections.

    Dropout keys are fold_in(rng, step), so a resumed run draws the same keys. `model_state` holds every
    collection the model has besides "params" (BatchNorm's "batch_stats"; {} for most models): updated by the
    train step, used by evaluation, saved and restored with the rest.
    """

    rng: jax.Array
    model_state: Any = flax.struct.field(default_factory=dict)

    def variables(self) -> dict:
        """The model's variables, as `model.apply` takes them."""
        return {"params": self.params, **self.model_state}


# ---------------------------------------------------------------- setup


def total_steps(steps_per_epoch: int, num_epochs: int) -> int:
    """The schedule's length: the run's optimizer steps (at least 1)."""
    return max(1, steps_per_epoch * num_epochs)


def warmup_steps(optimizer_config: ml_collections.ConfigDict, steps_per_epoch: int, num_epochs: int) -> int:
    """Steps of linear warmup in the warmup-cosine schedule: warmup_epochs of them, at most one short of the run."""
    return min(int(optimizer_config.warmup_epochs * steps_per_epoch), total_steps(steps_per_epoch, num_epochs) - 1)


def make_schedule(optimizer_config: ml_collections.ConfigDict, steps_per_epoch: int, num_epochs: int, peak=None):
    """The learning-rate schedule: constant, cosine, or linear warmup then cosine (to 0).

    `peak`: the peak learning rate, a value that may be traced (inside `make_optimizer`'s injected
    hyperparameters); default the config's. optax's `warmup_cosine_decay_schedule` tests its peak against 0 in
    Python, so warmup-cosine is put together from the same optax pieces.
    """
    total = total_steps(steps_per_epoch, num_epochs)
    name = optimizer_config.schedule
    peak = optimizer_config.learning_rate if peak is None else peak
    if name == "constant":
        return optax.constant_schedule(peak)
    if name == "cosine":
        return optax.cosine_decay_schedule(peak, decay_steps=total)
    if name != "warmup_cosine":
        raise ConfigError(f"optimizer.schedule: unknown schedule {name!r}")
    warmup = warmup_steps(optimizer_config, steps_per_epoch, num_epochs)
    warm = optax.linear_schedule(init_value=0.0, end_value=peak, transition_steps=warmup)
    decay = optax.cosine_decay_schedule(init_value=peak, decay_steps=total - warmup, alpha=0.0)
    return optax.join_schedules([warm, decay], [warmup])


# The optimizer's hyperparameters held as values in its state (optax.inject_hyperparams): a sweep over them
# runs one compiled program. The rest (optimizer and schedule kinds, the warmup's length, clipping, the loss,
# dropout, whether weight decay is applied at all) is written into the program.
INJECTED_HYPERPARAMETERS = ("learning_rate", "weight_decay", "momentum", "b1", "b2")


def make_optimizer(
    optimizer_config: ml_collections.ConfigDict, steps_per_epoch: int, num_epochs: int
) -> optax.GradientTransformation:
    """sgd, momentum, adam or adamw on the schedule, with optional clipping and L2, under optax.inject_hyperparams.

    The state is `InjectHyperparamsState`: its `hyperparams` hold INJECTED_HYPERPARAMETERS (the learning rate is
    the schedule's peak), from the config at `init`.
    """
    name = optimizer_config.name
    if name not in ("sgd", "momentum", "adam", "adamw"):
        raise ConfigError(f"optimizer.name: unknown optimizer {name!r}")
    decayed = bool(optimizer_config.weight_decay)

    def optimizer(learning_rate, weight_decay, momentum, b1, b2):
        schedule = make_schedule(optimizer_config, steps_per_epoch, num_epochs, peak=learning_rate)
        if name == "adamw":
            tx = optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay if decayed else 0.0)
        elif name == "adam":
            tx = optax.adam(schedule, b1=b1, b2=b2)
        else:
            tx = optax.sgd(schedule, momentum=momentum if name == "momentum" else None)
        if name != "adamw" and decayed:  # coupled L2 for the others, so weight_decay means something for each
            tx = optax.chain(optax.add_decayed_weights(weight_decay), tx)
        if optimizer_config.grad_clip_norm:
            tx = optax.chain(optax.clip_by_global_norm(optimizer_config.grad_clip_norm), tx)
        return tx

    return optax.inject_hyperparams(optimizer)(**{k: float(optimizer_config[k]) for k in INJECTED_HYPERPARAMETERS})


def with_config_hyperparameters(restored: "TrainState", fresh: "TrainState") -> "TrainState":
    """A restored state with the injected hyperparameters of this run's config (from `fresh`, a state built
    from it): a checkpoint holds the values it was trained with, a run changed deliberately on resume trains
    with its own."""
    return restored.replace(opt_state=restored.opt_state._replace(hyperparams=fresh.opt_state.hyperparams))


def compute_loss(logits: jax.Array, labels: jax.Array, loss_config: ml_collections.ConfigDict):
    """Mean loss over the batch: cross-entropy (with optax's label smoothing) or focal loss."""
    num_classes = logits.shape[-1]
    if loss_config.name == "cross_entropy":
        targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), loss_config.label_smoothing)
        return optax.softmax_cross_entropy(logits, targets).mean()
    if loss_config.name == "focal":
        # Focal loss (Lin et al. 2017): down-weights examples already classified well.
        log_p = jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
        return (-((1.0 - jnp.exp(log_p)) ** loss_config.focal_gamma) * log_p).mean()
    raise ConfigError(f"loss.name: unknown loss {loss_config.name!r}")


def preprocess(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] images to float32 [0, 1]."""
    return images.astype(jnp.float32) / 255.0


def create_train_state(model, tx, seed: int, input_shape: tuple[int, int, int]) -> TrainState:
    """Initialises the model's variables (params and any other collections) and the optimizer state."""
    rng = jax.random.PRNGKey(seed)
    init_rng, state_rng = jax.random.split(rng)
    dummy = jnp.zeros((1, *input_shape), jnp.float32)
    variables = dict(jax.jit(lambda key: model.init(key, dummy, train=False))(init_rng))
    params = variables.pop("params")
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx, rng=state_rng, model_state=variables)


# ---------------------------------------------------------------- compiled steps


def empty_guard() -> dict:
    """Device-side record of non-finite losses: how many, and the first step."""
    return {"count": jnp.zeros((), jnp.int32), "first_step": jnp.full((), -1, jnp.int32)}


class _DenseInput(Exception):
    """Raised by `apply_in_pieces` at a model's first Dense layer, with that layer's input."""

    def __init__(self, features):
        super().__init__("first Dense layer reached")
        self.features = features


def _at_first_dense(action):
    """A flax method interceptor that calls `action(next_fun, args, kwargs)` at the first `nn.Dense` call."""
    reached = False

    def interceptor(next_fun, args, kwargs, context):
        nonlocal reached
        if reached or context.method_name != "__call__" or not isinstance(context.module, nn.Dense):
            return next_fun(*args, **kwargs)
        reached = True
        return action(next_fun, args, kwargs)

    return nn.intercept_methods(interceptor)


def apply_in_pieces(apply_fn, variables: dict, images: jax.Array, rng: jax.Array, pieces: int = 1):
    """(logits, updated collections) of the model in training on the batch, its layers before the first Dense
    layer computed on `pieces` pieces of the batch.

    Piece p holds rows p, p + k, p + 2k, ... (interleaved, so every piece stays spread evenly over a
    batch-sharded mesh). The model runs once per piece up to its first `nn.Dense` (flax's method interceptors
    stop it there), and once on the whole batch with that layer's input replaced by the pieces' features joined
    in batch order; XLA drops what each pass computes that the other replaces. So a CNN's convolutions run as
    independent programs, side by side on XLA's CPU backend (where each convolution runs on one thread) and in
    cache (benchmarks/RESULTS.md), while its dense head runs on the whole batch, where splitting costs. The
    maths is the model's (per-example outputs equal; the weight gradients of the split layers sum over the
    pieces); a dropout layer before the first Dense draws its masks per piece, from fold_in(rng, p). A model
    without a Dense layer runs on the whole batch. The pieces' layers must treat examples independently: a
    model with state (BatchNorm) is not split (`resolution.batch_split`). pieces=1 is the model on the whole
    batch.
    """
    mutable = [name for name in variables if name != "params"]

    def apply(x, key):
        return apply_fn(variables, x, train=True, rngs={"dropout": key}, mutable=mutable)

    if pieces == 1:
        return apply(images, rng)

    def stop(next_fun, args, kwargs):
        raise _DenseInput(args[0])

    n = images.shape[0]
    grouped = images.reshape((n // pieces, pieces, *images.shape[1:]))
    features = []
    for p in range(pieces):
        try:
            with _at_first_dense(stop):
                apply(grouped[:, p], jax.random.fold_in(rng, p))
        except _DenseInput as reached:
            features.append(reached.features)
        else:  # no Dense layer: nothing to join the pieces at
            return apply(images, rng)
    joined = jnp.stack(features, axis=1).reshape((n, *features[0].shape[1:]))
    with _at_first_dense(lambda next_fun, args, kwargs: next_fun(joined, *args[1:], **kwargs)):
        return apply(images, rng)


def _one_step_fn(config, steps_per_epoch: int, shard, batch_split: int):
    """fn(carry, images, labels, order) -> carry: one optimizer step on the batch at row step % steps_per_epoch
    of `order`."""
    augment_config = config.data.get("augment")

    def one_step(carry, images, labels, order):
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
            variables = {"params": params, **state.model_state}
            logits, model_state = apply_in_pieces(state.apply_fn, variables, batch_images, dropout_rng, batch_split)
            return compute_loss(logits, batch_labels, config.loss), (logits, model_state)

        (loss, (logits, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        finite = jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(grads))
        updated = state.apply_gradients(grads=grads, model_state=model_state)
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


def make_train_step(config, steps_per_epoch: int, steps_per_call: int = 1, unroll: int = 1, mesh=None):
    """Returns a jitted fn(carry, images, labels, order) -> carry.

    carry = (state, train_metrics, guard). The recipe comes from `config` (loss, config.data.augment, which flips
    and shifts the batch on the device, and config.train.batch_split: the pieces of `apply_in_pieces`); the
    optimizer is the state's, its hyperparameters values in its state. Each step gathers its batch on the device
    from the resident `images`/`labels` by the epoch's `order`, at row `state.step % steps_per_epoch`. A step
    whose loss or gradients are not finite leaves the state unchanged (but its step) and is counted in `guard`;
    the host decides at the next log point whether to stop. With steps_per_call > 1 the steps are fused: written
    out one after another when `unroll` covers them all, else with lax.scan; steps past the end of the epoch are
    masked out, so a call never crosses an epoch and nothing recompiles. With a mesh, the batch is split along its
    "data" axis (the carry and the resident data are replicated; XLA computes the batch statistics of a
    BatchNorm over the whole global batch); without one, it runs on the default device.
    """
    batch_split = config.train.get("batch_split", "auto")
    batch_split = 1 if batch_split == "auto" else int(batch_split)  # unresolved (tests, benchmarks): the whole batch
    one_step = _one_step_fn(config, steps_per_epoch, _batch_constraint(mesh), batch_split)
    out_shardings = distributed.replicated(mesh) if mesh is not None else None
    if steps_per_call == 1:
        return jax.jit(one_step, donate_argnums=(0,), out_shardings=out_shardings)

    def unrolled_steps(carry, images, labels, order):
        # Straight-line code: every step runs, and a step past the end of the epoch is dropped by a select
        # (a conditional would take XLA's CPU convolutions off their fast path, like a loop).
        remaining = steps_per_epoch - carry[0].step % steps_per_epoch
        for i in range(steps_per_call):
            stepped = one_step(carry, images, labels, order)
            if i == 0:  # a call never starts at the end of an epoch
                carry = stepped
            else:
                carry = jax.tree.map(lambda new, old, keep=i < remaining: jnp.where(keep, new, old), stepped, carry)
        return carry

    def fused_steps(carry, images, labels, order):
        remaining = steps_per_epoch - carry[0].step % steps_per_epoch

        def body(carry, i):
            carry = jax.lax.cond(i < remaining, lambda c: one_step(c, images, labels, order), lambda c: c, carry)
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
    """Returns a jitted fn(variables, images, start) -> log-probabilities of one batch (replicated)."""
    shard = _batch_constraint(mesh)

    def predict(variables, images, start):
        batch = shard(jax.lax.dynamic_slice_in_dim(images, start, batch_size))
        return jax.nn.log_softmax(apply_fn(variables, preprocess(batch), train=False))

    return jax.jit(predict, out_shardings=distributed.replicated(mesh) if mesh is not None else None)


def evaluate(predict, variables, split: input_pipeline.DeviceSplit, batch_size: int) -> tuple[np.ndarray, dict]:
    """Log-probabilities of every example of a (padded) split and its classification report."""
    outputs = [predict(variables, split.images, start) for start in range(0, split.images.shape[0], batch_size)]
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
