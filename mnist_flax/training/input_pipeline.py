"""Data: the configured data set's arrays (mnist_flax/datasets), held on the device as uint8.

Host side (NumPy): load the data set through its module, hold out a validation split, take subsets.
Device side (JAX): the arrays live in device memory for the whole run; each
epoch's order is a permutation drawn on the device from (seed, epoch), so the
host does no data work per step and a resumed run sees the same order.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mnist_flax import datasets
from mnist_flax.datasets import Split
from mnist_flax.errors import ConfigError

# The validation split is a fixed draw, the same for every run seed, so runs
# with different seeds are selected on the same examples.
SPLIT_SEED = 20_231_129

__all__ = ["Datasets", "DeviceSplit", "Split", "augment", "epoch_order", "load_datasets", "to_device"]


@dataclasses.dataclass(frozen=True)
class Datasets:
    """Train, validation (held out of train, where the source has none) and test splits, and their description."""

    train: Split
    validation: Split
    test: Split
    description: datasets.Description

    @property
    def name(self) -> str:
        return self.description.name

    @property
    def source(self) -> str:
        """e.g. "idx:/usr/share/datasets/fashion-mnist" or "tfds:mnist"."""
        return self.description.source


# ---------------------------------------------------------------- splits


def hold_out_validation(train: Split, validation_size: int) -> tuple[Split, Split]:
    """Splits the training set into train and validation by a fixed permutation."""
    order = np.random.default_rng(SPLIT_SEED).permutation(len(train))
    val_idx, train_idx = order[:validation_size], order[validation_size:]
    return (
        Split(train.images[train_idx], train.labels[train_idx]),
        Split(train.images[val_idx], train.labels[val_idx]),
    )


def _head(split: Split, count: int) -> Split:
    return split if count <= 0 else Split(split.images[:count], split.labels[:count])


def load_datasets(data_config: ml_collections.ConfigDict) -> Datasets:
    """Loads the configured data set (its module in mnist_flax/datasets, its "auto" fields decided), holds out
    validation, takes subsets."""
    loaded = datasets.load(datasets.resolve(data_config))
    full_train, validation = loaded.train, loaded.validation
    if validation is None:
        if data_config.validation_size >= len(full_train):
            raise ConfigError(
                f"data.validation_size: {data_config.validation_size} leaves no training "
                f"examples (the training set has {len(full_train)})"
            )
        full_train, validation = hold_out_validation(full_train, data_config.validation_size)
    return Datasets(
        train=_head(full_train, data_config.train_subset),
        validation=_head(validation, data_config.eval_subset),
        test=_head(loaded.test, data_config.eval_subset),
        description=loaded.description,
    )


# ---------------------------------------------------------------- on the device


@dataclasses.dataclass(frozen=True)
class DeviceSplit:
    """A split resident in device memory; `num_valid` excludes eval padding."""

    images: jax.Array
    labels: jax.Array
    num_valid: int


def to_device(split: Split, pad_to_multiple: int = 1, mesh=None) -> DeviceSplit:
    """Copies a split to the device(s) once, padded (with repeats of example 0) to a multiple.

    With a mesh the arrays are replicated on every device of every process.
    """
    from mnist_flax.training import distributed

    images, labels = split.images, split.labels
    pad = (-len(labels)) % pad_to_multiple
    if pad:
        images = np.concatenate([images, np.repeat(images[:1], pad, axis=0)])
        labels = np.concatenate([labels, np.repeat(labels[:1], pad, axis=0)])
    if mesh is not None:
        images, labels = distributed.put_replicated((images, labels), mesh)
    else:
        images, labels = jnp.asarray(images), jnp.asarray(labels)
    return DeviceSplit(images, labels, num_valid=len(split))


def epoch_order(key: jax.Array, epoch: jax.Array | int, num_examples: int, batch_size: int) -> jax.Array:
    """The epoch's batches as indices, shape (steps_per_epoch, batch_size).

    A permutation drawn from fold_in(key, epoch); the last incomplete batch is
    dropped, so every step has the same shape and nothing recompiles. The
    dropped examples differ from epoch to epoch.
    """
    steps = num_examples // batch_size
    order = jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)
    return order[: steps * batch_size].reshape(steps, batch_size).astype(jnp.int32)


def augment(images: jax.Array, key: jax.Array, flip: bool = False, max_shift: int = 0) -> jax.Array:
    """Random training-time changes of a batch (N, H, W, C), on the device, inside the compiled step.

    flip: each image mirrored left-right with probability 1/2 (clothes look the
    same mirrored; digits do not, so keep it off for MNIST). max_shift: each
    image moved by up to that many pixels in each direction, the edge filled
    with zeros (the background of both data sets). Draws from `key` only, so a
    resumed run repeats them.
    """
    if not flip and not max_shift:
        return images
    flip_key, shift_key = jax.random.split(key)
    if flip:
        mirrored = jax.random.bernoulli(flip_key, 0.5, (images.shape[0], 1, 1, 1))
        images = jnp.where(mirrored, images[:, :, ::-1, :], images)
    if max_shift:
        n, height, width, channels = images.shape
        padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
        offsets = jax.random.randint(shift_key, (n, 2), 0, 2 * max_shift + 1)

        def crop(image, offset):
            return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))

        images = jax.vmap(crop)(padded, offsets)
    return images
