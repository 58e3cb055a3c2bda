"""The sweep's worker: takes queued trials from the study and trains each as its own `main.py` process.

Each trial is a fresh process: forked from the worker's trial launcher, which has done main.py's imports once
(launcher.py), or, where that cannot be, `python main.py` itself.

Every storage call goes through the study's Patience, so an outage of the storage is waited out; each trial's
outcome is told to the study once (complete, pruned, failed, or queued again to resume from its checkpoint).
"""

import codecs
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

from mnist_flax import layout
from mnist_flax.config import schema
from mnist_flax.errors import ConfigError, Preempted, Pruned, StorageUnavailable
from mnist_flax.records import files
from mnist_flax.sweeps import launcher, search_space, study

SIGNAL_EXIT = {"SIGTERM": layout.EXIT_PREEMPTED, "SIGINT": layout.EXIT_INTERRUPTED}


class Worker:
    """Takes queued trials and trains each as its own main.py until the study has none left."""

    def __init__(self, args, the_study, storage, url: str, plan: dict, config_spec: str, root: str):
        self.args, self.study, self.storage, self.url = args, the_study, storage, url
        self.plan, self.config_spec, self.root = plan, config_spec, root
        self.stopped = None  # "SIGTERM" or "SIGINT" once asked to stop
        self.process = None
        self.launcher = None  # launcher.Launcher once started; None: each trial is `python main.py`
        # Every storage call goes through it: an outage up to --storage-patience is waited out.
        self.patience = study.Patience(args.storage_patience)
        self.storage_lost = False

    def lose_storage(self) -> None:
        """The storage stayed away past the patience while a trial trained: stop it with a checkpoint."""
        self.storage_lost = True
        if self.process:
            self.process.send_signal(signal.SIGTERM)  # nothing if it has ended

    def stop(self, signum, frame) -> None:
        self.stopped = signal.Signals(signum).name
        if self.process:  # not poll(): this handler may run while the main thread waits for the trial's end
            self.process.send_signal(signal.SIGTERM)  # it saves a checkpoint; its retry resumes from it

    def run(self) -> None:
        if launcher.available():  # its imports run while the worker opens the study and takes a trial
            self.launcher = launcher.Launcher("main.py", schema.REPO_ROOT, dict(os.environ))
        try:
            self._run()
        finally:
            if self.launcher:
                self.launcher.close()

    def _run(self) -> None:
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
            files.write_json(os.path.join(workdir, layout.TRIAL), record)
            raise
        record["state"] = state
        final = _final_metrics(workdir)
        if final and isinstance(final.get("seconds"), (int, float)):
            # What a trial costs beyond its training: main.py's start-up, imports, W&B and the closing writes.
            record.update(
                train_seconds=round(final["seconds"], 1), overhead_seconds=round(seconds - final["seconds"], 1)
            )
        files.write_json(os.path.join(workdir, layout.TRIAL), record)
        print(f"  {state} in {seconds:.0f} s" + (f": {message}" if message else ""), flush=True)

    def _main(self, command: list[str], workdir: str, env: dict, record: dict) -> tuple[int, str, bool]:
        """Runs main.py with its output written to WORKDIR/sweep.log, which the worker follows (-v: to the terminal).

        main.py writes to the file itself, not to a pipe the worker reads: a worker that is killed (SIGKILL) leaves
        its trial to stop on the SIGTERM of `_stop_with_parent`, and writing to a pipe nobody reads any more would
        fail that trial's main.py (BrokenPipeError) before it saves; the file also keeps every line it printed.
        """
        tail = deque(maxlen=20)
        started = time.time()
        path = os.path.join(workdir, layout.SWEEP_LOG)
        with open(path, "a") as log:
            forked = self._launcher_ready()
            # A forked trial runs main.py's command with these arguments, in a process that did its imports once.
            how = "  # forked from the worker's trial launcher" if forked else ""
            log.write(f"$ {shlex.join(command)}{how}\n")
            log.flush()
            self.process = self._fork(command, env, path) if forked else None
            if forked and self.process is None:
                log.write(f"$ {shlex.join(command)}  # the launcher stopped: the trial starts as main.py\n")
                log.flush()
            start = log.tell()
            if self.process is None:
                self.process = subprocess.Popen(
                    command,
                    cwd=schema.REPO_ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    text=True,
                    env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
                    preexec_fn=_stop_with_parent,
                )
        if self.stopped:  # asked to stop while the trial started (waiting for the launcher's imports, say)
            self.process.send_signal(signal.SIGTERM)
        record["pid"] = self.process.pid
        record["launch"] = "forked" if isinstance(self.process, launcher.ForkedTrial) else "main.py"
        files.write_json(os.path.join(workdir, layout.TRIAL), record)
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
        if getattr(self.process, "launcher_lost", False):
            exit_code, message = _outcome_on_record(workdir, started)
        if timed_out.is_set():
            message = f"stopped after the {self.args.timeout:g} s timeout"
        return exit_code, message, timed_out.is_set()

    def _launcher_ready(self) -> bool:
        """Whether trials are forked: the launcher has done its imports (waited for); False without one, or
        once it has failed (said once: every later trial is `python main.py`)."""
        if self.launcher is None:
            return False
        try:
            self.launcher.wait_ready()
            return True
        except launcher.LauncherError as e:
            self._lose_launcher(e)
            return False

    def _fork(self, command: list[str], env: dict, path: str) -> "launcher.ForkedTrial | None":
        """The trial forked from the launcher (main.py's argv, not the interpreter's); None if it failed."""
        try:
            return self.launcher.start(command[1:], env, schema.REPO_ROOT, path)
        except launcher.LauncherError as e:
            self._lose_launcher(e)
            return None

    def _lose_launcher(self, error: Exception) -> None:
        print(f"trials now start as main.py: {error}", flush=True)
        self.launcher.close()
        self.launcher = None

    def _tell(self, trial, trial_id: int, workdir: str, exit_code: int, timed_out: bool) -> str:
        """The trial's outcome, told to the study: complete (with its value), pruned, failed, or queued again.

        Safe to call again after an outage cut it short (study.tell_once).
        """
        optuna = study.load_optuna()
        states = optuna.trial.TrialState

        def tell(*args, **kwargs):
            return study.tell_once(self.study, self.storage, trial, trial_id, *args, **kwargs)

        if exit_code == layout.EXIT_OK:
            try:
                value = float(_final_metrics(workdir)["best_validation"]["val_accuracy"])
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


def _final_metrics(workdir: str) -> dict | None:
    """The trial's final_metrics.json; None when its run wrote none (or a damaged one: the trial then fails)."""
    try:
        return files.read_json(os.path.join(workdir, layout.FINAL_METRICS), None)
    except ConfigError:
        return None


def _outcome_on_record(workdir: str, since: float) -> tuple[int, str]:
    """The exit status and message of a forked trial whose launcher died before it could report them (the
    trial, sent SIGTERM by the kernel, has ended): what the trial itself wrote since `since`, its
    final_metrics.json (finished) or its stopped.json (preempted with a checkpoint, pruned or failed)."""
    lost = "the trial launcher stopped during the trial"
    for name in (layout.FINAL_METRICS, layout.STOPPED):
        path = os.path.join(workdir, name)
        try:
            if os.path.getmtime(path) < since:
                continue  # an earlier start's
            saved = files.read_json(path, None)
        except (OSError, ConfigError):
            continue
        if name == layout.FINAL_METRICS:
            return layout.EXIT_OK, f"{lost}; it had finished ({name})"
        if isinstance(saved, dict) and isinstance(saved.get("exit_code"), int):
            return saved["exit_code"], f"{lost}; it had stopped ({name}): {saved.get('reason', '')}"
    return layout.EXIT_FAILED, f"{lost}, which then ended; its exit status is unknown"


def _last_validation(workdir: str) -> dict | None:
    """The latest validation of a trial's run ({"epoch", "step", "val_accuracy"}) from its metrics.jsonl."""
    last = None
    try:
        with open(os.path.join(workdir, layout.METRICS)) as f:
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
