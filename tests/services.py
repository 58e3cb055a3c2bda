"""Real services the tests start on loopback and stop by process id: PostgreSQL (Debian's `postgresql`), Slurm, and
openwandb (a W&B-compatible server, in its own pinned and hashed venv: tests/wandb_server.txt)."""

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


# ---------------------------------------------------------------- openwandb, a W&B-compatible server

WANDB_SERVER_REQUIREMENTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wandb_server.txt")
# openwandb's fixed key for its local user (its README and `openwandb serve`'s banner print it): not a secret.
OPENWANDB_KEY = "local" + "0" * 35


def wandb_server_venv() -> str:
    """The venv openwandb runs from: `$XDG_CACHE_HOME/mnist_flax/wandb-server-<hash of tests/wandb_server.txt>`
    (~/.cache by default), made once with this interpreter's `venv` and `pip install --require-hashes`. Its own
    venv, because openwandb's license (CC BY-NC 4.0) keeps it out of the run's environment and lock, and its
    FastAPI stack must not change what a run imports. Skips the test when it cannot be installed (no index)."""
    import fcntl
    import hashlib
    import sys

    with open(WANDB_SERVER_REQUIREMENTS, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    venv = os.path.join(cache, "mnist_flax", f"wandb-server-{digest}")
    done = os.path.join(venv, "installed")
    os.makedirs(os.path.dirname(venv), exist_ok=True)
    with open(venv + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test workers install it once
        if not os.path.exists(done):
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", venv], check=True, capture_output=True, timeout=300)
            install = subprocess.run(
                [f"{venv}/bin/pip", "install", "-q", "--require-hashes", "-r", WANDB_SERVER_REQUIREMENTS],
                capture_output=True,
                text=True,
                timeout=600,
            )
            if install.returncode != 0:
                shutil.rmtree(venv, ignore_errors=True)
                pytest.skip(f"openwandb could not be installed: {install.stderr.strip().splitlines()[-1:]}")
            open(done, "w").close()
    return venv


class OpenWandb:
    """openwandb on 127.0.0.1 on a free port, its SQLite data in a temporary folder; stopped by its process
    handle (SIGTERM, then SIGKILL), never by name. `env` points wandb at it (WANDB_BASE_URL and its local key);
    `api(path)` reads it back through its own HTTP API (/api/v2/...), since wandb 0.31's `wandb.Api()` cannot."""

    refuses_artifacts = True  # openwandb rejects wandb 0.31's artifact-state query: an online artifact use fails

    def __init__(self):
        venv = wandb_server_venv()
        self.base = tempfile.mkdtemp(prefix="mnist-flax-openwandb-")
        self.log_path = os.path.join(self.base, "server.log")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        with open(self.log_path, "w") as log:
            self.server = subprocess.Popen(
                [f"{venv}/bin/openwandb", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
                + ["--data-dir", os.path.join(self.base, "data"), "--log-level", "warning"],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid = self.server.pid
        _wait_for(self._ready, 60, "openwandb", self.base)
        self.env = {"WANDB_BASE_URL": self.url, "WANDB_API_KEY": OPENWANDB_KEY}
        self.key = OPENWANDB_KEY

    def _ready(self) -> bool:
        if self.server.poll() is not None:
            raise RuntimeError(f"openwandb exited: {open(self.log_path).read()[-2000:]}")
        try:
            self.api("/api/v2/projects")
            return True
        except OSError:
            return False

    def api(self, path: str):
        """The JSON answer of GET `path` on the server."""
        import json
        import urllib.request

        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.load(response)

    def run(self, run_id: str) -> dict:
        """A run as the server holds it: its record (config, summary, state), metrics by key, and artifacts."""
        run = self.api(f"/api/v2/runs/{run_id}")["run"]
        run["metrics"] = self.api(f"/api/v2/runs/{run_id}/metrics")["metrics_by_key"]
        run["artifacts"] = self.api(f"/api/v2/runs/{run_id}/artifacts")["artifacts"]
        return run

    def run_ids(self, project: str = "mnist_flax") -> set[str]:
        return {r["run_id"] for r in self.api(f"/api/v2/projects/default/{project}/runs?limit=1000")["runs"]}

    def close(self) -> None:
        try:
            stop(self.server)
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


class OwnWandb:
    """The W&B server WANDB_BASE_URL names, with the caller's WANDB_API_KEY (`make test-wandb-server`): the same
    checks as against openwandb, read back with wandb's own `wandb.Api()` into openwandb's shapes. Nothing is
    started or stopped; the runs stay in its `mnist_flax` project."""

    refuses_artifacts = False  # a real server takes the dataset artifact that openwandb refuses

    def __init__(self, url: str):
        import wandb

        self.url = url
        self.key = os.environ.get("WANDB_API_KEY", "")
        if not self.key:
            pytest.skip("set WANDB_API_KEY (a key for the server WANDB_BASE_URL names)")
        self.env = {"WANDB_BASE_URL": url}  # the key stays in the environment the runs inherit
        self.api_client = wandb.Api(overrides={"base_url": url}, api_key=self.key)
        self.entity = self.api_client.default_entity

    def run(self, run_id: str, project: str = "mnist_flax") -> dict:
        import json

        run = self.api_client.run(f"{self.entity}/{project}/{run_id}")

        class History(dict):
            def get(self, key, default=None):
                return [{"value": row[key]} for row in run.scan_history(keys=[key])] or (default or [])

        return {
            "state": run.state,
            "config_json": json.dumps({k: {"value": v} for k, v in run.config.items()}),
            "summary_json": json.dumps(dict(run.summary._json_dict)),
            "metrics": History(),
            "artifacts": [{"name": a.name.split(":")[0]} for a in run.logged_artifacts()]
            + [{"name": a.name.split(":")[0], "used": True} for a in run.used_artifacts()],
        }

    def run_ids(self, project: str = "mnist_flax") -> set[str]:
        return {r.id for r in self.api_client.runs(f"{self.entity}/{project}")}

    def close(self) -> None:
        pass
