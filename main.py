"""Trains a model: `python main.py --config=configs/mlp.py [--workdir=runs/x] [--config.FIELD=VALUE ...]`."""

import datetime
import os
import sys

# TensorFlow is only the TensorBoard writer here: keep its start-up chatter out of the log.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app, flags
from ml_collections import config_flags

from mnist_flax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Where the run writes; default: a fresh folder under runs/.")
config_flags.DEFINE_config_file(
    "config", None, "A config file, e.g. configs/cnn.py (or configs/cnn.py:mnist).", lock_config=True
)


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])} (fields are set with --config.FIELD=VALUE)")
    name = os.path.splitext(os.path.basename(FLAGS["config"].config_filename))[0]
    workdir = FLAGS.workdir or os.path.join("runs", f"{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    return cli.run_main(lambda: cli.train(FLAGS.config, workdir, sys.argv))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=cli.parse_flags)
