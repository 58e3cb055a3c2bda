"""The one parser of `FIELD=VALUE` overrides, whoever types them.

main.py's error diagnosis, `commands.diff`, the sweep runner and the Run record
all read overrides here: `--config.optimizer.learning_rate=0.01` on the
command line, `optimizer.learning_rate=0.01` in a sweep's `--set`/`--grid` or
runs file. Values are typed like the field they replace (as ml_collections'
flags do), so `3` for a float field is 3.0 and `True` for a bool is True.
"""

import ast
import re
from collections.abc import Iterable, Mapping

from mnist_flax.config import schema
from mnist_flax.errors import ConfigError

PREFIX = "--config."
FIELD_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def parse_assignment(text: str, where: str = "override", allow_empty: bool = False) -> tuple[str, str]:
    """`FIELD=VALUE` or `--config.FIELD=VALUE` -> (field, value text); `where` names the source in errors.

    An empty value is an error unless `allow_empty` (the command line's `--config.init_from=` clears a field).
    """
    name, sep, value = text.strip().removeprefix(PREFIX).partition("=")
    name = name.strip()
    if not sep or not FIELD_PATTERN.fullmatch(name) or not (value.strip() or allow_empty):
        raise ConfigError(f"{where} {text!r}: expected FIELD=VALUE, e.g. optimizer.learning_rate=0.01")
    return name, value.strip()


def from_argv(argv: Iterable[str]) -> dict[str, str]:
    """The `--config.FIELD=VALUE` arguments of a command line, as typed (field -> value text)."""
    return dict(
        parse_assignment(arg, "argument", allow_empty=True) for arg in argv if arg.startswith(PREFIX) and "=" in arg
    )


def parse_value(text: str, example=None):
    """The value of `text` for a field whose current value is `example`.

    bool, int, float and str fields take their own type; tuples and lists a
    Python literal (`(512,256)`); a field of no known type any Python literal,
    else the text itself. Raises ConfigError when the text does not fit.
    """
    if isinstance(example, bool):
        lowered = text.lower()
        if lowered not in _TRUE + _FALSE:
            raise ConfigError(f"expects bool, got {text!r}")
        return lowered in _TRUE
    try:
        if isinstance(example, int):
            return int(text)
        if isinstance(example, float):
            return float(text)
    except ValueError:
        raise ConfigError(f"expects {type(example).__name__}, got {text!r}") from None
    if isinstance(example, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if isinstance(example, (list, tuple)):
            raise ConfigError(f"expects a tuple, e.g. (512,256), got {text!r}") from None
        return text
    if isinstance(example, (list, tuple)):
        if not isinstance(value, (list, tuple)):
            value = (value,)
        return list(value)
    return list(value) if isinstance(value, tuple) else value


def apply(flat: Mapping, assignments: Mapping[str, str] | Iterable[str], where: str = "override") -> dict:
    """A flat config with `assignments` applied; an unknown field, a group or a bad value is a ConfigError.

    Args:
      flat: a flat config (`schema.flatten`), not changed.
      assignments: field -> value text, or `FIELD=VALUE` / `--config.FIELD=VALUE` strings.
      where: names the source in error messages.
    """
    if not isinstance(assignments, Mapping):
        assignments = dict(parse_assignment(text, where) for text in assignments)
    result = dict(flat)
    for name, text in assignments.items():
        if name not in result:
            children = [k for k in result if k.startswith(name + ".")]
            if children:
                raise ConfigError(
                    f"config field {name!r} is a group; set one of its fields, e.g. --config.{children[0]}"
                )
            suggestions = schema.nearest_names(name, result)
            hint = f" (did you mean {', '.join(suggestions)}?)" if suggestions else ""
            raise ConfigError(f"unknown config field {name!r}{hint}")
        try:
            result[name] = parse_value(text, result[name])
        except ConfigError as e:
            raise ConfigError(f"config field {name!r} {e}") from None
    return result
