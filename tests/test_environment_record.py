"""The environment in the record: every installed distribution, the hash of uv.lock and whether it pins them all;
resume and reproduce compare records field by field and package by package."""

import hashlib
import os
import sys
from importlib import metadata

import ml_collections
import pytest
from shared import write_distribution, write_lock

from configs import default
from mnist_flax.config import diff, overrides, schema
from mnist_flax.errors import ConfigError, MnistFlaxError
from mnist_flax.records import provenance
from mnist_flax.training import drift

IN_PROJECT_VENV = os.path.realpath(sys.prefix) == os.path.realpath(os.path.join(schema.REPO_ROOT, ".venv"))


@pytest.fixture(scope="module")
def installed() -> dict[str, str]:
    return provenance.installed_packages()


def test_names_are_normalized_as_pep_503():
    assert provenance.normalize("Orbax_Checkpoint") == "orbax-checkpoint"
    assert provenance.normalize("zope.interface") == "zope-interface"
    assert provenance.normalize("a-_.B") == "a-b"


def test_the_record_holds_every_package_the_lock_hash_and_the_verdict(tmp_path, monkeypatch, installed):
    monkeypatch.setattr(schema, "REPO_ROOT", str(tmp_path))  # the checkout's uv.lock: this one
    lock = write_lock(tmp_path / "uv.lock", {n: v for n, v in installed.items() if n not in provenance.NOT_LOCKED})
    record = provenance.environment()
    assert record["lock_sha256"] == hashlib.sha256(open(lock, "rb").read()).hexdigest()
    assert record["packages"] == installed and record["packages"]["jax"] == metadata.version("jax")
    assert record["locked"] is True and record["unlocked"] == {}
    # What it recorded before stays: the named libraries at the top level, as package_versions reads them.
    assert {n: record[n] for n in provenance.ENVIRONMENT_PACKAGES} == provenance.package_versions(
        provenance.ENVIRONMENT_PACKAGES
    )
    assert {"python", "backend", "device_kind", "device_count", "cpu_count", "process_count"} <= record.keys()


def test_another_version_or_a_package_the_lock_lacks_is_outside_it(tmp_path, installed):
    pins = {n: v for n, v in installed.items() if n != "jax"}
    pins["numpy"] = "1.0.0"
    pins["scipy"] = ["0.1.0", installed["scipy"]]  # a universal lock's two forks: the installed one is pinned
    record = provenance.installed_environment(write_lock(tmp_path / "uv.lock", pins))
    assert record["locked"] is False
    assert record["unlocked"] == {"jax": ["not in uv.lock", installed["jax"]], "numpy": ["1.0.0", installed["numpy"]]}
    line = provenance.describe_unlocked(record)
    assert line == f"jax {installed['jax']} (not in uv.lock), numpy {installed['numpy']} (uv.lock pins 1.0.0)"


def test_an_extra_installed_package_is_named_and_pip_is_not(tmp_path, monkeypatch, installed):
    site = tmp_path / "site"
    write_distribution(site, "Extra_Tool.Kit", "2.13.0")
    monkeypatch.syspath_prepend(str(site))
    lock = write_lock(tmp_path / "uv.lock", {n: v for n, v in installed.items() if n != "pip"})
    record = provenance.installed_environment(lock)
    assert record["packages"]["extra-tool-kit"] == "2.13.0"
    assert record["unlocked"] == {"extra-tool-kit": ["not in uv.lock", "2.13.0"]}  # pip: seeded by venv, in no lock
    assert record["locked"] is False


def test_without_a_lock_the_record_says_absent(tmp_path):
    record = provenance.installed_environment(str(tmp_path / "uv.lock"))
    assert record["lock_sha256"] == "absent" and record["locked"] is False and record["unlocked"] == {}
    assert provenance.describe_unlocked(record) == "no uv.lock beside the code"


@pytest.mark.skipif(not IN_PROJECT_VENV, reason=f"runs outside the project's .venv ({sys.prefix}): not from uv.lock")
def test_the_project_venv_is_the_locked_environment():
    record = provenance.installed_environment()
    assert record["unlocked"] == {}, "the .venv differs from uv.lock: run `make setup`"
    assert record["locked"] is True


# ---------------------------------------------------------------- comparison


def _record(packages: dict, **fields) -> dict:
    flat = {n: packages.get(n, provenance.NOT_INSTALLED) for n in provenance.ENVIRONMENT_PACKAGES}
    base = {"python": "3.11.7", "backend": "cpu", "cpu_count": 2, "lock_sha256": "a" * 64, "locked": True}
    return {**base, **flat, **fields, "unlocked": {}, "packages": packages}


def test_environments_are_compared_field_by_field_and_package_by_package():
    saved = _record({"jax": "0.10.2", "numpy": "2.4.6", "optax": "0.2.8"})
    current = _record(
        {"jax": "0.10.2", "numpy": "2.4.5", "torch": "2.13.0"},
        lock_sha256="b" * 64,
        locked=False,
        unlocked={"numpy": ["2.4.6", "2.4.5"]},
    )
    assert provenance.compare_environment(saved, current) == {
        "lock_sha256": ["a" * 64, "b" * 64],
        "locked": [True, False],
        "packages.numpy": ["2.4.6", "2.4.5"],
        "packages.optax": ["0.2.8", "not installed"],
        "packages.torch": ["not installed", "2.13.0"],
    }  # the top-level copies (numpy, optax) are left to packages; the fields come before the packages
    assert list(provenance.compare_environment(saved, current))[:2] == ["lock_sha256", "locked"]
    assert provenance.compare_environment(saved, dict(saved)) == {}
    assert provenance.compare_environment(None, current) == {}


def test_a_record_from_before_the_lock_is_compared_on_what_both_hold():
    old = {"python": "3.11.7", "jax": "0.10.1", "numpy": "2.4.6", "backend": "cpu", "cpu_count": 2}
    new = _record({"jax": "0.10.2", "numpy": "2.4.6"})
    assert provenance.compare_environment(old, new) == {"jax": ["0.10.1", "0.10.2"]}
    assert provenance.compare_environment(old, {**new, "jax": "0.10.1"}) == {}  # no lock_sha256, no packages noise


def test_many_differences_make_one_readable_line():
    changed = {"lock_sha256": ["a" * 64, "b" * 64]}
    changed.update({f"packages.p{i:02}": ["1.0", "2.0"] for i in range(11)})
    line = provenance.describe_changes(changed)
    assert line.startswith(f"lock_sha256 {'a' * 12} -> {'b' * 12}, packages.p00 1.0 -> 2.0, ")
    assert line.endswith("packages.p06 1.0 -> 2.0, and 4 more") and line.count(" -> ") == 8


def test_changes_is_one_function_for_configs_and_environments():
    assert diff.changes({"a": 1, "b": [1, 2]}, {"a": 1, "b": [1, 3], "c": True}) == {
        "b": [[1, 2], [1, 3]],
        "c": [None, True],
    }


# ---------------------------------------------------------------- resume


def _config(strict: bool) -> ml_collections.ConfigDict:
    config = default.get_config()
    config.resume.strict_environment = strict
    return config


def test_resume_in_another_environment_warns_by_default_and_is_refused_when_strict(capsys):
    saved = _record({f"p{i:02}": "1.0" for i in range(10)})
    current = _record({f"p{i:02}": "2.0" for i in range(10)}, cpu_count=4)
    drift.check_environment(_config(False), saved, current, step=20)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("warning: resuming in another environment than the checkpoint's (")
    assert "cpu_count 2 -> 4, packages.p00 1.0 -> 2.0" in out and "and 3 more)" in out
    with pytest.raises(MnistFlaxError) as refused:
        drift.check_environment(_config(True), saved, current, step=20)
    message = str(refused.value)
    assert "\n" not in message and message.startswith("resuming at step 20 in another environment")
    assert "cpu_count 2 -> 4" in message and "--config.resume.strict_environment=False" in message
    drift.check_environment(_config(True), saved, dict(saved), step=20)  # the same environment: no refusal


def test_strict_environment_is_a_typed_switch_safe_to_change_on_resume():
    config = default.get_config()
    assert config.resume.strict_environment is False and "resume.strict_environment" in drift.SAFE_ON_RESUME
    flat = schema.flatten(config)
    assert overrides.apply(flat, {"resume.strict_environment": "True"})["resume.strict_environment"] is True
    with pytest.raises(ConfigError, match="expects bool"):
        overrides.apply(flat, {"resume.strict_environment": "maybe"})
    config.resume.strict_environment = True
    schema.validate(config)
