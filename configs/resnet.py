"""A small ResNet with BatchNorm (mnist_flax/models/resnet.py): its batch statistics are the model's state."""

from configs import default
from configs.default import sweep_lr  # noqa: F401 (the learning-rate search space: --sweep=lr)


def get_config(arg: str | None = None):
    """Returns the ResNet config: what differs from the defaults, nothing more."""
    config = default.get_config(arg)
    config.model = {"name": "resnet", "stage_features": (16, 32, 64), "blocks_per_stage": 1}
    config.optimizer.weight_decay = 5e-4
    config.num_epochs = 5
    return config
