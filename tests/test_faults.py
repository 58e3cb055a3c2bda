"""Fault injection through real processes: SIGKILL and SIGTERM at several points, then resume.

The run must end with the same metrics as an uninterrupted one, and every
checkpoint left on disk must restore.
"""

import concurrent.futures
import json
import os
import signal
import subprocess

import jax
import ml_collections
import pytest
from conftest import run_main, start_main, tiny_overrides

from mnist_flax import layout, models
from mnist_flax.config.schema import load_config_file
from mnist_flax.records import files
from mnist_flax.training import checkpointing, steps

EPOCHS = 3  # 20 steps each on the tiny set


def _args(data_dir, workdir):
    return [
        "--config=configs/mlp.py",
        f"--workdir={workdir}",
        # One step a call, so that a progress line (a kill point) follows every step; fused steps are killed
        # and resumed in test_tracking.
        *tiny_overrides(data_dir, num_epochs=EPOCHS, log_every_steps=1, **{"train.steps_per_call": 1}),
    ]


def _run_until(args, trigger: str, sig: int) -> tuple[int, str]:
    """Starts a run, sends `sig` when a stdout line contains `trigger`; returns (exit code, stderr)."""
    process = start_main(args)
    fired = False
    for line in process.stdout:
        if trigger in line:
            process.send_signal(sig)
            fired = True
            break
    _, stderr = process.communicate(timeout=300)
    assert fired, f"the run ended before {trigger!r}: {stderr[-1500:]}"
    return process.returncode, stderr


def _assert_checkpoints_restore(workdir):
    config = load_config_file("configs/mlp.py")
    model = models.create(config.model, num_classes=10)
    target = steps.create_train_state(
        model, steps.make_optimizer(config.optimizer, 20, EPOCHS), 0, input_shape=(28, 28, 1)
    )
    manager = checkpointing.Checkpoints(
        os.path.join(workdir, "checkpoints"),
        ml_collections.ConfigDict({"max_to_keep": 3, "keep_best": True, "async_save": False}),
    )
    saved_steps = manager.all_steps()
    assert saved_steps
    for step in saved_steps:
        state, meta = manager.restore(step, target)
        assert int(jax.device_get(state.step)) == step == meta["step"]
    manager.close()


@pytest.mark.slow
def test_kills_and_preemptions_lose_nothing(tiny_data_dir, tmp_path):
    straight = run_main(_args(tiny_data_dir, tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-2000:]
    expected = json.loads((tmp_path / "straight" / layout.FINAL_METRICS).read_text())

    workdir = tmp_path / "faulty"
    args = _args(tiny_data_dir, workdir)
    # (trigger in the progress output, signal): during steps, right after an epoch's last step (evaluation),
    # right after the validation line (the asynchronous checkpoint write), and early in a later epoch, once
    # checkpoints exist; each kind of point once, for each signal that can come there.
    faults = [
        ("step 7/", signal.SIGKILL),  # mid-step, before any checkpoint
        ("step 20/", signal.SIGKILL),  # end of epoch 1: evaluation and the first save
        ("epoch 1: val", signal.SIGKILL),  # during the asynchronous checkpoint write
        ("step 33/", signal.SIGTERM),  # preemption mid-epoch: saves at the current step
        ("step 41/", signal.SIGKILL),  # mid-step in a later epoch, resumed from the preemption's checkpoint
        ("epoch 2: val", signal.SIGTERM),  # preemption during validation and the epoch's save
    ]
    survived = 0
    for trigger, sig in faults:
        code, stderr = _run_until(args, trigger, sig)
        if sig == signal.SIGKILL:
            assert code == -signal.SIGKILL
        else:
            assert code == 3, stderr[-1500:]  # preempted: checkpoint saved, resumable
            assert "error: SIGTERM at step" in stderr
        assert "Traceback" not in stderr
        if os.path.isdir(workdir / "checkpoints") and os.listdir(workdir / "checkpoints"):
            _assert_checkpoints_restore(workdir)
        survived += 1

    finished = run_main(args)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert survived == len(faults)
    result = json.loads((workdir / layout.FINAL_METRICS).read_text())
    assert result["steps"] == expected["steps"] == EPOCHS * 20
    assert result["test"]["accuracy"] == expected["test"]["accuracy"]
    assert result["test"]["loss"] == pytest.approx(expected["test"]["loss"], rel=1e-6)
    assert result["best_validation"] == expected["best_validation"]
    _assert_checkpoints_restore(workdir)


@pytest.mark.slow
def test_second_run_on_the_same_workdir_refuses(tiny_data_dir, tmp_path):
    args = [*_args(tiny_data_dir, tmp_path), "--config.num_epochs=500"]  # still running when the second starts
    first = start_main(args)
    try:
        for line in first.stdout:
            if "step 2/" in line:
                break
        second = run_main(args)
        assert second.returncode == 2
        assert second.stderr.strip().splitlines()[-1].startswith(f"error: workdir {tmp_path} is in use")
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=300)
    assert first.returncode == 3  # the first run was untouched: it saved and stopped on our SIGTERM
    _assert_checkpoints_restore(tmp_path)


def test_processes_of_one_run_check_the_workdir_at_once(tmp_path):
    """Every process of a multi-process run checks the shared workdir; their probes must not collide."""
    workdir = str(tmp_path / "shared")

    def check_many_times(_):
        for _ in range(300):
            files.prepare_workdir(workdir)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(check_many_times, range(8)))  # re-raises a WorkdirError from any thread
    assert os.listdir(workdir) == []  # no probe left behind


@pytest.mark.slow
def test_disk_full_during_a_checkpoint_is_one_line_and_registers_nothing(tiny_data_dir, tmp_path):
    """A 2 MiB filesystem: the config and metrics fit, the first checkpoint does not."""
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(mount_point)], capture_output=True)
    assert mounted.returncode == 0, f"the test needs root to mount a tmpfs: {mounted.stderr!r}"
    try:
        workdir = mount_point / "run"
        result = run_main(_args(tiny_data_dir, workdir))
        assert result.returncode == 2
        assert "Traceback" not in result.stderr
        last = result.stderr.strip().splitlines()[-1]
        # The save is asynchronous: the disk fills in the background, and the next write to the workdir (the
        # checkpoint's or the metrics') is the one that says so.
        assert last.startswith(("error: saving a checkpoint in", "error: writing the run's metrics in")), last
        assert last.endswith("No space left on device"), last
        manager = checkpointing.Checkpoints(
            str(workdir / "checkpoints"),
            ml_collections.ConfigDict({"max_to_keep": 3, "keep_best": True, "async_save": False}),
        )
        assert manager.latest_step() is None  # the half-written step is not taken for whole
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


def _children(pid: int, name: str) -> list[int]:
    """Processes whose parent is `pid` and whose command line mentions `name` (read from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, IndexError, ValueError):
            continue
        if parent == pid and name.encode() in cmdline:
            found.append(int(entry))
    return found


@pytest.mark.slow
def test_wandb_dying_mid_run_does_not_stop_training(tiny_data_dir, tmp_path):
    args = _args(tiny_data_dir, tmp_path)  # EPOCHS: 30 steps before W&B's service dies, 30 after
    process = start_main(args)
    killed = []
    for line in process.stdout:
        if "step 30/" in line:
            for pid in _children(process.pid, "wandb-core"):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            break
    stdout, stderr = process.communicate(timeout=300)
    assert killed, "W&B's service process was not found"
    assert process.returncode == 0, stderr[-2000:]
    assert "warning: W&B stopped accepting data" in stderr
    assert "Traceback" not in stderr
    history = [json.loads(line) for line in open(tmp_path / layout.METRICS)]
    assert max(r["step"] for r in history if "train/loss" in r) == EPOCHS * 20  # every metric kept after it
    assert json.loads((tmp_path / layout.FINAL_METRICS).read_text())["steps"] == EPOCHS * 20
