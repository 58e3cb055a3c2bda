"""Kuzushiji-MNIST: ten cursive Japanese (hiragana) characters, 28x28 grey, 60,000 training and 10,000 test images.

Through tensorflow-datasets only (`kmnist`): the first run needs a network, or a TFDS cache prepared elsewhere
(`data.tfds_data_dir`).
"""

from mnist_flax.datasets import _mnist_family

NAME = "kmnist"
# TFDS's names for the classes: the romanised reading of each row's character of the hiragana table.
CLASS_NAMES = ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")
FIELDS = {"tfds_data_dir": ""}


def load(data_config):
    return _mnist_family.load_tfds(NAME, NAME, data_config, CLASS_NAMES)
