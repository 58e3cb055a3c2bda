"""The training loop's periodic work: one "is it time" rule, and the actions that ask it.

A compiled call advances the step by several (fused steps), so the rule asks
about the interval a call covered, `(previous_step, step]`, not about a single
step: clu's `PeriodicAction` asks step by step and raises on a jump. Each
concern answers for itself, as in kauldron's loop: the loop calls
`action.maybe_run(training, previous_step, step)` on each and knows no more.

Each action gets what was set up once (`loop.Setup`: the config, the data,
the compiled steps, the sinks) and what the loop advances (`loop.LoopState`:
the step, the carry, the best model so far), and returns its result; what one
action needs of another's is handed to it by the loop (the evaluator's
`Validation` goes to the checkpointer), so their order is the loop's, written
once in `loop.train`. The evaluator takes callbacks, called after each
validation with (step, report): the place for a sweep's pruning.
"""

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp

from mnist_flax import layout
from mnist_flax.config import schema
from mnist_flax.errors import MnistFlaxError
from mnist_flax.training import distributed, metrics, steps


class NonFiniteLossError(MnistFlaxError):
    """The loss became NaN or infinite (and train.on_nonfinite is "stop")."""


class Periodic:
    """Due when a multiple of one of `every_steps`, or one of `on_steps`, lies in (previous_step, step]."""

    def __init__(self, every_steps: Iterable[int] = (), on_steps: Iterable[int] = ()):
        self.every_steps = tuple(n for n in every_steps if n > 0)
        self.on_steps = frozenset(on_steps)

    def is_time(self, previous_step: int, step: int) -> bool:
        """Whether the call that moved the step from `previous_step` to `step` reached a due step."""
        return any(step // n > previous_step // n for n in self.every_steps) or any(
            previous_step < due <= step for due in self.on_steps
        )


def calls(step: int, epoch_end: int, steps_per_call: int) -> Iterator[tuple[int, int]]:
    """(previous_step, step) of each compiled call from `step` to the end of its epoch; no call crosses it."""
    while step < epoch_end:
        previous, step = step, min(step + steps_per_call, epoch_end)
        yield previous, step


def rules(config, steps_per_epoch: int) -> dict[str, Periodic]:
    """When the loop logs, evaluates and saves, from a resolved config.

    Logging: every `log_every_steps` and at every epoch end. Evaluation and
    checkpoints: every `eval_every_epochs` / `checkpoint.every_epochs` epochs and
    after the last step.
    """
    last = steps_per_epoch * config.num_epochs
    return {
        "log": Periodic((config.log_every_steps, steps_per_epoch)),
        "evaluate": Periodic((config.eval_every_epochs * steps_per_epoch,), on_steps=(last,)),
        "checkpoint": Periodic((config.checkpoint.every_epochs * steps_per_epoch,), on_steps=(last,)),
    }


@dataclasses.dataclass(frozen=True)
class Validation:
    """One validation: its step, its report, and whether it made a new best model."""

    step: int
    report: dict
    improved: bool


class PeriodicAction:
    """Work done when its rule says so; a subclass writes `run(setup, state, step, **inputs)` and returns its result."""

    def __init__(self, rule: Periodic):
        self.rule = rule

    def maybe_run(self, setup, state, previous_step: int, step: int, **inputs):
        """The action's result when it is due at this call, else None."""
        if self.rule.is_time(previous_step, step):
            return self.run(setup, state, step, **inputs)
        return None

    def run(self, setup, state, step: int, **inputs):
        raise NotImplementedError


class TrainReporter(PeriodicAction):
    """Pulls the train metrics off the device (one sync), checks for non-finite losses, writes them, resets them."""

    def __init__(self, rule: Periodic, schedule, on_nonfinite: str):
        super().__init__(rule)
        self.schedule = schedule
        self.on_nonfinite = on_nonfinite

    def run(self, setup, state, step: int) -> None:
        train_state, train_metrics, guard = state.carry
        computed = {k: float(distributed.to_host(v)) for k, v in train_metrics.compute().items()}
        count, first = int(distributed.to_host(guard["count"])), int(distributed.to_host(guard["first_step"]))
        if count and self.on_nonfinite == "stop":
            raise NonFiniteLossError(
                f"loss became non-finite at step {first}; the update was not applied and the run stopped "
                "(lower optimizer.learning_rate, set optimizer.grad_clip_norm, or train.on_nonfinite=skip)"
            )
        images_per_second = setup.clock.images_per_second(step)
        scalars = {
            "train/loss": computed["loss"],
            "train/accuracy": computed["accuracy"],
            "train/learning_rate": float(self.schedule(step)),
            "train/images_per_second": images_per_second,
            "train/nonfinite_steps": count,
        }
        setup.writer.write_scalars(step, scalars)
        setup.bar.update(step, scalars["train/loss"], scalars["train/accuracy"], images_per_second)
        state.carry = (train_state, jax.tree.map(jnp.zeros_like, train_metrics), guard)


class Evaluator(PeriodicAction):
    """Validation: the report, the best model so far (by accuracy), then each callback(step, report + "epoch")."""

    def __init__(self, rule: Periodic, predict, split, batch_size: int, callbacks: Iterable[Callable] = ()):
        super().__init__(rule)
        self.predict = predict
        self.split = split
        self.batch_size = batch_size
        self.callbacks = list(callbacks)

    def validate(self, state, step: int) -> Validation:
        """The validation of the current variables; the loop state keeps them if they are the best so far."""
        variables = state.carry[0].variables()
        _, report = steps.evaluate(self.predict, variables, self.split, self.batch_size)
        improved = layout.improves(report["accuracy"], state.best["val_accuracy"])
        if improved:
            state.best = {"val_accuracy": report["accuracy"], "step": step, "report": report}
            state.best_variables = jax.tree.map(jnp.copy, variables)
        return Validation(step, report, improved)

    def run(self, setup, state, step: int) -> Validation:
        start = time.perf_counter()
        validation = self.validate(state, step)
        report, epoch = validation.report, step // setup.steps_per_epoch
        scalars = metrics.scalar_metrics(report, "val")
        scalars["val/eval_seconds"] = time.perf_counter() - start
        scalars["val/epoch"] = epoch  # what a stopped run's last validation names
        setup.writer.write_scalars(step, scalars)
        setup.bar.message(
            f"epoch {epoch}: val loss {report['loss']:.4f} acc {report['accuracy']:.4f} "
            f"f1 {report['f1_macro']:.4f} auroc {report['auroc_macro']:.4f}"
        )
        # The callbacks also see the epoch (evaluations fall on epoch ends), as a sweep's pruner counts epochs.
        for callback in self.callbacks:
            callback(step, {**report, "epoch": epoch})
        return validation


class Checkpointer(PeriodicAction):
    """Saves the state (asynchronously) with its metadata; uploads it as a W&B model artifact if asked.

    An upload needs the save on disk. Waiting for it at once would make every async save synchronous, so a
    save's upload waits until the next save, or `close`, by when the save has long finished writing: the loop
    blocks for the save's start and the artifact's logging, not for the write.
    """

    def __init__(self, rule: Periodic, checkpoints, config, tracker, flat: dict | None = None):
        super().__init__(rule)
        self.checkpoints = checkpoints
        self.config = config
        self.flat = flat if flat is not None else schema.flatten(config)
        self.tracker = tracker
        self.upload = bool(config.checkpoint.upload_to_wandb) and config.wandb.mode != "disabled"
        self._pending = None  # (step, aliases, metadata) of the save whose upload waits

    def run(self, setup, state, step: int, validation: Validation | None = None) -> None:
        self.save(setup, state, step, validation)

    def save(self, setup, state, step: int, validation: Validation | None = None) -> None:
        """Saves the loop state at `step` unless that step is saved already; `validation`: this step's, if any."""
        if step in self.checkpoints.all_steps():
            return
        self.flush_upload()
        epoch_metrics = {"epoch": step // setup.steps_per_epoch}
        if validation is not None and validation.step == step:
            epoch_metrics["val_accuracy"] = validation.report["accuracy"]
        best = {k: v for k, v in state.best.items() if k != "report"}
        meta = {
            "step": step,
            "epoch": epoch_metrics["epoch"],
            "best": best,
            "config": self.config.to_dict(),
            "git": self.tracker.git,
            "wandb_run_id": self.tracker.run_id,
            "metrics": epoch_metrics,
            "provenance": setup.provenance,
            "config_history": setup.config_history,
            "data": setup.datasets.description.to_dict(),  # what a reader of the checkpoint alone builds from
        }
        has_val = "val_accuracy" in epoch_metrics
        self.checkpoints.save(
            step,
            state.carry[0],
            meta,
            metrics={"val_accuracy": epoch_metrics["val_accuracy"]} if has_val else None,
            force=True,
        )
        if self.upload:
            aliases = ["latest"] + (["best"] if best.get("step") == step else [])
            metadata = {
                "step": step,
                "epoch": epoch_metrics["epoch"],
                "metrics": epoch_metrics,
                "git": self.tracker.git,
                "config": self.flat,
            }
            self._pending = (step, aliases, metadata)

    def flush_upload(self) -> None:
        """Uploads the save whose upload waits, once it is on disk (every process waits: orbax's wait is
        collective; the primary uploads)."""
        if self._pending is None:
            return
        (step, aliases, metadata), self._pending = self._pending, None
        self.checkpoints.wait()
        if self.tracker.run is not None:
            self.tracker.log_checkpoint(f"{self.checkpoints.directory}/{step}", step, aliases, metadata)
