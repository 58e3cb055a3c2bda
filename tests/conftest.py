"""Shared fixtures: a small IDX data set written by the tests, and main.py as a subprocess."""

import gzip
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

# The suite's time budget, reported at the end of every run (tests/budget.py), how it splits over two workers
# (tests/parallel.py), and the runs that many tests read, each trained once per session (tests/shared.py).
pytest_plugins = ("budget", "parallel", "shared")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_DIR = "/usr/share/datasets/fashion-mnist"

# Every subprocess run of main.py: no W&B network, quiet TensorFlow.
# A developer's own sweep settings must not reach the tests' processes (nor send them to a real database).
for _name in ("MNIST_FLAX_STORAGE", "MNIST_FLAX_TRIAL"):
    os.environ.pop(_name, None)
# Every run compiles for itself, as the tests that count compilations expect; tests/test_compile_cache.py
# turns the cache on where it is the subject.
os.environ["MNIST_FLAX_COMPILE_CACHE"] = "off"
# Scripts the tests run call `python`: the interpreter running the tests (.venv's), as `make test` arranges,
# also when pytest is started as .venv/bin/python -m pytest without activating the venv.
if os.path.dirname(sys.executable) not in os.environ.get("PATH", "").split(os.pathsep):
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")

SUBPROCESS_ENV = {
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "PYTHONUNBUFFERED": "1",
}


def write_idx(path: str, array: np.ndarray, compress: bool = True) -> None:
    """Writes an uint8 array as an IDX file (magic 0x08 type, ndim)."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        payload = gzip.compress(payload)
    with open(path, "wb") as f:
        f.write(payload)


def make_learnable_split(num: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images whose class is a bright 7x7 block at one of ten places, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=num).astype(np.uint8)
    images = rng.integers(0, 60, size=(num, 28, 28)).astype(np.uint8)
    for i, label in enumerate(labels):
        row, col = divmod(int(label), 5)
        images[i, 3 + row * 12 : 10 + row * 12, 1 + col * 5 : 6 + col * 5] = 220
    return images, labels


def write_idx_dataset(directory: str, num_train: int = 1200, num_test: int = 300) -> str:
    """The four MNIST-format files of a small learnable data set, gzipped."""
    os.makedirs(directory, exist_ok=True)
    for prefix, num, seed in (("train", num_train, 0), ("t10k", num_test, 1)):
        images, labels = make_learnable_split(num, seed)
        write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"), images)
        write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"), labels)
    return directory


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> str:
    """A folder of small synthetic IDX files (1,200 train, 300 test)."""
    return write_idx_dataset(str(tmp_path_factory.mktemp("tiny_idx")))


@pytest.fixture(scope="session")
def fashion_dir() -> str:
    """The real Fashion-MNIST files (Debian's dataset-fashion-mnist; `make test` installs it)."""
    assert os.path.isfile(os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz")), (
        f"{FASHION_DIR} is missing: apt-get install dataset-fashion-mnist"
    )
    return FASHION_DIR


def tiny_overrides(data_dir: str, **extra) -> list[str]:
    """Overrides for a run of a few seconds on the tiny data set."""
    values = {
        "data.local_dir": data_dir,
        "data.validation_size": 200,
        "num_epochs": 2,
        "batch_size": 50,
        "eval_batch_size": 100,
        "log_every_steps": 5,
        "wandb.mode": "offline",
        "tensorboard": False,
    }
    values.update(extra)
    return [f"--config.{k}={v}" for k, v in values.items()]


def run_main(args: list[str], env: dict | None = None, timeout: int = 600, **kwargs) -> subprocess.CompletedProcess:
    """Runs `python main.py ARGS` from the repo root; returns the completed process."""
    full_env = {**os.environ, **SUBPROCESS_ENV, **(env or {})}
    return subprocess.run(
        [sys.executable, "main.py", *args],
        cwd=REPO_ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def start_main(args: list[str], env: dict | None = None) -> subprocess.Popen:
    """Starts `python main.py ARGS` from the repo root with its output piped (to signal it mid-run)."""
    return subprocess.Popen(
        [sys.executable, "main.py", *args],
        cwd=REPO_ROOT,
        env={**os.environ, **SUBPROCESS_ENV, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_sweep(root: str, config: str, grid: str, data_dir: str, **settings) -> subprocess.CompletedProcess:
    """`python -m mnist_flax sweep` over one `--grid FIELD=V1,V2` on the tiny data, each run set with `settings`."""
    fixed = [item for o in tiny_overrides(data_dir, **settings) for item in ("--set", o.removeprefix("--config."))]
    command = [sys.executable, "-m", "mnist_flax", "sweep", f"--config={config}", f"--root={root}", "--grid", grid]
    return subprocess.run(
        [*command, *fixed],
        cwd=REPO_ROOT,
        env={**os.environ, **SUBPROCESS_ENV},
        capture_output=True,
        text=True,
        timeout=600,
    )
