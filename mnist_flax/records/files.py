"""The run's workdir: layout, atomic file writes, and a lock against a second run.

Layout:
  config.json          resolved config (as trained)
  config_changes.json  how it differs from the config file it came from
  metrics.jsonl        every scalar written, one JSON object per line
  final_metrics.json   best validation and final test reports
  predictions.csv      test predictions of the final (best) model
  checkpoints/         orbax steps
  tensorboard/         TensorBoard event files
  wandb/               W&B run files (offline runs wait here for `sync`)
"""

import fcntl
import json
import os
import shutil
import tempfile

import numpy as np

from mnist_flax import layout
from mnist_flax.errors import ConfigError, WorkdirError


def prepare_workdir(workdir: str) -> str:
    """Creates the workdir and checks it is writable; returns its absolute path."""
    workdir = os.path.abspath(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
        # A probe name of its own: several processes of one run (jax.distributed) check the same workdir at once.
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_test_"):
            pass
    except OSError as e:
        raise WorkdirError(f"workdir {workdir} is not writable: {e.strerror}") from None
    return workdir


def first_missing_folder(path: str) -> str | None:
    """The outermost folder of `path` that does not exist yet (what creating `path` would create), or None."""
    path = os.path.abspath(path)
    missing = None
    while not os.path.lexists(path):
        missing, parent = path, os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def remove_unused(workdir: str, created: str | None) -> None:
    """Removes a workdir the run created (`created`: the outermost folder made for it) if nothing was written
    there, only empty folders and the lock, and then each emptied parent up to `created`. A refused run so
    leaves nothing on disk; a folder that holds any other file, or was there before, is kept."""
    workdir = os.path.abspath(workdir)
    if created is None or not os.path.isdir(workdir):
        return
    for _, _, names in os.walk(workdir):
        if any(name != layout.LOCK for name in names):
            return
    shutil.rmtree(workdir, ignore_errors=True)
    folder = os.path.dirname(workdir)
    while os.path.commonpath([folder, created]) == created and folder != os.path.dirname(created):
        try:
            os.rmdir(folder)  # only an empty one: another run's folder beside this one stops the climb
        except OSError:
            return
        folder = os.path.dirname(folder)


class WorkdirLock:
    """An exclusive lock on `workdir/.lock`, held for the run; released at exit even on SIGKILL."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, layout.LOCK)
        self._file = None

    def __enter__(self):
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise WorkdirError(
                f"workdir {os.path.dirname(self.path)} is in use by a running training ({holder}); "
                "wait for it or choose another --workdir"
            ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()}")
        self._file.flush()
        return self

    def __exit__(self, *exc):
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()


def write_json(path: str, payload) -> None:
    """Writes JSON atomically (a temporary file of this process's own, then rename): a reader never sees half a
    file, and processes writing the same file (a sweep's workers) do not clobber each other's temporary file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


def read_json(path: str, default=...):
    """A JSON file; `default` when it is absent (without a default, absent is an error). A file that is there but
    cannot be read or parsed is always an error: a record never passes a damaged file off as a missing one."""
    if default is not ... and not os.path.exists(path):
        return default
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


def write_predictions(path: str, log_probs: np.ndarray, labels: np.ndarray) -> None:
    """CSV of the test predictions: index, label, predicted, confidence, prob_0..prob_9."""
    probs = np.exp(log_probs)
    predicted = probs.argmax(axis=1)
    header = "index,label,predicted,confidence," + ",".join(f"prob_{c}" for c in range(probs.shape[1]))
    rows = np.column_stack([np.arange(len(labels)), labels, predicted, probs.max(axis=1), probs])
    fmt = ["%d", "%d", "%d", "%.6f"] + ["%.6f"] * probs.shape[1]
    np.savetxt(path + ".tmp", rows, fmt=fmt, delimiter=",", header=header, comments="")
    os.replace(path + ".tmp", path)


def read_predictions(path: str) -> dict[str, np.ndarray]:
    """Reads predictions.csv back into arrays: index, label, predicted, confidence, probs."""
    table = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
    return {
        "index": table[:, 0].astype(int),
        "label": table[:, 1].astype(int),
        "predicted": table[:, 2].astype(int),
        "confidence": table[:, 3],
        "probs": table[:, 4:],
    }
