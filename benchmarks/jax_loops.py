"""The JAX contenders: this project's loop and the conventional host-fed loop, plus CNN formulations to study.

Imports the training core only (models, input_pipeline, steps, metrics, distributed): no TensorFlow, no
W&B, so gpu.py can use it on a machine without them.
"""

import copy
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from benchmarks.common import HostData
from configs import cnn as cnn_config
from configs import mlp as mlp_config
from mnist_flax import distributed, input_pipeline, metrics, models
from mnist_flax import steps as steps_lib

CONFIGS = {"cnn": cnn_config, "mlp": mlp_config}


def model_config(name: str, **overrides) -> ml_collections.ConfigDict:
    """configs/cnn.py or configs/mlp.py with top-level or "a.b" overrides."""
    config = CONFIGS[name].get_config()
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return config


def load_host_data(data_dir: str = "") -> HostData:
    """Fashion-MNIST through the library's loader (validated IDX files), with its validation split."""
    config = cnn_config.get_config()
    if data_dir:
        config.data.local_dir = data_dir
        config.data.source = "idx"
    datasets = input_pipeline.load_datasets(config.data)
    return HostData(
        datasets.train.images,
        datasets.train.labels,
        datasets.validation.images,
        datasets.validation.labels,
        datasets.test.images,
        datasets.test.labels,
    )


def _state_and_schedule(config, model, steps_per_epoch):
    schedule = steps_lib.make_schedule(config.optimizer, steps_per_epoch, config.num_epochs)
    state = steps_lib.create_train_state(model, steps_lib.make_optimizer(config.optimizer, schedule), config.seed)
    return state, schedule


class OursContender:
    """This project's loop: resident uint8 data, `epoch_order`, `make_train_step`, a metrics sync per log point.

    `run(steps)` dispatches compiled calls of `steps_per_call` steps (lax.scan when > 1) exactly as
    `train.train_and_evaluate` does, writers aside; training continues from call to call.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        data: HostData,
        batch_size: int | None = None,
        *,
        steps_per_call: int | None = None,
        model: nn.Module | None = None,
        num_devices: int = 1,
    ):
        """`num_devices` > 1 splits each batch over that many local devices (the library's mesh path)."""
        config = copy.deepcopy(config)
        if batch_size:
            config.batch_size = batch_size
        self.config = config
        self.batch_size = config.batch_size
        self.steps_per_call = steps_per_call or steps_lib.resolve_steps_per_call(config.train)
        self.num_train = len(data.train_labels)
        self.steps_per_epoch = self.num_train // self.batch_size
        start = time.perf_counter()
        # As train._run: a mesh (of one device unless `num_devices` > 1), the state and data replicated on it.
        self.mesh = Mesh(np.array(jax.devices()[:num_devices]), (distributed.DATA_AXIS,))
        self.num_devices = num_devices
        self.model = model or models.create_model(config.model, per_device_batch=self.batch_size // num_devices)
        state, self.schedule = _state_and_schedule(config, self.model, self.steps_per_epoch)
        self.num_params = models.count_params(state.params)
        state = distributed.put_replicated(state, self.mesh)
        self.train = input_pipeline.to_device(
            input_pipeline.Split(data.train_images, data.train_labels), mesh=self.mesh
        )
        self.test = input_pipeline.to_device(
            input_pipeline.Split(data.test_images, data.test_labels), config.eval_batch_size, mesh=self.mesh
        )
        self.order_fn = jax.jit(
            input_pipeline.epoch_order, static_argnums=(2, 3), out_shardings=distributed.replicated(self.mesh)
        )
        self.data_key = np.asarray(jax.random.PRNGKey(config.seed + 1))
        self.setup_seconds = time.perf_counter() - start

        self.scan_unroll = steps_lib.resolve_scan_unroll(config.train, self.steps_per_call)
        step_fn = steps_lib.make_train_step(
            config.loss, self.steps_per_epoch, self.steps_per_call, self.scan_unroll, self.mesh
        )
        predict = steps_lib.make_predict(state.apply_fn, config.eval_batch_size, self.mesh)
        with steps_lib.CompileCounter() as compiles:
            self.carry = (
                state,
                *distributed.put_replicated((metrics.TrainMetrics.empty(), steps_lib.empty_guard()), self.mesh),
            )
            self.order = self.order_fn(self.data_key, 0, self.num_train, self.batch_size)
            start = time.perf_counter()
            self.step_fn = step_fn.lower(self.carry, self.train.images, self.train.labels, self.order).compile()
            self.compile_train_seconds = time.perf_counter() - start
            start = time.perf_counter()
            self.predict = predict.lower(state.params, self.test.images, 0).compile()
            self.compile_predict_seconds = time.perf_counter() - start
        self.backend_compile_seconds = compiles.seconds
        self.compile_seconds = self.compile_train_seconds + self.compile_predict_seconds
        self.step = 0
        self.last_loss = float("nan")
        self.on_log = None  # fn(step, scalars) called at each log point (the overhead benchmark's writers)
        self.sync_each_call = jax.default_backend() == "cpu" and num_devices > 1

    @property
    def state(self) -> steps_lib.TrainState:
        return self.carry[0]

    def run(self, steps: int) -> int:
        """Trains at least `steps` steps (whole calls); returns the images processed."""
        done = 0
        log_every = self.config.log_every_steps
        while done < steps:
            epoch = self.step // self.steps_per_epoch
            if self.step % self.steps_per_epoch == 0 and self.step:
                self.order = self.order_fn(self.data_key, epoch, self.num_train, self.batch_size)
            self.carry = self.step_fn(self.carry, self.train.images, self.train.labels, self.order)
            if self.sync_each_call:  # as train._run: several CPU devices' all-reduces must not pile up
                self.carry = jax.block_until_ready(self.carry)
            previous, self.step = self.step, min(self.step + self.steps_per_call, (epoch + 1) * self.steps_per_epoch)
            done += self.step - previous
            if self.step // log_every > previous // log_every or self.step % self.steps_per_epoch == 0:
                self._log()
        jax.block_until_ready(self.carry)
        return done * self.batch_size

    def run_epoch(self) -> int:
        """Trains to the end of the current epoch."""
        return self.run(self.steps_per_epoch - self.step % self.steps_per_epoch)

    def _log(self) -> None:
        """One sync per log point, the host work of the library's `_log_train`; `on_log` gets the scalars."""
        state, train_metrics, guard = self.carry
        computed = train_metrics.compute()
        scalars = {
            "train/loss": float(computed["loss"]),
            "train/accuracy": float(computed["accuracy"]),
            "train/learning_rate": float(self.schedule(self.step)),
            "train/nonfinite_steps": int(guard["count"]),
        }
        self.last_loss = scalars["train/loss"]
        if self.on_log is not None:
            self.on_log(self.step, scalars)
        self.carry = (state, metrics.TrainMetrics.empty(), guard)

    def log_probs(self, split: input_pipeline.DeviceSplit | None = None) -> np.ndarray:
        """Log-probabilities of every test example (forward pass only)."""
        split = split or self.test
        size = self.config.eval_batch_size
        outputs = [self.predict(self.state.params, split.images, s) for s in range(0, split.images.shape[0], size)]
        return np.asarray(jnp.concatenate(outputs))[: split.num_valid]

    def evaluate(self) -> tuple[float, float]:
        """Forward pass over the test set; returns (seconds, accuracy)."""
        start = time.perf_counter()
        predicted = self.log_probs().argmax(axis=1)
        accuracy = float((predicted == np.asarray(self.test.labels)[: self.test.num_valid]).mean())
        return time.perf_counter() - start, accuracy

    def evaluate_report(self) -> tuple[float, dict]:
        """`train.evaluate` (forward pass + the full classification report); returns (seconds, report)."""
        start = time.perf_counter()
        _, report = steps_lib.evaluate(self.predict, self.state.params, self.test, self.config.eval_batch_size)
        return time.perf_counter() - start, report


class HostFedContender:
    """The conventional pattern of the Flax MNIST example: one jit-compiled step per host batch.

    Host side, per epoch a NumPy permutation; per step NumPy fancy indexing of float32 images, device_put and
    the compiled step. Loss and accuracy stay on the device until a log point, as in the example. Same model,
    optimizer, loss and dropout as this project's step.
    """

    def __init__(self, config: ml_collections.ConfigDict, data: HostData, batch_size: int | None = None, model=None):
        config = copy.deepcopy(config)
        if batch_size:
            config.batch_size = batch_size
        self.config = config
        self.batch_size = config.batch_size
        # The example converts the whole data set to float32 on the host, once.
        self.train_images = data.train_images.astype(np.float32) / 255.0
        self.train_labels = data.train_labels
        self.test_images = data.test_images.astype(np.float32) / 255.0
        self.test_labels = data.test_labels
        self.steps_per_epoch = len(self.train_labels) // self.batch_size
        self.model = model or models.create_model(config.model)
        self.state, _ = _state_and_schedule(config, self.model, self.steps_per_epoch)
        loss_config = config.loss

        def train_step(state, images, labels):
            dropout_rng = jax.random.fold_in(state.rng, state.step)

            def loss_fn(params):
                logits = state.apply_fn({"params": params}, images, train=True, rngs={"dropout": dropout_rng})
                return steps_lib.compute_loss(logits, labels, loss_config), logits

            (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
            accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
            return state.apply_gradients(grads=grads), loss, accuracy

        def predict(params, images):
            return jax.nn.log_softmax(self.state.apply_fn({"params": params}, images, train=False))

        batch = jax.ShapeDtypeStruct((self.batch_size, *input_pipeline.IMAGE_SHAPE), jnp.float32)
        labels = jax.ShapeDtypeStruct((self.batch_size,), jnp.int32)
        eval_batch = jax.ShapeDtypeStruct((config.eval_batch_size, *input_pipeline.IMAGE_SHAPE), jnp.float32)
        start = time.perf_counter()
        self.step_fn = jax.jit(train_step).lower(self.state, batch, labels).compile()
        self.compile_train_seconds = time.perf_counter() - start
        start = time.perf_counter()
        self.predict = jax.jit(predict).lower(self.state.params, eval_batch).compile()
        self.compile_predict_seconds = time.perf_counter() - start
        self.compile_seconds = self.compile_train_seconds + self.compile_predict_seconds
        self.rng = np.random.default_rng(config.seed)
        self.position = self.steps_per_epoch
        self.step = 0
        self.losses = []
        self.last_loss = float("nan")

    def run(self, steps: int) -> int:
        for _ in range(steps):
            if self.position == self.steps_per_epoch:
                self.permutation = self.rng.permutation(len(self.train_labels))
                self.position = 0
            index = self.permutation[self.position * self.batch_size : (self.position + 1) * self.batch_size]
            images = jax.device_put(self.train_images[index])
            labels = jax.device_put(self.train_labels[index])
            self.state, loss, accuracy = self.step_fn(self.state, images, labels)
            self.losses.append(loss)
            self.position += 1
            self.step += 1
            if self.step % self.config.log_every_steps == 0:
                self.last_loss = float(np.mean(jax.device_get(self.losses)))
                self.losses = []
        jax.block_until_ready(self.state)
        return steps * self.batch_size

    def evaluate(self) -> tuple[float, float]:
        """Forward pass over the test set, one host batch at a time; returns (seconds, accuracy)."""
        start = time.perf_counter()
        size = self.config.eval_batch_size
        num = len(self.test_labels)
        padded = np.concatenate([self.test_images, self.test_images[: (-num) % size]])
        outputs = [
            self.predict(self.state.params, jax.device_put(padded[s : s + size])) for s in range(0, len(padded), size)
        ]
        predicted = np.asarray(jnp.concatenate(outputs))[:num].argmax(axis=1)
        return time.perf_counter() - start, float((predicted == self.test_labels).mean())


# ---------------------------------------------------------------- CNN formulations (the CPU study)


def avg_pool_reshape(x: jax.Array) -> jax.Array:
    """2x2 average pool as a reshape and a mean (even sides): the same values as nn.avg_pool."""
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def avg_pool_window(x: jax.Array) -> jax.Array:
    """nn.avg_pool, as models.CNN uses (reduce_window)."""
    return nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))


def conv3x3_nchw(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """XLA's convolution in NCHW/OIHW layout, NHWC in and out: the same maths and parameters."""
    y = jax.lax.conv_general_dilated(
        x.transpose(0, 3, 1, 2),
        kernel.transpose(3, 2, 0, 1),
        window_strides=(1, 1),
        padding="SAME",
        dimension_numbers=("NCHW", "OIHW", "NCHW"),
    )
    return y.transpose(0, 2, 3, 1)


@jax.custom_vjp
def conv3x3_xla_nchw_grad(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """XLA's NHWC convolution forward and input gradient; the weight gradient computed in NCHW layout."""
    return models.conv3x3_xla(x, kernel)


def _conv_fwd(x, kernel):
    return models.conv3x3_xla(x, kernel), (x, kernel)


def _conv_bwd(residuals, grad):
    x, kernel = residuals
    grad_x = jax.vjp(lambda xx: models.conv3x3_xla(xx, kernel), x)[1](grad)[0]
    grad_kernel = jax.vjp(lambda kk: conv3x3_nchw(x, kk), kernel)[1](grad)[0]
    return grad_x, grad_kernel


conv3x3_xla_nchw_grad.defvjp(_conv_fwd, _conv_bwd)

CONVS = {
    "xla": models.conv3x3_xla,
    "shifted_matmul": models.conv3x3_shifted_matmul,
    "xla_nchw": conv3x3_nchw,
    "xla_nchw_grad": conv3x3_xla_nchw_grad,
}
POOLS = {"window": avg_pool_window, "reshape": avg_pool_reshape}


class StudyConv3x3(nn.Module):
    """models.Conv3x3's parameters with any formulation of CONVS."""

    features: int
    impl: str

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        return CONVS[self.impl](x, kernel) + bias


class StudyCNN(nn.Module):
    """models.CNN (same parameter tree, same outputs) with a choice of convolution and pooling formulation."""

    conv_impl: str = "xla"
    pool: str = "window"
    conv_features: tuple = (32, 64)
    dense_features: tuple = (256,)
    dropout_rate: float = 0.25

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i, features in enumerate(self.conv_features):
            x = POOLS[self.pool](nn.relu(StudyConv3x3(features, self.conv_impl, name=f"Conv3x3_{i}")(x)))
        x = x.reshape((x.shape[0], -1))
        for features in self.dense_features:
            x = nn.relu(nn.Dense(features)(x))
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(10)(x)
