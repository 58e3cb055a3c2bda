"""Sweeps on Optuna, from one laptop to many machines: no W&B server needed.

  python -m mnist_flax sweep --config=configs/cnn.py \\
      --grid model.name=cnn,mlp --grid optimizer.learning_rate=0.001,0.01 \\
      --set num_epochs=1 --root runs/sweep-lr
  python -m mnist_flax sweep --config=configs/cnn.py --sweep=lr --sampler tpe --trials 20 \\
      --pruner median --root runs/sweep-tpe            # the config file's sweep_lr() space

The search space comes from the config file (`--sweep` takes its `sweep()`,
`--sweep=NAME` its `sweep_NAME()`; see mnist_flax/sweeps/search_space.py) or the
command line (`--grid FIELD=V1,V2,...`, `--uniform FIELD=LOW,HIGH`,
`--log-uniform FIELD=LOW,HIGH`; `--runs FILE` adds a choice of override sets,
one per line). Grid sampling trains every point; random and TPE sampling train
`--trials` points. Each trial is `main.py` in ROOT/NNN-VALUES/ (an offline W&B
run grouped under the study's name) and reports each epoch's validation
accuracy to the study, so a pruner can stop a poor trial early. The objective
is the best validation accuracy.

The study lives in SQLite at ROOT/study.db unless `--storage URL` names another
(any SQLAlchemy URL Optuna takes; without `--storage`, the environment's
MNIST_FLAX_STORAGE): start the same command on as many machines as you like
and they share the trials. Running the command again continues the study:
finished trials are kept, and the trial of a worker that died is trained again
from its last checkpoint. At the end, `compare`'s table of the trials in ROOT
(also in ROOT/summary.json).

Keep the database's password off the command line, where ps, the shell history
and a Slurm job's record show it: give `postgresql://user@host/db` and put the
password in ~/.pgpass (`host:port:db:user:password`, mode 0600) or PGPASSWORD,
where PostgreSQL's client library finds it for the worker and for each trial
(or put the whole URL in MNIST_FLAX_STORAGE). A password in `--storage` still
works, with a warning.

The study's storage may go away for a while (a database restart or failover):
the worker waits for it up to --storage-patience seconds, saying so in one
line when it goes and one when it is back, while its trial trains on (its
per-epoch reports are delivered late, and it is not pruned meanwhile).

Exit status: 0 when every trial finished or was pruned, 1 when any failed, 2
for bad arguments, 3 when the worker was stopped (SIGTERM; its trial is queued
again), 5 when the storage stayed away longer than --storage-patience (the
trial in progress was stopped with a checkpoint: run the same command again),
130 on Ctrl-C.
"""

import argparse
import datetime
import json
import os
import signal
import sys

from mnist_flax import layout
from mnist_flax.commands import compare
from mnist_flax.config import overrides, schema
from mnist_flax.errors import ConfigError, MnistFlaxError, StorageUnavailable
from mnist_flax.records import files, runs
from mnist_flax.sweeps import search_space, study
from mnist_flax.sweeps.worker import SIGNAL_EXIT, Worker

SAMPLER_METHODS = {"grid": "grid", "random": "random", "tpe": "bayes"}  # ours -> W&B's sweep method


# ---------------------------------------------------------------- the plan


def resolve_config(spec: str) -> str:
    """`path[:arg]` with the path made absolute (main.py runs from the repository root)."""
    path, sep, arg = spec.partition(":")
    if not os.path.isfile(path) and os.path.isfile(os.path.join(schema.REPO_ROOT, path)):
        path = os.path.join(schema.REPO_ROOT, path)
    return os.path.abspath(path) + sep + arg


def declared_space(args, config_spec: str, base: dict) -> dict:
    """The search space of the config file's sweep function and the command line, checked against the config."""
    space = search_space.from_config_file(config_spec, args.sweep) if args.sweep is not None else {}
    sources = [search_space.from_command_line(base, args.grid, args.uniform, args.log_uniform)]
    if args.runs:
        sources.append(search_space.from_runs_file(args.runs))
    for source in sources:
        for name in source.keys() & space.keys():
            raise ConfigError(f"{name} is declared twice (the config file's sweep function and the command line)")
        space.update(source)
    if not space:
        raise ConfigError("nothing to sweep: give --sweep[=NAME], --grid FIELD=V1,V2,..., --uniform or --runs FILE")
    return search_space.normalise(space, base)


def make_plan(args, base: dict, space: dict, fixed: dict) -> tuple[dict, list[dict]]:
    """What the study records (every worker must bring the same) and each planned trial's fixed parameters."""
    for name in fixed.keys() & space.keys():
        raise ConfigError(f"{name} is both fixed by --set and varied by the sweep")
    if args.trials is not None and args.trials < 1:
        raise ConfigError(f"--trials must be at least 1 (how many trials the study trains), not {args.trials}")
    sampler = args.sampler or ("grid" if search_space.is_grid(space) and not args.trials else "tpe")
    if sampler == "grid":
        if not search_space.is_grid(space):
            ranged = next(name for name, spec in space.items() if "values" not in spec)
            raise ConfigError(f"--sampler grid needs a list of values for every field; {ranged} is a range")
        if args.trials:
            raise ConfigError("--trials is for random and TPE sampling; a grid trains each of its points once")
        planned = search_space.grid_points(space)
    else:
        if not args.trials or args.trials < 1:
            raise ConfigError(f"--sampler {sampler} needs --trials N (how many trials the study trains)")
        planned = [{} for _ in range(args.trials)]
    pruner = {"name": args.pruner, "startup_trials": args.prune_startup, "warmup_epochs": args.prune_warmup}
    plan = {
        "config": args.config,
        "space": space,
        "fixed": fixed,
        "sampler": sampler,
        "seed": args.seed,
        "trials": len(planned),
        "pruner": pruner,
        "metric": study.METRIC,
    }
    planned = [{name: search_space.optuna_choice(v) for name, v in point.items()} for point in planned]
    return json.loads(json.dumps(plan)), planned


def check_points(base: dict, space: dict, fixed: dict, planned: list[dict]) -> None:
    """Every grid point (or every choice and both ends of every range) is a config the runs accept."""
    points = planned if planned and planned[0] else search_space.corners(space)
    for index, point in enumerate(points):
        try:
            schema.validate(overrides.apply(base, {**fixed, **search_space.assignments(point)}))
        except ConfigError as e:
            where = f"trial {index}" if planned and planned[0] else "the search space"
            raise ConfigError(f"{where} ({search_space.describe(point)}): {e}") from None


def check_root(root: str, record: dict) -> None:
    """Records the sweep in ROOT/sweep.json; refuses a root that holds another sweep."""
    if os.path.exists(root) and not os.path.isdir(root):
        raise ConfigError(f"--root {root} is a file, not a folder: name a folder for the trials' workdirs")
    path = os.path.join(root, layout.SWEEP)
    if os.path.exists(path):
        existing = files.read_json(path)
        if _same_storage_named(existing) != _same_storage_named(record):
            raise ConfigError(f"{root} already holds a different sweep (see {path}); choose another --root")
        return
    os.makedirs(root, exist_ok=True)
    files.write_json(path, record)


def _same_storage_named(record: dict) -> dict:
    """The record with its storage URL's password left out: a URL given with one or without is the same storage."""
    storage = record.get("storage")
    return {**record, "storage": study.without_password(storage)} if isinstance(storage, str) else record


def wandb_sweep_file(space: dict, sampler: str, config: str) -> str:
    """The W&B sweep file of this space (`launch/sweep.yaml` is this, for configs/default.py's sweep())."""
    import yaml  # noqa: PLC0415 (only this option needs it)

    body = {
        "program": "launch/sweep_run.sh",
        "name": "mnist-flax-sweep",
        "method": SAMPLER_METHODS[sampler],
        "metric": {"name": study.METRIC, "goal": "maximize"},
        "parameters": search_space.wandb_parameters(space),
        "command": ["${env}", "bash", "${program}", "${args}"],
    }
    header = (
        f"# A W&B sweep, generated from {config}'s search space by\n"
        f"#   python -m mnist_flax sweep --config={config} --sweep --wandb-yaml > launch/sweep.yaml\n"
        "# (tests/test_sweep.py checks that it still is). Create it and start agents with launch/sweep.sh;\n"
        '# each parameter is a config field with a "config." prefix, which the agent passes to main.py as\n'
        "# --config.FIELD=VALUE; launch/sweep_run.sh gives each run its own workdir.\n"
    )
    return header + yaml.safe_dump(body, sort_keys=False, default_flow_style=None)


# ---------------------------------------------------------------- the closing table


def summarise(the_study, root: str) -> tuple[str, dict]:
    """compare's table of the trials in ROOT, and the study's counts and best trial."""
    records, errors = compare.gather([root]) if runs.is_sweep_root(root) else ([], [])
    fields, rows = compare.build_rows(records) if records else ([], [])
    states = study.counts(the_study)
    attempts = study.latest_attempts(the_study)
    done = [t for t in attempts if t.state.name == "COMPLETE"]
    best = max(done, key=lambda t: t.value) if done else None
    # A pruned trial's values are intermediate (it stopped before its last epoch): listed for what they are.
    pruned = [
        {"number": t.number, "epoch": epoch, "value": t.intermediate_values[epoch], "params": t.params,
         "workdir": t.user_attrs.get("workdir")}
        for t in attempts if t.state.name == "PRUNED" and t.intermediate_values
        for epoch in [max(t.intermediate_values)]
    ]  # fmt: skip
    best_pruned = max(pruned, key=lambda p: p["value"]) if pruned else None
    lines = [compare.format_table(fields, rows)] if rows else []
    lines += [f"error: {e}" for e in errors]
    here = len(rows)
    total = sum(states.values())
    lines.append(
        f"study {the_study.study_name}: {', '.join(f'{n} {s}' for s, n in sorted(states.items()))}"
        + (f" ({total - here} trained elsewhere)" if total > here else "")
    )
    if best is not None:
        lines.append(
            f"best: trial {best.number}, {study.METRIC} {best.value:.4f}, "
            f"{search_space.describe(best.params)} ({best.user_attrs.get('workdir', '?')})"
        )
    if best_pruned is not None and (best is None or best_pruned["value"] > best.value):
        lines.append(
            f"pruned trial {best_pruned['number']} had val acc {best_pruned['value']:.4f} at epoch "
            f"{best_pruned['epoch']} (an intermediate value: it stopped early), above every finished trial"
        )
    summary = {
        "study": the_study.study_name,
        "states": states,
        "pruned": pruned,
        "best": None if best is None else {"number": best.number, "value": best.value, "params": best.params,
                                           "workdir": best.user_attrs.get("workdir")},
        "fields": fields,
        "runs": rows,
    }  # fmt: skip
    return "\n".join(lines), summary


# ---------------------------------------------------------------- the command


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mnist_flax sweep",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--config", required=True, help="config file every trial starts from, e.g. configs/cnn.py")
    add("--sweep", nargs="?", const="", metavar="NAME", help="the config file's sweep() (or sweep_NAME()) space")
    add("--grid", action="append", default=[], metavar="FIELD=V1,V2,...", help="a field and its values")
    add("--uniform", action="append", default=[], metavar="FIELD=LOW,HIGH", help="a range (ints: int range)")
    add("--log-uniform", action="append", default=[], metavar="FIELD=LOW,HIGH", help="a range on a log scale")
    add("--runs", metavar="FILE", help="override sets, one trial choice per line: FIELD=VALUE ...")
    add("--set", action="append", default=[], metavar="FIELD=VALUE", help="an override for every trial")
    add("--sampler", choices=study.SAMPLERS, help="default: grid for a space of values, else tpe")
    add("--trials", type=int, help="how many trials random or TPE sampling trains (all workers together)")
    add(
        "--storage-patience",
        type=float,
        default=300.0,
        metavar="S",
        help="how long an outage of the study's storage is waited out, trials training on (default 300)",
    )
    add("--seed", type=int, default=0, help="the sampler's seed (trial N samples with seed+N; default 0)")
    add("--pruner", choices=study.PRUNERS, default="median", help="stops poor trials early (default: median)")
    add("--prune-startup", type=int, default=3, metavar="N", help="trials to finish before pruning (default 3)")
    add("--prune-warmup", type=int, default=0, metavar="EPOCHS", help="epochs a trial always trains (default 0)")
    add("--root", help="folder of the trials' workdirs (default: runs/sweep-TIMESTAMP)")
    add(
        "--storage",
        metavar="URL",
        help="the study's database (default: $MNIST_FLAX_STORAGE, else sqlite:///ROOT/study.db); "
        "wins over the variable",
    )
    add("--study", metavar="NAME", help="the study's name (default: ROOT's name; also the W&B group)")
    add("--wandb-mode", default="offline", choices=("offline", "online", "disabled"), help="the trials' W&B mode")
    add("--timeout", type=float, help="stop a trial after this many seconds (it fails)")
    add("--heartbeat", type=float, default=60.0, metavar="S", help="a dead worker's trial is retried after 2xS")
    add("--dry-run", action="store_true", help="check and list the plan, train nothing")
    add("--wandb-yaml", action="store_true", help="print the W&B sweep file of this space and stop")
    add("-v", "--verbose", action="store_true", help="show each trial's output as it trains")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.storage and study.has_password(args.storage):
        print(study.PASSWORD_IN_ARGV, file=sys.stderr, flush=True)
    root = args.root or os.path.join("runs", f"sweep-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    name = args.study or os.path.basename(os.path.abspath(root))
    try:
        config_spec = resolve_config(args.config)
        base = schema.flatten(schema.load_config_file(config_spec))
        fixed = dict(overrides.parse_assignment(item, "--set") for item in args.set)
        space = declared_space(args, config_spec, base)
        plan, planned = make_plan(args, base, space, fixed)
        check_points(base, space, fixed, planned)
        if args.wandb_yaml:
            print(wandb_sweep_file(space, plan["sampler"], args.config), end="")
            return 0
        if args.heartbeat <= 0:
            raise ConfigError("--heartbeat must be positive")
        if args.storage_patience < 0:
            raise ConfigError("--storage-patience must be 0 or more seconds")
        url, given_as = study.storage_url(root, args.storage)
        print(f"study {name}: {plan['trials']} trial(s), {plan['sampler']} sampling, {args.pruner} pruning, "
              f"in {study.shown_url(url)}; workdirs in {root}", flush=True)  # fmt: skip
        if args.dry_run:
            for index, point in enumerate(planned):
                print(f"[{index + 1}/{len(planned)}] {search_space.describe(point) or '(sampled)'}")
            return 0
        check_root(root, {"study": name, "storage": study.shown_url(url), "plan": plan})
        storage = study.open_storage(url, args.heartbeat, given_as)
        the_study = study.open_study(storage, name, plan, planned)
    except (MnistFlaxError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return layout.EXIT_USAGE

    worker = Worker(args, the_study, storage, url, plan, config_spec, root)
    previous = {sig: signal.signal(sig, worker.stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        worker.run()
        table, summary = worker.patience.call(summarise, the_study, root)
    except StorageUnavailable as e:
        print(
            f"error: {e}; the trial in progress was stopped with a checkpoint and resumes from it: run the same "
            "command again once the storage is back",
            file=sys.stderr,
        )
        return StorageUnavailable.exit_code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print()
    print(table)
    files.write_json(os.path.join(root, layout.SUMMARY), summary)
    print(f"\nsummary: {os.path.join(root, 'summary.json')}")
    if worker.stopped:
        print(f"stopped by {worker.stopped}; run the same command again to continue the study", file=sys.stderr)
        return SIGNAL_EXIT[worker.stopped]
    return layout.EXIT_FAILED if summary["states"].get("fail") else layout.EXIT_OK
