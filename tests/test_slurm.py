"""launch/slurm.sbatch and launch/sweep_array.sbatch on a real one-node Slurm cluster the tests start.

The cluster (tests/services.py) is Debian's slurm-wlm and munge: munged, slurmctld and slurmd in a
temporary folder, the node line from `slurmd -C`. The scripts run unchanged; the command line only
fits them to this machine (one node, no GPUs, one CPU per task). What one node cannot show (several
host names, GPUs, Apptainer) stays with the stand-in test in test_docker_static.py.
"""

import glob
import json
import os
import subprocess
import time

import optuna
import pytest
import services
from conftest import REPO_ROOT, SUBPROCESS_ENV
from shared import DISTRIBUTED_TOLERANCE, assert_runs_agree, distributed_args, run_results, tiny_settings

from mnist_flax import layout

pytestmark = pytest.mark.slow
EPOCHS = 2  # as tests/shared.py's one-device run, which the two-task job must agree with
THIS_MACHINE = ["--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0"]
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")


@pytest.fixture(scope="module")
def cluster():
    with services.slurm_cluster() as info:
        yield info


def _env(cluster: dict, **extra) -> dict:
    return {**os.environ, **SUBPROCESS_ENV, "SLURM_CONF": cluster["SLURM_CONF"], **extra}


def _train_args(data_dir: str) -> list[str]:
    """tests/shared.py's tiny CNN run for data parallelism, without its workdir (the script names it)."""
    return [a for a in distributed_args(data_dir, "unused", num_epochs=EPOCHS) if not a.startswith("--workdir")]


def submit(cluster: dict, options: list[str], script: str, args: list[str], env: dict) -> str:
    result = subprocess.run(
        ["sbatch", "--parsable", *options, script, *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def job_fields(cluster: dict, job: str) -> list[dict]:
    """`scontrol show job` as one dict per job (an array gives one per task)."""
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job], env=_env(cluster), capture_output=True, text=True, timeout=30
    ).stdout
    return [dict(word.split("=", 1) for word in line.split() if "=" in word) for line in out.splitlines()]


def wait_for(cluster: dict, job: str, done, timeout: float = 300) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = job_fields(cluster, job)
        if jobs and done(jobs):
            return jobs
        time.sleep(0.5)
    outputs = "".join(f"\n--- {j.get('StdOut')}\n{_tail(j.get('StdOut'))}" for j in jobs)
    logs = "".join(
        f"\n--- {name}\n{_tail(os.path.join(cluster['base'], name))}" for name in ("slurmctld.log", "slurmd.log")
    )
    states = [(j.get("JobState"), j.get("Reason"), j.get("Restarts")) for j in jobs]
    raise AssertionError(f"job {job} is still {states} after {timeout} s{outputs}{logs}")


def _tail(path: str | None, chars: int = 2500) -> str:
    try:
        with open(path or "", errors="replace") as f:
            return f.read()[-chars:]
    except OSError:
        return "(none)"


def finished(jobs: list[dict]) -> bool:
    return all(j["JobState"] in FINAL_STATES for j in jobs)


@pytest.fixture
def one_process(single_device_run):
    """The same run in one process (tests/shared.py's, also test_distributed.py's reference)."""
    return single_device_run


@pytest.fixture(scope="module")
def uninterrupted(cluster, tiny_data_dir, tmp_path_factory):
    """launch/slurm.sbatch as a 2-task job: (workdir, the job's output, its scontrol fields)."""
    base = tmp_path_factory.mktemp("slurm_job")
    workdir, output = base / "run", base / "job.out"
    env = _env(cluster, WORKDIR=str(workdir), COORDINATOR_PORT=str(services.free_port()))
    job = submit(cluster, [*THIS_MACHINE, f"--output={output}"], "launch/slurm.sbatch", _train_args(tiny_data_dir), env)
    (fields,) = wait_for(cluster, job, finished)
    return workdir, output.read_text(), fields


def test_a_two_task_job_joins_through_jax_distributed_and_matches_one_process(uninterrupted, one_process):
    workdir, output, fields = uninterrupted
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", output[-3000:]
    assert "slurm: 2 process(es) on" in output and "cpu x2 in 2 processes" in output
    assert_runs_agree(one_process, run_results(workdir))  # losses within the tolerance, accuracies equal
    assert DISTRIBUTED_TOLERANCE == 1e-4
    # Only process 0 reports and tracks: one progress line per logged step, one summary, one W&B run.
    assert output.count("done: ") == 1 and output.count(f"epoch 1/{EPOCHS} step 6/") == 1
    assert len(glob.glob(str(workdir / "wandb" / "offline-run-*"))) == 1


def test_a_preempted_job_is_requeued_and_resumes_the_same_run(cluster, uninterrupted, tiny_data_dir, tmp_path):
    workdir, output = tmp_path / "run", tmp_path / "job.out"
    env = _env(cluster, WORKDIR=str(workdir), COORDINATOR_PORT=str(services.free_port()))
    job = submit(cluster, [*THIS_MACHINE, f"--output={output}"], "launch/slurm.sbatch", _train_args(tiny_data_dir), env)
    deadline = time.monotonic() + 300
    while not (output.exists() and "epoch 1: val" in output.read_text()):
        assert time.monotonic() < deadline, output.read_text() if output.exists() else "no output"
        time.sleep(0.2)
    # What Slurm does at --signal=TERM@120 before the time limit: SIGTERM to every task of the job's steps.
    subprocess.run(["scancel", "--signal=TERM", job], env=env, check=True, timeout=30)
    # The script requeues the job; Slurm starts it again after the credential lifetime (the cluster's
    # cred_expire, 10 s here, 120 s by default), in the same workdir.
    wait_for(cluster, job, lambda jobs: jobs[0]["Restarts"] == "1")
    (fields,) = wait_for(cluster, job, finished)
    text = output.read_text()
    log = _tail(os.path.join(cluster["base"], "slurmctld.log"))
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", text[-3000:] + log
    assert "slurm: preempted; requeueing job" in text and ", start 2" in text
    assert text.count("error: SIGTERM at step") == 2  # both processes took the SIGTERM path and saved
    stopped_at = int(text.split("error: SIGTERM at step ")[1].split()[0])
    assert f"resumed at step {stopped_at}" in text and stopped_at < EPOCHS * 20

    # The same final metrics as the job that was never interrupted.
    expected = json.loads((uninterrupted[0] / layout.FINAL_METRICS).read_text())
    result = json.loads((workdir / layout.FINAL_METRICS).read_text())
    assert result["steps"] == expected["steps"] == EPOCHS * 20
    assert result["test"]["accuracy"] == expected["test"]["accuracy"]
    assert result["test"]["loss"] == pytest.approx(expected["test"]["loss"], rel=1e-6)
    assert result["best_validation"] == expected["best_validation"]
    # One W&B run across both starts: two offline segments of one run id.
    run_id = (workdir / layout.WANDB_RUN_ID).read_text().strip()
    segments = sorted(glob.glob(str(workdir / "wandb" / "offline-run-*")))
    assert len(segments) == 2 and all(s.endswith(f"-{run_id}") for s in segments)
    assert result["wandb"]["run_id"] == run_id


def test_a_job_array_of_two_sweep_workers_shares_one_study(cluster, tiny_data_dir, tmp_path):
    root = tmp_path / "sweep-seeds"
    args = ["--config=configs/mlp.py", f"--root={root}", "--grid", "seed=0,1,2", *tiny_settings(tiny_data_dir)]
    options = ["--array=0-1", "--cpus-per-task=1", "--gpus-per-task=0", f"--output={tmp_path}/worker-%a.out"]
    job = submit(cluster, options, "launch/sweep_array.sbatch", args, _env(cluster))
    tasks = wait_for(cluster, job, lambda jobs: len(jobs) == 2 and finished(jobs))
    tasks.sort(key=lambda task: int(task["ArrayTaskId"]))
    outputs = [(tmp_path / f"worker-{i}.out").read_text() for i in (0, 1)]
    for task, output in zip(tasks, outputs, strict=True):
        assert task["JobState"] == "COMPLETED" and task["ExitCode"] == "0:0", output[-3000:]
        assert "study sweep-seeds: 3 complete" in output
    # Every trial of the study exactly once, whichever worker trained it.
    trials = optuna.load_study(study_name="sweep-seeds", storage=f"sqlite:///{root}/study.db").get_trials()
    assert sorted(t.params["seed"] for t in trials) == [0, 1, 2]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert sum(output.count("[trial ") for output in outputs) == 3
    assert len(glob.glob(str(root / "*" / layout.FINAL_METRICS))) == 3
