"""Optuna's own dashboard over a sweep's study: `optuna-dashboard STORAGE_URL` shows our trials as they are.

A real grid sweep on the tiny data writes ROOT/study.db; the dashboard (the dev group's optuna-dashboard) is
started on it and read through the HTTP API its web UI uses (optuna_dashboard/_app.py): GET /api/studies, then
GET /api/studies/<study_id>?after=0 for the study's trials.
"""

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import services
from conftest import REPO_ROOT, SUBPROCESS_ENV, tiny_overrides

from mnist_flax import layout

LEARNING_RATES = ("0.01", "0.1")
NUM_EPOCHS = 2
# Plain SGD at a constant rate: on the tiny data 0.01 is still learning after an epoch, so the values differ.
SGD = {"optimizer.name": "sgd", "optimizer.schedule": "constant"}
READY_TIMEOUT_S = 60.0  # a cap: it answers in a few seconds (8 s on two busy cores)


def dashboard_executable() -> str:
    """The optuna-dashboard script of the environment running the tests (.venv/bin), else the PATH's."""
    beside = os.path.join(os.path.dirname(sys.executable), "optuna-dashboard")
    found = beside if os.access(beside, os.X_OK) else shutil.which("optuna-dashboard")
    assert found, "optuna-dashboard is not installed: it is in pyproject.toml's dev group (make setup)"
    return found


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200, url
        return json.load(response)


@pytest.fixture(scope="module")
def sweep_root(tiny_data_dir, tmp_path_factory) -> str:
    """A finished grid sweep over two learning rates (two epochs each, no pruning) with its SQLite study."""
    folder = tmp_path_factory.mktemp("dashboard")
    root, cache = str(folder / "sweep-dashboard"), folder / "compile_cache"
    settings = tiny_overrides(tiny_data_dir, **{"num_epochs": NUM_EPOCHS, "checkpoint.enabled": False, **SGD})
    fixed = [item for o in settings for item in ("--set", o.removeprefix("--config."))]
    grid = f"optimizer.learning_rate={','.join(LEARNING_RATES)}"
    command = [sys.executable, "-m", "mnist_flax", "sweep", "--config=configs/mlp.py", f"--root={root}"]
    result = subprocess.run(
        [*command, "--grid", grid, "--pruner", "none", *fixed],
        cwd=REPO_ROOT,
        # The second trial loads the first's programs from a compile cache of its own (conftest turns it off).
        env={**os.environ, **SUBPROCESS_ENV, "MNIST_FLAX_COMPILE_CACHE": str(cache)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert os.path.isfile(os.path.join(root, layout.STUDY_DB))
    return root


@pytest.fixture(scope="module")
def dashboard(sweep_root, tmp_path_factory):
    """The base URL of `optuna-dashboard sqlite:///ROOT/study.db`, answering; stopped by its pid afterwards."""
    port = services.free_port()
    url = f"http://127.0.0.1:{port}"
    command = [dashboard_executable(), f"sqlite:///{sweep_root}/study.db", "--port", str(port), "--host", "127.0.0.1"]
    log_path = tmp_path_factory.mktemp("dashboard_log") / "optuna-dashboard.log"
    log = open(log_path, "w")  # a file, not a pipe: its access log can never fill a pipe nobody reads
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"optuna-dashboard exited {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                get_json(f"{url}/api/meta")
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, f"optuna-dashboard did not answer on {url} in {READY_TIMEOUT_S} s"
                time.sleep(0.2)
        yield url
    finally:
        services.stop(process, timeout=10)
        log.close()


def recorded_run(workdir: str) -> tuple[float, dict[int, float]]:
    """A trial run's best validation accuracy (final_metrics.json) and its per-epoch ones (metrics.jsonl)."""
    with open(os.path.join(workdir, layout.FINAL_METRICS)) as f:
        best = json.load(f)["best_validation"]["val_accuracy"]
    with open(os.path.join(workdir, layout.METRICS)) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    per_epoch = {int(round(row["val/epoch"])): row["val/accuracy"] for row in rows if "val/accuracy" in row}
    return best, per_epoch


@pytest.mark.slow  # two trials, each a main.py process: about a minute on two busy cores
def test_the_dashboard_shows_the_sweeps_study_as_recorded(sweep_root, dashboard):
    studies = get_json(f"{dashboard}/api/studies")["study_summaries"]
    assert [s["study_name"] for s in studies] == [os.path.basename(sweep_root)]  # the sweep names it for ROOT
    assert studies[0]["directions"] == ["maximize"]

    study = get_json(f"{dashboard}/api/studies/{studies[0]['study_id']}?after=0")
    assert study["name"] == os.path.basename(sweep_root)
    trials = sorted(study["trials"], key=lambda t: t["number"])
    assert [t["state"] for t in trials] == ["Complete"] * len(LEARNING_RATES)
    assert study["has_intermediate_values"] is True

    for trial, learning_rate in zip(trials, LEARNING_RATES, strict=True):
        (param,) = trial["params"]
        assert param["name"] == "optimizer.learning_rate"
        assert param["param_external_value"] == learning_rate  # the grid's value, as the command line gave it
        assert param["distribution"]["type"] == "CategoricalDistribution"  # a grid point is one of its choices
        assert [c["value"] for c in param["distribution"]["choices"]] == list(LEARNING_RATES)

        attrs = {a["key"]: a["value"] for a in trial["user_attrs"]}
        workdir = attrs["workdir"]
        assert os.path.dirname(workdir) == sweep_root
        best, per_epoch = recorded_run(workdir)
        assert trial["values"] == [best]  # the objective: the run's best validation accuracy
        assert sorted(per_epoch) == list(range(1, NUM_EPOCHS + 1))
        shown = {v["step"]: v["value"] for v in trial["intermediate_values"]}
        assert shown == per_epoch  # one report per epoch, keyed by the epoch
