"""Upload offline runs: `python -m mnist_flax sync WORKDIR_OR_RUN_DIR... [--force] [--dry-run]`.

Each path is a run workdir (all its `wandb/offline-run-*` folders: a resumed run
writes one per start), a sweep root (every member's), or one offline run folder.
A run recorded with uncommitted changes (`git.dirty`) is not uploaded unless
`--force`: its logged commit would not reproduce it. Uploading is `wandb sync`,
which needs a token in the environment; it uploads the folders of one run id one
after another, in order of start time, as one W&B run. `--dry-run` prints that
plan (each W&B run and its segments, read from the `.wandb` files) and what
`wandb sync --dry-run` says, which needs no token and no network.

Then, for each workdir whose `wandb_undelivered.json` lists artifacts W&B refused
during the run (online or offline), it resumes that W&B run and delivers them,
waiting for the server to commit each; those delivered leave the file (which goes
when empty), those still refused stay with the new reason: running sync again
sends nothing twice. A workdir with only such a record (an online run) is taken too.
"""

import argparse
import datetime
import subprocess
import sys

from mnist_flax import layout
from mnist_flax.errors import MnistFlaxError, TrackingError
from mnist_flax.records import runs
from mnist_flax.tracking import wandb_artifacts, wandb_files, wandb_run

WANDB_SYNC = [sys.executable, "-m", "wandb", "sync"]  # this interpreter's wandb, the one that wrote the files


def segment(run_dir: str) -> dict:
    """What one offline run folder's `.wandb` file says it is: run id, project, entity and start time."""
    path = wandb_files.run_file(run_dir)
    for record in wandb_files.read_records(path):
        if record.WhichOneof("record_type") == "run":
            run, started = record.run, record.run.start_time
            return {
                "folder": run_dir,
                "run_id": run.run_id,
                "project": run.project,
                "entity": run.entity,
                "start": datetime.datetime.fromtimestamp(started.seconds + started.nanos / 1e9, datetime.UTC),
            }
    raise ValueError(f"{path} holds no run record")


def plan(segments: list[dict]) -> list[dict]:
    """The W&B runs that `segment`s make, as `wandb sync` groups them: one per (entity, project, run id), its
    segments in order of start time; the runs in order of their first start."""
    groups: dict[tuple, list[dict]] = {}
    for part in sorted(segments, key=lambda s: s["start"]):  # stable: equal times keep the folders' order
        groups.setdefault((part["entity"], part["project"], part["run_id"]), []).append(part)
    return [{"entity": e, "project": p, "run_id": r, "segments": parts} for (e, p, r), parts in groups.items()]


def describe(planned: list[dict]) -> str:
    """The plan as lines: each W&B run, then each of its segments as `would sync FOLDER (started ...)`."""
    lines = []
    for run in planned:
        where = f"{run['entity'] or '(default entity)'}/{run['project']}/{run['run_id']}"
        count = len(run["segments"])
        lines.append(f"W&B run {where}: {count} segment{'s' * (count != 1)}, in order of start time")
        lines += [f"  would sync {s['folder']} (started {s['start']:%Y-%m-%d %H:%M:%S} UTC)" for s in run["segments"]]
    return "\n".join(lines)


def wandb_dry_run(run_dirs: list[str]) -> subprocess.CompletedProcess:
    """`wandb sync --dry-run` on the folders (this interpreter's wandb): it lists the `.wandb` files it would sync."""
    return subprocess.run([*WANDB_SYNC, "--dry-run", *run_dirs], capture_output=True, text=True, timeout=300)


def undelivered_workdirs(path: str) -> list[str]:
    """The workdirs under `path` (itself, or a sweep root's members) whose record lists undelivered artifacts."""
    workdirs = runs.sweep_members(path) if runs.is_sweep_root(path) else [path]
    return [w for w in workdirs if wandb_artifacts.read_undelivered(w)]


def _check_clean(run_path: str, force: bool) -> None:
    git = runs.load(run_path, history=False, predictions=False).git
    if git.get("dirty", True) and not force:  # no recorded git state: nothing says what reproduces it
        raise MnistFlaxError(
            f"{run_path} was recorded from a dirty tree (commit {git.get('commit', 'unknown')[:12]} plus "
            "uncommitted changes), so its commit does not reproduce it; not synced (--force uploads it)"
        )


def _collect(paths: list[str], force: bool) -> list[tuple[str, list[str], list[str]]]:
    """(path, its offline run folders, its workdirs with undelivered artifacts) for each path, checked:
    MnistFlaxError for a path with neither, or a dirty run."""
    collected = []
    for path in paths:
        dirs = runs.offline_run_folders(path)  # raises for a sweep root whose sweep.json cannot be read
        pending = undelivered_workdirs(path)
        if not dirs and not pending:
            raise MnistFlaxError(f"no offline W&B run, and no undelivered W&B artifact, under {path}")
        for run_path in [*dirs, *(w for w in pending if not runs.offline_run_folders(w))]:
            _check_clean(run_path, force)
        collected.append((path, dirs, pending))
    return collected


def _deliver(workdirs: list[str]) -> int:
    """Delivers each workdir's undelivered artifacts; EXIT_FAILED when any is left undelivered."""
    code = layout.EXIT_OK
    for workdir in workdirs:
        count = len(wandb_artifacts.read_undelivered(workdir))
        print(f"delivering {count} artifact{'s' * (count != 1)} W&B refused during {workdir}", flush=True)
        try:
            delivered, left = wandb_artifacts.deliver(workdir)
        except TrackingError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return layout.EXIT_FAILED
        print(f"delivered {len(delivered)}, left {len(left)}", flush=True)
        if left:
            print(f"warning: {len(left)} still listed in {wandb_artifacts.record_path(workdir)}", file=sys.stderr)
            code = layout.EXIT_FAILED
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mnist_flax sync", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="run workdirs, sweep roots or offline run folders")
    parser.add_argument("--force", action="store_true", help="upload runs recorded as dirty too")
    parser.add_argument("--dry-run", action="store_true", help="check and show the plan, upload nothing")
    args = parser.parse_args(argv)
    try:
        collected = _collect(args.paths, args.force)
        segments = {d: segment(d) for _, dirs, _ in collected for d in dirs}
    except MnistFlaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return layout.EXIT_USAGE
    except (OSError, ValueError) as e:  # a .wandb file that cannot be read
        print(f"error: cannot read a W&B run file: {e}", file=sys.stderr)
        return layout.EXIT_USAGE
    pending = [w for _, _, workdirs in collected for w in workdirs]
    for path, dirs, _ in collected:
        if not runs.is_sweep_root(path) and len({segments[d]["run_id"] for d in dirs}) > 1:
            print(f"warning: {path} holds several W&B run ids: they upload as separate runs", flush=True)
    planned = plan(list(segments.values()))
    ordered = [s["folder"] for run in planned for s in run["segments"]]
    if args.dry_run:
        print(describe(planned), flush=True)
        for workdir in pending:
            for entry in wandb_artifacts.read_undelivered(workdir):
                print(f"would deliver {wandb_artifacts.label(entry)} to run {entry['run_id']} ({entry['why']})")
        if not ordered:
            return layout.EXIT_OK
        result = wandb_dry_run(ordered)
        print("wandb sync --dry-run:\n" + (result.stdout + result.stderr).rstrip(), flush=True)
        if any(len(run["segments"]) > 1 for run in planned):
            print("(wandb counts each .wandb file as a run; the files of one run id upload one after another, "
                  "in order of start time, into that one W&B run)")  # fmt: skip
        return layout.EXIT_OK if result.returncode == 0 else layout.EXIT_USAGE
    if wandb_run.read_token() is None:
        print("error: no W&B token: run `wandb login`, or set WANDB_API_KEY (or WANDB_TOKEN)", file=sys.stderr)
        return layout.EXIT_USAGE
    for run_dir in ordered:
        print(f"syncing {run_dir}", flush=True)
    if ordered:
        code = subprocess.run([*WANDB_SYNC, *ordered], check=False).returncode
        if code != 0:
            return code
    return _deliver(pending)
