"""Sweeps that ride out an outage of their study's storage, and pruning that never throws a last value away.

The outages are real: the tests stop the PostgreSQL server they started (by its pid) while trials train on
Fashion-MNIST, and start it again on the same port. The pruner tests run Optuna's own pruner on a SQLite study.
"""

import json
import os
import subprocess
import sys
import time

import pytest
import services
from conftest import REPO_ROOT, SUBPROCESS_ENV

from mnist_flax import layout
from mnist_flax.errors import Pruned, StorageUnavailable
from mnist_flax.sweeps import study

FASHION = "/usr/share/datasets/fashion-mnist"
RATES = ("0.001", "0.002", "0.003", "0.004")
# Trials of a few seconds each on the real data: long enough for a server to go away while they train.
SETTINGS = {
    "data.local_dir": FASHION,
    "data.train_subset": 12000,
    "data.eval_subset": 2000,
    "num_epochs": 3,
    "wandb.mode": "offline",
    "tensorboard": False,
    "log_every_steps": 20,
}


def sweep_command(root, storage: str, *extra: str, rates=RATES, **settings) -> list[str]:
    fixed = [f"{k}={v}" for k, v in {**SETTINGS, **settings}.items()]
    return (
        [sys.executable, "-m", "mnist_flax", "sweep", "--config=configs/mlp.py", f"--root={root}"]
        + [f"--storage={storage}"]
        + ["--grid", f"optimizer.learning_rate={','.join(rates)}", "--pruner", "none", "--heartbeat", "2"]
        + [item for f in fixed for item in ("--set", f)]
        + list(extra)
    )


def start(command: list[str], log) -> subprocess.Popen:
    return subprocess.Popen(
        command, cwd=REPO_ROOT, env={**os.environ, **SUBPROCESS_ENV}, stdout=log, stderr=subprocess.STDOUT, text=True
    )


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def validations(workdir) -> int:
    try:
        with open(os.path.join(workdir, layout.METRICS)) as f:
            return sum('"val/accuracy"' in line for line in f)
    except OSError:
        return 0


def trial_dirs(root) -> list[str]:
    return sorted(p for p in os.listdir(root) if os.path.isdir(os.path.join(root, p)) and p[:3].isdigit())


def final(workdir) -> dict:
    with open(os.path.join(workdir, layout.FINAL_METRICS)) as f:
        return json.load(f)


needs_fashion = pytest.mark.skipif(
    not os.path.exists(os.path.join(FASHION, "train-images-idx3-ubyte.gz")),
    reason="Fashion-MNIST is not installed (make setup-data)",
)


@pytest.fixture
def server():
    pg = services.PostgreSQL("outage-Pw-1")
    yield pg
    pg.close()


@needs_fashion
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_workers_ride_out_a_database_outage_and_match_an_undisturbed_sweep(server, tmp_path):
    root = tmp_path / "disturbed"
    logs = [open(tmp_path / f"worker-{i}.log", "w") for i in range(2)]
    workers = [start(sweep_command(root, server.url), log) for log in logs]
    # Both workers training, each past its trial's first validation: then the database goes away.
    wait_for(lambda: os.path.isdir(root) and len(trial_dirs(root)) >= 2, 300, "two trials to start")
    first = [root / name for name in trial_dirs(root)[:2]]
    wait_for(lambda: all(validations(w) >= 1 for w in first), 300, "the first validations")
    server.stop()
    down = time.monotonic()
    # The outage outlasts the trials it caught (they finish training without their study and report late) and
    # the heartbeats' grace period (2 beats of 2 s), after which a silent trial could be taken for dead.
    wait_for(lambda: all(os.path.isfile(w / layout.FINAL_METRICS) for w in first), 300, "the caught trials to end")
    time.sleep(max(0.0, 6.0 - (time.monotonic() - down)))
    server.start()
    outage = time.monotonic() - down
    codes = [w.wait(timeout=600) for w in workers]
    for log in logs:
        log.close()
    outputs = [open(log.name).read() for log in logs]
    assert codes == [0, 0], outputs
    for output in outputs:
        assert "Traceback" not in output
    saw = [o for o in outputs if "the study's storage is unreachable" in o]
    assert saw and all("the study's storage is back after" in o for o in saw)
    # Every trial exactly once, all complete, in its own workdir.
    assert len(trial_dirs(root)) == len(RATES)
    the_study = study.load_optuna().load_study(study_name="disturbed", storage=server.url)
    assert sorted(t.state.name for t in the_study.get_trials()) == ["COMPLETE"] * len(RATES)
    # The trials the outage caught end as the same points trained undisturbed (SQLite, one worker).
    clean_root = tmp_path / "undisturbed"
    rates = [json.load(open(w / layout.TRIAL))["params"]["optimizer.learning_rate"] for w in first]
    clean = subprocess.run(
        sweep_command(clean_root, f"sqlite:///{tmp_path / 'clean.db'}", rates=[str(r) for r in rates]),
        cwd=REPO_ROOT,
        env={**os.environ, **SUBPROCESS_ENV},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert clean.returncode == 0, clean.stdout[-3000:] + clean.stderr[-3000:]
    for caught in first:
        rate = json.load(open(caught / layout.TRIAL))["params"]["optimizer.learning_rate"]
        (twin,) = [clean_root / n for n in trial_dirs(clean_root) if json.load(open(clean_root / n / layout.TRIAL))
                   ["params"]["optimizer.learning_rate"] == rate]  # fmt: skip
        a, b = final(caught), final(twin)
        assert a["test"]["accuracy"] == b["test"]["accuracy"]
        assert a["test"]["loss"] == pytest.approx(b["test"]["loss"], rel=1e-6)
        assert a["best_validation"]["val_accuracy"] == b["best_validation"]["val_accuracy"]
    print(f"outage of {outage:.0f} s; worker outputs:\n" + "\n---\n".join(outputs))


@needs_fashion
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_an_outage_past_the_patience_stops_the_trial_resumably(server, tmp_path):
    root = tmp_path / "sweep"
    command = sweep_command(root, server.url, "--storage-patience", "4", rates=RATES[:1], num_epochs=40)
    with open(tmp_path / "first.log", "w") as log:
        worker = start(command, log)
        wait_for(lambda: os.path.isdir(root) and trial_dirs(root), 300, "the trial to start")
        workdir = root / trial_dirs(root)[0]
        wait_for(lambda: validations(workdir) >= 1, 300, "the first validation")
        server.stop()  # 40 epochs: the trial is still training when the patience (4 s) runs out
        code = worker.wait(timeout=300)
    output = open(tmp_path / "first.log").read()
    server.start()
    assert code == StorageUnavailable.exit_code, output
    last = output.strip().splitlines()[-1]
    assert last.startswith("error: the study's storage has been unreachable for") and "--storage-patience 4" in last
    assert "run the same command again" in last and "Traceback" not in output
    stopped = json.load(open(workdir / layout.STOPPED))
    assert stopped["status"] == layout.PREEMPTED  # stopped as on SIGTERM: a checkpoint, resumable
    assert "storage is unreachable" in json.load(open(workdir / layout.TRIAL))["state"]
    again = subprocess.run(command, cwd=REPO_ROOT, env={**os.environ, **SUBPROCESS_ENV}, capture_output=True,
                           text=True, timeout=600)  # fmt: skip
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert final(workdir)["steps"] > stopped["step"]
    assert "resumed at step" in open(workdir / layout.SWEEP_LOG).read()
    assert trial_dirs(root) == [workdir.name]  # the retry trained in the same workdir


# -- the pruner and the study's storage, in the trial's own process (no training) ---------------------


def _study_with_finished_trials(tmp_path, values_at_epoch_1):
    optuna = study.load_optuna()
    url = f"sqlite:///{tmp_path / 'study.db'}"
    the_study = optuna.create_study(
        storage=url, study_name="s", direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=0)
    )
    for value in values_at_epoch_1:
        trial = the_study.ask()
        trial.report(value, 1)
        the_study.tell(trial, value)
    running = the_study.ask()
    return url, running._trial_id


@pytest.mark.parametrize(("last_epoch", "pruned"), [(1, False), (3, True)])
def test_the_pruner_never_prunes_the_last_validation(tmp_path, last_epoch, pruned):
    url, trial_id = _study_with_finished_trials(tmp_path, [0.9, 0.8, 0.85])
    pruner = {"name": "median", "startup_trials": 0, "warmup_epochs": 0}
    reporter = study.Reporter(url, "s", trial_id, pruner, last_epoch=last_epoch)
    if pruned:
        with pytest.raises(Pruned):
            reporter(10, {"epoch": 1, "accuracy": 0.1})
    else:
        reporter(10, {"epoch": 1, "accuracy": 0.1})  # its only epoch: it completes with its value
    stored = study.load_optuna().load_study(study_name="s", storage=url).trials[-1]
    assert stored.intermediate_values == {1: 0.1}


def test_a_trial_trains_on_while_its_study_is_away_and_reports_late(tmp_path, capsys):
    url, trial_id = _study_with_finished_trials(tmp_path, [0.9])
    pruner = {"name": "none", "startup_trials": 0, "warmup_epochs": 0}
    reporter = study.Reporter("postgresql://nobody@127.0.0.1:1/none", "s", trial_id, pruner, last_epoch=3)
    reporter(10, {"epoch": 1, "accuracy": 0.5})  # no server there: no exception, the trial goes on
    reporter(20, {"epoch": 2, "accuracy": 0.6})
    out = capsys.readouterr().out
    assert out.count("the study's storage is unreachable") == 1 and "trains on" in out
    reporter.url = url  # the storage is back
    reporter(30, {"epoch": 3, "accuracy": 0.7})
    assert "reports delivered up to epoch 3" in capsys.readouterr().out
    stored = study.load_optuna().load_study(study_name="s", storage=url).trials[-1]
    assert stored.intermediate_values == {1: 0.5, 2: 0.6, 3: 0.7}


def test_patience_waits_out_a_short_outage_and_gives_up_on_a_long_one(capsys):
    import sqlalchemy.exc

    failures = iter([2, 0])

    def flaky():
        if next(failures):
            raise sqlalchemy.exc.OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))
        return "done"

    patience = study.Patience(30)
    assert patience.call(flaky) == "done"
    out = capsys.readouterr().out
    assert "unreachable" in out and "is back after" in out
    assert not patience.steady(5)

    def down():
        raise sqlalchemy.exc.OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))

    with pytest.raises(StorageUnavailable, match="longer than --storage-patience 1 s"):
        study.Patience(1).call(down)
    with pytest.raises(ZeroDivisionError):  # not an outage: raised at once, as it is
        study.Patience(30).call(lambda: 1 / 0)
