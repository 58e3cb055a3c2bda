"""The CUDA image's recipe resolves: requirements.txt with the `jax[cudaNN]` extra the Dockerfile adds.

A GPU user's `docker build` installs exactly this; a pin that clashes with the CUDA plugin would fail there,
on a machine this suite never sees. `pip install --dry-run` resolves it from the package index (metadata
only: no wheel is downloaded) and reports what it would install.
"""

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO_ROOT


def _pinned(name: str) -> str:
    with open(os.path.join(REPO_ROOT, "requirements.txt")) as f:
        return next(line.split("==")[1].strip() for line in f if line.startswith(f"{name}=="))


def test_the_dockerfile_adds_the_extra_at_requirements_jax():
    with open(os.path.join(REPO_ROOT, "Dockerfile")) as f:
        dockerfile = f.read()
    assert re.search(r'cuda12\|cuda13\) extra="jax\[\$JAX_FLAVOUR\]"', dockerfile)
    assert "pip install --no-cache-dir -r /tmp/requirements.txt $extra" in dockerfile


@pytest.mark.slow
@pytest.mark.parametrize("flavour", ["cuda12", "cuda13"])
def test_requirements_with_the_cuda_extra_resolve(flavour, tmp_path):
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", f"--report={report}"]
        + ["-r", os.path.join(REPO_ROOT, "requirements.txt"), f"jax[{flavour}]"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    installed = {
        re.sub(r"[-_.]+", "-", item["metadata"]["name"]).lower(): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    jax_version = _pinned("jax")
    assert installed["jax"] == installed["jaxlib"] == jax_version
    assert installed[f"jax-{flavour}-plugin"] == installed[f"jax-{flavour}-pjrt"] == jax_version
    if flavour == "cuda12":
        assert any(name.startswith("nvidia-cudnn-cu12") for name in installed)
    for name in ("flax", "optax", "orbax-checkpoint", "tensorflow-cpu", "optuna"):
        assert installed[name] == _pinned(name)  # the CUDA extra moves no pin
