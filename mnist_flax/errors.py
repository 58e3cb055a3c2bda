"""The exceptions a user can act on.

`main.py` turns each of them into one line on stderr and exit status 2 (3 for
Preempted, 4 for Pruned; the sweep worker's 5 for StorageUnavailable); anything else is a bug and keeps its traceback.
The statuses and exit statuses are named in `mnist_flax.layout`.
"""

from mnist_flax import layout


class MnistFlaxError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""

    exit_code = layout.EXIT_USAGE  # what main.py exits with
    status = layout.FAILED  # the run's status when it stops on this error


class ConfigError(MnistFlaxError):
    """A config field is unknown, of the wrong type, or out of range."""


class DataError(MnistFlaxError):
    """A data set is missing, unreadable or corrupt."""


class WorkdirError(MnistFlaxError):
    """The workdir cannot be created or written, or is in use by another run."""


class CheckpointError(MnistFlaxError):
    """A checkpoint cannot be found, read, or does not fit the model."""


class TrackingError(MnistFlaxError):
    """Experiment tracking refused to start (dirty tree, rejected token, ...)."""


class Preempted(MnistFlaxError):
    """SIGTERM or SIGINT arrived; a checkpoint was saved and the run can resume (exit status 3)."""

    exit_code = layout.EXIT_PREEMPTED
    status = layout.PREEMPTED


class Pruned(MnistFlaxError):
    """A sweep's pruner stopped the trial after a validation: not a failure, a verdict (exit status 4)."""

    exit_code = layout.EXIT_PRUNED
    status = layout.PRUNED


class StorageUnavailable(MnistFlaxError):
    """A sweep's study storage stayed unreachable past --storage-patience; the trial was stopped with a checkpoint
    and the study continues when the same command runs again (exit status 5)."""

    exit_code = layout.EXIT_STORAGE_UNAVAILABLE


def first_line(error: BaseException | str, limit: int = 200, *, last: bool = False, cause: bool = False) -> str:
    """An error as one line for the user: the first (or `last`) non-empty line of its message, at most `limit`
    characters; the exception's type name when its message is empty. `cause`: the message of the error at the
    root of its `raise ... from` chain (a library's wrapper says less than the error it wraps)."""
    while cause and isinstance(error, BaseException) and error.__cause__ is not None:
        error = error.__cause__
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__ if isinstance(error, BaseException) else ""
    return (lines[-1] if last else lines[0])[:limit]
