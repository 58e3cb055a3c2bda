"""The project environment: one lock for every package, and the setup that makes .venv from it.

`make setup` (tools/setup_venv.sh) runs before every `make train` and `make test`, so the happy path runs
at the start of each test run; these tests take the paths a newcomer hits: a stale lock, a folder that is
not ours, a broken or half-made venv, no usable Python. Each one is one line and exit 2, nothing deleted.
The tests that copy the setup into a temporary checkout reuse this environment's uv (linked in) instead of
installing it again.
"""

import os
import re
import shutil
import subprocess
import sys
import tomllib

import pytest
from conftest import REPO_ROOT

SETUP = os.path.join(REPO_ROOT, "tools", "setup_venv.sh")
UV = os.path.join(sys.prefix, "bin", "uv")
needs_uv = pytest.mark.skipif(not os.access(UV, os.X_OK), reason="not run from the project environment (make test)")


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_packages() -> dict[str, set[str]]:
    with open(os.path.join(REPO_ROOT, "uv.lock"), "rb") as f:
        packages = tomllib.load(f)["package"]
    versions: dict[str, set[str]] = {}
    for package in packages:
        versions.setdefault(package["name"], set()).add(package["version"])
    return versions


def declared() -> tuple[list[str], dict[str, list[str]], list[str]]:
    with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    return (
        project["project"]["dependencies"],
        project["project"]["optional-dependencies"],
        project["dependency-groups"]["dev"],
    )


@needs_uv
def test_the_lock_is_current_with_the_declared_dependencies():
    result = subprocess.run([UV, "lock", "--check"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"uv.lock is stale against pyproject.toml: run `make lock`\n{result.stderr}"


def test_every_declared_pin_is_in_the_lock_with_hashes():
    versions = lock_packages()
    runtime, extras, dev = declared()
    for requirement in runtime + dev + [r for group in extras.values() for r in group]:
        name, _, version = re.sub(r"\[.*\]", "", requirement.split(";")[0]).partition("==")
        assert version, f"{requirement}: pyproject.toml pins every declared dependency"
        assert version.strip() in versions[normalized(name.strip())], requirement
    with open(os.path.join(REPO_ROOT, "uv.lock"), "rb") as f:
        for package in tomllib.load(f)["package"]:
            if package["name"] == "mnist-flax":
                continue
            files = package.get("wheels", []) + ([package["sdist"]] if "sdist" in package else [])
            assert files and all(f["hash"].startswith("sha256:") for f in files), package["name"]


# How `make lock` (tools/setup_venv.sh --lock) writes requirements.txt from uv.lock.
REQUIREMENTS_EXPORT = ["export", "--locked", "--no-dev", "--format", "requirements-txt", "--quiet"]
REQUIREMENTS = os.path.join(REPO_ROOT, "requirements.txt")


@needs_uv
def test_requirements_txt_is_the_lock_exported():
    assert 'uv" ' + " ".join(REQUIREMENTS_EXPORT) + " >requirements.txt" in open(SETUP).read()
    result = subprocess.run([UV, *REQUIREMENTS_EXPORT], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    with open(REQUIREMENTS) as f:
        assert f.read() == result.stdout, "requirements.txt is stale against uv.lock: run `make lock`"


def test_requirements_txt_pins_every_run_package_with_hashes_and_no_tensorflow():
    with open(REQUIREMENTS) as f:
        entries = re.split(r"\n(?=[a-z0-9])", "\n".join(line for line in f.read().splitlines() if "#" not in line))
    pinned = {}
    for entry in filter(str.strip, entries):
        name, _, rest = entry.partition("==")
        assert rest and "--hash=sha256:" in rest, f"requirements.txt: {entry.splitlines()[0]} is not pinned with a hash"
        pinned.setdefault(normalized(name), set()).add(rest.split()[0])
    versions = lock_packages()
    assert all(found <= versions[name] for name, found in pinned.items())
    runtime, _, dev = declared()
    for requirement in runtime:
        name, _, version = re.sub(r"\[.*\]", "", requirement).partition("==")
        assert version in pinned[normalized(name)], requirement
    assert not {"tensorflow", "tensorflow-cpu", "keras"} & set(pinned)  # the `tfds` extra is not in it
    assert normalized(dev[0].partition("==")[0]) not in pinned  # nor the dev group (pytest)


def test_the_cuda_extras_add_the_plugin_at_the_locked_jax_version():
    versions = lock_packages()
    (jax,) = versions["jax"]
    for flavour in ("cuda12", "cuda13"):
        assert versions[f"jax-{flavour}-plugin"] == versions[f"jax-{flavour}-pjrt"] == {jax}
    assert any(name.startswith("nvidia-cudnn-cu12") for name in versions)


@needs_uv
def test_the_environment_this_suite_runs_in_is_the_lock():
    """What `make setup` made holds exactly uv.lock's versions (pip, its installer, aside)."""
    from importlib import metadata

    versions = lock_packages()
    differ = {
        normalized(d.metadata["Name"]): d.version
        for d in metadata.distributions()
        if normalized(d.metadata["Name"]) != "pip" and d.version not in versions.get(normalized(d.metadata["Name"]), ())
    }
    assert not differ, f"installed outside the lock: {differ}"


@needs_uv
def test_a_second_setup_changes_nothing_and_says_nothing():
    result = subprocess.run(["bash", SETUP], capture_output=True, text=True, timeout=60, env=_env(VENV=sys.prefix))
    assert result.returncode == 0, result.stderr
    assert result.stdout == result.stderr == ""


# -- a copy of the setup in a temporary checkout -------------------------------------------------


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHON", "VENV")}
    return {**env, **extra}


def _checkout(tmp_path, pins: dict[str, str] | None = None):
    """tmp_path as a checkout: the setup script, pyproject.toml (with `pins` changed) and uv.lock."""
    (tmp_path / "tools").mkdir()
    for name in ("setup_venv.sh", "uv_requirement.py"):
        shutil.copy(os.path.join(REPO_ROOT, "tools", name), tmp_path / "tools" / name)
    shutil.copy(os.path.join(REPO_ROOT, "uv.lock"), tmp_path / "uv.lock")
    text = open(os.path.join(REPO_ROOT, "pyproject.toml")).read()
    for old, new in (pins or {}).items():
        assert old in text
        text = text.replace(old, new)
    (tmp_path / "pyproject.toml").write_text(text)
    return tmp_path


def _venv_of_ours(checkout, with_uv: bool = True):
    """A venv with the setup's marker and this environment's uv linked in (no pip, no packages)."""
    venv = checkout / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    (venv / ".mnist_flax-venv").write_text("made by the test\n")
    if with_uv:
        os.symlink(UV, venv / "bin" / "uv")
    return venv


def _setup(checkout, *args: str, timeout=300, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [shutil.which("bash"), str(checkout / "tools" / "setup_venv.sh"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(**env),
    )


def _one_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, (result.returncode, result.stdout, result.stderr)
    assert lines[0].startswith("setup: ")
    return lines[0]


@needs_uv
def test_a_lock_stale_against_the_declaration_is_refused(tmp_path):
    checkout = _checkout(tmp_path, {'"tqdm==4.70.1"': '"tqdm==4.67.1"'})
    venv = _venv_of_ours(checkout)
    line = _one_line(_setup(checkout))
    assert "uv.lock does not match pyproject.toml" in line and "make lock" in line
    assert not (venv / ".mnist_flax-synced").exists()
    assert os.listdir(venv / "lib")  # the venv is left as it was


def test_a_venv_that_is_not_ours_is_not_touched(tmp_path):
    checkout = _checkout(tmp_path)
    (checkout / ".venv").mkdir()
    (checkout / ".venv" / "mine.txt").write_text("the user's")
    line = _one_line(_setup(checkout))
    assert ".venv exists but was not made by this setup" in line
    assert os.listdir(checkout / ".venv") == ["mine.txt"]


def test_a_venv_whose_python_is_gone_is_named_with_the_fix(tmp_path):
    checkout = _checkout(tmp_path)
    venv = checkout / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / ".mnist_flax-venv").write_text("made by the test\n")
    os.symlink(tmp_path / "no-such-python", venv / "bin" / "python")
    line = _one_line(_setup(checkout))
    assert "Python does not run" in line and "rm -rf .venv" in line
    assert (venv / ".mnist_flax-venv").exists()


def test_no_supported_python_is_one_line(tmp_path):
    checkout = _checkout(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "cat"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    old = bin_dir / "python3"
    old.write_text('#!/bin/sh\necho "3.9"\n')
    old.chmod(0o755)
    line = _one_line(_setup(checkout, PATH=str(bin_dir)))
    assert "no Python 3.11-3.14 found" in line and "python3 (3.9)" in line and "PYTHON=" in line
    line = _one_line(_setup(checkout, PYTHON=str(old)))
    assert "is Python 3.9" in line
    assert not (checkout / ".venv").exists()


@needs_uv
@pytest.mark.slow
def test_a_half_made_venv_is_completed_and_then_left_alone(tmp_path):
    """An install cut short (no stamp yet) is synced on the next run; a changed lock is synced again."""
    checkout = _checkout(tmp_path)
    venv = _venv_of_ours(checkout)
    result = _setup(checkout, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "completing an interrupted install of .venv" in result.stdout
    python = str(venv / "bin" / "python")
    probe = "import jax, flax, optax, wandb, optuna; print(jax.__version__)"
    (jax_version,) = lock_packages()["jax"]
    assert subprocess.run([python, "-c", probe], capture_output=True, text=True).stdout.strip() == jax_version
    again = _setup(checkout)
    assert again.returncode == 0 and again.stdout == again.stderr == ""
    # No TensorFlow without the `tfds` extra (`make train`); with it (`make setup`), it stays once installed.
    has_tensorflow = [python, "-c", "import importlib.util as u; print(u.find_spec('tensorflow') is not None)"]
    assert subprocess.run(has_tensorflow, capture_output=True, text=True).stdout.strip() == "False"
    with_extra = _setup(checkout, "--extra", "tfds", timeout=600)
    assert with_extra.returncode == 0, with_extra.stderr
    assert subprocess.run(has_tensorflow, capture_output=True, text=True).stdout.strip() == "True"
    again = _setup(checkout)
    assert again.returncode == 0 and again.stdout == again.stderr == ""
    assert subprocess.run(has_tensorflow, capture_output=True, text=True).stdout.strip() == "True"
    with open(checkout / "pyproject.toml", "a") as f:
        f.write("\n# an edit\n")
    changed = _setup(checkout)
    assert changed.returncode == 0, changed.stderr
    assert "changed since .venv was synced; syncing" in changed.stdout
