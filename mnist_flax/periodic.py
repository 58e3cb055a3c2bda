"""The training loop's periodic work: one "is it time" rule, and the actions that ask it.

A compiled call advances the step by several (fused steps), so the rule asks
about the interval a call covered, `(previous_step, step]`, not about a single
step: clu's `PeriodicAction` asks step by step and raises on a jump. Each
concern answers for itself, as in kauldron's loop: the loop calls
`action.maybe_run(training, previous_step, step)` on each and knows no more.

Actions read and update the loop's state (`train.Training`): the carry, the
best model so far, the writer. The evaluator takes callbacks, called after
each validation with (step, report): the place for a sweep's pruning.
"""

import time
from collections.abc import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp

from mnist_flax import config_utils, distributed, metrics, steps
from mnist_flax.errors import MnistFlaxError


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


class PeriodicAction:
    """Work done when its rule says so; a subclass writes `run(training, step)`."""

    def __init__(self, rule: Periodic):
        self.rule = rule

    def maybe_run(self, training, previous_step: int, step: int) -> None:
        if self.rule.is_time(previous_step, step):
            self.run(training, step)

    def run(self, training, step: int) -> None:
        raise NotImplementedError


class TrainReporter(PeriodicAction):
    """Pulls the train metrics off the device (one sync), checks for non-finite losses, writes them, resets them."""

    def __init__(self, rule: Periodic, schedule, on_nonfinite: str):
        super().__init__(rule)
        self.schedule = schedule
        self.on_nonfinite = on_nonfinite

    def run(self, training, step: int) -> None:
        state, train_metrics, guard = training.carry
        computed = {k: float(distributed.to_host(v)) for k, v in train_metrics.compute().items()}
        count, first = int(distributed.to_host(guard["count"])), int(distributed.to_host(guard["first_step"]))
        if count and self.on_nonfinite == "stop":
            raise NonFiniteLossError(
                f"loss became non-finite at step {first}; the update was not applied and the run stopped "
                "(lower optimizer.learning_rate, set optimizer.grad_clip_norm, or train.on_nonfinite=skip)"
            )
        images_per_second = training.clock.images_per_second(step)
        scalars = {
            "train/loss": computed["loss"],
            "train/accuracy": computed["accuracy"],
            "train/learning_rate": float(self.schedule(step)),
            "train/images_per_second": images_per_second,
            "train/nonfinite_steps": count,
        }
        training.writer.write_scalars(step, scalars)
        training.bar.update(step, scalars["train/loss"], scalars["train/accuracy"], images_per_second)
        training.carry = (state, jax.tree.map(jnp.zeros_like, train_metrics), guard)


class Evaluator(PeriodicAction):
    """Validation: the report, the best model so far (by accuracy), then each callback(step, report + "epoch")."""

    def __init__(self, rule: Periodic, predict, split, batch_size: int, callbacks: Iterable[Callable] = ()):
        super().__init__(rule)
        self.predict = predict
        self.split = split
        self.batch_size = batch_size
        self.callbacks = list(callbacks)

    def validate(self, training, step: int) -> dict:
        """The validation report of the current params; keeps them if they are the best so far."""
        params = training.carry[0].params
        _, report = steps.evaluate(self.predict, params, self.split, self.batch_size)
        # ">=": among equal accuracies the latest is best, as orbax's BestN keeps it.
        if report["accuracy"] >= training.best["val_accuracy"]:
            training.best = {"val_accuracy": report["accuracy"], "step": step, "report": report}
            training.best_params = jax.tree.map(jnp.copy, params)
        training.last_validation = (step, report)
        return report

    def run(self, training, step: int) -> None:
        start = time.perf_counter()
        report = self.validate(training, step)
        scalars = metrics.scalar_metrics(report, "val")
        scalars["val/eval_seconds"] = time.perf_counter() - start
        scalars["val/epoch"] = step // training.steps_per_epoch  # what a stopped run's last validation names
        training.writer.write_scalars(step, scalars)
        training.bar.message(
            f"epoch {step // training.steps_per_epoch}: val loss {report['loss']:.4f} acc {report['accuracy']:.4f} "
            f"f1 {report['f1_macro']:.4f} auroc {report['auroc_macro']:.4f}"
        )
        # The callbacks also see the epoch (evaluations fall on epoch ends), as a sweep's pruner counts epochs.
        for callback in self.callbacks:
            callback(step, {**report, "epoch": step // training.steps_per_epoch})


class Checkpointer(PeriodicAction):
    """Saves the state (asynchronously) with its metadata; uploads it as a W&B model artifact if asked."""

    def __init__(self, rule: Periodic, checkpoints, config, tracker):
        super().__init__(rule)
        self.checkpoints = checkpoints
        self.config = config
        self.tracker = tracker

    def run(self, training, step: int) -> None:
        self.save(training, step)

    def save(self, training, step: int) -> None:
        """Saves `training`'s state at `step` unless that step is saved already."""
        if step in self.checkpoints.all_steps():
            return
        epoch_metrics = {"epoch": step // training.steps_per_epoch}
        validated_step, report = training.last_validation or (None, None)
        if validated_step == step:
            epoch_metrics["val_accuracy"] = report["accuracy"]
        best = {k: v for k, v in training.best.items() if k != "report"}
        meta = {
            "step": step,
            "epoch": epoch_metrics["epoch"],
            "best": best,
            "config": self.config.to_dict(),
            "git": self.tracker.git,
            "wandb_run_id": self.tracker.run_id,
            "metrics": epoch_metrics,
            "provenance": training.provenance,
            "config_history": training.config_history,
        }
        has_val = "val_accuracy" in epoch_metrics
        self.checkpoints.save(
            step,
            training.carry[0],
            meta,
            metrics={"val_accuracy": epoch_metrics["val_accuracy"]} if has_val else None,
            force=True,
        )
        self._upload(step, best, epoch_metrics)

    def _upload(self, step: int, best: dict, epoch_metrics: dict) -> None:
        upload = self.config.checkpoint.upload_to_wandb
        # Every process waits (orbax's wait is collective); the primary uploads.
        if upload and self.config.wandb.mode != "disabled":
            self.checkpoints.wait()
        if upload and self.tracker.run is not None:
            self.tracker.log_checkpoint(
                f"{self.checkpoints.directory}/{step}",
                step,
                ["latest"] + (["best"] if best.get("step") == step else []),
                {
                    "step": step,
                    "epoch": epoch_metrics["epoch"],
                    "metrics": epoch_metrics,
                    "git": self.tracker.git,
                    "config": config_utils.flatten(self.config),
                },
            )
