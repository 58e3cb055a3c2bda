"""Data: IDX parsing and validation, sources, the validation split, epoch order, device copies."""

import gzip
import hashlib
import os
import shutil
import struct
import subprocess
import sys
import textwrap

import jax
import ml_collections
import numpy as np
import pytest
from conftest import REPO_ROOT, write_idx
from shared import MOCK_EXAMPLES, write_tfds_metadata

from mnist_flax import datasets
from mnist_flax.config import schema
from mnist_flax.datasets import _mnist_family, fashion_mnist, mnist
from mnist_flax.datasets._mnist_family import IMAGES_MAGIC, LABELS_MAGIC
from mnist_flax.errors import ConfigError, DataError
from mnist_flax.training import input_pipeline


def data_config(**fields) -> ml_collections.ConfigDict:
    """The data section of configs/default.py, with fields changed."""
    config = schema.load_config_file("configs/default.py").data
    for key, value in fields.items():
        config[key] = value
    return config


def resolve_source(config) -> tuple[str, str]:
    """Where the configured data set of the MNIST family is read from: ("idx", folder) or ("tfds", name)."""
    return _mnist_family.resolve_source(config.name, config, datasets.module(config.name).STANDARD_DIR)


def image_hashes(images: np.ndarray) -> list[str]:
    return [hashlib.sha1(image.tobytes()).hexdigest() for image in images]


def random_split(num: int, seed: int = 0, size: tuple[int, int] = (28, 28)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(num, *size), dtype=np.uint8), rng.integers(0, 10, size=num, dtype=np.uint8)


def write_split(directory, prefix: str, images: np.ndarray, labels: np.ndarray, compress: bool = True) -> None:
    suffix = ".gz" if compress else ""
    os.makedirs(directory, exist_ok=True)
    write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte{suffix}"), images, compress)
    write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte{suffix}"), labels, compress)


def idx_bytes(array: np.ndarray) -> bytes:
    """An uncompressed IDX file: big-endian magic (0x08 = unsigned bytes, ndim), sizes, data."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


# ---------------------------------------------------------------- IDX parsing


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "raw"])
def test_read_idx_round_trip(tmp_path, compress):
    images, labels = random_split(7, size=(28, 28))
    images_path = str(tmp_path / ("images.gz" if compress else "images"))
    labels_path = str(tmp_path / ("labels.gz" if compress else "labels"))
    write_idx(images_path, images, compress)
    write_idx(labels_path, labels, compress)

    read_images = _mnist_family.read_idx(images_path, IMAGES_MAGIC)
    read_labels = _mnist_family.read_idx(labels_path, LABELS_MAGIC)
    assert read_images.dtype == np.uint8 and read_images.shape == (7, 28, 28)
    assert read_labels.dtype == np.uint8 and read_labels.shape == (7,)
    np.testing.assert_array_equal(read_images, images)
    np.testing.assert_array_equal(read_labels, labels)


def test_header_is_big_endian(tmp_path):
    # Bytes written out by hand: magic 0x00000801, one size (3), then the labels.
    path = tmp_path / "hand_written"
    path.write_bytes(bytes.fromhex("0000080100000003") + bytes([4, 0, 9]))
    np.testing.assert_array_equal(_mnist_family.read_idx(str(path), LABELS_MAGIC), [4, 0, 9])


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "raw"])
def test_load_idx_split(tmp_path, compress):
    images, labels = random_split(11)
    write_split(tmp_path, "t10k", images, labels, compress)
    split = _mnist_family.load_idx_split(str(tmp_path), "test")
    assert split.images.shape == (11, 28, 28, 1) and split.images.dtype == np.uint8
    assert split.labels.shape == (11,) and split.labels.dtype == np.int32
    np.testing.assert_array_equal(split.images[..., 0], images)
    np.testing.assert_array_equal(split.labels, labels)
    assert len(split) == 11


# ---------------------------------------------------------------- corrupt input: one clear DataError each


def test_missing_file(tmp_path):
    images, labels = random_split(5)
    write_split(tmp_path, "train", images, labels)
    os.remove(tmp_path / "train-labels-idx1-ubyte.gz")
    with pytest.raises(DataError) as error:
        _mnist_family.load_idx_split(str(tmp_path), "train")
    assert str(tmp_path) in str(error.value)
    assert "missing train-labels-idx1-ubyte.gz" in str(error.value)


def test_missing_folder():
    with pytest.raises(DataError, match="data.local_dir: /nonexistent/mnist is not a folder"):
        resolve_source(data_config(local_dir="/nonexistent/mnist"))


def test_unreadable_path(tmp_path):
    # A path that exists but is a folder: the OS error is named, with the path.
    folder = tmp_path / "train-images-idx3-ubyte.gz"
    folder.mkdir()
    with pytest.raises(DataError, match=f"cannot read {folder}: Is a directory"):
        _mnist_family.read_idx(str(folder), IMAGES_MAGIC)


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "raw"])
def test_truncated_data(tmp_path, compress):
    raw = idx_bytes(random_split(4)[0])[:-100]  # a whole gzip stream, of too few bytes
    path = tmp_path / ("images.gz" if compress else "images")
    path.write_bytes(gzip.compress(raw) if compress else raw)
    with pytest.raises(DataError) as error:
        _mnist_family.read_idx(str(path), IMAGES_MAGIC)
    message = str(error.value)
    assert message.startswith(f"{path}: ")
    assert "header says 4x28x28 = 3136 bytes of data, file has 3036 (truncated)" in message


def test_trailing_bytes(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(idx_bytes(np.arange(5, dtype=np.uint8)) + b"\x00\x00")
    with pytest.raises(DataError, match="header says 5 = 5 bytes of data, file has 7 \\(trailing bytes\\)"):
        _mnist_family.read_idx(str(path), LABELS_MAGIC)


def test_truncated_header(tmp_path):
    path = tmp_path / "images"
    path.write_bytes(idx_bytes(random_split(1)[0])[:10])  # magic and 1.5 of the 3 sizes
    with pytest.raises(DataError, match=f"{path}: truncated header"):
        _mnist_family.read_idx(str(path), IMAGES_MAGIC)


@pytest.mark.parametrize("content", [b"", b"\x00\x00"], ids=["empty", "two_bytes"])
def test_too_short(tmp_path, content):
    path = tmp_path / "labels"
    path.write_bytes(content)
    with pytest.raises(DataError, match=f"{path}: too short to be an IDX file \\({len(content)} bytes\\)"):
        _mnist_family.read_idx(str(path), LABELS_MAGIC)


def test_truncated_gzip(tmp_path):
    images, labels = random_split(50)
    write_split(tmp_path, "train", images, labels)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError) as error:
        _mnist_family.load_idx_split(str(tmp_path), "train")
    assert str(error.value).startswith(f"{path}: corrupt or truncated gzip data")


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "labels.gz"
    payload = bytearray(gzip.compress(idx_bytes(np.arange(100, dtype=np.uint8) % 10)))
    payload[-6] ^= 0xFF  # a byte of the CRC-32 trailer
    path.write_bytes(bytes(payload))
    with pytest.raises(DataError, match=f"{path}: corrupt or truncated gzip data"):
        _mnist_family.read_idx(str(path), LABELS_MAGIC)


def test_images_file_given_as_labels(tmp_path):
    images, labels = random_split(5)
    write_split(tmp_path, "train", images, labels)
    labels_path = tmp_path / "train-labels-idx1-ubyte.gz"
    shutil.copy(tmp_path / "train-images-idx3-ubyte.gz", labels_path)
    with pytest.raises(DataError) as error:
        _mnist_family.load_idx_split(str(tmp_path), "train")
    assert str(error.value) == (f"{labels_path}: wrong magic number 0x00000803, expected IDX labels (0x00000801)")


def test_labels_file_given_as_images(tmp_path):
    path = tmp_path / "labels.gz"
    write_idx(str(path), np.zeros(3, np.uint8))
    with pytest.raises(DataError, match="wrong magic number 0x00000801, expected IDX images \\(0x00000803\\)"):
        _mnist_family.read_idx(str(path), IMAGES_MAGIC)


def test_not_an_idx_file(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(b"<html>404 Not Found</html>"))
    with pytest.raises(DataError, match=f"{path}: wrong magic number 0x3c68746d"):
        _mnist_family.read_idx(str(path), IMAGES_MAGIC)


def test_count_mismatch(tmp_path):
    images, labels = random_split(10)
    write_split(tmp_path, "train", images, labels[:9])
    with pytest.raises(DataError) as error:
        _mnist_family.load_idx_split(str(tmp_path), "train")
    assert str(error.value) == f"{tmp_path}: train has 10 images but 9 labels"


def test_label_out_of_range(tmp_path):
    images, labels = random_split(10)
    labels[6] = 10
    labels[8] = 255
    write_split(tmp_path, "t10k", images, labels)
    with pytest.raises(DataError) as error:
        _mnist_family.load_idx_split(str(tmp_path), "test")
    labels_path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    assert str(error.value) == f"{labels_path}: label 10 at index 6 is out of range 0..9"


def test_wrong_image_size(tmp_path):
    images, labels = random_split(4, size=(32, 32))
    write_split(tmp_path, "train", images, labels)
    with pytest.raises(DataError) as error:
        _mnist_family.load_idx_split(str(tmp_path), "train")
    images_path = tmp_path / "train-images-idx3-ubyte.gz"
    assert str(error.value) == f"{images_path}: images are (32, 32), expected 28x28"


# ---------------------------------------------------------------- where the data comes from


@pytest.fixture
def no_standard_dirs(monkeypatch, tmp_path):
    """No data set is installed in its standard folder."""
    missing = {}
    for module in (mnist, fashion_mnist):
        missing[module.NAME] = str(tmp_path / "not_installed" / module.NAME)
        monkeypatch.setattr(module, "STANDARD_DIR", missing[module.NAME])
    return missing


def test_source_local_dir(tiny_data_dir, no_standard_dirs):
    assert resolve_source(data_config(local_dir=tiny_data_dir)) == ("idx", tiny_data_dir)
    # local_dir wins over an installed standard folder, and works for either name.
    assert resolve_source(data_config(name="mnist", local_dir=tiny_data_dir)) == ("idx", tiny_data_dir)


def test_source_standard_dir(monkeypatch, tmp_path):
    monkeypatch.setattr(fashion_mnist, "STANDARD_DIR", str(tmp_path))
    monkeypatch.setattr(mnist, "STANDARD_DIR", "/nonexistent")
    assert resolve_source(data_config()) == ("idx", str(tmp_path))
    assert resolve_source(data_config(source="idx")) == ("idx", str(tmp_path))
    # "tfds" is forced even where the files are installed.
    assert resolve_source(data_config(source="tfds")) == ("tfds", "fashion_mnist")


def test_source_falls_back_to_tfds(no_standard_dirs):
    assert resolve_source(data_config()) == ("tfds", "fashion_mnist")
    assert resolve_source(data_config(name="mnist")) == ("tfds", "mnist")


def test_source_idx_without_files(no_standard_dirs):
    with pytest.raises(DataError) as error:
        resolve_source(data_config(name="mnist", source="idx"))
    message = str(error.value)
    assert no_standard_dirs["mnist"] in message and "--config.data.local_dir=DIR" in message


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"name": "cifar10"},
            f"data.name: unknown data set 'cifar10' (registered: {', '.join(datasets.registered())})",
        ),
        ({"name": "MNIST"}, "data.name: unknown data set 'MNIST'"),
        ({"source": "http"}, "data.source: unknown source 'http' (choose from auto, idx, tfds)"),
    ],
)
def test_source_unknown_names(fields, expected):
    with pytest.raises(ConfigError) as error:
        datasets.resolve(data_config(**fields))
    assert str(error.value).startswith(expected)


@pytest.fixture
def tfds_dir(tmp_path, no_standard_dirs, no_network) -> str:
    """An empty TFDS data_dir (never the user's ~/tensorflow_datasets), on a machine with no network."""
    pytest.importorskip("tensorflow_datasets")
    return str(tmp_path / "tensorflow_datasets")


def assert_offline_hint(message: str) -> None:
    assert "\n" not in message
    assert "--config.data.local_dir=DIR" in message and "--config.data.name=fashion_mnist" in message


def test_mnist_through_tfds_mock_data(tfds_dir, no_network):
    # The real tfds.builder / tfds.load / as_dataset run against TFDS's own test
    # facility: only the records are generated (random, deterministic), the
    # metadata is read from tfds_dir as it would be from a prepared cache.
    import tensorflow_datasets as tfds

    metadata_dir = write_tfds_metadata(tfds_dir, "mnist", MOCK_EXAMPLES)
    config = data_config(name="mnist", tfds_data_dir=tfds_dir, validation_size=16)
    with tfds.testing.mock_data(
        num_examples=MOCK_EXAMPLES, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=tfds_dir
    ):
        assert tfds.builder("mnist", data_dir=tfds_dir).is_prepared()
        full_train = _mnist_family.load_tfds_split("mnist", "train", tfds_dir)
        datasets = input_pipeline.load_datasets(config)
    assert datasets.source == "tfds:mnist" and datasets.name == "mnist"
    assert (len(datasets.train), len(datasets.validation), len(datasets.test)) == (48, 16, MOCK_EXAMPLES)
    for split in (full_train, datasets.train, datasets.validation, datasets.test):
        assert split.images.dtype == np.uint8 and split.images.shape[1:] == (28, 28, 1)
        assert split.labels.dtype == np.int32
        assert 0 <= split.labels.min() and split.labels.max() <= 9
    assert len(np.unique(full_train.labels)) > 1 and 0 < full_train.images.mean() < 255
    # The validation split is held out of train: disjoint, and together they are the whole file.
    train_hashes, val_hashes = set(image_hashes(datasets.train.images)), set(image_hashes(datasets.validation.images))
    assert not train_hashes & val_hashes
    assert train_hashes | val_hashes == set(image_hashes(full_train.images))
    # A prepared cache needs no network: the reachability check was not even made.
    assert no_network == []
    assert os.path.isfile(os.path.join(metadata_dir, "dataset_info.json"))


def test_mnist_through_tfds_without_network(tfds_dir, no_network):
    # No mock: the real tfds.builder finds nothing prepared in tfds_dir and the
    # real reachability check finds no network, so the run stops in seconds
    # (tfds.load would retry the download for minutes).
    with pytest.raises(DataError) as error:
        input_pipeline.load_datasets(data_config(name="mnist", tfds_data_dir=tfds_dir))
    message = str(error.value)
    # Asked TFDS for MNIST only (no silent switch to another data set), and failed
    # before a download was tried: one lookup, of the download host, and no download folder.
    assert message.startswith(f"mnist is not in the TFDS cache ({tfds_dir}/mnist/3.0.1)")
    assert "cannot be reached" in message
    assert_offline_hint(message)
    assert no_network == [(_mnist_family.TFDS_DOWNLOAD_HOST, 443)]
    assert not os.path.exists(os.path.join(tfds_dir, "downloads"))


def test_mnist_through_tfds_failing_load(tfds_dir, no_network, monkeypatch):
    # The host answers (or a proxy is set) but the download fails all the same:
    # the real tfds.load tries it and fails; one try per file, not TFDS's seven with backoff.
    from tensorflow_datasets.core.download import downloader

    monkeypatch.setattr(_mnist_family, "_download_host_reachable", lambda timeout=5.0: True)
    monkeypatch.setattr(downloader, "MAX_RETRIES", 0)
    with pytest.raises(DataError) as error:
        input_pipeline.load_datasets(data_config(name="mnist", tfds_data_dir=tfds_dir))
    message = str(error.value)
    assert message.startswith("mnist could not be loaded through tensorflow-datasets (")
    assert _mnist_family.TFDS_DOWNLOAD_HOST in message
    assert_offline_hint(message)
    # tfds.load did try to download MNIST.
    assert (_mnist_family.TFDS_DOWNLOAD_HOST, 443) in no_network
    assert os.path.isdir(os.path.join(tfds_dir, "downloads"))


def test_download_host_reachable(monkeypatch):
    proxies = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
    for name in proxies:
        monkeypatch.delenv(name, raising=False)
    attempts = []

    def unreachable(address, timeout):
        attempts.append((address, timeout))
        raise OSError("Network is unreachable")

    monkeypatch.setattr(_mnist_family.socket, "create_connection", unreachable)
    assert _mnist_family._download_host_reachable(timeout=0.5) is False
    assert attempts == [((_mnist_family.TFDS_DOWNLOAD_HOST, 443), 0.5)]
    # With a proxy, the connection is the proxy's business: no direct attempt.
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    assert _mnist_family._download_host_reachable() is True
    assert len(attempts) == 1


def test_tfds_not_installed(monkeypatch, no_standard_dirs):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes `import` raise ImportError
    with pytest.raises(DataError, match="tensorflow-datasets is not installed .*--config.data.local_dir"):
        input_pipeline.load_datasets(data_config(name="mnist"))


# ---------------------------------------------------------------- splits


def test_validation_split(tiny_data_dir):
    full = _mnist_family.load_idx_split(tiny_data_dir, "train")
    datasets = input_pipeline.load_datasets(data_config(local_dir=tiny_data_dir, validation_size=200))
    assert (len(datasets.train), len(datasets.validation), len(datasets.test)) == (1000, 200, 300)
    assert datasets.source == f"idx:{tiny_data_dir}" and datasets.name == "fashion_mnist"

    # Every image of the tiny set is distinct, so content hashes identify examples.
    full_hashes = image_hashes(full.images)
    assert len(set(full_hashes)) == len(full) == 1200
    train_hashes, val_hashes = image_hashes(datasets.train.images), image_hashes(datasets.validation.images)
    assert not set(train_hashes) & set(val_hashes)
    # Together they are exactly the training file, each image with its own label.
    assert sorted(train_hashes + val_hashes) == sorted(full_hashes)
    label_of = dict(zip(full_hashes, full.labels.tolist(), strict=True))
    for split, hashes in ((datasets.train, train_hashes), (datasets.validation, val_hashes)):
        assert split.labels.tolist() == [label_of[h] for h in hashes]
    # The test set is its own file.
    assert not set(image_hashes(datasets.test.images)) & set(full_hashes)


def test_validation_split_is_fixed(tiny_data_dir):
    # The same examples every time, whatever the run's seed, so runs are selected on the same data.
    first = input_pipeline.load_datasets(data_config(local_dir=tiny_data_dir, validation_size=300))
    second = input_pipeline.load_datasets(data_config(local_dir=tiny_data_dir, validation_size=300))
    np.testing.assert_array_equal(first.validation.images, second.validation.images)
    assert len(first.validation) == 300 and len(first.train) == 900
    # A held-out set drawn at random, not the head or tail of the file.
    full = _mnist_family.load_idx_split(tiny_data_dir, "train")
    assert not np.array_equal(first.validation.images, full.images[:300])
    assert not np.array_equal(first.validation.images, full.images[-300:])


@pytest.mark.parametrize("validation_size", [1200, 5000])
def test_validation_size_too_large(tiny_data_dir, validation_size):
    with pytest.raises(ConfigError, match=f"data.validation_size: {validation_size} leaves no training examples"):
        input_pipeline.load_datasets(data_config(local_dir=tiny_data_dir, validation_size=validation_size))


def test_train_and_eval_subsets(tiny_data_dir):
    full = input_pipeline.load_datasets(data_config(local_dir=tiny_data_dir, validation_size=200))
    subset = input_pipeline.load_datasets(
        data_config(local_dir=tiny_data_dir, validation_size=200, train_subset=100, eval_subset=50)
    )
    assert (len(subset.train), len(subset.validation), len(subset.test)) == (100, 50, 50)
    # The first N of the same splits: the subset never reaches into the validation set.
    np.testing.assert_array_equal(subset.train.images, full.train.images[:100])
    np.testing.assert_array_equal(subset.validation.images, full.validation.images[:50])
    np.testing.assert_array_equal(subset.test.labels, full.test.labels[:50])
    # A subset larger than the split keeps the whole split.
    large = input_pipeline.load_datasets(data_config(local_dir=tiny_data_dir, validation_size=200, train_subset=5000))
    assert len(large.train) == 1000


# ---------------------------------------------------------------- epoch order


def order(seed: int, epoch: int, num_examples: int = 1003, batch_size: int = 50) -> np.ndarray:
    return np.asarray(input_pipeline.epoch_order(jax.random.PRNGKey(seed), epoch, num_examples, batch_size))


def test_epoch_order_shape_and_range():
    batches = order(0, 0)
    assert batches.shape == (20, 50)  # 1003 // 50 = 20 steps; the last 3 examples are dropped
    assert batches.dtype == np.int32
    assert batches.min() >= 0 and batches.max() < 1003
    assert len(np.unique(batches)) == 1000  # no index twice within an epoch


def test_epoch_order_is_deterministic():
    np.testing.assert_array_equal(order(0, 3), order(0, 3))
    # jit and eager agree (the train loop jits it with static sizes).
    jitted = jax.jit(input_pipeline.epoch_order, static_argnums=(2, 3))
    np.testing.assert_array_equal(np.asarray(jitted(jax.random.PRNGKey(0), 3, 1003, 50)), order(0, 3))


def test_epoch_order_differs_by_seed_and_epoch():
    base = order(0, 0)
    for other in (order(1, 0), order(0, 1), order(0, 2)):
        assert not np.array_equal(base, other)
        # Not merely the same batches in another order: the batches' contents differ.
        assert {frozenset(b) for b in base.tolist()} != {frozenset(b) for b in other.tolist()}
    # The dropped examples change from epoch to epoch, so none is always left out.
    dropped = [set(range(1003)) - set(order(0, epoch).ravel().tolist()) for epoch in range(4)]
    assert all(len(d) == 3 for d in dropped)
    assert len({frozenset(d) for d in dropped}) > 1


def test_epoch_order_exact_multiple():
    batches = order(5, 0, num_examples=100, batch_size=25)
    assert batches.shape == (4, 25)
    assert sorted(batches.ravel().tolist()) == list(range(100))


# ---------------------------------------------------------------- on the device


def test_to_device_pads_and_keeps_num_valid():
    images, labels = random_split(7)
    split = input_pipeline.Split(images[..., None], labels.astype(np.int32))
    device = input_pipeline.to_device(split, pad_to_multiple=4)
    assert device.num_valid == 7
    assert device.images.shape == (8, 28, 28, 1) and device.images.dtype == np.uint8
    assert device.labels.shape == (8,)
    np.testing.assert_array_equal(np.asarray(device.images[:7]), split.images)
    np.testing.assert_array_equal(np.asarray(device.labels[:7]), split.labels)
    # The padding repeats example 0 (any valid example would do: it is cut off by num_valid).
    np.testing.assert_array_equal(np.asarray(device.images[7]), split.images[0])

    exact = input_pipeline.to_device(split, pad_to_multiple=7)
    assert exact.images.shape[0] == 7 and exact.num_valid == 7
    unpadded = input_pipeline.to_device(split)
    assert unpadded.images.shape[0] == 7 and unpadded.num_valid == 7
    padded_a_lot = input_pipeline.to_device(split, pad_to_multiple=1000)
    assert padded_a_lot.images.shape[0] == 1000 and padded_a_lot.num_valid == 7


# ---------------------------------------------------------------- the real Fashion-MNIST files


# ---------------------------------------------------------------- augmentation


def _asymmetric_images(n: int) -> np.ndarray:
    """Float images with a bright block away from the edges, at a different place in each image."""
    rng = np.random.default_rng(0)
    images = np.zeros((n, 28, 28, 1), np.float32)
    for i in range(n):
        row, col = rng.integers(4, 18, size=2)
        images[i, row : row + 6, col : col + 3, 0] = rng.uniform(0.5, 1.0, size=(6, 3))
    return images


def test_augment_off_returns_the_batch():
    images = _asymmetric_images(4)
    out = input_pipeline.augment(jax.numpy.asarray(images), jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(out), images)


def test_flip_mirrors_some_images_and_keeps_the_others():
    images = _asymmetric_images(64)
    out = np.asarray(input_pipeline.augment(jax.numpy.asarray(images), jax.random.PRNGKey(0), flip=True))
    mirrored = [bool(np.array_equal(o, x[:, ::-1])) for o, x in zip(out, images, strict=True)]
    kept = [bool(np.array_equal(o, x)) for o, x in zip(out, images, strict=True)]
    assert all(m != k for m, k in zip(mirrored, kept, strict=True))  # each image is one or the other
    assert 16 < sum(mirrored) < 48  # about half


def test_shift_moves_each_image_within_bounds():
    images = _asymmetric_images(64)
    out = np.asarray(input_pipeline.augment(jax.numpy.asarray(images), jax.random.PRNGKey(1), max_shift=2))
    moves = set()
    for o, x in zip(out, images, strict=True):
        # Which shift (dy, dx) of the original gives this output? Exactly one, within +-2.
        found = [
            (dy, dx)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if np.array_equal(o, np.roll(x, (dy, dx), axis=(0, 1)))  # the block is away from the edges
        ]
        assert len(found) == 1
        moves.add(found[0])
        np.testing.assert_allclose(o.sum(), x.sum(), rtol=1e-6)  # nothing cut off, nothing added
    assert len(moves) > 10  # many different shifts


def test_augment_repeats_with_the_key():
    images = jax.numpy.asarray(_asymmetric_images(8))
    a = input_pipeline.augment(images, jax.random.PRNGKey(3), flip=True, max_shift=2)
    b = input_pipeline.augment(images, jax.random.PRNGKey(3), flip=True, max_shift=2)
    c = input_pipeline.augment(images, jax.random.PRNGKey(4), flip=True, max_shift=2)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_fashion_mnist_files(fashion_dir, monkeypatch):
    # Found in the standard folder with no local_dir set (as the default config trains).
    monkeypatch.setattr(fashion_mnist, "STANDARD_DIR", fashion_dir)
    monkeypatch.setattr(mnist, "STANDARD_DIR", "/nonexistent")
    datasets = input_pipeline.load_datasets(data_config(validation_size=5000))
    assert datasets.source == f"idx:{fashion_dir}"
    assert (len(datasets.train), len(datasets.validation), len(datasets.test)) == (55000, 5000, 10000)
    for split in (datasets.train, datasets.validation, datasets.test):
        assert split.images.dtype == np.uint8 and split.images.shape[1:] == (28, 28, 1)
        assert split.labels.dtype == np.int32
        assert set(np.unique(split.labels).tolist()) == set(range(10))
    # Fashion-MNIST is balanced: 6,000 training and 1,000 test images per class.
    all_train = np.concatenate([datasets.train.labels, datasets.validation.labels])
    assert np.bincount(all_train).tolist() == [6000] * 10
    assert np.bincount(datasets.test.labels).tolist() == [1000] * 10
    assert 0 < datasets.train.images.mean() < 255  # real images, not blank


# ---------------------------------------------------------------- no TensorFlow in the training core

NO_TENSORFLOW_SCRIPT = textwrap.dedent(
    """
    import importlib.abc
    import sys


    class BlockTensorFlow(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0].startswith("tensorflow"):
                raise ImportError(f"{name} is blocked by the test")
            return None


    sys.meta_path.insert(0, BlockTensorFlow())

    import jax
    import ml_collections

    from mnist_flax.config import schema
    from mnist_flax import models
    from mnist_flax.training import input_pipeline, loop, metrics, steps

    data_dir = sys.argv[1]
    config = schema.load_config_file("configs/mlp.py")
    config.data.local_dir = data_dir
    config.data.validation_size = 200
    datasets = input_pipeline.load_datasets(config.data)
    model = models.create(config.model, num_classes=10)
    tx = steps.make_optimizer(config.optimizer, 10, 1)
    state = steps.create_train_state(model, tx, seed=0, input_shape=(28, 28, 1))
    split = input_pipeline.to_device(datasets.train)
    order = input_pipeline.epoch_order(jax.random.PRNGKey(1), 0, len(datasets.train), 50)
    step = steps.make_train_step(config, steps_per_epoch=order.shape[0])
    carry = (state, metrics.TrainMetrics.empty(), steps.empty_guard())
    carry = step(carry, split.images, split.labels, order)
    computed = carry[1].compute()
    assert int(carry[0].step) == 1, carry[0].step
    assert int(carry[2]["count"]) == 0
    loaded = sorted(m for m in sys.modules if m.split(".")[0].startswith("tensorflow"))
    assert not loaded, loaded
    print(f"ok step={int(carry[0].step)} loss={float(computed['loss']):.4f}")
    """
)


def test_training_core_imports_without_tensorflow(tiny_data_dir):
    result = subprocess.run(
        [sys.executable, "-c", NO_TENSORFLOW_SCRIPT, tiny_data_dir],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": REPO_ROOT},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok step=1 loss=")
    # An untrained 10-way classifier starts near ln(10) = 2.30.
    loss = float(result.stdout.split("loss=")[1])
    assert 1.5 < loss < 3.5
