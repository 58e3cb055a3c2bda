"""Metric sinks behind clu's MetricWriter interface.

`create_writer` composes: clu's LoggingWriter (the log), a JSON-lines file in
the workdir, TensorBoard (clu's SummaryWriter), and W&B (`WandbWriter`, below),
each wrapped in clu's AsyncWriter so the training loop never waits on I/O.
The loop writes to the one MultiWriter and knows nothing of the sinks.

clu's metric_writers import TensorFlow; this module is imported only by the
loop, never by the training core.
"""

import json
import os
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
from clu import asynclib, metric_writers
from clu.metric_writers import interface

from mnist_flax import layout
from mnist_flax.errors import WorkdirError, first_line


def _plain(value):
    """A JSON-ready Python scalar from a NumPy/JAX scalar."""
    value = np.asarray(value)
    return value.item() if value.size == 1 else value.tolist()


class JsonlWriter(interface.MetricWriter):
    """Appends each write_scalars call as one JSON object to a file (metrics.jsonl)."""

    def __init__(self, path: str):
        self._path = path
        self._lock = threading.Lock()
        self._file = open(path, "a", buffering=1)  # line-buffered: a crash loses no written line

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        record = {"step": int(step), **{k: _plain(v) for k, v in scalars.items()}}
        with self._lock:
            self._file.write(json.dumps(record) + "\n")

    def write_summaries(self, step, values, metadata=None):
        pass  # tensors other than scalars are for TensorBoard and W&B

    def write_images(self, step, images):
        pass

    def write_videos(self, step, videos):
        pass

    def write_audios(self, step, audios, *, sample_rate):
        pass

    def write_texts(self, step, texts):
        pass

    def write_histograms(self, step, arrays, num_buckets=None):
        pass

    def write_hparams(self, hparams):
        pass

    def flush(self):
        with self._lock:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self):
        with self._lock:
            self._file.close()


class WandbWriter(interface.MetricWriter):
    """Writes to a tracker's W&B run: scalars, images, texts, histograms, hparams.

    Every record carries our own "step" key, and W&B is told to plot against it
    (`define_metric`), so a resumed run may log a step again without W&B
    dropping it as out of order. Once W&B fails, the tracker knows, and this
    writer sends nothing more.
    """

    def __init__(self, tracker):
        import wandb

        self._wandb = wandb
        self._tracker = tracker
        tracker.run.define_metric("step")
        tracker.run.define_metric("*", step_metric="step")

    def _send(self, send) -> None:
        if self._tracker.active:
            try:
                send(self._tracker.run)
            except Exception as e:  # W&B's service died or its disk filled: training goes on without it
                self._tracker.record_failure(e)

    def _log(self, step: int, values: Mapping[str, Any]) -> None:
        self._send(lambda run: run.log({"step": int(step), **values}))

    def write_scalars(self, step, scalars):
        self._log(step, {k: _plain(v) for k, v in scalars.items()})

    def write_images(self, step, images):
        logged = {}
        for key, value in images.items():
            value = np.asarray(value)
            batch = value if value.ndim == 4 else value[None]
            logged[key] = [self._wandb.Image(np.squeeze(image)) for image in batch]
        self._log(step, logged)

    def write_texts(self, step, texts):
        self._log(step, {k: self._wandb.Html(f"<pre>{v}</pre>") for k, v in texts.items()})

    def write_histograms(self, step, arrays, num_buckets=None):
        buckets = num_buckets or {}
        self._log(
            step,
            {k: self._wandb.Histogram(np.asarray(v).ravel(), num_bins=buckets.get(k, 64)) for k, v in arrays.items()},
        )

    def write_hparams(self, hparams):
        self._send(lambda run: run.config.update(dict(hparams), allow_val_change=True))

    def write_summaries(self, step, values, metadata=None):
        self.write_scalars(step, {k: v for k, v in values.items() if np.asarray(v).size == 1})

    def write_videos(self, step, videos):
        pass  # this project has no videos

    def write_audios(self, step, audios, *, sample_rate):
        pass  # nor audio

    def flush(self):
        pass  # wandb streams to its own service process

    def close(self):
        pass  # the run is finished by tracking.Tracker, after artifacts are logged


class CheckedWriter(interface.MetricWriter):
    """The run's writers, with a write that failed in the background (a full disk, a lost folder) turned into
    one WorkdirError naming its cause, where clu raises its AsyncError (with the cause two levels down)."""

    def __init__(self, writer: interface.MetricWriter, workdir: str):
        self._writer, self._workdir = writer, workdir

    def _call(self, name: str, *args, **kwargs):
        try:
            return getattr(self._writer, name)(*args, **kwargs)
        except (asynclib.AsyncError, OSError) as e:  # OSError: a sink's own flush, in this thread
            reason = first_line(e, cause=True)
            raise WorkdirError(f"writing the run's metrics in {self._workdir} failed: {reason}") from None

    def write_summaries(self, step, values, metadata=None):
        return self._call("write_summaries", step, values, metadata)

    def write_scalars(self, step, scalars):
        return self._call("write_scalars", step, scalars)

    def write_images(self, step, images):
        return self._call("write_images", step, images)

    def write_videos(self, step, videos):
        return self._call("write_videos", step, videos)

    def write_audios(self, step, audios, *, sample_rate):
        return self._call("write_audios", step, audios, sample_rate=sample_rate)

    def write_texts(self, step, texts):
        return self._call("write_texts", step, texts)

    def write_histograms(self, step, arrays, num_buckets=None):
        return self._call("write_histograms", step, arrays, num_buckets)

    def write_hparams(self, hparams):
        return self._call("write_hparams", hparams)

    def flush(self):
        return self._call("flush")

    def close(self):
        return self._call("close")


def create_writer(workdir: str, *, tensorboard: bool = True, tracker=None, is_primary: bool = True):
    """The run's MultiWriter of asynchronous sinks (only the primary process writes; W&B if `tracker` has a run)."""
    if not is_primary:
        return metric_writers.MultiWriter([])
    writers = [metric_writers.LoggingWriter(), JsonlWriter(os.path.join(workdir, layout.METRICS))]
    if tensorboard:
        writers.append(metric_writers.SummaryWriter(os.path.join(workdir, layout.TENSORBOARD)))
    if tracker is not None and tracker.run is not None:
        writers.append(WandbWriter(tracker))
    return CheckedWriter(metric_writers.AsyncMultiWriter(writers), workdir)
