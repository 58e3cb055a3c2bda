"""Flax models: a small CNN and an MLP for 28x28x1 images.

Linen rather than NNX: the train step is a pure function of a pytree
(`TrainState`), which jit, lax.scan, NamedSharding and orbax all take as it
is, with no graph/state split to keep in sync.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mnist_flax.config.schema import auto_or_int
from mnist_flax.errors import ConfigError

NUM_CLASSES = 10
CONV_IMPLS = ("xla", "shifted_matmul")


def conv3x3_xla(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """3x3 SAME convolution through XLA's native convolution."""
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(1, 1),
        padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def conv3x3_shifted_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """3x3 SAME convolution as nine shifted slices and one matrix multiply.

    Same maths as `conv3x3_xla`: output[n, h, w, o] = sum over (i, j, c) of
    padded[n, h + i, w + j, c] * kernel[i, j, c, o]. XLA's CPU backend runs the
    weight gradient of its native convolution slowly; a plain dot is faster.
    """
    kh, kw, cin, cout = kernel.shape
    height, width = x.shape[1], x.shape[2]
    padded = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    patches = jnp.concatenate(
        [padded[:, i : i + height, j : j + width, :] for i in range(kh) for j in range(kw)],
        axis=-1,
    )
    return patches @ kernel.reshape(kh * kw * cin, cout)


class Conv3x3(nn.Module):
    """A 3x3 SAME convolution with a choice of formulation; params as nn.Conv."""

    features: int
    impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        conv = conv3x3_shifted_matmul if self.impl == "shifted_matmul" else conv3x3_xla
        return conv(x, kernel) + bias


class TracedDropout(nn.Module):
    """flax's `nn.Dropout` in training, with its two constants given as values that may be traced: the keep
    probability and its reciprocal. flax scales by `inputs / keep`; with `keep` a constant, XLA makes that a
    multiply by its float32 reciprocal, so the reciprocal comes from the host (`steps.hyperparameters`) and the
    numbers stay bit for bit."""

    def __call__(self, inputs: jax.Array, keep: jax.Array, scale: jax.Array) -> jax.Array:
        mask = jax.random.bernoulli(self.make_rng("dropout"), p=keep, shape=inputs.shape)
        return jax.lax.select(mask, inputs * scale, jnp.zeros_like(inputs))


def dropout(x: jax.Array, rate: float, train: bool, index: int, values=None) -> jax.Array:
    """The model's `index`-th dropout layer: flax's `nn.Dropout(rate)`, or, with `values` = (keep, 1 / keep), the
    same masks and numbers from those values (the dropout rate as an argument of the compiled step). Named as flax
    names it (Dropout_<index>): the mask's key is `make_rng("dropout")` at that path. A rate of 0 is no layer."""
    name = f"Dropout_{index}"
    if values is None or rate == 0.0 or not train:
        return nn.Dropout(rate, deterministic=not train, name=name)(x)
    return TracedDropout(name=name)(x, *values)


class CNN(nn.Module):
    """Conv(3x3) + ReLU + 2x2 average pool per stage, then a dense head.

    `conv_batch_split` > 1 runs the convolution stages on that many interleaved
    pieces of the batch (rows p, p + k, p + 2k, ... for piece p of k) and joins
    their features before the dense head. The maths is the same (per-example
    outputs identical; the weight gradients are summed over the pieces instead
    of over the whole batch at once). On XLA's CPU backend each convolution runs
    on one thread: independent pieces run side by side on all cores, and small
    pieces stay in cache (benchmarks/RESULTS.md). Interleaved rather than
    contiguous pieces keep every piece spread evenly over a batch-sharded mesh.
    """

    conv_features: Sequence[int] = (32, 64)
    dense_features: Sequence[int] = (256,)
    dropout_rate: float = 0.0
    conv_impl: str = "xla"
    conv_batch_split: int = 1
    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, dropout_values=None) -> jax.Array:
        """Logits; `dropout_values` (keep, 1 / keep), if given, stand for the dropout rate's (see `dropout`)."""
        convs = [Conv3x3(features, impl=self.conv_impl) for features in self.conv_features]

        def conv_stages(x):
            for conv in convs:
                x = nn.relu(conv(x))
                x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
            return x.reshape((x.shape[0], -1))

        pieces = self.conv_batch_split
        if pieces > 1 and x.shape[0] % pieces == 0:
            grouped = x.reshape((x.shape[0] // pieces, pieces, *x.shape[1:]))
            features = jnp.stack([conv_stages(grouped[:, p]) for p in range(pieces)], axis=1)
            x = features.reshape((x.shape[0], -1))
        else:
            x = conv_stages(x)
        for index, features in enumerate(self.dense_features):
            x = nn.relu(nn.Dense(features)(x))
            x = dropout(x, self.dropout_rate, train, index, dropout_values)
        return nn.Dense(self.num_classes)(x)


class MLP(nn.Module):
    """Dense + ReLU + dropout layers on the flattened image."""

    dense_features: Sequence[int] = (512, 256)
    dropout_rate: float = 0.0
    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, dropout_values=None) -> jax.Array:
        """Logits; `dropout_values` (keep, 1 / keep), if given, stand for the dropout rate's (see `dropout`)."""
        x = x.reshape((x.shape[0], -1))
        for index, features in enumerate(self.dense_features):
            x = nn.relu(nn.Dense(features)(x))
            x = dropout(x, self.dropout_rate, train, index, dropout_values)
        return nn.Dense(self.num_classes)(x)


def create_model(model_config: ml_collections.ConfigDict) -> nn.Module:
    """Builds the model that a resolved model section (`resolve.model`) names; "auto" is an error here."""
    if model_config.name == "cnn":
        pieces = auto_or_int(model_config.get("conv_batch_split", 1))
        impl = model_config.get("conv_impl", "xla")
        if pieces == "auto" or impl == "auto":
            raise ConfigError(
                "model: 'auto' fields reach the model unresolved (resolve the config with resolve.resolve)"
            )
        return CNN(
            conv_features=tuple(model_config.conv_features),
            dense_features=tuple(model_config.dense_features),
            dropout_rate=model_config.dropout_rate,
            conv_impl=impl,
            conv_batch_split=pieces,
        )
    if model_config.name == "mlp":
        return MLP(
            dense_features=tuple(model_config.dense_features),
            dropout_rate=model_config.dropout_rate,
        )
    raise ConfigError(f"model.name: unknown model {model_config.name!r} (choose from cnn, mlp)")


def for_inference(model: nn.Module) -> nn.Module:
    """The same model (same parameters, same outputs) in its fastest form without gradients.

    XLA's own convolution on the whole evaluation batch: the shifted matmul pays
    off only in the weight gradient (XLA's forward is about 5x faster on CPU),
    and splitting the batch would only add compile time to a call made once per
    evaluation batch.
    """
    return model.clone(conv_impl="xla", conv_batch_split=1) if isinstance(model, CNN) else model


def count_params(params) -> int:
    """Number of scalar parameters in a pytree."""
    return sum(int(p.size) for p in jax.tree.leaves(params))
