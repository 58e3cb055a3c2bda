"""The conventional pattern of the Flax MNIST example, a peer of this project's loop: one jitted step per host batch.

Host side: per epoch a NumPy permutation; per step NumPy fancy indexing of float32 images, `device_put` and the
compiled step. Loss stays on the device until a log point, as in the example. The same model (XLA's convolution on
the whole batch), optimizer, schedule, loss and dropout as the library's, built from its pieces.
"""

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from benchmarks import pieces
from benchmarks.common import HostData
from mnist_flax.training import steps


class HostFedContender:
    """Trains with the Flax example's loop; `run(steps)` continues where it stopped."""

    def __init__(self, config: ml_collections.ConfigDict, data: HostData):
        self.config, self.batch_size = config, config.batch_size
        # The example converts the whole data set to float32 on the host, once.
        self.train_images, self.train_labels = data.train_images.astype(np.float32) / 255.0, data.train_labels
        self.test_images, self.test_labels = data.test_images.astype(np.float32) / 255.0, data.test_labels
        self.steps_per_epoch = len(self.train_labels) // self.batch_size
        self.state, _ = pieces.train_state(config, pieces.build_model(config), self.steps_per_epoch)
        loss_config, apply_fn = config.loss, self.state.apply_fn

        def train_step(state, images, labels):
            dropout_rng = jax.random.fold_in(state.rng, state.step)

            def loss_fn(params):
                logits = apply_fn({"params": params}, images, train=True, rngs={"dropout": dropout_rng})
                return steps.compute_loss(logits, labels, loss_config), logits

            (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
            accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)  # the example's train metrics
            return state.apply_gradients(grads=grads), loss, accuracy

        def predict(params, images):
            return jax.nn.log_softmax(apply_fn({"params": params}, images, train=False))

        batch = jax.ShapeDtypeStruct((self.batch_size, *self.train_images.shape[1:]), jnp.float32)
        labels = jax.ShapeDtypeStruct((self.batch_size,), jnp.int32)
        eval_batch = jax.ShapeDtypeStruct((config.eval_batch_size, *self.train_images.shape[1:]), jnp.float32)
        start = time.perf_counter()
        self.step_fn = jax.jit(train_step).lower(self.state, batch, labels).compile()
        self.predict = jax.jit(predict).lower(self.state.params, eval_batch).compile()
        self.compile_seconds = time.perf_counter() - start
        self.rng = np.random.default_rng(config.seed)
        self.position, self.step, self.losses = self.steps_per_epoch, 0, []

    def run(self, num_steps: int) -> int:
        """Trains `num_steps` steps; returns the images trained."""
        for _ in range(num_steps):
            if self.position == self.steps_per_epoch:
                self.permutation, self.position = self.rng.permutation(len(self.train_labels)), 0
            index = self.permutation[self.position * self.batch_size : (self.position + 1) * self.batch_size]
            images, labels = jax.device_put(self.train_images[index]), jax.device_put(self.train_labels[index])
            self.state, loss, _ = self.step_fn(self.state, images, labels)
            self.losses.append(loss)
            self.position, self.step = self.position + 1, self.step + 1
            if self.step % self.config.log_every_steps == 0:
                self.last_loss, self.losses = float(np.mean(jax.device_get(self.losses))), []
        jax.block_until_ready(self.state)
        return num_steps * self.batch_size

    def evaluate(self) -> tuple[float, float]:
        """Forward pass over the test set, one host batch at a time; returns (seconds, accuracy)."""
        start = time.perf_counter()
        size, num = self.config.eval_batch_size, len(self.test_labels)
        padded = np.concatenate([self.test_images, self.test_images[: (-num) % size]])
        outputs = [self.predict(self.state.params, jax.device_put(padded[s : s + size])) for s in range(0, num, size)]
        predicted = np.asarray(jnp.concatenate(outputs))[:num].argmax(axis=1)
        return time.perf_counter() - start, float((predicted == self.test_labels).mean())
