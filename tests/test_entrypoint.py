"""entrypoint.sh run directly with bash, as `docker run --env-file .env` would start it.

Each test writes an env file, parses it the way Docker does, and runs the script
in an environment holding only those variables (like `env -i`). A local HTTP
server stands in for the W&B API, so the online token check (W&B's own client,
mnist_flax/tracking/login.py) is exercised for real: accepted, rejected,
unreachable, and sent to the server the run would use.
"""

import base64
import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import REPO_ROOT

ENTRYPOINT = os.path.join(REPO_ROOT, "entrypoint.sh")
FAKE_TOKEN = "fake0token0for0tests0" + "7" * 19  # 40 characters, like a W&B key

# The command after the entrypoint: reports its arguments and what it sees of
# the token (a hash, so the token itself never reaches the output).
REPORTER = (
    "import hashlib, json, os, sys; key = os.environ.get('WANDB_API_KEY'); "
    "print(json.dumps({'argv': sys.argv[1:], 'key_sha256': key and hashlib.sha256(key.encode()).hexdigest(), "
    "'token_var': 'WANDB_TOKEN' in os.environ, 'mode': os.environ.get('WANDB_MODE')}))"
)
ODD_ARGUMENTS = ["two words", "", "--config.wandb.notes=a b  c", "$HOME", "*", "quote'\"", "-x"]


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def parse_env_file(path: str) -> dict[str, str]:
    """Docker's --env-file rules: KEY=VALUE lines taken literally; blank and # lines skipped."""
    variables = {}
    with open(path) as f:
        for line in f.read().splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            key, sep, value = line.partition("=")
            if sep:
                variables[key.strip()] = value
    return variables


def run_entrypoint(tmp_path, env_file_text: str, command: list[str], extra_env: dict | None = None):
    env_file = tmp_path / "test.env"
    env_file.write_text(env_file_text)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), **parse_env_file(str(env_file)), **(extra_env or {})}
    return subprocess.run(
        ["bash", ENTRYPOINT, *command], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path
    )


def reporter(*arguments: str) -> list[str]:
    return [sys.executable, "-c", REPORTER, *arguments]


def report_of(result) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def stderr_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


class FakeWandb:
    """A local stand-in for the W&B GraphQL API that answers with a fixed status.

    Status 200 answers the viewer query with an account, or with none (`viewer: null`) when
    `account` is False. Only GraphQL requests are recorded: wandb also posts its own telemetry.
    """

    def __init__(self, status: int, account: bool = True):
        self.status = status
        self.requests = []  # (authorization header, token seen on any process's command line)
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path.rstrip("/").endswith("/graphql"):
                    outer.requests.append((self.headers.get("Authorization", ""), token_on_a_command_line()))
                viewer = {"id": "VXNlcjox", "entity": "tester", "username": "tester"} if account else None
                body = json.dumps({"data": {"viewer": viewer}} if outer.status == 200 else {}).encode()
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def token_on_a_command_line() -> bool:
    """Whether any running process has the fake token in its argv (what `ps` shows)."""
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if FAKE_TOKEN.encode() in f.read():
                        return True
            except OSError:
                pass
    return False


@pytest.fixture
def fake_wandb(request):
    server = FakeWandb(getattr(request, "param", 200))
    yield server
    server.close()


def files_holding_the_token(folder) -> list[str]:
    """Files under `folder` (the test's HOME and working directory) holding the fake token: a ~/.netrc, a log, ...

    The env file the test wrote it into is not counted.
    """
    found = []
    for root, _, names in os.walk(folder):
        for path in (os.path.join(root, name) for name in names):
            if path == os.path.join(folder, "test.env"):
                continue
            with open(path, "rb") as f:
                if FAKE_TOKEN.encode() in f.read():
                    found.append(path)
    return found


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_token_from_env_file_offline_is_exported_and_not_checked(tmp_path, fake_wandb):
    result = run_entrypoint(
        tmp_path,
        f"# secrets\nWANDB_TOKEN={FAKE_TOKEN}\nWANDB_MODE=offline\nWANDB_BASE_URL={fake_wandb.url}\n",
        reporter(*ODD_ARGUMENTS),
    )
    report = report_of(result)
    assert report["argv"] == ODD_ARGUMENTS
    assert report["key_sha256"] == sha256(FAKE_TOKEN)  # exported as WANDB_API_KEY
    assert report["token_var"] is False  # WANDB_TOKEN itself is not passed on
    assert report["mode"] == "offline"
    assert fake_wandb.requests == []  # offline: the token is not checked
    assert stderr_lines(result) == []
    assert FAKE_TOKEN not in result.stdout + result.stderr


def test_without_token_says_offline_in_one_line(tmp_path):
    result = run_entrypoint(tmp_path, "# no token here\n", reporter("a b", "c"))
    report = report_of(result)
    assert report["argv"] == ["a b", "c"]
    assert report["key_sha256"] is None
    lines = stderr_lines(result)
    assert len(lines) == 1 and "offline" in lines[0] and "no W&B token" in lines[0]


def test_empty_token_counts_as_none(tmp_path, fake_wandb):
    result = run_entrypoint(
        tmp_path, f"WANDB_API_KEY=\nWANDB_TOKEN=   \nWANDB_BASE_URL={fake_wandb.url}\n", reporter("x")
    )
    report = report_of(result)
    assert report["key_sha256"] is None
    assert fake_wandb.requests == []
    lines = stderr_lines(result)
    assert len(lines) == 1 and "offline" in lines[0]


def test_online_token_is_checked_through_the_environment_and_accepted(tmp_path, fake_wandb):
    result = run_entrypoint(
        tmp_path, f"WANDB_API_KEY={FAKE_TOKEN}  \nWANDB_BASE_URL={fake_wandb.url}\n", reporter("--flag", "v a l")
    )
    report = report_of(result)
    assert report["argv"] == ["--flag", "v a l"]
    assert report["key_sha256"] == sha256(FAKE_TOKEN)  # Docker keeps trailing blanks; the entrypoint drops them
    assert report["mode"] is None  # stays online
    assert len(fake_wandb.requests) == 1
    authorization, on_command_line = fake_wandb.requests[0]
    assert base64.b64decode(authorization.split()[1]).decode() == f"api:{FAKE_TOKEN}"
    assert on_command_line is False  # not in any argv while the check ran
    assert stderr_lines(result) == []
    assert FAKE_TOKEN not in result.stdout + result.stderr
    assert not (tmp_path / ".netrc").exists() and files_holding_the_token(tmp_path) == []  # not on disk


@pytest.mark.parametrize("fake_wandb", [401, 403], indirect=True)
def test_rejected_token_is_one_clear_line_and_exit_2(tmp_path, fake_wandb):
    marker = tmp_path / "command_ran"
    result = run_entrypoint(
        tmp_path, f"WANDB_TOKEN={FAKE_TOKEN}\nWANDB_BASE_URL={fake_wandb.url}\n", ["touch", str(marker)]
    )
    assert result.returncode == 2
    lines = stderr_lines(result)
    assert len(lines) == 1 and "rejected" in lines[0]
    assert f"rejected by {fake_wandb.url} (HTTP {fake_wandb.status})" in lines[0]  # names the server it asked
    assert len(fake_wandb.requests) == 1  # the server WANDB_BASE_URL names is the one asked
    assert FAKE_TOKEN not in result.stdout + result.stderr
    assert files_holding_the_token(tmp_path) == []
    assert not marker.exists()  # the command never started


def test_an_answer_naming_no_account_is_a_rejection(tmp_path):
    server = FakeWandb(200, account=False)
    try:
        result = run_entrypoint(tmp_path, f"WANDB_API_KEY={FAKE_TOKEN}\nWANDB_BASE_URL={server.url}\n", reporter())
    finally:
        server.close()
    assert result.returncode == 2
    lines = stderr_lines(result)
    assert len(lines) == 1 and lines[0].startswith("entrypoint: error:") and f"rejected by {server.url}" in lines[0]


def test_check_asks_the_server_wandb_is_configured_for(tmp_path, fake_wandb):
    """No WANDB_BASE_URL: the check goes where wandb itself would send the run (here its settings file)."""
    settings = tmp_path / ".config" / "wandb" / "settings"
    settings.parent.mkdir(parents=True)
    settings.write_text(f"[default]\nbase_url = {fake_wandb.url}\n")
    command = [sys.executable, "-c", "import wandb; print(wandb.setup().settings.base_url)"]
    result = run_entrypoint(tmp_path, f"WANDB_API_KEY={FAKE_TOKEN}\n", command)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == fake_wandb.url  # where the run's wandb goes ...
    assert len(fake_wandb.requests) == 1  # ... is where the check went
    assert not [line for line in stderr_lines(result) if line.startswith("entrypoint:")]  # accepted: nothing to say


def test_token_not_shaped_like_a_key_stops_without_asking(tmp_path, fake_wandb):
    result = run_entrypoint(tmp_path, f"WANDB_API_KEY=short-token\nWANDB_BASE_URL={fake_wandb.url}\n", reporter())
    assert result.returncode == 2
    lines = stderr_lines(result)
    assert len(lines) == 1 and "is not a W&B API key" in lines[0] and "short-token" not in lines[0]
    assert fake_wandb.requests == []


@pytest.mark.parametrize("fake_wandb", [503], indirect=True)
def test_failing_server_makes_the_run_offline(tmp_path, fake_wandb):
    result = run_entrypoint(tmp_path, f"WANDB_API_KEY={FAKE_TOKEN}\nWANDB_BASE_URL={fake_wandb.url}\n", reporter())
    assert report_of(result)["mode"] == "offline"
    lines = stderr_lines(result)
    assert len(lines) == 1 and "unreachable (HTTP 503)" in lines[0]


def test_unreachable_server_warns_once_and_continues_offline(tmp_path):
    result = run_entrypoint(
        tmp_path, f"WANDB_API_KEY={FAKE_TOKEN}\nWANDB_BASE_URL={closed_port_url()}\n", reporter("a  b")
    )
    report = report_of(result)
    assert report["argv"] == ["a  b"]
    assert report["mode"] == "offline"
    assert report["key_sha256"] == sha256(FAKE_TOKEN)  # kept for a later sync
    lines = stderr_lines(result)
    assert len(lines) == 1 and "unreachable" in lines[0] and "offline" in lines[0]
    assert FAKE_TOKEN not in result.stdout + result.stderr


def test_a_server_that_never_answers_costs_the_timeout_then_offline(tmp_path):
    with socket.socket() as silent:  # accepts connections (the kernel does) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        result = run_entrypoint(
            tmp_path,
            f"WANDB_API_KEY={FAKE_TOKEN}\nWANDB_BASE_URL={url}\nMNIST_FLAX_TOKEN_CHECK_TIMEOUT=2\n",
            reporter(),
        )
        elapsed = time.monotonic() - started
    assert report_of(result)["mode"] == "offline"
    lines = stderr_lines(result)
    assert len(lines) == 1 and f"{url} is unreachable (no answer in 2 s)" in lines[0]
    assert elapsed < 20  # the timeout, plus starting and stopping wandb's service


def test_offline_config_override_skips_the_check(tmp_path, fake_wandb):
    arguments = ["--config=configs/mlp.py", "--config.wandb.mode=offline"]
    result = run_entrypoint(
        tmp_path, f"WANDB_API_KEY={FAKE_TOKEN}\nWANDB_BASE_URL={fake_wandb.url}\n", reporter(*arguments)
    )
    assert report_of(result)["argv"] == arguments
    assert fake_wandb.requests == []


def test_api_key_wins_over_token(tmp_path):
    result = run_entrypoint(
        tmp_path, f"WANDB_API_KEY={FAKE_TOKEN}\nWANDB_TOKEN=other-token\nWANDB_MODE=disabled\n", reporter()
    )
    assert report_of(result)["key_sha256"] == sha256(FAKE_TOKEN)
    assert stderr_lines(result) == []  # disabled: nothing to say


def test_exit_status_of_the_command_is_kept(tmp_path):
    result = run_entrypoint(tmp_path, "WANDB_MODE=offline\n", [sys.executable, "-c", "raise SystemExit(7)"])
    assert result.returncode == 7


def test_no_command_is_an_error(tmp_path):
    result = run_entrypoint(tmp_path, "", [])
    assert result.returncode == 2
    assert len(stderr_lines(result)) == 1


def test_missing_command_is_exit_127(tmp_path):
    result = run_entrypoint(tmp_path, "WANDB_MODE=disabled\n", ["no-such-command-here", "x"])
    assert result.returncode == 127
    assert stderr_lines(result) == ["entrypoint: no-such-command-here: command not found"]
