"""Sweeps: the W&B sweep file and its agent command, and the local sweep runner end to end."""

import itertools
import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import REPO_ROOT, SUBPROCESS_ENV, tiny_overrides
from wandb.sdk.launch.sweeps import utils as sweep_utils

from mnist_flax import config_diff, config_utils, overrides, sweep
from mnist_flax.errors import ConfigError

SWEEP_FILE = os.path.join(REPO_ROOT, "launch", "sweep.yaml")
SWEEP_CONFIG = os.path.join(REPO_ROOT, "configs", "default.py")  # launch/sweep_run.sh's default


def tiny_settings(data_dir: str, leave_out: tuple[str, ...] = ()) -> list[str]:
    """tiny_overrides as `--set FIELD=VALUE` options, one epoch, no checkpoints."""
    overrides = tiny_overrides(data_dir, num_epochs=1, **{"checkpoint.enabled": False})
    overrides = [o.removeprefix("--config.") for o in overrides]
    return [item for o in overrides if o.split("=")[0] not in leave_out for item in ("--set", o)]


def run_sweep(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mnist_flax.sweep", *args],
        cwd=REPO_ROOT,
        env={**os.environ, **SUBPROCESS_ENV},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


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
    base = config_utils.flatten(config_utils.load_config_file(SWEEP_CONFIG))
    names = list(parameters)
    combinations = list(itertools.product(*(sweep_values(parameters[name]) for name in names)))
    assert len(combinations) >= 2
    for values in combinations:
        # The agent's own expansion of ${args}.
        command = {"args": {name: {"value": value} for name, value in zip(names, values, strict=True)}}
        arguments = sweep_utils.create_sweep_command_args(command)["args"]
        assert all(argument.startswith("--config.") for argument in arguments)
        flat = overrides.apply(base, arguments)
        config_utils.validate(flat)
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
    config = config_diff.load_flat(str(workdir))
    assert config["model.name"] == "mlp" and config["optimizer.learning_rate"] == 0.003
    assert (workdir / "final_metrics.json").is_file()


# -- the local runner: argument parsing -----------------------------------------------------


def test_grid_values_split_outside_brackets_and_quotes():
    assert sweep.split_values("cnn,mlp") == ["cnn", "mlp"]
    assert sweep.split_values("(512,256),(128,)") == ["(512,256)", "(128,)"]
    assert sweep.split_values("'a,b',c") == ["'a,b'", "c"]
    with pytest.raises(ConfigError):
        sweep.split_values("(1,2")


def test_grid_and_runs_file_combine_as_a_product(tmp_path):
    runs_file = tmp_path / "runs.txt"
    runs_file.write_text("# two architectures\nmodel.name=cnn\nmodel.name=mlp loss.name=focal\n\n")
    grid = sweep.parse_grid(["optimizer.learning_rate=0.001,0.01"])
    combos = sweep.combinations({"num_epochs": "1"}, sweep.read_runs_file(str(runs_file)), grid)
    assert combos == [
        {"num_epochs": "1", "model.name": "cnn", "optimizer.learning_rate": "0.001"},
        {"num_epochs": "1", "model.name": "cnn", "optimizer.learning_rate": "0.01"},
        {"num_epochs": "1", "model.name": "mlp", "loss.name": "focal", "optimizer.learning_rate": "0.001"},
        {"num_epochs": "1", "model.name": "mlp", "loss.name": "focal", "optimizer.learning_rate": "0.01"},
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--grid", "model.name"], "expected FIELD=VALUE"),
        (["--grid", "model.name="], "expected FIELD=VALUE"),
        (["--grid", "model.name=cnn,,mlp"], "empty value"),
        (["--grid", "model.name=cnn", "--grid", "model.name=mlp"], "given twice"),
        (["--grid", "model.nmae=cnn,mlp"], "unknown config field 'model.nmae'"),
        (["--grid", "model.name=cnn,transformer"], "run 1 (model.name=transformer): model.name: unknown value"),
        (["--grid", "batch_size=64", "--set", "batch_size=32"], "both fixed by --set and varied"),
        (["--set", "num_epochs=1"], "nothing to sweep"),
        (["--runs", "/nonexistent/runs.txt"], "--runs /nonexistent/runs.txt"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(args, message, tmp_path, capsys):
    code = sweep.main(["--config=configs/cnn.py", f"--root={tmp_path / 'sweep'}", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "sweep").exists()  # nothing ran, nothing was written


def test_dry_run_lists_the_runs_and_trains_nothing(tmp_path, capsys):
    root = tmp_path / "dry"
    code = sweep.main(
        ["--config=configs/cnn.py", f"--root={root}", "--grid", "model.name=cnn,mlp", "--grid", "batch_size=32,64"]
        + ["--dry-run"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "[4/4] model.name=mlp batch_size=64" in out
    header = next(line for line in out.splitlines() if line.startswith("run "))
    assert header.split()[:3] == ["run", "model.name", "batch_size"]  # the varied fields
    assert not root.exists()


# -- the local runner end to end ------------------------------------------------------------


def test_local_sweep_trains_a_grid_and_prints_the_comparison(tiny_data_dir, tmp_path):
    root = tmp_path / "sweep-models"
    args = ["--config=configs/cnn.py", f"--root={root}", "--grid", "model.name=cnn,mlp", *tiny_settings(tiny_data_dir)]
    result = run_sweep(args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    lines = result.stdout.splitlines()
    header_index = next(i for i, line in enumerate(lines) if line.startswith("run "))
    header, rows = lines[header_index].split(), lines[header_index + 2 : header_index + 4]
    assert header[:2] == ["run", "model.name"]  # only the field that differs
    assert "model.dense_features" not in lines[header_index]  # same in both runs
    summary = json.loads((root / "summary.json").read_text())
    assert summary["fields"] == ["model.name"]
    for row, name, model in zip(summary["runs"], ["00-cnn", "01-mlp"], ["cnn", "mlp"], strict=True):
        workdir = root / name
        final = json.loads((workdir / "final_metrics.json").read_text())
        assert row["config"] == {"model.name": model}
        assert row["best_val_accuracy"] == final["best_validation"]["val_accuracy"]
        assert row["test_accuracy"] == final["test"]["accuracy"]
        assert config_diff.load_flat(str(workdir))["model.name"] == model
        assert list((workdir / "wandb").glob("offline-run-*"))  # an offline W&B run to sync later
    for row, name in zip(rows, ["00-cnn", "01-mlp"], strict=True):
        cells = row.split()
        final = json.loads((root / name / "final_metrics.json").read_text())
        assert cells[0] == name and cells[-1] == "ok"
        assert cells[-3] == f"{final['best_validation']['val_accuracy']:.4f}"
        assert cells[-2] == f"{final['test']['accuracy']:.4f}"

    # The same command again finds both runs finished and trains nothing.
    again = run_sweep(args, timeout=120)
    assert again.returncode == 0
    assert again.stdout.count("ok (earlier)") == 4  # two progress lines, two table rows


def test_a_failed_run_is_shown_and_the_others_still_run(tiny_data_dir, tmp_path):
    root = tmp_path / "sweep-fail"
    # A validation set larger than the training set: the first run fails at data loading.
    result = run_sweep(
        ["--config=configs/mlp.py", f"--root={root}", "--grid", "data.validation_size=5000,200"]
        + tiny_settings(tiny_data_dir, leave_out=("data.validation_size",))
    )
    assert result.returncode == 1, result.stdout[-3000:]
    summary = {row["run"]: row for row in json.loads((root / "summary.json").read_text())["runs"]}
    assert summary["00-5000"]["status"].startswith("FAILED (exit")
    assert summary["00-5000"]["error"].startswith("error: ")  # the failing run's own error line
    assert summary["01-200"]["status"] == "ok" and summary["01-200"]["test_accuracy"] is not None
    table_rows = [line for line in result.stdout.splitlines() if line.startswith(("00-5000 ", "01-200 "))]
    assert "FAILED" in table_rows[0] and table_rows[1].endswith(" ok")
