"""Measurements that need a fresh process: `run.py --child KIND` runs `child_main` and prints its JSON.

Peak memory (a process per contender), XLA flags (set before XLA starts), one thread (the process pinned to one
core before JAX or torch size their thread pools), two CPU devices (`jax_num_cpu_devices` before the backend).
"""

import json
import os
import subprocess
import sys

from benchmarks import common

RUN_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "run.py")


def run_child(kind: str, spec: dict, data_path: str, xla_flags: str | None = None) -> dict:
    """Runs `run.py --child KIND` for one measurement (XLA_FLAGS set if given); returns the JSON it prints."""
    env = dict(os.environ)
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    command = [sys.executable, RUN_PY, "--child", kind, "--child-spec", json.dumps(spec)]
    command += ["--data-npz", data_path]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("CHILD_RESULT ")]
    if done.returncode or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"child {kind} {spec.get('label', '')} failed ({done.returncode}): " + " | ".join(tail))
    return json.loads(lines[-1][len("CHILD_RESULT ") :])


def child_main(kind: str, spec: dict, data_path: str) -> dict:
    """What a child process measures (see run_child)."""
    from benchmarks.sections import (
        Settings,
        architecture,
        build_contender,
        contender_specs,
        ratio_rows,
        round_steps,
    )

    if kind == "threads1":
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # before JAX or torch size their thread pools
    if kind == "devices":
        import jax

        jax.config.update("jax_num_cpu_devices", spec["num_devices"])
    data = common.HostData.load(data_path)
    if kind == "memory":
        rss_start = common.rss_mb()
        contender = build_contender(spec, spec["model"], data, spec["batch_size"])
        rss_built = common.rss_mb()
        contender.run(spec["steps"])
        contender.evaluate()
        return {
            "rss_start_mb": rss_start,
            "rss_after_setup_mb": rss_built,
            "peak_rss_mb": common.peak_rss_mb(),
            "final_rss_mb": common.rss_mb(),
        }

    from benchmarks import jax_loops

    def ours(impl: str, batch_size: int = 128, steps_per_call: int = 1, pieces: str = "1", **kwargs):
        config = jax_loops.model_config("cnn", **{"model.conv_impl": impl, "model.conv_batch_split": pieces})
        contender = jax_loops.OursContender(config, data, batch_size, steps_per_call=steps_per_call, **kwargs)
        contender.run(2)
        return contender

    if kind == "xla_flags":
        contenders = {impl: ours(impl) for impl in ("xla", "shifted_matmul")}
        timed = common.interleave(
            {k: (lambda c=c: c.run(spec["steps"])) for k, c in contenders.items()}, spec["rounds"]
        )
        return {impl: {"images_per_second": timed[impl].median_images_per_second()} for impl in contenders}
    if kind == "devices":
        # The default CNN config on `num_devices` CPU devices (the batch split over the mesh), compile apart.
        import numpy as np

        config = jax_loops.model_config("cnn")
        contender = jax_loops.OursContender(config, data, 128, num_devices=spec["num_devices"])
        contender.run(spec["agree_steps"])  # from the same initial state and data order on every device count
        log_probs = contender.log_probs()[: spec["agree_examples"]]
        timed = common.interleave({"run": lambda: contender.run(spec["steps"])}, spec["rounds"])
        return {
            "num_devices": spec["num_devices"],
            "devices": [str(d) for d in jax_loops.jax.devices()],
            "images_per_second": timed["run"].median_images_per_second(),
            "rounds_images_per_second": timed["run"].images_per_second(),
            "cpu_per_wall": timed["run"].cpu_per_wall(),
            "compile_seconds": contender.compile_seconds,
            "pieces": contender.model.conv_batch_split,
            "steps_per_call": contender.steps_per_call,
            "log_probs": np.asarray(log_probs).tolist(),
        }
    if kind == "threads1":
        from benchmarks.torch_loop import TorchContender

        settings = Settings(spec["quick"])
        rows = []
        for model in ("cnn", "mlp"):
            if settings.quick and model == "mlp":
                continue
            shapes = architecture(jax_loops.model_config(model))
            for batch_size in spec["batch_sizes"]:
                contenders = {"PyTorch, 1 thread": TorchContender(shapes, data, batch_size, threads=1)}
                ours_specs = contender_specs(model, settings, batch_size)[2:4]  # the default and the plain jit step
                for ours_spec in ours_specs:
                    contenders[ours_spec["label"]] = build_contender(ours_spec, model, data, batch_size)
                for contender in contenders.values():
                    contender.run(10)
                steps = round_steps(settings, model, batch_size)
                timed = common.interleave(
                    {k: (lambda c=c, n=steps: c.run(n)) for k, c in contenders.items()}, spec["rounds"]
                )
                for row in ratio_rows(timed, {}):
                    rows.append({"model": model, "batch_size": batch_size, **row})
        return {"cores": sorted(os.sched_getaffinity(0)), "rows": rows}
    raise ValueError(f"unknown child kind {kind}")
