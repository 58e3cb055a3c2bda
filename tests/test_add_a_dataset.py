"""docs/add_a_dataset.md, performed literally: its files written into a copy of the checkout, a small data file and
a folder of images made, then every command of the page run there, in the page's order (on tiny settings)."""

import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT, SUBPROCESS_ENV, make_learnable_split
from PIL import Image
from shared import checkout_copy, page_files

from mnist_flax import layout

PAGE = os.path.join(REPO_ROOT, "docs", "add_a_dataset.md")
# What makes each training command of the page a run of seconds: the page's own settings, then these.
TINY = {"batch_size": 50, "eval_batch_size": 100, "log_every_steps": 5, "wandb.mode": "offline", "tensorboard": False}


def page_commands() -> list[list[str]]:
    """Every command of the page's ```bash blocks, in order, as arguments."""
    blocks = re.findall(r"^```bash\n(.*?)```", open(PAGE).read(), flags=re.S | re.M)
    return [shlex.split(line) for block in blocks for line in block.splitlines() if line.strip()]


def write_npz(path: str) -> np.ndarray:
    """A small learnable data set in mnist.npz's form (a bright block whose place is the class); returns x_test."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    x_train, y_train = make_learnable_split(1200, seed=0)
    x_test, y_test = make_learnable_split(300, seed=1)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return x_test


def write_image_folder(root: str, per_class: int = 60) -> None:
    """ROOT/CLASS/N.png|.jpg, grey and colour, of several sizes: four classes told apart by a bright block's place."""
    rng = np.random.default_rng(3)
    places = {"top": (0, 1), "left": (1, 0), "right": (1, 2), "bottom": (2, 1)}  # (row, column) of a 3x3 grid
    for name, (row, column) in places.items():
        os.makedirs(os.path.join(root, name))
        for i in range(per_class):
            size = (30, 36, 48)[i % 3]
            pixels = rng.integers(0, 70, size=(size, size, 3)).astype(np.uint8)
            third = size // 3
            pixels[row * third : (row + 1) * third, column * third : (column + 1) * third] = (230, 220, 120)
            image = Image.fromarray(pixels).convert("L" if i % 2 else "RGB")
            image.save(os.path.join(root, name, f"{i}.{'png' if i % 4 < 2 else 'jpg'}"))


def test_the_page_shows_a_module_a_config_and_the_commands():
    assert set(page_files(PAGE)) == {"mnist_flax/datasets/npz.py", "configs/npz.py"}
    commands = page_commands()
    assert [command[:2] for command in commands] == [["python", "main.py"]] * 3 + [["python", "-m"]] * 3
    assert commands[0][2] == "--config=configs/default.py:folder" and commands[1][2] == "--config=configs/npz.py"
    assert [command[3] for command in commands[3:]] == ["export", "predict", "compare"]


@pytest.mark.slow
def test_the_pages_steps_train_resume_export_predict_and_compare(tmp_path):
    fork = checkout_copy(tmp_path / "fork")
    for path, text in page_files(PAGE).items():
        with open(os.path.join(fork, path), "w") as f:
            f.write(text)
    x_test = write_npz(os.path.join(fork, "data", "mnist.npz"))
    write_image_folder(os.path.join(fork, "my_images"))
    Image.fromarray(x_test[0]).save(os.path.join(fork, "digit.png"))
    label = int(make_learnable_split(300, seed=1)[1][0])
    env = {**os.environ, **SUBPROCESS_ENV, "MNIST_FLAX_DATA_CACHE": str(tmp_path / "cache")}
    env.pop("PYTHONPATH", None)  # the fork's own mnist_flax, with the page's module in it

    def run(command: list[str], **settings) -> subprocess.CompletedProcess:
        if command[1] == "main.py":
            command = [*command, *(f"--config.{k}={v}" for k, v in {**TINY, **settings}.items())]
        result = subprocess.run(
            [sys.executable, *command[1:]], cwd=fork, env=env, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, (command, result.stdout[-2000:], result.stderr[-2000:])
        return result

    folder_train, train, resume, export, predict, compare = page_commands()
    # Your own images, no code: four classes, 240 images, 10% test and 10% validation of each class.
    folder_run = run(folder_train, num_epochs=3, batch_size=16)
    assert "folder from folder:" in folder_run.stdout and "train 192, validation 24, test 24" in folder_run.stdout
    folder_report = json.loads(open(os.path.join(fork, "runs", "my_images", layout.FINAL_METRICS)).read())
    assert folder_report["test"]["accuracy"] >= 0.75  # chance is 0.25
    # A new data set module: train, then resume for another epoch.
    first = run(train, num_epochs=1)
    assert "npz from npz:" in first.stdout and "train 1100, validation 100, test 300" in first.stdout
    workdir = os.path.join(fork, "runs", "npz")
    recorded = json.loads(open(os.path.join(workdir, layout.CONFIG)).read())["data"]
    assert recorded["name"] == "npz" and recorded["path"] == os.path.join(fork, "data", "mnist.npz")
    resumed = run(resume, num_epochs=2)
    assert "resumed at step 22" in resumed.stdout
    report = json.loads(open(os.path.join(workdir, layout.FINAL_METRICS)).read())
    assert report["steps"] == 44 and report["test"]["accuracy"] > 0.5
    run(export)
    assert os.path.isfile(os.path.join(workdir, "export", "model.onnx"))
    predicted = run(predict)
    assert predicted.stdout.split("digit.png", 1)[1].split()[0] == str(label)  # the row's label column
    compared = run(compare).stdout
    rows = {line.split()[0]: line for line in compared.splitlines() if line.startswith(("npz", "my_images"))}
    assert set(rows) == {"npz", "my_images"}
    assert f"{report['test']['accuracy']:.4f}" in rows["npz"]
    assert f"{folder_report['test']['accuracy']:.4f}" in rows["my_images"]
