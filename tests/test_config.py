"""Configs: every file loads and validates, the files differ only where they say, and bad input
through `main.py` gives one line, exit status 2, and leaves an existing workdir untouched."""

import dataclasses
import glob
import gzip
import hashlib
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT, run_main, tiny_overrides, write_idx
from shared import MLP_RUN_SETTINGS

from mnist_flax import datasets, layout
from mnist_flax.config import diff, schema
from mnist_flax.errors import ConfigError

FASHION_MNIST = datasets.recorded(None, "fashion_mnist")  # the default data set: 28x28x1, 10 classes
# How a line about an unknown data set lists the registered ones (the modules of mnist_flax/datasets/).
REGISTERED = f"registered: {', '.join(datasets.registered())}"

CONFIG_FILES = sorted(
    os.path.relpath(path, REPO_ROOT)
    for path in glob.glob(os.path.join(REPO_ROOT, "configs", "*.py"))
    if not path.endswith("__init__.py")
)


def flat_config(spec: str) -> dict:
    return schema.flatten(schema.load_config_file(os.path.join(REPO_ROOT, spec)))


# ---------------------------------------------------------------- the config files


def test_config_files_exist():
    assert {"configs/default.py", "configs/cnn.py", "configs/mlp.py"} <= set(CONFIG_FILES)


@pytest.mark.parametrize("spec", CONFIG_FILES)
def test_config_file_loads_and_validates(spec):
    config = schema.load_config_file(os.path.join(REPO_ROOT, spec))
    schema.validate(config)
    flat = schema.flatten(config)
    # The field names that docs, sweeps and scripts rely on.
    for name in (
        "num_epochs",
        "batch_size",
        "seed",
        "data.name",
        "data.local_dir",
        "model.name",
        "optimizer.name",
        "optimizer.learning_rate",
        "wandb.mode",
    ):
        assert name in flat, name
    # Every field with a fixed set of values is checked by validate().
    for name in schema.CHOICES:
        if name in flat:
            assert flat[name] in schema.CHOICES[name]


def test_cnn_config_is_the_defaults():
    assert diff.is_empty(diff.diff(flat_config("configs/default.py"), flat_config("configs/cnn.py")))


def test_mlp_config_differs_only_where_it_says():
    difference = diff.diff(flat_config("configs/default.py"), flat_config("configs/mlp.py"))
    assert difference == {
        "changed": {
            "model.name": ["cnn", "mlp"],
            "model.dense_features": [[256], [512, 256]],
            "model.dropout_rate": [0.25, 0.2],
            "num_epochs": [10, 5],
        },
        "added": {},
        "removed": {"model.conv_features": [32, 64]},
    }


@pytest.mark.parametrize("spec", CONFIG_FILES)
def test_config_argument_selects_the_data_set(spec):
    assert flat_config(spec)["data.name"] == "fashion_mnist"
    mnist = flat_config(f"{spec}:mnist")
    assert mnist["data.name"] == "mnist"
    # The argument changes the data set and nothing else.
    difference = diff.diff(flat_config(spec), mnist)
    assert difference["changed"] == {"data.name": ["fashion_mnist", "mnist"]}
    assert not difference["added"] and not difference["removed"]


def test_config_argument_is_validated():
    config = schema.load_config_file(os.path.join(REPO_ROOT, "configs/default.py:cifar10"))
    with pytest.raises(
        ConfigError,
        match=re.escape(f"data.name: unknown data set 'cifar10' ({REGISTERED})"),
    ):
        schema.validate(config)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("optimizer.learning_rate", 0.0, "optimizer.learning_rate: 0.0 is out of range (must be > 0.0)"),
        ("batch_size", 0, "batch_size: 0 is out of range (must be >= 1)"),
        ("model.dropout_rate", 1.0, "model.dropout_rate: 1.0 is out of range (must be in [0, 1))"),
        ("model.dropout_rate", -0.1, "model.dropout_rate: -0.1 is out of range (must be >= 0.0)"),
        ("loss.label_smoothing", 1.5, "loss.label_smoothing: 1.5 is out of range (must be <= 1.0)"),
        ("model.dense_features", (256, 0), "model.dense_features: expected a tuple of positive integers"),
        ("train.steps_per_call", "fast", "train.steps_per_call: expected 'auto' or an integer >= 1, got 'fast'"),
        ("wandb.mode", "cloud", "wandb.mode: unknown value 'cloud'"),
        ("data.augment.max_shift", 14, "data.augment.max_shift: 14 is out of range (must be <= 13)"),
        ("data.augment.max_shift", -1, "data.augment.max_shift: -1 is out of range (must be >= 0)"),
    ],
)
def test_validate_in_process(field, value, message):
    # The same checks as through main.py below, in-process and fast (not marked slow).
    config = schema.load_config_file(os.path.join(REPO_ROOT, "configs/default.py"))
    section, _, leaf = field.rpartition(".")
    (config[section] if section else config)[leaf] = value
    with pytest.raises(ConfigError) as error:
        schema.validate(config)
    assert str(error.value).startswith(message)


@pytest.mark.parametrize("value", ["1", "50"])
def test_auto_or_integer_fields_as_given_on_the_command_line(value):
    # The fields' default is the string "auto", so ml_collections keeps them str
    # fields and `--config.train.steps_per_call=50` arrives as the string "50".
    # An integer given that way must be accepted (and used as that integer).
    from mnist_flax.training import resolution

    config = schema.load_config_file(os.path.join(REPO_ROOT, "configs/default.py"))
    config.train.steps_per_call = value
    config.train.scan_unroll = value
    config.train.batch_split = value
    schema.validate(config)
    assert resolution.steps_per_call(config.train.steps_per_call, backend="gpu") == int(value)
    assert resolution.scan_unroll(config.train.scan_unroll, 7, backend="cpu") == int(value)
    assert resolution.batch_split(config.train.batch_split, 128, backend="cpu") == int(value)
    config.batch_size = 100 * int(value)  # the pieces must divide the batch
    resolved = resolution.resolve(config, FASHION_MNIST, backend="cpu", num_devices=1)
    assert (resolved.train.steps_per_call, resolved.train.scan_unroll) == (int(value), int(value))
    assert resolved.train.batch_split == int(value)


@pytest.mark.parametrize("field", ["train.steps_per_call", "train.scan_unroll", "train.batch_split"])
@pytest.mark.parametrize("value", ["0", "-2", "fast", "2.5"])
def test_auto_or_integer_fields_reject_other_values(field, value):
    config = schema.load_config_file(os.path.join(REPO_ROOT, "configs/default.py"))
    section, leaf = field.split(".")
    config[section][leaf] = value
    with pytest.raises(ConfigError, match=rf"^{field}: expected 'auto' or an integer >= 1, got '{value}'$"):
        schema.validate(config)


def test_auto_fused_steps_per_backend():
    from mnist_flax.training import resolution

    config = schema.load_config_file(os.path.join(REPO_ROOT, "configs/default.py"))
    assert (config.train.steps_per_call, config.train.scan_unroll) == ("auto", "auto")
    # CPU: a few steps a call, written out with no loop; accelerators: many steps in a scan.
    cpu = resolution.resolve(config, FASHION_MNIST, backend="cpu", num_devices=1)
    assert (cpu.train.steps_per_call, cpu.train.scan_unroll) == (3, 3)
    gpu = resolution.resolve(config, FASHION_MNIST, backend="gpu", num_devices=1)
    assert (gpu.train.steps_per_call, gpu.train.scan_unroll) == (50, 1)


def test_main_py_reads_booleans_as_the_docs_spell_them():
    # One parser for every override: main.py takes what a sweep's --set and `diff` take (overrides.parse_value).
    code = (
        "import sys; from mnist_flax.commands import train; "
        "sys.argv = ['main.py', '--config=configs/mlp.py', '--config.tensorboard=no', "
        "'--config.wandb.allow_dirty=YES', '--config.checkpoint.enabled=0']; "
        "train.parse_flags(sys.argv); "
        "c = train.FLAGS.config; print(c.tensorboard, c.wandb.allow_dirty, c.checkpoint.enabled)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["False", "True", "False"]
    refused = run_main(["--config=configs/mlp.py", "--config.tensorboard=maybe"], timeout=120)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == ["error: config field 'tensorboard' expects bool, got 'maybe'"]


def test_nearest_names():
    flat = flat_config("configs/default.py")
    assert schema.nearest_names("lr", flat)[0] == "optimizer.learning_rate"
    assert "optimizer.learning_rate" in schema.nearest_names("optimizer.learnig_rate", flat)
    assert "num_epochs" in schema.nearest_names("num_epoch", flat)


# ---------------------------------------------------------------- bad input through main.py


@pytest.fixture
def trained_workdir(finished_mlp_run) -> str:
    """A workdir with a completed checkpoint of a one-epoch MLP run on the tiny data set (tests/shared.py's; the
    bad inputs below must leave it byte for byte as it is)."""
    assert os.path.isfile(os.path.join(finished_mlp_run, layout.FINAL_METRICS))
    return finished_mlp_run


def tree_hashes(directory: str) -> dict[str, str]:
    """sha256 of every file under `directory`, by relative path.

    `.lock` is left out: a run that starts rewrites it with its pid while it
    holds the lock; that is the lock working, not damage to the run.
    """
    hashes = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, directory)
            if relative == ".lock":
                continue
            with open(path, "rb") as f:
                hashes[relative] = hashlib.sha256(f.read()).hexdigest()
    return hashes


def _rewrite_gz(path: str, transform) -> None:
    with open(path, "rb") as f:
        raw = gzip.decompress(f.read())
    with open(path, "wb") as f:
        f.write(gzip.compress(transform(raw)))


@pytest.fixture(scope="module")
def broken_data(tmp_path_factory, tiny_data_dir) -> dict[str, str]:
    """Copies of the tiny data set, each with one file broken in one way."""
    root = tmp_path_factory.mktemp("broken_idx")
    folders = {}

    def copy(name: str) -> str:
        folders[name] = str(root / name)
        shutil.copytree(tiny_data_dir, folders[name])
        return folders[name]

    images = os.path.join(copy("truncated_gzip"), "train-images-idx3-ubyte.gz")
    with open(images, "rb") as f:
        payload = f.read()
    with open(images, "wb") as f:
        f.write(payload[: len(payload) // 2])

    _rewrite_gz(os.path.join(copy("truncated_data"), "train-images-idx3-ubyte.gz"), lambda raw: raw[:-1000])

    wrong_magic = copy("wrong_magic")
    shutil.copy(
        os.path.join(wrong_magic, "train-images-idx3-ubyte.gz"), os.path.join(wrong_magic, "train-labels-idx1-ubyte.gz")
    )

    count_mismatch = copy("count_mismatch")
    labels = np.zeros(299, np.uint8)  # the test set has 300 images
    write_idx(os.path.join(count_mismatch, "t10k-labels-idx1-ubyte.gz"), labels)

    def label_ten(raw: bytes) -> bytes:
        data = bytearray(raw)
        data[8 + 17] = 10  # header: magic + one size; then label 17
        return bytes(data)

    _rewrite_gz(os.path.join(copy("label_out_of_range"), "train-labels-idx1-ubyte.gz"), label_ten)
    return folders


@pytest.fixture(scope="module")
def bad_config_files(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("bad_configs")
    (directory / "syntax_error.py").write_text("def get_config(:\n    pass\n")
    (directory / "raises.py").write_text(
        "def get_config(arg=None):\n    raise RuntimeError('the cluster config needs MY_CLUSTER set')\n"
    )
    (directory / "no_get_config.py").write_text("import ml_collections\n\nCONFIG = ml_collections.ConfigDict()\n")
    (directory / "misspelt_model_field.py").write_text(
        "from configs import mlp\n\n\ndef get_config(arg=None):\n    config = mlp.get_config(arg)\n"
        "    config.model.dense_feature = (64,)\n    return config\n"
    )
    (directory / "misspelt_data_field.py").write_text(
        "from configs import mlp\n\n\ndef get_config(arg=None):\n    config = mlp.get_config(arg)\n"
        "    config.data.local_folder = '/data'\n    return config\n"
    )
    return str(directory)


@dataclasses.dataclass(frozen=True)
class BadInput:
    """One row of the table: the arguments, and the pieces the error line must contain.

    Templates in args and expected: {tiny} the tiny data set, {broken[...]} a broken copy,
    {trained} the existing run's workdir, {configs} the bad config files, {tmp} a fresh folder.
    The run uses --workdir={trained} unless `workdir` says otherwise, and the tiny data set's
    overrides unless `tiny` is False (then only `args`).
    """

    name: str
    args: tuple[str, ...]
    expected: tuple[str, ...]
    config: str = "configs/mlp.py"
    workdir: str = "{trained}"
    tiny: bool = True


BAD_INPUTS = [
    # Config fields and values.
    BadInput("unknown_field", ("--config.lr=0.1",), ("unknown config field 'lr'", "optimizer.learning_rate")),
    BadInput(
        "misspelt_nested_field",
        ("--config.optimizer.learnig_rate=0.1",),
        ("unknown config field 'optimizer.learnig_rate'", "did you mean optimizer.learning_rate"),
    ),
    BadInput("misspelt_top_level_field", ("--config.num_epoch=3",), ("'num_epoch'", "num_epochs")),
    BadInput("group_given_a_value", ("--config.optimizer=adam",), ("'optimizer' is a group",)),
    BadInput("wrong_type_int", ("--config.batch_size=abc",), ("batch_size", "expects int", "'abc'")),
    BadInput("wrong_type_float", ("--config.optimizer.learning_rate=fast",), ("optimizer.learning_rate", "'fast'")),
    BadInput(
        "negative_learning_rate",
        ("--config.optimizer.learning_rate=-0.1",),
        ("optimizer.learning_rate", "out of range"),
    ),
    BadInput(
        "zero_learning_rate", ("--config.optimizer.learning_rate=0",), ("optimizer.learning_rate", "out of range")
    ),
    BadInput("batch_size_zero", ("--config.batch_size=0",), ("batch_size: 0 is out of range",)),
    # The tiny training split has 1,200 - 200 = 1,000 examples.
    BadInput(
        "batch_size_larger_than_split",
        ("--config.batch_size=1001",),
        ("batch_size: 1001", "larger than the training split (1000"),
        workdir="{tmp}/runs/new",  # refused after the data is read: the folders made for it are removed again
    ),
    BadInput("steps_per_call_zero", ("--config.train.steps_per_call=0",), ("train.steps_per_call",)),
    BadInput("scan_unroll_word", ("--config.train.scan_unroll=all",), ("train.scan_unroll", "'all'")),
    # tiny_overrides' batch is 50: 3 pieces do not divide it.
    BadInput(
        "batch_split_not_dividing_batch",
        ("--config.train.batch_split=3",),
        ("train.batch_split: 3 pieces do not divide the batch of 50",),
        config="configs/cnn.py",
    ),
    BadInput("num_epochs_zero", ("--config.num_epochs=0",), ("num_epochs: 0 is out of range",)),
    BadInput("dropout_above_one", ("--config.model.dropout_rate=1.5",), ("model.dropout_rate: 1.5",)),
    BadInput(
        "dropout_one",
        ("--config.model.dropout_rate=1.0",),
        ("model.dropout_rate: 1.0 is out of range (must be in [0, 1))",),
    ),
    BadInput("validation_larger_than_train", ("--config.data.validation_size=1200",), ("data.validation_size: 1200",)),
    BadInput("unknown_model", ("--config.model.name=vit",), ("model.name", "'vit'", "registered: cnn, mlp, resnet")),
    # The command line cannot add fields; a config file can, and the model's module declares its fields.
    BadInput(
        "field_the_model_does_not_declare",
        (),
        ("model.dense_feature: the mlp model has no field 'dense_feature'", "its fields: dense_features, dropout_rate"),
        config="{configs}/misspelt_model_field.py",
    ),
    BadInput("unknown_optimizer", ("--config.optimizer.name=lion",), ("optimizer.name", "'lion'", "adamw")),
    BadInput("unknown_loss", ("--config.loss.name=hinge",), ("loss.name", "'hinge'", "cross_entropy")),
    BadInput(
        "unknown_schedule", ("--config.optimizer.schedule=step",), ("optimizer.schedule", "'step'", "warmup_cosine")
    ),
    BadInput(
        "unknown_data_set",
        ("--config.data.name=cifar10",),
        ("data.name", "'cifar10'", REGISTERED),
    ),
    # A data set's module declares its fields, as a model's does.
    BadInput(
        "field_the_data_set_does_not_declare",
        (),
        ("data.local_folder: the fashion_mnist data set has no field 'local_folder'", "source, local_dir"),
        config="{configs}/misspelt_data_field.py",
    ),
    # A stray positional argument (e.g. a value after a space: `--config.seed 3` is fine, `stray` is not).
    BadInput("unexpected_argument", ("stray",), ("unexpected arguments: stray",)),
    # Config files.
    BadInput(
        "config_file_missing",
        (),
        ("configs/nonexistent.py does not exist",),
        config="configs/nonexistent.py",
        tiny=False,
    ),
    BadInput(
        "config_file_syntax_error",
        (),
        ("syntax_error.py", "SyntaxError"),
        config="{configs}/syntax_error.py",
        tiny=False,
    ),
    BadInput(
        "config_file_raises",
        (),
        ("raises.py", "get_config() failed", "MY_CLUSTER"),
        config="{configs}/raises.py",
        tiny=False,
    ),
    BadInput("config_file_without_get_config", (), ("no get_config",), config="{configs}/no_get_config.py", tiny=False),
    # Data.
    BadInput(
        "data_folder_missing",
        ("--config.data.local_dir=/nonexistent",),
        ("data.local_dir: /nonexistent is not a folder",),
        workdir="{tmp}/runs/new",
    ),
    BadInput(
        "truncated_gzip",
        ("--config.data.local_dir={broken[truncated_gzip]}",),
        ("{broken[truncated_gzip]}/train-images-idx3-ubyte.gz", "truncated gzip"),
        workdir="{tmp}/runs/new",
    ),
    BadInput(
        "truncated_data",
        ("--config.data.local_dir={broken[truncated_data]}",),
        ("{broken[truncated_data]}/train-images-idx3-ubyte.gz", "(truncated)"),
    ),
    BadInput(
        "wrong_magic_number",
        ("--config.data.local_dir={broken[wrong_magic]}",),
        ("{broken[wrong_magic]}/train-labels-idx1-ubyte.gz", "wrong magic number 0x00000803"),
    ),
    BadInput(
        "image_label_count_mismatch",
        ("--config.data.local_dir={broken[count_mismatch]}",),
        ("{broken[count_mismatch]}", "test has 300 images but 299 labels"),
    ),
    BadInput(
        "label_out_of_range",
        ("--config.data.local_dir={broken[label_out_of_range]}",),
        ("{broken[label_out_of_range]}/train-labels-idx1-ubyte.gz", "label 10 at index 17 is out of range"),
        workdir="{tmp}/runs/new",
    ),
    # Workdir and checkpoints.
    BadInput("workdir_is_a_file", (), ("workdir {tmp}/a_file is not writable",), workdir="{tmp}/a_file"),
    BadInput("workdir_under_a_file", (), ("workdir {tmp}/a_file/run is not writable",), workdir="{tmp}/a_file/run"),
    BadInput(
        "init_from_missing",
        ("--config.init_from={tmp}/no_such_run",),
        ("{tmp}/no_such_run does not exist",),
        workdir="{tmp}/run",
    ),
    BadInput(
        "init_from_other_model",
        ("--config.init_from={trained}",),
        ("{trained}/checkpoints", "does not fit the configured model: it holds a mlp"),
        config="configs/cnn.py",
        workdir="{tmp}/run",
    ),
    BadInput(
        "resume_other_model",
        (),
        # Refused as config drift (the model is a field that changes the training), before the state is restored.
        ("resuming at step", "model.name: 'mlp' -> 'cnn'", "{trained}/checkpoints"),
        config="configs/cnn.py",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD_INPUTS, ids=[case.name for case in BAD_INPUTS])
def test_bad_input_through_main(case, trained_workdir, tiny_data_dir, broken_data, bad_config_files, tmp_path):
    (tmp_path / "a_file").write_text("not a folder\n")
    values = {
        "tiny": tiny_data_dir,
        "broken": broken_data,
        "trained": trained_workdir,
        "configs": bad_config_files,
        "tmp": tmp_path,
    }
    fill = lambda text: text.format(**values)  # noqa: E731
    args = [f"--config={fill(case.config)}", f"--workdir={fill(case.workdir)}"]
    if case.tiny:
        # The existing run's settings; the case's own arguments come last and win.
        args += tiny_overrides(tiny_data_dir, **MLP_RUN_SETTINGS)
    args += [fill(arg) for arg in case.args]
    before = tree_hashes(trained_workdir)

    result = run_main(args, timeout=300)

    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, (
        f"exit {result.returncode}\nstdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-3000:]}"
    )
    assert "Traceback" not in result.stderr + result.stdout
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{result.stderr[-3000:]}"
    assert lines[0].startswith("error: "), lines[0]
    for piece in case.expected:
        assert fill(piece) in lines[0], f"{fill(piece)!r} not in {lines[0]!r}"
    # Nothing of the existing run changed, and nothing was added to it.
    assert tree_hashes(trained_workdir) == before
    # Nothing was trained: no run started writing metrics anywhere.
    assert not glob.glob(str(tmp_path / "**" / layout.METRICS), recursive=True)
    # A refused run leaves nothing on disk: no workdir, no `.lock`, no folder made for it.
    assert sorted(os.listdir(tmp_path)) == ["a_file"]


@pytest.mark.slow
def test_a_refused_run_leaves_no_folder_under_runs(tmp_path, tiny_data_dir):
    # No --workdir: the run's own runs/NAME-YYYYmmdd-HHMMSS/, named after a config file of a name of its own. The
    # batch is refused once the data is read (1,000 training examples), after the workdir and its lock were made.
    config = tmp_path / f"refused_{os.getpid()}_{tmp_path.name}.py"
    config.write_text("from configs import mlp\n\n\ndef get_config(arg=None):\n    return mlp.get_config(arg)\n")
    pattern = os.path.join(REPO_ROOT, "runs", f"{config.stem}-*")
    result = run_main([f"--config={config}", *tiny_overrides(tiny_data_dir), "--config.batch_size=1001"])
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "larger than the training split" in lines[0], result.stderr[-2000:]
    assert glob.glob(pattern) == []
