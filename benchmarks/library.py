"""This project's contender: `mnist_flax.training.loop.train_and_evaluate` itself, run in a fresh process of a checkout.

`run_in_child(spec, tree)` starts `python benchmarks/library.py SPEC` with `tree` as its working directory, so the
child imports that checkout's own `mnist_flax` and `configs` (the baseline section runs an old commit beside this
one). The child loads the config file, changes the spec's fields, runs the loop and reads back what the run
recorded: the report (`steps`, `seconds`, `compile_seconds`, `test`) and `metrics.jsonl`, whose
`train/images_per_second` per log interval gives the steady throughput (the median of the intervals after the
first, which holds the warm-up). The standard library only at module level; nothing here copies the loop.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

RESULT_MARKER = "LIBRARY_RESULT "
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tracking, TensorBoard and checkpoints off unless a spec turns them on (the overhead section does).
BARE = {"wandb.mode": "disabled", "tensorboard": False, "checkpoint.enabled": False}


def run_in_child(spec: dict, tree: str, env: dict | None = None, timeout: float = 3600) -> dict:
    """Runs `measure(spec)` in a fresh Python whose working directory is the checkout `tree`; returns its result.

    Args:
      spec: `config` (a config file, relative to the tree; default configs/cnn.py), `changes` ({"a.b": value}),
        `data_dir` (the IDX files), and optionally `cores` (CPU affinity, set before JAX starts),
        `num_cpu_devices` (`jax_num_cpu_devices`) and `keep_probs` (test probabilities to return).
      tree: the checkout whose `mnist_flax` runs.
      env: variables to set in the child (XLA_FLAGS).
    """
    command = [sys.executable, os.path.abspath(__file__), json.dumps(spec)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if done.returncode or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-6:]
        raise RuntimeError(f"train_and_evaluate in {tree} failed (exit {done.returncode}): " + " | ".join(tail))
    return json.loads(lines[-1][len(RESULT_MARKER) :])


def set_fields(config, changes: dict) -> None:
    """Sets "a.b" fields of an ml_collections config in place."""
    for key, value in changes.items():
        target = config
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value


def measure(spec: dict) -> dict:
    """Runs `train_and_evaluate` on the spec's config in this process (see `run_in_child`); returns the figures."""
    if spec.get("cores"):
        os.sched_setaffinity(0, set(spec["cores"]))  # before XLA sizes its thread pool from the affinity
    import jax

    if spec.get("num_cpu_devices"):
        jax.config.update("jax_num_cpu_devices", spec["num_cpu_devices"])
    import mnist_flax
    from mnist_flax.config import schema
    from mnist_flax.training import loop

    config = schema.load_config_file(spec.get("config", "configs/cnn.py"))
    set_fields(config, {**BARE, "data.local_dir": spec["data_dir"], **spec.get("changes", {})})
    workdir = tempfile.mkdtemp(prefix="mnist_flax_bench_run_")
    try:
        start = time.perf_counter()
        report = loop.train_and_evaluate(config, workdir)
        wall_seconds = time.perf_counter() - start
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
        probs = _test_probabilities(os.path.join(workdir, "predictions.csv"), spec.get("keep_probs", 0))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        **steady_throughput(records),
        **epochs_and_evaluation(records, config),
        "steps": report["steps"],
        "seconds": report["seconds"],
        "compile_seconds": report["compile_seconds"],
        "wall_seconds": wall_seconds,
        "test_accuracy": report["test"]["accuracy"],
        "test_loss": report["test"]["loss"],
        "best_val_accuracy": report["best_validation"]["val_accuracy"],
        "best_step": report["best_validation"]["step"],
        "peak_rss_mb": _peak_rss_mb(),
        "devices": [str(d) for d in jax.devices()],
        "mnist_flax": os.path.dirname(os.path.abspath(mnist_flax.__file__)),
        "test_probs": probs,
    }


def steady_throughput(records: list[dict]) -> dict:
    """Training images/s from the log intervals of `metrics.jsonl`: the median of those after the first."""
    rates = [r["train/images_per_second"] for r in records if "train/images_per_second" in r]
    steady = rates[1:] or rates
    return {
        "images_per_second": statistics.median(steady) if steady else float("nan"),
        "interval_images_per_second": rates,
    }


def epochs_and_evaluation(records: list[dict], config) -> dict:
    """Each validation's step and accuracy with the training seconds before it; validation images/s."""
    train_seconds, last_step, epochs, eval_seconds = 0.0, 0, [], []
    for r in records:
        if "train/images_per_second" in r:
            train_seconds += (r["step"] - last_step) * config.batch_size / r["train/images_per_second"]
            last_step = r["step"]
        if "val/accuracy" in r:
            epochs.append({"step": r["step"], "val_accuracy": r["val/accuracy"], "train_seconds": train_seconds})
            eval_seconds += [r["val/eval_seconds"]] if "val/eval_seconds" in r else []
    validation = config.data.validation_size
    validation = min(validation, config.data.eval_subset) if config.data.eval_subset else validation
    return {
        "epochs": epochs,
        "eval_images_per_second": validation / statistics.median(eval_seconds) if eval_seconds else None,
    }


def main_py_run(data_dir: str, changes: dict, target_accuracy: float, timeout: float = 3600) -> dict:
    """`python main.py --config=configs/cnn.py` as a user runs it, its output stamped line by line as it arrives.

    Tracking as by default (W&B offline without a key, TensorBoard, checkpoints), every epoch's checkpoint kept;
    afterwards each epoch's checkpoint is evaluated on the test set (`eval_only`, outside the timing) until one
    reaches `target_accuracy`: the time to it is when that epoch's validation line appeared, from the start.
    """
    import re

    base = tempfile.mkdtemp(prefix="mnist_flax_bench_main_")
    workdir = os.path.join(base, "run")
    fields = {"data.local_dir": data_dir, "checkpoint.max_to_keep": 1000, **changes}
    command = [sys.executable, "main.py", "--config=configs/cnn.py", f"--workdir={workdir}"]
    command += [f"--config.{k}={v}" for k, v in fields.items()]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    try:
        start = time.perf_counter()
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        stamps, tail = {}, []
        for line in process.stdout:
            tail = (tail + [line])[-10:]
            match = re.match(r"epoch (\d+): val", line.strip())
            if match:
                stamps[int(match.group(1))] = time.perf_counter() - start
        if process.wait(timeout=timeout):
            raise RuntimeError(f"main.py failed (exit {process.returncode}): {''.join(tail)[-800:]}")
        seconds_from_start = time.perf_counter() - start
        with open(os.path.join(workdir, "final_metrics.json")) as f:
            report = json.load(f)
        steps_per_epoch = report["steps"] // max(stamps) if stamps else 0
        epochs, reached = [], None
        for epoch in sorted(stamps):
            accuracy = _checkpoint_test_accuracy(workdir, epoch * steps_per_epoch, data_dir, base, env)
            epochs.append({"epoch": epoch, "test_accuracy": accuracy, "seconds_from_start": stamps[epoch]})
            if accuracy >= target_accuracy:
                reached = stamps[epoch]
                break
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return {
        "train_seconds": report["seconds"],
        "seconds_from_start": seconds_from_start,
        "test_accuracy": report["test"]["accuracy"],
        "seconds_to_target": reached,
        "epochs": epochs,
    }


def _checkpoint_test_accuracy(workdir: str, step: int, data_dir: str, base: str, env: dict) -> float:
    """The test accuracy of one step's checkpoint: `main.py --config.eval_only=True --config.init_from=...`."""
    evaluation = os.path.join(base, f"eval-{step}")
    command = [sys.executable, "main.py", "--config=configs/cnn.py", f"--workdir={evaluation}"]
    command += [f"--config.init_from={workdir}/checkpoints/{step}", "--config.eval_only=True"]
    command += [f"--config.data.local_dir={data_dir}", "--config.wandb.mode=disabled", "--config.tensorboard=False"]
    command += ["--config.checkpoint.enabled=False"]
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(f"eval_only at step {step} failed: {done.stderr[-800:]}")
    with open(os.path.join(evaluation, "final_metrics.json")) as f:
        return json.load(f)["test"]["accuracy"]


def _test_probabilities(path: str, count: int) -> list | None:
    """The first `count` rows of class probabilities from predictions.csv (6 decimals)."""
    if not count:
        return None
    import numpy as np

    return np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)[:count, 4:].tolist()


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next((float(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:")), float("nan"))


if __name__ == "__main__":
    # The checkout to measure is the working directory; this file's folder must not shadow anything.
    sys.path[0] = os.getcwd()
    print(RESULT_MARKER + json.dumps(measure(json.loads(sys.argv[1]))), flush=True)
