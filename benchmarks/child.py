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

from benchmarks import common

RESULT_MARKER = "CHILD_RESULT "


def run_child(spec: dict, timeout: float = 1800) -> dict:
    """Runs `measure(spec)` in a fresh process of this checkout; returns its result.

    Args:
      spec: `kind` ("torch" or "hostfed"), `data_npz` (HostData.save), `batch_size`, `warmup_steps`, `steps`; for
        torch `architecture` (TorchNet's shapes) and `threads`; for hostfed `config` (a config file);
        optionally `cores` (the CPU affinity, set before torch or JAX size their thread pools).
    """
    command = [sys.executable, "-m", "benchmarks.child", json.dumps(spec)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
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
    data = common.HostData.load(spec["data_npz"])
    start = time.perf_counter()
    if spec["kind"] == "torch":
        from benchmarks.torch_loop import TorchContender

        contender = TorchContender(spec["architecture"], data, spec["batch_size"], threads=spec["threads"])
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


if __name__ == "__main__":
    print(RESULT_MARKER + json.dumps(measure(json.loads(sys.argv[1]))), flush=True)
