"""The one difference of flat dicts (configs, environments): which keys differ, and how.

`differing_keys` is the comparison; `changes` (drift, environments), `diff` (the `diff` command, a run's
config_changes) and `compare`'s differing fields are views of it.
"""

ABSENT = "(absent)"
_MISSING = object()


def differing_keys(*dicts: dict) -> list[str]:
    """The keys, sorted, whose value is not the same in every dict (a key one of them lacks differs)."""
    keys = sorted(set().union(*dicts)) if dicts else []
    return [k for k in keys if any(d.get(k, _MISSING) != dicts[0].get(k, _MISSING) for d in dicts[1:])]


def changes(saved: dict, current: dict) -> dict[str, list]:
    """{key: [saved value, current value]} for every key that differs (absent: None)."""
    return {k: [saved.get(k), current.get(k)] for k in differing_keys(saved, current)}


def diff(a: dict, b: dict) -> dict:
    """{"changed": {k: [a, b]}, "added": {k: b}, "removed": {k: a}} between two flat dicts."""
    keys = differing_keys(a, b)
    return {
        "changed": {k: [a[k], b[k]] for k in keys if k in a and k in b},
        "added": {k: b[k] for k in keys if k not in a},
        "removed": {k: a[k] for k in keys if k not in b},
    }


def is_empty(difference: dict) -> bool:
    return not any(difference.values())


def format_table(difference: dict, name_a: str = "A", name_b: str = "B") -> str:
    """A `diff` as aligned text: field, A's value, B's value."""
    rows = [(k, repr(v[0]), repr(v[1])) for k, v in difference["changed"].items()]
    rows += [(k, ABSENT, repr(v)) for k, v in difference["added"].items()]
    rows += [(k, repr(v), ABSENT) for k, v in difference["removed"].items()]
    if not rows:
        return "configs are equal"
    widths = [max(len(r[i]) for r in rows + [("field", name_a, name_b)]) for i in range(3)]
    lines = [f"{'field':<{widths[0]}}  {name_a:<{widths[1]}}  {name_b}"]
    lines += [f"{f:<{widths[0]}}  {x:<{widths[1]}}  {y}" for f, x, y in rows]
    return "\n".join(lines)
