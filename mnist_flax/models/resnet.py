"""A small ResNet: a 3x3 stem, stages of residual blocks (conv-BatchNorm-ReLU twice, a projection where the
shape changes), then a dense head on the flattened last feature map (7x7 for 28x28 images: small enough to keep
where each feature is, which global average pooling would drop). BatchNorm's running statistics ("batch_stats") are the
model's mutable state: updated in training, used in evaluation."""

from collections.abc import Sequence
from functools import partial

import flax.linen as nn
import jax


class Block(nn.Module):
    features: int
    strides: int
    norm: partial

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        residual = x
        y = nn.Conv(self.features, (3, 3), strides=self.strides, use_bias=False)(x)
        y = nn.relu(self.norm()(y))
        y = nn.Conv(self.features, (3, 3), use_bias=False)(y)
        y = self.norm(scale_init=nn.initializers.zeros_init())(y)  # each block starts as the identity
        if residual.shape != y.shape:
            residual = nn.Conv(self.features, (1, 1), strides=self.strides, use_bias=False)(residual)
            residual = self.norm()(residual)
        return nn.relu(residual + y)


class Model(nn.Module):
    stage_features: Sequence[int] = (16, 32, 64)
    blocks_per_stage: int = 1
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        norm = partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
        x = nn.relu(norm()(nn.Conv(self.stage_features[0], (3, 3), use_bias=False)(x)))
        for stage, features in enumerate(self.stage_features):
            for block in range(self.blocks_per_stage):
                x = Block(features, strides=2 if stage > 0 and block == 0 else 1, norm=norm)(x)
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(self.num_classes)(x)
