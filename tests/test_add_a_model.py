"""docs/add_a_model.md, performed literally: its files written into a copy of the checkout, then the commands of
its step 3 run there (on the tiny data): train, resume, export, predict, compare."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, SUBPROCESS_ENV, make_learnable_split, tiny_overrides
from PIL import Image
from shared import checkout_copy, page_files

from mnist_flax import layout

PAGE = os.path.join(REPO_ROOT, "docs", "add_a_model.md")


def page_commands() -> list[list[str]]:
    """The commands of the page's ```bash block, each split into words."""
    (block,) = re.findall(r"^```bash\n(.*?)```", open(PAGE).read(), flags=re.S | re.M)
    return [line.split() for line in block.splitlines() if line.strip()]


def test_the_page_shows_a_model_file_and_a_config_file():
    assert set(page_files(PAGE)) == {"mnist_flax/models/tiny_convnet.py", "configs/tiny_convnet.py"}
    commands = page_commands()
    assert [command[:3] for command in commands] == [
        ["python", "main.py", "--config=configs/tiny_convnet.py"],
        ["python", "main.py", "--config=configs/tiny_convnet.py"],
        ["python", "-m", "mnist_flax"],
        ["python", "-m", "mnist_flax"],
        ["python", "-m", "mnist_flax"],
    ]
    assert [command[3] for command in commands[2:]] == ["export", "predict", "compare"]


@pytest.mark.slow
def test_the_pages_steps_train_resume_export_predict_and_compare_a_new_model(tmp_path, tiny_data_dir, finished_mlp_run):
    fork = checkout_copy(tmp_path / "fork")
    for path, text in page_files(PAGE).items():
        with open(os.path.join(fork, path), "w") as f:
            f.write(text)
    # The page's paths, in the fork: its run, the README's MLP run (the shared tiny MLP run), a picture to classify.
    shutil.copytree(finished_mlp_run, os.path.join(fork, "runs", "mlp"))
    images, _ = make_learnable_split(1, seed=3)
    Image.fromarray(images[0]).save(os.path.join(fork, "shoe.png"))

    def run(command: list[str], epochs: int) -> subprocess.CompletedProcess:
        if command[1] == "main.py":  # on the tiny data, for `epochs` (the page's own count scaled down)
            command = [*command, *tiny_overrides(tiny_data_dir, num_epochs=epochs)]
        result = subprocess.run(
            [sys.executable, *command[1:]],
            cwd=fork,
            env={**os.environ, **SUBPROCESS_ENV},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
        return result

    train, longer, export, predict, compare = page_commands()
    workdir = os.path.join(fork, "runs", "tiny_convnet")
    first = run(train, epochs=1)
    assert "tiny_convnet with" in first.stdout
    recorded = json.loads(open(os.path.join(workdir, layout.CONFIG)).read())
    assert recorded["model"] == {"name": "tiny_convnet", "features": 16, "dropout_rate": 0.1}
    resumed = run(longer, epochs=2)
    assert "resumed at step 20" in resumed.stdout
    report = json.loads(open(os.path.join(workdir, layout.FINAL_METRICS)).read())
    assert report["steps"] == 40 and report["test"]["accuracy"] > 0.5

    run(export, epochs=0)
    card = json.loads(open(os.path.join(workdir, "export", "model_card.json")).read())
    assert card["model"]["name"] == "tiny_convnet" and os.path.isfile(os.path.join(workdir, "export", "model.onnx"))
    exported = json.loads(run([*predict, "--json"], epochs=0).stdout)
    from_run = json.loads(run([*predict[:4], "runs/tiny_convnet", *predict[5:], "--json"], epochs=0).stdout)
    assert exported["model"]["kind"] != from_run["model"]["kind"] == "checkpoint"
    assert exported["predictions"][0]["label"] == from_run["predictions"][0]["label"]  # the ONNX file, as the run
    compared = json.loads(run([*compare, "--json"], epochs=0).stdout)
    assert [(row["path"], row["status"]) for row in compared["runs"]] == [
        (workdir, "finished"),
        (os.path.join(fork, "runs", "mlp"), "finished"),
    ]
    assert compared["runs"][0]["test_accuracy"] == report["test"]["accuracy"]
