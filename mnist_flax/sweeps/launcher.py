"""Sweep trials as forks of a process that has imported the training stack once.

A fresh `python main.py` spends seconds importing JAX, Flax, optax and orbax, then W&B and TensorBoard's
protos, before it trains: more than a one-epoch trial's training. The launcher is a process of its own,
started once per worker (`python -m mnist_flax.sweeps.launcher SCRIPT`, SCRIPT being main.py), which runs the
script's imports (its body, not as __main__) and those of the training loop, says it is ready, and then forks
one child per trial. Each trial is still a fresh process: its own memory, its own JAX
backend (none is started before the fork; the only other threads then are OpenBLAS's and jemalloc's, which
handle a fork), its own exit status, and a crash takes only it down. The child
runs the script as `python main.py ARGS` would (`runpy`, as __main__) with the trial's arguments and
environment, its output appended to the trial's sweep.log; the launcher waits for it and reports its exit
status.

The protocol, one JSON object a line: the launcher writes {"ready": true} once imported; the worker writes
{"argv", "env", "cwd", "log"} for a trial; the launcher answers {"pid"} when it has forked and {"pid", "exit"}
when the trial has ended (exit as Popen's returncode: negative for a signal). One trial at a time.

Signals: the launcher ignores SIGINT (Ctrl-C reaches the trial and the worker, which stops the trial; the
launcher must live to report its exit status) and dies on SIGTERM, which the kernel sends when its worker
dies; each trial gets SIGTERM when the launcher dies, so no trial trains on without its worker.
"""

import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

from mnist_flax.errors import first_line

# What every trial imports before it trains, beside its script's own imports; W&B and Optuna where installed.
PRELOAD = ("mnist_flax.training.loop", "mnist_flax.tracking.writers", "mnist_flax.tracking.tensorboard_writer")
OPTIONAL_PRELOAD = ("wandb", "optuna", "mnist_flax.sweeps.study")


class LauncherError(Exception):
    """The launcher could not start, or stopped."""


def available() -> bool:
    """Whether trials can be forked: a POSIX fork and Linux's parent-death signal."""
    return hasattr(os, "fork") and sys.platform.startswith("linux")


# ---------------------------------------------------------------- the launcher process


def _preload(script: str) -> None:
    """Imports what a trial needs: the script's body (not as __main__: its imports only) and PRELOAD. Refuses
    (LauncherError) if that started a JAX backend: a backend's threads and devices cannot be shared with forked
    children, so the worker then starts each trial as main.py."""
    import importlib
    import runpy

    runpy.run_path(script, run_name="__preload__")
    for name in PRELOAD:
        importlib.import_module(name)
    for name in OPTIONAL_PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise LauncherError("importing the training modules started a JAX backend; trials cannot be forked")


def _stop_with_parent() -> None:
    """SIGTERM to this process when its parent dies (even by SIGKILL)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _trial(request: dict, launcher_pid: int) -> int:
    """In the forked child: the script, as `python SCRIPT ARGS` would run it; returns its exit status."""
    _stop_with_parent()
    if os.getppid() != launcher_pid:  # the launcher died before the line above: so does the trial
        return 128 + signal.SIGTERM
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.close(null)
    sys.stdout.reconfigure(line_buffering=True)  # as PYTHONUNBUFFERED: the worker follows the log as it grows
    sys.stderr.reconfigure(line_buffering=True)
    sys.argv = list(request["argv"])
    import runpy

    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def serve(requests, answers) -> int:
    """The launcher's loop: fork a trial per request, report its pid and exit status. Returns the process's
    exit status: 0 for the launcher at the end of its requests, the trial's own in a forked child."""
    launcher_pid = os.getpid()

    def say(message: dict) -> None:
        answers.write(json.dumps(message) + "\n")
        answers.flush()

    say({"ready": True})
    for line in iter(requests.readline, ""):
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        # What the launcher imported is frozen out of the garbage collector: the trial's collections, and the
        # one at its exit, then skip those objects (walking them all was most of a trial's end).
        gc.freeze()
        pid = os.fork()
        if pid == 0:
            answers.close()
            return _trial(request, launcher_pid)
        say({"pid": pid})
        _, status = os.waitpid(pid, 0)
        say({"pid": pid, "exit": os.waitstatus_to_exitcode(status)})
    return 0


def main(argv: list[str]) -> int:
    """`python -m mnist_flax.sweeps.launcher SCRIPT`: the launcher of SCRIPT's runs (the worker's main.py)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _stop_with_parent()
    # The protocol has the pipe to itself: what the imports print goes to stderr.
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    try:
        _preload(argv[1])
    except Exception as e:  # the worker says why and starts each trial as main.py
        print(f"error: {first_line(e)}", file=sys.stderr, flush=True)
        return 1
    return serve(sys.stdin, answers)


# ---------------------------------------------------------------- the worker's side


class Launcher:
    """The worker's handle on its launcher process: `start` a trial, get a Popen-like `ForkedTrial`."""

    def __init__(self, script: str, cwd: str, env: dict):
        # Its start-up messages (TensorFlow's, W&B's) are kept only to explain a launcher that fails.
        self._errors = tempfile.TemporaryFile(mode="w+")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "mnist_flax.sweeps.launcher", script],
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._errors,
            preexec_fn=_stop_with_parent,
        )
        self._pending = b""  # what was read of the answers past the last whole line
        self._ready = None  # None until the first trial waits for it
        self.lock = threading.Lock()  # the answers are read by one thread at a time

    def wait_ready(self) -> None:
        """Returns once the launcher has done its imports; LauncherError if it failed."""
        if self._ready is None:
            answer = self.read(block=True)
            self._ready = bool(answer and answer.get("ready"))
        if not self._ready:
            raise LauncherError(self._failure())

    def read(self, block: bool) -> dict | None:
        """The launcher's next answer; None if `block` is false and none has come yet. LauncherError at its end."""
        import select

        fd = self._process.stdout.fileno()
        while b"\n" not in self._pending:
            if not block and not select.select([fd], [], [], 0)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                self._process.wait()
                raise LauncherError(self._failure())
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return json.loads(line)

    def _failure(self) -> str:
        code = self._process.poll()
        self._errors.seek(0)
        lines = [line for line in self._errors.read().splitlines() if line.strip()]
        cause = first_line(lines[-1], limit=300) if lines else "no output"
        return f"the trial launcher stopped (exit {code}): {cause}" if code is not None else cause

    def start(self, argv: list[str], env: dict, cwd: str, log: str) -> "ForkedTrial":
        """Forks a trial: the script's argv (argv[0] the script), its environment (on top of the launcher's), cwd,
        and its log."""
        with self.lock:
            self.wait_ready()
            request = json.dumps({"argv": argv, "env": env, "cwd": cwd, "log": log}) + "\n"
            try:
                self._process.stdin.write(request.encode())
                self._process.stdin.flush()
            except BrokenPipeError:
                self._process.wait()
                raise LauncherError(self._failure()) from None
            return ForkedTrial(self, self.read(block=True)["pid"])

    def close(self) -> None:
        """Ends the launcher (it exits at the end of its requests)."""
        if self._process.poll() is None:
            try:
                self._process.stdin.close()
                self._process.wait(timeout=30)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self._process.kill()
                self._process.wait()
        self._errors.close()


class ForkedTrial:
    """A forked trial, as much of subprocess.Popen as the worker uses: pid, poll, wait, send_signal,
    terminate. Its exit status comes from the launcher. A launcher that dies first leaves it unknown: the
    trial (sent SIGTERM by the kernel) is waited for until it has ended, then reported as EXIT_LAUNCHER_LOST
    with `launcher_lost` set."""

    EXIT_LAUNCHER_LOST = 1

    def __init__(self, launcher: Launcher, pid: int):
        self._launcher, self.pid, self.returncode = launcher, pid, None
        self.launcher_lost = False

    def _exit(self, block: bool) -> int | None:
        with self._launcher.lock:
            if self.returncode is None and not self.launcher_lost:
                try:
                    answer = self._launcher.read(block)
                except LauncherError:
                    self.launcher_lost = True
                else:
                    if answer is not None:
                        self.returncode = int(answer["exit"])
            if self.launcher_lost and self.returncode is None:
                while _running(self.pid):  # no longer our launcher's child: nobody here can wait for it
                    if not block:
                        return None
                    time.sleep(0.1)
                self.returncode = self.EXIT_LAUNCHER_LOST
            return self.returncode

    def poll(self) -> int | None:
        return self._exit(block=False)

    def wait(self) -> int:
        return self._exit(block=True)

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


def _running(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, ended but not yet reaped by its new parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


if __name__ == "__main__":
    sys.exit(main(sys.argv))
