"""Resolve once: the config file plus overrides -> the concrete config of this run.

Every "auto" is decided here, for this backend and device count, and nowhere
else: steps per call, scan unroll, the batch split, the data source, the W&B
mode; the model and data sections keep the model's and the data set's own fields. The result is validated
once, written to `config.json`, and everything downstream reads concrete values.
"""

import jax
import ml_collections

from mnist_flax import datasets, models
from mnist_flax.config import schema
from mnist_flax.config.schema import auto_or_int
from mnist_flax.errors import ConfigError
from mnist_flax.tracking import wandb_run

CPU_STEPS_PER_CALL = 3
ACCELERATOR_STEPS_PER_CALL = 50
MAX_BATCH_SPLIT = 8
MIN_PIECE = 16


def steps_per_call(value, backend: str) -> int:
    """Steps fused per compiled call. "auto": 3 on CPU, 50 on accelerators.

    On CPU the fused steps are written out (see `scan_unroll`), so compile time
    grows with the count: 3 keeps the CNN's compile (train step + predict) near
    4 s and runs within a few percent of 5 (5 compiles in 5.5 s).
    """
    value = auto_or_int(value)
    if value == "auto":
        return CPU_STEPS_PER_CALL if backend == "cpu" else ACCELERATOR_STEPS_PER_CALL
    return value


def scan_unroll(value, num_steps_per_call: int, backend: str) -> int:
    """Fused steps lax.scan unrolls per iteration. "auto": all of them on CPU, 1 on accelerators.

    Unrolling them all makes `steps.make_train_step` write the steps out with
    no loop at all: XLA's CPU convolutions leave their fast path inside a loop
    or a conditional (jax#12868: 10x slower).
    """
    value = auto_or_int(value)
    if value == "auto":
        return num_steps_per_call if backend == "cpu" else 1
    return value


def batch_split(value, per_device_batch: int, backend: str, stateful: bool = False) -> int:
    """Pieces each training batch is split into before the model's first Dense layer (steps.apply_in_pieces).

    "auto": on CPU the most pieces (up to 8, a power of two) that divide the per-device batch into pieces of at
    least 16 examples (8 pieces of 16 at batch 128); 1 on GPU/TPU, whose convolutions use the whole device
    already, and 1 for a model with state besides its parameters (`stateful`: BatchNorm would normalise each
    piece by its own statistics instead of the batch's). A split asked of such a model is a ConfigError.
    """
    value = auto_or_int(value)
    if value != "auto":
        if stateful and value > 1:
            raise ConfigError(
                f"train.batch_split: {value} pieces, but the model has state besides its parameters (BatchNorm's "
                "statistics need the whole batch); use 1 or auto"
            )
        return value
    if backend != "cpu" or per_device_batch <= 0 or stateful:
        return 1
    pieces = MAX_BATCH_SPLIT
    while pieces > 1 and (per_device_batch % pieces or per_device_batch // pieces < MIN_PIECE):
        pieces //= 2
    return pieces


def has_state(model_config, description: datasets.Description) -> bool:
    """Whether the model, built for the data set `description` describes, has collections besides "params"
    (BatchNorm's batch statistics); shapes only."""
    model = models.create(model_config, description.num_classes)
    dummy = jax.ShapeDtypeStruct((1, *description.image_shape), jax.numpy.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), dummy)
    return any(name != "params" for name in variables)


def resolve(
    config: ml_collections.ConfigDict,
    description: datasets.Description,
    backend: str | None = None,
    num_devices: int | None = None,
) -> ml_collections.ConfigDict:
    """The concrete config of this run: every "auto" decided, batch sizes checked against the devices, the result
    validated.

    Args:
      config: the config as the file and the overrides give it, validated (`schema.validate`; not changed).
      description: the data set's (datasets.Description): the model is probed at its image shape and classes.
      backend: "cpu", "gpu", "tpu"; default: JAX's default backend.
      num_devices: devices the batch is split over; default: every device of every process.
    """
    backend = backend or jax.default_backend()
    num_devices = num_devices or jax.device_count()
    for name in ("batch_size", "eval_batch_size"):
        if config[name] % num_devices:
            raise ConfigError(f"{name}: {config[name]} does not split evenly over {num_devices} devices")
    fields = config.to_dict()
    per_device = config.batch_size // num_devices
    fields["model"] = models.own_fields(config.model)
    pieces = batch_split(config.train.batch_split, per_device, backend, has_state(fields["model"], description))
    if per_device % pieces:
        raise ConfigError(f"train.batch_split: {pieces} pieces do not divide the batch of {per_device} on each device")
    fused = steps_per_call(config.train.steps_per_call, backend)
    unroll = scan_unroll(config.train.scan_unroll, fused, backend)
    fields["train"].update(steps_per_call=fused, scan_unroll=unroll, batch_split=pieces)
    fields["data"] = datasets.resolve(config.data)  # the data set's own fields, "auto" decided
    # Only "auto" asks for a stored key (importing wandb); every mode exports an .env's WANDB_TOKEN for wandb.
    token = wandb_run.read_token(stored=config.wandb.mode == "auto")
    fields["wandb"]["mode"] = wandb_run.resolve_mode(config.wandb.mode, token)
    resolved = ml_collections.ConfigDict(fields)
    schema.validate(resolved)
    return resolved
