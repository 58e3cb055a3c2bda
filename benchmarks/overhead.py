"""Overheads of a run: W&B (offline), TensorBoard and orbax checkpoints, against a bare run of the same loop.

Two measures: an interleaved A/B of whole `train_and_evaluate` runs (tracked against bare), and the direct cost of
the library's pieces (`write_scalars`, `Checkpoints.save`, the W&B artifact) per call, scaled to a default epoch.
Imports TensorFlow and W&B (through the writers).
"""

import os
import shutil
import tempfile
import time

import numpy as np

from benchmarks import common, pieces
from benchmarks.common import median, spread
from benchmarks.sections import Context, interleaved, ours

TRACKED = {"wandb.mode": "offline", "tensorboard": True, "checkpoint.enabled": True}  # upload_to_wandb: its default


def section_overhead(ctx: Context) -> dict:
    """The A/B of tracked against bare runs, and the direct costs per call as a share of an epoch."""
    two_epochs = {"num_epochs": 2}  # the second epoch runs beside the first's checkpoint write and W&B's service
    contenders = {
        "bare": lambda: ours(ctx, changes=two_epochs),
        "tracked": lambda: ours(ctx, changes={**two_epochs, **TRACKED}, env={"WANDB_SILENT": "true"}),
    }
    runs = interleaved(contenders, ctx.settings.rounds)
    bare, tracked = ([r["images_per_second"] for r in runs[k]] for k in ("bare", "tracked"))
    costs = direct_costs(20 if ctx.settings.quick else 200, 2 if ctx.settings.quick else 4)
    steps_per_epoch = runs["bare"][0]["steps"] // 2
    epoch_seconds = steps_per_epoch * 128 / common.median(bare)
    logs = -(-steps_per_epoch // 100)  # the default log_every_steps, and the epoch's last step
    blocked = logs * costs["train_write_ms"] + costs["val_write_ms"] + costs["save_blocked_ms"]
    blocked += costs["save_wait_ms"] + costs["artifact_ms"]  # with W&B on, the loop waits for the save and logs it
    share, kept = blocked / 1000 / epoch_seconds, common.ratio(tracked, bare)
    summary = (
        f"A/B, interleaved whole runs of two epochs ({ctx.settings.rounds} round(s)): tracked / bare steady images/s "
        f"**{kept:.3f}x** (bare rounds spread {100 * spread(bare):.0f}%). Direct: in an epoch of {steps_per_epoch} "
        f"steps ({epoch_seconds:.1f} s bare), {logs} train write(s), one validation write and one save (waited for, "
        f"with its W&B artifact) block the loop for **{100 * share:.2f}%** of it."
    )
    rows = [
        {"what": "write_scalars, train log (5 scalars)", "ms": costs["train_write_ms"], "cpu": costs["train_cpu_ms"]},
        {"what": f"write_scalars, validation ({costs['val_scalars']} scalars)", "ms": costs["val_write_ms"]},
        {"what": "Checkpoints.save (async)", "ms": costs["save_blocked_ms"], "cpu": costs["save_cpu_ms"]},
        {"what": "  ... until written (wait)", "ms": costs["save_wait_ms"]},
        {"what": "  ... W&B model artifact (upload_to_wandb)", "ms": costs["artifact_ms"]},
    ]
    columns = [["what", "what", "{}"], ["ms blocked per call", "ms", "{:.2f}"], ["CPU ms per call", "cpu", "{:.2f}"]]
    measured = f"{100 * share:.2f}% blocked (direct); A/B tracked / bare images/s {kept:.3f}x"
    return {
        "ab": {"bare_images_per_second": bare, "tracked_images_per_second": tracked, "ratio": kept},
        "costs": costs,
        "epoch_seconds": epoch_seconds,
        "blocked_share": share,
        "summary": summary,
        "tables": [{"columns": columns, "rows": rows}],
        "targets": [["logging + checkpointing < 2% of training time", measured, "met" if share < 0.02 else "missed"]],
    }


def direct_costs(writes: int, saves: int) -> dict:
    """Milliseconds blocked (and CPU, W&B's service included) per `write_scalars` and per `Checkpoints.save`."""
    from mnist_flax import checkpoints, metrics

    config = pieces.load_config(wandb__mode="offline")
    tmp = tempfile.mkdtemp(prefix="mnist_flax_bench_")
    tracker, writer = _tracked_sinks(config, tmp)
    train = {"train/loss": 0.5, "train/accuracy": 0.8, "train/learning_rate": 1e-3, "train/images_per_second": 800.0}
    train["train/nonfinite_steps"] = 0
    logits = np.random.default_rng(0).normal(size=(1000, 10))
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    val = metrics.scalar_metrics(metrics.classification_metrics(log_probs, np.arange(1000) % 10), "val")
    train_ms, train_cpu = _write_cost(writer, train, writes)
    val_ms, _ = _write_cost(writer, val, max(10, writes // 10))
    state, _ = pieces.train_state(config, pieces.build_model(config), 429)
    saver = checkpoints.Checkpoints(os.path.join(tmp, "checkpoints"), config.checkpoint)
    meta = {"epoch": 1, "best": {"val_accuracy": 0.9, "step": 0}, "config": config.to_dict(), "metrics": {}}
    timings = []
    for i in range(saves + 1):  # the first save creates the directory layout
        step, cpu, start = 1000 * (i + 1), common.process_cpu_seconds(), time.perf_counter()
        saver.save(step, state, {**meta, "step": step}, metrics={"val_accuracy": 0.9}, force=True)
        blocked = time.perf_counter() - start
        saver.wait()
        waited, cpu = time.perf_counter() - start - blocked, common.process_cpu_seconds() - cpu
        start = time.perf_counter()
        tracker.log_checkpoint(os.path.join(saver.directory, str(step)), step, ["latest"], {"step": step})
        timings += [(blocked, waited, cpu, time.perf_counter() - start)] if i else []
    writer.close()
    saver.close()
    tracker.finish()
    shutil.rmtree(tmp, ignore_errors=True)
    blocked, waited, cpu, artifact_seconds = (1000 * median(t) for t in zip(*timings, strict=True))
    return {
        **{"train_write_ms": train_ms, "train_cpu_ms": train_cpu, "val_write_ms": val_ms, "val_scalars": len(val)},
        **{"save_blocked_ms": blocked, "save_wait_ms": waited, "save_cpu_ms": cpu, "artifact_ms": artifact_seconds},
    }


def _tracked_sinks(config, workdir: str):
    """The library's W&B tracker (offline) and its writers (log, JSON lines, TensorBoard, W&B), as a run builds them."""
    from mnist_flax import provenance, tracking, writers

    os.environ.setdefault("WANDB_SILENT", "true")
    tracker = tracking.Tracker.start(config, workdir, provenance.git_info(), overrides={})
    return tracker, writers.create_writer(workdir, tensorboard=True, tracker=tracker)


def _write_cost(writer, scalars: dict, calls: int) -> tuple[float, float]:
    """(ms blocked, CPU ms of this process and its children) per `write_scalars` call, idle CPU subtracted."""
    cpu_now = lambda: common.process_cpu_seconds() + common.children_cpu_seconds()  # noqa: E731
    for step in range(3):
        writer.write_scalars(step, scalars)
    writer.flush()
    idle_cpu, idle_start = cpu_now(), time.perf_counter()
    time.sleep(1.0)
    idle_rate = (cpu_now() - idle_cpu) / (time.perf_counter() - idle_start)
    cpu, start, blocked = cpu_now(), time.perf_counter(), 0.0
    for step in range(calls):
        call_start = time.perf_counter()
        writer.write_scalars(1000 + step, scalars)
        blocked += time.perf_counter() - call_start
    writer.flush()
    time.sleep(1.0)  # let W&B's service process take in what it was sent
    cpu = cpu_now() - cpu - idle_rate * (time.perf_counter() - start)
    return 1000 * blocked / calls, 1000 * max(cpu, 0.0) / calls
