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

from mnist_flax.config_utils import auto_or_int
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
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
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
        for features in self.dense_features:
            x = nn.relu(nn.Dense(features)(x))
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes)(x)


class MLP(nn.Module):
    """Dense + ReLU + dropout layers on the flattened image."""

    dense_features: Sequence[int] = (512, 256)
    dropout_rate: float = 0.0
    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x.reshape((x.shape[0], -1))
        for features in self.dense_features:
            x = nn.relu(nn.Dense(features)(x))
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes)(x)


def resolve_conv_impl(conv_impl: str, backend: str | None = None) -> str:
    """Maps "auto" to the faster formulation: XLA's own convolution on every backend.

    On CPU it wins once the batch is split (`resolve_conv_batch_split`) and
    steps are fused without a loop (`steps.resolve_scan_unroll`); the shifted
    matmul stays as an option (benchmarks/RESULTS.md compares them).
    """
    del backend  # the same answer everywhere today; kept so the choice can depend on it
    return "xla" if conv_impl == "auto" else conv_impl


MAX_CONV_BATCH_SPLIT = 8
MIN_CONV_PIECE = 16


def resolve_conv_batch_split(value, per_device_batch: int, backend: str | None = None) -> int:
    """Pieces the batch is split into for the convolutions (see CNN).

    "auto": on CPU the most pieces (up to 8) that divide the per-device batch
    into pieces of at least 16 examples (8 pieces of 16 at batch 128); 1 on
    GPU/TPU, whose convolutions use the whole device already. A number must
    divide the per-device batch (checked by `train.check_batch_sizes`).
    """
    value = auto_or_int(value)
    if value != "auto":
        return value
    if (backend or jax.default_backend()) != "cpu" or per_device_batch <= 0:
        return 1
    pieces = MAX_CONV_BATCH_SPLIT
    while pieces > 1 and (per_device_batch % pieces or per_device_batch // pieces < MIN_CONV_PIECE):
        pieces //= 2
    return pieces


def create_model(model_config: ml_collections.ConfigDict, per_device_batch: int = 0) -> nn.Module:
    """Builds the model that `model_config.name` names.

    `per_device_batch` (the training batch on each device) lets "auto" choose
    the CNN's `conv_batch_split`; without it the batch is not split.
    """
    if model_config.name == "cnn":
        return CNN(
            conv_features=tuple(model_config.conv_features),
            dense_features=tuple(model_config.dense_features),
            dropout_rate=model_config.dropout_rate,
            conv_impl=resolve_conv_impl(model_config.get("conv_impl", "auto")),
            conv_batch_split=resolve_conv_batch_split(model_config.get("conv_batch_split", "auto"), per_device_batch),
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
