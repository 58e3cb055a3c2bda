"""Data parallelism: 8 simulated devices and 2 processes agree with 1 device.

Tolerance: losses within 1e-4 relative (the gradient all-reduce sums in
another order than one device does), accuracies equal.
"""

import json
import os
import subprocess
import sys

import pytest
import services
from conftest import REPO_ROOT, SUBPROCESS_ENV, run_main, tiny_overrides

from mnist_flax import layout

TOLERANCE = 1e-4


def _args(data_dir, workdir):
    # The whole batch on each device: pieces draw their own dropout masks, so one device and eight must split alike.
    overrides = tiny_overrides(
        data_dir, num_epochs=2, batch_size=48, eval_batch_size=200, log_every_steps=5, **{"train.batch_split": 1}
    )
    return ["--config=configs/cnn.py", f"--workdir={workdir}", *overrides]


def _results(workdir):
    report = json.loads((workdir / layout.FINAL_METRICS).read_text())
    history = [json.loads(line) for line in open(workdir / layout.METRICS)]
    train_losses = [r["train/loss"] for r in history if "train/loss" in r]
    return report, train_losses


def _assert_agree(one, many):
    (report_a, losses_a), (report_b, losses_b) = one, many
    assert report_b["steps"] == report_a["steps"]
    assert report_b["test"]["accuracy"] == report_a["test"]["accuracy"]
    assert report_b["test"]["loss"] == pytest.approx(report_a["test"]["loss"], rel=TOLERANCE)
    assert report_b["validation"]["loss"] == pytest.approx(report_a["validation"]["loss"], rel=TOLERANCE)
    assert losses_b == pytest.approx(losses_a, rel=TOLERANCE)


@pytest.fixture(scope="module")
def single_device(tiny_data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("one_device")
    result = run_main(_args(tiny_data_dir, workdir))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "cpu x1;" in result.stdout
    return _results(workdir)


@pytest.mark.slow
def test_eight_devices_agree_with_one(single_device, tiny_data_dir, tmp_path):
    result = run_main(_args(tiny_data_dir, tmp_path), env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "cpu x8;" in result.stdout
    _assert_agree(single_device, _results(tmp_path))


@pytest.mark.slow
def test_long_dispatch_on_simulated_devices_does_not_deadlock(tiny_data_dir, tmp_path):
    """125 calls without a log point in between: the all-reduces must not wait on each other forever."""
    args = [
        *_args(tiny_data_dir, tmp_path),
        "--config.num_epochs=1",
        "--config.log_every_steps=1000",
        "--config.batch_size=8",
        "--config.model.name=mlp",
    ]
    result = run_main(args, env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}, timeout=400)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / layout.FINAL_METRICS).read_text())["steps"] == 1000 // 8


@pytest.mark.slow
def test_batch_must_split_over_the_devices(tiny_data_dir, tmp_path):
    result = run_main(
        [*_args(tiny_data_dir, tmp_path), "--config.batch_size=50"],
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: batch_size: 50 does not split evenly over 8 devices"


@pytest.mark.slow
def test_two_processes_train_together_and_agree(single_device, tiny_data_dir, tmp_path):
    coordinator = f"127.0.0.1:{services.free_port()}"
    processes = []
    for process_id in (0, 1):
        env = {
            **os.environ,
            **SUBPROCESS_ENV,
            "MNIST_FLAX_COORDINATOR": coordinator,
            "MNIST_FLAX_NUM_PROCESSES": "2",
            "MNIST_FLAX_PROCESS_ID": str(process_id),
        }
        processes.append(
            subprocess.Popen(
                [sys.executable, "main.py", *_args(tiny_data_dir, tmp_path)],
                cwd=REPO_ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr[-2000:]
    primary_out, secondary_out = outputs[0][0], outputs[1][0]
    assert "cpu x2 in 2 processes" in primary_out and "done:" in primary_out
    # Only process 0 reports (gloo's own connection line aside).
    assert "done:" not in secondary_out and "epoch 1/2" not in secondary_out
    _assert_agree(single_device, _results(tmp_path))


@pytest.mark.parametrize(
    ("installed", "platforms", "expected"),
    [
        ({"jax-cuda12-plugin": "0.10.2"}, "", "jax-cuda12-plugin 0.10.2 is installed, but JAX sees no device"),
        ({"jax-cuda12-plugin": "0.10.2"}, "cpu", None),  # asked for the CPU: no fallback to report
        ({}, "", None),  # a CPU-only environment: nothing to say
    ],
)
def test_an_installed_plugin_without_a_device_is_said_in_one_line(monkeypatch, installed, platforms, expected):
    from importlib import metadata

    from mnist_flax.training import distributed

    def version(name):
        if name in installed:
            return installed[name]
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(distributed.metadata, "version", version)
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    line = distributed.accelerator_fallback()
    if expected is None:
        assert line is None
    else:
        assert expected in line and line.endswith("training on the CPU") and "\n" not in line
