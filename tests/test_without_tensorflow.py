"""A run with TensorFlow made unimportable: it trains and writes TensorBoard files, and nothing on its path even
tries to import TensorFlow."""

import json
import os
import subprocess
import sys

import pytest
from conftest import run_main, tiny_overrides
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from mnist_flax import layout

# Put on PYTHONPATH, this sitecustomize hides TensorFlow from the process and every process it starts, as if it
# were not installed: `import tensorflow` raises ModuleNotFoundError and `importlib.util.find_spec` finds nothing
# (etils and orbax look it up so). Each import, as opposed to a lookup, is noted in $BLOCKED_IMPORTS.
# tensorflow_datasets and the rest stay importable.
BLOCK_TENSORFLOW = """
import importlib.abc
import os
import sys
import traceback


class HideTensorFlow(importlib.abc.MetaPathFinder):
    def __init__(self, finders):
        self.finders = finders

    def find_spec(self, name, path, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            lookup = any(f.name == "find_spec" and "importlib" in f.filename and "util" in f.filename
                         for f in traceback.extract_stack())
            if not lookup:
                with open(os.environ["BLOCKED_IMPORTS"], "a") as f:
                    f.write(name + "\\n")
            return None
        for finder in self.finders:
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                return spec
        return None

    def invalidate_caches(self):
        for finder in self.finders:
            if hasattr(finder, "invalidate_caches"):
                finder.invalidate_caches()


sys.meta_path[:] = [HideTensorFlow(list(sys.meta_path))]
"""


def without_tensorflow(tmp_path) -> dict:
    """The environment of a process in which `import tensorflow` fails; each attempt is noted in
    tmp_path/attempts.txt."""
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCK_TENSORFLOW)
    python_path = os.pathsep.join(filter(None, [str(blocker), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": python_path, "BLOCKED_IMPORTS": str(tmp_path / "attempts.txt")}


def test_the_blocker_blocks(tmp_path):
    env = without_tensorflow(tmp_path)
    lookup = "import importlib.util, tensorflow_datasets; print(importlib.util.find_spec('tensorflow'))"
    check = subprocess.run([sys.executable, "-c", lookup], env={**os.environ, **env}, capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout == "None\n", check.stderr[-2000:]
    assert not (tmp_path / "attempts.txt").exists()  # a lookup is not an import
    check = subprocess.run(
        [sys.executable, "-c", "import tensorflow"], env={**os.environ, **env}, capture_output=True, text=True
    )
    assert check.returncode == 1 and "ModuleNotFoundError: No module named 'tensorflow'" in check.stderr
    assert (tmp_path / "attempts.txt").read_text() == "tensorflow\n"


def test_a_run_trains_and_writes_tensorboard_with_tensorflow_unimportable(tiny_data_dir, tmp_path):
    attempts = tmp_path / "attempts.txt"
    workdir = tmp_path / "run"
    result = run_main(
        [
            "--config=configs/mlp.py",
            f"--workdir={workdir}",
            *tiny_overrides(tiny_data_dir, num_epochs=1, tensorboard=True),
        ],
        env=without_tensorflow(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not attempts.exists(), attempts.read_text()  # nothing on the run's path even tried
    accumulator = event_accumulator.EventAccumulator(str(workdir / layout.TENSORBOARD), {event_accumulator.TENSORS: 0})
    accumulator.Reload()
    losses = [json.loads(line)["train/loss"] for line in open(workdir / layout.METRICS) if "train/loss" in line]
    logged = [float(tensor_util.make_ndarray(e.tensor_proto)) for e in accumulator.Tensors("train/loss")]
    assert len(logged) == len(losses) >= 2 and logged == pytest.approx(losses, rel=1e-6)
    assert "_hparams_/session_start_info" in accumulator.Tags()["tensors"]


def test_a_tfds_data_set_without_tensorflow_is_one_line_naming_the_extra(tmp_path):
    result = run_main(
        ["--config=configs/mlp.py", f"--workdir={tmp_path / 'run'}", "--config.data.source=tfds"]
        + [
            "--config.data.name=mnist",
            f"--config.data.tfds_data_dir={tmp_path / 'tfds'}",
            "--config.wandb.mode=disabled",
        ],
        env=without_tensorflow(tmp_path),
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: mnist through TFDS needs TensorFlow, which is not installed: "), lines
    assert "`tfds` extra" in lines[-1] and "--config.data.local_dir" in lines[-1]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "tfds" / "downloads").exists()  # stopped before TFDS tried anything
