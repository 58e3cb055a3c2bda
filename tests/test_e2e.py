"""Every config trains end to end on tiny settings; the real data set reaches its accuracy floors."""

import glob
import json
import os

import pytest
from conftest import REPO_ROOT, run_main, tiny_overrides

from mnist_flax import layout

CONFIG_FILES = sorted(
    os.path.relpath(p, REPO_ROOT)
    for p in glob.glob(os.path.join(REPO_ROOT, "configs", "*.py"))
    if not p.endswith("__init__.py")
)


@pytest.mark.parametrize("config_file", CONFIG_FILES)
def test_every_config_trains_a_few_steps(config_file, tiny_data_dir, tmp_path):
    result = run_main(
        [f"--config={config_file}", f"--workdir={tmp_path}", *tiny_overrides(tiny_data_dir, num_epochs=1)]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for name in (layout.CONFIG, layout.CONFIG_CHANGES, layout.METRICS, layout.FINAL_METRICS, layout.PREDICTIONS):
        assert (tmp_path / name).is_file(), name
    report = json.loads((tmp_path / layout.FINAL_METRICS).read_text())
    assert report["steps"] == (1200 - 200) // 50
    assert set(report["test"]) >= {"accuracy", "precision_macro", "recall_macro", "f1_macro", "auroc_macro"}
    assert "done:" in result.stdout and str(tmp_path) in result.stdout
    # The summary lists the run's files and folders that are there, and only those.
    lines = result.stdout.splitlines()
    listed = lines[lines.index(f"workdir: {tmp_path}") + 1].strip().split(", ")
    assert listed[:4] == [layout.CONFIG, layout.METRICS, layout.FINAL_METRICS, layout.PREDICTIONS]
    for folder in (layout.CHECKPOINTS, layout.TENSORBOARD):
        assert (f"{folder}/" in listed) == (tmp_path / folder).is_dir(), folder


def test_bare_command_makes_a_fresh_workdir(tiny_data_dir):
    result = run_main(["--config=configs/mlp.py", *tiny_overrides(tiny_data_dir, num_epochs=1)])
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("workdir: "))
    workdir = line.split(": ", 1)[1]
    try:
        assert os.path.relpath(workdir, REPO_ROOT).startswith("runs" + os.sep + "mlp-")
        assert os.path.isfile(os.path.join(workdir, layout.FINAL_METRICS))
    finally:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)


REAL_DATA = ["--config.wandb.mode=disabled", "--config.tensorboard=False", "--config.checkpoint.enabled=False"]


@pytest.mark.slow
def test_mlp_reaches_80_percent_on_fashion_mnist_in_one_epoch(fashion_dir, tmp_path):
    result = run_main(
        [
            "--config=configs/mlp.py",
            f"--workdir={tmp_path}",
            "--config.num_epochs=1",
            f"--config.data.local_dir={fashion_dir}",
            *REAL_DATA,
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / layout.FINAL_METRICS).read_text())
    assert report["steps"] == 55000 // 128  # one full epoch of the 55,000 training examples
    assert report["test"]["num_examples"] == 10000
    assert report["test"]["accuracy"] >= 0.80, report["test"]["accuracy"]


@pytest.mark.slow
def test_cnn_beats_70_percent_on_a_fashion_mnist_subset(fashion_dir, tmp_path):
    result = run_main(
        [
            "--config=configs/cnn.py",
            f"--workdir={tmp_path}",
            "--config.num_epochs=1",
            "--config.data.train_subset=8000",
            f"--config.data.local_dir={fashion_dir}",
            *REAL_DATA,
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / layout.FINAL_METRICS).read_text())
    assert report["test"]["num_examples"] == 10000
    assert report["test"]["accuracy"] >= 0.70, report["test"]["accuracy"]
