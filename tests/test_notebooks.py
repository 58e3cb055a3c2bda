"""The notebooks: committed without outputs, and executed end to end against runs the test makes.

The slow tests train two small MLP runs on the real Fashion-MNIST (3,000 training
images, 1,000 validation and test images, 2 epochs), render both notebooks
against them with notebooks/render.py, and check the figures and the numbers:
what 02_runs computes from predictions.csv with scikit-learn must be what the
run itself logged in final_metrics.json.
"""

import importlib.util
import json
import os
import subprocess

import nbformat
import numpy as np
import pytest
from conftest import REPO_ROOT, run_main

from mnist_flax import layout
from mnist_flax.config import schema
from mnist_flax.records.files import read_predictions
from mnist_flax.training import input_pipeline

NOTEBOOKS_DIR = os.path.join(REPO_ROOT, "notebooks")
NOTEBOOKS = ("01_data", "02_runs")
# Figures each notebook draws (plt.show calls that run whatever the data).
EXPECTED_FIGURES = {"01_data": 5, "02_runs": 7}


def _load_script(relative_path: str):
    """Imports a script that is not in a package (notebooks/render.py, tools/...)."""
    path = os.path.join(REPO_ROOT, relative_path)
    name = "_script_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _load_script("notebooks/render.py")
strip_tool = _load_script("tools/strip_notebook_outputs.py")


def _notebook_path(name: str) -> str:
    return os.path.join(NOTEBOOKS_DIR, f"{name}.ipynb")


# ---------------------------------------------------------------- the committed files


def test_committed_notebooks_have_no_outputs(capsys):
    paths = sorted(p for p in os.listdir(NOTEBOOKS_DIR) if p.endswith(".ipynb"))
    assert {os.path.splitext(p)[0] for p in paths} >= set(NOTEBOOKS)
    assert strip_tool.main(["--check", *(os.path.join(NOTEBOOKS_DIR, p) for p in paths)]) == 0, capsys.readouterr().out


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_parameters_come_first_and_from_the_environment(name):
    notebook = nbformat.read(_notebook_path(name), as_version=4)
    nbformat.validate(notebook)
    assert notebook.cells[0].cell_type == "markdown"
    first_code = next(cell for cell in notebook.cells if cell.cell_type == "code")
    assert first_code.metadata.get("tags") == ["parameters"]
    read_here = {var for var in render.notebook_env("d", "d", "r", "o", "s") if var in first_code.source}
    expected = {"MNIST_FLAX_DATASET", "MNIST_FLAX_DATA_DIR"} if name == "01_data" else {"MNIST_FLAX_RUN"}
    assert expected <= read_here
    assert "MNIST_FLAX_NOTEBOOK_SUMMARY" in read_here


def test_strip_tool_finds_and_removes_outputs(tmp_path, capsys):
    original = _notebook_path("01_data")
    path = tmp_path / "01_data.ipynb"
    notebook = nbformat.read(original, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    code[1].execution_count = 3
    code[1].outputs = [nbformat.v4.new_output("stream", name="stdout", text="hello\n")]
    code[2].metadata["execution"] = {"iopub.status.idle": "2024-01-01T00:00:00Z"}
    notebook.metadata["language_info"] = {"name": "python", "version": "3.11.7", "file_extension": ".py"}
    nbformat.write(notebook, path)

    assert strip_tool.main(["--check", str(path)]) == 1
    assert str(path) in capsys.readouterr().out
    assert strip_tool.main([str(path)]) == 0
    assert strip_tool.main(["--check", str(path)]) == 0
    # Stripping gives back the committed file byte for byte: executing and stripping leaves no diff.
    with open(path, "rb") as stripped, open(original, "rb") as committed:
        assert stripped.read() == committed.read()


def test_render_fails_when_a_cell_fails(tmp_path):
    """A notebook that raises is a failure (exit 1), and its HTML still shows where it stopped."""
    not_a_run = tmp_path / "empty_workdir"
    not_a_run.mkdir()
    out = tmp_path / "build"
    status = render.main(["--only", "02_runs", "--run", str(not_a_run), "--other-run", "none", "--out", str(out)])
    assert status == 1
    html = (out / "02_runs.html").read_text()
    assert "ConfigError" in html and "is not a run workdir (no config.json)" in html  # runs.load's one line


# ---------------------------------------------------------------- executed against real runs


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, fashion_dir) -> dict[str, str]:
    """Two small MLP runs on Fashion-MNIST that differ in their learning rate (one at a time: 2 cores)."""
    root = tmp_path_factory.mktemp("notebook_runs")
    common = [
        "--config=configs/mlp.py",
        f"--config.data.local_dir={fashion_dir}",
        "--config.data.train_subset=3000",
        "--config.data.eval_subset=1000",
        "--config.num_epochs=2",
        "--config.log_every_steps=5",
        "--config.wandb.mode=disabled",
        "--config.tensorboard=False",
        "--config.checkpoint.enabled=False",
    ]
    runs = {"lr_default": [], "lr_5e-4": ["--config.optimizer.learning_rate=0.0005"]}
    workdirs = {}
    for name, extra in runs.items():
        workdir = str(root / name)
        result = run_main([*common, f"--workdir={workdir}", *extra], timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        workdirs[name] = workdir
    return workdirs


@pytest.fixture(scope="module")
def rendered(two_runs, fashion_dir, tmp_path_factory):
    """Both notebooks executed by notebooks/render.py; returns the output folder."""
    out = tmp_path_factory.mktemp("notebooks_build")
    args = ["--run", two_runs["lr_default"], "--other-run", two_runs["lr_5e-4"], "--data-dir", fashion_dir]
    assert render.main([*args, "--out", str(out), "--figures"]) == 0
    return out


def _outputs(notebook, kind: str) -> list[str]:
    """The text of every output of a kind ("stream" text, or a mime type such as text/markdown)."""
    texts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if kind == "stream" and output.output_type == "stream":
                texts.append(output.text)
            elif kind in output.get("data", {}):
                texts.append(output.data[kind])
    return texts


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_headless_and_draws_its_figures(rendered, name):
    notebook = nbformat.read(rendered / f"{name}.ipynb", as_version=4)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code_cells), "a cell did not run"
    assert not [o for cell in code_cells for o in cell.outputs if o.output_type == "error"]
    figures = render.figures(notebook)
    assert len(figures) == EXPECTED_FIGURES[name]
    assert all(image.startswith(b"\x89PNG") and len(image) > 5_000 for image in figures)
    assert {f"{name}_{n:02d}.png" for n in range(1, len(figures) + 1)} <= set(os.listdir(rendered / "figures"))
    html = (rendered / f"{name}.html").read_text()
    assert html.count('src="data:image/png;base64') == len(figures)


@pytest.mark.slow
def test_data_notebook_describes_the_loaded_data(rendered, fashion_dir):
    summary = json.loads((rendered / "01_data.summary.json").read_text())
    config = schema.load_config_file(os.path.join(REPO_ROOT, "configs", "default.py"))
    config.data.local_dir = fashion_dir
    datasets = input_pipeline.load_datasets(config.data)
    for split in ("train", "validation", "test"):
        assert summary["counts"][split] == np.bincount(getattr(datasets, split).labels, minlength=10).tolist()
    assert summary["zero_pixel_fraction"] == pytest.approx(float(np.mean(datasets.train.images == 0)))
    # The finding the markdown states: the upper-body garments have the closest mean images.
    assert set(summary["closest_pair"]) <= {"Pullover", "Coat", "Shirt"}
    notebook = nbformat.read(rendered / "01_data.ipynb", as_version=4)
    finding = [text for text in _outputs(notebook, "text/markdown") if "Finding" in text]
    assert finding and " and ".join(summary["closest_pair"]) in finding[0]


@pytest.mark.slow
def test_run_notebook_numbers_agree_with_the_run(rendered, two_runs):
    summary = json.loads((rendered / "02_runs.summary.json").read_text())
    with open(os.path.join(two_runs["lr_default"], layout.FINAL_METRICS)) as f:
        logged = json.load(f)["test"]
    computed = summary["test"]
    assert summary["run"] == two_runs["lr_default"] and summary["other_run"] == two_runs["lr_5e-4"]
    assert computed["num_examples"] == logged["num_examples"] == 1000
    assert computed["confusion_matrix"] == logged["confusion_matrix"]
    for key in ("accuracy", "precision_macro", "recall_macro", "f1_macro"):
        assert computed[key] == pytest.approx(logged[key], abs=1e-9), key
    for key in ("precision", "recall", "f1"):
        np.testing.assert_allclose(computed["per_class"][key], logged["per_class"][key], atol=1e-9, err_msg=key)
    # predictions.csv keeps 6 decimals of each probability; the run ranked the exact values.
    np.testing.assert_allclose(computed["per_class"]["auroc"], logged["per_class"]["auroc"], atol=1e-4)
    assert computed["auroc_macro"] == pytest.approx(logged["auroc_macro"], abs=1e-4)

    # The most confused pairs are the largest off-diagonal sums of the logged confusion matrix.
    matrix = np.array(logged["confusion_matrix"])
    off_diagonal = matrix + matrix.T
    np.fill_diagonal(off_diagonal, 0)
    largest = np.sort(off_diagonal[np.triu_indices(10, 1)])[::-1]
    assert [count for _, _, count in summary["most_confused"]] == largest[: len(summary["most_confused"])].tolist()

    # The grid shows mistakes only, the most confident first.
    predictions = read_predictions(os.path.join(two_runs["lr_default"], layout.PREDICTIONS))
    shown = np.array(summary["misclassified_shown"])
    mistakes = int((predictions["label"] != predictions["predicted"]).sum())
    assert len(shown) == min(24, mistakes)
    assert np.all(predictions["label"][shown] != predictions["predicted"][shown])
    assert np.all(np.diff(predictions["confidence"][shown]) <= 0)


@pytest.mark.slow
def test_run_notebook_compares_the_two_runs(rendered):
    notebook = nbformat.read(rendered / "02_runs.ipynb", as_version=4)
    streams = "".join(_outputs(notebook, "stream"))
    # The config diff names the one field the test changed, with both values.
    diff_line = next(line for line in streams.splitlines() if line.startswith("optimizer.learning_rate"))
    assert diff_line.split()[1:] == ["0.003", "0.0005"]
    table = next(text for text in _outputs(notebook, "text/markdown") if "test/accuracy" in text)
    assert "lr_default" in table and "lr_5e-4" in table and "difference" in table


def test_render_writes_under_the_ignored_build_folder():
    """`make notebooks` writes to notebooks/_build/, which git ignores."""
    assert os.path.samefile(os.path.dirname(render.DEFAULT_OUT), NOTEBOOKS_DIR)
    result = subprocess.run(
        ["git", "-C", REPO_ROOT, "check-ignore", "-q", "notebooks/_build/02_runs.html"], capture_output=True
    )
    assert result.returncode == 0, "notebooks/_build/ is not git-ignored"
