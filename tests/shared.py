"""What several test modules share: the runs many of them only read, each trained once per session, and the
helpers that make and check them. Tests import from here, never from each other.

A test that changes a shared run (resumes it, breaks a file) works on a copy (`copy_run`); the tests that refuse
a change check that the shared run is byte for byte as before.
"""

import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from unittest import mock

import ml_collections
import numpy as np
import pytest
from conftest import REPO_ROOT, SUBPROCESS_ENV, run_main, start_main, tiny_overrides

from mnist_flax import layout
from mnist_flax.config import schema
from mnist_flax.datasets import _mnist_family

# ---------------------------------------------------------------- the one-epoch MLP run

# One epoch (20 steps of 50 on the 1,000 training images), checkpoints on, W&B offline; a small learning rate, so
# its test accuracy is below 1.0 and a record that read another run's numbers would show.
MLP_RUN_SETTINGS = {"num_epochs": 1, "optimizer.learning_rate": 0.0001}


def mlp_run_args(data_dir: str, workdir, **extra) -> list[str]:
    """main.py's arguments for the shared MLP run (or a resume of it, with `extra` fields changed)."""
    overrides = tiny_overrides(data_dir, **{**MLP_RUN_SETTINGS, **extra})
    return ["--config=configs/mlp.py", f"--workdir={workdir}", *overrides]


@pytest.fixture(scope="session")
def finished_mlp_run(tiny_data_dir, tmp_path_factory) -> str:
    """A finished one-epoch MLP run on the tiny data: checkpoint at step 20, W&B offline. Read it; copy to change."""
    workdir = str(tmp_path_factory.mktemp("shared_run") / "mlp")
    result = run_main(mlp_run_args(tiny_data_dir, workdir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "20"))
    return workdir


def copy_run(source: str, target, *, wandb: bool = True) -> str:
    """A copy of a finished run's workdir to change freely (without its W&B folder where `wandb` is False)."""
    shutil.copytree(source, target, ignore=None if wandb else shutil.ignore_patterns("wandb"))
    return str(target)


@pytest.fixture(scope="session")
def resumed_mlp_run(tiny_data_dir, tmp_path_factory) -> str:
    """A two-epoch tiny MLP run (W&B offline, a log line every step) stopped with SIGTERM inside its first epoch
    (exit 3), then resumed to the end: one W&B run in two offline segments. Read it; copy it to sync it."""
    workdir = str(tmp_path_factory.mktemp("resumed_run") / "run")
    args = ["--config=configs/mlp.py", f"--workdir={workdir}", *tiny_overrides(tiny_data_dir, log_every_steps=1)]
    process = start_main(args)
    for line in process.stdout:  # the first progress line: a call or more into epoch 1 of 2
        progress = re.search(r"step (\d+)/", line)
        if progress and int(progress.group(1)) < 20:
            process.send_signal(signal.SIGTERM)
            break
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 3, stderr[-2000:]
    resumed = run_main(args)
    assert resumed.returncode == 0 and "resumed at step" in resumed.stdout, resumed.stderr[-2000:]
    return workdir


# ---------------------------------------------------------------- the CNN and MLP runs that serving reads

SERVED_MODELS = ("cnn", "mlp")
TOLERANCE = 1e-5  # served predictions against the run's own predictions.csv: probabilities within it


@pytest.fixture(scope="session")
def served_runs(tiny_data_dir, tmp_path_factory) -> dict[str, str]:
    """The CNN's and the MLP's two-epoch tiny runs (W&B offline), trained side by side: export and predict read
    them."""
    root = tmp_path_factory.mktemp("served_runs")
    started = {
        name: start_main([f"--config=configs/{name}.py", f"--workdir={root / name}", *tiny_overrides(tiny_data_dir)])
        for name in SERVED_MODELS
    }
    for name, process in started.items():
        _, stderr = process.communicate(timeout=900)
        assert process.returncode == 0, f"{name}: {stderr[-3000:]}"
    return {name: str(root / name) for name in SERVED_MODELS}


_EXPORTS: dict[str, str] = {}  # served run -> its ONNX export folder, made the first time a test asks


def onnx_export(served: dict[str, str], name: str) -> str:
    """The served run's ONNX export, made once: the CNN's into RUN/export/ (the default) and logged to its offline
    W&B run, the MLP's into a folder of its own without W&B."""
    run = served[name]
    if run not in _EXPORTS:
        args = [run] if name == "cnn" else [run, "--out", f"{run}-onnx", "--no-wandb"]
        result = run_cli("export", *args)
        assert result.returncode == 0, result.stderr
        _EXPORTS[run] = os.path.join(run, "export") if name == "cnn" else f"{run}-onnx"
    return _EXPORTS[run]


def run_cli(*args: str, env: dict | None = None, cwd: str = REPO_ROOT) -> subprocess.CompletedProcess:
    """`python -m mnist_flax ARGS` in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "mnist_flax", *args],
        cwd=cwd,
        env={**os.environ, **SUBPROCESS_ENV, "PYTHONPATH": REPO_ROOT, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )


def run_in_process(*args: str, cwd: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m mnist_flax ARGS` in this process, as `run_cli` gives it (faster: nothing is imported again). An
    exception that the command lets out fails the test with its traceback, as the user would see it."""
    from mnist_flax.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.dict(os.environ, env or {}))
        if cwd:
            stack.enter_context(contextlib.chdir(cwd))
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(err))
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse's exit
            code = e.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def split_images(data_dir: str) -> np.ndarray:
    """The test split's images as the runs read them: uint8 [N, 28, 28]."""
    return _mnist_family.read_idx(os.path.join(data_dir, "t10k-images-idx3-ubyte.gz"), _mnist_family.IMAGES_MAGIC)


def snapshot(folder: str) -> dict:
    """Every file under `folder` with its size and modification time: what "nothing changed" compares."""
    found = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            info = os.lstat(path)
            found[os.path.relpath(path, folder)] = (info.st_size, info.st_mtime_ns)
    return found


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """The result is exit 2 with one `error: ...` line on stderr holding every fragment, and nothing else."""
    assert result.returncode == layout.EXIT_USAGE, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr and not result.stdout.strip()
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------- the distributed CNN run

DISTRIBUTED_TOLERANCE = 1e-4  # relative, for losses: an all-reduce sums in another order than one device does


def distributed_args(data_dir, workdir, **extra) -> list[str]:
    """The tiny CNN run that data-parallel runs are compared with (batch 48 splits over 1, 2, 4 and 8 devices)."""
    settings = {"num_epochs": 2, "batch_size": 48, "eval_batch_size": 200, "log_every_steps": 5, **extra}
    return ["--config=configs/cnn.py", f"--workdir={workdir}", *tiny_overrides(data_dir, **settings)]


@pytest.fixture(scope="session")
def single_device_run(tiny_data_dir, tmp_path_factory) -> tuple[dict, list[float]]:
    """`run_results` of the tiny CNN run on one device, which the data-parallel and Slurm runs must agree with."""
    workdir = tmp_path_factory.mktemp("one_device")
    result = run_main(distributed_args(tiny_data_dir, workdir))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "cpu x1;" in result.stdout
    return run_results(workdir)


def run_results(workdir) -> tuple[dict, list[float]]:
    """A finished run's final report and its train losses, in order."""
    report = json.loads((workdir / layout.FINAL_METRICS).read_text())
    history = [json.loads(line) for line in open(workdir / layout.METRICS)]
    return report, [r["train/loss"] for r in history if "train/loss" in r]


def assert_runs_agree(one, many) -> None:
    """Two runs' `run_results` agree: steps and accuracies equal, losses within DISTRIBUTED_TOLERANCE."""
    (report_a, losses_a), (report_b, losses_b) = one, many
    assert report_b["steps"] == report_a["steps"]
    assert report_b["test"]["accuracy"] == report_a["test"]["accuracy"]
    assert report_b["test"]["loss"] == pytest.approx(report_a["test"]["loss"], rel=DISTRIBUTED_TOLERANCE)
    assert report_b["validation"]["loss"] == pytest.approx(report_a["validation"]["loss"], rel=DISTRIBUTED_TOLERANCE)
    assert losses_b == pytest.approx(losses_a, rel=DISTRIBUTED_TOLERANCE)


# ---------------------------------------------------------------- sweeps and environments


def tiny_settings(data_dir: str, **extra) -> list[str]:
    """tiny_overrides as a sweep's `--set FIELD=VALUE` options (default: one epoch, no checkpoints)."""
    overrides = tiny_overrides(data_dir, **{"num_epochs": 1, "checkpoint.enabled": False, **extra})
    return [item for o in overrides for item in ("--set", o.removeprefix("--config."))]


def write_lock(path, packages: dict) -> str:
    """A uv.lock (uv's TOML) pinning {name: version, or a list of versions: a universal lock's forks}."""
    lines = ["version = 1", "revision = 3", 'requires-python = ">=3.11, <3.14"', ""]
    for name, versions in packages.items():
        for version in [versions] if isinstance(versions, str) else versions:
            lines += ["[[package]]", f'name = "{name}"', f'version = "{version}"']
            lines += ['source = { registry = "https://pypi.org/simple" }', ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return str(path)


def write_distribution(site, name: str, version: str) -> None:
    """A distribution as pip leaves it: NAME-VERSION.dist-info/METADATA in a folder of sys.path."""
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n\nA description.\n")


# ---------------------------------------------------------------- the loop in the test process

TRAIN_EXAMPLES = 1200  # conftest.write_idx_dataset
VALIDATION_SIZE = 200
BATCH_SIZE = 50
STEPS_PER_EPOCH = (TRAIN_EXAMPLES - VALIDATION_SIZE) // BATCH_SIZE  # 20


def tiny_config(config_file: str, data_dir: str, **fields) -> ml_collections.ConfigDict:
    """The config file with conftest.tiny_overrides' values, W&B off, checkpoints on; `fields` on top (for
    `loop.train_and_evaluate` in the test process)."""
    config = schema.load_config_file(config_file)
    config.data.local_dir = data_dir
    config.data.validation_size = VALIDATION_SIZE
    config.num_epochs = 2
    config.batch_size = BATCH_SIZE
    config.eval_batch_size = 100
    config.log_every_steps = 5
    config.tensorboard = False
    config.wandb.mode = "disabled"
    config.checkpoint.enabled = True
    for key, value in fields.items():
        config[key] = value
    return config


def checkpoint_steps(workdir: str) -> set[int]:
    """The steps of a workdir's checkpoints."""
    return {int(name) for name in os.listdir(os.path.join(workdir, "checkpoints")) if name.isdigit()}


# ---------------------------------------------------------------- TFDS without a network


@pytest.fixture
def no_network(monkeypatch):
    """A machine with no network: every name lookup fails at once, as offline; returns the hosts asked for.

    Blocks `socket.getaddrinfo`, which every TCP connection from Python starts
    with (`socket.create_connection`, urllib3 under requests), so neither the
    reachability check nor a TFDS download can leave the machine, and no proxy
    is set.
    """
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    hosts = []

    def getaddrinfo(host, port, *args, **kwargs):
        hosts.append((host, port))
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return hosts


MOCK_EXAMPLES = 64


def write_tfds_metadata(data_dir: str, name: str, num_examples: int) -> str:
    """Writes what TFDS's download_and_prepare leaves beside the records: dataset_info.json and features.json.

    Built by TFDS from the data set's own builder (features from its code, the
    train and test splits with `num_examples` each), so `builder.is_prepared()`
    holds and `tfds.testing.mock_data(policy=USE_FILES)` reads it, as it reads
    the real metadata files.
    """
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    builder.info.set_splits(
        tfds.core.SplitDict(
            [
                tfds.core.SplitInfo(
                    name=split,
                    shard_lengths=[num_examples],
                    num_bytes=0,
                    filename_template=tfds.core.ShardedFileTemplate(
                        data_dir=builder.data_path, dataset_name=builder.name, split=split, filetype_suffix="tfrecord"
                    ),
                )
                for split in ("train", "test")
            ]
        )
    )
    builder.data_path.mkdir(parents=True, exist_ok=True)
    builder.info.write_to_directory(builder.data_path)
    return str(builder.data_path)


# ---------------------------------------------------------------- a docs page performed literally


def page_files(page: str) -> dict[str, str]:
    """{path: text} of every ```python block a docs page introduces with its path in backticks."""
    text = open(page).read()
    return dict(re.findall(r"^`([\w/.]+\.py)`:\n\n```python\n(.*?)```", text, flags=re.S | re.M))


def checkout_copy(destination) -> str:
    """The tracked files of the checkout (`git ls-files`), as a user's fork has them."""
    listed = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    for name in listed.stdout.splitlines():
        source = os.path.join(REPO_ROOT, name)
        if os.path.isfile(source):
            os.makedirs(os.path.join(destination, os.path.dirname(name)), exist_ok=True)
            shutil.copy2(source, os.path.join(destination, name))
    return str(destination)
