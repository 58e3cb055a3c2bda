"""Sweeps on Optuna, from one laptop to many machines: no W&B server needed.

  python -m mnist_flax.sweep --config=configs/cnn.py \\
      --grid model.name=cnn,mlp --grid optimizer.learning_rate=0.001,0.01 \\
      --set num_epochs=1 --root runs/sweep-lr
  python -m mnist_flax.sweep --config=configs/cnn.py --sweep=lr --sampler tpe --trials 20 \\
      --pruner median --root runs/sweep-tpe            # the config file's sweep_lr() space

The search space comes from the config file (`--sweep` takes its `sweep()`,
`--sweep=NAME` its `sweep_NAME()`; see mnist_flax/search_space.py) or the
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
import codecs
import datetime
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque

from mnist_flax import compare, config_utils, overrides, runs, search_space, study
from mnist_flax.errors import ConfigError, MnistFlaxError, Preempted, Pruned, StorageUnavailable

SAMPLER_METHODS = {"grid": "grid", "random": "random", "tpe": "bayes"}  # ours -> W&B's sweep method
SIGNAL_EXIT = {"SIGTERM": 3, "SIGINT": 130}


# ---------------------------------------------------------------- the plan


def resolve_config(spec: str) -> str:
    """`path[:arg]` with the path made absolute (main.py runs from the repository root)."""
    path, sep, arg = spec.partition(":")
    if not os.path.isfile(path) and os.path.isfile(os.path.join(config_utils.REPO_ROOT, path)):
        path = os.path.join(config_utils.REPO_ROOT, path)
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
            config_utils.validate(overrides.apply(base, {**fixed, **search_space.assignments(point)}))
        except ConfigError as e:
            where = f"trial {index}" if planned and planned[0] else "the search space"
            raise ConfigError(f"{where} ({search_space.describe(point)}): {e}") from None


def check_root(root: str, record: dict) -> None:
    """Records the sweep in ROOT/sweep.json; refuses a root that holds another sweep."""
    if os.path.exists(root) and not os.path.isdir(root):
        raise ConfigError(f"--root {root} is a file, not a folder: name a folder for the trials' workdirs")
    path = os.path.join(root, "sweep.json")
    if os.path.exists(path):
        try:
            with open(path) as f:
                existing = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read {path}: {e}") from None
        if _same_storage_named(existing) != _same_storage_named(record):
            raise ConfigError(f"{root} already holds a different sweep (see {path}); choose another --root")
        return
    os.makedirs(root, exist_ok=True)
    _write_json(path, record)


def _same_storage_named(record: dict) -> dict:
    """The record with its storage URL's password left out: a URL given with one or without is the same storage."""
    storage = record.get("storage")
    return {**record, "storage": study.without_password(storage)} if isinstance(storage, str) else record


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path: str, payload) -> None:
    """Atomically, and safely beside other workers writing the same file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    os.replace(tmp, path)


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
        f"#   python -m mnist_flax.sweep --config={config} --sweep --wandb-yaml > launch/sweep.yaml\n"
        "# (tests/test_sweep.py checks that it still is). Create it and start agents with launch/sweep.sh;\n"
        '# each parameter is a config field with a "config." prefix, which the agent passes to main.py as\n'
        "# --config.FIELD=VALUE; launch/sweep_run.sh gives each run its own workdir.\n"
    )
    return header + yaml.safe_dump(body, sort_keys=False, default_flow_style=None)


# ---------------------------------------------------------------- one trial


class Worker:
    """Takes queued trials and trains each as its own main.py until the study has none left."""

    def __init__(self, args, the_study, storage, url: str, plan: dict, config_spec: str, root: str):
        self.args, self.study, self.storage, self.url = args, the_study, storage, url
        self.plan, self.config_spec, self.root = plan, config_spec, root
        self.stopped = None  # "SIGTERM" or "SIGINT" once asked to stop
        self.process = None
        # Every storage call goes through it: an outage up to --storage-patience is waited out.
        self.patience = study.Patience(args.storage_patience)
        self.storage_lost = False

    def lose_storage(self) -> None:
        """The storage stayed away past the patience while a trial trained: stop it with a checkpoint."""
        self.storage_lost = True
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, signum, frame) -> None:
        self.stopped = signal.Signals(signum).name
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # it saves a checkpoint; its retry resumes from it

    def run(self) -> None:
        call = self.patience.call
        waiting_said = False
        while not self.stopped:
            taken = study.take_trial(self.study, self.storage, self.plan["sampler"], self.plan["seed"], call)
            if taken is None:
                # A dead worker's trial: failed now, its retry queued. Not right after an outage, when the
                # other workers' heartbeats are as late as this worker's view of them: their trials are alive.
                if self.patience.steady(2 * self.args.heartbeat + 5):
                    call(study.fail_stale, self.study)
                states = call(study.counts, self.study)
                if states.get("waiting"):
                    continue
                if not states.get("running"):
                    return
                if not waiting_said:
                    print(f"waiting for {states['running']} trial(s) running on other workers", flush=True)
                    waiting_said = True
                time.sleep(min(self.args.heartbeat, 5.0))
                continue
            waiting_said = False
            self.train(*taken)

    def train(self, trial, trial_id: int) -> None:
        call = self.patience.call
        params = call(search_space.suggest, trial, self.plan["space"])
        number = call(study.original_number, self.storage, trial_id)
        name = search_space.folder_name(number, params)
        workdir = os.path.join(self.root, name)
        group = self.study.study_name
        extra = {"wandb.mode": self.args.wandb_mode, "wandb.group": group, "wandb.name": f"{group}/{name}"}
        assigned = {**self.plan["fixed"], **search_space.assignments(params)}
        arguments = [f"--config.{k}={v}" for k, v in {**{k: v for k, v in extra.items() if k not in assigned},
                                                      **assigned}.items()]  # fmt: skip
        attempt = "" if number == trial.number else f" (retry of trial {number}, as trial {trial.number})"
        print(f"[trial {number}]{attempt} {search_space.describe(params)} -> {workdir}", flush=True)
        os.makedirs(workdir, exist_ok=True)
        record = {
            "study": group,
            "storage": study.shown_url(self.url),
            "number": number,
            "attempt_trial_number": trial.number,
            "params": params,
            "host": socket.gethostname(),
            "worker_pid": os.getpid(),
        }
        call(trial.set_user_attr, "workdir", os.path.abspath(workdir))
        call(trial.set_user_attr, "host", record["host"])
        command = [sys.executable, "main.py", f"--config={self.config_spec}", f"--workdir={os.path.abspath(workdir)}"]
        env = study.trial_environment(self.url, group, trial_id, self.plan["pruner"])
        start = time.monotonic()
        with study.Heartbeat(self.storage, trial_id, self.args.heartbeat, self.patience, self.lose_storage):
            exit_code, message, timed_out = self._main(command + arguments, workdir, env, record)
        seconds = time.monotonic() - start
        record.update(exit_code=exit_code, seconds=round(seconds, 1), message=message)
        last = _last_validation(workdir)
        if last:
            record["last_validation"] = last  # a pruned or stopped trial's latest (intermediate) value
        try:
            state = call(self._tell, trial, trial_id, workdir, exit_code, timed_out)
        except StorageUnavailable:
            record.update(
                state="stopped: the study's storage is unreachable; the trial resumes when the sweep runs again"
            )
            _write_json(os.path.join(workdir, "trial.json"), record)
            raise
        record["state"] = state
        final = _read_json(os.path.join(workdir, "final_metrics.json"))
        if final and isinstance(final.get("seconds"), (int, float)):
            # What a trial costs beyond its training: main.py's start-up, imports, W&B and the closing writes.
            record.update(
                train_seconds=round(final["seconds"], 1), overhead_seconds=round(seconds - final["seconds"], 1)
            )
        _write_json(os.path.join(workdir, "trial.json"), record)
        print(f"  {state} in {seconds:.0f} s" + (f": {message}" if message else ""), flush=True)

    def _main(self, command: list[str], workdir: str, env: dict, record: dict) -> tuple[int, str, bool]:
        """Runs main.py with its output written to WORKDIR/sweep.log, which the worker follows (-v: to the terminal).

        main.py writes to the file itself, not to a pipe the worker reads: a worker that is killed (SIGKILL) leaves
        its trial to stop on the SIGTERM of `_stop_with_parent`, and writing to a pipe nobody reads any more would
        fail that trial's main.py (BrokenPipeError) before it saves; the file also keeps every line it printed.
        """
        tail = deque(maxlen=20)
        path = os.path.join(workdir, "sweep.log")
        with open(path, "a") as log:
            log.write(f"$ {shlex.join(command)}\n")
            log.flush()
            start = log.tell()
            self.process = subprocess.Popen(
                command,
                cwd=config_utils.REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
                env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
                preexec_fn=_stop_with_parent,
            )
        record["pid"] = self.process.pid
        _write_json(os.path.join(workdir, "trial.json"), record)
        timed_out = threading.Event()

        def time_out() -> None:
            timed_out.set()
            self.process.terminate()

        watchdog = threading.Timer(self.args.timeout, time_out) if self.args.timeout else None
        if watchdog:
            watchdog.start()
        try:
            for line in _follow(path, start, self.process):
                tail.append(line.rstrip())
                if self.args.verbose:
                    print(f"  | {line}", end="", flush=True)
            exit_code = self.process.wait()
        finally:
            if watchdog:
                watchdog.cancel()
        message = ""
        if exit_code != 0:
            errors = [line for line in tail if line.startswith("error:")]
            message = (errors or [line for line in tail if line.strip()] or ["no output"])[-1][:300]
            message = message.removeprefix("error: ")
        if timed_out.is_set():
            message = f"stopped after the {self.args.timeout:g} s timeout"
        return exit_code, message, timed_out.is_set()

    def _tell(self, trial, trial_id: int, workdir: str, exit_code: int, timed_out: bool) -> str:
        """The trial's outcome, told to the study: complete (with its value), pruned, failed, or queued again.

        Safe to call again after an outage cut it short (study.tell_once).
        """
        optuna = study.load_optuna()
        states = optuna.trial.TrialState

        def tell(*args, **kwargs):
            return study.tell_once(self.study, self.storage, trial, trial_id, *args, **kwargs)

        if exit_code == 0:
            try:
                value = float(
                    _read_json(os.path.join(workdir, "final_metrics.json"))["best_validation"]["val_accuracy"]
                )
            except (KeyError, TypeError, ValueError):
                tell(state=states.FAIL)
                return "failed (no final_metrics.json)"
            tell(value)
            return f"complete: best val acc {value:.4f}"
        if exit_code == Pruned.exit_code:
            tell(state=states.PRUNED)
            last = _last_validation(workdir)
            return "pruned" + (f" after epoch {last['epoch']}: val acc {last['val_accuracy']:.4f}" if last else "")
        if exit_code == Preempted.exit_code and not timed_out:  # checkpoint saved; the retry resumes from it
            study.retry_now(self.study, self.storage, trial, trial_id)
            return "stopped, queued again"
        tell(state=states.FAIL)
        return f"failed (exit {exit_code})"


def _last_validation(workdir: str) -> dict | None:
    """The latest validation of a trial's run ({"epoch", "step", "val_accuracy"}) from its metrics.jsonl."""
    last = None
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            for line in f:
                if '"val/accuracy"' in line:
                    last = json.loads(line)
    except (OSError, ValueError):
        return None
    if last is None:
        return None
    return {"epoch": last.get("val/epoch"), "step": last.get("step"), "val_accuracy": last["val/accuracy"]}


def _follow(path: str, offset: int, process: subprocess.Popen, poll_seconds: float = 0.1):
    """The lines written to `path` after `offset` while `process` runs, and those left when it has ended."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character split across reads waits
    with open(path, "rb") as f:
        f.seek(offset)
        pending = ""
        while True:
            ended = process.poll() is not None  # before reading: what it wrote before it ended is read below
            pending += decoder.decode(f.read(), final=ended)
            *lines, pending = pending.split("\n")
            for line in lines:
                yield line + "\n"
            if ended:
                break
            time.sleep(poll_seconds)
        if pending:
            yield pending + "\n"


def _stop_with_parent() -> None:
    """In the child: SIGTERM when the worker dies (even by SIGKILL), so no trial trains on without its worker."""
    import ctypes  # noqa: PLC0415

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


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
        prog="python -m mnist_flax.sweep",
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
        base = config_utils.flatten(config_utils.load_config_file(config_spec))
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
        return 2

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
    _write_json(os.path.join(root, "summary.json"), summary)
    print(f"\nsummary: {os.path.join(root, 'summary.json')}")
    if worker.stopped:
        print(f"stopped by {worker.stopped}; run the same command again to continue the study", file=sys.stderr)
        return SIGNAL_EXIT[worker.stopped]
    return 1 if summary["states"].get("fail") else 0


if __name__ == "__main__":
    sys.exit(main())
