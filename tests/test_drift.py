"""Resuming with another config or other data: refused before anything is touched, or recorded when safe."""

import gzip
import hashlib
import json
import os
import shutil

import pytest
from conftest import run_main, tiny_overrides
from test_environment_record import write_distribution

from mnist_flax import layout
from mnist_flax.records import runs
from mnist_flax.training import drift

pytestmark = pytest.mark.slow


def _args(data_dir, workdir, **extra):
    return ["--config=configs/mlp.py", f"--workdir={workdir}", *tiny_overrides(data_dir, num_epochs=1, **extra)]


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


@pytest.fixture(scope="module")
def finished_run(tiny_data_dir, tmp_path_factory) -> str:
    workdir = str(tmp_path_factory.mktemp("drift") / "run")
    result = run_main(_args(tiny_data_dir, workdir))
    assert result.returncode == 0, result.stderr[-2000:]
    return workdir


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("optimizer.learning_rate=0.01", "optimizer.learning_rate: 0.003 -> 0.01"),
        ("model.dense_features=(64,32)", "model.dense_features: [512, 256] -> [64, 32]"),
        ("batch_size=40", "batch_size: 50 -> 40"),
        ("data.name=mnist", "data.name: 'fashion_mnist' -> 'mnist'"),
        ("seed=1", "seed: 0 -> 1"),
    ],
)
def test_a_change_that_changes_the_training_is_refused(finished_run, tiny_data_dir, override, named):
    before = _snapshot(finished_run)
    field, value = override.split("=", 1)
    result = run_main(_args(tiny_data_dir, finished_run, **{field: value}))
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: resuming at step 20 with a different config"), lines
    assert named in lines[0]
    assert _snapshot(finished_run) == before  # checkpoints, W&B run folder and config.json byte for byte


def test_a_record_only_change_resumes_and_is_recorded(finished_run, tiny_data_dir, tmp_path):
    workdir = str(tmp_path / "renamed")
    shutil.copytree(finished_run, workdir)
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
    workdir = str(tmp_path / "longer")
    shutil.copytree(finished_run, workdir)
    extra = {"num_epochs": 2, "resume.allow_config_changes": True}
    result = run_main(["--config=configs/mlp.py", f"--workdir={workdir}", *tiny_overrides(tiny_data_dir, **extra)])
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
