"""Provenance: what produced a run, recorded beside its results.

The code's git state (commit, branch, dirty flag; inside a container, which
has no `.git`, the commit baked into its image), a fingerprint of the data
(hashes of each split's decoded arrays and of the source files) and the
environment (library versions, backend, devices). Apart from the W&B run
(`tracking.py`), so a record is complete whether or not W&B is on; resume and
`reproduce` compare them.
"""

import glob
import hashlib
import os
import platform
import subprocess
from importlib import metadata

import numpy as np

from mnist_flax import config_utils

GIT_ENV = {"commit": "MNIST_FLAX_GIT_COMMIT", "branch": "MNIST_FLAX_GIT_BRANCH", "dirty": "MNIST_FLAX_GIT_DIRTY"}


def git_info(repo_dir: str = config_utils.REPO_ROOT) -> dict:
    """Commit, branch and dirty flag of the code; from the environment inside a container."""

    def git(*args):
        return subprocess.run(
            ["git", "-C", repo_dir, *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        branch = git("rev-parse", "--abbrev-ref", "HEAD")
        # Tracked files only: an untracked scratch file does not change what the commit reproduces.
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        return {"commit": commit, "branch": branch, "dirty": dirty, "source": "git"}
    except (OSError, subprocess.SubprocessError):
        commit = os.environ.get(GIT_ENV["commit"], "")
        return {
            "commit": commit or "unknown",
            "branch": os.environ.get(GIT_ENV["branch"], "unknown"),
            # An unknown commit reproduces nothing: count it as dirty.
            "dirty": not commit or os.environ.get(GIT_ENV["dirty"], "false").lower() in ("1", "true", "yes"),
            "source": "environment" if commit else "unknown",
        }


ENVIRONMENT_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "clu", "wandb", "numpy")


def package_versions(names) -> dict[str, str]:
    """Installed versions of the named distributions ("not installed" where absent)."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def environment() -> dict:
    """Python and library versions, backend, device kind and count, usable CPU cores, process count."""
    import jax

    devices = jax.devices()
    return {
        "python": platform.python_version(),
        **package_versions(ENVIRONMENT_PACKAGES),
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        # XLA's CPU backend divides its work by the cores it may use: results differ between core counts.
        "cpu_count": len(os.sched_getaffinity(0)),
        "process_count": jax.process_count(),
    }


def data_fingerprint(datasets) -> dict:
    """SHA-256 of each split's decoded images and labels, and of the source files where there are files.

    The decoded arrays say what the model saw (another file set under the same
    `data.name`, or one changed label, changes them); the files' hashes say which
    files they came from.
    """
    fingerprint = {name: _hash_split(getattr(datasets, name)) for name in ("train", "validation", "test")}
    kind, _, location = datasets.source.partition(":")
    if kind == "idx":
        fingerprint["files"] = {
            os.path.basename(path): _hash_file(path)
            for path in sorted(glob.glob(os.path.join(location, "*-ubyte*")))
            if os.path.isfile(path)
        }
    return fingerprint


def _hash_split(split) -> str:
    digest = hashlib.sha256()
    for array in (split.images, split.labels):
        digest.update(str((array.dtype, array.shape)).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _hash_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def compare_data(saved: dict | None, current: dict) -> list[str]:
    """The splits whose decoded data differ between two fingerprints (none when `saved` is None: not recorded)."""
    if not saved:
        return []
    return [name for name in ("train", "validation", "test") if saved.get(name) != current.get(name)]


def compare_environment(saved: dict | None, current: dict) -> dict[str, list]:
    """{field: [saved, current]} for each environment field that differs."""
    if not saved:
        return {}
    return {
        k: [saved.get(k), current.get(k)]
        for k in sorted(saved.keys() | current.keys())
        if saved.get(k) != current.get(k)
    }
