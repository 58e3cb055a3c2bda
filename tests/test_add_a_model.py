"""docs/add_a_model.md, performed literally: its files written into a copy of the checkout, then trained and
resumed with the page's command (on the tiny data)."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, SUBPROCESS_ENV, tiny_overrides

from mnist_flax import layout

PAGE = os.path.join(REPO_ROOT, "docs", "add_a_model.md")


def page_files() -> dict[str, str]:
    """{path: text} of every ```python block the page introduces with its path in backticks."""
    text = open(PAGE).read()
    return dict(re.findall(r"^`([\w/.]+\.py)`:\n\n```python\n(.*?)```", text, flags=re.S | re.M))


def page_command() -> list[str]:
    """The page's training command, as arguments after `python main.py`."""
    (command,) = re.findall(r"^python main\.py (.*)$", open(PAGE).read(), flags=re.M)
    return command.split()


def checkout_copy(destination) -> str:
    """The tracked files of the checkout (`git ls-files`), as a user's fork has them."""
    listed = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    for name in listed.stdout.splitlines():
        source = os.path.join(REPO_ROOT, name)
        if os.path.isfile(source):
            os.makedirs(os.path.join(destination, os.path.dirname(name)), exist_ok=True)
            shutil.copy2(source, os.path.join(destination, name))
    return str(destination)


def test_the_page_shows_a_model_file_and_a_config_file():
    assert set(page_files()) == {"mnist_flax/models/tiny_convnet.py", "configs/tiny_convnet.py"}
    assert page_command()[0] == "--config=configs/tiny_convnet.py"


@pytest.mark.slow
def test_the_pages_steps_train_and_resume_a_new_model(tmp_path, tiny_data_dir):
    fork = checkout_copy(tmp_path / "fork")
    for path, text in page_files().items():
        with open(os.path.join(fork, path), "w") as f:
            f.write(text)
    workdir = str(tmp_path / "run")
    args = [a if not a.startswith("--workdir=") else f"--workdir={workdir}" for a in page_command()]

    def train(**extra):
        return subprocess.run(
            [sys.executable, "main.py", *args, *tiny_overrides(tiny_data_dir, **extra)],
            cwd=fork,
            env={**os.environ, **SUBPROCESS_ENV},
            capture_output=True,
            text=True,
            timeout=600,
        )

    first = train(num_epochs=1)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "tiny_convnet with" in first.stdout
    recorded = json.loads(open(os.path.join(workdir, layout.CONFIG)).read())
    assert recorded["model"] == {"name": "tiny_convnet", "features": 16, "dropout_rate": 0.1}
    resumed = train(num_epochs=2, **{"resume.allow_config_changes": True})
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed at step 20" in resumed.stdout
    report = json.loads(open(os.path.join(workdir, layout.FINAL_METRICS)).read())
    assert report["steps"] == 40 and report["test"]["accuracy"] > 0.5
