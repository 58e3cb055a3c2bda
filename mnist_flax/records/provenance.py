"""Provenance: what produced a run, recorded beside its results.

The code's git state (commit, branch, dirty flag; inside a container, which
has no `.git`, the commit baked into its image), a fingerprint of the data
(hashes of each split's decoded arrays and of the source files) and the
environment (every installed distribution's version, the hash of uv.lock and
whether it pins them all, backend, devices). Apart from the W&B run
(`tracking.py`), so a record is complete whether or not W&B is on; resume and
`reproduce` compare them.
"""

import glob
import hashlib
import os
import platform
import re
import subprocess
import tomllib
from importlib import metadata

import numpy as np

from mnist_flax.config import diff, schema

GIT_ENV = {"commit": "MNIST_FLAX_GIT_COMMIT", "branch": "MNIST_FLAX_GIT_BRANCH", "dirty": "MNIST_FLAX_GIT_DIRTY"}


def git_info(repo_dir: str = schema.REPO_ROOT) -> dict:
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
NOT_INSTALLED = "not installed"
LOCK_FILE = "uv.lock"  # beside the code: schema.REPO_ROOT
# Installed beside the lock, never by it: `python -m venv` seeds pip, and the project is the lock's root.
NOT_LOCKED = ("pip", "mnist-flax")
NOT_IN_LOCK = "not in uv.lock"


def package_versions(names) -> dict[str, str]:
    """Installed versions of the named distributions ("not installed" where absent)."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = NOT_INSTALLED
    return versions


def normalize(name: str) -> str:
    """A distribution's name as PEP 503 compares it: lowercase, each run of "-", "_", "." one "-"."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_packages() -> dict[str, str]:
    """{normalized name: version} of every distribution this interpreter sees; the first on sys.path, as import."""
    packages = {}
    for dist in metadata.distributions():
        fields = dist.metadata  # parsed once: `dist.name` and `dist.version` would parse it twice
        if fields["Name"]:
            packages.setdefault(normalize(fields["Name"]), fields["Version"])
    return dict(sorted(packages.items()))


def read_lock(path: str) -> tuple[str, dict[str, set[str]] | None]:
    """(sha256 of the file, {normalized name: the versions it pins}); ("absent", None) where there is no file.

    A universal lock may pin two versions of one package (one per Python version or platform marker); either
    counts as pinned.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return "absent", None
    pins = {}
    for package in tomllib.loads(raw.decode()).get("package", []):
        pins.setdefault(normalize(package["name"]), set()).add(package.get("version"))
    return hashlib.sha256(raw).hexdigest(), pins


def lock_differences(packages: dict[str, str], pins: dict[str, set[str]]) -> dict[str, list[str]]:
    """{name: [what the lock pins, installed version]} for each installed distribution (but NOT_LOCKED) that the
    lock does not pin at exactly its version: "not in uv.lock" for one it lacks."""
    differences = {}
    for name, version in packages.items():
        if name not in NOT_LOCKED and version not in pins.get(name, ()):
            differences[name] = [" or ".join(sorted(pins[name])) if name in pins else NOT_IN_LOCK, version]
    return differences


def environment(lock_path: str | None = None) -> dict:
    """Python and library versions, backend, device kind and count, usable CPU cores, process count, and the lock
    (installed_environment)."""
    import jax

    devices = jax.devices()
    installed = installed_environment(lock_path)
    return {
        "python": installed.pop("python"),
        **{name: installed["packages"].get(normalize(name), NOT_INSTALLED) for name in ENVIRONMENT_PACKAGES},
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        # XLA's CPU backend divides its work by the cores it may use: results differ between core counts.
        "cpu_count": len(os.sched_getaffinity(0)),
        "process_count": jax.process_count(),
        **installed,
    }


def installed_environment(lock_path: str | None = None) -> dict:
    """What this interpreter has installed, checked against uv.lock (default: the checkout's), without JAX.

    `packages` holds every installed distribution; `lock_sha256` the hash of uv.lock ("absent" without one);
    `locked` whether uv.lock pins each of them at its version (no uv.lock: False), `unlocked` those it does not
    (lock_differences). Reads about 170 METADATA files and parses uv.lock: some 0.1-0.2 s, once per run.
    """
    packages = installed_packages()
    lock_sha256, pins = read_lock(lock_path or os.path.join(schema.REPO_ROOT, LOCK_FILE))
    unlocked = lock_differences(packages, pins) if pins is not None else {}
    return {
        "python": platform.python_version(),
        "lock_sha256": lock_sha256,
        "locked": pins is not None and not unlocked,
        "unlocked": unlocked,
        "packages": packages,
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
    """{field: [saved, current]} for each environment field that differs, package by package ("packages.numpy").

    Only the fields both records hold are compared, so a record written before a field existed is no
    difference; where both list `packages`, a package on one side only is "not installed" on the other, and the
    top-level copies of ENVIRONMENT_PACKAGES are left to `packages`. `unlocked` follows from the packages and
    the lock: not compared. The fields come first, then the packages.
    """
    if not saved:
        return {}
    current = current or {}
    both = saved.keys() & current.keys()
    with_packages = "packages" in both
    left_out = {"packages", "unlocked", *(ENVIRONMENT_PACKAGES if with_packages else ())}
    fields = both - left_out
    changed = diff.changes({k: saved[k] for k in fields}, {k: current[k] for k in fields})
    if with_packages:
        for name, (old, new) in diff.changes(saved["packages"] or {}, current["packages"] or {}).items():
            changed[f"packages.{name}"] = [NOT_INSTALLED if old is None else old, NOT_INSTALLED if new is None else new]
    return changed


def describe_changes(changed: dict[str, list], limit: int = 8) -> str:
    """The differences as "field old -> new", the first `limit` of them then "and N more": one line for any number."""

    def text(key: str, value) -> str:
        return value[:12] if key == "lock_sha256" and isinstance(value, str) else str(value)

    return _first([f"{k} {text(k, old)} -> {text(k, new)}" for k, (old, new) in changed.items()], limit)


def describe_unlocked(environment: dict | None, limit: int = 8) -> str | None:
    """Why a recorded environment is not the locked one, in one line; None where it is, or it recorded no verdict."""
    if not environment or environment.get("locked", True):
        return None
    if environment.get("lock_sha256") == "absent":
        return f"no {LOCK_FILE} beside the code"
    return _first(
        [
            f"{name} {version} ({pinned if pinned == NOT_IN_LOCK else f'{LOCK_FILE} pins {pinned}'})"
            for name, (pinned, version) in (environment.get("unlocked") or {}).items()
        ],
        limit,
    )


def _first(items: list[str], limit: int) -> str:
    return ", ".join(items[:limit] + ([f"and {len(items) - limit} more"] if len(items) > limit else []))
