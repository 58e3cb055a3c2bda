"""TensorBoard event files written without TensorFlow.

`TensorBoardWriter` builds each summary with the `tensorboard` package's own protos and `*_pb` helpers (scalars,
images, histograms, text, the HParams plugin's session summary: what `tf.summary` writes) and frames them with
its `RecordWriter` into a plain file, `events.out.tfevents.*`, that TensorBoard reads as it reads TensorFlow's.
`tensorboard` is already needed to view the files, so this adds no dependency. Its `EventFileWriter` (what
torch.utils.tensorboard uses) is not used: it opens the file through `tensorboard.compat.tf`, which imports
TensorFlow whenever TensorFlow is installed. tensorboardX would do as well but is one more package to lock.

A folder that cannot be written (read-only, a full disk, a file in its place) is one warning line on stderr;
the run goes on without TensorBoard, and every metric is still in metrics.jsonl, the log and W&B.
"""

import io
import itertools
import os
import socket
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.histogram import summary_v2 as histogram_summary
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.plugins.image import metadata as image_metadata
from tensorboard.plugins.scalar import summary_v2 as scalar_summary
from tensorboard.plugins.text import summary_v2 as text_summary
from tensorboard.summary.writer.record_writer import RecordWriter
from tensorboard.util import tensor_util

from mnist_flax.errors import first_line
from mnist_flax.tracking.writers import MetricWriter

_file_numbers = itertools.count()  # two writers of one process in one second still get two files


def flatten_hparams(hparams: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """`{"a": {"b": 1}, "c": [2, 3], "d": None}` as `{"a.b": 1, "c.0": 2, "c.1": 3, "d": ""}`: the names and values
    TensorBoard's HParams plugin takes (clu's `flatten_dict`, which its TensorFlow writer used)."""
    flat = {}
    for key, value in hparams.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) or hasattr(value, "items"):
            flat.update(flatten_hparams(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat.update(flatten_hparams({str(i): item for i, item in enumerate(value)}, f"{name}."))
        else:
            flat[name] = "" if value is None else value
    return flat


def _png(image: np.ndarray) -> bytes:
    """One [H, W, C] image (uint8, or floats in [0, 1] as tf.summary.image takes them) as PNG."""
    from PIL import Image

    if image.dtype != np.uint8:
        image = (np.clip(image.astype(np.float64), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if image.shape[-1] == 1:
        image = image[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


class TensorBoardWriter(MetricWriter):
    """Writes one event file under `logdir`; after a failed write, a warning line and nothing more."""

    def __init__(self, logdir: str):
        self._logdir = logdir
        self._lock = threading.Lock()
        self._records = None
        self.failure: str | None = None
        try:
            os.makedirs(logdir, exist_ok=True)
            name = f"events.out.tfevents.{time.time():.0f}.{socket.gethostname()}.{os.getpid()}.{next(_file_numbers)}"
            self._records = RecordWriter(open(os.path.join(logdir, name), "wb"))
            self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
            self.flush()  # an unwritable folder shows now, not at the first flush
        except OSError as e:
            self._give_up(e)

    def _give_up(self, error: OSError) -> None:
        """Says once, in one line, that TensorBoard stopped and where the metrics still are; writes nothing more."""
        if self.failure is None:
            self.failure = f"{type(error).__name__}: {first_line(error, 160)}"
            print(
                f"warning: TensorBoard files cannot be written in {self._logdir} ({self.failure}); training goes "
                "on without them, and every metric is still written to metrics.jsonl, the log and W&B",
                file=sys.stderr,
                flush=True,
            )
        records, self._records = self._records, None
        if records is not None:
            try:
                records.close()
            except OSError:
                pass  # what it failed to write is already reported

    def _write(self, event: event_pb2.Event) -> None:
        with self._lock:
            if self._records is None:
                return
            try:
                self._records.write(event.SerializeToString())
            except OSError as e:
                self._give_up(e)

    def _write_summary(self, step: int, summary: summary_pb2.Summary) -> None:
        self._write(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def write_summaries(self, step, values, metadata=None):
        summary = summary_pb2.Summary()
        for key, value in values.items():
            md = (metadata or {}).get(key)
            tensor = tensor_util.make_tensor_proto(np.asarray(value))
            summary.value.add(tag=key, tensor=tensor, metadata=md)
        self._write_summary(step, summary)

    def write_scalars(self, step, scalars):
        summary = summary_pb2.Summary()
        for key, value in scalars.items():
            summary.value.extend(scalar_summary.scalar_pb(key, np.asarray(value)).value)
        self._write_summary(step, summary)

    def write_images(self, step, images):
        summary = summary_pb2.Summary()
        for key, value in images.items():
            value = np.asarray(value)
            batch = value if value.ndim == 4 else value[None]
            # tf.summary.image's tensor: width, height, then one PNG per image
            encoded = [str(batch.shape[2]).encode(), str(batch.shape[1]).encode(), *map(_png, batch)]
            tensor = tensor_util.make_tensor_proto(np.array(encoded, dtype=object))
            summary.value.add(tag=key, tensor=tensor, metadata=image_metadata.create_summary_metadata(key, ""))
        self._write_summary(step, summary)

    def write_videos(self, step, videos):
        logging.log_first_n(logging.WARNING, "TensorBoardWriter writes no videos.", 1)

    def write_audios(self, step, audios, *, sample_rate):
        logging.log_first_n(logging.WARNING, "TensorBoardWriter writes no audio.", 1)

    def write_texts(self, step, texts):
        summary = summary_pb2.Summary()
        for key, value in texts.items():
            summary.value.extend(text_summary.text_pb(key, str(value)).value)
        self._write_summary(step, summary)

    def write_histograms(self, step, arrays, num_buckets=None):
        summary = summary_pb2.Summary()
        for key, value in arrays.items():
            buckets = (num_buckets or {}).get(key)
            summary.value.extend(histogram_summary.histogram_pb(key, np.asarray(value), buckets=buckets).value)
        self._write_summary(step, summary)

    def write_hparams(self, hparams):
        # At step 0, as tensorboard.plugins.hparams.api.hparams writes it under TensorFlow.
        self._write_summary(0, hparams_summary.hparams_pb(flatten_hparams(hparams)))

    def flush(self):
        with self._lock:
            if self._records is None:
                return
            try:
                self._records.flush()
            except OSError as e:
                self._give_up(e)

    def close(self):
        self.flush()
        with self._lock:
            records, self._records = self._records, None
            if records is not None:
                try:
                    records.close()
                except OSError as e:
                    self._give_up(e)
