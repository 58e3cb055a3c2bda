"""Diff the configs of two runs: `python -m mnist_flax diff A B [--json]`.

Each side is a config file (`configs/cnn.py`, `configs/cnn.py:mnist`, with
optional `--config.FIELD=VALUE` overrides after it, joined by spaces in one
argument), a `config.json`, or a run as `mnist_flax.records.runs` reads it: a workdir
or an offline W&B run folder, or a W&B run path (`entity/project/run_id`,
needs a key). A run's side is the config it asked for (file + overrides, "auto"
as given), so two runs of one config on different machines are equal;
`--resolved` compares what each run used instead. Nested keys are flattened.
Exit status is 0 when equal and 1 when different, like `diff`; 2 for a bad
argument.
"""

import argparse
import json
import os
import shlex
import sys

from mnist_flax import layout
from mnist_flax.config import diff, overrides, schema
from mnist_flax.errors import ConfigError, MnistFlaxError
from mnist_flax.records import files, runs


def load_flat(spec: str, resolved: bool = False) -> dict:
    """A flat config from a config file or config.json (+ overrides), a run folder, or a W&B run path.

    A run gives the config it asked for, or with `resolved` the concrete one it trained with.
    """
    parts = shlex.split(spec)
    if not parts:
        raise ConfigError("empty config spec")
    head, assignments = parts[0], parts[1:]
    if head.endswith(".json") and os.path.isfile(head):
        flat = schema.flatten(files.read_json(head))
    elif head.partition(":")[0].endswith(".py") and not os.path.isdir(head):
        flat = schema.flatten(schema.load_config_file(head))
    elif os.path.isdir(head) or runs.is_wandb_path(head):
        record = runs.load(head, history=False, predictions=False)
        flat = record.config if resolved else record.requested_config
    else:
        raise ConfigError(f"{head}: not a config file, run workdir, config.json or W&B run path (entity/project/id)")
    return overrides.apply(flat, assignments, where="malformed override")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mnist_flax diff", description=__doc__.splitlines()[0])
    parser.add_argument("a", help="config file [overrides], workdir, config.json, or entity/project/run_id")
    parser.add_argument("b")
    parser.add_argument("--json", action="store_true", help="print the difference as JSON")
    parser.add_argument("--resolved", action="store_true", help="compare the configs the runs trained with")
    args = parser.parse_args(argv)
    try:
        difference = diff.diff(load_flat(args.a, args.resolved), load_flat(args.b, args.resolved))
    except MnistFlaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return layout.EXIT_USAGE
    print(json.dumps(difference, indent=2, default=str) if args.json else diff.format_table(difference, args.a, args.b))
    return layout.EXIT_OK if diff.is_empty(difference) else layout.EXIT_DIFFERENT
