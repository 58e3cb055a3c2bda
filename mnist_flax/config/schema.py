"""Config helpers: load a config file, flatten it, validate every value.

Validation runs before any data is loaded or anything is compiled, and each
problem is one ConfigError line naming the field.
"""

import difflib
import importlib.util
import os
import sys
from collections.abc import Iterable

import ml_collections

from mnist_flax import datasets, models
from mnist_flax.errors import ConfigError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHOICES = {
    "data.source": ("auto", "idx", "tfds"),
    "optimizer.name": ("sgd", "momentum", "adam", "adamw"),
    "optimizer.schedule": ("constant", "cosine", "warmup_cosine"),
    "loss.name": ("cross_entropy", "focal"),
    "train.on_nonfinite": ("stop", "skip"),
    "wandb.mode": ("auto", "online", "offline", "disabled"),
}
# "auto" or an integer >= 1 (the default is "auto", a string, so the command line gives strings)
AUTO_OR_POSITIVE_INT = ("train.batch_split", "train.steps_per_call", "train.scan_unroll")
# (minimum, maximum, minimum is exclusive)
RANGES = {
    "num_epochs": (1, None, False),
    "batch_size": (1, None, False),
    "eval_batch_size": (1, None, False),
    "log_every_steps": (1, None, False),
    "eval_every_epochs": (1, None, False),
    "data.validation_size": (1, None, False),
    "data.train_subset": (0, None, False),
    "data.eval_subset": (0, None, False),
    "data.augment.max_shift": (0, 13, False),
    "model.dropout_rate": (0.0, None, False),
    "optimizer.learning_rate": (0.0, None, True),
    "optimizer.momentum": (0.0, 1.0, False),
    "optimizer.b1": (0.0, 1.0, False),
    "optimizer.b2": (0.0, 1.0, False),
    "optimizer.weight_decay": (0.0, None, False),
    "optimizer.warmup_epochs": (0.0, None, False),
    "optimizer.grad_clip_norm": (0.0, None, False),
    "loss.label_smoothing": (0.0, 1.0, False),
    "loss.focal_gamma": (0.0, None, False),
    "checkpoint.every_epochs": (1, None, False),
    "checkpoint.max_to_keep": (1, None, False),
    "wandb.log_misclassified": (0, None, False),
    "wandb.init_timeout": (0.0, None, True),
    "distributed.num_processes": (0, None, False),
    "distributed.process_id": (-1, None, False),
}


def load_module(path: str, prefix: str = "config"):
    """Executes the Python file `path` as a fresh module (a config file is user code: its errors are ConfigErrors)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist")
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    module_spec = importlib.util.spec_from_file_location(f"_{prefix}_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # A config file is user code: any error is the user's to fix.
        raise ConfigError(f"config file {path} failed to load: {type(e).__name__}: {e}") from None
    return module


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Loads `path[:arg]` by calling the file's get_config(arg)."""
    path, _, arg = spec.partition(":")
    module = load_module(path)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} has no get_config() function")
    try:
        return module.get_config(arg) if arg else module.get_config()
    except Exception as e:
        raise ConfigError(f"{path}: get_config() failed: {type(e).__name__}: {e}") from None


def flatten(config, prefix: str = "") -> dict:
    """Nested ConfigDict (or dict) to {"a.b.c": value}; tuples become lists."""
    items = config.items() if hasattr(config, "items") else []
    flat = {}
    for key, value in items:
        path = f"{prefix}{key}"
        if isinstance(value, (ml_collections.ConfigDict, dict)):
            flat.update(flatten(value, path + "."))
        else:
            flat[path] = list(value) if isinstance(value, tuple) else value
    return flat


def nearest_names(name: str, valid: Iterable[str], count: int = 3) -> list[str]:
    """The valid field names closest to a misspelt one."""
    valid = list(valid)
    leaf = name.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(name, valid, n=count, cutoff=0.5)
    by_leaf = difflib.get_close_matches(leaf, [v.rsplit(".", 1)[-1] for v in valid], n=count, cutoff=0.6)
    for v in valid:
        valid_leaf = v.rsplit(".", 1)[-1]
        initials = "".join(word[0] for word in valid_leaf.split("_") if word)
        if (valid_leaf in by_leaf or (len(leaf) > 1 and leaf == initials)) and v not in close:
            close.append(v)
    return close[:count]


def _check_range(name: str, value, bounds) -> None:
    low, high, exclusive = bounds
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    if (exclusive and value <= low) or value < low:
        raise ConfigError(f"{name}: {value!r} is out of range (must be {'>' if exclusive else '>='} {low})")
    if high is not None and value > high:
        raise ConfigError(f"{name}: {value!r} is out of range (must be <= {high})")


def auto_or_int(value):
    """A field of AUTO_OR_POSITIVE_INT as given: "50" from the command line (the default "auto" makes it a str
    field) becomes 50; "auto" and anything else come back as they are (for `validate` to judge)."""
    return int(value) if isinstance(value, str) and value.isdigit() else value


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks every known field's value, the model section against the model's fields and the data section
    against the data set's; raises ConfigError naming the first bad one."""
    flat = flatten(config)
    for name, choices in CHOICES.items():
        if name in flat and flat[name] not in choices:
            raise ConfigError(f"{name}: unknown value {flat[name]!r} (choose from {', '.join(choices)})")
    for name, bounds in RANGES.items():
        if name in flat:
            _check_range(name, flat[name], bounds)
    if flat.get("model.dropout_rate", 0.0) >= 1.0:
        raise ConfigError(f"model.dropout_rate: {flat['model.dropout_rate']!r} is out of range (must be in [0, 1))")
    if "data" in config:
        datasets.check(config.data)  # the data set's own fields, declared by its module
    model = {name.removeprefix("model."): value for name, value in flat.items() if name.startswith("model.")}
    if model:
        models.check(model)  # the model's own fields, declared by its module
    for name in ("model.dense_features", "model.conv_features", "model.stage_features"):
        if name in flat:
            widths = flat[name]
            if not isinstance(widths, list) or not all(isinstance(w, int) and w > 0 for w in widths):
                raise ConfigError(f"{name}: expected a tuple of positive integers, got {widths!r}")
    for name in AUTO_OR_POSITIVE_INT:
        if name in flat:
            value = auto_or_int(flat[name])
            if value != "auto" and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ConfigError(f"{name}: expected 'auto' or an integer >= 1, got {flat[name]!r}")
