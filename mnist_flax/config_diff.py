"""Diff the configs of two runs: `python -m mnist_flax.config_diff A B [--json]`.

Each side is a config file (`configs/cnn.py`, `configs/cnn.py:mnist`, with
optional `--config.FIELD=VALUE` overrides after it, joined by spaces in one
argument), a run workdir (its `config.json`), or a W&B run path
(`entity/project/run_id`, needs a key). Nested keys are flattened. Exit status
is 0 when equal and 1 when different, like `diff`; 2 for a bad argument.
"""

import argparse
import ast
import json
import os
import shlex
import sys

from mnist_flax import config_utils
from mnist_flax.errors import ConfigError, MnistFlaxError

IGNORED_PREFIXES = ("git.", "overrides", "config_changes", "_wandb")


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(flat: dict, overrides: list[str]) -> dict:
    """Applies `--config.a.b=value` overrides to a flat config (unknown fields are an error)."""
    flat = dict(flat)
    for override in overrides:
        if not override.startswith("--config.") or "=" not in override:
            raise ConfigError(f"malformed override {override!r} (expected --config.FIELD=VALUE)")
        name, _, value = override[len("--config.") :].partition("=")
        if name not in flat:
            raise ConfigError(f"unknown config field {name!r}")
        parsed = _parse_value(value)
        flat[name] = list(parsed) if isinstance(parsed, tuple) else parsed
    return flat


def load_flat(spec: str) -> dict:
    """A flat config from a config file (+ overrides), a workdir or config.json, or a W&B run path."""
    parts = shlex.split(spec)
    if not parts:
        raise ConfigError("empty config spec")
    head, overrides = parts[0], parts[1:]
    path = head.partition(":")[0]
    if os.path.isdir(head):
        config_json = os.path.join(head, "config.json")
        if not os.path.isfile(config_json):
            raise ConfigError(f"{head} is not a run workdir (no config.json)")
        return apply_overrides(_read_json_config(config_json), overrides)
    if head.endswith(".json") and os.path.isfile(head):
        return apply_overrides(_read_json_config(head), overrides)
    if path.endswith(".py"):
        return apply_overrides(config_utils.flatten(config_utils.load_config_file(head)), overrides)
    if head.count("/") == 2 and not head.startswith(("/", ".", "~")) and not os.path.exists(head):
        return _wandb_config(head)
    raise ConfigError(f"{head}: not a config file, run workdir, config.json or W&B run path (entity/project/id)")


def _read_json_config(path: str) -> dict:
    try:
        with open(path) as f:
            return config_utils.flatten(json.load(f))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None


def _wandb_config(run_path: str) -> dict:
    try:
        import wandb

        config = dict(wandb.Api().run(run_path).config)
    except Exception as e:
        raise ConfigError(f"cannot read W&B run {run_path}: {str(e).splitlines()[0][:200]}") from None
    return {k: v for k, v in config.items() if not k.startswith(IGNORED_PREFIXES)}


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
    args = parser.parse_args(argv)
    try:
        difference = diff(load_flat(args.a), load_flat(args.b))
    except MnistFlaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(difference, indent=2, default=str) if args.json else format_table(difference, args.a, args.b))
    return 0 if is_empty(difference) else 1


if __name__ == "__main__":
    sys.exit(main())
