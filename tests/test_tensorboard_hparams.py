"""TensorBoard over a sweep root: every run, its hparams and its scalars, read through TensorBoard's HTTP data API."""

import json
import os
import re
import subprocess
import sys
import time
import urllib.request

import pytest
import services
from conftest import run_sweep

from mnist_flax import layout
from mnist_flax.config import schema

# A sweep of three runs and a TensorBoard server: in make test, not in make test-fast.
pytestmark = pytest.mark.slow

RATES = (0.001, 0.003, 0.01)
MEMBERS = ("000-0.001", "001-0.003", "002-0.01")
SETTINGS = {"num_epochs": 1, "checkpoint.enabled": False, "tensorboard": True}
# Every session status, so the hparams plugin filters none out (our runs write no session-end summary: UNKNOWN).
STATUSES = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]


@pytest.fixture(scope="module")
def sweep_root(tiny_data_dir, tmp_path_factory) -> str:
    """A finished sweep of three tiny MLP runs, each writing TensorBoard event files under WORKDIR/tensorboard."""
    root = str(tmp_path_factory.mktemp("tensorboard") / "lr")
    result = run_sweep(
        root, "configs/mlp.py", "optimizer.learning_rate=" + ",".join(map(str, RATES)), tiny_data_dir, **SETTINGS
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root


def tensorboard_hparams(config: dict) -> dict:
    """The hparams TensorBoard shows for a flat config: clu's writer spreads a sequence over FIELD.0, FIELD.1, ..."""
    hparams = {}
    for name, value in config.items():
        items = enumerate(value) if isinstance(value, (list, tuple)) else [(None, value)]
        for index, item in items:
            hparams[name if index is None else f"{name}.{index}"] = item
    return hparams


def _request(url: str, body: dict | None = None):
    """GET (or POST `body` as JSON to) one of TensorBoard's data routes; the decoded JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def _wait_for(what: str, check, process: subprocess.Popen, log_path: str, timeout: float = 120):
    """Polls `check()` until it gives something true; fails naming `what` (and the log) if TensorBoard stops first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"TensorBoard exited ({process.returncode}): {open(log_path).read()[-3000:]}"
        try:
            found = check()
        except OSError:  # not listening yet
            found = None
        if found:
            return found
        time.sleep(0.5)
    pytest.fail(f"TensorBoard did not {what} within {timeout:.0f} s: {open(log_path).read()[-3000:]}")


def test_tensorboard_lists_every_run_and_its_hparams(sweep_root, tmp_path):
    log_path = str(tmp_path / "tensorboard.log")
    # Port 0: TensorBoard picks a free port on loopback and prints it. --load_fast=false: the Python loader, which
    # reads the logdir in this process (no separate data server to find and stop).
    command = [sys.executable, "-m", "tensorboard.main", f"--logdir={sweep_root}", "--host=127.0.0.1", "--port=0"]
    command += ["--load_fast=false", "--reload_interval=1"]
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        )
    try:

        def address() -> str | None:
            match = re.search(r"TensorBoard \S+ at (http://127\.0\.0\.1:\d+)/", open(log_path).read())
            return match and match[1]

        url = _wait_for("print its address", address, process, log_path)
        expected_runs = {f"{member}/tensorboard" for member in MEMBERS}
        _wait_for("list the runs", lambda: set(_request(f"{url}/data/runs")) == expected_runs, process, log_path)

        groups_request = {"experimentName": "", "allowedStatuses": STATUSES, "startIndex": 0, "sliceSize": 100}

        def session_groups() -> dict | None:
            groups = _request(f"{url}/data/plugin/hparams/session_groups", groups_request).get("sessionGroups", [])
            by_run = {group["sessions"][0]["name"]: group for group in groups}
            return by_run if set(by_run) == expected_runs else None

        groups = _wait_for("list a session group per run", session_groups, process, log_path)
        experiment = _request(f"{url}/data/plugin/hparams/experiment", {"experimentName": ""})
        tags = _request(f"{url}/data/plugin/scalars/tags")
    finally:
        services.stop(process, timeout=20)

    infos = {info["name"]: info for info in experiment["hparamInfos"]}
    assert infos["optimizer.learning_rate"]["differs"] is True
    assert infos["optimizer.learning_rate"]["domainInterval"] == {"minValue": min(RATES), "maxValue": max(RATES)}
    assert infos["batch_size"]["differs"] is False and infos["model.name"]["domainDiscrete"] == ["mlp"]
    for member, rate in zip(MEMBERS, RATES, strict=True):
        workdir = os.path.join(sweep_root, member)
        with open(os.path.join(workdir, layout.CONFIG)) as f:
            config = schema.flatten(json.load(f))
        with open(os.path.join(workdir, layout.FINAL_METRICS)) as f:
            final = json.load(f)
        group = groups[f"{member}/tensorboard"]
        assert group["hparams"]["optimizer.learning_rate"] == rate == config["optimizer.learning_rate"]
        assert group["hparams"] == tensorboard_hparams(config)  # every field the run trained with
        metrics = {metric["name"]["tag"]: metric["value"] for metric in group["metricValues"]}
        # One epoch: its one evaluation is the best; TensorBoard keeps scalars as float32.
        assert metrics["val/accuracy"] == pytest.approx(final["best_validation"]["val_accuracy"], abs=1e-6)
        assert metrics["test/accuracy"] == pytest.approx(final["test"]["accuracy"], abs=1e-6)
        assert {"train/loss", "val/loss", "val/accuracy"} <= set(tags[f"{member}/tensorboard"])
