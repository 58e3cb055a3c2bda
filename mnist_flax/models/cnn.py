"""A small CNN: 3x3 convolution + ReLU + 2x2 average pool per stage, then a dense head with dropout."""

from collections.abc import Sequence

import flax.linen as nn
import jax


class Model(nn.Module):
    conv_features: Sequence[int] = (32, 64)
    dense_features: Sequence[int] = (256,)
    dropout_rate: float = 0.0
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for features in self.conv_features:
            x = nn.relu(nn.Conv(features, kernel_size=(3, 3))(x))
            x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        for features in self.dense_features:
            x = nn.relu(nn.Dense(features)(x))
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes)(x)
