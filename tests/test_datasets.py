"""Data sets as plug-ins: the registry, the fields each data set declares, and the description of its arrays."""

import glob
import json
import os

import numpy as np
import pytest
from conftest import run_main
from shared import (
    MOCK_EXAMPLES,
    assert_one_line_error,
    copy_run,
    mlp_run_args,
    run_in_process,
    snapshot,
    write_tfds_metadata,
)

from mnist_flax import datasets, layout
from mnist_flax.config import schema
from mnist_flax.datasets import _mnist_family, fashion_mnist, mnist
from mnist_flax.errors import ConfigError, DataError
from mnist_flax.records import files, runs
from mnist_flax.serving import trained
from mnist_flax.training import input_pipeline


def data_config(**fields):
    """The data section of configs/default.py, with fields changed."""
    config = schema.load_config_file("configs/default.py").data
    for key, value in fields.items():
        config[key] = value
    return config


def test_registered_are_the_modules():
    names = datasets.registered()
    assert {"fashion_mnist", "mnist"} <= set(names)
    assert names == sorted(names) and not any(name.startswith("_") for name in names)  # helpers are not data sets
    for name in names:
        assert callable(datasets.module(name).load)


def test_unregistered_name_is_one_line_listing_the_registered():
    with pytest.raises(ConfigError) as error:
        datasets.module("cifar10")
    message = str(error.value)
    assert message == f"data.name: unknown data set 'cifar10' (registered: {', '.join(datasets.registered())})"
    # Through the config's validation too, before anything is loaded.
    with pytest.raises(ConfigError, match="data.name: unknown data set 'cifar10'"):
        schema.validate(schema.load_config_file("configs/default.py:cifar10"))


def test_fields_are_declared_by_the_data_set(monkeypatch):
    assert datasets.fields("fashion_mnist") == {"source": "auto", "local_dir": "", "tfds_data_dir": ""}
    config = data_config(local_dir="/data")
    own = datasets.own_fields(config)
    assert own["local_dir"] == "/data" and own["name"] == "fashion_mnist"
    assert set(own) == {*datasets.GENERIC_FIELDS, "source", "local_dir", "tfds_data_dir"}
    # A field no data set declares: one line naming the data set's fields.
    config = data_config()
    config.colour = "grey"
    with pytest.raises(ConfigError) as error:
        datasets.check(config)
    assert str(error.value) == (
        "data.colour: the fashion_mnist data set has no field 'colour' (its fields: validation_size, "
        "train_subset, eval_subset, augment, source, local_dir, tfds_data_dir)"
    )
    # Another data set's field: left out at that data set's default (a config written for it), refused otherwise.
    monkeypatch.setattr(mnist, "FIELDS", {**mnist.FIELDS, "invert": False})
    config = data_config()
    config.invert = False
    assert "invert" not in datasets.own_fields(config)
    assert datasets.own_fields({**config.to_dict(), "name": "mnist"})["invert"] is False
    config.invert = True
    with pytest.raises(ConfigError, match="data.invert: the fashion_mnist data set has no field 'invert'"):
        datasets.own_fields(config)
    # A declared field the section lacks takes its default.
    assert datasets.own_fields({"name": "mnist", "validation_size": 10})["invert"] is False


def test_description_of_the_loaded_data(tiny_data_dir):
    loaded = input_pipeline.load_datasets(data_config(local_dir=tiny_data_dir, validation_size=200))
    description = loaded.description
    assert description.name == "fashion_mnist" and description.num_classes == 10
    assert description.image_shape == (28, 28, 1)
    assert description.class_names == fashion_mnist.CLASS_NAMES and description.class_names[9] == "Ankle boot"
    assert description.source == f"idx:{tiny_data_dir}"
    # The fingerprint is of the arrays as the source gave them: the whole training file and the test file.
    train = _mnist_family.load_idx_split(tiny_data_dir, "train")
    test = _mnist_family.load_idx_split(tiny_data_dir, "test")
    assert description.fingerprint == datasets.fingerprint(train, test)
    changed = datasets.Split(train.images, np.where(np.arange(len(train)) == 5, (train.labels + 1) % 10, train.labels))
    assert datasets.fingerprint(changed, test) != description.fingerprint
    # As the run records it, and back.
    recorded = json.loads(json.dumps(description.to_dict()))
    assert recorded["image_shape"] == [28, 28, 1] and len(recorded["class_names"]) == 10
    assert datasets.Description.from_dict(recorded) == description


def _split(num: int, shape=(8, 8, 1), num_classes: int = 3, seed: int = 0) -> datasets.Split:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (num, *shape), dtype=np.uint8)
    return datasets.Split(images, rng.integers(0, num_classes, num).astype(np.int32))


def test_a_validation_split_of_the_source_is_kept(monkeypatch):
    train, validation, test = _split(40), _split(12, seed=1), _split(9, seed=2)
    loaded = datasets.arrays("fashion_mnist", ("a", "b", "c"), "test:three", train, test, validation)
    monkeypatch.setattr(fashion_mnist, "load", lambda config: loaded)
    result = input_pipeline.load_datasets(data_config(validation_size=30))
    # No hold-out: validation_size is for sources without a validation split.
    assert (len(result.train), len(result.validation), len(result.test)) == (40, 12, 9)
    np.testing.assert_array_equal(result.validation.images, validation.images)
    assert result.description.image_shape == (8, 8, 1) and result.description.num_classes == 3


@pytest.mark.parametrize(
    ("broken", "expected"),
    [
        ("float_images", "train images are float32 [40, 8, 8, 1], expected uint8 [N, 8, 8, 1]"),
        ("other_shape", "test images are uint8 [9, 8, 7, 1], expected uint8 [N, 8, 8, 1]"),
        ("int64_labels", "train labels are int64 [40], expected int32 [N]"),
        ("label_out_of_range", "test label 5 is out of range 0..2"),
    ],
)
def test_a_module_that_breaks_the_contract_is_a_data_error(monkeypatch, broken, expected):
    train, test = _split(40), _split(9, seed=2)
    if broken == "float_images":
        train = datasets.Split(train.images.astype(np.float32), train.labels)
    elif broken == "other_shape":
        test = datasets.Split(test.images[:, :, :7], test.labels)
    elif broken == "int64_labels":
        train = datasets.Split(train.images, train.labels.astype(np.int64))
    else:
        test = datasets.Split(test.images, np.where(np.arange(9) == 4, 5, test.labels).astype(np.int32))
    loaded = datasets.Arrays(
        datasets.Description("fashion_mnist", (8, 8, 1), ("a", "b", "c"), "test:broken", ""), train, test
    )
    monkeypatch.setattr(fashion_mnist, "load", lambda config: loaded)
    with pytest.raises(DataError) as error:
        input_pipeline.load_datasets(data_config(validation_size=5))
    assert str(error.value) == f"data set fashion_mnist (test:broken): {expected}"


# ---------------------------------------------------------------- the description, as a run records it


def _checkpoint_metas(workdir: str) -> list[str]:
    """The metadata file of every checkpoint step of a run (orbax's JSON item "meta")."""
    return sorted(glob.glob(os.path.join(workdir, layout.CHECKPOINTS, "*", "meta", "metadata")))


def _rewrite(path: str, change) -> None:
    with open(path) as f:
        content = json.load(f)
    change(content)
    with open(path, "w") as f:
        json.dump(content, f)


def test_a_run_records_its_data_set_and_every_reader_takes_it_from_there(finished_mlp_run, tiny_data_dir):
    expected = input_pipeline.load_datasets(data_config(local_dir=tiny_data_dir, validation_size=200)).description
    assert expected.source == f"idx:{tiny_data_dir}"
    recorded = files.read_json(os.path.join(finished_mlp_run, layout.DATA))
    assert recorded == expected.to_dict()
    assert recorded["image_shape"] == [28, 28, 1] and recorded["class_names"][0] == "T-shirt/top"
    # Beside each checkpoint too, so a checkpoint alone (init_from, a W&B model artifact) says what it was trained on.
    metas = _checkpoint_metas(finished_mlp_run)
    assert metas and all(files.read_json(path)["data"] == recorded for path in metas)
    assert files.read_json(os.path.join(finished_mlp_run, layout.FINAL_METRICS))["data"] == recorded
    # The readers: the Run record, and the trained model that predict and export build.
    assert runs.load(finished_mlp_run, history=False).data == expected
    model = trained.open_model(finished_mlp_run)
    assert model.image_shape == (28, 28, 1) and model.class_names == list(fashion_mnist.CLASS_NAMES)
    assert model.description == expected


def test_a_run_recorded_before_the_description_reads_as_the_mnist_family(finished_mlp_run, tmp_path):
    old = copy_run(finished_mlp_run, tmp_path / "old", wandb=False)
    os.remove(os.path.join(old, layout.DATA))
    for path in _checkpoint_metas(old):
        _rewrite(path, lambda meta: meta.pop("data"))
    legacy = runs.load(old, history=False).data
    assert (legacy.name, legacy.image_shape, legacy.class_names) == (
        "fashion_mnist",
        (28, 28, 1),
        fashion_mnist.CLASS_NAMES,
    )
    assert legacy.source == legacy.fingerprint == ""  # not recorded
    model = trained.open_model(old)
    assert model.image_shape == (28, 28, 1) and model.class_names == list(fashion_mnist.CLASS_NAMES)
    step = os.path.join(old, layout.CHECKPOINTS, str(model.step))
    assert trained.open_model(step).image_shape == (28, 28, 1)  # a checkpoint alone, its metadata without "data"
    assert datasets.recorded(None, "mnist").class_names == mnist.CLASS_NAMES


@pytest.mark.slow
def test_resume_or_init_from_a_checkpoint_of_other_classes_or_shape_is_refused(
    finished_mlp_run, tiny_data_dir, tmp_path
):
    other = {"name": "other", "image_shape": [8, 8, 1], "class_names": ["a", "b", "c"], "source": "", "fingerprint": ""}
    workdir = copy_run(finished_mlp_run, tmp_path / "run", wandb=False)
    for path in _checkpoint_metas(workdir):
        _rewrite(path, lambda meta: meta.update(data=other))
    latest = max(int(os.path.basename(os.path.dirname(os.path.dirname(p)))) for p in _checkpoint_metas(workdir))
    before = {k: v for k, v in snapshot(workdir).items() if k != ".lock"}
    both = (
        "the checkpoint was trained on other (8x8x1, 3 classes), "
        "this run's data set is fashion_mnist (28x28x1, 10 classes)"
    )
    # Resumed: refused before anything of the run is touched.
    result = run_main(mlp_run_args(tiny_data_dir, workdir))
    line = assert_one_line_error(result, f"resuming at step {latest} of {workdir}/checkpoints", both)
    assert "(another image shape and other classes)" in line
    assert {k: v for k, v in snapshot(workdir).items() if k != ".lock"} == before
    # A new run from it: refused, and no workdir is left behind.
    fresh = str(tmp_path / "fresh")
    result = run_main(mlp_run_args(tiny_data_dir, fresh, init_from=workdir))
    assert_one_line_error(result, f"init_from: {workdir}/checkpoints/{latest}", both)
    assert not os.path.exists(fresh)


def test_predict_converts_images_of_other_channels_and_says_so(finished_mlp_run, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    Image.fromarray(colour, mode="RGB").save(tmp_path / "colour.png")
    np.save(tmp_path / "colour.npy", rng.integers(0, 256, (2, 28, 28, 3), dtype=np.uint8))
    grey = str(tmp_path / "grey.png")
    Image.fromarray(colour[:28, :28, 0], mode="L").save(grey)
    result = run_in_process(
        "predict", finished_mlp_run, str(tmp_path / "colour.png"), str(tmp_path / "colour.npy"), grey
    )
    assert result.returncode == 0, result.stderr
    # The model takes what its run recorded (28x28 grey): one line per converted file, none for the grey one.
    assert result.stderr.splitlines() == [
        f"note: {tmp_path / name}: colour (RGB) images converted to grey, as the model takes"
        for name in ("colour.png", "colour.npy")
    ]
    rows = result.stdout.splitlines()[1:]
    assert len(rows) == 4 and rows[-1].startswith(grey)
    assert all(row.split()[2] in " ".join(fashion_mnist.CLASS_NAMES) for row in rows)


# ---------------------------------------------------------------- the built-in data sets beyond Fashion-MNIST and MNIST


@pytest.mark.parametrize(
    ("name", "fields", "tfds_name", "num_classes", "first_names"),
    [
        ("kmnist", {}, "kmnist", 10, ("o", "ki", "su")),
        ("emnist", {"variant": "balanced"}, "emnist/balanced", 47, ("0", "1", "2")),
        ("emnist", {"variant": "letters"}, "emnist/letters", 37, ("-", "A/a", "B/b")),
    ],
)
def test_tfds_data_sets_through_mock_data(tmp_path, no_network, name, fields, tfds_name, num_classes, first_names):
    # The real tfds.builder / tfds.load run against TFDS's own test facility (tfds.testing.mock_data): random
    # records of the data set's real features, read from a data_dir that holds its real metadata.
    tfds = pytest.importorskip("tensorflow_datasets")
    tfds_dir = str(tmp_path / "tensorflow_datasets")
    write_tfds_metadata(tfds_dir, tfds_name, MOCK_EXAMPLES)
    config = schema.load_config_file(f"configs/default.py:{name}").data
    config.update({"tfds_data_dir": tfds_dir, "validation_size": 16, **fields})
    mock = tfds.testing.mock_data(
        num_examples=MOCK_EXAMPLES, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=tfds_dir
    )
    with mock:
        loaded = input_pipeline.load_datasets(config)
        raw_images, raw_labels = tfds.as_numpy(
            tfds.load(tfds_name, split="test", batch_size=-1, as_supervised=True, data_dir=tfds_dir)
        )
    description = loaded.description
    assert description.name == name and description.source == f"tfds:{tfds_name}"
    assert description.image_shape == (28, 28, 1) and description.num_classes == num_classes
    assert description.class_names[:3] == first_names
    # TFDS declares the classes: as many as its features say.
    assert tfds.builder(tfds_name, data_dir=tfds_dir).info.features["label"].num_classes == num_classes
    assert (len(loaded.train), len(loaded.validation), len(loaded.test)) == (MOCK_EXAMPLES - 16, 16, MOCK_EXAMPLES)
    np.testing.assert_array_equal(loaded.test.labels, raw_labels)
    if name == "emnist":  # EMNIST's images are stored transposed: turned upright here
        np.testing.assert_array_equal(loaded.test.images, raw_images.transpose(0, 2, 1, 3))
        assert not np.array_equal(loaded.test.images, raw_images)
    else:
        np.testing.assert_array_equal(loaded.test.images, raw_images)
    assert no_network == []  # a prepared cache needs no network


def test_tfds_only_data_sets_refuse_idx_fields_and_unknown_variants():
    with pytest.raises(ConfigError, match="data.local_dir: the kmnist data set has no field 'local_dir'"):
        datasets.check(data_config(name="kmnist", local_dir="/data"))
    assert "local_dir" not in datasets.own_fields(data_config(name="kmnist"))  # at its default: left out
    config = schema.load_config_file("configs/default.py:emnist").data
    assert config.variant == "balanced"  # the config file's argument adds the data set's own fields
    config.variant = "greek"
    with pytest.raises(ConfigError) as error:
        input_pipeline.load_datasets(config)
    assert str(error.value) == (
        "data.variant: unknown EMNIST variant 'greek' (choose from balanced, bymerge, byclass, letters, digits, mnist)"
    )


def test_kmnist_without_network_is_one_line_saying_how_to_get_it(tmp_path, no_network):
    pytest.importorskip("tensorflow_datasets")
    tfds_dir = str(tmp_path / "tensorflow_datasets")
    with pytest.raises(DataError) as error:
        input_pipeline.load_datasets(data_config(name="kmnist", tfds_data_dir=tfds_dir))
    message = str(error.value)
    assert message.startswith(f"kmnist is not in the TFDS cache ({tfds_dir}/kmnist/")
    assert "tfds build kmnist" in message and "--config.data.tfds_data_dir=DIR" in message and "\n" not in message


def test_digits_is_scikit_learns_bundled_set_split_by_a_fixed_draw():
    from sklearn.datasets import load_digits

    loaded = input_pipeline.load_datasets(data_config(name="digits"))
    description = loaded.description
    assert description.image_shape == (8, 8, 1) and description.class_names == tuple("0123456789")
    assert description.source == "sklearn:digits"
    # All 1,797 images, each in one split: 20% test, 10% validation (validation_size does not apply).
    assert (len(loaded.train), len(loaded.validation), len(loaded.test)) == (1258, 180, 359)
    every = np.concatenate([loaded.train.images, loaded.validation.images, loaded.test.images])
    bunch = load_digits()
    assert sorted(map(bytes, every.reshape(len(every), -1))) == sorted(
        map(bytes, np.round(bunch.images * 255 / 16).astype(np.uint8).reshape(len(every), -1))
    )
    assert every.max() == 255 and every.min() == 0  # 16 dots -> 255
    # The same draw every time.
    again = input_pipeline.load_datasets(data_config(name="digits"))
    np.testing.assert_array_equal(again.test.images, loaded.test.images)
    assert again.description.fingerprint == description.fingerprint
    # The MNIST family's fields at their defaults are left out; set, they are one line.
    assert set(datasets.own_fields(data_config(name="digits"))) == set(datasets.GENERIC_FIELDS)
    config = schema.load_config_file("configs/default.py:digits")
    config.data.local_dir = "/data"
    with pytest.raises(ConfigError, match="data.local_dir: the digits data set has no field 'local_dir'"):
        schema.validate(config)


@pytest.mark.slow
@pytest.mark.parametrize("config_file", ["configs/cnn.py", "configs/mlp.py"])
def test_a_run_on_digits_learns(config_file, tmp_path, capsys):
    # A real run on the real (bundled) data: 8x8 images, another shape than the MNIST family's, through every
    # consumer of the description: the model's sizes, the metrics, data.json, predict.
    workdir = str(tmp_path / "run")
    args = [f"--config={config_file}:digits", f"--workdir={workdir}", "--config.num_epochs=15"]
    result = run_main([*args, "--config.wandb.mode=disabled", "--config.tensorboard=False"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert files.read_json(os.path.join(workdir, layout.DATA))["image_shape"] == [8, 8, 1]
    final = files.read_json(os.path.join(workdir, layout.FINAL_METRICS))
    accuracy = final["test"]["accuracy"]
    with capsys.disabled():
        print(f"\n{config_file} on digits: test accuracy {accuracy:.4f} (359 images; chance 0.1)")
    assert accuracy > 0.85  # well above chance (0.1): it learns
    assert len(final["test"]["confusion_matrix"]) == 10
    np.save(tmp_path / "eight.npy", np.full((2, 8, 8), 200, np.uint8))
    predicted = run_in_process("predict", workdir, str(tmp_path / "eight.npy"), "--top", "10")
    assert predicted.returncode == 0 and predicted.stderr == "", predicted.stderr
    assert len(predicted.stdout.splitlines()) == 1 + 2 * 10


@pytest.mark.slow
def test_init_from_a_run_of_another_image_shape_is_refused(finished_mlp_run, tmp_path):
    fresh = str(tmp_path / "digits")
    result = run_main(
        ["--config=configs/mlp.py:digits", f"--workdir={fresh}", f"--config.init_from={finished_mlp_run}"]
    )
    assert_one_line_error(
        result,
        f"init_from: {finished_mlp_run}/checkpoints/",
        "the checkpoint was trained on fashion_mnist (28x28x1, 10 classes), "
        "this run's data set is digits (8x8x1, 10 classes) (another image shape)",
    )
    assert not os.path.exists(fresh)
