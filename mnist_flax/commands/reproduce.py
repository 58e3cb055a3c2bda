"""Reproduce a run from its recorded commit: `python -m mnist_flax reproduce RUN [--workdir DIR] [--force]`.

RUN is anything `mnist_flax.records.runs` reads: a workdir, an offline W&B run folder, or
(with a key) a W&B run path. The run's commit (for a container run, the one baked
into its image) is checked out into a temporary `git worktree` of the repository;
the user's checkout, branch and index are not touched, and the worktree is removed
afterwards, also on Ctrl-C. That commit's own `main.py` trains the recorded
resolved config as it is (a config file that returns `config.json`, no overrides
rebuilt by hand) into a new workdir, from the current directory, so relative
paths in the config mean what they mean to `main.py` here. Then the configs are
diffed (nothing may differ but `wandb.name` and `wandb.mode`), the provenance
compared (different data fails; a different environment, or a reproduction
outside the locked environment that uv.lock pins, is a warning, and fails with
`--strict-environment`) and the metrics put side by side.

Exit status: 0 the reproduction matches, 1 it differs (the last line says what),
2 bad input (one line): no such run, a run that did not finish, a run recorded
from a dirty tree (without `--force`), no recorded commit or one the repository
does not have, no git, a workdir that is not empty, with `--strict-environment` an
interpreter whose packages are not the run's or not those its commit's uv.lock pins
(checked before training), or a reproduction that failed.
"""

import argparse
import contextlib
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass

import numpy as np

from mnist_flax import layout
from mnist_flax.config import diff, schema
from mnist_flax.errors import MnistFlaxError, Preempted
from mnist_flax.records import files, provenance, runs

# Fields the reproduction sets for itself: not part of what is compared.
OWN_FIELDS = ("wandb.name", "wandb.mode")
# Same commit, config, data, versions and number of CPU cores on XLA's CPU backend: bitwise equal (measured: the
# tiny MLP and CNN and one epoch of the MLP on Fashion-MNIST, each reproduced on a loaded 2-core machine). The
# tolerances absorb float noise that leaves the model's behaviour as it was: accuracies, steps and predicted labels
# must be equal; losses agree to LOSS_RTOL relative, the probabilities of predictions.csv (written to 6 decimals) to
# one unit of the last decimal (a rounding flip: the tiny CNN on 1 core against 2 gave test loss 1.6e-7 relative,
# probabilities 1e-6). They are no allowance for another core count: XLA's CPU results depend on how many cores
# the process may use, and one epoch of the MLP on 1 core against 2 ends 0.5 points apart in test accuracy.
LOSS_RTOL = 1e-6
PROB_ATOL = 1e-6
CONFIG_TEMPLATE = '''"""A run's resolved config, as it recorded it: written by mnist_flax.commands.reproduce."""

import json

import ml_collections


def get_config():
    with open({path!r}) as f:
        return ml_collections.ConfigDict(json.load(f))
'''


class ReproduceError(MnistFlaxError):
    """The run cannot be reproduced as asked: one line saying why."""


@dataclass
class Row:
    """One line of the comparison; `match` is None where a side did not record the metric."""

    metric: str
    recorded: str
    reproduced: str
    match: bool | None


# ---------------------------------------------------------------- what to reproduce


def check_reproducible(record: runs.RunRecord, force: bool) -> str:
    """The commit to check out; raises ReproduceError when the run cannot be reproduced from one."""
    if not record.finished:
        raise ReproduceError(f"{record.path} did not finish (status {record.status}): there are no results to compare")
    git = record.git or {}
    commit = str(git.get("commit") or "unknown")
    if git.get("source") == "unknown" or commit == "unknown":
        raise ReproduceError(
            f"{record.path} recorded no commit (no git, no MNIST_FLAX_GIT_COMMIT): nothing to check out"
        )
    if not re.fullmatch(r"[0-9a-fA-F]{7,40}", commit):
        raise ReproduceError(f"{record.path} recorded {commit!r} as its commit, which is not a commit hash")
    if git.get("dirty", True) and not force:
        raise ReproduceError(
            f"{record.path} was recorded from a dirty tree (commit {commit[:12]} plus uncommitted changes): its code "
            "is in no commit; --force reproduces the commit without those changes"
        )
    return commit


def recorded_config(record: runs.RunRecord) -> dict:
    """The resolved config, nested: a workdir's `config.json` as written, else rebuilt from the flat record."""
    path = os.path.join(record.path, layout.CONFIG)
    if record.source == "workdir" and os.path.isfile(path):
        return files.read_json(path)
    nested = {}
    for key, value in record.config.items():
        *groups, leaf = key.split(".")
        node = nested
        for group in groups:
            node = node.setdefault(group, {})
        node[leaf] = value
    return nested


def read_provenance(record: runs.RunRecord) -> dict | None:
    """What produced the run ({"git", "data", "environment"}): the workdir's `provenance.json` (for an offline W&B
    folder, its workdir's), else what `final_metrics.json` holds of it; None for a run that recorded none."""
    folder = record.path
    if record.source == "wandb_offline" and os.path.basename(os.path.dirname(folder)) == layout.WANDB:
        folder = os.path.dirname(os.path.dirname(folder))
    path = os.path.join(folder, layout.PROVENANCE)
    if record.source != "wandb_online" and os.path.isfile(path):
        return files.read_json(path)
    return (record.final or {}).get("provenance")


# ---------------------------------------------------------------- git


def _git(repo: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, timeout=60)


def resolve_commit(repo: str, commit: str) -> str:
    """The full hash of `commit` in the repository holding `repo`; ReproduceError without git or the commit."""
    if shutil.which("git") is None:
        raise ReproduceError("git is not installed: reproducing a run checks out its commit")
    top = _git(repo, "rev-parse", "--show-toplevel")
    if top.returncode != 0:
        raise ReproduceError(f"{repo} is not a git repository (--repo names the one that holds the run's commit)")
    if _git(repo, "cat-file", "-e", f"{commit}^{{commit}}").returncode != 0:
        raise ReproduceError(f"commit {commit} is not in the repository {top.stdout.strip()} (git fetch it first?)")
    return _git(repo, "rev-parse", f"{commit}^{{commit}}").stdout.strip()


@contextlib.contextmanager
def _uninterrupted():
    """Ctrl-C is held off while cleaning up (in the main thread), so a second one leaves nothing behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def worktree(repo: str, commit: str):
    """A temporary folder holding `commit` checked out (detached) as `src/`; removed, worktree and all, on exit."""
    parent = tempfile.mkdtemp(prefix="mnist_flax_reproduce_")
    tree = os.path.join(parent, "src")
    try:
        added = _git(repo, "worktree", "add", "--detach", "--quiet", tree, commit)
        if added.returncode != 0:
            message = (added.stderr.strip().splitlines() or ["git worktree add failed"])[-1]
            raise ReproduceError(f"cannot check out {commit[:12]}: {message}")
        yield parent, tree
    finally:
        with _uninterrupted():
            _git(repo, "worktree", "remove", "--force", tree)
            shutil.rmtree(parent, ignore_errors=True)
            _git(repo, "worktree", "prune")


# ---------------------------------------------------------------- the reproduction


def check_environment(record: runs.RunRecord, tree: str, commit: str) -> None:
    """--strict-environment, before training: this interpreter's Python and packages are the recorded run's and
    the commit's uv.lock pins them all, else ReproduceError (the devices and cores are compared afterwards)."""
    saved = (read_provenance(record) or {}).get("environment")
    if not saved:
        raise ReproduceError(f"{record.path} recorded no environment: --strict-environment has nothing to compare")
    here = provenance.installed_environment(os.path.join(tree, provenance.LOCK_FILE))
    here.update(
        {name: here["packages"].get(name, provenance.NOT_INSTALLED) for name in provenance.ENVIRONMENT_PACKAGES}
    )
    problems = []
    if changed := provenance.compare_environment(saved, here):
        problems.append(f"not the recorded run's ({provenance.describe_changes(changed)})")
    if outside := provenance.describe_unlocked(here):
        problems.append(f"not the one uv.lock of {commit[:12]} pins ({outside})")
    if problems:
        raise ReproduceError(
            f"--strict-environment: this environment is {' and '.join(problems)}; nothing was trained; install "
            f"{commit[:12]}'s uv.lock (`make setup` at that commit) or reproduce without --strict-environment"
        )


def train_at(tree: str, folder: str, record: runs.RunRecord, workdir: str, wandb_mode: str) -> int:
    """Runs the worktree's own main.py on the recorded resolved config; returns its exit status."""
    config_json = os.path.join(folder, layout.CONFIG)
    with open(config_json, "w") as f:
        json.dump(recorded_config(record), f, indent=2)
    config_file = os.path.join(folder, "recorded_config.py")
    with open(config_file, "w") as f:
        f.write(CONFIG_TEMPLATE.format(path=config_json))
    command = [
        sys.executable,
        os.path.join(tree, "main.py"),  # its folder leads sys.path: the commit's library, not this checkout's
        f"--config={config_file}",
        f"--workdir={workdir}",
        f"--config.wandb.name={os.path.basename(workdir)}",
        f"--config.wandb.mode={wandb_mode}",
    ]
    process = subprocess.Popen(command)
    try:
        return process.wait()
    except KeyboardInterrupt:  # the child had the same SIGINT: it saves, closes its writers and exits 3
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        raise


# ---------------------------------------------------------------- comparison


def compare_configs(recorded: runs.RunRecord, reproduced: runs.RunRecord) -> dict:
    """diff.diff of the two resolved configs, without the fields the reproduction sets for itself."""
    a = {k: v for k, v in recorded.config.items() if k not in OWN_FIELDS}
    b = {k: v for k, v in reproduced.config.items() if k not in OWN_FIELDS}
    return diff.diff(a, b)


def compare_provenance(saved: dict | None, current: dict | None) -> tuple[list[str], dict[str, list]] | None:
    """(splits whose data differ, {environment field: [recorded, reproduced]}); None where one side has none."""
    if not saved or not current:
        return None
    return (
        provenance.compare_data(saved.get("data"), current.get("data") or {}),
        provenance.compare_environment(saved.get("environment"), current.get("environment") or {}),
    )


def _text(value) -> str:
    if value is None:
        return "-"
    return f"{value:.10g}" if isinstance(value, float) else str(value)


def _exact(metric: str, a, b) -> Row:
    return Row(metric, _text(a), _text(b), None if a is None or b is None else a == b)


def _close(metric: str, a, b, rtol: float) -> Row:
    if a is None or b is None:
        return Row(metric, _text(a), _text(b), None)
    return Row(metric, _text(a), _text(b), bool(abs(a - b) <= rtol * max(abs(a), abs(b))))


def compare_metrics(recorded: runs.RunRecord, reproduced: runs.RunRecord) -> list[Row]:
    """The commit that ran, steps, best validation, test metrics and the test predictions, side by side."""
    a, b = recorded.final or {}, reproduced.final or {}

    def field(final: dict, group: str, key: str):
        return (final.get(group) or {}).get(key)

    return [
        _commit_row(recorded.git or {}, reproduced.git or {}),
        _exact("steps", a.get("steps"), b.get("steps")),
        _exact("best validation step", field(a, "best_validation", "step"), field(b, "best_validation", "step")),
        _exact("best validation accuracy", recorded.best_val_accuracy, reproduced.best_val_accuracy),
        _close("best validation loss", field(a, "validation", "loss"), field(b, "validation", "loss"), LOSS_RTOL),
        _exact("test accuracy", recorded.test_accuracy, reproduced.test_accuracy),
        _close("test loss", field(a, "test", "loss"), field(b, "test", "loss"), LOSS_RTOL),
        *compare_predictions(recorded.predictions, reproduced.predictions),
    ]


def _commit_row(recorded: dict, reproduced: dict) -> Row:
    """The code that ran: the reproduction's commit must be the recorded one, and clean."""
    a, b = recorded.get("commit") or "", reproduced.get("commit") or ""
    dirty = bool(reproduced.get("dirty"))
    return Row(
        "commit",
        a[:12] or "-",
        (b[:12] or "-") + (" (dirty)" if dirty else ""),
        bool(b) and b.startswith(a) and not dirty,
    )


def compare_predictions(a: dict | None, b: dict | None) -> list[Row]:
    """Predicted labels (equal) and class probabilities (within PROB_ATOL) of the test set."""
    if a is None or b is None:
        return [Row("test predictions", "-" if a is None else "recorded", "-" if b is None else "recorded", None)]
    n = len(a["label"])
    if len(b["label"]) != n or not np.array_equal(a["index"], b["index"]) or not np.array_equal(a["label"], b["label"]):
        return [Row("test predictions", f"{n} examples", f"{len(b['label'])} examples, other labels", False)]
    differ = int(np.sum(a["predicted"] != b["predicted"]))
    gap = float(np.max(np.abs(a["probs"] - b["probs"]))) if a["probs"].shape == b["probs"].shape else float("inf")
    return [
        Row("predicted labels", f"{n} examples", "identical" if not differ else f"{differ} differ", differ == 0),
        Row("probabilities (max abs diff)", "-", f"{gap:.1e}", gap <= PROB_ATOL * (1 + 1e-6)),  # read-back rounding
    ]


def format_rows(rows: list[Row]) -> str:
    """The comparison as an aligned table: metric, recorded, reproduced, match."""
    cells = [("metric", "recorded", "reproduced", "match")]
    cells += [(r.metric, r.recorded, r.reproduced, {True: "yes", False: "NO", None: "n/a"}[r.match]) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(3)]
    return "\n".join(f"{m:<{widths[0]}}  {x:<{widths[1]}}  {y:<{widths[2]}}  {ok}" for m, x, y, ok in cells)


def report(
    recorded: runs.RunRecord, reproduced: runs.RunRecord, allow_different_data: bool, strict_environment: bool = False
) -> list[str]:
    """Prints the config difference, the provenance lines and the metric table; returns what differs (for the
    last line): nothing when the reproduction matches."""
    differs = []
    difference = compare_configs(recorded, reproduced)
    if diff.is_empty(difference):
        print(f"config: equal (apart from {', '.join(OWN_FIELDS)}, which the reproduction sets)")
    else:
        print("config differs:\n" + diff.format_table(difference, "recorded", "reproduced"))
        differs.append("config")
    saved, current = read_provenance(recorded), read_provenance(reproduced)
    compared = compare_provenance(saved, current)
    if compared is None:
        print("provenance: not recorded by both runs (no provenance.json); data and environment not compared")
        if strict_environment:
            differs.append("environment not recorded (--strict-environment)")
    else:
        splits, environment = compared
        if not splits and not environment:
            print("provenance: the same data (train, validation, test) and environment")
        if splits:
            verdict = "warning (--allow-different-data)" if allow_different_data else "differs"
            print(f"data {verdict}: the {', '.join(splits)} split(s) are not the data the run was trained on")
            if not allow_different_data:
                differs.append("data")
        recorded_env, reproduced_env = saved.get("environment"), current.get("environment")
        differs += report_environment(environment, recorded_env, reproduced_env, strict_environment)
    rows = compare_metrics(recorded, reproduced)
    print(format_rows(rows))
    if any(r.match is False for r in rows):
        differs.append("metrics")
    return differs


def report_environment(changed: dict, recorded: dict | None, reproduced: dict | None, strict: bool) -> list[str]:
    """Prints how the environments differ and whether the reproduction's was the locked one (uv.lock pins every
    package); returns what fails the reproduction: with `strict` either, else nothing (warnings)."""
    verdict = "environment differs (--strict-environment)" if strict else "warning"
    failures = []
    if changed:
        listed = provenance.describe_changes(changed)
        print(f"{verdict}: another environment ({listed}): the metrics may differ by more than the tolerances")
        failures.append("another environment")
    if outside := provenance.describe_unlocked(reproduced):
        print(f"{verdict}: the reproduction ran outside the locked environment ({outside})")
        failures.append("outside the locked environment")
    if recorded_outside := provenance.describe_unlocked(recorded):
        print(f"note: the recorded run ran outside its locked environment ({recorded_outside})")
    return [f"{what} (--strict-environment)" for what in failures] if strict else []


# ---------------------------------------------------------------- command line


def _default_workdir(record: runs.RunRecord) -> str:
    return os.path.join("runs", f"reproduce-{record.name}-{datetime.datetime.now():%Y%m%d-%H%M%S}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mnist_flax reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run workdir, an offline W&B run folder, or entity/project/run_id")
    parser.add_argument("--workdir", help="where the reproduction writes (default: runs/reproduce-NAME-TIME)")
    parser.add_argument("--force", action="store_true", help="reproduce a run recorded from a dirty tree")
    parser.add_argument("--repo", default=schema.REPO_ROOT, help="the git repository (default: this code's)")
    parser.add_argument("--wandb-mode", choices=("offline", "disabled"), default="offline", help="the reproduction's")
    parser.add_argument("--allow-different-data", action="store_true", help="report other data as a warning")
    parser.add_argument(
        "--strict-environment",
        action="store_true",
        help="fail when the environment differs or the reproduction ran outside the locked environment (uv.lock)",
    )
    args = parser.parse_args(argv)
    workdir = None
    try:
        recorded = runs.load(args.run)
        commit = resolve_commit(args.repo, check_reproducible(recorded, args.force))
        workdir = os.path.abspath(args.workdir or _default_workdir(recorded))
        if os.path.exists(workdir) and (not os.path.isdir(workdir) or os.listdir(workdir)):
            busy, workdir = workdir, None  # not ours to remove
            raise ReproduceError(f"{busy} exists and is not empty: name a new --workdir")
        if recorded.git.get("dirty"):
            print(f"warning: {recorded.path} was recorded from a dirty tree; reproducing {commit[:12]} without its "
                  "uncommitted changes (--force)", flush=True)  # fmt: skip
        source = {"environment": "the commit baked into its container image"}.get(recorded.git.get("source"), "git")
        print(f"reproducing {recorded.path} at {commit[:12]} ({source}) into {workdir}", flush=True)
        with worktree(args.repo, commit) as (folder, tree):
            if args.strict_environment:
                check_environment(recorded, tree, commit)
            status = train_at(tree, folder, recorded, workdir, args.wandb_mode)
        if status != 0:
            why = "was stopped (SIGTERM or SIGINT)" if status == Preempted.exit_code else "failed"
            raise ReproduceError(f"the reproduction at {commit[:12]} {why}: exit status {status}; nothing compared")
        differs = report(recorded, runs.load(workdir), args.allow_different_data, args.strict_environment)
    except MnistFlaxError as e:
        _remove_half(workdir)
        print(f"error: {e}", file=sys.stderr)
        return layout.EXIT_USAGE
    except KeyboardInterrupt:
        _remove_half(workdir)
        print("error: interrupted", file=sys.stderr)
        return 130
    print(f"reproduction DIFFERS ({', '.join(differs)}): {workdir}" if differs else f"reproduction matches: {workdir}")
    return layout.EXIT_DIFFERENT if differs else layout.EXIT_OK


def _remove_half(workdir: str | None) -> None:
    """Removes a reproduction's workdir that did not finish (it was absent or empty before)."""
    if workdir and os.path.isdir(workdir) and not os.path.isfile(os.path.join(workdir, layout.FINAL_METRICS)):
        with _uninterrupted():
            shutil.rmtree(workdir, ignore_errors=True)
