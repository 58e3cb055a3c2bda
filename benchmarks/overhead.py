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
    # With W&B upload on, the Checkpointer's save blocks the loop for its start and the previous save's artifact
    # (its wait is deferred to the next save, by when the write is done): `checkpointer_ms`.
    blocked = logs * costs["train_write_ms"] + costs["val_write_ms"] + costs["checkpointer_ms"]
    share, kept = blocked / 1000 / epoch_seconds, common.ratio(tracked, bare)
    summary = (
        f"A/B, interleaved whole runs of two epochs ({ctx.settings.rounds} round(s)): tracked / bare steady images/s "
        f"**{kept:.3f}x** (bare rounds spread {100 * spread(bare):.0f}%). Direct: in an epoch of {steps_per_epoch} "
        f"steps ({epoch_seconds:.1f} s bare), {logs} train write(s), one validation write and one save (with its W&B "
        f"artifact) block the loop for **{100 * share:.2f}%** of it. A save with upload on blocks the loop "
        f"{costs['checkpointer_ms']:.1f} ms through the Checkpointer (the upload waits for the next save), against "
        f"{costs['synchronous_ms']:.1f} ms for save + wait + artifact in a row (what a synchronous upload costs): "
        f"**{costs['synchronous_ms'] / costs['checkpointer_ms']:.1f}x** less, interleaved, {costs['saves']} saves each."
    )
    rows = [
        {"what": "write_scalars, train log (5 scalars)", "ms": costs["train_write_ms"], "cpu": costs["train_cpu_ms"]},
        {"what": f"write_scalars, validation ({costs['val_scalars']} scalars)", "ms": costs["val_write_ms"]},
        {"what": "Checkpoints.save (async)", "ms": costs["save_blocked_ms"], "cpu": costs["save_cpu_ms"]},
        {"what": "  ... until written (wait)", "ms": costs["save_wait_ms"]},
        {"what": "  ... W&B model artifact (upload_to_wandb)", "ms": costs["artifact_ms"]},
        {"what": "save + wait + artifact in a row (synchronous upload)", "ms": costs["synchronous_ms"]},
        {"what": "Checkpointer.save, upload on (deferred to the next save)", "ms": costs["checkpointer_ms"]},
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
    from mnist_flax.training import checkpointing, metrics

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
    saver = checkpointing.Checkpoints(os.path.join(tmp, "checkpoints"), config.checkpoint)
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
    synchronous, deferred = _upload_blocking(tracker, state, tmp, saves)
    writer.close()
    saver.close()
    tracker.finish()
    shutil.rmtree(tmp, ignore_errors=True)
    blocked, waited, cpu, artifact_seconds = (1000 * median(t) for t in zip(*timings, strict=True))
    return {
        **{"train_write_ms": train_ms, "train_cpu_ms": train_cpu, "val_write_ms": val_ms, "val_scalars": len(val)},
        **{"save_blocked_ms": blocked, "save_wait_ms": waited, "save_cpu_ms": cpu, "artifact_ms": artifact_seconds},
        **{"synchronous_ms": 1000 * median(synchronous), "checkpointer_ms": 1000 * median(deferred), "saves": saves},
    }


def _upload_blocking(tracker, state, tmp: str, saves: int, gap: float = 1.0) -> tuple[list, list]:
    """Seconds the loop is blocked per save with W&B upload on: save, wait and artifact in a row (a synchronous
    upload) against the library's Checkpointer, whose upload waits for the next save; interleaved, with `gap`
    seconds of (idle) training between saves, as an epoch gives the write time to finish."""
    import types

    from mnist_flax.training import checkpointing, periodic

    setup = types.SimpleNamespace(steps_per_epoch=1000, provenance={}, config_history=[])
    loop_state = types.SimpleNamespace(carry=(state,), best={"val_accuracy": 0.9, "step": 0})
    config = pieces.load_config(wandb__mode="offline", checkpoint__upload_to_wandb=True)
    synchronous_saver = checkpointing.Checkpoints(os.path.join(tmp, "synchronous"), config.checkpoint)
    deferred_saver = checkpointing.Checkpoints(os.path.join(tmp, "deferred"), config.checkpoint)
    checkpointer = periodic.Checkpointer(periodic.Periodic(), deferred_saver, config, tracker)
    meta = {"epoch": 1, "best": {"val_accuracy": 0.9, "step": 0}, "config": config.to_dict(), "metrics": {}}
    synchronous, deferred = [], []
    for i in range(saves + 1):  # the first of each creates the directory layout: not counted
        step = 1000 * (i + 1)
        start = time.perf_counter()
        synchronous_saver.save(step, state, {**meta, "step": step}, force=True)
        synchronous_saver.wait()
        tracker.log_checkpoint(os.path.join(synchronous_saver.directory, str(step)), step, ["latest"], {"step": step})
        synchronous += [time.perf_counter() - start] if i else []
        time.sleep(gap)
        start = time.perf_counter()
        checkpointer.save(setup, loop_state, step)
        deferred += [time.perf_counter() - start] if i else []  # from the second: each uploads the one before
        time.sleep(gap)
    checkpointer.flush_upload()
    synchronous_saver.close()
    deferred_saver.close()
    return synchronous, deferred


def _tracked_sinks(config, workdir: str):
    """The library's W&B tracker (offline) and its writers (log, JSON lines, TensorBoard, W&B), as a run builds them."""
    from mnist_flax.records import provenance
    from mnist_flax.tracking import wandb_run, writers

    os.environ.setdefault("WANDB_SILENT", "true")
    tracker = wandb_run.Tracker.start(config, workdir, provenance.git_info(), overrides={})
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
