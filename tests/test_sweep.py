"""Sweeps: the W&B sweep file and its agent command, and the Optuna sweep end to end (SQLite; PostgreSQL in
test_sweep_postgresql.py)."""

import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import services
import yaml
from conftest import REPO_ROOT, SUBPROCESS_ENV, run_main, tiny_overrides
from shared import tiny_settings
from wandb.sdk.launch.sweeps import utils as sweep_utils

from mnist_flax import layout
from mnist_flax.commands import diff, sweep
from mnist_flax.config import overrides, schema
from mnist_flax.errors import ConfigError
from mnist_flax.sweeps import search_space

SWEEP_FILE = os.path.join(REPO_ROOT, "launch", "sweep.yaml")
SWEEP_CONFIG = os.path.join(REPO_ROOT, "configs", "default.py")  # launch/sweep_run.sh's default


# Plain SGD at a constant rate on the tiny data: 0.05 and 0.1 learn, 1e-7 stays at chance (a clearly bad trial).
SGD = {"optimizer.name": "sgd", "optimizer.schedule": "constant"}


def start_sweep(args: list[str]) -> subprocess.Popen:
    """A sweep worker running in the background, its output (stdout and stderr) read line by line as it comes."""
    return subprocess.Popen(
        [sys.executable, "-m", "mnist_flax", "sweep", *args],
        cwd=REPO_ROOT,
        env={**os.environ, **SUBPROCESS_ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def run_sweep(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mnist_flax", "sweep", *args],
        cwd=REPO_ROOT,
        env={**os.environ, **SUBPROCESS_ENV},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def load_study(root):
    import optuna

    return optuna.load_study(study_name=os.path.basename(root), storage=f"sqlite:///{root}/study.db")


def sweep_values(spec: dict) -> list:
    """Every value a sweep parameter can take (its endpoints, for a range)."""
    if "values" in spec:
        return list(spec["values"])
    if "value" in spec:
        return [spec["value"]]
    return [spec["min"], spec["max"]]


# -- the W&B sweep file ------------------------------------------------------------------


def test_sweep_file_is_valid_and_covers_the_experiment():
    with open(SWEEP_FILE) as f:
        config = yaml.safe_load(f)
    assert config == sweep_utils.load_sweep_config(SWEEP_FILE)  # wandb's own loader reads it the same
    assert config["method"] in ("grid", "random", "bayes")
    assert config["metric"]["goal"] in ("maximize", "minimize")
    fields = {name.removeprefix("config.") for name in config["parameters"]}
    assert {"model.name", "optimizer.name", "optimizer.learning_rate", "batch_size", "loss.name"} <= fields
    assert all(name.startswith("config.") for name in config["parameters"])
    assert "${args}" in config["command"] and "${program}" in config["command"]
    program = os.path.join(REPO_ROOT, config["program"])
    assert os.path.isfile(program) and os.access(program, os.X_OK)


def test_every_sweep_combination_is_accepted_by_the_config():
    with open(SWEEP_FILE) as f:
        parameters = yaml.safe_load(f)["parameters"]
    base = schema.flatten(schema.load_config_file(SWEEP_CONFIG))
    names = list(parameters)
    combinations = list(itertools.product(*(sweep_values(parameters[name]) for name in names)))
    assert len(combinations) >= 2
    for values in combinations:
        # The agent's own expansion of ${args}.
        command = {"args": {name: {"value": value} for name, value in zip(names, values, strict=True)}}
        arguments = sweep_utils.create_sweep_command_args(command)["args"]
        assert all(argument.startswith("--config.") for argument in arguments)
        flat = overrides.apply(base, arguments)
        schema.validate(flat)
        for name, value in zip(names, values, strict=True):
            assert flat[name.removeprefix("config.")] == value


def test_sweep_run_script_trains_in_a_workdir_named_after_the_run(tiny_data_dir, tmp_path):
    """What the agent starts for one trial: launch/sweep_run.sh with ${args} expanded."""
    command = {"args": {"config.model.name": {"value": "mlp"}, "config.optimizer.learning_rate": {"value": 0.003}}}
    arguments = sweep_utils.create_sweep_command_args(command)["args"]
    env = {
        **os.environ,
        **SUBPROCESS_ENV,
        "WANDB_SWEEP_ID": "sweep123",
        "WANDB_RUN_ID": "run45678",
        "SWEEP_RUNS_DIR": str(tmp_path),
        "SWEEP_CONFIG": "configs/cnn.py",
    }
    arguments += tiny_overrides(tiny_data_dir, num_epochs=1, **{"checkpoint.enabled": False})
    result = subprocess.run(
        ["bash", os.path.join(REPO_ROOT, "launch", "sweep_run.sh"), *arguments],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    workdir = tmp_path / "sweep-sweep123" / "run45678"
    config = diff.load_flat(str(workdir))
    assert config["model.name"] == "mlp" and config["optimizer.learning_rate"] == 0.003
    assert (workdir / layout.FINAL_METRICS).is_file()


def test_the_sweep_file_is_generated_from_the_config_files_search_space():
    """launch/sweep.yaml and the local study read one declaration: configs/default.py's sweep()."""
    result = run_sweep(["--config=configs/default.py", "--sweep", "--wandb-yaml"], timeout=120)
    assert result.returncode == 0, result.stderr
    with open(SWEEP_FILE) as f:
        assert f.read() == result.stdout  # regenerate with the command in the file's header
    space = search_space.from_config_file(SWEEP_CONFIG, "")
    parameters = sweep_utils.load_sweep_config(SWEEP_FILE)["parameters"]
    assert parameters == {f"config.{name}": spec for name, spec in space.items()}


# -- the Optuna sweep: declaring and checking the space -------------------------------------


def test_grid_values_split_outside_brackets_and_quotes():
    assert search_space.split_values("cnn,mlp") == ["cnn", "mlp"]
    assert search_space.split_values("(512,256),(128,)") == ["(512,256)", "(128,)"]
    assert search_space.split_values("'a,b',c") == ["'a,b'", "c"]
    with pytest.raises(ConfigError):
        search_space.split_values("(1,2")


def test_the_command_line_declares_what_a_config_file_does():
    base = schema.flatten(schema.load_config_file(SWEEP_CONFIG))
    from_file = search_space.normalise(search_space.from_config_file(SWEEP_CONFIG, "lr"), base)
    from_flags = search_space.from_command_line(
        base,
        [],
        ["loss.label_smoothing=0.0,0.2"],
        ["optimizer.learning_rate=1e-4,1e-2", "optimizer.weight_decay=1e-6,1e-2"],
    )
    assert search_space.normalise(from_flags, base) == from_file
    grid = search_space.from_command_line(base, ["model.dense_features=(512,256),(128,)", "batch_size=64,128"], [], [])
    assert grid == {"model.dense_features": {"values": [[512, 256], [128]]}, "batch_size": {"values": [64, 128]}}
    assert search_space.assignments({"model.dense_features": [512, 256], "batch_size": 64}) == {
        "model.dense_features": "(512, 256)",
        "batch_size": "64",
    }


def test_a_runs_file_is_one_choice_crossed_with_the_grid(tmp_path):
    runs_file = tmp_path / "runs.txt"
    runs_file.write_text("# two architectures\nmodel.name=cnn\nmodel.name=mlp loss.name=focal\n\n")
    space = {**search_space.from_runs_file(str(runs_file)), "optimizer.learning_rate": {"values": [0.001, 0.01]}}
    points = [search_space.assignments(point) for point in search_space.grid_points(space)]
    assert points == [
        {"model.name": "cnn", "optimizer.learning_rate": "0.001"},
        {"model.name": "cnn", "optimizer.learning_rate": "0.01"},
        {"model.name": "mlp", "loss.name": "focal", "optimizer.learning_rate": "0.001"},
        {"model.name": "mlp", "loss.name": "focal", "optimizer.learning_rate": "0.01"},
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--grid", "model.name"], "expected FIELD=VALUE"),
        (["--grid", "model.name="], "expected FIELD=VALUE"),
        (["--grid", "model.name=cnn,,mlp"], "empty value"),
        (["--grid", "model.name=cnn", "--grid", "model.name=mlp"], "given twice"),
        (["--grid", "model.nmae=cnn,mlp"], "unknown config field 'model.nmae'"),
        (
            ["--grid", "model.name=cnn,transformer"],
            "trial 1 (model.name=transformer): model.name: unknown model 'transformer' (registered: cnn, mlp",
        ),
        (["--grid", "batch_size=64", "--set", "batch_size=32"], "both fixed by --set and varied"),
        (["--grid", "batch_size=64,sixty"], "--grid batch_size: expects int, got 'sixty'"),
        (["--set", "num_epochs=1"], "nothing to sweep"),
        (["--runs", "/nonexistent/runs.txt"], "--runs /nonexistent/runs.txt"),
        (["--uniform", "optimizer.learning_rate=0.1"], "expected FIELD=LOW,HIGH"),
        (["--uniform", "optimizer.learning_rate=0.1,0.01"], "min < max"),
        (["--log-uniform", "optimizer.weight_decay=0,0.01"], "needs min > 0"),
        (
            ["--uniform", "optimizer.learning_rate=-1,0.01", "--trials", "3"],
            "the search space (optimizer.learning_rate=-1): ",
        ),
        (["--log-uniform", "optimizer.learning_rate=1e-4,1e-2"], "--sampler tpe needs --trials N"),
        (["--grid", "seed=0,1", "--sampler", "grid", "--trials", "3"], "--trials is for random and TPE sampling"),
        (["--uniform", "seed=0,9", "--sampler", "grid"], "seed is a range"),
        (["--sweep=nothing"], "has no sweep_nothing() function"),
        (["--sweep", "--grid", "batch_size=32,64"], "batch_size is declared twice"),
        (["--grid", "seed=0,1", "--storage", "nosuchdb://x"], "--storage nosuchdb://x: cannot open"),
        (["--log-uniform", "optimizer.learning_rate=1e-4,1e-2", "--trials", "0"], "--trials must be at least 1"),
        (["--grid", "seed=0,1", "--storage-patience", "-1"], "--storage-patience must be 0 or more"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(args, message, tmp_path, capsys):
    code = sweep.main(["--config=configs/default.py", f"--root={tmp_path / 'sweep'}", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    if "--storage" not in args:
        assert not (tmp_path / "sweep").exists()  # nothing ran, nothing was written


def test_a_file_given_as_the_root_is_said_in_words(tmp_path, capsys):
    root = tmp_path / "notes.txt"
    root.write_text("mine")
    code = sweep.main(["--config=configs/default.py", f"--root={root}", "--grid", "seed=0,1"])
    err = capsys.readouterr().err
    assert (
        code == 2 and err == f"error: --root {root} is a file, not a folder: name a folder for the trials' workdirs\n"
    )
    assert root.read_text() == "mine"


def test_dry_run_lists_the_grid_and_trains_nothing(tmp_path, capsys):
    root = tmp_path / "dry"
    args = ["--config=configs/cnn.py", f"--root={root}", "--grid", "model.name=cnn,mlp", "--grid", "batch_size=32,64"]
    assert sweep.main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "study dry: 4 trial(s), grid sampling, median pruning" in out
    assert "[4/4] model.name=mlp batch_size=64" in out
    assert not root.exists()


# -- the Optuna sweep end to end --------------------------------------------------------------


@pytest.mark.slow
def test_a_grid_study_trains_each_point_prunes_the_bad_one_and_continues(tiny_data_dir, tmp_path):
    import optuna

    root = tmp_path / "sweep-lr"
    args = ["--config=configs/mlp.py", f"--root={root}", "--grid", "optimizer.learning_rate=0.05,0.1,1e-7"]
    args += ["--prune-startup", "2", *tiny_settings(tiny_data_dir, num_epochs=3, **SGD)]
    result = run_sweep(args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    names = ["000-0.05", "001-0.1", "002-1e-07"]
    assert [os.path.basename(p) for p in sorted(root.glob("0*"))] == names

    trials = load_study(str(root)).get_trials()
    assert [t.params["optimizer.learning_rate"] for t in trials] == [0.05, 0.1, 1e-7]  # each point once
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2 + [optuna.trial.TrialState.PRUNED]
    for trial, name in zip(trials[:2], names[:2], strict=True):
        final = json.loads((root / name / layout.FINAL_METRICS).read_text())
        assert trial.value == final["best_validation"]["val_accuracy"]  # the objective is what the run recorded
        assert sorted(trial.intermediate_values) == [1, 2, 3]  # reported after each epoch's validation
        assert trial.user_attrs["workdir"] == str(root / name)
    # The bad trial: pruned by the median pruner after its first epoch, in its own main.py, with its record.
    pruned = trials[2]
    assert list(pruned.intermediate_values) == [1] and pruned.intermediate_values[1] < 0.3
    stopped = json.loads((root / names[2] / layout.STOPPED).read_text())
    steps_per_epoch = (1200 - 200) // 50
    assert stopped["status"] == layout.PRUNED and stopped["exit_code"] == 4
    assert stopped["step"] == steps_per_epoch < 3 * steps_per_epoch  # before its last epoch
    assert "pruned by the sweep's median pruner after epoch 1" in stopped["reason"]
    record = json.loads((root / names[2] / layout.TRIAL).read_text())
    assert record["exit_code"] == 4
    # Its last validation is kept where the results are read: trial.json, compare's table, the summary.
    assert record["last_validation"] == {"epoch": 1, "step": steps_per_epoch,
                                         "val_accuracy": pruned.intermediate_values[1]}  # fmt: skip

    # Every trial a tracked run: an offline W&B run grouped under the study's name.
    for name in names:
        config = diff.load_flat(str(root / name))
        assert config["wandb.group"] == "sweep-lr" and config["wandb.name"] == f"sweep-lr/{name}"
        assert list((root / name / "wandb").glob("offline-run-*"))
    # The closing table is compare's.
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("run "))
    assert lines[header].split()[:3] == ["run", "status", "optimizer.learning_rate"]
    assert [line.split()[:2] for line in lines[header + 2 : header + 5]] == [
        [names[0], "finished"],
        [names[1], "finished"],
        [names[2], "pruned"],
    ]
    pruned_row = lines[header + 4].split()
    assert pruned_row[3] == f"{pruned.intermediate_values[1]:.4f}*"  # best so far, marked intermediate
    note = next(line for line in lines if line.startswith(f"{names[2]}: pruned: "))
    assert f"last validation (epoch 1): acc {pruned.intermediate_values[1]:.4f}" in note
    assert "study sweep-lr: 2 complete, 1 pruned" in result.stdout
    summary = json.loads((root / layout.SUMMARY).read_text())
    best = max(trials[:2], key=lambda t: t.value)
    assert summary["best"]["number"] == best.number and summary["states"] == {"complete": 2, "pruned": 1}
    assert [(p["number"], p["epoch"], p["value"]) for p in summary["pruned"]] == [
        (pruned.number, 1, pruned.intermediate_values[1])
    ]

    # The same command again continues the study: nothing left to train, the trials are kept.
    again = run_sweep(args, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "[trial" not in again.stdout and "study sweep-lr: 2 complete, 1 pruned" in again.stdout
    assert len(load_study(str(root)).get_trials()) == 3
    # Another sweep in the same root is refused, and the study is untouched.
    other = run_sweep([*args[:3], "optimizer.learning_rate=0.05,0.2", *args[4:]], timeout=120)
    assert other.returncode == 2 and other.stderr.startswith("error: ") and other.stderr.count("\n") == 1
    assert "already holds a different sweep" in other.stderr
    assert len(load_study(str(root)).get_trials()) == 3


@pytest.mark.slow
def test_a_worker_killed_mid_trial_is_retried_from_its_checkpoint(tiny_data_dir, tmp_path):
    """SIGKILL the worker mid-trial: its main.py saves (SIGTERM from the dying parent); the rerun resumes it."""
    import optuna

    root = tmp_path / "sweep-kill"
    args = ["--config=configs/mlp.py", f"--root={root}", "--grid", "seed=0,1", "--heartbeat", "1", "-v"]
    args += tiny_settings(tiny_data_dir, num_epochs=4, **{"checkpoint.enabled": True})
    worker = start_sweep(args)
    seen = []
    for line in worker.stdout:
        seen.append(line)
        if "step 52/" in line:  # trial 0, epoch 3 of 4: two checkpoints behind it
            break
    worker.kill()
    worker.communicate(timeout=60)
    assert "step 52/" in seen[-1], "".join(seen[-30:])
    trial_record = json.loads((root / "000-0" / layout.TRIAL).read_text())
    assert services.wait_until_gone(trial_record["pid"], 120)  # the orphaned main.py saves and exits on its own
    stopped = json.loads((root / "000-0" / layout.STOPPED).read_text())
    assert stopped["status"] == layout.PREEMPTED and stopped["step"] >= 52
    # main.py writes its log itself: what it printed before and after its worker died is kept (through a pipe
    # to the dead worker, its last lines would have failed it with BrokenPipeError before it saved).
    log = (root / "000-0" / layout.SWEEP_LOG).read_text()
    assert "step 52/" in log and f"error: SIGTERM at step {stopped['step']}" in log, log[-2000:]
    first_run_id = (root / "000-0" / layout.WANDB_RUN_ID).read_text()

    time.sleep(2.5)  # past the grace period (2 heartbeats): the next worker finds trial 0 stale
    rerun = run_sweep(args)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "(retry of trial 0, as trial 2)" in rerun.stdout
    attempts = load_study(str(root)).get_trials()
    assert [t.state for t in attempts] == [
        optuna.trial.TrialState.FAIL,  # the dead worker's attempt, failed by the heartbeat check
        optuna.trial.TrialState.COMPLETE,
        optuna.trial.TrialState.COMPLETE,  # its retry, in the same workdir
    ]
    assert attempts[2].system_attrs["failed_trial"] == 0 and attempts[2].params == attempts[0].params
    log = (root / "000-0" / layout.SWEEP_LOG).read_text()
    assert f"resumed at step {stopped['step']}" in log  # the retry started from the saved step, not from 0
    final = json.loads((root / "000-0" / layout.FINAL_METRICS).read_text())
    assert final["steps"] == 4 * 20 and not (root / "000-0" / layout.STOPPED).exists()
    assert (root / "000-0" / layout.WANDB_RUN_ID).read_text() == first_run_id  # one W&B run across both starts
    assert attempts[2].value == final["best_validation"]["val_accuracy"]


@pytest.mark.slow
def test_trials_are_forked_a_killed_one_fails_alone_and_each_is_the_run_main_py_gives(tiny_data_dir, tmp_path):
    """Trials are children of the worker's launcher: a trial killed outright fails, the next one is forked as
    before, and a forked trial trains exactly what `python main.py` with its command line does. A launcher
    killed during a trial leaves that trial to stop with a checkpoint (its outcome read from its stopped.json),
    and every later trial, its retry included, starts as main.py."""
    root = tmp_path / "sweep-fork"
    args = ["--config=configs/mlp.py", f"--root={root}", "--grid", "seed=0,1,2,3", "--pruner=none", "-v"]
    args += tiny_settings(tiny_data_dir, num_epochs=3, **{"checkpoint.enabled": True})
    worker = start_sweep(args)
    seen, trial_killed, launchers = [], False, []
    for line in worker.stdout:
        seen.append(line)
        if not line.startswith("  | epoch 1/3 step "):  # a trial trains: two epochs to go
            continue
        if not trial_killed:  # trial 0
            os.kill(json.loads((root / "000-0" / layout.TRIAL).read_text())["pid"], signal.SIGKILL)
            trial_killed = True
        elif (root / "002-2" / layout.TRIAL).exists():  # trial 2: its launcher goes
            with open(f"/proc/{worker.pid}/task/{worker.pid}/children") as f:
                children = [int(pid) for pid in f.read().split()]
            launchers = [pid for pid in children if b"sweeps.launcher" in open(f"/proc/{pid}/cmdline", "rb").read()]
            assert len(launchers) == 1, children
            os.kill(launchers[0], signal.SIGKILL)
            break
    rest, _ = worker.communicate(timeout=300)
    output = "".join(seen) + rest
    assert launchers and worker.returncode == 1, output[-3000:]  # trials failed

    killed = json.loads((root / "000-0" / layout.TRIAL).read_text())
    assert killed["launch"] == "forked" and killed["exit_code"] == -signal.SIGKILL
    assert killed["state"].startswith("fail")
    trial = json.loads((root / "001-1" / layout.TRIAL).read_text())
    assert trial["launch"] == "forked" and trial["exit_code"] == 0 and trial["pid"] != killed["pid"]
    assert trial["state"].startswith("complete")
    # Trial 2, sent SIGTERM by the kernel as its launcher died, saved a checkpoint: its retry resumed from it.
    # It and trial 3 started as main.py.
    assert (
        "stopped, queued again in" in output
        and "the trial launcher stopped during the trial; it had stopped (stopped.json): SIGTERM at step " in output
    ), output[-3000:]
    assert "resumed at step " in (root / "002-2" / layout.SWEEP_LOG).read_text()
    for number in ("002-2", "003-3"):
        plain_trial = json.loads((root / number / layout.TRIAL).read_text())
        assert plain_trial["launch"] == "main.py" and plain_trial["state"].startswith("complete"), plain_trial
    assert output.count("trials now start as main.py: the trial launcher stopped (exit -9)") == 1, output[-3000:]
    header = (root / "003-3" / layout.SWEEP_LOG).read_text().splitlines()[1]
    assert header.endswith("  # the launcher stopped: the trial starts as main.py")

    # The log's first line is the trial as a main.py command: run as such, it trains the same model.
    first = (root / "001-1" / layout.SWEEP_LOG).read_text().splitlines()[0]
    command, note = first.removeprefix("$ ").split("  # ")
    assert note == "forked from the worker's trial launcher"
    argv = shlex.split(command)
    assert argv[1] == "main.py" and f"--workdir={root / '001-1'}" in argv
    plain = tmp_path / "plain"
    result = run_main([a if not a.startswith("--workdir=") else f"--workdir={plain}" for a in argv[2:]])
    assert result.returncode == 0, result.stderr[-3000:]
    assert (plain / layout.PREDICTIONS).read_bytes() == (root / "001-1" / layout.PREDICTIONS).read_bytes()
    forked_final = json.loads((root / "001-1" / layout.FINAL_METRICS).read_text())
    plain_final = json.loads((plain / layout.FINAL_METRICS).read_text())
    assert plain_final["test"] == forked_final["test"] and plain_final["steps"] == forked_final["steps"] == 60


def test_workers_that_create_the_study_storage_at_once_all_open_it(tmp_path):
    """Optuna creates its tables on first use; of workers starting together, the later ones must not fail."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    start = time.time() + 3  # every process imports Optuna first, then all open the new database together
    code = (
        "import sys, time; from mnist_flax.sweeps import study; study.load_optuna(); "
        f"time.sleep(max(0, {start} - time.time())); study.open_storage({url!r}, 60); print('opened')"
    )
    workers = [
        subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(4)
    ]
    results = [worker.communicate(timeout=120) for worker in workers]
    assert [out.decode().strip() for out, _ in results] == ["opened"] * 4, [err.decode()[-500:] for _, err in results]
