"""The TensorBoard writer without TensorFlow: every kind of summary read back with TensorBoard's own reader, and a
folder that cannot be written (a warning line, the run goes on, nothing else lost)."""

import errno
import io
import json
import os
import subprocess

import numpy as np
import pytest
from conftest import run_main, tiny_overrides
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.util import tensor_util

from mnist_flax import layout
from mnist_flax.tracking import tensorboard_writer, writers


def _read(logdir: str) -> event_accumulator.EventAccumulator:
    """Every event under `logdir`, through TensorBoard's Python loader (what `tensorboard --load_fast=false` reads)."""
    accumulator = event_accumulator.EventAccumulator(logdir, size_guidance={event_accumulator.TENSORS: 0})
    accumulator.Reload()
    return accumulator


def _plugin(accumulator, tag: str) -> str:
    return accumulator.SummaryMetadata(tag).plugin_data.plugin_name


def test_scalars_images_histograms_texts_and_hparams_read_back(tmp_path):
    writer = writers.create_writer(str(tmp_path), tensorboard=True)
    writer.write_hparams({"optimizer": {"learning_rate": 0.01}, "widths": [8, 16], "init_from": None, "bn": True})
    writer.write_scalars(3, {"train/loss": np.float32(0.25), "train/accuracy": 0.5})
    gray = np.linspace(0.0, 1.0, 2 * 5 * 4).reshape(2, 5, 4, 1).astype(np.float32)  # [N, H, W, C] in [0, 1]
    rgb = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)  # one [H, W, C]
    writer.write_images(4, {"gray": gray, "rgb": rgb})
    writer.write_histograms(5, {"weights": np.arange(100.0)}, {"weights": 4})
    writer.write_texts(6, {"stopped": "preempted"})
    writer.close()

    (name,) = os.listdir(tmp_path / layout.TENSORBOARD)
    assert name.startswith("events.out.tfevents.")
    accumulator = _read(str(tmp_path / layout.TENSORBOARD))
    assert {"train/loss", "train/accuracy", "gray", "rgb", "weights", "stopped"} <= set(accumulator.Tags()["tensors"])

    (loss,) = accumulator.Tensors("train/loss")
    assert loss.step == 3 and tensor_util.make_ndarray(loss.tensor_proto) == np.float32(0.25)
    assert _plugin(accumulator, "train/loss") == "scalars"

    (images,) = accumulator.Tensors("gray")
    width, height, *pngs = tensor_util.make_ndarray(images.tensor_proto)
    assert (images.step, int(width), int(height), len(pngs)) == (4, 4, 5, 2) and _plugin(
        accumulator, "gray"
    ) == "images"
    from PIL import Image

    decoded = np.asarray(Image.open(io.BytesIO(pngs[1])))
    np.testing.assert_array_equal(decoded, np.round(gray[1, ..., 0] * 255).astype(np.uint8))
    (rgb_event,) = accumulator.Tensors("rgb")
    _, _, png = tensor_util.make_ndarray(rgb_event.tensor_proto)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), rgb)

    (histogram,) = accumulator.Tensors("weights")
    buckets = tensor_util.make_ndarray(histogram.tensor_proto)  # rows of (left edge, right edge, count)
    assert buckets.shape == (4, 3) and buckets[:, 2].sum() == 100 and _plugin(accumulator, "weights") == "histograms"

    (text,) = accumulator.Tensors("stopped")
    assert (
        tensor_util.make_ndarray(text.tensor_proto).item() == b"preempted" and _plugin(accumulator, "stopped") == "text"
    )

    (session,) = accumulator.Tensors("_hparams_/session_start_info")
    content = accumulator.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    values = {name: getattr(value, value.WhichOneof("kind")) for name, value in start.hparams.items()}
    assert session.step == 0
    assert values == {"optimizer.learning_rate": 0.01, "widths.0": 8, "widths.1": 16, "init_from": "", "bn": True}


def test_a_folder_that_cannot_be_made_is_one_warning_and_the_rest_is_written(tmp_path, capsys):
    (tmp_path / layout.TENSORBOARD).write_text("a file where the folder should be")  # root ignores permissions
    writer = writers.create_writer(str(tmp_path), tensorboard=True)
    writer.write_scalars(1, {"train/loss": 0.5})
    writer.write_texts(1, {"note": "text"})
    writer.close()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: TensorBoard files cannot be written in "), lines
    assert "training goes on" in lines[0]
    assert [json.loads(line) for line in open(tmp_path / layout.METRICS)] == [{"step": 1, "train/loss": 0.5}]


def test_a_disk_that_fills_mid_run_is_one_warning_and_no_error(tmp_path, monkeypatch, capsys):
    class FillsUp(io.BytesIO):
        """A file whose disk is full after the file's first record."""

        def write(self, data):
            if self.tell():
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(data)

    monkeypatch.setattr(tensorboard_writer, "open", lambda path, mode: FillsUp(), raising=False)
    writer = writers.create_writer(str(tmp_path), tensorboard=True)
    for step in range(3):
        writer.write_scalars(step, {"train/loss": 1.0 / (step + 1)})
    writer.flush()
    writer.close()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "No space left on device" in lines[0], lines
    assert [json.loads(line)["step"] for line in open(tmp_path / layout.METRICS)] == [0, 1, 2]


@pytest.mark.parametrize("kind", ["videos", "audios"])
def test_videos_and_audio_are_skipped_without_error(tmp_path, kind):
    writer = tensorboard_writer.TensorBoardWriter(str(tmp_path))
    if kind == "videos":
        writer.write_videos(0, {"v": np.zeros((1, 2, 4, 4, 3))})
    else:
        writer.write_audios(0, {"a": np.zeros((1, 10, 1))}, sample_rate=8000)
    writer.close()
    assert _read(str(tmp_path)).Tags()["tensors"] == []


def test_a_run_whose_tensorboard_disk_is_full_finishes_with_one_warning(tiny_data_dir, tmp_path):
    """The TensorBoard folder on a 4 KiB filesystem of its own, already full: the run trains to the end, says so in
    one warning line, and metrics.jsonl (on the workdir's disk) holds every logged step. (Filled first: a tiny run's
    event file can stay under 4 KiB, whose first flush then succeeds and the run has nothing to say.)"""
    workdir = tmp_path / "run"
    tensorboard = workdir / layout.TENSORBOARD
    tensorboard.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(tensorboard)], capture_output=True)
    assert mounted.returncode == 0, f"the test needs root to mount a tmpfs: {mounted.stderr!r}"
    try:
        with pytest.raises(OSError, match="No space left on device"), open(tensorboard / "filler", "wb") as f:
            for _ in range(64):
                f.write(b"\0" * 1024)
                f.flush()
        args = ["--config=configs/mlp.py", f"--workdir={workdir}"]
        result = run_main(args + tiny_overrides(tiny_data_dir, num_epochs=2, tensorboard=True))
        assert result.returncode == 0, result.stderr[-3000:]
        warnings = [line for line in result.stderr.splitlines() if "TensorBoard" in line]
        assert len(warnings) == 1 and warnings[0].startswith("warning: TensorBoard files cannot be written in ")
        assert "No space left on device" in warnings[0] and "Traceback" not in result.stderr
        final = json.loads((workdir / layout.FINAL_METRICS).read_text())
        steps = [json.loads(line)["step"] for line in open(workdir / layout.METRICS)]
        assert "accuracy" in final["test"] and max(steps) == final["steps"]  # the test scalars, at the end
    finally:
        subprocess.run(["umount", str(tensorboard)], capture_output=True)
