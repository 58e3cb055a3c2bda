"""The ResNet (BatchNorm): its batch statistics through training, checkpoints, resume, eval_only, predict and
export, in the test process on the tiny IDX data; one run through main.py."""

import json
import os
import shutil

import numpy as np
import pytest
from conftest import make_learnable_split, run_main, tiny_overrides
from flax import traverse_util
from shared import STEPS_PER_EPOCH, checkpoint_steps, tiny_config

from mnist_flax import layout
from mnist_flax.serving import export, predictor, trained
from mnist_flax.training import loop

MIN_TEST_ACCURACY = 0.9
# Two stages of 8 and 16 features: the same blocks, BatchNorm and projections as the config's three, at a quarter
# of its time on the tiny data.
SMALL_STAGES = (8, 16)


def small_config(data_dir: str, **fields):
    config = tiny_config("configs/resnet.py", data_dir, **fields)
    config.model.stage_features = SMALL_STAGES
    return config


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory, tiny_data_dir) -> tuple[str, dict]:
    """configs/resnet.py for two epochs: (workdir, report). Tests that change a workdir copy it first."""
    workdir = str(tmp_path_factory.mktemp("resnet_run"))
    report = loop.train_and_evaluate(small_config(tiny_data_dir), workdir)
    return workdir, report


def test_resnet_trains_and_its_batch_statistics_are_saved(resnet_run):
    workdir, report = resnet_run
    assert report["steps"] == 2 * STEPS_PER_EPOCH
    assert report["test"]["accuracy"] >= MIN_TEST_ACCURACY, report["test"]
    model = trained.from_run(workdir)
    assert set(model.variables) == {"params", "batch_stats"}
    # Every running statistic was updated in training and saved: none is still at BatchNorm's start (mean 0, var 1).
    statistics = traverse_util.flatten_dict(model.model_state["batch_stats"])
    assert statistics and all(path[-1] in ("mean", "var") for path in statistics)
    assert not any(np.allclose(value, 0.0 if path[-1] == "mean" else 1.0) for path, value in statistics.items())


def test_resnet_resumes_and_evaluates_its_checkpoint(resnet_run, tiny_data_dir, tmp_path, capsys):
    workdir, first = resnet_run
    resumed = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed)
    longer = small_config(tiny_data_dir, num_epochs=3)
    longer.resume.allow_config_changes = True  # more epochs: a deliberate change
    capsys.readouterr()
    report = loop.train_and_evaluate(longer, resumed)
    assert f"resumed at step {2 * STEPS_PER_EPOCH}" in capsys.readouterr().out
    assert report["steps"] == 3 * STEPS_PER_EPOCH and 3 * STEPS_PER_EPOCH in checkpoint_steps(resumed)
    assert report["test"]["accuracy"] >= MIN_TEST_ACCURACY
    # eval_only of the first run's best checkpoint: the same test accuracy (the batch statistics restored too).
    config = small_config(tiny_data_dir, eval_only=True, init_from=workdir)
    config.checkpoint.enabled = False
    evaluated = loop.train_and_evaluate(config, str(tmp_path / "eval"))
    assert evaluated["test"]["accuracy"] == first["test"]["accuracy"]


def test_resnet_predicts_and_exports_as_jax_and_onnx(resnet_run, tmp_path):
    workdir, report = resnet_run
    images, labels = make_learnable_split(64, seed=1)
    from_checkpoint = predictor.load(workdir)(images)
    assert from_checkpoint.shape == (64, 10)
    assert (from_checkpoint.argmax(-1) == labels).mean() >= MIN_TEST_ACCURACY
    for fmt in ("jax", "onnx"):  # both evaluate BatchNorm by the running averages the checkpoint holds
        exported = export.export_run(workdir, fmt=fmt, out=str(tmp_path / fmt))
        served = predictor.load(exported.folder)
        assert served.kind == {"jax": "jax export", "onnx": "onnx"}[fmt]
        np.testing.assert_allclose(served(images), from_checkpoint, atol=1e-5)
        np.testing.assert_allclose(served(images[..., None]), from_checkpoint, atol=1e-5)  # with the channel axis


@pytest.mark.slow
def test_resnet_through_main_py(tiny_data_dir, tmp_path):
    args = ["--config=configs/resnet.py", f"--workdir={tmp_path}", *tiny_overrides(tiny_data_dir)]
    result = run_main([*args, f"--config.model.stage_features={SMALL_STAGES}"])
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / layout.FINAL_METRICS).read_text())
    assert report["test"]["accuracy"] >= MIN_TEST_ACCURACY
    assert json.loads((tmp_path / layout.CONFIG).read_text())["train"]["batch_split"] == 1
    assert "resnet with" in result.stdout and os.path.isdir(tmp_path / "checkpoints")
