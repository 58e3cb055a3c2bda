"""The command-line tools, run as `python -m mnist_flax COMMAND`: the top layer, importing any below."""

# COMMAND -> (module under mnist_flax.commands, one line of help)
COMMANDS = {
    "train": ("train", "train a model: --config=configs/cnn.py [--workdir=DIR] [--config.FIELD=VALUE ...]"),
    "compare": ("compare", "compare runs side by side: RUN... [--sort FIELD] [--json] [--html FILE]"),
    "diff": ("diff", "diff the configs of two runs or config files: A B [--json]"),
    "reproduce": ("reproduce", "train a run again from its recorded commit: RUN [--workdir DIR]"),
    "sync": ("sync", "upload offline runs to W&B: WORKDIR_OR_RUN_DIR... [--dry-run]"),
    "sweep": ("sweep", "run or join an Optuna sweep: --config=FILE --grid FIELD=V1,V2 | --sweep[=NAME] ..."),
    "export": ("export", "export a run's best model for other runtimes: RUN [--format onnx|jax] [--out DIR]"),
    "predict": ("predict", "classify images with a model: MODEL IMAGE... [--top K] [--json]"),
}
