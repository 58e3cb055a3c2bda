"""Orbax checkpoints: save asynchronously, keep the last N and the best, resume.

A checkpoint step directory holds two items: "state" (the TrainState pytree:
params, optimizer state, step, RNG) and "meta" (JSON: epoch, metrics, config,
git commit). Orbax writes each step to a temporary directory and renames it
when complete, so a step that `all_steps()` lists is always whole.
"""

import contextlib
import os
import re
import sys
import threading

import jax
import ml_collections
import orbax.checkpoint as ocp

from mnist_flax import datasets, layout
from mnist_flax.errors import CheckpointError, first_line

BEST_METRIC = "val_accuracy"


def _best_metric(metrics: dict) -> float:
    return float(metrics[BEST_METRIC])


class Checkpoints:
    """A run's checkpoint directory: `workdir/checkpoints/<step>/{state,meta}`."""

    def __init__(self, directory: str, checkpoint_config: ml_collections.ConfigDict):
        self.directory = os.path.abspath(directory)
        latest = ocp.checkpoint_managers.LatestN(n=checkpoint_config.max_to_keep)
        if checkpoint_config.keep_best:
            policy = ocp.checkpoint_managers.AnyPreservationPolicy(
                # Steps saved without metrics (preemption mid-epoch) are kept by LatestN alone.
                [
                    latest,
                    ocp.checkpoint_managers.BestN(
                        get_metric_fn=_best_metric, n=1, keep_checkpoints_without_metrics=False
                    ),
                ]
            )
        else:
            policy = latest
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            # best_fn is not used for retention here (the policy is), but without it orbax does
            # not write the metrics to disk, and a restarted run could no longer tell the best.
            best_fn=_best_metric,
            best_mode="max",
            enable_async_checkpointing=checkpoint_config.async_save,
            create=True,
        )
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
        except OSError as e:
            raise CheckpointError(f"cannot use checkpoint directory {self.directory}: {e}") from None

    def latest_step(self) -> int | None:
        """The newest complete checkpoint, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def best_step(self) -> int | None:
        """The kept step with the highest validation accuracy (None if none has metrics)."""
        return _best_step(self.manager)

    def save(self, step: int, state, meta: dict, metrics: dict | None = None, force: bool = False) -> bool:
        """Starts an (asynchronous) save; returns whether one was started."""
        try:
            return self.manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                metrics=metrics,
                force=force,
            )
        except (OSError, ValueError) as e:
            raise CheckpointError(f"saving a checkpoint in {self.directory} failed: {_short_error(e)}") from None

    def restore(self, step: int, target_state):
        """Restores (state, meta) at `step` into the structure of `target_state`."""
        return restore_from_directory(self.directory, target_state, step=step, manager=self.manager)

    def read_meta(self, step: int) -> dict:
        """The metadata saved beside the state at `step` (config, best, provenance), without the state."""
        return _read_meta(self.manager, self.directory, step)

    def wait(self) -> None:
        """Blocks until every started save is on disk; a failed background save raises here."""
        try:
            # A failed background write also makes tensorstore's callbacks print tracebacks of their own.
            with quiet_background_errors():
                self.manager.wait_until_finished()
        except (OSError, ValueError) as e:
            raise CheckpointError(f"saving a checkpoint in {self.directory} failed: {_short_error(e)}") from None

    def close(self) -> None:
        self.wait()
        self.manager.close()


@contextlib.contextmanager
def quiet_background_errors():
    """Exceptions of background threads and callbacks are not printed inside this block.

    For waits on background writers whose failure is reported as one CheckpointError line instead.
    """
    previous = threading.excepthook, sys.unraisablehook
    threading.excepthook = sys.unraisablehook = lambda args: None
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
            yield
    finally:
        threading.excepthook, sys.unraisablehook = previous


@contextlib.contextmanager
def quiet_closed_loop_callbacks():
    """While a run trains, tensorstore's callbacks into an asyncio loop that orbax has already closed (after an
    async save failed in the background, e.g. on a full disk) are not printed: each would be a traceback of
    "Event loop is closed" with nothing to act on, while the save's own failure is reported as one
    CheckpointError line at the next save or at the end. Every other unraisable exception is printed as before."""
    previous = sys.unraisablehook

    def hook(unraisable):
        closed = isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"
        if not closed:
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous


def _short_error(error: Exception) -> str:
    """The operating-system reason inside orbax's/tensorstore's long message, if there is one."""
    match = re.search(r"os_error_code='(\d+)'", str(error))
    if match:
        return os.strerror(int(match.group(1)))
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return first_line(error)


def _best_step(manager) -> int | None:
    """The kept step with the highest validation accuracy, the latest among equals (None if none has metrics)."""
    scored = [s for s in manager.all_steps() if manager.metrics(s)]
    return manager.best_step() if scored else None


def _read_meta(manager, directory: str, step: int) -> dict:
    try:
        return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
        raise CheckpointError(f"checkpoint {directory} step {step} has no readable metadata: {e}") from None


def is_step_folder(path: str) -> bool:
    """One checkpoint step: a run's `checkpoints/STEP` (orbax renames a step's temporary folder to its number
    once it is whole) or a downloaded W&B model artifact, which holds one step's items."""
    return os.path.isdir(os.path.join(path, "state")) and os.path.isdir(os.path.join(path, "meta"))


class SavedCheckpoints:
    """Checkpoints opened read-only, for whoever reads a model back (init_from, export, predict).

    `location` is a run's workdir, its `checkpoints/` folder, or one step folder (`checkpoints/STEP` or a
    downloaded model artifact). Methods take the step to read; a step folder has one, so there it is None.
    """

    def __init__(self, location: str, manager=None):
        location = os.path.abspath(location)
        if manager is not None:  # a Checkpoints' own manager (a run reading its own checkpoints)
            self.location, self.folder, self.manager = location, None, manager
            return
        if os.path.isdir(os.path.join(location, layout.CHECKPOINTS)):
            location = os.path.join(location, layout.CHECKPOINTS)
        if not os.path.isdir(location):
            raise CheckpointError(f"checkpoint {location} does not exist")
        self.location = location
        self.folder = location if is_step_folder(location) else None
        if self.folder:
            self.manager = None
        else:
            options = ocp.CheckpointManagerOptions(read_only=True, best_fn=_best_metric, best_mode="max")
            self.manager = ocp.CheckpointManager(location, options=options, item_names=("state", "meta"))

    def all_steps(self) -> list[int]:
        """The complete steps of a checkpoints folder ([] for one step folder)."""
        return sorted(self.manager.all_steps()) if self.manager else []

    def best_step(self) -> int | None:
        """The kept step with the highest validation accuracy (the latest among equals), else the latest."""
        if self.folder or not self.all_steps():
            return None
        best = _best_step(self.manager)
        return self.manager.latest_step() if best is None else best

    def path(self, step: int | None) -> str:
        return self.folder or os.path.join(self.location, str(step))

    def restore(self, step: int | None, args: ocp.args.Composite) -> dict:
        if self.folder:
            return ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(self.folder, args)
        return self.manager.restore(step, args=args)

    def read_meta(self, step: int | None) -> dict:
        """The metadata saved beside the state (config, step, metrics, best), without the state."""
        try:
            meta = self.restore(step, ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # orbax raises many types for a folder it cannot read
            raise CheckpointError(
                f"{self.path(step)}: the checkpoint's metadata cannot be read: {first_line(e)}"
            ) from None
        if not isinstance(meta, dict):
            raise CheckpointError(f"{self.path(step)}: the checkpoint's metadata is not a JSON object")
        return meta

    def restore_state(self, step: int | None):
        """The state as saved, without a target structure (for readers that check it themselves)."""
        try:
            return self.restore(step, ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
        except Exception as e:  # orbax raises many types for a folder it cannot read
            raise CheckpointError(
                f"{self.path(step)}: the checkpoint's state cannot be read: {first_line(e)}"
            ) from None

    def describe_model(self, step: int | None) -> str | None:
        """The model config recorded beside a checkpoint, as one phrase (None if unreadable)."""
        try:
            model = self.read_meta(step)["config"]["model"]
            fields = ", ".join(f"{k}={v}" for k, v in sorted(model.items()) if k != "name")
            return f"a {model['name']} ({fields})"
        except (CheckpointError, KeyError, TypeError, AttributeError):  # an older or foreign checkpoint
            return None


def data_set(meta: dict) -> datasets.Description:
    """The data set a checkpoint's metadata describes ("data"); for one saved before it did, its config's data
    set as every data set then was (datasets.recorded)."""
    name = ((meta.get("config") or {}).get("data") or {}).get("name")
    return datasets.recorded(meta.get("data"), name)


def parent_checkpoint(location: str) -> tuple[str, str] | None:
    """(step folder, W&B run id) of the checkpoint `restore_from_directory(location, ...)` reads, for a run
    that starts from it to declare it as its input; None where there is none or it names no W&B run."""
    try:
        saved = SavedCheckpoints(location)
        step = None if saved.folder else saved.manager.latest_step()
        if saved.folder is None and step is None:
            return None
        run_id = saved.read_meta(step).get("wandb_run_id")
    except CheckpointError:
        return None
    return (saved.path(step), run_id) if isinstance(run_id, str) and run_id else None


def restore_from_directory(directory: str, target_state, step: int | None = None, manager=None):
    """Restores (state, meta) from a checkpoint directory (latest step if none given).

    `directory` may be a run's workdir, its `checkpoints/` folder, or one step's folder (a run's or a
    downloaded model artifact). Raises CheckpointError if nothing is there or it does not fit.
    """
    directory = os.path.abspath(directory)
    if not os.path.exists(directory):
        raise CheckpointError(f"checkpoint {directory} does not exist")
    saved = SavedCheckpoints(directory, manager)
    if saved.folder is None and step is None:
        step = saved.manager.latest_step()
        if step is None:
            raise CheckpointError(f"no complete checkpoint in {directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
    where = saved.path(step) if saved.folder else f"checkpoint {saved.location} step {step}"
    try:
        restored = saved.restore(
            step, ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        )
    except (ValueError, KeyError, TypeError) as e:
        detail = first_line(e)
        saved_model = saved.describe_model(step)
        if saved_model:
            detail = f"it holds {saved_model}"
        raise CheckpointError(f"{where} does not fit the configured model: {detail[:300]}") from None
    except FileNotFoundError as e:
        raise CheckpointError(f"{where} is incomplete: {e}") from None
    return restored["state"], restored["meta"]
