"""Trains a model: `python main.py --config=configs/mlp.py [--workdir=runs/x] [--config.FIELD=VALUE ...]`.

The same command as `python -m mnist_flax train ...` (mnist_flax/commands/train.py).
"""

import sys

from mnist_flax.commands import train

if __name__ == "__main__":
    train.main(sys.argv)
