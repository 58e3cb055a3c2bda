"""Real services the tests start on loopback and stop by process id: PostgreSQL (Debian's `postgresql`)."""

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_gone(pid: int, timeout: float) -> bool:
    """True once process `pid` has exited (or is a zombie left for its parent to reap)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/status") as f:
                if "\nState:\tZ" in f.read():
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def _as_postgres_user(uid: int, gid: int) -> list[str]:
    """PostgreSQL refuses to run as root; as root, run it as the postgres user (setpriv execs: the pid stays)."""
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups"] if os.geteuid() == 0 else []


@contextlib.contextmanager
def postgresql(password: str, database: str = "sweeps"):
    """A PostgreSQL server on 127.0.0.1 in a temporary folder; yields its SQLAlchemy URL (password auth).

    Stopped by the pid in its postmaster.pid (SIGINT: fast shutdown), never by name.
    """
    bindirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    if not bindirs or not os.path.isfile(os.path.join(bindirs[-1], "initdb")):
        pytest.skip("PostgreSQL is not installed (Debian's postgresql; `make test` installs it)")
    bindir = bindirs[-1]
    user = pwd.getpwnam("postgres") if os.geteuid() == 0 else pwd.getpwuid(os.geteuid())
    prefix = _as_postgres_user(user.pw_uid, user.pw_gid)
    base = tempfile.mkdtemp(prefix="mnist-flax-pg-")
    os.chmod(base, 0o755)
    os.chown(base, user.pw_uid, user.pw_gid)
    data, log_path, pwfile = (os.path.join(base, name) for name in ("data", "server.log", "pwfile"))
    with open(pwfile, "w") as f:
        f.write(password)
    os.chown(pwfile, user.pw_uid, user.pw_gid)
    pid = None
    try:
        subprocess.run(
            [*prefix, f"{bindir}/initdb", "-D", data, "-U", "sweeper", f"--pwfile={pwfile}", "-A", "scram-sha-256"]
            + ["-E", "UTF8", "--no-locale"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        port = free_port()
        with open(log_path, "w") as log:
            server = subprocess.Popen(
                [*prefix, f"{bindir}/postgres", "-D", data, "-h", "127.0.0.1", "-p", str(port), "-k", base],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while True:
            ready = subprocess.run(
                [f"{bindir}/pg_isready", "-h", "127.0.0.1", "-p", str(port)], capture_output=True, timeout=10
            )
            if ready.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not start: {open(log_path).read()[-2000:]}")
            time.sleep(0.2)
        with open(os.path.join(data, "postmaster.pid")) as f:
            pid = int(f.readline())
        subprocess.run(
            [f"{bindir}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "sweeper", database],
            env={**os.environ, "PGPASSWORD": password},
            check=True,
            capture_output=True,
            timeout=60,
        )
        yield f"postgresql://sweeper:{password}@127.0.0.1:{port}/{database}"
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGINT)
            assert wait_until_gone(pid, 60), f"PostgreSQL (pid {pid}) did not stop"
            server.wait(timeout=10)  # setpriv exec'd it: the postmaster is our child, reaped here
        shutil.rmtree(base, ignore_errors=True)
