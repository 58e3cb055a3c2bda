"""Upload offline runs: `python -m mnist_flax.sync WORKDIR_OR_RUN_DIR... [--force] [--dry-run]`.

Each path is a run workdir (all its `wandb/offline-run-*` folders, in order,
since a resumed run writes one per start) or one offline run folder. A run
recorded with uncommitted changes (`git.dirty`) is not uploaded unless
`--force`: its logged commit would not reproduce it. Uploading itself is
`wandb sync`, which needs a token in the environment.
"""

import argparse
import glob
import os
import subprocess
import sys

from mnist_flax import tracking, wandb_files


def run_dirs(path: str) -> list[str]:
    """The offline run folders under a workdir, or the folder itself."""
    if glob.glob(os.path.join(path, "run-*.wandb")):
        return [path]
    found = sorted(glob.glob(os.path.join(path, "wandb", "offline-run-*")))
    if not found:
        found = sorted(glob.glob(os.path.join(path, "offline-run-*")))
    return found


def recorded_git(run_dir: str) -> dict:
    """The git state a run recorded in its config."""
    config = wandb_files.config_values(wandb_files.summarize(wandb_files.run_file(run_dir)))
    return {"commit": config.get("git.commit", "unknown"), "dirty": bool(config.get("git.dirty", True))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mnist_flax.sync", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="run workdirs or offline run folders")
    parser.add_argument("--force", action="store_true", help="upload runs recorded as dirty too")
    parser.add_argument("--dry-run", action="store_true", help="check and list, upload nothing")
    args = parser.parse_args(argv)

    to_sync = []
    for path in args.paths:
        dirs = run_dirs(path)
        if not dirs:
            print(f"error: no offline W&B run under {path}", file=sys.stderr)
            return 2
        for run_dir in dirs:
            try:
                git = recorded_git(run_dir)
            except (OSError, ValueError) as e:
                print(f"error: cannot read {run_dir}: {e}", file=sys.stderr)
                return 2
            if git["dirty"] and not args.force:
                print(
                    f"error: {run_dir} was recorded from a dirty tree (commit {git['commit'][:12]} plus "
                    "uncommitted changes), so its commit does not reproduce it; not synced (--force uploads it)",
                    file=sys.stderr,
                )
                return 2
            to_sync.append(run_dir)
    if not args.dry_run and tracking.read_token() is None:
        print("error: no W&B token: set WANDB_API_KEY (or WANDB_TOKEN) in the environment", file=sys.stderr)
        return 2
    for run_dir in to_sync:
        print(f"{'would sync' if args.dry_run else 'syncing'} {run_dir}", flush=True)
    if args.dry_run:
        return 0
    return subprocess.run(["wandb", "sync", *to_sync], check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
