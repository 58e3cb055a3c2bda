"""The CNN on your own images, one sub-folder per class: `--config=configs/folder.py:DIR` (or
`--config.data.folder=DIR`). mnist_flax/datasets/folder.py says how the folder is read, split and cached."""

from configs import default


def get_config(arg: str | None = None):
    """The defaults with the `folder` data set; `arg` is the folder of the images."""
    config = default.get_config()
    config.data.name = "folder"
    config.data.folder = arg or ""
    config.data.image_size = (28, 28)  # (height, width) every image is resized to
    config.data.channels = 1  # 1: grey, 3: RGB
    config.data.test_fraction = 0.1  # of each class, where the folder has no test/ sub-folder
    config.data.validation_fraction = 0.1  # of each class, where it has no validation/ sub-folder
    return config
