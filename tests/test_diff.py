"""`python -m mnist_flax diff A B`: files, workdirs, overrides; exit 0 equal, 1 different, 2 bad input."""

import json
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from mnist_flax import layout
from mnist_flax.commands.diff import load_flat
from mnist_flax.config import diff, overrides, schema
from mnist_flax.records.files import write_json


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "mnist_flax", "diff", *args], cwd=REPO_ROOT, capture_output=True, text=True
    )


def _workdir(tmp_path, name, spec):
    """A workdir as a run leaves it, as far as `diff` reads it: config.json of the resolved config."""
    path = tmp_path / name
    path.mkdir()
    file, *assignments = spec.split()
    config = schema.load_config_file(file)
    flat = overrides.apply(schema.flatten(config), assignments)
    for key, value in flat.items():
        section, _, leaf = key.rpartition(".")
        target = config
        for part in section.split(".") if section else []:
            target = target[part]
        target[leaf] = tuple(value) if isinstance(value, list) else value
    write_json(str(path / layout.CONFIG), config.to_dict())
    return str(path)


def test_two_config_files_show_changed_and_removed_fields():
    result = _cli("configs/cnn.py", "configs/mlp.py")
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["field", "configs/cnn.py", "configs/mlp.py"]
    rows = {line.split()[0]: line.split(None, 1)[1] for line in lines[1:]}
    assert rows["model.name"].split() == ["'cnn'", "'mlp'"]
    assert rows["model.dense_features"].replace(" ", "") == "[256][512,256]"
    assert rows["model.conv_features"].endswith("(absent)")  # removed in mlp.py (nested key, flattened)
    assert "seed" not in rows  # equal fields are not listed


def test_equal_configs_exit_0():
    result = _cli("configs/cnn.py", "configs/default.py")
    assert result.returncode == 0 and result.stdout.strip() == "configs are equal"


def test_workdirs_and_a_file_against_a_workdir(tmp_path):
    a = _workdir(tmp_path, "a", "configs/cnn.py --config.optimizer.learning_rate=0.01")
    b = _workdir(tmp_path, "b", "configs/cnn.py --config.batch_size=64")
    result = _cli(a, b, "--json")
    assert result.returncode == 1
    difference = json.loads(result.stdout)
    assert difference == {
        "changed": {"batch_size": [128, 64], "optimizer.learning_rate": [0.01, 0.003]},
        "added": {},
        "removed": {},
    }
    assert _cli("configs/cnn.py --config.optimizer.learning_rate=0.01", a).returncode == 0
    against_mlp = json.loads(_cli(a, "configs/mlp.py", "--json").stdout)
    assert "model.conv_features" in against_mlp["removed"]


def test_added_fields(tmp_path):
    a = _workdir(tmp_path, "a", "configs/mlp.py")
    difference = diff.diff(load_flat(a), load_flat("configs/cnn.py"))
    assert difference["added"] == {"model.conv_features": [32, 64]}


@pytest.mark.parametrize(
    ("a", "b", "message"),
    [
        ("/nonexistent/run", "configs/cnn.py", "error: /nonexistent/run: not a config file, run workdir"),
        ("configs/nope.py", "configs/cnn.py", "error: config file configs/nope.py does not exist"),
        ("configs/cnn.py --config.lr=1", "configs/cnn.py", "error: unknown config field 'lr'"),
        ("configs/cnn.py --config.lr", "configs/cnn.py", "error: malformed override '--config.lr'"),
    ],
)
def test_bad_sides_are_one_line_and_exit_2(a, b, message, tmp_path):
    result = _cli(a, b)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr


def test_empty_folder_is_not_a_workdir(tmp_path):
    result = _cli(str(tmp_path), "configs/cnn.py")
    assert result.returncode == 2 and "is not a run workdir (no config.json)" in result.stderr
