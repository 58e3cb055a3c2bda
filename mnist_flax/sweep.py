"""A local sweep that needs no W&B server: train every combination, then compare.

  python -m mnist_flax.sweep --config=configs/cnn.py \\
      --grid model.name=cnn,mlp --grid optimizer.learning_rate=0.001,0.01 \\
      --set num_epochs=1 --root runs/sweep-lr

Each combination trains as its own `main.py` process, one after another, in
ROOT/NN-VALUES/, as an offline W&B run grouped under ROOT's name (upload them
later with launch/sync.sh). `--runs FILE` adds override sets from a file, one
run per line (`FIELD=VALUE ...`, `#` comments); with `--grid` too, every line is
crossed with every grid point. Every combination is checked against the config
before anything trains. Running the same command again skips the runs that
finished and resumes the others. At the end a table shows the fields that
differ between the runs and each run's best validation and test accuracy (also
written to ROOT/summary.json).

Exit status: 0 when every run finished, 1 when any failed, 2 for bad arguments.
"""

import argparse
import datetime
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from mnist_flax import config_diff, config_utils, overrides
from mnist_flax import runs as run_records
from mnist_flax.errors import ConfigError, MnistFlaxError

# Overrides the runner adds to every run; they differ by design, so the table leaves them out.
RUNNER_FIELDS = ("wandb.name", "wandb.group")
ABSENT = "(absent)"


@dataclass
class Run:
    """One planned training: its overrides (field -> value text) and its workdir."""

    index: int
    overrides: dict[str, str]
    name: str
    workdir: str
    status: str = "pending"
    exit_code: int | None = None
    seconds: float = 0.0
    message: str = ""
    extra: dict[str, str] = field(default_factory=dict)  # the runner's own overrides
    planned: dict = field(default_factory=dict)  # the flat config it should train with

    def arguments(self) -> list[str]:
        """Its `--config.FIELD=VALUE` arguments for main.py."""
        return [f"--config.{k}={v}" for k, v in {**self.overrides, **self.extra}.items()]


def split_values(text: str) -> list[str]:
    """Splits `a,b,(1,2)` on the commas outside brackets and quotes: ['a', 'b', '(1,2)']."""
    values, current, depth, quote = [], [], 0, ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    if quote or depth:
        raise ConfigError(f"unbalanced brackets or quotes in {text!r}")
    values.append("".join(current).strip())
    return values


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """The --grid options: field -> its values, in the order given."""
    grid = {}
    for item in items:
        name, text = overrides.parse_assignment(item, "--grid")
        values = split_values(text)
        if any(not v for v in values):
            raise ConfigError(f"--grid {item!r}: empty value (expected FIELD=V1,V2,...)")
        if name in grid:
            raise ConfigError(f"--grid {name} is given twice; list all its values in one --grid")
        grid[name] = values
    return grid


def read_runs_file(path: str) -> list[dict[str, str]]:
    """Override sets from a file: one run per line, `FIELD=VALUE` pairs; `#` starts a comment."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ConfigError(f"--runs {path}: {e.strerror}") from None
    run_sets = []
    for number, line in enumerate(lines, 1):
        try:
            words = shlex.split(line, comments=True)
        except ValueError as e:
            raise ConfigError(f"{path}:{number}: {e}") from None
        if words:
            run_sets.append(dict(overrides.parse_assignment(word, f"{path}:{number}:") for word in words))
    if not run_sets:
        raise ConfigError(f"--runs {path}: no runs in the file")
    return run_sets


def combinations(fixed: dict, run_sets: list[dict], grid: dict) -> list[dict[str, str]]:
    """Every run's overrides: the fixed ones, one run set, one grid point."""
    combos = []
    for run_set in run_sets or [{}]:
        for point in itertools.product(*grid.values()):
            grid_values = dict(zip(grid, point, strict=True))
            for name in (fixed.keys() & run_set.keys()) | (fixed.keys() & grid_values.keys()):
                raise ConfigError(f"{name} is both fixed by --set and varied by the sweep")
            combos.append({**fixed, **run_set, **grid_values})
    return combos


def run_name(index: int, varied: dict[str, str]) -> str:
    """A folder name: the index and the varied values, e.g. `01-mlp-0.01`."""
    values = "-".join(re.sub(r"[^A-Za-z0-9.+_]+", "_", v).strip("_") for v in varied.values())
    return f"{index:02d}-{values[:60]}".rstrip("-")


def resolve_config(spec: str) -> str:
    """`path[:arg]` with the path made absolute (main.py runs from the repository root)."""
    path, sep, arg = spec.partition(":")
    if not os.path.isfile(path) and os.path.isfile(os.path.join(config_utils.REPO_ROOT, path)):
        path = os.path.join(config_utils.REPO_ROOT, path)
    return os.path.abspath(path) + sep + arg


def plan(config_spec: str, combos: list[dict], fixed: dict, root: str, wandb_mode: str) -> list[Run]:
    """Checks each combination against the config file; returns the runs (nothing trains yet)."""
    base = config_utils.flatten(config_utils.load_config_file(config_spec))
    group = os.path.basename(os.path.abspath(root))
    runs = []
    for index, combo in enumerate(combos):
        varied = {k: v for k, v in combo.items() if k not in fixed}
        name = run_name(index, varied)
        extra = {"wandb.mode": wandb_mode, "wandb.group": group, "wandb.name": f"{group}/{name}"}
        extra = {k: v for k, v in extra.items() if k not in combo}
        run = Run(index, combo, name, os.path.join(root, name), extra=extra)
        try:
            run.planned = overrides.apply(base, run.arguments())
            config_utils.validate(run.planned)
        except ConfigError as e:
            described = " ".join(f"{k}={v}" for k, v in varied.items()) or "(no overrides)"
            raise ConfigError(f"run {index} ({described}): {e}") from None
        runs.append(run)
    return runs


def check_root(root: str, config_spec: str, runs: list[Run]) -> None:
    """Records the sweep in ROOT/sweep.json; refuses a root that holds a different sweep."""
    record = {"config": config_spec, "runs": [{"name": r.name, "overrides": r.arguments()} for r in runs]}
    path = os.path.join(root, "sweep.json")
    if os.path.exists(path):
        with open(path) as f:
            if json.load(f) != record:
                raise ConfigError(f"{root} already holds a different sweep (see {path}); choose another --root")
        return
    os.makedirs(root, exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=2)


def train(run: Run, config_spec: str, verbose: bool, timeout: float | None) -> None:
    """Runs main.py for one run; its output goes to WORKDIR/sweep.log (and the terminal with -v)."""
    record = member_record(run)
    if record is not None and record.finished:
        run.status = "ok (earlier)"
        return
    os.makedirs(run.workdir, exist_ok=True)
    command = [sys.executable, "main.py", f"--config={config_spec}", f"--workdir={os.path.abspath(run.workdir)}"]
    command += run.arguments()
    tail = deque(maxlen=20)
    start = time.monotonic()
    with open(os.path.join(run.workdir, "sweep.log"), "a") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        process = subprocess.Popen(
            command,
            cwd=config_utils.REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        # SIGTERM: main.py saves a checkpoint and stops; a rerun of the sweep resumes it.
        timed_out = threading.Event()

        def stop() -> None:
            timed_out.set()
            process.terminate()

        watchdog = threading.Timer(timeout, stop) if timeout else None
        if watchdog:
            watchdog.start()
        try:
            for line in process.stdout:
                log.write(line)
                tail.append(line.rstrip())
                if verbose:
                    print(f"  | {line}", end="", flush=True)
            run.exit_code = process.wait()
        except KeyboardInterrupt:
            process.wait()  # the child got the same SIGINT and stops the same way
            raise
        finally:
            if watchdog:
                watchdog.cancel()
    run.seconds = time.monotonic() - start
    run.status = "ok" if run.exit_code == 0 else f"FAILED (exit {run.exit_code})"
    if timed_out.is_set():
        run.status = f"FAILED (stopped after the {timeout:g} s timeout)"
    if run.exit_code != 0:
        errors = [line for line in tail if line.startswith("error:")]
        run.message = (errors or [line for line in tail if line.strip()] or ["no output"])[-1][:300]


def member_record(run: Run) -> run_records.RunRecord | None:
    """The run's record (config, status, final report), None before it wrote its config."""
    try:
        return run_records.load(run.workdir, history=False, predictions=False)
    except ConfigError:  # not trained (yet), or failed before writing config.json
        return None


def summary_rows(runs: list[Run]) -> tuple[list[str], list[dict]]:
    """The fields that differ between the runs, and one row per run with values and accuracies."""
    records = [member_record(run) for run in runs]
    # The requested config (file and overrides, "auto" as given), like `planned` for a run not trained yet.
    flats = [
        {k: v for k, v in (record.requested_config if record else run.planned).items() if k not in RUNNER_FIELDS}
        for run, record in zip(runs, records, strict=True)
    ]
    fields = []
    for other in flats[1:]:
        difference = config_diff.diff(flats[0], other)
        for name in [*difference["changed"], *difference["added"], *difference["removed"]]:
            if name not in fields:
                fields.append(name)
    order = {name: i for i, name in enumerate(runs[0].overrides)} if runs else {}
    fields.sort(key=lambda name: (order.get(name, len(order)), name))
    rows = []
    for run, record, flat in zip(runs, records, flats, strict=True):
        rows.append(
            {
                "run": run.name,
                "workdir": run.workdir,
                "config": {name: flat.get(name, ABSENT) for name in fields},
                "best_val_accuracy": record.best_val_accuracy if record else None,
                "test_accuracy": record.test_accuracy if record else None,
                "status": run.status,
                "seconds": round(run.seconds, 1),
                "error": run.message,
            }
        )
    return fields, rows


def format_summary(fields: list[str], rows: list[dict]) -> str:
    """The comparison table as aligned text."""

    def value(v) -> str:
        return v if isinstance(v, str) else json.dumps(v)

    def accuracy(v) -> str:
        return "-" if v is None else f"{v:.4f}"

    header = ["run", *fields, "best val acc", "test acc", "status"]
    table = [
        [row["run"], *(value(row["config"][f]) for f in fields)]
        + [accuracy(row["best_val_accuracy"]), accuracy(row["test_accuracy"]), row["status"]]
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [header, *table]) for i in range(len(header))]

    def join(cells: list[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([join(header), join(["-" * width for width in widths]), *map(join, table)])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mnist_flax.sweep",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="config file every run starts from, e.g. configs/cnn.py")
    parser.add_argument(
        "--grid", action="append", default=[], metavar="FIELD=V1,V2,...", help="a field and its values (repeatable)"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="an override for every run (repeatable)"
    )
    parser.add_argument("--runs", metavar="FILE", help="override sets, one run per line: FIELD=VALUE ...")
    parser.add_argument("--root", help="folder of the sweep's workdirs (default: runs/sweep-TIMESTAMP)")
    parser.add_argument(
        "--wandb-mode",
        default="offline",
        choices=("offline", "online", "disabled"),
        help="W&B mode of the runs, unless --set wandb.mode=... (default: offline)",
    )
    parser.add_argument("--timeout", type=float, help="stop a run after this many seconds")
    parser.add_argument("--dry-run", action="store_true", help="check and list the runs, train nothing")
    parser.add_argument("-v", "--verbose", action="store_true", help="show each run's output as it trains")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = args.root or os.path.join("runs", f"sweep-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    try:
        grid = parse_grid(args.grid)
        fixed = dict(overrides.parse_assignment(item, "--set") for item in args.set)
        run_sets = read_runs_file(args.runs) if args.runs else []
        if not grid and not run_sets:
            raise ConfigError("nothing to sweep: give --grid FIELD=V1,V2,... and/or --runs FILE")
        config_spec = resolve_config(args.config)
        runs = plan(config_spec, combinations(fixed, run_sets, grid), fixed, root, args.wandb_mode)
        if not args.dry_run:
            check_root(root, args.config, runs)
    except (MnistFlaxError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    print(f"sweep of {len(runs)} run(s) from {args.config} in {root}", flush=True)
    interrupted = False
    for run in runs:
        described = " ".join(f"{k}={v}" for k, v in run.overrides.items() if k not in fixed)
        print(f"[{run.index + 1}/{len(runs)}] {described} -> {run.workdir}", flush=True)
        if args.dry_run:
            run.status = "planned"
            continue
        try:
            train(run, config_spec, args.verbose, args.timeout)
        except KeyboardInterrupt:
            run.status, interrupted = "interrupted", True
            break
        timing = f" in {run.seconds:.0f} s" if run.seconds else ""
        print(f"  {run.status}{timing}" + (f": {run.message}" if run.message else ""), flush=True)

    fields, rows = summary_rows(runs)
    print()
    print(format_summary(fields, rows))
    if not args.dry_run:
        with open(os.path.join(root, "summary.json"), "w") as f:
            json.dump({"fields": fields, "runs": rows}, f, indent=2, default=str)
        print(f"\nsummary: {os.path.join(root, 'summary.json')}")
        finished = [row["workdir"] for row in rows if row["status"].startswith("ok")]
        if len(finished) >= 2:
            print(f"compare two runs' configs: python -m mnist_flax.config_diff {finished[0]} {finished[-1]}")
    if interrupted:
        return 130
    return 1 if any(run.status.startswith("FAILED") for run in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
