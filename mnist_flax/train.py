"""The training loop: `train_and_evaluate` is setup -> train -> finish, and one way out.

config (resolved once) -> data -> model + optimizer -> resume -> compile ->
epochs of fused train calls, with the periodic actions (log, evaluate, save;
`periodic.py`) deciding what else happens after each call -> test report.
Preemption, a non-finite stop and normal completion all leave through
`shutdown`. The numerics are in `steps.py`; the loop writes through clu's
MetricWriter interface and never knows which sinks are attached.
"""

import contextlib
import dataclasses
import importlib
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mnist_flax import checkpoints as checkpoints_lib
from mnist_flax import (
    compile_cache,
    config_utils,
    distributed,
    drift,
    input_pipeline,
    metrics,
    models,
    periodic,
    progress,
    provenance,
    steps,
)
from mnist_flax import resolve as resolve_lib
from mnist_flax import workdir as workdir_lib
from mnist_flax.errors import ConfigError, MnistFlaxError, Preempted

SYNC_CPU_DEVICES = os.environ.get("MNIST_FLAX_NO_CPU_SYNC") != "1"  # off only to show the deadlock in a test
STOPPED_FILE = "stopped.json"


@dataclasses.dataclass
class Training:
    """Everything the loop works with: set up once, then advanced call by call."""

    config: ml_collections.ConfigDict
    workdir: str
    primary: bool
    started: float  # time.perf_counter() when setup began: the report's seconds count from here
    datasets: input_pipeline.Datasets
    device_data: dict[str, input_pipeline.DeviceSplit]  # train, validation, test, resident on the devices
    steps_per_epoch: int
    tracker: Any  # tracking.Tracker
    writer: Any  # clu MetricWriter
    checkpoints: checkpoints_lib.Checkpoints | None
    carry: tuple  # (TrainState, TrainMetrics, non-finite guard), donated to each call
    step: int
    best: dict  # {"val_accuracy", "step", "report"} of the best validation so far
    best_params: Any
    resumed_from: int | None
    provenance: dict  # {"git", "data", "environment"}: what produced the run
    config_history: list  # [{"step", "changed", "previous_config"}]: configs changed on resume
    compiled: dict = dataclasses.field(default_factory=dict)  # train_step, predict_val, predict_test, order
    actions: list = dataclasses.field(default_factory=list)  # periodic.PeriodicAction, in order
    checkpointer: periodic.Checkpointer | None = None
    evaluator: periodic.Evaluator | None = None
    bar: progress.Progress | None = None
    clock: progress.Throughput | None = None
    compile_stats: dict = dataclasses.field(default_factory=dict)
    last_validation: tuple | None = None  # (step, report)
    data_key: Any = None

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.config.num_epochs


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    overrides: dict | None = None,
    config_changes: dict | None = None,
    on_validation: tuple = (),
) -> dict:
    """Trains and evaluates; resumes from the workdir's latest checkpoint if there is one.

    Args:
      config: the config as the file and the overrides give it ("auto" fields are resolved here, once).
      workdir: where the run writes (created if needed).
      overrides: the command-line overrides, as given, for the record.
      config_changes: how `config` differs from its config file (config_diff.diff), for the record.
      on_validation: callbacks fn(step, report) called after each validation (a sweep's pruning hooks in here;
        an exception they raise leaves through the same shutdown as any other stop).

    Returns:
      The final report: best validation metrics, test metrics and file paths.
    """
    config_utils.validate(config)
    distributed.initialize(config.distributed)  # before any other JAX call
    compile_cache.enable(config.compile_cache)  # before anything compiles
    resolved = resolve_lib.resolve(config)
    workdir = workdir_lib.prepare_workdir(workdir)
    lock = workdir_lib.WorkdirLock(workdir) if distributed.is_primary() else contextlib.nullcontext()
    with lock, _StopSignal() as stop:
        training = setup(resolved, config, workdir, overrides or {}, config_changes or {}, on_validation)
        try:
            train(training, stop)
            report = finish(training)
            sync_hint = training.tracker.sync_hint()
            shutdown(training)
        except MnistFlaxError as e:  # preempted, non-finite loss, a failed checkpoint: stop cleanly
            shutdown(training, e)
            raise
        except BaseException:  # a bug: keep its traceback, but let W&B go before the interpreter exits
            training.tracker.finish(exit_code=1)
            raise
    if training.primary:
        progress.print_summary(report, workdir, sync_hint)
    return report


# ---------------------------------------------------------------- setup


def setup(config, requested, workdir: str, overrides: dict, config_changes: dict, on_validation=()) -> Training:
    """Data, model, state (resumed or fresh), tracking and the compiled steps: a Training ready to run."""
    started = time.perf_counter()
    mesh = distributed.make_mesh()
    datasets = input_pipeline.load_datasets(config.data)
    if config.batch_size > len(datasets.train):
        raise ConfigError(
            f"batch_size: {config.batch_size} is larger than the training split ({len(datasets.train)} examples)"
        )
    steps_per_epoch = len(datasets.train) // config.batch_size
    record = {"git": provenance.git_info(), "data": provenance.data_fingerprint(datasets)}
    record["environment"] = provenance.environment()
    checkpoints, resumed_from, config_history = _open_checkpoints(config, workdir, record)
    preload = _preload_records(config)  # the data and the resume are checked: the records will be needed
    model = models.create_model(config.model)
    schedule = steps.make_schedule(config.optimizer, steps_per_epoch, config.num_epochs)
    state = steps.create_train_state(model, steps.make_optimizer(config.optimizer, schedule), config.seed)
    state = distributed.put_replicated(state, mesh)
    state, best, best_params = _restore(config, checkpoints, resumed_from, state)
    device_data = {
        "train": input_pipeline.to_device(datasets.train, mesh=mesh),
        "validation": input_pipeline.to_device(datasets.validation, config.eval_batch_size, mesh=mesh),
        "test": input_pipeline.to_device(datasets.test, config.eval_batch_size, mesh=mesh),
    }
    carry = (state, *distributed.put_replicated((metrics.TrainMetrics.empty(), steps.empty_guard()), mesh))
    training = Training(
        config=config,
        workdir=workdir,
        primary=distributed.is_primary(),
        started=started,
        datasets=datasets,
        device_data=device_data,
        steps_per_epoch=steps_per_epoch,
        tracker=None,  # started after the compilation, below
        writer=None,
        checkpoints=checkpoints,
        carry=carry,
        step=int(distributed.to_host(state.step)),
        best=best,
        best_params=best_params,
        resumed_from=resumed_from,
        provenance=record,
        config_history=config_history,
    )
    _describe(training, model)
    _compile(training, model, mesh)
    preload.join()
    training.tracker, training.writer = _start_records(
        config, requested, workdir, overrides, config_changes, record, config_history, resumed_from
    )
    training.writer.write_scalars(training.step, {"compile_seconds": training.compile_stats["seconds"]})
    _build_actions(training, schedule, on_validation)
    return training


def _preload_records(config) -> threading.Thread:
    """Starts importing the record keepers' libraries on a thread; `_start_records` then finds them loaded.

    TensorFlow (clu's writers) and W&B take seconds to import. On a thread those seconds overlap the state's
    initialisation and the compilation, which run in XLA without Python's lock. An import that fails here is left
    to fail again, with its own message, where `_start_records` imports the module. Not a daemon: a run that stops
    with an error before then exits once the import is done, not in the middle of it.
    """
    names = ["mnist_flax.writers"] + (["wandb"] if config.wandb.mode != "disabled" else [])

    def load():
        for name in names:
            try:
                importlib.import_module(name)
            except BaseException:  # reported by the import in _start_records
                return

    thread = threading.Thread(target=load, name="mnist_flax-preload")
    thread.start()
    return thread


def _open_checkpoints(config, workdir: str, record: dict):
    """(checkpoints or None, the step to resume from or None, the config history), the resume checked."""
    if not config.checkpoint.enabled:
        return None, None, []
    checkpoints = checkpoints_lib.Checkpoints(os.path.join(workdir, "checkpoints"), config.checkpoint)
    resumed_from = checkpoints.latest_step()
    if resumed_from is None:
        return checkpoints, None, []
    # Before the state is restored: a change of model would otherwise fail there, less clearly.
    return (
        checkpoints,
        resumed_from,
        drift.check_resume(config, checkpoints.read_meta(resumed_from), record, resumed_from, checkpoints.directory),
    )


def _start_records(config, requested, workdir, overrides, config_changes, record, config_history, resumed_from):
    """(tracker, writer): the workdir's record files, the W&B run and the metric writers."""
    # TensorFlow (clu's writers) and W&B: loaded by `_preload_records` after the data and checkpoint checks.
    from mnist_flax import tracking, writers

    primary = distributed.is_primary()
    if primary:
        files = {
            "config.json": config.to_dict(),
            "config_requested.json": requested.to_dict(),
            "config_changes.json": config_changes,
            "provenance.json": record,
        }
        if config_history:
            files["config_history.json"] = config_history
        for name, payload in files.items():
            workdir_lib.write_json(os.path.join(workdir, name), payload)
    # W&B keeps its own list of the installed packages (its requirements.txt file); the config keeps the verdict.
    environment = {k: v for k, v in record["environment"].items() if k != "packages"}
    extra = {"provenance": {**record, "environment": environment}, "config_history": config_history}
    tracker = tracking.Tracker.start(
        config, workdir, record["git"], overrides, config_changes, primary, requested.to_dict(), extra
    )
    writer = writers.create_writer(workdir, tensorboard=config.tensorboard, tracker=tracker, is_primary=primary)
    if resumed_from is None:
        writer.write_hparams(config_utils.flatten(config))
    return tracker, writer


def _restore(config, checkpoints, resumed_from: int | None, state):
    """(state, best, best_params): where the run starts."""
    best = {"val_accuracy": -1.0, "step": None}
    # 1. This run's own latest checkpoint: a resumed run continues exactly where it stopped.
    if resumed_from is not None:
        state, meta = checkpoints.restore(resumed_from, state)
        best = meta.get("best", best)
    # 2. Else the parameters of another run (`init_from`): a new run that starts from them.
    elif config.init_from:
        path = config.init_from
        if not os.path.exists(path) and ":" in path and "/" in path:
            from mnist_flax import tracking

            path = tracking.download_model_artifact(path)
        restored, _ = checkpoints_lib.restore_from_directory(path, state)
        state = state.replace(params=restored.params)
    # 3. Else fresh parameters from the seed.
    elif config.eval_only:
        raise ConfigError("eval_only: set init_from to the checkpoint to evaluate")
    best_params = jax.tree.map(jnp.copy, state.params)  # a copy: state's buffers are donated to the first call
    step = int(distributed.to_host(state.step))
    if best["step"] is not None and best["step"] != step and best["step"] in checkpoints.all_steps():
        best_params = checkpoints.restore(best["step"], state)[0].params
    return state, best, best_params


def _compile(training: Training, model, mesh) -> None:
    """Compiles the train and predict steps ahead of time (compile time is reported apart)."""
    config, data = training.config, training.device_data
    train_step = steps.make_train_step(
        config.loss,
        training.steps_per_epoch,
        config.train.steps_per_call,
        config.train.scan_unroll,
        mesh,
        augment_config=config.data.get("augment"),
    )
    predict = steps.make_predict(models.for_inference(model).apply, config.eval_batch_size, mesh)
    order_fn = jax.jit(input_pipeline.epoch_order, static_argnums=(2, 3), out_shardings=distributed.replicated(mesh))
    training.data_key = np.asarray(jax.random.PRNGKey(config.seed + 1))
    params = training.carry[0].params
    with steps.CompileCounter() as compiles:
        order = order_fn(training.data_key, 0, len(training.datasets.train), config.batch_size)
        training.compiled = {
            "train_step": train_step.lower(training.carry, data["train"].images, data["train"].labels, order).compile(),
            "predict_val": predict.lower(params, data["validation"].images, 0).compile(),
            "predict_test": predict.lower(params, data["test"].images, 0).compile(),
            "order": order_fn,
        }
    training.compile_stats = {
        "seconds": compiles.seconds,
        "ahead_of_time": compiles.count,
        "from_cache": compiles.cached,  # of those, loaded from the persistent compilation cache (compile_cache)
        "per_epoch": [],
    }
    cached = f" ({compiles.cached} of {compiles.count} from the compilation cache)" if compiles.cached else ""
    _say(training, f"compiled in {compiles.seconds:.1f} s{cached}")


def _build_actions(training: Training, schedule, on_validation=()) -> None:
    """The periodic actions, in the order they run after a call: log, evaluate (then `on_validation`), save."""
    config = training.config
    rules = periodic.rules(config, training.steps_per_epoch)
    training.evaluator = periodic.Evaluator(
        rules["evaluate"],
        training.compiled["predict_val"],
        training.device_data["validation"],
        config.eval_batch_size,
        callbacks=on_validation,
    )
    training.actions = [periodic.TrainReporter(rules["log"], schedule, config.train.on_nonfinite), training.evaluator]
    if training.checkpoints:
        training.checkpointer = periodic.Checkpointer(
            rules["checkpoint"], training.checkpoints, config, training.tracker
        )
        training.actions.append(training.checkpointer)
    training.bar = progress.Progress(
        training.total_steps,
        training.steps_per_epoch,
        training.step,
        config.batch_size,
        stream=None if training.primary else open(os.devnull, "w"),
    )
    training.clock = progress.Throughput(config.batch_size, training.step)


# ---------------------------------------------------------------- train


def train(training: Training, stop: "_StopSignal") -> None:
    """Epochs of compiled calls from the current step; after each call the actions do what is due."""
    config, data = training.config, training.device_data["train"]
    if config.eval_only:
        training.evaluator.validate(training, training.step)
        return
    # Several CPU devices in one process (simulated, or jax_num_cpu_devices) share one thread pool: with many
    # calls in flight, a step's all-reduce can wait forever for devices whose threads run later calls. Waiting
    # for each call costs little on CPU and keeps the collectives in step.
    sync_each_call = SYNC_CPU_DEVICES and jax.default_backend() == "cpu" and jax.local_device_count() > 1
    # A SIGTERM reaches each process between different calls (each host runs ahead of its devices on its own):
    # the processes agree after every call, so that all stop at the same step and save it together, instead
    # of one saving while the others wait for it in the next step's all-reduce.
    agree = jax.process_count() > 1
    train_step, order_fn = training.compiled["train_step"], training.compiled["order"]
    # Compilations during each epoch: the first may compile a few small eager ops, later ones none.
    with steps.CompileCounter() as compiles:
        for epoch in range(training.step // training.steps_per_epoch, config.num_epochs):
            order = order_fn(training.data_key, epoch, len(training.datasets.train), config.batch_size)
            training.clock.restart(training.step)
            epoch_end = (epoch + 1) * training.steps_per_epoch
            for previous, step in periodic.calls(training.step, epoch_end, config.train.steps_per_call):
                training.carry = train_step(training.carry, data.images, data.labels, order)
                if sync_each_call:
                    training.carry = jax.block_until_ready(training.carry)
                training.step = step
                for action in training.actions:
                    action.maybe_run(training, previous, step)
                if distributed.any_process(stop.received is not None) if agree else stop.received:
                    raise Preempted(f"{stop.received or 'SIGTERM on another process'} at step {step}")
            per_epoch = training.compile_stats["per_epoch"]
            per_epoch.append(compiles.count - sum(per_epoch))
    training.bar.close()


# ---------------------------------------------------------------- finish and shut down


def finish(training: Training) -> dict:
    """The test report of the model selected on validation accuracy, written to every record."""
    config, workdir, datasets = training.config, training.workdir, training.datasets
    seconds = time.perf_counter() - training.started
    predict_test, test = training.compiled["predict_test"], training.device_data["test"]
    test_log_probs, test_report = steps.evaluate(predict_test, training.best_params, test, config.eval_batch_size)
    test_labels = np.asarray(datasets.test.labels)
    training.writer.write_scalars(training.step, metrics.scalar_metrics(test_report, "test"))
    predictions_path = os.path.join(workdir, "predictions.csv")
    tracker, best = training.tracker, training.best
    report = {
        "best_validation": {k: v for k, v in best.items() if k != "report"},
        "validation": best.get("report"),
        "test": test_report,
        "steps": training.step,
        "compile_seconds": training.compile_stats["seconds"],
        "compilations": {k: v for k, v in training.compile_stats.items() if k != "seconds"},
        "seconds": seconds,
        "data": {"name": datasets.name, "source": datasets.source},
        "git": tracker.git,
        "provenance": {k: v for k, v in training.provenance.items() if k != "git"},
        "wandb": {"mode": tracker.mode, "run_id": tracker.run_id},
    }
    if training.primary:
        workdir_lib.write_predictions(predictions_path, test_log_probs, test_labels)
        workdir_lib.write_json(os.path.join(workdir, "final_metrics.json"), report)
        with contextlib.suppress(FileNotFoundError):  # an earlier start of this run stopped; this one finished
            os.remove(os.path.join(workdir, STOPPED_FILE))
    tracker.log_results(
        test_report, test_log_probs, test_labels, datasets.test.images, predictions_path,
        config.wandb.log_misclassified, input_pipeline.CLASS_NAMES[datasets.name],
    )  # fmt: skip
    tracker.set_summary(
        {
            "best_val_accuracy": best["val_accuracy"],
            "test_accuracy": test_report["accuracy"],
            "test_f1_macro": test_report["f1_macro"],
            "test_auroc_macro": test_report["auroc_macro"],
        }
    )
    return report


def shutdown(training: Training, error: MnistFlaxError | None = None) -> None:
    """The one way out: save if preempted, record why a run stopped, close the checkpoints and writers, finish W&B.

    Safe to call again after a failed first try: each resource is let go once it is closed.
    """
    if training.bar:
        training.bar.close()
    # Clean-up can fail too (a full disk fails orbax's and W&B's background writers); the error that
    # stopped the run is the one to report, so theirs are kept quiet then.
    quiet = checkpoints_lib.quiet_background_errors() if error else contextlib.nullcontext()
    with quiet:
        if error is not None:
            if isinstance(error, Preempted):
                training.tracker.mark_preempting()
                if training.checkpointer:
                    training.checkpointer.save(training, training.step)
            _record_stop(training, error)
        if training.checkpoints:
            checkpoints, training.checkpoints = training.checkpoints, None
            with contextlib.suppress(checkpoints_lib.CheckpointError) if error else contextlib.nullcontext():
                checkpoints.close()  # waits for the last save: a full disk shows here
        if training.writer:
            writer, training.writer = training.writer, None
            writer.flush()
            writer.close()
        training.tracker.finish(exit_code=getattr(error, "exit_code", 1) if error else 0)


def _record_stop(training: Training, error: MnistFlaxError) -> None:
    """Why and where the run stopped: the writers, W&B's summary and `stopped.json`."""
    exit_code = getattr(error, "exit_code", 1)
    if training.writer:
        training.writer.write_texts(training.step, {"stopped": str(error)})
    training.tracker.set_summary({"stopped": str(error)})
    if training.primary:
        record = {
            "status": getattr(error, "status", "failed"),  # "preempted", "pruned" (by a sweep) or "failed"
            "reason": str(error),
            "step": training.step,
            "exit_code": exit_code,
        }
        with contextlib.suppress(OSError):  # a full disk may be why it stopped: that error is the one to report
            workdir_lib.write_json(os.path.join(training.workdir, STOPPED_FILE), record)


# ---------------------------------------------------------------- what the terminal shows


class _StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop checks between calls."""

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


def _say(training: Training, text: str) -> None:
    if training.primary:
        print(text, flush=True)


def _describe(training: Training, model) -> None:
    config, datasets = training.config, training.datasets
    fallback = distributed.accelerator_fallback()
    if fallback:
        _say(training, fallback)
    _say(
        training,
        f"{datasets.name} from {datasets.source}: train {len(datasets.train)}, validation "
        f"{len(datasets.validation)}, test {len(datasets.test)}; {config.model.name} with "
        f"{models.count_params(training.carry[0].params):,} parameters; {jax.default_backend()} x{jax.device_count()}"
        f"{f' in {jax.process_count()} processes' if jax.process_count() > 1 else ''}; "
        f"{training.steps_per_epoch} steps/epoch (last partial batch dropped), "
        f"{config.train.steps_per_call} step(s)/call"
        + (f"; conv {model.conv_impl} on {model.conv_batch_split} piece(s)" if config.model.name == "cnn" else "")
        + (f"; resumed at step {training.step}" if training.resumed_from is not None else ""),
    )
