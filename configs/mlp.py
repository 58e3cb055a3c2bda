"""A two-hidden-layer MLP on the flattened image."""

from configs import default
from configs.default import sweep_lr  # noqa: F401 (the learning-rate search space: --sweep=lr)


def get_config(arg: str | None = None):
    """Returns the MLP config: what differs from the defaults, nothing more."""
    config = default.get_config(arg)
    config.model.name = "mlp"
    del config.model.conv_features
    config.model.dense_features = (512, 256)
    config.model.dropout_rate = 0.2
    config.num_epochs = 5
    return config
