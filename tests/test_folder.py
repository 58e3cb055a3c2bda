"""The `folder` data set: the user's own PNG and JPEG images, one sub-folder per class, written here by Pillow."""

import json
import os

import numpy as np
import pytest
from conftest import run_main
from PIL import Image
from shared import assert_one_line_error, run_cli

from mnist_flax import datasets, layout
from mnist_flax.datasets import folder
from mnist_flax.errors import ConfigError, DataError
from mnist_flax.training import input_pipeline

CLASSES = ("bottom", "left", "right", "top")  # where the bright block is
SIZES = ((32, 32), (40, 30), (56, 64), (28, 28))  # (height, width): every image has one of them


def picture(label: int, index: int, rng) -> Image.Image:
    """An image of class CLASSES[label]: a bright block at its place on a noisy background; grey or colour, of one
    of SIZES, so a folder of them mixes every kind the data set converts."""
    height, width = SIZES[index % len(SIZES)]
    pixels = rng.integers(0, 70, size=(height, width, 3)).astype(np.uint8)
    h, w = height // 3, width // 3
    place = {
        "bottom": (slice(2 * h, 3 * h), slice(w, 2 * w)),
        "left": (slice(h, 2 * h), slice(0, w)),
        "right": (slice(h, 2 * h), slice(2 * w, 3 * w)),
        "top": (slice(0, h), slice(w, 2 * w)),
    }[CLASSES[label]]
    pixels[place] = (230, 200, 90)
    return Image.fromarray(pixels[..., 0] if index % 3 == 0 else pixels, "L" if index % 3 == 0 else "RGB")


def write_folder(root, per_class: int = 10, classes=CLASSES, seed: int = 0) -> str:
    """ROOT/CLASS/NNN.png or .jpg: a learnable folder data set."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            suffix = ".png" if i % 2 else ".jpg"
            picture(label % len(CLASSES), i, rng).save(os.path.join(root, name, f"{i:03d}{suffix}"))
    return str(root)


def config(root, **fields) -> dict:
    return {"name": "folder", "validation_size": 0, "train_subset": 0, "eval_subset": 0, **folder.FIELDS,
            "folder": str(root), **fields}  # fmt: skip


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> str:
    """Each test's own cache folder (never the user's ~/.cache)."""
    path = str(tmp_path / "cache")
    monkeypatch.setenv(folder.CACHE_ENV, path)
    return path


# ---------------------------------------------------------------- reading, converting, splitting


def test_a_folder_of_mixed_images_is_converted_split_and_described(tmp_path):
    root = write_folder(tmp_path / "images", per_class=20)
    loaded = datasets.load(config(root))
    description = loaded.description
    assert description.name == "folder" and description.source == f"folder:{root}"
    assert description.class_names == CLASSES and description.image_shape == (28, 28, 1)
    # 10% test, 10% validation of each class, by the fixed rule: every class in every split.
    for split, count in (("train", 16), ("validation", 2), ("test", 2)):
        part = getattr(loaded, split)
        assert part.images.dtype == np.uint8 and part.images.shape == (4 * count, 28, 28, 1)
        assert sorted(np.bincount(part.labels)) == [count] * 4
    # The block is where its class says, after the resize of every size: the class's place is the brightest.
    mean = loaded.train.images[loaded.train.labels == CLASSES.index("top"), ..., 0].mean(axis=0)
    assert mean[:9, 9:19].mean() > 150 > mean[19:, 9:19].mean()


def test_the_split_is_the_same_every_time_and_keeps_its_images_when_one_is_added(tmp_path):
    root = write_folder(tmp_path / "images", per_class=20)

    def test_images(loaded):
        pairs = zip(loaded.test.images, loaded.test.labels, strict=True)
        return {(int(label), image.tobytes()) for image, label in pairs}

    first = datasets.load(config(root))
    assert test_images(datasets.load(config(root))) == test_images(first)
    again = datasets.load(config(root, image_size=(28, 28)))
    assert again.description.fingerprint == first.description.fingerprint
    # Train, validation and test are disjoint: no image is in two of them.
    splits = [{image.tobytes() for image in getattr(first, s).images} for s in ("train", "validation", "test")]
    assert sum(map(len, splits)) == 80 == len(set.union(*splits))
    # A new image moves no test image to train (the rank of each is its own path's hash).
    picture(0, 1, np.random.default_rng(9)).save(os.path.join(root, "bottom", "extra.png"))
    grown = datasets.load(config(root))
    assert len(test_images(grown) & test_images(first)) >= 7


def test_size_and_channels_are_configured(tmp_path):
    root = write_folder(tmp_path / "images", per_class=10)
    loaded = datasets.load(config(root, image_size=(16, 24), channels=3, test_fraction=0.2))
    assert loaded.description.image_shape == (16, 24, 3)
    assert loaded.train.images.shape[1:] == (16, 24, 3) and len(loaded.test) == 8
    # A colour image keeps its colours (the block is yellow: red > blue); a grey one has three equal channels.
    images = np.concatenate([loaded.train.images, loaded.validation.images, loaded.test.images]).astype(int)
    coloured = (images[..., 0] - images[..., 2]).max(axis=(1, 2))
    assert (coloured > 100).sum() > 0 and (coloured == 0).sum() > 0
    assert datasets.load(config(root, image_size=12)).description.image_shape == (12, 12, 1)
    assert datasets.load(config(root, image_size=[12])).description.image_shape == (12, 12, 1)
    # The run records the folder as an absolute path and the size as (height, width).
    resolved = datasets.resolve(config(os.path.relpath(root), image_size=12))
    assert resolved["folder"] == root and resolved["image_size"] == [12, 12]


def test_train_and_test_sub_folders_give_the_split(tmp_path):
    write_folder(tmp_path / "images" / "train", per_class=10)
    write_folder(tmp_path / "images" / "test", per_class=3, classes=CLASSES[:2], seed=1)
    loaded = datasets.load(config(tmp_path / "images"))
    assert loaded.description.class_names == CLASSES
    assert len(loaded.test) == 6 and set(loaded.test.labels) == {0, 1}
    # Without validation/, validation_fraction of each class of train/ is held out.
    assert len(loaded.train) == 36 and len(loaded.validation) == 4
    write_folder(tmp_path / "images" / "validation", per_class=2, seed=2)
    loaded = datasets.load(config(tmp_path / "images"))
    assert (len(loaded.train), len(loaded.validation), len(loaded.test)) == (40, 8, 6)
    # The generic validation_size is not used: the folder gives its own validation split.
    data = input_pipeline.load_datasets(_config_dict(config(tmp_path / "images", validation_size=5000)))
    assert len(data.validation) == 8


def _config_dict(fields: dict):
    import ml_collections

    return ml_collections.ConfigDict({**fields, "augment": {"flip": False, "max_shift": 0}})


def test_hidden_files_are_skipped(tmp_path):
    root = write_folder(tmp_path / "images", per_class=10)
    (tmp_path / "images" / "left" / ".DS_Store").write_bytes(b"\0\1")
    os.makedirs(tmp_path / "images" / ".git")
    assert datasets.load(config(root)).description.class_names == CLASSES


# ---------------------------------------------------------------- the cache


def test_decoded_once_then_read_from_the_cache_until_a_file_changes(tmp_path, cache, monkeypatch):
    root = write_folder(tmp_path / "images", per_class=10)
    first = datasets.load(config(root))
    (entry,) = os.listdir(cache)
    key = folder.content_key(root, folder.find_images(root)[1], (28, 28), 1)
    assert entry == f"{key}.npy"

    decoded = []
    monkeypatch.setattr(folder, "decode", lambda path, *a: decoded.append(path) or np.zeros((28, 28, 1), np.uint8))
    second = datasets.load(config(root))
    assert decoded == [] and second.description == first.description  # read from the cache, nothing decoded
    # A changed image: another key, every image decoded again (into a new entry).
    picture(1, 2, np.random.default_rng(5)).save(os.path.join(root, "bottom", "004.jpg"))
    datasets.load(config(root))
    assert len(decoded) == 40 and len(os.listdir(cache)) == 2
    # Another conversion: another key too.
    datasets.load(config(root, channels=3))
    assert len(decoded) == 80 and len(os.listdir(cache)) == 3


def test_an_unreadable_cache_entry_is_decoded_again(tmp_path, cache):
    root = write_folder(tmp_path / "images", per_class=10)
    first = datasets.load(config(root))
    (entry,) = os.listdir(cache)
    with open(os.path.join(cache, entry), "r+b") as f:
        f.truncate(100)
    assert datasets.load(config(root)).description == first.description
    assert os.path.getsize(os.path.join(cache, entry)) > 40 * 28 * 28


# ---------------------------------------------------------------- bad input: one line each


def _error(tmp_path, **fields) -> str:
    with pytest.raises((DataError, ConfigError)) as error:
        datasets.load(config(tmp_path / "images", **fields))
    message = str(error.value)
    assert "\n" not in message
    return message


def test_bad_folders_are_one_line_each(tmp_path):
    images = tmp_path / "images"
    assert _error(tmp_path) == f"data.folder: {images} is not a folder"
    os.makedirs(images)
    (images / "notes.txt").write_text("hello")
    assert _error(tmp_path).startswith(f"{images}: no class sub-folders")
    os.makedirs(images / "cat")
    assert (
        _error(tmp_path)
        == f"{images / 'notes.txt'}: a file beside the class folders; move it out (or start its name with '.')"
    )
    os.remove(images / "notes.txt")
    write_folder(images / "cat", per_class=2, classes=("kitten",))
    assert _error(tmp_path) == f"{images}: 1 class sub-folder (cat); a classifier needs at least 2"
    os.makedirs(images / "dog")
    assert _error(tmp_path) == f"{images / 'dog'}: an empty class (no .png, .jpg or .jpeg image in it)"
    assert (
        _error(tmp_path, folder="") == "data.folder: not set; give the folder of your images, one sub-folder per class"
    )


def test_bad_files_are_named(tmp_path):
    root = write_folder(tmp_path / "images", per_class=10)
    notes = tmp_path / "images" / "left" / "notes.txt"
    notes.write_text("not a picture")
    assert _error(tmp_path) == f"{notes}: not a PNG or JPEG image (.png, .jpg, .jpeg); move it out of the folder"
    os.remove(notes)
    fake = tmp_path / "images" / "left" / "fake.png"
    fake.write_text("not a picture either")
    assert _error(tmp_path) == f"{fake}: not a PNG or JPEG image (the file's contents are something else)"
    # Cut short: the decoder fails on it, and the line names it.
    whole = open(os.path.join(root, "left", "001.png"), "rb").read()
    fake.write_bytes(whole[: len(whole) // 2])
    assert _error(tmp_path).startswith(f"{fake}: the image cannot be decoded (")
    jpeg = open(os.path.join(root, "left", "002.jpg"), "rb").read()
    (tmp_path / "images" / "left" / "002.jpg").write_bytes(jpeg[:200])
    os.remove(fake)
    assert _error(tmp_path).startswith(f"{tmp_path / 'images' / 'left' / '002.jpg'}: the image cannot be decoded (")


def test_bad_fields_and_layouts_are_one_line_each(tmp_path):
    root = write_folder(tmp_path / "images", per_class=4)
    assert _error(tmp_path, channels=2) == "data.channels: expected 1 (grey) or 3 (RGB), got 2"
    assert _error(tmp_path, image_size=(0, 4)).startswith("data.image_size: expected (height, width)")
    assert _error(tmp_path, test_fraction=1.5).startswith("data.test_fraction: expected a fraction in [0, 1)")
    assert _error(tmp_path, test_fraction=0.6, validation_fraction=0.5).endswith("leaves nothing to train on")
    # 4 images a class: 10% of them rounds to none.
    assert (
        _error(tmp_path)
        == f"{root}: the validation split is empty (16 images); add images or raise data.validation_fraction"
    )
    # Over the memory limit: refused before anything is decoded.
    assert "GiB held in memory" in _error(tmp_path, image_size=(12000, 12000), channels=3)
    split = tmp_path / "split"
    write_folder(split / "train", per_class=4)
    assert _error(tmp_path, folder=str(split)) == f"{split}: has train/ but no test/ (train/ and test/ go together)"
    write_folder(split / "test", per_class=2, classes=("bottom", "middle"))
    assert _error(tmp_path, folder=str(split)) == f"{split / 'test' / 'middle'}: a class that train/ does not have"


def test_bad_input_through_the_command_changes_nothing(tmp_path):
    """One line, exit 2, no workdir made: a folder that is not there, and a truncated image."""
    workdir = tmp_path / "run"
    args = ["--config=configs/default.py:folder", f"--workdir={workdir}", "--config.batch_size=8"]
    missing = run_main([*args, f"--config.data.folder={tmp_path / 'nowhere'}"])
    assert_one_line_error(missing, f"data.folder: {tmp_path / 'nowhere'} is not a folder")
    root = write_folder(tmp_path / "images", per_class=10)
    with open(os.path.join(root, "top", "003.png"), "r+b") as f:
        f.truncate(60)
    broken = run_main([*args, f"--config.data.folder={root}"], env={folder.CACHE_ENV: str(tmp_path / "cache")})
    assert_one_line_error(broken, f"{root}/top/003.png: the image cannot be decoded")
    assert not workdir.exists()


# ---------------------------------------------------------------- a real run


@pytest.mark.slow
def test_a_colour_folder_trains_reads_its_cache_again_and_exports_and_predicts_at_its_own_shape(tmp_path, cache):
    """24x24 colour images in four classes: another shape and class count than the MNIST family's, end to end."""
    root = write_folder(tmp_path / "images", per_class=40)
    workdir = tmp_path / "run"
    args = [
        f"--workdir={workdir}",
        "--config=configs/default.py:folder",
        f"--config.data.folder={root}",
        "--config.data.image_size=24",  # one number: a square
        "--config.data.channels=3",
        "--config.num_epochs=2",
        "--config.batch_size=16",
        "--config.eval_batch_size=16",
        "--config.log_every_steps=6",
        "--config.wandb.mode=offline",
        "--config.tensorboard=False",
    ]
    result = run_main(args, env={folder.CACHE_ENV: cache})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train 128, validation 16, test 16" in result.stdout
    report = json.loads((workdir / layout.FINAL_METRICS).read_text())
    assert report["test"]["accuracy"] >= 0.75  # chance is 0.25
    recorded = json.loads((workdir / layout.CONFIG).read_text())["data"]
    assert recorded["folder"] == root and recorded["image_size"] == [24, 24] and recorded["channels"] == 3
    described = json.loads((workdir / layout.DATA).read_text())
    assert described["image_shape"] == [24, 24, 3] and described["class_names"] == list(CLASSES)
    (entry,) = os.listdir(cache)
    decoded_at = os.path.getmtime(os.path.join(cache, entry))
    # The second start (an evaluation of the run's best checkpoint) reads the cache: the entry is not written again,
    # and the test split it reads is the one the run was tested on.
    evaluated = tmp_path / "evaluated"
    args[0] = f"--workdir={evaluated}"
    args += [f"--config.init_from={workdir}", "--config.eval_only=True"]
    second = run_main(args, env={folder.CACHE_ENV: cache})
    assert second.returncode == 0, second.stderr[-3000:]
    assert os.listdir(cache) == [entry] and os.path.getmtime(os.path.join(cache, entry)) == decoded_at
    assert json.loads((evaluated / layout.FINAL_METRICS).read_text())["test"] == report["test"]
    # Exported as ONNX for 24x24x3 images in four classes; predict fits a picture to that shape, as the run does.
    exported = run_cli("export", str(workdir), "--no-wandb")
    assert exported.returncode == 0, exported.stderr[-3000:]
    card = json.loads((workdir / "export" / "model_card.json").read_text())
    assert card["input"]["shape"] == ["N", 24, 24, 3] and card["output"]["shape"] == ["N", 4]
    image = os.path.join(root, "top", "001.png")
    answers = []
    for model in (str(workdir / "export"), str(workdir)):
        predicted = run_cli("predict", model, image, "--json")
        assert predicted.returncode == 0, predicted.stderr[-3000:]
        answers.append(json.loads(predicted.stdout))
    assert [answer["model"]["class_names"] for answer in answers] == [list(CLASSES)] * 2
    assert answers[0]["predictions"][0]["class"] == answers[1]["predictions"][0]["class"]
