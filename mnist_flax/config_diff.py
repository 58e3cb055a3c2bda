"""Diff the configs of two runs: `python -m mnist_flax.config_diff A B [--json]`.

Each side is a config file (`configs/cnn.py`, `configs/cnn.py:mnist`, with
optional `--config.FIELD=VALUE` overrides after it, joined by spaces in one
argument), a `config.json`, or a run as `mnist_flax.runs` reads it: a workdir
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

from mnist_flax import config_utils, overrides, runs
from mnist_flax.errors import ConfigError, MnistFlaxError


def load_flat(spec: str, resolved: bool = False) -> dict:
    """A flat config from a config file or config.json (+ overrides), a run folder, or a W&B run path.

    A run gives the config it asked for, or with `resolved` the concrete one it trained with.
    """
    parts = shlex.split(spec)
    if not parts:
        raise ConfigError("empty config spec")
    head, assignments = parts[0], parts[1:]
    if head.endswith(".json") and os.path.isfile(head):
        flat = _read_json_config(head)
    elif head.partition(":")[0].endswith(".py") and not os.path.isdir(head):
        flat = config_utils.flatten(config_utils.load_config_file(head))
    elif os.path.isdir(head) or runs.is_wandb_path(head):
        record = runs.load(head, history=False, predictions=False)
        flat = record.config if resolved else record.requested_config
    else:
        raise ConfigError(f"{head}: not a config file, run workdir, config.json or W&B run path (entity/project/id)")
    return overrides.apply(flat, assignments, where="malformed override")


def _read_json_config(path: str) -> dict:
    try:
        with open(path) as f:
            return config_utils.flatten(json.load(f))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None


def diff(a: dict, b: dict) -> dict:
    """{"changed": {k: [a, b]}, "added": {k: b}, "removed": {k: a}} between two flat configs."""
    return {
        "changed": {k: [a[k], b[k]] for k in sorted(a.keys() & b.keys()) if a[k] != b[k]},
        "added": {k: b[k] for k in sorted(b.keys() - a.keys())},
        "removed": {k: a[k] for k in sorted(a.keys() - b.keys())},
    }


def is_empty(difference: dict) -> bool:
    return not any(difference.values())


def format_table(difference: dict, name_a: str = "A", name_b: str = "B") -> str:
    """The difference as aligned text: field, A's value, B's value."""
    rows = [(k, repr(v[0]), repr(v[1])) for k, v in difference["changed"].items()]
    rows += [(k, "(absent)", repr(v)) for k, v in difference["added"].items()]
    rows += [(k, repr(v), "(absent)") for k, v in difference["removed"].items()]
    if not rows:
        return "configs are equal"
    widths = [max(len(r[i]) for r in rows + [("field", name_a, name_b)]) for i in range(3)]
    lines = [f"{'field':<{widths[0]}}  {name_a:<{widths[1]}}  {name_b}"]
    lines += [f"{f:<{widths[0]}}  {x:<{widths[1]}}  {y}" for f, x, y in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mnist_flax.config_diff", description=__doc__.splitlines()[0])
    parser.add_argument("a", help="config file [overrides], workdir, config.json, or entity/project/run_id")
    parser.add_argument("b")
    parser.add_argument("--json", action="store_true", help="print the difference as JSON")
    parser.add_argument("--resolved", action="store_true", help="compare the configs the runs trained with")
    args = parser.parse_args(argv)
    try:
        difference = diff(load_flat(args.a, args.resolved), load_flat(args.b, args.resolved))
    except MnistFlaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(difference, indent=2, default=str) if args.json else format_table(difference, args.a, args.b))
    return 0 if is_empty(difference) else 1


if __name__ == "__main__":
    sys.exit(main())
