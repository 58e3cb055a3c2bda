"""Upload offline runs: `python -m mnist_flax.sync WORKDIR_OR_RUN_DIR... [--force] [--dry-run]`.

Each path is a run workdir (all its `wandb/offline-run-*` folders, in order,
since a resumed run writes one per start), a sweep root (every member's), or
one offline run folder. A run
recorded with uncommitted changes (`git.dirty`) is not uploaded unless
`--force`: its logged commit would not reproduce it. Uploading itself is
`wandb sync`, which needs a token in the environment.
"""

import argparse
import subprocess
import sys

from mnist_flax import runs, tracking
from mnist_flax.errors import MnistFlaxError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mnist_flax.sync", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="run workdirs, sweep roots or offline run folders")
    parser.add_argument("--force", action="store_true", help="upload runs recorded as dirty too")
    parser.add_argument("--dry-run", action="store_true", help="check and list, upload nothing")
    args = parser.parse_args(argv)

    to_sync = []
    for path in args.paths:
        try:
            dirs = runs.offline_run_folders(path)
        except MnistFlaxError as e:  # a sweep root whose sweep.json cannot be read
            print(f"error: {e}", file=sys.stderr)
            return 2
        if not dirs:
            print(f"error: no offline W&B run under {path}", file=sys.stderr)
            return 2
        for run_dir in dirs:
            try:
                git = runs.load(run_dir, history=False, predictions=False).git
            except MnistFlaxError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            if git.get("dirty", True) and not args.force:  # no recorded git state: nothing says what reproduces it
                print(
                    f"error: {run_dir} was recorded from a dirty tree (commit {git.get('commit', 'unknown')[:12]} plus "
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
