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
        THREADS,
        Settings,
        architecture,
        build_contender,
        default_conv_impl,
        ratio_rows,
        round_steps,
    )

    if kind == "threads1":
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # before JAX or torch size their thread pools
    if kind == "devices":
        import jax

        jax.config.update("jax_num_cpu_devices", 2)
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

    def ours(impl: str, batch_size: int = 128, steps_per_call: int = 1, **kwargs):
        config = jax_loops.model_config("cnn", **{"model.conv_impl": impl})
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
        from benchmarks.torch_loop import TorchContender

        shapes = architecture(jax_loops.model_config("cnn"))
        contenders = {"PyTorch, 2 threads": TorchContender(shapes, data, 128, threads=THREADS)}
        for impl in spec.get("impls") or ("xla", "shifted_matmul"):
            default = " (default)" if impl == default_conv_impl() else ""
            contenders[f"ours conv={impl}, 1 device{default}"] = ours(impl)
            contenders[f"ours conv={impl}, 2 devices (batch split)"] = ours(impl, num_devices=2)
        if not spec.get("impls"):  # the formulation that lax.scan does not slow down, fused
            for num_devices in (1, 2):
                label = f"ours conv=shifted_matmul, 10 steps/call, {num_devices} device" + "s" * (num_devices > 1)
                contenders[label] = ours("shifted_matmul", num_devices=num_devices, steps_per_call=10)
        contenders["PyTorch, 2 threads"].run(2)
        timed = common.interleave(
            {k: (lambda c=c: c.run(spec["steps"])) for k, c in contenders.items()}, spec["rounds"]
        )
        return {"rows": ratio_rows(timed, {}), "devices": [str(d) for d in jax_loops.jax.devices()]}
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
                impls = [default_conv_impl()] if model == "mlp" or settings.quick else ["xla", "shifted_matmul"]
                for impl in impls:
                    config = jax_loops.model_config(model, **({"model.conv_impl": impl} if model == "cnn" else {}))
                    label = (
                        "ours"
                        + (f" conv={impl}" if model == "cnn" else "")
                        + (" (default)" if impl == default_conv_impl() or model == "mlp" else "")
                    )
                    contenders[label] = jax_loops.OursContender(config, data, batch_size, steps_per_call=1)
                for contender in contenders.values():
                    contender.run(2)
                steps = round_steps(settings, model, batch_size)
                timed = common.interleave(
                    {k: (lambda c=c, n=steps: c.run(n)) for k, c in contenders.items()}, spec["rounds"]
                )
                for row in ratio_rows(timed, {}):
                    rows.append({"model": model, "batch_size": batch_size, **row})
        return {"cores": sorted(os.sched_getaffinity(0)), "rows": rows}
    raise ValueError(f"unknown child kind {kind}")
