"""Metric sinks behind one MetricWriter interface (clu's method names and signatures), with no TensorFlow.

`create_writer` composes: the log (`LoggingWriter`), a JSON-lines file in the workdir (`JsonlWriter`),
TensorBoard (`tensorboard_writer.TensorBoardWriter`) and W&B (`WandbWriter`), each wrapped in an `AsyncWriter`
so the training loop never waits on I/O. The loop writes to the one writer it is given and knows nothing of
the sinks.

Why not clu's writers: `clu.metric_writers` imports TensorFlow on its first line (for its TensorBoard writer),
and so does any of its submodules, the interface included; TensorFlow costs every run seconds of import and
hundreds of MB. `MultiWriter`, `AsyncWriter` and `LoggingWriter` here are clu's, rewritten over
`clu.asynclib` (which imports no TensorFlow); a write that failed on the writer thread is raised on the next
call as clu's `asynclib.AsyncError`, as before.
"""

import abc
import json
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging
from clu import asynclib

from mnist_flax import layout
from mnist_flax.errors import WorkdirError, first_line

Array = Any  # a NumPy or JAX array
Scalar = int | float | np.number | np.ndarray


class MetricWriter(abc.ABC):
    """clu's `MetricWriter` interface: a sink for a run's scalars, images, texts, histograms and hparams."""

    @abc.abstractmethod
    def write_summaries(self, step: int, values: Mapping[str, Array], metadata: Mapping[str, Any] | None = None):
        """Tensors with TensorBoard `SummaryMetadata` (a sink that has no use for them ignores them)."""

    @abc.abstractmethod
    def write_scalars(self, step: int, scalars: Mapping[str, Scalar]):
        """One value per key."""

    @abc.abstractmethod
    def write_images(self, step: int, images: Mapping[str, Array]):
        """[N, H, W, C] or [H, W, C] arrays, C 1, 3 or 4; uint8, or floats in [0, 1]."""

    @abc.abstractmethod
    def write_videos(self, step: int, videos: Mapping[str, Array]):
        """[N, T, H, W, C] arrays."""

    @abc.abstractmethod
    def write_audios(self, step: int, audios: Mapping[str, Array], *, sample_rate: int):
        """[N, T, C] arrays in [-1, 1]."""

    @abc.abstractmethod
    def write_texts(self, step: int, texts: Mapping[str, str]):
        """One string per key."""

    @abc.abstractmethod
    def write_histograms(self, step: int, arrays: Mapping[str, Array], num_buckets: Mapping[str, int] | None = None):
        """The distribution of each array's values."""

    @abc.abstractmethod
    def write_hparams(self, hparams: Mapping[str, Any]):
        """The run's hyperparameters, once at its start."""

    @abc.abstractmethod
    def flush(self):
        """Everything written so far is in the sink (or has raised)."""

    @abc.abstractmethod
    def close(self):
        """Flushes and releases the sink."""


class MultiWriter(MetricWriter):
    """Writes each call to every writer, in order."""

    def __init__(self, writers: Sequence[MetricWriter]):
        self._writers = tuple(writers)

    def write_summaries(self, step, values, metadata=None):
        for w in self._writers:
            w.write_summaries(step, values, metadata)

    def write_scalars(self, step, scalars):
        for w in self._writers:
            w.write_scalars(step, scalars)

    def write_images(self, step, images):
        for w in self._writers:
            w.write_images(step, images)

    def write_videos(self, step, videos):
        for w in self._writers:
            w.write_videos(step, videos)

    def write_audios(self, step, audios, *, sample_rate):
        for w in self._writers:
            w.write_audios(step, audios, sample_rate=sample_rate)

    def write_texts(self, step, texts):
        for w in self._writers:
            w.write_texts(step, texts)

    def write_histograms(self, step, arrays, num_buckets=None):
        for w in self._writers:
            w.write_histograms(step, arrays, num_buckets)

    def write_hparams(self, hparams):
        for w in self._writers:
            w.write_hparams(hparams)

    def flush(self):
        for w in self._writers:
            w.flush()

    def close(self):
        for w in self._writers:
            w.close()


class AsyncWriter(MetricWriter):
    """Runs a writer's calls on a thread of its own, in order (clu's AsyncWriter).

    A call that failed there is raised as `asynclib.AsyncError` (its cause the error) by the next call, or by
    `flush`, which waits for every call made so far.
    """

    def __init__(self, writer: MetricWriter):
        self._writer = writer
        self._pool = asynclib.Pool(thread_name_prefix="AsyncWriter", max_workers=1)  # one worker: in order

    def write_summaries(self, step, values, metadata=None):
        self._pool(self._writer.write_summaries)(step, values, metadata)

    def write_scalars(self, step, scalars):
        self._pool(self._writer.write_scalars)(step, scalars)

    def write_images(self, step, images):
        self._pool(self._writer.write_images)(step, images)

    def write_videos(self, step, videos):
        self._pool(self._writer.write_videos)(step, videos)

    def write_audios(self, step, audios, *, sample_rate):
        self._pool(self._writer.write_audios)(step, audios, sample_rate=sample_rate)

    def write_texts(self, step, texts):
        self._pool(self._writer.write_texts)(step, texts)

    def write_histograms(self, step, arrays, num_buckets=None):
        self._pool(self._writer.write_histograms)(step, arrays, num_buckets)

    def write_hparams(self, hparams):
        self._pool(self._writer.write_hparams)(hparams)

    def flush(self):
        try:
            self._pool.join()
        finally:
            self._writer.flush()

    def close(self):
        try:
            self.flush()
        finally:
            self._writer.close()


class LoggingWriter(MetricWriter):
    """Writes every call to absl's INFO log, as clu's LoggingWriter does: `[STEP] key=value, ...`."""

    def write_summaries(self, step, values, metadata=None):
        logging.info("[%d] Got raw tensors: %s.", step, {k: np.shape(v) for k, v in values.items()})

    def write_scalars(self, step, scalars):
        values = [f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(scalars.items())]
        logging.info("[%d] %s", step, ", ".join(values))

    def write_images(self, step, images):
        logging.info("[%d] Got images: %s.", step, {k: np.shape(v) for k, v in images.items()})

    def write_videos(self, step, videos):
        logging.info("[%d] Got videos: %s.", step, {k: np.shape(v) for k, v in videos.items()})

    def write_audios(self, step, audios, *, sample_rate):
        logging.info("[%d] Got audios: %s.", step, {k: np.shape(v) for k, v in audios.items()})

    def write_texts(self, step, texts):
        logging.info("[%d] Got texts: %s.", step, texts)

    def write_histograms(self, step, arrays, num_buckets=None):
        logging.info("[%d] Got histograms: %s.", step, {k: np.shape(v) for k, v in arrays.items()})

    def write_hparams(self, hparams):
        logging.info("[Hyperparameters] %s", hparams)

    def flush(self):
        logging.flush()

    def close(self):
        self.flush()


def _plain(value):
    """A JSON-ready Python scalar from a NumPy/JAX scalar."""
    value = np.asarray(value)
    return value.item() if value.size == 1 else value.tolist()


class JsonlWriter(MetricWriter):
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


class WandbWriter(MetricWriter):
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


class CheckedWriter(MetricWriter):
    """The run's writers, with a write that failed in the background (a full disk, a lost folder) turned into
    one WorkdirError naming its cause, where AsyncWriter raises clu's AsyncError (with the cause below it)."""

    def __init__(self, writer: MetricWriter, workdir: str):
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


def create_writer(workdir: str, *, tensorboard: bool = True, tracker=None, is_primary: bool = True) -> MetricWriter:
    """The run's writer: asynchronous sinks, each on its own thread (only the primary process writes; W&B if
    `tracker` has a run). A TensorBoard folder that cannot be written is a warning, not an error
    (`TensorBoardWriter`)."""
    if not is_primary:
        return MultiWriter([])
    writers = [LoggingWriter(), JsonlWriter(os.path.join(workdir, layout.METRICS))]
    if tensorboard:
        from mnist_flax.tracking import tensorboard_writer  # TensorBoard's protos: only for a run that writes them

        writers.append(tensorboard_writer.TensorBoardWriter(os.path.join(workdir, layout.TENSORBOARD)))
    if tracker is not None and tracker.run is not None:
        writers.append(WandbWriter(tracker))
    return CheckedWriter(MultiWriter([AsyncWriter(w) for w in writers]), workdir)
