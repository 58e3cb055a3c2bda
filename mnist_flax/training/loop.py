"""The training loop: `train_and_evaluate` is setup -> train -> finish, and one way out.

config (resolved once) -> data -> model + optimizer -> resume -> compile ->
epochs of fused train calls, with the periodic actions (log, evaluate, save;
`periodic.py`) deciding what else happens after each call -> test report.
Preemption, a non-finite stop and normal completion all leave through
`shutdown`. The numerics are in `steps.py`; the loop writes through one
MetricWriter (clu's interface, `tracking/writers.py`) and never knows which
sinks are attached.
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

from mnist_flax import layout, models
from mnist_flax.config import schema
from mnist_flax.errors import ConfigError, MnistFlaxError, Preempted
from mnist_flax.records import files, provenance
from mnist_flax.training import (
    checkpointing,
    compile_cache,
    distributed,
    drift,
    input_pipeline,
    metrics,
    periodic,
    progress,
    resolution,
    steps,
)

SYNC_CPU_DEVICES = os.environ.get("MNIST_FLAX_NO_CPU_SYNC") != "1"  # off only to show the deadlock in a test


@dataclasses.dataclass
class Setup:
    """What is set up once, before the first step: the config, the data, the compiled steps, the sinks, the
    actions. The loop reads it; only `shutdown` lets its resources go (each once)."""

    config: ml_collections.ConfigDict
    workdir: str
    primary: bool
    started: float  # time.perf_counter() when setup began: the report's seconds count from here
    datasets: input_pipeline.Datasets
    device_data: dict[str, input_pipeline.DeviceSplit]  # train, validation, test, resident on the devices
    steps_per_epoch: int
    resumed_from: int | None
    provenance: dict  # {"git", "data", "environment"}: what produced the run
    config_history: list  # [{"step", "changed", "previous_config"}]: configs changed on resume
    checkpoints: checkpointing.Checkpoints | None
    flat: dict  # the resolved config's flat form ("model.name": ...): made once, for every record
    compiled: dict = dataclasses.field(default_factory=dict)  # train_step, predict_val, predict_test, order
    data_key: Any = None
    compile_stats: dict = dataclasses.field(default_factory=dict)
    tracker: Any = None  # wandb_run.Tracker
    writer: Any = None  # clu MetricWriter
    bar: progress.Progress | None = None
    clock: progress.Throughput | None = None
    reporter: periodic.TrainReporter | None = None
    evaluator: periodic.Evaluator | None = None
    checkpointer: periodic.Checkpointer | None = None

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.config.num_epochs


@dataclasses.dataclass
class LoopState:
    """What the loop advances, call by call."""

    carry: tuple  # (TrainState, TrainMetrics, non-finite guard), donated to each call
    step: int
    best: dict  # {"val_accuracy", "step", "report"} of the best validation so far
    best_variables: Any  # the model's variables (params and any other collections) at the best validation
    last_validation: periodic.Validation | None = None


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    overrides: dict | None = None,
    config_changes: dict | None = None,
    on_validation: tuple = (),
) -> dict:
    """Trains and evaluates; resumes from the workdir's latest checkpoint if there is one.

    Args:
      config: the config as the file and the overrides give it: validated here, then resolved once ("auto"
        fields decided); what follows reads the one resolved config and its flat form, neither made again.
      workdir: where the run writes (created if needed).
      overrides: the command-line overrides, as given, for the record.
      config_changes: how `config` differs from its config file (commands.diff.diff), for the record.
      on_validation: callbacks fn(step, report) called after each validation (a sweep's pruning hooks in here;
        an exception they raise leaves through the same shutdown as any other stop).

    Returns:
      The final report: best validation metrics, test metrics and file paths.
    """
    schema.validate(config)
    distributed.initialize(config.distributed)  # before any other JAX call
    compile_cache.enable(config.compile_cache)  # before anything compiles
    # The data first: the model's input and output sizes (and the batch split's probe) follow from its description.
    data = input_pipeline.load_datasets(config.data)
    resolved = resolution.resolve(config, data.description)
    created = files.first_missing_folder(workdir) if distributed.is_primary() else None
    workdir = files.prepare_workdir(workdir)
    lock = files.WorkdirLock(workdir) if distributed.is_primary() else contextlib.nullcontext()
    with lock, _StopSignal() as stop, checkpointing.quiet_closed_loop_callbacks():
        try:
            run, state = setup(resolved, config, workdir, data, overrides or {}, config_changes or {}, on_validation)
        except BaseException:  # refused (bad data, a batch larger than the split, ...): leave no empty workdir
            files.remove_unused(workdir, created)
            raise
        try:
            train(run, state, stop)
            report = finish(run, state)
            sync_hint = run.tracker.sync_hint()
            shutdown(run, state)
        except MnistFlaxError as e:  # preempted, non-finite loss, a failed checkpoint: stop cleanly
            shutdown(run, state, e)
            raise
        except BaseException:  # a bug: keep its traceback, but let W&B go before the interpreter exits
            run.tracker.finish(exit_code=layout.EXIT_FAILED)
            raise
    if run.primary:
        progress.print_summary(report, workdir, sync_hint)
    return report


# ---------------------------------------------------------------- setup


def setup(
    config, requested, workdir: str, datasets, overrides: dict, config_changes: dict, on_validation=()
) -> tuple[Setup, LoopState]:
    """Model, state (resumed or fresh), tracking and the compiled steps for the loaded `datasets`
    (input_pipeline.Datasets): a run ready to train."""
    started = time.perf_counter()
    mesh = distributed.make_mesh()
    description = datasets.description
    if config.batch_size > len(datasets.train):
        raise ConfigError(
            f"batch_size: {config.batch_size} is larger than the training split ({len(datasets.train)} examples)"
        )
    steps_per_epoch = len(datasets.train) // config.batch_size
    record = {"git": provenance.git_info(), "data": provenance.data_fingerprint(datasets)}
    record["environment"] = provenance.environment()
    flat = schema.flatten(config)
    checkpoints, resumed_from, config_history = _open_checkpoints(config, flat, workdir, record, description)
    preload = _preload_records(config)  # the data and the resume are checked: the records will be needed
    model = models.create(config.model, num_classes=description.num_classes)
    schedule = steps.make_schedule(config.optimizer, steps_per_epoch, config.num_epochs)  # for the logs
    tx = steps.make_optimizer(config.optimizer, steps_per_epoch, config.num_epochs)
    state = distributed.put_replicated(steps.create_train_state(model, tx, config.seed, description.image_shape), mesh)
    state, best, best_variables = _restore(config, checkpoints, resumed_from, state, description)
    device_data = {
        "train": input_pipeline.to_device(datasets.train, mesh=mesh),
        "validation": input_pipeline.to_device(datasets.validation, config.eval_batch_size, mesh=mesh),
        "test": input_pipeline.to_device(datasets.test, config.eval_batch_size, mesh=mesh),
    }
    carry = (state, *distributed.put_replicated((metrics.TrainMetrics.empty(), steps.empty_guard()), mesh))
    run = Setup(
        config=config,
        workdir=workdir,
        primary=distributed.is_primary(),
        started=started,
        datasets=datasets,
        device_data=device_data,
        steps_per_epoch=steps_per_epoch,
        resumed_from=resumed_from,
        provenance=record,
        config_history=config_history,
        checkpoints=checkpoints,
        flat=flat,
    )
    loop_state = LoopState(
        carry=carry, step=int(distributed.to_host(state.step)), best=best, best_variables=best_variables
    )
    _describe(run, loop_state, model)
    _compile(run, loop_state, model, mesh)
    preload.join()
    run.tracker, run.writer = _start_records(run, requested, overrides, config_changes)
    run.writer.write_scalars(loop_state.step, {"compile_seconds": run.compile_stats["seconds"]})
    _build_actions(run, loop_state.step, schedule, on_validation)
    return run, loop_state


def _preload_records(config) -> threading.Thread:
    """Starts importing the record keepers' libraries on a thread; `_start_records` then finds them loaded.

    W&B and TensorBoard's protos take seconds to import. On a thread those seconds overlap the state's
    initialisation and the compilation, which run in XLA without Python's lock. An import that fails here is left
    to fail again, with its own message, where `_start_records` imports the module. Not a daemon: a run that stops
    with an error before then exits once the import is done, not in the middle of it.
    """
    names = ["mnist_flax.tracking.writers"]
    names += ["mnist_flax.tracking.tensorboard_writer"] if config.tensorboard else []
    names += ["wandb"] if config.wandb.mode != "disabled" else []

    def load():
        for name in names:
            try:
                importlib.import_module(name)
            except BaseException:  # reported by the import in _start_records
                return

    thread = threading.Thread(target=load, name="mnist_flax-preload")
    thread.start()
    return thread


def _open_checkpoints(config, flat: dict, workdir: str, record: dict, description):
    """(checkpoints or None, the step to resume from or None, the config history), the resume checked: its
    data set's image shape and classes (`description`, this run's), then the config and the data."""
    if not config.checkpoint.enabled:
        return None, None, []
    checkpoints = checkpointing.Checkpoints(os.path.join(workdir, layout.CHECKPOINTS), config.checkpoint)
    resumed_from = checkpoints.latest_step()
    if resumed_from is None:
        return checkpoints, None, []
    # Before the state is restored: a change of model would otherwise fail there, less clearly.
    meta = checkpoints.read_meta(resumed_from)
    where = f"resuming at step {resumed_from} of {checkpoints.directory}"
    drift.check_data_set(checkpointing.data_set(meta), description, where)
    retired = [f for f in models.RETIRED_FIELDS if f in (meta.get("config") or {}).get("model", {})]
    if retired:
        raise ConfigError(
            f"{checkpoints.directory} step {resumed_from} was written by an older mnist_flax (model.{retired[0]}; "
            "its optimizer state has another form) and cannot be resumed: use a new --workdir"
        )
    return (
        checkpoints,
        resumed_from,
        drift.check_resume(config, meta, record, resumed_from, checkpoints.directory, flat),
    )


def _start_records(run: Setup, requested, overrides: dict, config_changes: dict):
    """(tracker, writer): the workdir's record files, the W&B run and the metric writers."""
    config, workdir, record, config_history = run.config, run.workdir, run.provenance, run.config_history
    # The writers, TensorBoard's protos and W&B: loaded by `_preload_records` after the data and checkpoint checks.
    from mnist_flax.tracking import wandb_run, writers

    primary = distributed.is_primary()
    if primary:
        payloads = {
            layout.CONFIG: config.to_dict(),
            layout.CONFIG_REQUESTED: requested.to_dict(),
            layout.CONFIG_CHANGES: config_changes,
            layout.PROVENANCE: record,
            layout.DATA: run.datasets.description.to_dict(),
        }
        if config_history:
            payloads[layout.CONFIG_HISTORY] = config_history
        for name, payload in payloads.items():
            files.write_json(os.path.join(workdir, name), payload)
    # W&B keeps its own list of the installed packages (its requirements.txt file); the config keeps the verdict.
    environment = {k: v for k, v in record["environment"].items() if k != "packages"}
    extra = {
        layout.WANDB_PROVENANCE: {**record, "environment": environment},
        layout.WANDB_CONFIG_HISTORY: config_history,
        layout.WANDB_DATA: run.datasets.description.to_dict(),
    }
    tracker = wandb_run.Tracker.start(
        config, workdir, record["git"], overrides, config_changes, primary, requested.to_dict(), extra, run.flat
    )
    # The lineage: the data the run trains on, and the model it starts from, as the W&B run's inputs.
    datasets = run.datasets
    sizes = {name: len(getattr(datasets, name)) for name in ("train", "validation", "test")}
    tracker.use_dataset(datasets.name, datasets.source, record["data"], sizes)
    if config.init_from and run.resumed_from is None:
        if _is_artifact_reference(config.init_from):
            tracker.use_model(config.init_from)
        else:
            parent = checkpointing.parent_checkpoint(config.init_from)
            if parent:  # else restoring it reports what is wrong with it
                tracker.use_checkpoint(*parent)
    writer = writers.create_writer(workdir, tensorboard=config.tensorboard, tracker=tracker, is_primary=primary)
    if run.resumed_from is None:
        writer.write_hparams(run.flat)
    return tracker, writer


def _restore(config, checkpoints, resumed_from: int | None, state, description):
    """(state, best, best_variables): where the run starts (an `init_from` checked against this run's data set,
    `description`, before it is restored)."""
    best = {"val_accuracy": -1.0, "step": None}
    # 1. This run's own latest checkpoint: a resumed run continues exactly where it stopped.
    if resumed_from is not None:
        restored, meta = checkpoints.restore(resumed_from, state)
        state = steps.with_config_hyperparameters(restored, state)
        best = meta.get("best", best)
    # 2. Else the parameters of another run (`init_from`): a new run that starts from them.
    elif config.init_from:
        path = config.init_from
        if _is_artifact_reference(path):
            from mnist_flax.tracking import wandb_run

            path = wandb_run.download_model_artifact(path)
        _check_init_from(path, description)
        restored, _ = checkpointing.restore_from_directory(path, state)
        state = state.replace(params=restored.params, model_state=restored.model_state)
    # 3. Else fresh parameters from the seed.
    elif config.eval_only:
        raise ConfigError("eval_only: set init_from to the checkpoint to evaluate")
    best_variables = jax.tree.map(jnp.copy, state.variables())  # a copy: the first call donates state's buffers
    step = int(distributed.to_host(state.step))
    if best["step"] is not None and best["step"] != step and best["step"] in checkpoints.all_steps():
        best_variables = checkpoints.restore(best["step"], state)[0].variables()
    return state, best, best_variables


def _check_init_from(path: str, description) -> None:
    """Refuses (DataError) an `init_from` checkpoint trained on a data set of other classes or image shape; one
    that cannot be read is left to `restore_from_directory` to report."""
    try:
        saved = checkpointing.SavedCheckpoints(path)
        step = None if saved.folder else saved.manager.latest_step()
        if saved.folder is None and step is None:
            return
        meta = saved.read_meta(step)
    except checkpointing.CheckpointError:
        return
    drift.check_data_set(checkpointing.data_set(meta), description, f"init_from: {saved.path(step)}")


def _is_artifact_reference(path: str) -> bool:
    """Whether `init_from` names a W&B artifact (entity/project/name:alias), not a local folder."""
    return not os.path.exists(path) and ":" in path and "/" in path


def _compile(run: Setup, state: LoopState, model, mesh) -> None:
    """Compiles the train and predict steps ahead of time (compile time is reported apart)."""
    config, data = run.config, run.device_data
    train_step = steps.make_train_step(
        config, run.steps_per_epoch, config.train.steps_per_call, config.train.scan_unroll, mesh
    )
    predict = steps.make_predict(model.apply, config.eval_batch_size, mesh)
    order_fn = jax.jit(input_pipeline.epoch_order, static_argnums=(2, 3), out_shardings=distributed.replicated(mesh))
    run.data_key = np.asarray(jax.random.PRNGKey(config.seed + 1))
    variables = state.carry[0].variables()
    with steps.CompileCounter() as compiles:
        order = order_fn(run.data_key, 0, len(run.datasets.train), config.batch_size)
        run.compiled = {
            "train_step": train_step.lower(state.carry, data["train"].images, data["train"].labels, order).compile(),
            "predict_val": predict.lower(variables, data["validation"].images, 0).compile(),
            "predict_test": predict.lower(variables, data["test"].images, 0).compile(),
            "order": order_fn,
        }
    run.compile_stats = {
        "seconds": compiles.seconds,
        "ahead_of_time": compiles.count,
        "from_cache": compiles.cached,  # of those, loaded from the persistent compilation cache (compile_cache)
        "per_epoch": [],
    }
    cached = f" ({compiles.cached} of {compiles.count} from the compilation cache)" if compiles.cached else ""
    _say(run, f"compiled in {compiles.seconds:.1f} s{cached}")


def _build_actions(run: Setup, step: int, schedule, on_validation=()) -> None:
    """The periodic actions (log, evaluate then `on_validation`, save) and the terminal's progress."""
    config = run.config
    rules = periodic.rules(config, run.steps_per_epoch)
    run.reporter = periodic.TrainReporter(rules["log"], schedule, config.train.on_nonfinite)
    run.evaluator = periodic.Evaluator(
        rules["evaluate"],
        run.compiled["predict_val"],
        run.device_data["validation"],
        config.eval_batch_size,
        callbacks=on_validation,
    )
    if run.checkpoints:
        run.checkpointer = periodic.Checkpointer(rules["checkpoint"], run.checkpoints, config, run.tracker, run.flat)
    run.bar = progress.Progress(
        run.total_steps,
        run.steps_per_epoch,
        step,
        config.batch_size,
        stream=None if run.primary else open(os.devnull, "w"),
    )
    run.clock = progress.Throughput(config.batch_size, step)


# ---------------------------------------------------------------- train


def train(run: Setup, state: LoopState, stop: "_StopSignal") -> None:
    """Epochs of compiled calls from the current step; after each call the actions do what is due, in this
    order: log the train metrics, validate (then the sweep's callbacks), save (with this step's validation)."""
    config, data = run.config, run.device_data["train"]
    if config.eval_only:
        state.last_validation = run.evaluator.validate(state, state.step)
        return
    # Several CPU devices in one process (simulated, or jax_num_cpu_devices) share one thread pool: with many
    # calls in flight, a step's all-reduce can wait forever for devices whose threads run later calls. Waiting
    # for each call costs little on CPU and keeps the collectives in step.
    sync_each_call = SYNC_CPU_DEVICES and jax.default_backend() == "cpu" and jax.local_device_count() > 1
    # A SIGTERM reaches each process between different calls (each host runs ahead of its devices on its own):
    # the processes agree after every call, so that all stop at the same step and save it together, instead
    # of one saving while the others wait for it in the next step's all-reduce.
    agree = jax.process_count() > 1
    train_step, order_fn = run.compiled["train_step"], run.compiled["order"]
    # Compilations during each epoch: the first may compile a few small eager ops, later ones none.
    with steps.CompileCounter() as compiles:
        for epoch in range(state.step // run.steps_per_epoch, config.num_epochs):
            order = order_fn(run.data_key, epoch, len(run.datasets.train), config.batch_size)
            run.clock.restart(state.step)
            epoch_end = (epoch + 1) * run.steps_per_epoch
            for previous, step in periodic.calls(state.step, epoch_end, config.train.steps_per_call):
                state.carry = train_step(state.carry, data.images, data.labels, order)
                if sync_each_call:
                    state.carry = jax.block_until_ready(state.carry)
                state.step = step
                run.reporter.maybe_run(run, state, previous, step)
                validation = run.evaluator.maybe_run(run, state, previous, step)
                state.last_validation = validation or state.last_validation
                if run.checkpointer:
                    run.checkpointer.maybe_run(run, state, previous, step, validation=validation)
                if distributed.any_process(stop.received is not None) if agree else stop.received:
                    raise Preempted(f"{stop.received or 'SIGTERM on another process'} at step {step}")
            per_epoch = run.compile_stats["per_epoch"]
            per_epoch.append(compiles.count - sum(per_epoch))
    run.bar.close()


# ---------------------------------------------------------------- finish and shut down


def finish(run: Setup, state: LoopState) -> dict:
    """The test report of the model selected on validation accuracy, written to every record."""
    config, workdir, datasets = run.config, run.workdir, run.datasets
    seconds = time.perf_counter() - run.started
    predict_test, test = run.compiled["predict_test"], run.device_data["test"]
    test_log_probs, test_report = steps.evaluate(predict_test, state.best_variables, test, config.eval_batch_size)
    test_labels = np.asarray(datasets.test.labels)
    run.writer.write_scalars(state.step, metrics.scalar_metrics(test_report, "test"))
    predictions_path = os.path.join(workdir, layout.PREDICTIONS)
    tracker, best = run.tracker, state.best
    report = {
        "best_validation": {k: v for k, v in best.items() if k != "report"},
        "validation": best.get("report"),
        "test": test_report,
        "steps": state.step,
        "compile_seconds": run.compile_stats["seconds"],
        "compilations": {k: v for k, v in run.compile_stats.items() if k != "seconds"},
        "seconds": seconds,
        "data": datasets.description.to_dict(),
        "git": tracker.git,
        "provenance": {k: v for k, v in run.provenance.items() if k != "git"},
        "wandb": {"mode": tracker.mode, "run_id": tracker.run_id},
    }
    if run.primary:
        files.write_predictions(predictions_path, test_log_probs, test_labels)
        files.write_json(os.path.join(workdir, layout.FINAL_METRICS), report)
        with contextlib.suppress(FileNotFoundError):  # an earlier start of this run stopped; this one finished
            os.remove(os.path.join(workdir, layout.STOPPED))
    tracker.log_results(
        test_report, test_log_probs, test_labels, datasets.test.images, predictions_path,
        config.wandb.log_misclassified, list(datasets.description.class_names),
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


def shutdown(run: Setup, state: LoopState, error: MnistFlaxError | None = None) -> None:
    """The one way out: save if preempted, record why a run stopped, upload the last checkpoint, close the
    checkpoints and writers, finish W&B.

    Safe to call again after a failed first try: each resource is let go once it is closed.
    """
    if run.bar:
        run.bar.close()
    # Clean-up can fail too (a full disk fails orbax's and W&B's background writers); the error that
    # stopped the run is the one to report, so theirs are kept quiet then.
    quiet = checkpointing.quiet_background_errors() if error else contextlib.nullcontext()
    with quiet:
        if error is not None:
            if isinstance(error, Preempted):
                run.tracker.mark_preempting()
                if run.checkpointer:
                    run.checkpointer.save(run, state, state.step, state.last_validation)
            _record_stop(run, state, error)
        if run.checkpoints:
            checkpoints, run.checkpoints = run.checkpoints, None
            with contextlib.suppress(checkpointing.CheckpointError) if error else contextlib.nullcontext():
                if run.checkpointer:
                    run.checkpointer.flush_upload()  # the last save's upload, once it is on disk
                checkpoints.close()  # waits for the last save: a full disk shows here
        if run.writer:
            writer, run.writer = run.writer, None
            with contextlib.suppress(MnistFlaxError) if error else contextlib.nullcontext():
                writer.flush()  # a full disk shows here too: after a stop, the first error is the one reported
                writer.close()
        run.tracker.finish(exit_code=error.exit_code if error else layout.EXIT_OK)


def _record_stop(run: Setup, state: LoopState, error: MnistFlaxError) -> None:
    """Why and where the run stopped: the writers, W&B's summary and `stopped.json`."""
    exit_code = error.exit_code
    if run.writer:
        with contextlib.suppress(MnistFlaxError):  # the writers may be why it stopped
            run.writer.write_texts(state.step, {"stopped": str(error)})
    status = error.status  # preempted, pruned (by a sweep) or failed
    run.tracker.set_summary({layout.SUMMARY_STOPPED: str(error), layout.SUMMARY_STATUS: status})
    if run.primary:
        record = {"status": status, "reason": str(error), "step": state.step, "exit_code": exit_code}
        with contextlib.suppress(OSError):  # a full disk may be why it stopped: that error is the one to report
            files.write_json(os.path.join(run.workdir, layout.STOPPED), record)


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


def _say(run: Setup, text: str) -> None:
    if run.primary:
        print(text, flush=True)


def _describe(run: Setup, state: LoopState, model) -> None:
    config, datasets = run.config, run.datasets
    fallback = distributed.accelerator_fallback()
    if fallback:
        _say(run, fallback)
    _say(
        run,
        f"{datasets.name} from {datasets.source}: train {len(datasets.train)}, validation "
        f"{len(datasets.validation)}, test {len(datasets.test)}; {config.model.name} with "
        f"{models.count_params(state.carry[0].params):,} parameters; {jax.default_backend()} x{jax.device_count()}"
        f"{f' in {jax.process_count()} processes' if jax.process_count() > 1 else ''}; "
        f"{run.steps_per_epoch} steps/epoch (last partial batch dropped), "
        f"{config.train.steps_per_call} step(s)/call, batch in {config.train.batch_split} piece(s)"
        + (f"; resumed at step {state.step}" if run.resumed_from is not None else ""),
    )
