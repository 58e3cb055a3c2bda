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


def stop(process, timeout: float = 30) -> None:
    """Stops a process a test started, by its own handle: SIGTERM, then SIGKILL after `timeout` seconds."""
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout)


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


class PostgreSQL:
    """A PostgreSQL server on 127.0.0.1 in a temporary folder, which a test may stop and start again (an outage).

    `url` is its SQLAlchemy URL (password auth, scram-sha-256). Stopped by the pid in its postmaster.pid
    (SIGINT: fast shutdown), never by name; `close` stops it and removes its folder.
    """

    def __init__(self, password: str, database: str = "sweeps"):
        bindirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        if not bindirs or not os.path.isfile(os.path.join(bindirs[-1], "initdb")):
            pytest.skip("PostgreSQL is not installed (Debian's postgresql; `make test` installs it)")
        self.bindir = bindirs[-1]
        user = pwd.getpwnam("postgres") if os.geteuid() == 0 else pwd.getpwuid(os.geteuid())
        self.prefix = _as_postgres_user(user.pw_uid, user.pw_gid)
        self.base = tempfile.mkdtemp(prefix="mnist-flax-pg-")
        os.chmod(self.base, 0o755)
        os.chown(self.base, user.pw_uid, user.pw_gid)
        self.data, self.log_path, pwfile = (os.path.join(self.base, n) for n in ("data", "server.log", "pwfile"))
        with open(pwfile, "w") as f:
            f.write(password)
        os.chown(pwfile, user.pw_uid, user.pw_gid)
        self.pid = self.server = None
        subprocess.run(
            [*self.prefix, f"{self.bindir}/initdb", "-D", self.data, "-U", "sweeper", f"--pwfile={pwfile}"]
            + ["-A", "scram-sha-256", "-E", "UTF8", "--no-locale"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        self.port = free_port()
        self.start()
        subprocess.run(
            [f"{self.bindir}/createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "sweeper", database],
            env={**os.environ, "PGPASSWORD": password},
            check=True,
            capture_output=True,
            timeout=60,
        )
        self.url = f"postgresql://sweeper:{password}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        with open(self.log_path, "a") as log:
            self.server = subprocess.Popen(
                [*self.prefix, f"{self.bindir}/postgres", "-D", self.data, "-h", "127.0.0.1", "-p", str(self.port)]
                + ["-k", self.base],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while True:
            ready = subprocess.run(
                [f"{self.bindir}/pg_isready", "-h", "127.0.0.1", "-p", str(self.port)], capture_output=True, timeout=10
            )
            if ready.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not start: {open(self.log_path).read()[-2000:]}")
            time.sleep(0.2)
        with open(os.path.join(self.data, "postmaster.pid")) as f:
            self.pid = int(f.readline())

    def stop(self) -> None:
        if self.pid is None:
            return
        os.kill(self.pid, signal.SIGINT)
        assert wait_until_gone(self.pid, 60), f"PostgreSQL (pid {self.pid}) did not stop"
        self.server.wait(timeout=10)  # setpriv exec'd it: the postmaster is our child, reaped here
        self.pid = None

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


@contextlib.contextmanager
def postgresql(password: str, database: str = "sweeps"):
    """A PostgreSQL server for the block (PostgreSQL above); yields its SQLAlchemy URL."""
    server = PostgreSQL(password, database)
    try:
        yield server.url
    finally:
        server.close()


# ---------------------------------------------------------------- Slurm

SLURM_CONF = """\
ClusterName=mnistflax
SlurmctldHost={host}({address})
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser={user}
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: also how long a requeued job waits before it may start again (Slurm's default: 120 s).
AuthInfo=socket={munge_socket},cred_expire=10
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd.pid
SlurmctldLogFile={base}/slurmctld.log
SlurmdLogFile={base}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
KillWait=30
MinJobAge=600
{node} NodeAddr={address} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@contextlib.contextmanager
def slurm_cluster(timeout: float = 90):
    """A one-node Slurm cluster (munged, slurmctld, slurmd) in a temporary folder, for this host.

    The node line is `slurmd -C`'s (this machine's real CPUs and memory). Yields the environment its
    commands need (SLURM_CONF); stops the daemons by their process ids.
    """
    tools = ["munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "sacct"]
    if any(shutil.which(tool) is None for tool in tools[:6]):
        pytest.skip("Slurm is not installed (Debian's slurm-wlm and munge; `make test` installs them)")
    base = tempfile.mkdtemp(prefix="mnist-flax-slurm-")
    os.chmod(base, 0o755)
    for folder in ("state", "spool", "munge"):
        os.makedirs(os.path.join(base, folder), mode=0o700)
    key = os.path.join(base, "munge", "munge.key")
    with open(key, "wb") as f:
        f.write(os.urandom(1024))
    os.chmod(key, 0o600)
    munge_socket = os.path.join(base, "munge", "munge.socket")
    node = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    host = node.split()[0].removeprefix("NodeName=")
    conf = os.path.join(base, "slurm.conf")
    with open(conf, "w") as f:
        f.write(
            SLURM_CONF.format(
                host=host,
                address="127.0.0.1",
                ctld_port=free_port(),
                slurmd_port=free_port(),
                user=pwd.getpwuid(os.geteuid()).pw_name,
                munge_socket=munge_socket,
                base=base,
                node=node,
            )
        )
    env = {**os.environ, "SLURM_CONF": conf}
    daemons = []
    try:
        munge = [
            "munged", "--foreground", "--force", f"--socket={munge_socket}", f"--key-file={key}",
            f"--log-file={base}/munge/munged.log", f"--pid-file={base}/munge/munged.pid",
            f"--seed-file={base}/munge/munged.seed",
        ]  # fmt: skip
        for command in (munge, ["slurmctld", "-D", "-i", "-f", conf], ["slurmd", "-D", "-f", conf]):
            log = open(os.path.join(base, f"{command[0]}.out"), "w")
            daemons.append(
                subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            )
            if command[0] == "munged":
                _wait_for(lambda: os.path.exists(munge_socket), timeout, "munged", base)
        _wait_for(lambda: node_state(env, host) == "idle", timeout, "the Slurm node", base)
        yield {"SLURM_CONF": conf, "base": base, "host": host}
    finally:
        for daemon in reversed(daemons):
            stop(daemon)
        shutil.rmtree(base, ignore_errors=True)


def node_state(env: dict, host: str) -> str:
    result = subprocess.run(
        ["sinfo", "-h", "-n", host, "-o", "%T"], capture_output=True, text=True, env=env, timeout=30
    )
    return result.stdout.strip().rstrip("*~#")


def _wait_for(ready, timeout: float, what: str, base: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            logs = "".join(
                f"\n--- {name}\n" + open(os.path.join(base, name), errors="replace").read()[-1500:]
                for name in sorted(os.listdir(base))
                if name.endswith((".log", ".out"))
            )
            raise RuntimeError(f"{what} did not come up in {timeout:g} s:{logs}")
        time.sleep(0.3)
