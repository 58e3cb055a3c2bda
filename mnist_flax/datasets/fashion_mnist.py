"""Fashion-MNIST: ten kinds of clothing, 28x28 grey, 60,000 training and 10,000 test images (the default).

From IDX files (`data.local_dir`, or Debian's folder: `apt install dataset-fashion-mnist`, which needs no network)
or tensorflow-datasets (`_mnist_family`).
"""

from mnist_flax.datasets import _mnist_family

NAME = "fashion_mnist"
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
STANDARD_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
FIELDS = _mnist_family.FIELDS


def resolve(data_config) -> dict:
    return _mnist_family.resolve(NAME, data_config, STANDARD_DIR)


def load(data_config):
    return _mnist_family.load(NAME, data_config, STANDARD_DIR, CLASS_NAMES)
