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

from mnist_flax import layout
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
        scored = [s for s in self.manager.all_steps() if self.manager.metrics(s)]
        return self.manager.best_step() if scored else None

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
        try:
            return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
            raise CheckpointError(f"checkpoint {self.directory} step {step} has no readable metadata: {e}") from None

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


def restore_from_directory(directory: str, target_state, step: int | None = None, manager=None):
    """Restores (state, meta) from a checkpoint directory (latest step if none given).

    `directory` may be a run's workdir, its `checkpoints/` folder, or one step's
    folder. Raises CheckpointError if nothing is there or it does not fit.
    """
    directory = os.path.abspath(directory)
    if not os.path.exists(directory):
        raise CheckpointError(f"checkpoint {directory} does not exist")
    if manager is None:
        if os.path.isdir(os.path.join(directory, layout.CHECKPOINTS)):
            directory = os.path.join(directory, layout.CHECKPOINTS)
        elif os.path.isdir(os.path.join(directory, "state")) and os.path.basename(directory).isdigit():
            step = int(os.path.basename(directory)) if step is None else step
            directory = os.path.dirname(directory)
        manager = ocp.CheckpointManager(
            directory, options=ocp.CheckpointManagerOptions(read_only=True), item_names=("state", "meta")
        )
        if step is None:
            step = manager.latest_step()
        if step is None:
            raise CheckpointError(f"no complete checkpoint in {directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
    try:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
        )
    except (ValueError, KeyError, TypeError) as e:
        detail = first_line(e)
        saved_model = _saved_model_description(manager, step)
        if saved_model:
            detail = f"it holds {saved_model}"
        raise CheckpointError(
            f"checkpoint {directory} step {step} does not fit the configured model: {detail[:300]}"
        ) from None
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {directory} step {step} is incomplete: {e}") from None
    return restored["state"], restored["meta"]


def _saved_model_description(manager, step: int) -> str | None:
    """The model config recorded beside a checkpoint, as one phrase (None if unreadable)."""
    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        model = meta["config"]["model"]
    except Exception:  # an older or foreign checkpoint: fall back to orbax's message
        return None
    fields = ", ".join(f"{k}={v}" for k, v in sorted(model.items()) if k != "name")
    return f"a {model['name']} ({fields})"
