"""EMNIST: handwritten digits and letters from NIST Special Database 19, 28x28 grey, in six variants.

Through tensorflow-datasets only (`emnist/VARIANT`, TFDS 3.1.0): the first run needs a network, or a TFDS cache
prepared elsewhere (`data.tfds_data_dir`). `data.variant` picks the TFDS config; its classes, in label order:

    balanced  47 classes, 112,800 / 18,800 images: 0-9, A-Z, and the 11 lower-case letters that do not look like
              their capital (a b d e f g h n q r t)
    bymerge   47 classes, 697,932 / 116,323: the same classes, unbalanced
    byclass   62 classes, 697,932 / 116,323: 0-9, A-Z, a-z
    letters   26 letters, each upper and lower case together (labels 1-26; TFDS declares 37 classes, and labels
              0 and 27-36 never occur: named "-" here)
    digits    10 classes, 240,000 / 40,000: 0-9
    mnist     10 classes, 60,000 / 10,000: 0-9

EMNIST's files (and so TFDS's records) hold each image transposed (mirrored and turned by 90 degrees); they are
transposed back here, so the images stand upright like MNIST's.
"""

import string

from mnist_flax.datasets import _mnist_family
from mnist_flax.errors import ConfigError

NAME = "emnist"
DIGITS = tuple(string.digits)
CLASS_NAMES = {
    "balanced": (*DIGITS, *string.ascii_uppercase, *"abdefghnqrt"),
    "bymerge": (*DIGITS, *string.ascii_uppercase, *"abdefghnqrt"),
    "byclass": (*DIGITS, *string.ascii_uppercase, *string.ascii_lowercase),
    "letters": ("-", *(f"{u}/{u.lower()}" for u in string.ascii_uppercase), *("-",) * 10),
    "digits": DIGITS,
    "mnist": DIGITS,
}  # fmt: skip
FIELDS = {"variant": "balanced", "tfds_data_dir": ""}


def load(data_config):
    variant = data_config.variant
    if variant not in CLASS_NAMES:
        raise ConfigError(f"data.variant: unknown EMNIST variant {variant!r} (choose from {', '.join(CLASS_NAMES)})")
    return _mnist_family.load_tfds(NAME, f"emnist/{variant}", data_config, CLASS_NAMES[variant], transpose=True)
