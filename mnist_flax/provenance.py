"""Provenance: what produced a run, recorded beside its results.

Today the code's git state (commit, branch, dirty flag); inside a container,
which has no `.git`, the commit baked into its image. Apart from the W&B run
(`tracking.py`), so a record is complete whether or not W&B is on.
"""

import os
import subprocess

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
