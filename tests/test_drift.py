"""Resuming with another config or other data: refused before anything is touched, or recorded when safe."""

import copy
import gzip
import hashlib
import json
import os
import shutil

import ml_collections
import pytest
from conftest import run_main
from shared import copy_run, mlp_run_args, write_distribution

from mnist_flax import layout
from mnist_flax.errors import ConfigError
from mnist_flax.records import runs
from mnist_flax.training import drift

pytestmark = pytest.mark.slow


def _args(data_dir, workdir, **extra):
    """A start (or resume) of tests/shared.py's one-epoch MLP run on `workdir`, with `extra` fields changed."""
    return mlp_run_args(data_dir, workdir, **extra)


def _snapshot(workdir) -> dict:
    """Every file of the checkpoints, the W&B run folder and config.json, by content."""
    files = {}
    for top in ("checkpoints", "wandb"):
        for folder, _, names in os.walk(os.path.join(workdir, top)):
            for name in names:
                path = os.path.join(folder, name)
                files[os.path.relpath(path, workdir)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    files[layout.CONFIG] = hashlib.sha256(open(os.path.join(workdir, layout.CONFIG), "rb").read()).hexdigest()
    return files


def _extra_package_difference(finished_run) -> str:
    """What the resume names: the extra package, and the verdict where the checkpoint's run was the locked one."""
    locked = json.load(open(os.path.join(finished_run, layout.PROVENANCE)))["environment"]["locked"]
    return ("locked True -> False, " if locked else "") + "packages.extra-pkg not installed -> 1.0"


def _with_an_extra_package(tmp_path) -> dict:
    """An environment for main.py with one more distribution than the checkpoint's, as `pip install` adds one."""
    site = tmp_path / "site"
    write_distribution(site, "extra_pkg", "1.0")
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}


@pytest.fixture
def finished_run(finished_mlp_run) -> str:
    """tests/shared.py's finished one-epoch MLP run (checkpoint at step 20); the tests here only refuse to change
    it, and check that it stayed byte for byte as it was. Tests that resume it work on a copy."""
    return finished_mlp_run


def test_a_change_that_changes_the_training_is_refused_through_main(finished_run, tiny_data_dir):
    before = _snapshot(finished_run)
    result = run_main(_args(tiny_data_dir, finished_run, **{"optimizer.learning_rate": 0.01}))
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: resuming at step 20 with a different config"), lines
    assert "optimizer.learning_rate: 0.0001 -> 0.01" in lines[0]
    assert _snapshot(finished_run) == before  # checkpoints, W&B run folder and config.json byte for byte


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("model.dense_features", [64, 32], "model.dense_features: [512, 256] -> [64, 32]"),
        ("batch_size", 40, "batch_size: 50 -> 40"),
        ("data.name", "mnist", "data.name: 'fashion_mnist' -> 'mnist'"),
        ("seed", 1, "seed: 0 -> 1"),
    ],
)
def test_each_field_that_changes_the_training_is_refused(finished_run, field, value, named):
    """The decision main.py's refusal above comes from, for more fields: the run's saved resolved config against
    the same config with one field changed."""
    saved = json.load(open(os.path.join(finished_run, layout.CONFIG)))
    config = ml_collections.ConfigDict(copy.deepcopy(saved))
    with config.unlocked():
        parent, _, name = field.rpartition(".")
        (config[parent] if parent else config)[name] = value
    with pytest.raises(ConfigError, match=r"^resuming at step 20 with a different config") as refused:
        drift.check(saved, config, 20, os.path.join(finished_run, "checkpoints"))
    assert named in str(refused.value)
    # The same config with only fields that are safe to change passes, and the change is returned for the record.
    safe = ml_collections.ConfigDict(copy.deepcopy(saved))
    safe.log_every_steps = 7
    assert drift.check(saved, safe, 20) == {"log_every_steps": [5, 7]}


def test_a_record_only_change_resumes_and_is_recorded(finished_run, tiny_data_dir, tmp_path):
    workdir = copy_run(finished_run, tmp_path / "renamed")
    # In another environment too (one more package): by default a warning, and the new record says so.
    result = run_main(
        _args(tiny_data_dir, workdir, **{"wandb.name": "renamed", "log_every_steps": 7}),
        env=_with_an_extra_package(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming at step 20 with changed fields" in result.stdout
    warning = (
        f"warning: resuming in another environment than the checkpoint's ({_extra_package_difference(finished_run)})"
    )
    assert warning in result.stdout.splitlines(), result.stdout[-2000:]
    environment = json.load(open(os.path.join(workdir, layout.PROVENANCE)))["environment"]
    assert environment["packages"]["extra-pkg"] == "1.0" and environment["locked"] is False
    assert environment["unlocked"]["extra-pkg"] == ["not in uv.lock", "1.0"]  # outside the locked environment
    history = json.load(open(os.path.join(workdir, layout.CONFIG_HISTORY)))
    assert [entry["step"] for entry in history] == [20]
    assert history[0]["changed"] == {"log_every_steps": [5, 7], "wandb.name": ["", "renamed"]}
    assert history[0]["previous_config"]["log_every_steps"] == 5
    assert json.load(open(os.path.join(workdir, layout.CONFIG)))["wandb"]["name"] == "renamed"
    # W&B's record of the new start says so too, in the same run.
    folders = runs.offline_run_folders(workdir)
    assert len(folders) == 2
    first, second = (runs.load(folder, history=False, predictions=False) for folder in folders)
    assert first.wandb_id == second.wandb_id
    assert second.config["wandb.name"] == "renamed" and first.config["wandb.name"] == ""


def test_a_deliberate_change_is_allowed_and_kept(finished_run, tiny_data_dir, tmp_path):
    workdir = copy_run(finished_run, tmp_path / "longer")
    result = run_main(_args(tiny_data_dir, workdir, num_epochs=2, **{"resume.allow_config_changes": True}))
    assert result.returncode == 0, result.stderr[-2000:]
    final = json.load(open(os.path.join(workdir, layout.FINAL_METRICS)))
    assert final["steps"] == 40
    history = json.load(open(os.path.join(workdir, layout.CONFIG_HISTORY)))
    assert history[0]["step"] == 20 and history[0]["changed"]["num_epochs"] == [1, 2]
    assert history[0]["previous_config"]["num_epochs"] == 1


def _copy_with_one_label_changed(source: str, target: str) -> None:
    shutil.copytree(source, target)
    path = os.path.join(target, "train-labels-idx1-ubyte.gz")
    raw = bytearray(gzip.decompress(open(path, "rb").read()))
    raw[8] = (raw[8] + 1) % 10  # the first label (after the 8-byte header)
    open(path, "wb").write(gzip.compress(bytes(raw)))


def test_other_data_has_another_fingerprint_and_is_refused_on_resume(finished_run, tiny_data_dir, tmp_path):
    changed_dir = str(tmp_path / "changed_data")
    _copy_with_one_label_changed(tiny_data_dir, changed_dir)
    fresh = str(tmp_path / "fresh")
    assert run_main(_args(changed_dir, fresh)).returncode == 0
    original = json.load(open(os.path.join(finished_run, layout.PROVENANCE)))["data"]
    modified = json.load(open(os.path.join(fresh, layout.PROVENANCE)))["data"]
    assert original["test"] == modified["test"]  # the test file is the same
    assert [original[s] == modified[s] for s in ("train", "validation")].count(False) == 1  # one label moved
    assert original["files"]["train-labels-idx1-ubyte.gz"] != modified["files"]["train-labels-idx1-ubyte.gz"]
    before = _snapshot(finished_run)
    result = run_main(_args(changed_dir, finished_run))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: resuming at step 20 on other data"), lines
    assert _snapshot(finished_run) == before


def test_safe_fields_each_say_why():
    assert all(reason.strip() for reason in drift.SAFE_ON_RESUME.values())


def test_strict_environment_refuses_the_resume(finished_run, tiny_data_dir, tmp_path):
    before = _snapshot(finished_run)
    args = _args(tiny_data_dir, finished_run, **{"resume.strict_environment": True})
    result = run_main(args, env=_with_an_extra_package(tmp_path))
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    named = _extra_package_difference(finished_run)
    expected = f"error: resuming at step 20 in another environment than the checkpoint's ({named}) with "
    expected += "resume.strict_environment=True; "
    assert len(lines) == 1 and lines[0].startswith(expected), lines
    assert _snapshot(finished_run) == before
