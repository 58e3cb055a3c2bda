"""An MLP on the flattened image: Dense + ReLU + dropout layers, then the class logits."""

from collections.abc import Sequence

import flax.linen as nn
import jax


class Model(nn.Module):
    dense_features: Sequence[int] = (512, 256)
    dropout_rate: float = 0.0
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x.reshape((x.shape[0], -1))
        for features in self.dense_features:
            x = nn.relu(nn.Dense(features)(x))
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes)(x)
