"""The training loop: `train_and_evaluate` reads top to bottom.

config -> data -> model + optimizer -> resume -> epochs (train, evaluate,
checkpoint) -> test report. The numerics it calls are in `steps.py`. It writes
through clu's MetricWriter interface and never knows which sinks (log, JSON
lines, TensorBoard, W&B) are attached.
"""

import contextlib
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mnist_flax import checkpoints as checkpoints_lib
from mnist_flax import config_utils, distributed, input_pipeline, metrics, models, progress
from mnist_flax import workdir as workdir_lib
from mnist_flax.errors import ConfigError, MnistFlaxError
from mnist_flax.steps import (
    CompileCounter,
    TrainState,
    create_train_state,
    empty_guard,
    evaluate,
    make_optimizer,
    make_predict,
    make_schedule,
    make_train_step,
    resolve_scan_unroll,
    resolve_steps_per_call,
)

SYNC_CPU_DEVICES = os.environ.get("MNIST_FLAX_NO_CPU_SYNC") != "1"  # off only to show the deadlock in a test


class NonFiniteLossError(MnistFlaxError):
    """The loss became NaN or infinite (and train.on_nonfinite is "stop")."""


class Preempted(MnistFlaxError):
    """SIGTERM or SIGINT arrived; a checkpoint was saved and the run can resume."""

    exit_code = 3


# ---------------------------------------------------------------- the loop


def check_batch_sizes(config: ml_collections.ConfigDict, datasets: input_pipeline.Datasets, num_devices: int = 1):
    """Batch sizes must fit the training split and split evenly over the devices (checked before compiling)."""
    if config.batch_size > len(datasets.train):
        raise ConfigError(
            f"batch_size: {config.batch_size} is larger than the training split ({len(datasets.train)} examples)"
        )
    for name in ("batch_size", "eval_batch_size"):
        if config[name] % num_devices:
            raise ConfigError(f"{name}: {config[name]} does not split evenly over {num_devices} devices")
    pieces = config.model.get("conv_batch_split", "auto")
    per_device = config.batch_size // num_devices
    if pieces != "auto" and per_device % int(pieces):
        raise ConfigError(
            f"model.conv_batch_split: {pieces} pieces do not divide the batch of {per_device} on each device"
        )


CLASS_NAMES = {
    "mnist": [str(d) for d in range(10)],
    "fashion_mnist": [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ],
}


class _StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps."""

    def __init__(self):
        self.received = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _init_params_from(init_from: str, state: TrainState) -> TrainState:
    """Params from a checkpoint directory/workdir or a W&B `model` artifact."""
    path = init_from
    if not os.path.exists(init_from) and ":" in init_from and "/" in init_from:
        path = _download_artifact(init_from)
    restored, _ = checkpoints_lib.restore_from_directory(path, state)
    return state.replace(params=restored.params)


def _download_artifact(reference: str) -> str:
    from mnist_flax.errors import CheckpointError

    try:
        import wandb

        return wandb.Api().artifact(reference, type="model").download()
    except Exception as e:
        raise CheckpointError(
            f"init_from: cannot fetch W&B artifact {reference}: {str(e).splitlines()[0][:200]}"
        ) from None


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, overrides: dict | None = None, config_changes: dict | None = None
) -> dict:
    """Trains and evaluates; resumes from the workdir's latest checkpoint if there is one.

    Args:
      config: the resolved config.
      workdir: where the run writes (created if needed).
      overrides: the command-line overrides, as given, for the record.
      config_changes: how `config` differs from its config file (config_diff.diff), for the record.

    Returns:
      The final report: best validation metrics, test metrics and file paths.
    """
    config_utils.validate(config)
    distributed.initialize(config.distributed)
    workdir = workdir_lib.prepare_workdir(workdir)
    lock = workdir_lib.WorkdirLock(workdir) if distributed.is_primary() else contextlib.nullcontext()
    with lock, _StopSignal() as stop:
        return _run(config, workdir, overrides or {}, config_changes or {}, stop)


def _run(config, workdir, overrides, config_changes, stop) -> dict:
    clock = progress.Stopwatch()
    primary = distributed.is_primary()
    say = (lambda text: print(text, flush=True)) if primary else (lambda text: None)
    mesh = distributed.make_mesh()
    datasets = input_pipeline.load_datasets(config.data)
    check_batch_sizes(config, datasets, jax.device_count())
    steps_per_epoch = len(datasets.train) // config.batch_size
    total_steps = steps_per_epoch * config.num_epochs
    steps_per_call = resolve_steps_per_call(config.train)
    scan_unroll = resolve_scan_unroll(config.train, steps_per_call)

    model = models.create_model(config.model, per_device_batch=config.batch_size // jax.device_count())
    schedule = make_schedule(config.optimizer, steps_per_epoch, config.num_epochs)
    state = create_train_state(model, make_optimizer(config.optimizer, schedule), config.seed)
    state = distributed.put_replicated(state, mesh)

    checkpoints = None
    if config.checkpoint.enabled:
        checkpoints = checkpoints_lib.Checkpoints(os.path.join(workdir, "checkpoints"), config.checkpoint)
    resumed_from = checkpoints.latest_step() if checkpoints else None
    best = {"val_accuracy": -1.0, "step": None}
    if resumed_from is not None:
        state, meta = checkpoints.restore(resumed_from, state)
        best = meta.get("best", best)
    elif config.init_from:
        state = _init_params_from(config.init_from, state)
    elif config.eval_only:
        raise ConfigError("eval_only: set init_from to the checkpoint to evaluate")

    # TensorFlow (clu's writers) and W&B load only now, after the data and checkpoint checks.
    from mnist_flax import tracking, writers

    if primary:
        workdir_lib.write_json(os.path.join(workdir, "config.json"), config.to_dict())
        workdir_lib.write_json(os.path.join(workdir, "config_changes.json"), config_changes)
    tracker = tracking.Tracker.start(config, workdir, overrides, config_changes, is_primary=primary)
    writer = writers.create_writer(workdir, tensorboard=config.tensorboard, wandb_run=tracker.run, is_primary=primary)
    if resumed_from is None:
        writer.write_hparams(config_utils.flatten(config))

    train = input_pipeline.to_device(datasets.train, mesh=mesh)
    validation = input_pipeline.to_device(datasets.validation, config.eval_batch_size, mesh=mesh)
    test = input_pipeline.to_device(datasets.test, config.eval_batch_size, mesh=mesh)
    data_key = np.asarray(jax.random.PRNGKey(config.seed + 1))
    train_step = make_train_step(
        config.loss, steps_per_epoch, steps_per_call, scan_unroll, mesh, augment_config=config.data.get("augment")
    )
    predict = make_predict(models.for_inference(model).apply, config.eval_batch_size, mesh)
    order_fn = jax.jit(input_pipeline.epoch_order, static_argnums=(2, 3), out_shardings=distributed.replicated(mesh))

    step = int(distributed.to_host(state.step))
    # Several CPU devices in one process (simulated, or jax_num_cpu_devices) share one thread pool: with many
    # calls in flight, a step's all-reduce can wait forever for devices whose threads run later calls. Waiting
    # for each call costs little on CPU and keeps the collectives in step.
    sync_each_call = SYNC_CPU_DEVICES and jax.default_backend() == "cpu" and jax.local_device_count() > 1
    # A copy: state's buffers are donated to the first step.
    best_params = jax.tree.map(jnp.copy, state.params)
    if best["step"] is not None and checkpoints and best["step"] != step and best["step"] in checkpoints.all_steps():
        best_params = checkpoints.restore(best["step"], state)[0].params
    say(
        f"{datasets.name} from {datasets.source}: train {len(datasets.train)}, validation "
        f"{len(datasets.validation)}, test {len(datasets.test)}; {config.model.name} with "
        f"{models.count_params(state.params):,} parameters; {jax.default_backend()} x{jax.device_count()}"
        f"{f' in {jax.process_count()} processes' if jax.process_count() > 1 else ''}; "
        f"{steps_per_epoch} steps/epoch (last partial batch dropped), {steps_per_call} step(s)/call"
        + (f"; conv {model.conv_impl} on {model.conv_batch_split} piece(s)" if config.model.name == "cnn" else "")
        + (f"; resumed at step {step}" if resumed_from is not None else "")
    )

    # Compile ahead of time, so compile time is reported apart from step time.
    with CompileCounter() as compiles:
        carry = (state, *distributed.put_replicated((metrics.TrainMetrics.empty(), empty_guard()), mesh))
        order = order_fn(data_key, 0, len(datasets.train), config.batch_size)
        train_step = train_step.lower(carry, train.images, train.labels, order).compile()
        predict_val = predict.lower(state.params, validation.images, 0).compile()
        predict_test = predict.lower(state.params, test.images, 0).compile()
    compile_seconds = compiles.seconds
    writer.write_scalars(step, {"compile_seconds": compile_seconds})
    say(f"compiled in {compile_seconds:.1f} s")

    bar = progress.Progress(
        total_steps, steps_per_epoch, step, config.batch_size, stream=None if primary else open(os.devnull, "w")
    )
    exit_code = 0
    # Compilations during each epoch: the first may compile a few small eager ops, later ones none.
    loop_compiles, compiles_per_epoch = CompileCounter().__enter__(), []
    try:
        lap, lap_step = progress.Stopwatch(), step
        first_epoch = config.num_epochs if config.eval_only else step // steps_per_epoch
        if config.eval_only:
            _, val_report = evaluate(predict_val, state.params, validation, config.eval_batch_size)
            best = {"val_accuracy": val_report["accuracy"], "step": step, "report": val_report}
        for epoch in range(first_epoch, config.num_epochs):
            order = order_fn(data_key, epoch, len(datasets.train), config.batch_size)
            epoch_end = (epoch + 1) * steps_per_epoch
            while step < epoch_end:
                carry = train_step(carry, train.images, train.labels, order)
                if sync_each_call:
                    carry = jax.block_until_ready(carry)
                previous, step = step, min(step + steps_per_call, epoch_end)
                if step // config.log_every_steps > previous // config.log_every_steps or step == epoch_end:
                    carry = _log_train(carry, step, lap, lap_step, schedule, config, writer, bar)
                    lap_step = step
                if stop.received:
                    raise Preempted(f"{stop.received} at step {step}")
            state = carry[0]
            epoch_metrics = {"epoch": epoch + 1}
            if (epoch + 1) % config.eval_every_epochs == 0 or epoch + 1 == config.num_epochs:
                eval_start = time.perf_counter()
                _, val_report = evaluate(predict_val, state.params, validation, config.eval_batch_size)
                scalars = metrics.scalar_metrics(val_report, "val")
                scalars["val/eval_seconds"] = time.perf_counter() - eval_start
                writer.write_scalars(step, scalars)
                epoch_metrics["val_accuracy"] = val_report["accuracy"]
                # ">=": among equal accuracies the latest is best, as orbax's BestN keeps it.
                if val_report["accuracy"] >= best["val_accuracy"]:
                    best = {"val_accuracy": val_report["accuracy"], "step": step, "report": val_report}
                    best_params = jax.tree.map(jnp.copy, state.params)
                bar.message(
                    f"epoch {epoch + 1}: val loss {val_report['loss']:.4f} acc {val_report['accuracy']:.4f} "
                    f"f1 {val_report['f1_macro']:.4f} auroc {val_report['auroc_macro']:.4f}"
                )
            if checkpoints and ((epoch + 1) % config.checkpoint.every_epochs == 0 or epoch + 1 == config.num_epochs):
                _save(checkpoints, state, step, epoch + 1, best, epoch_metrics, config, tracker)
            compiles_per_epoch.append(loop_compiles.count - sum(compiles_per_epoch))
            lap, lap_step = progress.Stopwatch(), step
    except MnistFlaxError as e:  # preempted, non-finite loss, a failed checkpoint: stop cleanly
        bar.close()
        # Clean-up can fail too (a full disk fails orbax's and W&B's background writers); the error that
        # stopped the run is the one to report, so theirs are kept quiet.
        with checkpoints_lib.quiet_background_errors():
            if checkpoints and isinstance(e, Preempted):
                _save(checkpoints, carry[0], step, step // steps_per_epoch, best, None, config, tracker)
            writer.write_texts(step, {"stopped": str(e)})
            writer.flush()
            if checkpoints:
                with contextlib.suppress(checkpoints_lib.CheckpointError):
                    checkpoints.close()
            tracker.set_summary({"stopped": str(e)})
            tracker.finish(exit_code=getattr(e, "exit_code", 1))
        raise
    finally:
        loop_compiles.__exit__()
    bar.close()
    train_seconds = clock.lap()

    # The final report is for the model selected on validation accuracy.
    test_log_probs, test_report = evaluate(predict_test, best_params, test, config.eval_batch_size)
    test_labels = np.asarray(datasets.test.labels)
    writer.write_scalars(step, metrics.scalar_metrics(test_report, "test"))
    predictions_path = os.path.join(workdir, "predictions.csv")
    if primary:
        workdir_lib.write_predictions(predictions_path, test_log_probs, test_labels)
    report = {
        "best_validation": {k: v for k, v in best.items() if k != "report"},
        "validation": best.get("report"),
        "test": test_report,
        "steps": step,
        "compile_seconds": compile_seconds,
        "compilations": {"ahead_of_time": compiles.count, "per_epoch": compiles_per_epoch},
        "seconds": train_seconds,
        "data": {"name": datasets.name, "source": datasets.source},
        "git": tracker.git,
        "wandb": {"mode": tracker.mode, "run_id": tracker.run_id},
    }
    if primary:
        workdir_lib.write_json(os.path.join(workdir, "final_metrics.json"), report)
    tracker.log_results(
        test_report,
        test_log_probs,
        test_labels,
        datasets.test.images,
        predictions_path,
        config.wandb.log_misclassified,
        CLASS_NAMES[datasets.name],
    )
    tracker.set_summary(
        {
            "best_val_accuracy": best["val_accuracy"],
            "test_accuracy": test_report["accuracy"],
            "test_f1_macro": test_report["f1_macro"],
            "test_auroc_macro": test_report["auroc_macro"],
        }
    )
    writer.flush()
    writer.close()
    if checkpoints:
        checkpoints.close()
    sync_hint = tracker.sync_hint()
    tracker.finish(exit_code=exit_code)
    if primary:
        _print_summary(report, workdir, sync_hint)
    return report


def _log_train(carry, step, lap, lap_step, schedule, config, writer, bar):
    """Pulls the train metrics off the device (one sync), writes them, resets them."""
    state, train_metrics, guard = carry
    computed = {k: float(distributed.to_host(v)) for k, v in train_metrics.compute().items()}
    count, first = int(distributed.to_host(guard["count"])), int(distributed.to_host(guard["first_step"]))
    if count and config.train.on_nonfinite == "stop":
        raise NonFiniteLossError(
            f"loss became non-finite at step {first}; the update was not applied and the run stopped "
            "(lower optimizer.learning_rate, set optimizer.grad_clip_norm, or train.on_nonfinite=skip)"
        )
    seconds = lap.lap()
    images_per_second = (step - lap_step) * config.batch_size / max(seconds, 1e-9)
    scalars = {
        "train/loss": computed["loss"],
        "train/accuracy": computed["accuracy"],
        "train/learning_rate": float(schedule(step)),
        "train/images_per_second": images_per_second,
        "train/nonfinite_steps": count,
    }
    writer.write_scalars(step, scalars)
    bar.update(step, scalars["train/loss"], scalars["train/accuracy"], images_per_second)
    return state, jax.tree.map(jnp.zeros_like, train_metrics), guard


def _save(checkpoints, state, step, epoch, best, epoch_metrics, config, tracker):
    best_meta = {k: v for k, v in best.items() if k != "report"}
    meta = {
        "step": step,
        "epoch": epoch,
        "best": best_meta,
        "config": config.to_dict(),
        "git": tracker.git,
        "wandb_run_id": tracker.run_id,
        "metrics": epoch_metrics,
    }
    has_val = bool(epoch_metrics and "val_accuracy" in epoch_metrics)
    if step in checkpoints.all_steps():
        return
    checkpoints.save(
        step, state, meta, metrics={"val_accuracy": epoch_metrics["val_accuracy"]} if has_val else None, force=True
    )
    # Every process waits (orbax's wait is collective); the primary uploads.
    if config.checkpoint.upload_to_wandb and config.wandb.mode != "disabled":
        checkpoints.wait()
    if config.checkpoint.upload_to_wandb and tracker.run is not None:
        aliases = ["latest"] + (["best"] if best.get("step") == step else [])
        tracker.log_checkpoint(
            os.path.join(checkpoints.directory, str(step)),
            step,
            aliases,
            {
                "step": step,
                "epoch": epoch,
                "metrics": epoch_metrics,
                "git": tracker.git,
                "config": config_utils.flatten(config),
            },
        )


def _print_summary(report: dict, workdir: str, sync_hint: str | None) -> None:
    test = report["test"]
    lines = [
        "",
        "=" * 60,
        f"done: {report['steps']} steps in {report['seconds']:.1f} s (compile {report['compile_seconds']:.1f} s)",
        f"best validation accuracy {report['best_validation']['val_accuracy']:.4f} "
        f"(step {report['best_validation']['step']})",
        f"test: accuracy {test['accuracy']:.4f}  loss {test['loss']:.4f}  f1 {test['f1_macro']:.4f}  "
        f"precision {test['precision_macro']:.4f}  recall {test['recall_macro']:.4f}  auroc {test['auroc_macro']:.4f}",
        f"workdir: {workdir}",
        "  config.json, metrics.jsonl, final_metrics.json, predictions.csv, checkpoints/, tensorboard/",
        f"W&B: {report['wandb']['mode']}" + (f" run {report['wandb']['run_id']}" if report["wandb"]["run_id"] else ""),
    ]
    if sync_hint:
        lines.append(f"  upload later with: {sync_hint}")
    lines.append("=" * 60)
    print("\n".join(lines), flush=True)
