"""The peer contenders in a fresh process each: `python -m benchmarks.child SPEC` trains one and prints its figures.

PyTorch's DataLoader loop (torch_loop.py) or the Flax example's host-fed loop (flax_example.py): a process per round
gives each its own peak memory, and its own CPU affinity and thread count for the 1-thread control. The PyTorch
child imports NumPy and torch only.
"""

import json
import os
import subprocess
import sys
import time

STARTED = time.perf_counter()  # the process's start, for the whole run's "seconds from start" (before torch loads)

from benchmarks import common  # noqa: E402

RESULT_MARKER = "CHILD_RESULT "


def run_child(spec: dict, timeout: float = 1800, env: dict | None = None) -> dict:
    """Runs `measure(spec)` in a fresh process of this checkout; returns its result.

    Args:
      spec: `kind` ("torch" or "hostfed"), `data_npz` (HostData.save), `batch_size`, `warmup_steps`, `steps`; for
        torch `architecture` (TorchNet's shapes), `threads` and `data_path` (dataloader or resident); for hostfed
        `config` (a config file); optionally `cores` (the CPU affinity, set before torch or JAX size their thread
        pools). "roofline_profile": roofline.py's profile of the library's step (run with `env` = XLA's traceme flag);
        "torch_profile": torch_profile.py's profile of the resident-data torch.compile peer's step.
      env: variables to set in the child (XLA_FLAGS).
    """
    command = [sys.executable, "-m", "benchmarks.child", json.dumps(spec)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    done = subprocess.run(command, cwd=common.REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if done.returncode or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-6:]
        raise RuntimeError(f"child {spec['kind']} failed (exit {done.returncode}): " + " | ".join(tail))
    return json.loads(lines[-1][len(RESULT_MARKER) :])


def measure(spec: dict) -> dict:
    """Builds the contender, warms it up, times `steps` steps, then evaluates the test set."""
    if spec.get("cores"):
        os.sched_setaffinity(0, set(spec["cores"]))
    if spec["kind"] == "torch_run":
        return whole_run(spec)
    if spec["kind"] == "roofline_profile":
        from benchmarks import roofline

        return roofline.profile_child()
    if spec["kind"] == "torch_profile":
        from benchmarks import torch_profile

        return torch_profile.profile_child(spec)
    data = common.HostData.load(spec["data_npz"])
    start = time.perf_counter()
    if spec["kind"] == "torch":
        from benchmarks.torch_loop import TorchContender

        contender = TorchContender(
            spec["architecture"],
            data,
            spec["batch_size"],
            threads=spec["threads"],
            compile=spec.get("compile", False),
            data_path=spec.get("data_path", "dataloader"),
        )
    else:
        from benchmarks import flax_example, pieces

        config = pieces.load_config(spec["config"], batch_size=spec["batch_size"])
        contender = flax_example.HostFedContender(config, data)
    contender.run(spec["warmup_steps"])
    setup_seconds = time.perf_counter() - start
    start = time.perf_counter()
    images = contender.run(spec["steps"])
    seconds = time.perf_counter() - start
    contender.evaluate()  # the first call may allocate
    eval_seconds, accuracy = contender.evaluate()
    return {
        "images_per_second": images / seconds,
        "eval_images_per_second": len(data.test_labels) / eval_seconds,
        "setup_seconds": setup_seconds,
        "compile_seconds": getattr(contender, "compile_seconds", None),
        "peak_rss_mb": common.peak_rss_mb(),
        "test_accuracy": accuracy,
    }


def whole_run(spec: dict) -> dict:
    """PyTorch's whole run of the default recipe: `epochs` epochs, validation after each (timed with training).

    After each epoch the test set is evaluated too, for the time to 93% test accuracy; that evaluation is the
    measurement's own and its seconds are taken out of every figure. `seconds_from_start` counts from this
    process's start (imports, data, compilation included), like `python main.py`'s.
    """
    from benchmarks.torch_loop import TorchContender

    data = common.HostData.load(spec["data_npz"])
    recipe = spec["recipe"]
    contender = TorchContender(
        spec["architecture"],
        data,
        spec["batch_size"],
        threads=spec["threads"],
        learning_rate=recipe["learning_rate"],
        weight_decay=recipe["weight_decay"],
        label_smoothing=recipe["label_smoothing"],
        num_epochs=spec["epochs"],
        seed=spec.get("seed", 0),
        compile=spec.get("compile", False),
        data_path=spec.get("data_path", "dataloader"),
    )
    subset = spec.get("steps_per_epoch") or contender.steps_per_epoch
    epochs, excluded, start = [], 0.0, time.perf_counter()
    for epoch in range(spec["epochs"]):
        contender.run(subset)
        _, val_accuracy = contender.evaluate(split="validation")
        now = time.perf_counter()
        test_seconds, test_accuracy = contender.evaluate()
        epochs.append(
            {
                "epoch": epoch + 1,
                "val_accuracy": val_accuracy,
                "test_accuracy": test_accuracy,
                "train_seconds": now - start - excluded,
                "seconds_from_start": now - STARTED - excluded,
            }
        )
        excluded += test_seconds
    reached = [e["seconds_from_start"] for e in epochs if e["test_accuracy"] >= spec.get("target_accuracy", 0.93)]
    return {
        "seconds_to_target": reached[0] if reached else None,
        "train_seconds": epochs[-1]["train_seconds"],
        "seconds_from_start": epochs[-1]["seconds_from_start"],
        "test_accuracy": epochs[-1]["test_accuracy"],
        "epochs": epochs,
        "peak_rss_mb": common.peak_rss_mb(),
    }


if __name__ == "__main__":
    print(RESULT_MARKER + json.dumps(measure(json.loads(sys.argv[1]))), flush=True)
