"""The exceptions a user can act on.

`main.py` turns each of them into one line on stderr and exit status 2 (3 for
Preempted, 4 for Pruned; the sweep worker's 5 for StorageUnavailable); anything else is a bug and keeps its traceback.
"""


class MnistFlaxError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""


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

    exit_code = 3
    status = "preempted"


class Pruned(MnistFlaxError):
    """A sweep's pruner stopped the trial after a validation: not a failure, a verdict (exit status 4)."""

    exit_code = 4
    status = "pruned"


class StorageUnavailable(MnistFlaxError):
    """A sweep's study storage stayed unreachable past --storage-patience; the trial was stopped with a checkpoint
    and the study continues when the same command runs again (exit status 5)."""

    exit_code = 5
    status = "storage unavailable"
