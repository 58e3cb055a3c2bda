"""The container's way in: the W&B token from the environment, checked by W&B's own client, then the command.

entrypoint.sh hands its command to `main`. The token is read by `wandb_run.read_token` (WANDB_API_KEY,
or WANDB_TOKEN, exported as WANDB_API_KEY), so the container reads it the way every run does. When
the run would be online, `wandb.Api(api_key=...)` verifies the key with the server wandb itself
resolves (WANDB_BASE_URL, else a `wandb login --host` setting, else the library's default), so the
check and the run ask the same server. The key stays in the environment and in memory: this check
writes no ~/.netrc (`wandb.login(key=...)` would) and prints nothing of it. Then the command
replaces this process:

- token rejected (HTTP 401 or 403, or not a W&B key at all): one `error:` line, exit status 2;
- server unreachable or failing: one warning line, and runs are offline (WANDB_MODE=offline);
- no token: one line, and runs are offline; `WANDB_MODE=offline` or `disabled`: no check.

Environment: MNIST_FLAX_TOKEN_CHECK_TIMEOUT (seconds, default 10, wandb's own for this check),
MNIST_FLAX_SKIP_TOKEN_CHECK=1 (trust the token unchecked).
"""

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time

from mnist_flax.config import overrides
from mnist_flax.errors import ConfigError, first_line
from mnist_flax.tracking import wandb_run

DEFAULT_TIMEOUT_SECONDS = 10.0
START_SECONDS = 8.0  # beyond the timeout: starting Python, wandb and its wandb-core service on a loaded machine
STOP_SECONDS = 3.0  # after the verdict: wandb.teardown() stopping wandb-core
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKEN_NAMES = "the W&B token (WANDB_API_KEY or WANDB_TOKEN)"


def say(line: str) -> None:
    print(f"entrypoint: {line}", file=sys.stderr, flush=True)


def run_mode(command: list[str]) -> str:
    """The W&B mode the command would run in: its --config.wandb.mode=... argument, else WANDB_MODE."""
    try:
        given = overrides.from_argv(command)
    except ConfigError:  # a malformed override: main.py says so in its own line
        given = {}
    return given.get("wandb.mode", os.environ.get("WANDB_MODE", "")).lower()


def check_token(seconds: float, say_server=lambda server: None) -> dict:
    """Asks the W&B server the run will use whether WANDB_API_KEY is valid.

    Args:
      seconds: the time the server has to answer each request.
      say_server: called with the server's URL before it is asked (so a caller can name it if the check hangs).

    Returns:
        {"server": URL, "verdict": "accepted" | "rejected" | "malformed" | "unreachable", "reason": short text}.
    """
    import wandb
    from wandb.errors import AuthenticationError

    # Two quick retries, so an answer that never comes costs `seconds`, not wandb's minutes of backoff.
    settings = wandb.setup(
        wandb.Settings(
            x_graphql_retry_max=2,
            x_graphql_retry_wait_min_seconds=0.5,
            x_graphql_retry_wait_max_seconds=1.0,
            x_graphql_timeout_seconds=seconds,
        )
    ).settings
    server = settings.base_url
    say_server(server)
    try:
        wandb.Api(overrides={"base_url": server}, api_key=wandb_run.read_token(), timeout=seconds)
    except AuthenticationError as e:
        cause = e.__cause__
        if cause is None:  # wandb refused the key before asking: not the shape of a W&B key
            return {"server": server, "verdict": "malformed", "reason": str(e)}
        message = str(cause)  # wandb-core's error, with the server's HTTP status where it answered
        status = getattr(getattr(cause, "response", None), "http_status", 0) or _http_status(message)
        if status in (401, 403):
            return {"server": server, "verdict": "rejected", "reason": f"HTTP {status}"}
        if message.startswith("invalid credentials"):  # wandb-core's words for an answer that names no account
            return {"server": server, "verdict": "rejected", "reason": message.split(": ", 1)[-1]}
        return {"server": server, "verdict": "unreachable", "reason": _short_reason(message, status, seconds)}
    except Exception as e:  # wandb-core did not start, or a transport error of another kind
        return {"server": server, "verdict": "unreachable", "reason": type(e).__name__}
    finally:
        wandb.teardown()
    return {"server": server, "verdict": "accepted", "reason": ""}


def _http_status(message: str) -> int:
    match = re.search(r"\b(?:HTTP|error) ([1-5]\d\d)\b", message)
    return int(match[1]) if match else 0


def _short_reason(message: str, status: int, seconds: float) -> str:
    """What went wrong, in a few words, from wandb-core's error text."""
    if status:
        return f"HTTP {status}"
    if "did not respond in time" in message:
        return f"no answer in {seconds:g} s"
    return first_line(message).rsplit(": ", 1)[-1][:120] or "no answer"


def _checked_in_a_child(seconds: float) -> dict:
    """`check_token` in a child process: its wandb-core service ends with it, and a hang costs a bounded wait.

    The child prints the server it asks, then the verdict, each as a JSON line. The parent waits for the verdict
    at most `seconds` plus the time wandb-core takes to start (a loaded machine can take several), then gives
    the child a moment to stop wandb-core and kills it: the wait is bounded however wandb behaves.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))}
    child = subprocess.Popen(
        [sys.executable, "-m", "mnist_flax.tracking.login", "--check", str(seconds)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in child.stdout], daemon=True).start()
    found, deadline = {}, time.monotonic() + seconds + START_SECONDS
    while "verdict" not in found and time.monotonic() < deadline:
        try:
            found.update(json.loads(lines.get(timeout=max(0.0, deadline - time.monotonic()))))
        except queue.Empty:
            break
        except ValueError:
            continue
    try:
        child.wait(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
    if "verdict" not in found:
        failed = f"the check failed (exit status {child.returncode})"
        reason = f"no answer in {seconds:g} s" if child.returncode in (0, -9) else failed
        found.update(verdict="unreachable", reason=reason)
    return found


def prepare_environment(command: list[str]) -> int | None:
    """Exports the token as WANDB_API_KEY and, when the run would be online, checks it.

    Returns:
        None to go on with the command (WANDB_MODE=offline set where W&B is unreachable), or the exit
        status to stop with (2: the token was rejected).
    """
    token = wandb_run.read_token()
    os.environ.pop("WANDB_TOKEN", None)
    if token is None:
        os.environ.pop("WANDB_API_KEY", None)  # blank counts as none
    mode = run_mode(command)
    if mode in ("disabled", "dryrun"):
        return None
    if token is None:
        say(
            "no W&B token (WANDB_API_KEY or WANDB_TOKEN) in the environment: runs will be offline; "
            "sync them later with launch/sync.sh"
        )
        return None
    if mode == "offline":
        return None  # offline by choice: the token is kept for a later sync, not checked
    if os.environ.get("MNIST_FLAX_SKIP_TOKEN_CHECK") == "1":
        say("W&B token not checked (MNIST_FLAX_SKIP_TOKEN_CHECK=1)")
        return None
    try:
        seconds = float(os.environ.get("MNIST_FLAX_TOKEN_CHECK_TIMEOUT") or DEFAULT_TIMEOUT_SECONDS)
    except ValueError:
        say("error: MNIST_FLAX_TOKEN_CHECK_TIMEOUT must be a number of seconds")
        return 2
    result = _checked_in_a_child(seconds)
    server = result.get("server", "")
    reason = result.get("reason") or "no reason given"
    if token in reason:  # never the case with wandb's messages; never printed if it were
        reason = "details withheld: they contain the token"
    if result["verdict"] == "accepted":
        return None
    if result["verdict"] in ("rejected", "malformed"):
        what = f"was rejected by {server}" if result["verdict"] == "rejected" else "is not a W&B API key"
        say(f"error: {TOKEN_NAMES} {what} ({reason}); fix it in your .env, or run with WANDB_MODE=offline")
        return 2
    say(
        f"warning: the W&B server{f' {server}' if server else ''} is unreachable ({reason}), so the token is "
        "unchecked and runs will be offline; sync them later with launch/sync.sh"
    )
    os.environ["WANDB_MODE"] = "offline"
    return None


def main(argv: list[str] | None = None) -> int:
    """Sets up the token, then runs the command in this process's place (returns only when it cannot)."""
    command = sys.argv[1:] if argv is None else argv
    if not command:
        say("no command given (the image's CMD trains the default config)")
        return 2
    status = prepare_environment(command)
    if status is not None:
        return status
    try:
        os.execvp(command[0], command)
    except FileNotFoundError:
        say(f"{command[0]}: command not found")
        return 127
    except OSError as e:
        say(f"{command[0]}: {e.strerror}")
        return 126


if __name__ == "__main__":
    if sys.argv[1:2] == ["--check"]:  # the child of _checked_in_a_child: the server, then the verdict
        verdict = check_token(float(sys.argv[2]), lambda server: print(json.dumps({"server": server}), flush=True))
        print(json.dumps(verdict), flush=True)
    else:
        sys.exit(main())
