"""The CNN: the defaults, which already train it."""

from configs import default


def get_config(arg: str | None = None):
    """Returns the CNN config (identical to the defaults)."""
    config = default.get_config(arg)
    config.model.name = "cnn"
    return config
