"""Overheads of a run: the metric writers (W&B offline, TensorBoard, log, JSON lines) and asynchronous orbax
checkpoints, per call and as a share of a default CNN run; imports TensorFlow and W&B (through the writers)."""

import os
import shutil
import tempfile
import time

from benchmarks import common
from benchmarks.common import median


def section_overhead(data, settings, data_path: str) -> dict:
    """Metric writers and asynchronous checkpoints: cost per call, and as a share of a default run."""
    import wandb

    from benchmarks import jax_loops
    from mnist_flax import checkpoints as checkpoints_lib
    from mnist_flax import metrics as metrics_lib
    from mnist_flax import writers

    config = jax_loops.model_config("cnn")
    ours = jax_loops.OursContender(config, data)
    ours.run(2)
    tmp = tempfile.mkdtemp(prefix="mnist_flax_bench_")
    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(mode="offline", dir=tmp, project="mnist_flax_bench", config=config.to_dict())
    writer = writers.create_writer(tmp, tensorboard=True, wandb_run=run)
    train_scalars = {
        "train/loss": 0.5,
        "train/accuracy": 0.8,
        "train/learning_rate": 1e-3,
        "train/images_per_second": 800.0,
        "train/nonfinite_steps": 0,
    }
    _, report = ours.evaluate_report()
    val_scalars = metrics_lib.scalar_metrics(report, "val")

    def writer_cost(scalars: dict, calls: int) -> dict:
        for step in range(3):
            writer.write_scalars(step, scalars)
        writer.flush()
        time.sleep(0.5)
        idle_start, idle_cpu = time.perf_counter(), common.process_cpu_seconds() + common.children_cpu_seconds()
        time.sleep(1.0)
        idle_rate = (common.process_cpu_seconds() + common.children_cpu_seconds() - idle_cpu) / (
            time.perf_counter() - idle_start
        )
        cpu_start, start, blocked = (
            common.process_cpu_seconds() + common.children_cpu_seconds(),
            time.perf_counter(),
            [],
        )
        for step in range(calls):
            call_start = time.perf_counter()
            writer.write_scalars(1000 + step, scalars)
            blocked.append(time.perf_counter() - call_start)
        flush_start = time.perf_counter()
        writer.flush()
        flush_seconds = time.perf_counter() - flush_start
        time.sleep(1.0)  # let W&B's service process take in what it was sent
        wall = time.perf_counter() - start
        cpu = common.process_cpu_seconds() + common.children_cpu_seconds() - cpu_start - idle_rate * wall
        return {
            "calls": calls,
            "num_scalars": len(scalars),
            "blocked_ms_median": 1000 * median(blocked),
            "blocked_ms_mean": 1000 * sum(blocked) / calls,
            "flush_ms": 1000 * flush_seconds,
            "cpu_ms_per_call": 1000 * max(cpu, 0.0) / calls,
        }

    train_writes = writer_cost(train_scalars, settings.writer_calls)
    val_writes = writer_cost(val_scalars, max(10, settings.writer_calls // 10))

    checkpoints = checkpoints_lib.Checkpoints(os.path.join(tmp, "checkpoints"), config.checkpoint)
    meta = {"epoch": 1, "best": {"val_accuracy": 0.9, "step": 0}, "config": config.to_dict(), "metrics": {}}
    saves = []
    for i in range(settings.saves + 1):
        step = 1000 * (i + 1)
        cpu_start, start = common.process_cpu_seconds(), time.perf_counter()
        checkpoints.save(step, ours.state, {**meta, "step": step}, metrics={"val_accuracy": 0.9}, force=True)
        blocked = time.perf_counter() - start
        checkpoints.wait()
        total = time.perf_counter() - start
        cpu = common.process_cpu_seconds() - cpu_start
        artifact_start = time.perf_counter()
        artifact = wandb.Artifact(f"model-{run.id}", type="model", metadata={"step": step})
        artifact.add_dir(os.path.join(checkpoints.directory, str(step)))
        run.log_artifact(artifact, aliases=["latest"])
        artifact_seconds = time.perf_counter() - artifact_start
        if i:  # the first save creates the directory layout
            saves.append({"blocked": blocked, "until_written": total, "cpu": cpu, "artifact": artifact_seconds})
    checkpoint_cost = {
        "saves": len(saves),
        "blocked_ms_median": 1000 * median([s["blocked"] for s in saves]),
        "until_written_ms_median": 1000 * median([s["until_written"] for s in saves]),
        "cpu_ms_per_save": 1000 * median([s["cpu"] for s in saves]),
        "wandb_artifact_ms_median": 1000 * median([s["artifact"] for s in saves]),
    }

    # A/B, interleaved, amplified so the effect can rise above the noise: writes every `ab_log_every` steps
    # instead of 100, one save per `ab_steps` steps instead of one per epoch.
    ours.config.log_every_steps = settings.ab_log_every
    ab_step = [0]

    def bare():
        ours.on_log = None
        return ours.run(settings.ab_steps)

    def with_writers():
        ours.on_log = writer.write_scalars
        images = ours.run(settings.ab_steps)
        ours.on_log = None
        return images

    def with_checkpoint():
        ours.on_log = None
        images = ours.run(settings.ab_steps // 2)
        ab_step[0] += 1
        checkpoints.save(100_000 + ab_step[0], ours.state, meta, metrics={"val_accuracy": 0.9}, force=True)
        images += ours.run(settings.ab_steps - settings.ab_steps // 2)
        checkpoints.wait()
        return images

    timed = common.interleave({"bare": bare, "writers": with_writers, "checkpoint": with_checkpoint}, settings.rounds)
    writer.flush()
    writer.close()
    checkpoints.close()
    run.finish()
    shutil.rmtree(tmp, ignore_errors=True)

    # A default run: 128 a batch, log every 100 steps (and at the epoch's end), a validation write and a checkpoint
    # per epoch.
    steps_per_epoch = ours.steps_per_epoch
    step_seconds = median(timed["bare"].seconds) / settings.ab_steps
    epoch_seconds = step_seconds * steps_per_epoch
    cores_busy = timed["bare"].cpu_per_wall()
    train_logs = -(-steps_per_epoch // 100)
    blocked = (
        train_logs * train_writes["blocked_ms_mean"]
        + val_writes["blocked_ms_mean"]
        + checkpoint_cost["blocked_ms_median"]
    ) / 1000
    cpu = (
        train_logs * train_writes["cpu_ms_per_call"]
        + val_writes["cpu_ms_per_call"]
        + checkpoint_cost["cpu_ms_per_save"]
    ) / 1000
    ab = {}
    writes_ab = settings.ab_steps / settings.ab_log_every
    writes_default = settings.ab_steps / 100
    for name, scale in (("writers", writes_ab / writes_default), ("checkpoint", steps_per_epoch / settings.ab_steps)):
        ratios = [v / b for v, b in zip(timed[name].seconds, timed["bare"].seconds, strict=True)]
        ab[name] = {
            "extra_share_amplified": median(ratios) - 1,
            "amplification": scale,
            "extra_share_default_run": (median(ratios) - 1) / scale,
            "rounds_seconds": timed[name].seconds,
        }
    return {
        "train_writes": train_writes,
        "val_writes": val_writes,
        "checkpoint": checkpoint_cost,
        "default_run": {
            "steps_per_epoch": steps_per_epoch,
            "step_ms": 1000 * step_seconds,
            "epoch_seconds": epoch_seconds,
            "cores_busy_training": cores_busy,
            "train_writes_per_epoch": train_logs,
            "blocked_share": blocked / epoch_seconds,
            "cpu_share": cpu / (epoch_seconds * cores_busy),
            "blocked_share_writers": (train_logs * train_writes["blocked_ms_mean"] + val_writes["blocked_ms_mean"])
            / 1000
            / epoch_seconds,
            "blocked_share_checkpoint": checkpoint_cost["blocked_ms_median"] / 1000 / epoch_seconds,
            "artifact_share": checkpoint_cost["wandb_artifact_ms_median"] / 1000 / epoch_seconds,
            "wait_share": checkpoint_cost["until_written_ms_median"] / 1000 / epoch_seconds,
        },
        "ab": ab,
        "ab_bare_spread": common.spread(timed["bare"].seconds),
        "ab_steps": settings.ab_steps,
        "ab_log_every": settings.ab_log_every,
    }
