"""Data: MNIST-format IDX files or tensorflow-datasets, held on the device as uint8.

Host side (NumPy): load and validate the files, hold out a validation split.
Device side (JAX): the arrays live in device memory for the whole run; each
epoch's order is a permutation drawn on the device from (seed, epoch), so the
host does no data work per step and a resumed run sees the same order.
"""

import dataclasses
import gzip
import importlib.util
import os
import socket
import struct
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mnist_flax.errors import ConfigError, DataError, first_line

DATASETS = ("mnist", "fashion_mnist")
NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28, 1)
# Where Debian's packages put the IDX files (`apt install dataset-fashion-mnist`).
STANDARD_DIRS = {"fashion_mnist": "/usr/share/datasets/fashion-mnist", "mnist": "/usr/share/datasets/mnist"}
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
# Class names by data set, in label order.
CLASS_NAMES = {
    "mnist": [str(d) for d in range(10)],
    "fashion_mnist": [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ],
}
# The validation split is a fixed draw, the same for every run seed, so runs
# with different seeds are selected on the same examples.
SPLIT_SEED = 20_231_129


@dataclasses.dataclass(frozen=True)
class Split:
    """One split on the host: images (N, 28, 28, 1) uint8, labels (N,) int32."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Datasets:
    """Train, validation (held out of train) and test splits, and where they came from."""

    train: Split
    validation: Split
    test: Split
    name: str
    source: str  # e.g. "idx:/usr/share/datasets/fashion-mnist" or "tfds:mnist"


# ---------------------------------------------------------------- IDX files


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise DataError(f"{path}: corrupt or truncated gzip data ({e})") from None
    return raw


def read_idx(path: str, expected_magic: int) -> np.ndarray:
    """Reads one IDX file (gzip or raw) and checks its header against its size.

    Raises:
      DataError: the file is missing, not IDX, of another kind, or truncated.
    """
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataError(f"{path}: too short to be an IDX file ({len(raw)} bytes)")
    (magic,) = struct.unpack(">I", raw[:4])
    if magic != expected_magic:
        kind = "images (0x00000803)" if expected_magic == IMAGES_MAGIC else "labels (0x00000801)"
        raise DataError(f"{path}: wrong magic number 0x{magic:08x}, expected IDX {kind}")
    ndim = magic & 0xFF
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DataError(f"{path}: truncated header")
    shape = struct.unpack(f">{ndim}I", raw[4:header_size])
    expected = int(np.prod(shape))
    actual = len(raw) - header_size
    if actual != expected:
        raise DataError(
            f"{path}: header says {'x'.join(map(str, shape))} = {expected} bytes of data, "
            f"file has {actual} ({'truncated' if actual < expected else 'trailing bytes'})"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape)


def _find_file(directory: str, stem: str) -> str:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx") + ".gz"):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    raise DataError(f"{directory}: missing {stem}.gz (or {stem})")


def load_idx_split(directory: str, split: str) -> Split:
    """Loads and validates the "train" or "test" split from a folder of IDX files."""
    images_stem, labels_stem = IDX_FILES[split]
    images_path = _find_file(directory, images_stem)
    labels_path = _find_file(directory, labels_stem)
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC)
    if images.shape[1:] != IMAGE_SHAPE[:2]:
        raise DataError(f"{images_path}: images are {images.shape[1:]}, expected 28x28")
    if len(images) != len(labels):
        raise DataError(f"{directory}: {split} has {len(images)} images but {len(labels)} labels")
    if len(labels) and labels.max() >= NUM_CLASSES:
        bad = int(np.argmax(labels >= NUM_CLASSES))
        raise DataError(f"{labels_path}: label {int(labels[bad])} at index {bad} is out of range 0..{NUM_CLASSES - 1}")
    return Split(images.reshape((-1, *IMAGE_SHAPE)), labels.astype(np.int32))


# ---------------------------------------------------------------- TFDS


TFDS_DOWNLOAD_HOST = "storage.googleapis.com"
TFDS_HINT = (
    "put the four IDX files in a folder and pass --config.data.local_dir=DIR, "
    "or train on Fashion-MNIST offline: apt install dataset-fashion-mnist and --config.data.name=fashion_mnist"
)


def _download_host_reachable(timeout: float = 5.0) -> bool:
    """Whether TFDS could download (a proxy, or a TCP connection to its host); fails in seconds, not minutes."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    try:
        socket.create_connection((TFDS_DOWNLOAD_HOST, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def tensorflow_installed() -> bool:
    """Whether TensorFlow can be imported (found, not imported: that takes seconds)."""
    try:
        return importlib.util.find_spec("tensorflow") is not None
    except (ImportError, ValueError):
        return False


def load_tfds_split(name: str, split: str, data_dir: str | None) -> Split:
    """Loads a whole split through tensorflow-datasets (imported only here).

    `tfds.load` builds a tf.data pipeline, so this needs TensorFlow: pyproject.toml's `tfds` extra, which
    nothing else of a run needs (importing TFDS, `tfds.builder` and `tfds.testing.mock_data` do not).
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(
            f"tensorflow-datasets is not installed ({e}); use IDX files with --config.data.local_dir"
        ) from None
    if not tensorflow_installed():
        remedy = (
            "TensorFlow has no wheel for Python 3.14 yet"
            if sys.version_info >= (3, 14)
            else "install the `tfds` extra (make setup does; or uv sync --extra tfds; or pip install tensorflow-cpu)"
        )
        raise DataError(f"{name} through TFDS needs TensorFlow, which is not installed: {remedy}; or {TFDS_HINT}")
    builder = tfds.builder(name, data_dir=data_dir or None)
    if not builder.is_prepared() and not _download_host_reachable():
        raise DataError(
            f"{name} is not in the TFDS cache ({builder.data_dir}) and {TFDS_DOWNLOAD_HOST} cannot be reached; "
            f"{TFDS_HINT}"
        )
    try:
        images, labels = tfds.as_numpy(
            tfds.load(name, split=split, batch_size=-1, as_supervised=True, data_dir=data_dir or None)
        )
    except Exception as e:  # TFDS raises many types for "no network" and "not prepared".
        message = first_line(e)
        raise DataError(
            f"{name} could not be loaded through tensorflow-datasets ({message[:200]}); {TFDS_HINT}"
        ) from None
    return Split(np.asarray(images, np.uint8).reshape((-1, *IMAGE_SHAPE)), np.asarray(labels, np.int32))


# ---------------------------------------------------------------- splits


def resolve_source(data_config: ml_collections.ConfigDict) -> tuple[str, str]:
    """Returns ("idx", folder) or ("tfds", name) for the configured data set."""
    name, source, local_dir = data_config.name, data_config.source, data_config.local_dir
    if name not in DATASETS:
        raise ConfigError(f"data.name: unknown data set {name!r} (choose from {', '.join(DATASETS)})")
    if source not in ("auto", "idx", "tfds"):
        raise ConfigError(f"data.source: unknown source {source!r} (choose from auto, idx, tfds)")
    if source == "tfds":
        return "tfds", name
    if local_dir:
        if not os.path.isdir(local_dir):
            raise DataError(f"data.local_dir: {local_dir} is not a folder")
        return "idx", local_dir
    standard = STANDARD_DIRS.get(name, "")
    if os.path.isdir(standard):
        return "idx", standard
    if source == "idx":
        raise DataError(
            f"data.source=idx but no local_dir is set and {standard} does not exist; "
            f"pass --config.data.local_dir=DIR with the four {name} IDX files"
        )
    return "tfds", name


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
    """Loads, validates and splits the configured data set on the host."""
    kind, where = resolve_source(data_config)
    if kind == "idx":
        full_train, test = load_idx_split(where, "train"), load_idx_split(where, "test")
    else:
        full_train = load_tfds_split(where, "train", data_config.tfds_data_dir)
        test = load_tfds_split(where, "test", data_config.tfds_data_dir)
    if data_config.validation_size >= len(full_train):
        raise ConfigError(
            f"data.validation_size: {data_config.validation_size} leaves no training "
            f"examples (the training set has {len(full_train)})"
        )
    train, validation = hold_out_validation(full_train, data_config.validation_size)
    return Datasets(
        train=_head(train, data_config.train_subset),
        validation=_head(validation, data_config.eval_subset),
        test=_head(test, data_config.eval_subset),
        name=data_config.name,
        source=f"{kind}:{where}",
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
