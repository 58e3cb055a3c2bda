"""scikit-learn's digits: 1,797 handwritten digits 0-9 as 8x8 grey images, bundled with scikit-learn (offline).

The UCI "optical recognition of handwritten digits" test set as `sklearn.datasets.load_digits` has it: each pixel
a count 0-16 of the 4x4 block's dark dots, scaled here to uint8 0-255 (v * 255 / 16, rounded). The data set has
no splits of its own: a fixed draw (the same for every run seed) gives 20% to test and 10% to validation, so
`data.validation_size` does not apply. A light digit on black, as MNIST.
"""

import numpy as np

from mnist_flax.datasets import Split, arrays

NAME = "digits"
CLASS_NAMES = tuple(str(digit) for digit in range(10))
SPLIT_SEED = 20_240_617  # the draw of the test and validation examples
TEST_FRACTION, VALIDATION_FRACTION = 0.2, 0.1


def load(data_config):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255 / 16)).astype(np.uint8)[..., None]  # [1797, 8, 8, 1]
    labels = bunch.target.astype(np.int32)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    num_test, num_validation = round(TEST_FRACTION * len(labels)), round(VALIDATION_FRACTION * len(labels))
    test, validation = order[:num_test], order[num_test : num_test + num_validation]
    train = order[num_test + num_validation :]
    split = lambda idx: Split(images[idx], labels[idx])  # noqa: E731
    return arrays(NAME, CLASS_NAMES, "sklearn:digits", split(train), split(test), split(validation))
