"""Sweep workers, as on several machines, sharing one Optuna study on a real PostgreSQL server; and where the
study's URL and its password come from (the command line, MNIST_FLAX_STORAGE, PGPASSWORD, ~/.pgpass)."""

import json
import os
import subprocess
import sys
import time

import pytest
import services
from conftest import REPO_ROOT, SUBPROCESS_ENV
from shared import tiny_settings

from mnist_flax import layout
from mnist_flax.commands import sweep
from mnist_flax.errors import ConfigError
from mnist_flax.sweeps import study

PASSWORD = "s3cret-Pg-word"
RATES = ("0.001", "0.01", "0.03")  # one trial for each worker


@pytest.fixture(scope="module")
def postgresql_url():
    """One PostgreSQL server for the module; its URL holds the password (scram-sha-256)."""
    with services.postgresql(PASSWORD) as url:
        yield url


def without_password(url: str) -> str:
    return url.replace(f":{PASSWORD}@", "@")


def command_lines_while_running(processes: list) -> dict[int, list[str]]:
    """The command line of `processes` and of every process descended from them (a worker's trial launcher, the
    trials it forks, a trial started as main.py), by process id, read from /proc until `processes` end."""
    seen = {}
    while any(process.poll() is None for process in processes):
        parents = {}
        for entry in os.scandir("/proc"):
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    parents[int(entry.name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):  # not a process, or one that just ended
                continue
        family = {process.pid for process in processes}
        while grown := {pid for pid, parent in parents.items() if parent in family} - family:
            family |= grown
        for pid in family:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    raw = f.read()
            except OSError:
                continue
            if raw:  # empty for a process that has exited but not yet been reaped
                seen.setdefault(pid, raw.decode(errors="replace").rstrip("\0").split("\0"))
        time.sleep(0.2)
    return seen


# -- where the URL comes from (no server) -------------------------------------------------------------


def dry_run(tmp_path, capsys, *args: str) -> tuple[str, str]:
    """The output and error of the sweep command's --dry-run, which names the study's storage."""
    assert sweep.main(["--config=configs/mlp.py", f"--root={tmp_path / 'sweep'}", "--grid", "seed=0,1",
                       "--dry-run", *args]) == 0  # fmt: skip
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_storage_on_the_command_line_wins_over_the_environment(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(study.STORAGE_ENV, "postgresql://env-user:env-word@env-host/sweeps")
    out, err = dry_run(tmp_path, capsys, "--storage", "postgresql://arg-user@arg-host/sweeps")
    assert "in postgresql://arg-user@arg-host/sweeps;" in out and err == ""
    out, err = dry_run(tmp_path, capsys)  # no --storage: the variable's, its password hidden and not warned about
    assert "in postgresql://env-user:***@env-host/sweeps;" in out and err == ""
    assert "env-word" not in out + err
    monkeypatch.delenv(study.STORAGE_ENV)
    out, _ = dry_run(tmp_path, capsys)
    assert f"in sqlite:///{tmp_path / 'sweep' / 'study.db'};" in out


@pytest.mark.parametrize(
    "url, warned",
    [
        ("postgresql://sweeper:pass-word@db-host/sweeps", True),
        ("postgresql+psycopg://sweeper@db-host:5432/sweeps?password=pass-word&sslmode=require", True),
        ("postgresql://sweeper:pass-word@db-host:not-a-port/sweeps", True),  # one SQLAlchemy cannot read
        ("postgresql://sweeper@db-host/sweeps", False),
    ],
)
def test_a_password_on_the_command_line_is_warned_about_and_never_shown(url, warned, tmp_path, capsys):
    out, err = dry_run(tmp_path, capsys, "--storage", url)
    assert "pass-word" not in out + err
    assert "in postgresql" in out
    if warned:
        warning = err.splitlines()[0]
        assert warning == study.PASSWORD_IN_ARGV
        for words in ("ps", "shell history", "Slurm job's record", "~/.pgpass", "PGPASSWORD", study.STORAGE_ENV):
            assert words in warning
    else:
        assert err == ""


def test_a_sweep_root_takes_its_storage_with_or_without_the_password(tmp_path):
    root = str(tmp_path / "sweep")
    record = {"study": "lr", "storage": study.shown_url("postgresql://sweeper:pass-word@db-host/sweeps"), "plan": {}}
    sweep.check_root(root, record)  # the first run gave the password in the URL; the next gives it in ~/.pgpass
    sweep.check_root(root, {**record, "storage": "postgresql://sweeper@db-host/sweeps"})
    with pytest.raises(ConfigError, match="already holds a different sweep"):
        sweep.check_root(root, {**record, "storage": "postgresql://sweeper@other-host/sweeps"})


# -- on the server ---------------------------------------------------------------------------------------


def test_a_url_without_its_password_says_where_the_password_is_looked_for(postgresql_url, tmp_path, monkeypatch):
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-such-pgpass"))
    with pytest.raises(ConfigError) as error:
        study.open_storage(without_password(postgresql_url), 60, given_as=study.STORAGE_ENV)
    message = str(error.value)
    assert message.startswith(f"{study.STORAGE_ENV} {without_password(postgresql_url)}: cannot open")
    assert "no password supplied (the password comes from the URL, PGPASSWORD or ~/.pgpass)" in message


@pytest.mark.slow
def test_workers_share_one_study_with_the_password_off_their_command_lines(postgresql_url, tiny_data_dir, tmp_path):
    import optuna

    # Three workers, as on three machines, each its own sweep root; one study by name. Each finds the password
    # its own way: (a) in --storage's URL, as before (warned), (b) in PGPASSWORD with a password-free --storage,
    # (c) in a pgpass file with the password-free URL in MNIST_FLAX_STORAGE. Their trials' main.py inherit it.
    pgpass = tmp_path / "pgpass"
    port = postgresql_url.rsplit(":", 1)[1].split("/")[0]
    pgpass.write_text(f"127.0.0.1:{port}:sweeps:sweeper:{PASSWORD}\n")
    pgpass.chmod(0o600)
    clean = {k: v for k, v in os.environ.items() if k not in ("PGPASSWORD", "PGPASSFILE", study.STORAGE_ENV)}
    free_url = without_password(postgresql_url)
    machines = {
        "a": ([f"--storage={postgresql_url}"], {}),
        "b": ([f"--storage={free_url}"], {"PGPASSWORD": PASSWORD}),
        "c": ([], {study.STORAGE_ENV: free_url, "PGPASSFILE": str(pgpass)}),
    }
    workers = []
    for machine, (storage, env) in machines.items():
        command = [sys.executable, "-m", "mnist_flax", "sweep", "--config=configs/mlp.py", "--study=lr-study"]
        command += [f"--root={tmp_path / machine / 'lr'}", *storage, "--pruner=none"]
        command += ["--grid", f"optimizer.learning_rate={','.join(RATES)}", *tiny_settings(tiny_data_dir)]
        with open(tmp_path / f"{machine}.out", "w") as out, open(tmp_path / f"{machine}.err", "w") as err:
            workers.append(
                subprocess.Popen(command, cwd=REPO_ROOT, env={**clean, **SUBPROCESS_ENV, **env}, stdout=out, stderr=err)
            )
    try:
        command_lines = command_lines_while_running(workers)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
            worker.wait(timeout=600)
    outputs = [((tmp_path / f"{m}.out").read_text(), (tmp_path / f"{m}.err").read_text()) for m in machines]
    for worker, (out, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, out[-3000:] + err[-3000:]
    trials = optuna.load_study(study_name="lr-study", storage=postgresql_url).get_trials()

    # Every planned trial exactly once: three trials, each point of the grid, all complete, no retries.
    assert len(trials) == len(RATES)
    assert sorted(t.params["optimizer.learning_rate"] for t in trials) == sorted(map(float, RATES))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    # Each trial's main.py reached the study too: it reported every epoch's validation accuracy.
    assert all(t.intermediate_values for t in trials)
    # Each trial trained in one worker's root, once: the workdirs of the roots are disjoint and cover them.
    workdirs = {t.number: t.user_attrs["workdir"] for t in trials}
    found = sorted(str(p.parent) for p in tmp_path.glob("*/lr/*/final_metrics.json"))
    assert found == sorted(workdirs.values())
    for trial in trials:
        final = json.loads(open(os.path.join(workdirs[trial.number], layout.FINAL_METRICS)).read())
        assert trial.value == final["best_validation"]["val_accuracy"]
        config = json.loads(open(os.path.join(workdirs[trial.number], layout.CONFIG)).read())
        assert config["wandb"]["group"] == "lr-study"
    # Every worker trained one: each takes a trial as it starts, long before the first trial ends. All end with
    # the same study counts; each says how many trials the others trained.
    here = [len(list((tmp_path / machine / "lr").glob("*/trial.json"))) for machine in machines]
    assert here == [1, 1, 1], here
    for out, _ in outputs:
        assert "study lr-study: 3 complete (2 trained elsewhere)" in out
    # The password is on no command line but the one worker a was given: not on any worker's trial launcher or
    # trial (each seen while it ran; a trial forked from the launcher has the launcher's command line, one
    # started as main.py its own), in no record, log or output. Worker a warned about it, once; b and c had no
    # reason to.
    for trial in trials:
        record = json.loads(open(os.path.join(workdirs[trial.number], layout.TRIAL)).read())
        line = command_lines[record["pid"]]
        if record["launch"] == "forked":
            assert line[1:] == ["-m", "mnist_flax.sweeps.launcher", "main.py"], line
        else:
            assert f"--workdir={workdirs[trial.number]}" in line and "main.py" in line[1], line
    with_password = [line for line in command_lines.values() if any(PASSWORD in arg for arg in line)]
    assert with_password == [line for line in command_lines.values() if f"--root={tmp_path / 'a' / 'lr'}" in line]
    assert len(with_password) == 1 and " -m mnist_flax sweep " in f" {' '.join(with_password[0])} "
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.suffix != ".db" and path != pgpass:
            assert PASSWORD not in path.read_text(errors="replace"), path
    assert all(PASSWORD not in out + err for out, err in outputs)
    assert [err.count(study.PASSWORD_IN_ARGV) for _, err in outputs] == [1, 0, 0]
    assert "sweeper:***@127.0.0.1" in outputs[0][0]
    assert f"in {free_url};" in outputs[1][0] and f"in {free_url};" in outputs[2][0]
