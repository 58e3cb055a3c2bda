"""The Run record: a workdir, a sweep member and an offline W&B run folder read to the same fields."""

import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT, SUBPROCESS_ENV, tiny_overrides

from mnist_flax import layout
from mnist_flax.commands import sync
from mnist_flax.config import schema
from mnist_flax.errors import ConfigError, MnistFlaxError
from mnist_flax.records import runs
from mnist_flax.tracking import wandb_files, wandb_run

# The sweep's members: one epoch, a small learning rate (so test accuracy is not 1.0), no checkpoints.
SETTINGS = {"num_epochs": 1, "optimizer.learning_rate": 0.0001, "checkpoint.enabled": False}
CURVES = ("train/loss", "train/accuracy", "val/loss", "val/accuracy")


@pytest.fixture
def workdir(finished_mlp_run) -> str:
    """One finished tiny MLP run, W&B offline (tests/shared.py's; its test accuracy is below 1.0)."""
    return finished_mlp_run


@pytest.fixture(scope="module")
def sweep_root(tiny_data_dir, tmp_path_factory) -> str:
    """A finished sweep of two members (seeds 0 and 1) made by the local sweep runner."""
    root = str(tmp_path_factory.mktemp("sweep") / "seeds")
    settings = [
        item for o in tiny_overrides(tiny_data_dir, **SETTINGS) for item in ("--set", o.removeprefix("--config."))
    ]
    result = subprocess.run(
        [sys.executable, "-m", "mnist_flax", "sweep", "--config=configs/mlp.py", f"--root={root}", "--grid", "seed=0,1"]
        + settings,
        cwd=REPO_ROOT,
        env={**os.environ, **SUBPROCESS_ENV},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root


def _offline_folder(path: str) -> str:
    (folder,) = glob.glob(os.path.join(path, "wandb", "offline-run-*"))
    return folder


def _read(path: str):
    with open(path) as f:
        return json.load(f)


def _assert_same_run(records: dict[str, runs.RunRecord], path: str) -> None:
    """Every record of `records` holds what the workdir at `path` wrote."""
    final = _read(os.path.join(path, layout.FINAL_METRICS))
    config = schema.flatten(_read(os.path.join(path, layout.CONFIG)))
    with open(os.path.join(path, layout.WANDB_RUN_ID)) as f:
        run_id = f.read().strip()
    for source, record in records.items():
        assert record.status == layout.FINISHED and record.finished and record.stopped is None, source
        assert record.config == config, source
        assert record.config_changes == _read(os.path.join(path, layout.CONFIG_CHANGES)), source
        assert record.wandb_id == run_id == final["wandb"]["run_id"], source
        assert record.git["commit"] == final["git"]["commit"] and record.git["dirty"] == final["git"]["dirty"]
        assert record.test_accuracy == final["test"]["accuracy"] < 1.0, source
        assert record.best_val_accuracy == final["best_validation"]["val_accuracy"], source
        assert record.final["best_validation"]["step"] == final["best_validation"]["step"], source
        assert record.final["steps"] == final["steps"], source
        for key in ("loss", "f1_macro", "auroc_macro", "confusion_matrix", "per_class", "num_examples"):
            assert record.final["test"][key] == final["test"][key], (source, key)
        for key in CURVES:
            steps, values = record.series(key)
            expected_steps, expected_values = records["workdir"].series(key)
            assert len(steps) and steps.tolist() == expected_steps.tolist(), (source, key)
            np.testing.assert_array_equal(values, expected_values, err_msg=f"{source} {key}")
        assert record.series("train/loss")[0][-1] == final["steps"], source
        np.testing.assert_array_equal(record.predictions["label"], records["workdir"].predictions["label"])
        np.testing.assert_array_equal(record.predictions["predicted"], records["workdir"].predictions["predicted"])
        # predictions.csv keeps 6 decimals; the W&B table the full float.
        np.testing.assert_allclose(record.predictions["probs"], records["workdir"].predictions["probs"], atol=1e-6)


def test_a_workdir_and_its_offline_wandb_folder_read_the_same(workdir):
    folder = _offline_folder(workdir)
    records = {"workdir": runs.load(workdir), "wandb_offline": runs.load(folder)}
    assert [r.source for r in records.values()] == ["workdir", "wandb_offline"]
    assert records["workdir"].path == workdir and records["wandb_offline"].path == folder
    assert records["workdir"].name == records["wandb_offline"].name == "mlp"
    _assert_same_run(records, workdir)
    # The whole history, not only the curves: every scalar of every write.
    assert records["wandb_offline"].history == records["workdir"].history


@pytest.mark.slow
def test_a_sweep_member_reads_the_same_as_its_workdir_and_wandb_folder(sweep_root):
    members = runs.expand(sweep_root)
    names = [os.path.basename(path) for path in runs.sweep_members(sweep_root)]
    assert [m.name for m in members] == names == ["000-0", "001-1"]
    assert [m.config["seed"] for m in members] == [0, 1]
    for member in members:
        assert member.config["wandb.group"] == "seeds" and member.config["wandb.name"] == f"seeds/{member.name}"
        records = {
            "workdir": runs.load(member.path),
            "sweep": member,
            "wandb_offline": runs.load(_offline_folder(member.path)),
        }
        _assert_same_run(records, member.path)
        assert member.requested_config == records["workdir"].requested_config
    assert members[0].wandb_id != members[1].wandb_id
    assert members[0].series("train/loss")[1].tolist() != members[1].series("train/loss")[1].tolist()
    # The sweep runner's table reads the same records.
    summary = _read(os.path.join(sweep_root, layout.SUMMARY))
    assert [row["test_accuracy"] for row in summary["runs"]] == [m.test_accuracy for m in members]
    assert [row["best_val_accuracy"] for row in summary["runs"]] == [m.best_val_accuracy for m in members]


@pytest.mark.slow
def test_a_sweep_root_is_not_one_run_and_syncs_all_members(sweep_root, capsys):
    with pytest.raises(ConfigError, match="is a sweep of 2 runs, not one run") as error:
        runs.load(sweep_root)
    assert "\n" not in str(error.value)
    assert len(runs.offline_run_folders(sweep_root)) == 2
    assert sync.main([sweep_root, "--dry-run", "--force"]) == 0
    assert capsys.readouterr().out.count("would sync") == 2


def test_an_interrupted_run_is_not_finished(workdir, tmp_path):
    copy = str(tmp_path / "copy")
    shutil.copytree(workdir, copy)
    finished = runs.load(copy)
    os.remove(os.path.join(copy, layout.FINAL_METRICS))
    killed = runs.load(copy)
    assert killed.status == layout.INCOMPLETE and not killed.finished
    assert killed.final is None and killed.best_val_accuracy is None and killed.test_accuracy is None
    assert killed.history == finished.history and killed.config == finished.config
    assert killed.git == finished.git  # from the W&B run's config, with no final_metrics.json
    assert killed.wandb_id == finished.wandb_id

    stopped = {"status": "preempted", "reason": "SIGTERM at step 12", "step": 12, "exit_code": 3}
    with open(os.path.join(copy, layout.STOPPED), "w") as f:
        json.dump(stopped, f)
    preempted = runs.load(copy)
    assert preempted.status == layout.PREEMPTED and preempted.stopped == stopped
    shutil.copy(os.path.join(workdir, layout.FINAL_METRICS), copy)  # stopped.json is the later word
    assert runs.load(copy).status == layout.PREEMPTED
    with open(os.path.join(copy, layout.STOPPED), "w") as f:
        json.dump({**stopped, "status": "failed", "reason": "non-finite loss at step 12", "exit_code": 2}, f)
    assert runs.load(copy).status == layout.FAILED


def test_a_stopped_wandb_run_is_not_finished(workdir, monkeypatch):
    real_summarize = wandb_files.summarize

    def stopped_at(exit_code):
        def summarize(path):
            summary = real_summarize(path)
            summary["exit_code"] = exit_code
            summary["summary"]["stopped"] = "SIGTERM at step 12"
            return summary

        return summarize

    folder = _offline_folder(workdir)
    for exit_code, status in ((3, "preempted"), (1, "failed"), (None, "incomplete")):
        monkeypatch.setattr(wandb_files, "summarize", stopped_at(exit_code))
        record = runs.load(folder)
        assert record.status == status and record.final is None, exit_code
        if status != layout.INCOMPLETE:
            assert record.stopped == {
                "status": status,
                "reason": "SIGTERM at step 12",
                "step": 20,
                "exit_code": exit_code,
            }


def test_requested_config_is_read_and_falls_back_to_config(workdir, tmp_path):
    copy = str(tmp_path / "copy")
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("wandb"))
    requested = _read(os.path.join(copy, layout.CONFIG))
    requested["train"]["steps_per_call"] = "auto"
    with open(os.path.join(copy, layout.CONFIG_REQUESTED), "w") as f:
        json.dump(requested, f)
    record = runs.load(copy)
    assert record.requested_config["train.steps_per_call"] == "auto"
    assert record.requested_config == {**record.config, "train.steps_per_call": "auto"}
    os.remove(os.path.join(copy, layout.CONFIG_REQUESTED))  # a run from before config_requested.json
    assert runs.load(copy).requested_config == record.config


def test_a_metrics_line_cut_short_is_left_out(workdir, tmp_path):
    copy = str(tmp_path / "copy")
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("wandb"))
    history = runs.load(copy).history
    with open(os.path.join(copy, layout.METRICS), "a") as f:
        f.write('{"step": 21, "train/lo')
    assert runs.load(copy).history == history
    with open(os.path.join(copy, layout.METRICS), "a") as f:
        f.write('\n{"step": 22}\n')
    with pytest.raises(ConfigError, match="metrics.jsonl:.*not a JSON object"):
        runs.load(copy)


@pytest.mark.parametrize("make", ["empty", "other_files", "missing"])
def test_a_folder_that_is_not_a_run_is_one_config_error(tmp_path, make):
    path = tmp_path / "folder"
    if make != "missing":
        path.mkdir()
    if make == "other_files":
        (path / "notes.txt").write_text("not a run")
        (path / "wandb").mkdir()
    with pytest.raises(ConfigError) as error:
        runs.load(str(path))
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    assert ("no such run folder" if make == "missing" else "is not a run workdir (no config.json)") in message


def test_a_wandb_path_without_a_key_is_one_error_and_nothing_heavy_is_imported(tmp_path):
    """In a fresh process: the record imports no jax or TensorFlow, and asks for a key before W&B's API. Looking
    for a key `wandb login` stored is wandb's own lookup, so wandb itself may be imported for it."""
    code = (
        "import sys\n"
        "from mnist_flax.records import runs\n"
        "from mnist_flax.errors import MnistFlaxError\n"
        "try:\n"
        "    runs.load('my-team/mnist/abc12345')\n"
        "except MnistFlaxError as e:\n"
        "    print(type(e).__name__, e)\n"
        "print(sorted(m for m in ('jax', 'tensorflow') if m in sys.modules))\n"
    )
    hidden = (*wandb_run.TOKEN_VARIABLES, "NETRC", "WANDB_CONFIG_DIR")  # and a HOME with no stored key
    env = {**{k: v for k, v in os.environ.items() if k not in hidden}, "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    error, imported = result.stdout.strip().splitlines()
    assert error.startswith("MnistFlaxError my-team/mnist/abc12345: no such folder, and reading it as a W&B run path")
    assert "WANDB_API_KEY" in error
    assert imported == "[]"


def test_wandb_paths_and_local_paths_are_told_apart(tmp_path):
    assert runs.is_wandb_path("entity/project/abc123") and runs.is_wandb_path("entity/project/predictions-x:latest")
    assert not runs.is_wandb_path(str(tmp_path)) and not runs.is_wandb_path("runs/mlp")
    assert not runs.is_wandb_path("./a/b") and not runs.is_wandb_path("a//b")
    with pytest.raises(MnistFlaxError):
        runs.expand(str(tmp_path))  # an empty folder is neither a sweep nor a run


@pytest.mark.parametrize(
    ("state", "summary", "status"),
    [
        ("finished", {}, layout.FINISHED),
        # A stopped run exits non-zero, so W&B says "failed": the status the run recorded says which it was.
        (
            "failed",
            {layout.SUMMARY_STOPPED: "SIGTERM at step 12", layout.SUMMARY_STATUS: layout.PREEMPTED},
            "preempted",
        ),
        ("failed", {layout.SUMMARY_STOPPED: "pruned by ...", layout.SUMMARY_STATUS: layout.PRUNED}, "pruned"),
        ("failed", {layout.SUMMARY_STOPPED: "loss is NaN at step 12", layout.SUMMARY_STATUS: layout.FAILED}, "failed"),
        ("failed", {layout.SUMMARY_STOPPED: "pruned by the sweep's median pruner"}, "failed"),  # words are no status
        ("running", {}, layout.INCOMPLETE),
        ("crashed", {}, layout.INCOMPLETE),
    ],
)
def test_a_wandb_run_state_maps_to_a_status(state, summary, status):
    assert runs._online_status(state, summary) == status
