"""`loop.train_and_evaluate` called in the test process on the tiny IDX data, as flax's train_test.py does.

The subprocess tests (test_e2e.py, test_train.py) check what a user sees from
`main.py`; these check the loop itself where it runs: the report, the files it
writes, the checkpoints, resume and eval_only, for the MLP and the CNN config.
"""

import csv
import json
import os
import shutil

import numpy as np
import pytest
from shared import BATCH_SIZE, STEPS_PER_EPOCH, checkpoint_steps, tiny_config

from mnist_flax import layout
from mnist_flax.datasets import _mnist_family
from mnist_flax.errors import ConfigError, MnistFlaxError
from mnist_flax.training import loop

TEST_EXAMPLES = 300
# The tiny data set is a bright block at one of ten places: a trained model
# reaches 100% in two epochs (MLP and CNN, seed 0); chance is 10%.
MIN_TEST_ACCURACY = 0.9


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_predictions_csv(path: str) -> tuple[list[str], np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], np.asarray(rows[1:], dtype=float)


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory, tiny_data_dir) -> tuple[str, dict]:
    """configs/mlp.py for two epochs: (workdir, report). Tests that change a workdir copy it first."""
    workdir = str(tmp_path_factory.mktemp("mlp_run"))
    report = loop.train_and_evaluate(tiny_config("configs/mlp.py", tiny_data_dir), workdir)
    return workdir, report


def assert_trained(report: dict, workdir: str, num_epochs: int = 2) -> None:
    """What every finished run gives: learned, the right number of steps, a checkpoint at each epoch end."""
    assert report["steps"] == num_epochs * STEPS_PER_EPOCH
    assert report["test"]["accuracy"] >= MIN_TEST_ACCURACY, report["test"]
    assert report["best_validation"]["val_accuracy"] >= MIN_TEST_ACCURACY
    assert report["best_validation"]["step"] in checkpoint_steps(workdir)
    assert {STEPS_PER_EPOCH * (epoch + 1) for epoch in range(num_epochs)} <= checkpoint_steps(workdir)


def test_mlp_trains_and_writes_its_records(mlp_run, tiny_data_dir):
    workdir, report = mlp_run
    assert_trained(report, workdir)
    assert checkpoint_steps(workdir) == {STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH}

    with open(os.path.join(workdir, layout.CONFIG)) as f:
        saved_config = json.load(f)
    assert saved_config["model"]["name"] == "mlp" and saved_config["num_epochs"] == 2
    assert saved_config["batch_size"] == BATCH_SIZE and saved_config["data"]["local_dir"] == tiny_data_dir

    # metrics.jsonl: the training loss, logged every few steps, falls.
    records = read_jsonl(os.path.join(workdir, layout.METRICS))
    losses = [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]
    assert len(losses) >= 2 * STEPS_PER_EPOCH // 5
    assert [step for step, _ in losses] == sorted({step for step, _ in losses})
    assert losses[-1][0] == 2 * STEPS_PER_EPOCH
    first_loss, last_loss = losses[0][1], losses[-1][1]
    assert last_loss < 0.6 * first_loss, losses
    assert any("val/accuracy" in r for r in records) and any("test/accuracy" in r for r in records)

    # final_metrics.json holds the returned report, numbers as numbers.
    with open(os.path.join(workdir, layout.FINAL_METRICS)) as f:
        final = json.load(f)
    assert final == json.loads(json.dumps(report, default=str))
    assert final["test"]["accuracy"] == report["test"]["accuracy"] and isinstance(final["test"]["accuracy"], float)
    assert final["steps"] == report["steps"]

    # predictions.csv: one row per test image, the predicted class is the most probable one.
    header, table = read_predictions_csv(os.path.join(workdir, layout.PREDICTIONS))
    assert header[:4] == ["index", "label", "predicted", "confidence"]
    assert table.shape == (TEST_EXAMPLES, 4 + 10)
    probs = table[:, 4:]
    np.testing.assert_array_equal(probs.argmax(axis=1), table[:, 2].astype(int))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    np.testing.assert_allclose(table[:, 3], probs.max(axis=1), atol=1e-6)
    test_labels = _mnist_family.load_idx_split(tiny_data_dir, "test").labels
    np.testing.assert_array_equal(table[:, 1].astype(int), test_labels)
    assert np.mean(table[:, 2] == table[:, 1]) == pytest.approx(report["test"]["accuracy"], abs=1e-6)


def test_resume_with_more_epochs(mlp_run, tiny_data_dir, tmp_path, capsys):
    first_workdir, first_report = mlp_run
    workdir = str(tmp_path / "resumed")
    shutil.copytree(first_workdir, workdir)
    lines_before = len(read_jsonl(os.path.join(workdir, layout.METRICS)))
    capsys.readouterr()

    longer = tiny_config("configs/mlp.py", tiny_data_dir, num_epochs=3)
    # More epochs change the schedule: refused as config drift, unless asked for deliberately.
    with pytest.raises(ConfigError, match=r"num_epochs: 2 -> 3"):
        loop.train_and_evaluate(longer, workdir)
    longer.resume.allow_config_changes = True
    report = loop.train_and_evaluate(longer, workdir)

    saved_step = 2 * STEPS_PER_EPOCH
    assert f"resumed at step {saved_step}" in capsys.readouterr().out
    assert_trained(report, workdir, num_epochs=3)
    assert 3 * STEPS_PER_EPOCH in checkpoint_steps(workdir)
    # Only the third epoch was trained: every train line this run appended is past the saved step.
    appended = read_jsonl(os.path.join(workdir, layout.METRICS))[lines_before:]
    train_steps = [r["step"] for r in appended if "train/loss" in r]
    assert train_steps and min(train_steps) > saved_step and max(train_steps) == 3 * STEPS_PER_EPOCH
    assert min(r["step"] for r in appended) >= saved_step
    assert first_report["steps"] == saved_step


def test_eval_only_reproduces_the_best_checkpoint(mlp_run, tiny_data_dir, tmp_path):
    first_workdir, first_report = mlp_run
    # The first run's validation accuracy ties at its last epoch, and among equals the latest is
    # best: its latest checkpoint, which init_from=workdir loads, is the model its report is for.
    assert first_report["best_validation"]["step"] == max(checkpoint_steps(first_workdir))
    workdir = str(tmp_path / "eval_only")
    config = tiny_config("configs/mlp.py", tiny_data_dir, init_from=first_workdir, eval_only=True)

    report = loop.train_and_evaluate(config, workdir)

    assert report["test"]["accuracy"] == first_report["test"]["accuracy"]
    assert report["test"]["loss"] == pytest.approx(first_report["test"]["loss"], rel=1e-5)
    _, first_table = read_predictions_csv(os.path.join(first_workdir, layout.PREDICTIONS))
    _, table = read_predictions_csv(os.path.join(workdir, layout.PREDICTIONS))
    np.testing.assert_allclose(table, first_table, atol=1e-5)
    # Nothing was trained and no checkpoint of its own was written.
    records = read_jsonl(os.path.join(workdir, layout.METRICS))
    assert not any("train/loss" in r for r in records)
    assert not os.path.isdir(os.path.join(workdir, "checkpoints")) or checkpoint_steps(workdir) == set()


def test_cnn_trains(tiny_data_dir, tmp_path):
    workdir = str(tmp_path / "cnn")
    report = loop.train_and_evaluate(tiny_config("configs/cnn.py", tiny_data_dir), workdir)
    assert_trained(report, workdir)
    for name in (layout.CONFIG, layout.METRICS, layout.FINAL_METRICS, layout.PREDICTIONS):
        assert os.path.isfile(os.path.join(workdir, name)), name
    with open(os.path.join(workdir, layout.CONFIG)) as f:
        assert json.load(f)["model"]["name"] == "cnn"


def test_validation_callbacks_see_every_validation_and_can_stop_the_run(tiny_data_dir, tmp_path):
    seen = []
    config = tiny_config("configs/mlp.py", tiny_data_dir, num_epochs=3)
    report = loop.train_and_evaluate(
        config, str(tmp_path / "watched"), on_validation=(lambda step, val: seen.append((step, val["accuracy"])),)
    )
    assert [step for step, _ in seen] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH, 3 * STEPS_PER_EPOCH]
    assert max(accuracy for _, accuracy in seen) == report["best_validation"]["val_accuracy"]

    class Pruned(MnistFlaxError):
        """What a sweep's pruner would raise."""

    def prune(step, val):
        raise Pruned(f"pruned at step {step}")

    workdir = tmp_path / "pruned"
    with pytest.raises(Pruned, match=f"pruned at step {STEPS_PER_EPOCH}"):
        loop.train_and_evaluate(
            tiny_config("configs/mlp.py", tiny_data_dir, num_epochs=3), str(workdir), on_validation=(prune,)
        )
    # Out through the one shutdown path: the stop is recorded, and the run did not finish.
    stopped = json.load(open(workdir / layout.STOPPED))
    assert stopped["status"] == layout.FAILED and stopped["step"] == STEPS_PER_EPOCH
    assert not (workdir / layout.FINAL_METRICS).exists()
