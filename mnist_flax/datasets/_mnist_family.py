"""The MNIST family's two sources, shared by its data sets: folders of IDX files (the format MNIST was published
in; Debian packages Fashion-MNIST's) and tensorflow-datasets (mnist.py and fashion_mnist.py read either: `load`;
kmnist.py and emnist.py TFDS only: `load_tfds`). All are 28x28 grey images.

`data.source`: "auto" reads IDX files from `data.local_dir` if set, else from the data set's standard folder if it
exists, else through TFDS; "idx" or "tfds" force one. `data.tfds_data_dir` is TFDS's cache folder.
"""

import gzip
import importlib.util
import os
import socket
import struct
import sys

import numpy as np

from mnist_flax.datasets import Arrays, Split, arrays
from mnist_flax.errors import ConfigError, DataError, first_line

IMAGE_SHAPE = (28, 28, 1)
# The data.* fields a data set of the family reads, with their defaults (its module's FIELDS).
FIELDS = {"source": "auto", "local_dir": "", "tfds_data_dir": ""}
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension


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


def load_idx_split(directory: str, split: str, num_classes: int = 10) -> Split:
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
    if len(labels) and labels.max() >= num_classes:
        bad = int(np.argmax(labels >= num_classes))
        raise DataError(f"{labels_path}: label {int(labels[bad])} at index {bad} is out of range 0..{num_classes - 1}")
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


def load_tfds_split(name: str, split: str, data_dir: str | None, hint: str = TFDS_HINT) -> Split:
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
        raise DataError(f"{name} through TFDS needs TensorFlow, which is not installed: {remedy}; or {hint}")
    builder = tfds.builder(name, data_dir=data_dir or None)
    if not builder.is_prepared() and not _download_host_reachable():
        raise DataError(
            f"{name} is not in the TFDS cache ({builder.data_dir}) and {TFDS_DOWNLOAD_HOST} cannot be reached; {hint}"
        )
    try:
        images, labels = tfds.as_numpy(
            tfds.load(name, split=split, batch_size=-1, as_supervised=True, data_dir=data_dir or None)
        )
    except Exception as e:  # TFDS raises many types for "no network" and "not prepared".
        message = first_line(e)
        raise DataError(f"{name} could not be loaded through tensorflow-datasets ({message[:200]}); {hint}") from None
    return Split(np.asarray(images, np.uint8).reshape((-1, *IMAGE_SHAPE)), np.asarray(labels, np.int32))


# ---------------------------------------------------------------- a data set of the family


def resolve_source(name: str, data_config, standard_dir: str) -> tuple[str, str]:
    """Returns ("idx", folder) or ("tfds", name) for data set `name` (IDX files standardly in `standard_dir`)."""
    source, local_dir = data_config.source, data_config.local_dir
    if source not in ("auto", "idx", "tfds"):
        raise ConfigError(f"data.source: unknown source {source!r} (choose from auto, idx, tfds)")
    if source == "tfds":
        return "tfds", name
    if local_dir:
        if not os.path.isdir(local_dir):
            raise DataError(f"data.local_dir: {local_dir} is not a folder")
        return "idx", local_dir
    if os.path.isdir(standard_dir):
        return "idx", standard_dir
    if source == "idx":
        raise DataError(
            f"data.source=idx but no local_dir is set and {standard_dir} does not exist; "
            f"pass --config.data.local_dir=DIR with the four {name} IDX files"
        )
    return "tfds", name


def resolve(name: str, data_config, standard_dir: str) -> dict:
    """The fields as the run records them: the source decided, and the IDX folder where it is "idx"."""
    source, location = resolve_source(name, data_config, standard_dir)
    return {"source": source, "local_dir": location} if source == "idx" else {"source": source}


def tfds_only_hint(tfds_name: str) -> str:
    """What to do when a TFDS-only data set cannot be had: prepare its cache where there is a network."""
    return (
        f"prepare it where there is a network (`tfds build {tfds_name}`, or one run there) and pass its cache "
        "folder as --config.data.tfds_data_dir=DIR; or train on Fashion-MNIST offline: apt install "
        "dataset-fashion-mnist and --config.data.name=fashion_mnist"
    )


def load_tfds(name: str, tfds_name: str, data_config, class_names, transpose: bool = False) -> Arrays:
    """Data set `name`'s train and test splits through TFDS's `tfds_name` (e.g. "emnist/balanced"), described;
    `transpose`: each image's rows and columns swapped (EMNIST's are stored transposed)."""
    hint = tfds_only_hint(tfds_name)
    splits = [load_tfds_split(tfds_name, split, data_config.tfds_data_dir, hint) for split in ("train", "test")]
    if transpose:
        splits = [Split(split.images.transpose(0, 2, 1, 3), split.labels) for split in splits]
    return arrays(name, class_names, f"tfds:{tfds_name}", *splits)


def load(name: str, data_config, standard_dir: str, class_names) -> Arrays:
    """Data set `name`'s train and test splits, from IDX files or TFDS (`resolve_source`), described."""
    kind, where = resolve_source(name, data_config, standard_dir)
    if kind == "idx":
        train = load_idx_split(where, "train", len(class_names))
        test = load_idx_split(where, "test", len(class_names))
    else:
        train = load_tfds_split(where, "train", data_config.tfds_data_dir)
        test = load_tfds_split(where, "test", data_config.tfds_data_dir)
    return arrays(name, class_names, f"{kind}:{where}", train, test)
