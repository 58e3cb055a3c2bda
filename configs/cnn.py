"""The CNN: the defaults, which already train it."""

from configs import default
from configs.default import sweep_lr  # noqa: F401 (the learning-rate search space: --sweep=lr)


def get_config(arg: str | None = None):
    """Returns the CNN config (identical to the defaults)."""
    config = default.get_config(arg)
    config.model.name = "cnn"
    return config
