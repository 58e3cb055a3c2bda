"""What the terminal shows while a run trains: a progress bar on a terminal, plain lines in logs."""

import os
import shutil
import sys
import time

from mnist_flax import layout


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Shows epoch and step of the total, loss, accuracy, images/s and time left."""

    def __init__(self, total_steps: int, steps_per_epoch: int, start_step: int, batch_size: int, stream=None):
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.batch_size = batch_size
        self.stream = stream or sys.stdout
        self._bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            width = max(80, shutil.get_terminal_size((100, 24)).columns)  # some terminals report 0 columns
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", file=self.stream, ncols=width)
        self._last_step = start_step

    def update(self, step: int, loss: float, accuracy: float, images_per_second: float) -> None:
        epoch = min(step // self.steps_per_epoch + 1, self.total_steps // self.steps_per_epoch)
        left = (self.total_steps - step) * self.batch_size / max(images_per_second, 1e-9)
        if self._bar is not None:
            self._bar.set_description(f"epoch {epoch}/{self.total_steps // self.steps_per_epoch}")
            self._bar.set_postfix_str(
                f"loss {loss:.4f} acc {accuracy:.4f} {images_per_second:,.0f} img/s", refresh=False
            )
            self._bar.update(step - self._last_step)
        else:
            print(
                f"epoch {epoch}/{self.total_steps // self.steps_per_epoch} step {step}/{self.total_steps} "
                f"loss {loss:.4f} acc {accuracy:.4f} {images_per_second:,.0f} img/s left {_duration(left)}",
                file=self.stream,
                flush=True,
            )
        self._last_step = step

    def message(self, text: str) -> None:
        """A line that does not disturb the bar."""
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class Stopwatch:
    """Wall time since start or since the last lap."""

    def __init__(self):
        self.start = self.last = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        return elapsed


class Throughput:
    """Images per second between one reading and the next, over the training steps alone.

    The loop restarts it at each epoch's start, so validation and checkpoints between epochs do not count.
    """

    def __init__(self, batch_size: int, step: int = 0):
        self.batch_size = batch_size
        self.restart(step)

    def restart(self, step: int) -> None:
        self._stopwatch, self._step = Stopwatch(), step

    def images_per_second(self, step: int) -> float:
        """Since the last reading (or restart); starts the next interval."""
        seconds = self._stopwatch.lap()
        rate = (step - self._step) * self.batch_size / max(seconds, 1e-9)
        self._step = step
        return rate


def saved_files(workdir: str) -> list[str]:
    """Which of a run's main files and folders its workdir holds (no checkpoints/ when they are off, say)."""
    names = [layout.CONFIG, layout.METRICS, layout.FINAL_METRICS, layout.PREDICTIONS]
    found = [name for name in names if os.path.isfile(os.path.join(workdir, name))]
    return found + [
        f"{name}/" for name in (layout.CHECKPOINTS, layout.TENSORBOARD) if os.path.isdir(os.path.join(workdir, name))
    ]


def print_summary(report: dict, workdir: str, sync_hint: str | None) -> None:
    """The block printed at the end of a run: steps, time, best validation, test metrics, where things are."""
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
        "  " + ", ".join(saved_files(workdir)),
        f"W&B: {report['wandb']['mode']}" + (f" run {report['wandb']['run_id']}" if report["wandb"]["run_id"] else ""),
    ]
    if sync_hint:
        lines.append(f"  upload later with: {sync_hint}")
    lines.append("=" * 60)
    print("\n".join(lines), flush=True)
