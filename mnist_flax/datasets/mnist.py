"""MNIST: handwritten digits 0-9, 28x28 grey, 60,000 training and 10,000 test images.

From IDX files (`data.local_dir`, or Debian's folder if installed) or tensorflow-datasets (`_mnist_family`).
"""

from mnist_flax.datasets import _mnist_family

NAME = "mnist"
CLASS_NAMES = tuple(str(digit) for digit in range(10))
STANDARD_DIR = "/usr/share/datasets/mnist"  # where a Debian package would put the IDX files
FIELDS = _mnist_family.FIELDS


def resolve(data_config) -> dict:
    return _mnist_family.resolve(NAME, data_config, STANDARD_DIR)


def load(data_config):
    return _mnist_family.load(NAME, data_config, STANDARD_DIR, CLASS_NAMES)
