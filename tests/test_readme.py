"""The README tells the truth about the configs: every field is in its reference table, with its default."""

import os
import re

from conftest import REPO_ROOT

from mnist_flax import config_utils

README = open(os.path.join(REPO_ROOT, "README.md")).read()


def _table_rows() -> dict[str, str]:
    rows = {}
    for line in README.splitlines():
        match = re.match(r"\| (`[^|]+`) \| ([^|]*) \|", line)
        if match:
            for name in re.findall(r"`([a-z0-9_.]+)`", match.group(1)):
                rows[name] = match.group(2).strip()
    return rows


def test_every_config_field_is_documented_with_its_default():
    rows = _table_rows()
    defaults = config_utils.flatten(config_utils.load_config_file(os.path.join(REPO_ROOT, "configs", "default.py")))
    missing = sorted(set(defaults) - set(rows))
    assert not missing, f"fields missing from the README's config reference: {missing}"
    for name, value in defaults.items():
        assert _normalise(value) in _normalise(rows[name]), f"{name}: README says {rows[name]!r}, config {value!r}"


def _normalise(value) -> str:
    """Both sides as comparable text: (32, 64) and [32, 64] alike, '' for empty strings, no quotes or spaces."""
    text = value if isinstance(value, str) else repr(value)
    if value == "":
        text = "''"
    for old, new in (("`", ""), ("(", "["), (")", "]"), (",]", "]"), (" ", ""), ('"', "")):
        text = text.replace(old, new)
    return text if text == "''" else text.replace("'", "")


def test_quick_start_names_the_two_commands():
    quick_start = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "make train" in quick_start and "make test" in quick_start
    makefile = open(os.path.join(REPO_ROOT, "Makefile")).read()
    assert re.search(r"^train: setup", makefile, re.M) and re.search(r"^test: setup", makefile, re.M)
