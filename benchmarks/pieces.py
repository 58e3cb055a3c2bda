"""The library's pieces timed alone: its compiled train step and predict function on data resident on the device.

For the one-step CPU studies (cpu_studies.py), the Flax-example loop's model and state (flax_example.py) and the GPU
script (gpu.py, which runs without TensorFlow: this module imports the training core only). Every knob is passed as
a concrete value, never "auto": deciding those is the library's resolver's job, and the headline benchmark measures
`train_and_evaluate` itself (library.py). The one module to change when `steps` or `models` change.
"""

import copy
import os
import time

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from benchmarks.common import FASHION_DIR, REPO_ROOT, HostData
from benchmarks.library import set_fields
from mnist_flax import models
from mnist_flax.config import schema
from mnist_flax.training import input_pipeline, metrics, steps


def load_config(path: str = "configs/cnn.py", **changes) -> ml_collections.ConfigDict:
    """A config file of this checkout with "a.b" fields changed (keyword "a__b" for "a.b")."""
    config = schema.load_config_file(os.path.join(REPO_ROOT, path))
    set_fields(config, {key.replace("__", "."): value for key, value in changes.items()})
    return config


def load_host_data(data_dir: str = "") -> HostData:
    """Fashion-MNIST's IDX files through the library's loader (validated), with its validation split."""
    config = load_config(data__source="idx", data__local_dir=data_dir or FASHION_DIR)
    d = input_pipeline.load_datasets(config.data)
    return HostData(*(np.asarray(a) for s in (d.train, d.validation, d.test) for a in (s.images, s.labels)))


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
    """`models.create` on the config's model section (Fashion-MNIST's 10 classes)."""
    return models.create(config.model, num_classes=10)


def train_state(config: ml_collections.ConfigDict, model: nn.Module, steps_per_epoch: int):
    """The library's optimizer, schedule and initial state; returns (state, schedule)."""
    schedule = steps.make_schedule(config.optimizer, steps_per_epoch, config.num_epochs)
    tx = steps.make_optimizer(config.optimizer, steps_per_epoch, config.num_epochs)
    return steps.create_train_state(model, tx, config.seed, input_shape=(28, 28, 1)), schedule


class StepTimer:
    """`steps.make_train_step` and `steps.make_predict`, compiled ahead of time; `run(steps)` calls the step."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        data: HostData,
        *,
        model: nn.Module | None = None,
        steps_per_call: int = 1,
        scan_unroll: int = 1,
        batch_split: int = 1,
    ):
        """`model` defaults to the config's; `batch_split`: the pieces the step applies it to (train.batch_split)."""
        config = copy.deepcopy(config)
        config.train.batch_split = str(batch_split)
        self.config, self.batch_size, self.steps_per_call = config, config.batch_size, steps_per_call
        self.model = model or build_model(config)
        self.num_train = len(data.train_labels)
        self.steps_per_epoch = self.num_train // self.batch_size
        state, _ = train_state(config, self.model, self.steps_per_epoch)
        self.train = input_pipeline.to_device(input_pipeline.Split(data.train_images, data.train_labels))
        self.test = input_pipeline.to_device(
            input_pipeline.Split(data.test_images, data.test_labels), config.eval_batch_size
        )
        self.order_fn = jax.jit(input_pipeline.epoch_order, static_argnums=(2, 3))
        self.data_key = np.asarray(jax.random.PRNGKey(config.seed + 1))
        step = steps.make_train_step(config, self.steps_per_epoch, steps_per_call, scan_unroll)
        predict = steps.make_predict(self.model.apply, config.eval_batch_size)
        self.carry = (state, metrics.TrainMetrics.empty(), steps.empty_guard())
        self.order = self.order_fn(self.data_key, 0, self.num_train, self.batch_size)
        start = time.perf_counter()
        self.step_fn = step.lower(self.carry, self.train.images, self.train.labels, self.order).compile()
        self.compile_train_seconds = time.perf_counter() - start
        start = time.perf_counter()
        self.predict = predict.lower(state.variables(), self.test.images, 0).compile()
        self.compile_predict_seconds = time.perf_counter() - start
        self.step = 0

    @property
    def state(self) -> steps.TrainState:
        """The train state after the calls so far."""
        return self.carry[0]

    def run(self, num_steps: int) -> int:
        """Trains at least `num_steps` steps in whole calls (none crosses an epoch); returns the images trained."""
        done = 0
        while done < num_steps:
            epoch = self.step // self.steps_per_epoch
            if self.step and self.step % self.steps_per_epoch == 0:
                self.order = self.order_fn(self.data_key, epoch, self.num_train, self.batch_size)
            self.carry = self.step_fn(self.carry, self.train.images, self.train.labels, self.order)
            previous, self.step = self.step, min(self.step + self.steps_per_call, (epoch + 1) * self.steps_per_epoch)
            done += self.step - previous
        jax.block_until_ready(self.carry)
        self.carry = (self.carry[0], metrics.TrainMetrics.empty(), self.carry[2])
        return done * self.batch_size

    def run_epoch(self) -> int:
        """Trains to the end of the current epoch."""
        return self.run(self.steps_per_epoch - self.step % self.steps_per_epoch)

    def evaluate(self) -> tuple[float, float]:
        """`steps.evaluate` over the test set (log-probabilities and the report); returns (seconds, accuracy)."""
        start = time.perf_counter()
        _, report = steps.evaluate(self.predict, self.state.variables(), self.test, self.config.eval_batch_size)
        return time.perf_counter() - start, report["accuracy"]
