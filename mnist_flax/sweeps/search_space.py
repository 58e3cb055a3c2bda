"""A sweep's search space, declared once: in a config file's `sweep*()` function or on the command line.

The vocabulary is W&B's sweep parameters, so one declaration drives both the
local Optuna study (`mnist_flax.commands.sweep`) and a W&B sweep file (`launch/sweep.yaml`
is checked against `configs/default.py`'s `sweep()` by the tests):

    def sweep():                                   # in a config file, beside get_config()
        return {
            "model.name": {"values": ["cnn", "mlp"]},                       # a choice
            "optimizer.learning_rate": {"min": 1e-4, "max": 1e-2,
                                        "distribution": "log_uniform_values"},  # a log-scale range
            "batch_size": {"min": 32, "max": 256},                          # ints: an int range
        }

`sweep_NAME()` declares another space of the same file (`--sweep=NAME`). On the
command line `--grid FIELD=V1,V2`, `--uniform FIELD=LOW,HIGH` and
`--log-uniform FIELD=LOW,HIGH` say the same. Keys are config fields; values are
typed like the field (checked against the config before anything trains).
"""

import itertools
import math
import re
import shlex

from mnist_flax.config import overrides, schema
from mnist_flax.errors import ConfigError

DISTRIBUTIONS = ("uniform", "int_uniform", "log_uniform_values")
RUN_SET = "run_set"  # the parameter a --runs file becomes: one choice per line of overrides


# ---------------------------------------------------------------- declaring


def from_config_file(spec: str, name: str) -> dict:
    """The space `sweep()` (name "") or `sweep_NAME()` of the config file `path[:arg]` declares."""
    path = spec.partition(":")[0]
    function = f"sweep_{name}" if name else "sweep"
    module = schema.load_module(path, prefix="sweep")
    if not callable(getattr(module, function, None)):
        raise ConfigError(f"config file {path} has no {function}() function declaring a search space")
    try:
        space = getattr(module, function)()
    except Exception as e:  # user code
        raise ConfigError(f"{path}: {function}() failed: {type(e).__name__}: {e}") from None
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{path}: {function}() must return a non-empty dict of FIELD -> parameter")
    return space


def split_values(text: str) -> list[str]:
    """Splits `a,b,(1,2)` on the commas outside brackets and quotes: ['a', 'b', '(1,2)']."""
    values, current, depth, quote = [], [], 0, ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    if quote or depth:
        raise ConfigError(f"unbalanced brackets or quotes in {text!r}")
    values.append("".join(current).strip())
    return values


def from_command_line(base: dict, grid: list[str], uniform: list[str], log_uniform: list[str]) -> dict:
    """The space of `--grid`, `--uniform` and `--log-uniform` options, values typed like their fields."""
    space = {}

    def add(option: str, item: str) -> tuple[str, list]:
        name, text = overrides.parse_assignment(item, option)
        if name in space:
            raise ConfigError(f"{name} is given twice; declare each field once")
        values = split_values(text)
        if any(not v for v in values):
            raise ConfigError(f"{option} {item!r}: empty value (expected FIELD=V1,V2,...)")
        example = base.get(name)
        try:
            return name, [overrides.parse_value(v, example) for v in values]
        except ConfigError as e:
            raise ConfigError(f"{option} {name}: {e}") from None

    for item in grid:
        name, values = add("--grid", item)
        space[name] = {"values": values}
    for option, items, distribution in (("--uniform", uniform, "uniform"), ("--log-uniform", log_uniform, "log")):
        for item in items:
            name, values = add(option, item)
            if len(values) != 2 or not all(_is_number(v) for v in values):
                raise ConfigError(f"{option} {item!r}: expected FIELD=LOW,HIGH (two numbers)")
            low, high = values
            if distribution == "log":
                space[name] = {"min": float(low), "max": float(high), "distribution": "log_uniform_values"}
            else:
                space[name] = {"min": low, "max": high}
    return space


def from_runs_file(path: str) -> dict:
    """A file of override sets, one run per line (`FIELD=VALUE ...`, `#` comments), as one choice parameter."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ConfigError(f"--runs {path}: {e.strerror}") from None
    choices = []
    for number, line in enumerate(lines, 1):
        try:
            words = shlex.split(line, comments=True)
        except ValueError as e:
            raise ConfigError(f"{path}:{number}: {e}") from None
        if words:
            pairs = [overrides.parse_assignment(word, f"{path}:{number}:") for word in words]
            choices.append(" ".join(f"{name}={value}" for name, value in pairs))
    if not choices:
        raise ConfigError(f"--runs {path}: no runs in the file")
    return {RUN_SET: {"values": choices}}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------- checking


def normalise(space: dict, base: dict) -> dict:
    """The space with each parameter in one form: {"values": [...]} or {"min", "max", "distribution"}.

    Raises ConfigError for an unknown field, a parameter of unknown form, or a range that is no range.
    """
    result = {}
    for name, spec in space.items():
        if name != RUN_SET and name not in base:
            suggestions = schema.nearest_names(name, base)
            hint = f" (did you mean {', '.join(suggestions)}?)" if suggestions else ""
            raise ConfigError(f"search space: unknown config field {name!r}{hint}")
        if not isinstance(spec, dict):
            raise ConfigError(f"search space: {name}: expected a dict such as {{'values': [...]}}, got {spec!r}")
        if "value" in spec and len(spec) == 1:
            spec = {"values": [spec["value"]]}
        if "values" in spec:
            values = [list(v) if isinstance(v, tuple) else v for v in spec["values"]]
            if set(spec) != {"values"} or not values:
                raise ConfigError(f"search space: {name}: 'values' takes a non-empty list and nothing else")
            if len({repr(v) for v in values}) != len(values):
                raise ConfigError(f"search space: {name}: a value is listed twice")
            result[name] = {"values": values}
            continue
        low, high = spec.get("min"), spec.get("max")
        ints = isinstance(low, int) and isinstance(high, int) and not isinstance(base.get(name), float)
        distribution = spec.get("distribution", "int_uniform" if ints else "uniform")
        if distribution not in DISTRIBUTIONS or set(spec) - {"min", "max", "distribution"}:
            raise ConfigError(
                f"search space: {name}: expected 'values', or 'min'/'max' with a distribution of "
                f"{', '.join(DISTRIBUTIONS)}; got {spec!r}"
            )
        if not (_is_number(low) and _is_number(high)) or not low < high:
            raise ConfigError(f"search space: {name}: 'min' and 'max' must be numbers with min < max; got {spec!r}")
        if distribution == "log_uniform_values" and low <= 0:
            raise ConfigError(f"search space: {name}: a log-uniform range needs min > 0; got {low}")
        result[name] = {"min": low, "max": high, "distribution": distribution}
    return result


def is_grid(space: dict) -> bool:
    return all("values" in spec for spec in space.values())


def grid_points(space: dict) -> list[dict]:
    """Every combination of a space of choices, in declaration order (the last field varies fastest)."""
    names = list(space)
    return [dict(zip(names, point, strict=True)) for point in itertools.product(*(space[n]["values"] for n in names))]


def corners(space: dict) -> list[dict]:
    """Points that exercise every choice and both ends of every range: what `check` validates."""
    choices = {n: s["values"] if "values" in s else [s["min"], s["max"]] for n, s in space.items()}
    longest = max(len(v) for v in choices.values())
    return [{n: v[i % len(v)] for n, v in choices.items()} for i in range(longest)]


def assignments(params: dict) -> dict[str, str]:
    """A trial's parameters as override texts (field -> text), a --runs line expanded into its fields."""
    result = {}
    for name, value in params.items():
        if name == RUN_SET:
            result.update(overrides.parse_assignment(word) for word in shlex.split(value))
        else:
            result[name] = value_text(value)
    return result


def value_text(value) -> str:
    """The override text of a value: `cnn`, `0.003`, `True`, `(512, 256)`."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return repr(tuple(value))
    return repr(value)


# ---------------------------------------------------------------- Optuna and W&B


def optuna_choice(value):
    """Optuna's choices are None, bool, int, float or str: a tuple field's value goes as its text."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else value_text(value)


def suggest(trial, space: dict) -> dict:
    """The trial's value of each parameter (fixed ones for a queued or retried trial)."""
    params = {}
    for name, spec in space.items():
        if "values" in spec:
            params[name] = trial.suggest_categorical(name, [optuna_choice(v) for v in spec["values"]])
        elif spec["distribution"] == "int_uniform":
            params[name] = trial.suggest_int(name, spec["min"], spec["max"])
        else:
            log = spec["distribution"] == "log_uniform_values"
            params[name] = trial.suggest_float(name, spec["min"], spec["max"], log=log)
    return params


def wandb_parameters(space: dict) -> dict:
    """The `parameters` block of a W&B sweep file: `config.FIELD` -> its spec (what ${args} passes to main.py)."""
    if RUN_SET in space:
        raise ConfigError("a --runs file has no W&B sweep form; declare the fields in a sweep() function")
    return {f"config.{name}": dict(spec) for name, spec in space.items()}


def describe(params: dict) -> str:
    """`model.name=cnn optimizer.learning_rate=0.0031` for a log line."""
    return " ".join(f"{k}={_short(v)}" for k, v in params.items())


def folder_name(number: int, params: dict) -> str:
    """A trial's workdir name: its number and values, e.g. `003-cnn-0.0031`."""
    values = "-".join(re.sub(r"[^A-Za-z0-9.+_-]+", "_", _short(v)).strip("_") for v in params.values())
    return f"{number:03d}-{values[:60]}".rstrip("-")


def _short(value) -> str:
    if isinstance(value, float) and not math.isnan(value):
        return f"{value:.4g}".replace("e+", "e")
    return value_text(value)
