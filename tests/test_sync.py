"""`python -m mnist_flax sync WORKDIR --dry-run`: a resumed offline run is one W&B run of several segments,
handed to the real `wandb sync --dry-run` in order of start time, with no token and no network."""

import os
import socket
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from mnist_flax.commands import sync
from mnist_flax.records import runs
from mnist_flax.tracking import wandb_run


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


@pytest.fixture
def resumed_run(resumed_mlp_run) -> str:
    """tests/shared.py's run stopped with SIGTERM inside its first epoch and resumed: two offline segments."""
    return resumed_mlp_run


@pytest.mark.slow
def test_the_dry_run_of_a_resumed_run_is_one_run_of_two_segments_in_order(resumed_run):
    folders = runs.offline_run_folders(resumed_run)
    assert len(folders) == 2
    planned = sync.plan([sync.segment(f) for f in folders])
    assert len(planned) == 1 and [s["folder"] for s in planned[0]["segments"]] == folders
    first, second = planned[0]["segments"]
    assert first["start"] < second["start"] and first["run_id"] == second["run_id"] == runs.load(resumed_run).wandb_id

    # No token, and W&B's server on a closed loopback port: a dry run must need neither.
    env = {k: v for k, v in os.environ.items() if k not in wandb_run.TOKEN_VARIABLES and k != "WANDB_MODE"}
    env["WANDB_BASE_URL"] = f"http://127.0.0.1:{_closed_port()}"
    result = subprocess.run(
        [sys.executable, "-m", "mnist_flax", "sync", resumed_run, "--dry-run", "--force"],  # the checkout may be dirty
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0 and result.stderr == "", result.stdout + result.stderr
    lines = result.stdout.splitlines()
    run_id = first["run_id"]
    assert lines[0] == f"W&B run (default entity)/mnist_flax/{run_id}: 2 segments, in order of start time"
    assert [line.split()[2] for line in lines[1:3]] == folders and all("would sync" in line for line in lines[1:3])
    # What wandb itself plans: both files of the one run id, the first start first.
    wandb_says = lines[lines.index("wandb sync --dry-run:") + 1 :]
    assert wandb_says[0] == "wandb: Would sync 2 run(s):"  # wandb 0.31 counts .wandb files, not runs
    assert [line.split()[-1] for line in wandb_says[1:3]] == [
        os.path.realpath(os.path.join(f, f"run-{run_id}.wandb")) for f in folders
    ]
    assert "error" not in result.stdout.lower()


def test_a_folder_without_a_run_record_is_one_line(tmp_path, capsys):
    folder = tmp_path / "wandb" / "offline-run-20250101_000000-abc"
    folder.mkdir(parents=True)
    (folder / "run-abc.wandb").write_bytes(b"not a run file")
    assert sync.main([str(tmp_path), "--dry-run", "--force"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
