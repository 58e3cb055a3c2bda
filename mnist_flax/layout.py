"""The schema of a run's files: one place names every file of a workdir and of a sweep root, a run's statuses,
the exit statuses of the commands, the keys the W&B config holds beside the config's own fields, and the rule
that picks the best model. Writers and readers take the names from here; none spells them again.

A workdir (`python main.py --workdir=DIR`; docs/runs.md says what each file holds):

    config.json            the resolved config, as trained
    config_requested.json  the config as the file and overrides gave it, before "auto" fields were resolved
    config_changes.json    how the config differs from its config file
    data.json              the data set's description: name, image shape, class names, source, fingerprint
    config_history.json    each earlier start's config, when a resume changed a field (only then)
    provenance.json        the code (git commit, dirty flag), the data's fingerprints, the environment
    metrics.jsonl          every scalar written, one JSON object per line
    final_metrics.json     the best validation and the final test report: written last, only by a finished run
    predictions.csv        the test predictions of the best model
    stopped.json           why and where a run stopped early; removed when a later start of it finishes
    wandb_run_id           the W&B run's id, so a resumed run continues the same W&B run
    checkpoints/           orbax steps
    tensorboard/           TensorBoard event files
    wandb/                 W&B's run files (an offline run waits here for `sync`)
    .lock                  held while a process trains in the workdir

A sweep root (`python -m mnist_flax sweep --root=ROOT`): sweep.json (the sweep's plan), study.db (the study,
when it is SQLite), summary.json (the closing table's rows), and one workdir per trial named NNN-VALUES, which
holds trial.json (the worker's record of the trial) and sweep.log (its main.py's output) beside the above.
"""

# ---------------------------------------------------------------- a workdir
CONFIG = "config.json"
CONFIG_REQUESTED = "config_requested.json"
CONFIG_CHANGES = "config_changes.json"
CONFIG_HISTORY = "config_history.json"
DATA = "data.json"  # what every reader of the run takes the image shape and the class names from
PROVENANCE = "provenance.json"
METRICS = "metrics.jsonl"
FINAL_METRICS = "final_metrics.json"
PREDICTIONS = "predictions.csv"
STOPPED = "stopped.json"
WANDB_RUN_ID = "wandb_run_id"
WANDB_UNDELIVERED = "wandb_undelivered.json"  # artifacts W&B did not take, and how to send them (sync delivers)
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
WANDB = "wandb"
LOCK = ".lock"

# ---------------------------------------------------------------- a sweep root and its trials
SWEEP = "sweep.json"
STUDY_DB = "study.db"
SUMMARY = "summary.json"
TRIAL = "trial.json"
SWEEP_LOG = "sweep.log"

# ---------------------------------------------------------------- a run's status
FINISHED = "finished"  # final_metrics.json written
PREEMPTED = "preempted"  # stopped by SIGTERM/SIGINT (or a lost sweep storage) with a checkpoint: resumable
PRUNED = "pruned"  # stopped by a sweep's pruner after a validation: a verdict, not a failure
FAILED = "failed"  # stopped by an error
INCOMPLETE = "incomplete"  # neither finished nor stopped: still running, or killed without a word
STATUSES = (FINISHED, PREEMPTED, PRUNED, FAILED, INCOMPLETE)
STOPPED_STATUSES = (PREEMPTED, PRUNED, FAILED)  # what stopped.json's "status" (and W&B's summary) can hold

# ---------------------------------------------------------------- exit statuses
EXIT_OK = 0
EXIT_FAILED = 1  # a bug (with its traceback), or a sweep with a failed trial
EXIT_DIFFERENT = 1  # diff and reproduce: the two configs or results differ
EXIT_USAGE = 2  # bad input: one line on stderr
EXIT_PREEMPTED = 3  # SIGTERM: a checkpoint was saved; the same command resumes
EXIT_PRUNED = 4  # a sweep's trial stopped by its pruner
EXIT_STORAGE_UNAVAILABLE = 5  # a sweep's storage stayed away past --storage-patience
EXIT_INTERRUPTED = 130  # Ctrl-C

# ---------------------------------------------------------------- the W&B config beside the config's fields
# A run's W&B config is the flat config plus these keys (tracking writes them, records reads them apart).
WANDB_GIT_PREFIX = "git."  # git.commit, git.dirty, ...
WANDB_OVERRIDES = "overrides"
WANDB_CONFIG_CHANGES = "config_changes"
WANDB_CONFIG_REQUESTED = "config_requested"
WANDB_PROVENANCE = "provenance"
WANDB_CONFIG_HISTORY = "config_history"
WANDB_DATA = "data_set"  # the data set's description (data.json)
WANDB_EXTRA_KEYS = (
    WANDB_GIT_PREFIX,
    WANDB_OVERRIDES,
    WANDB_CONFIG_CHANGES,
    WANDB_CONFIG_REQUESTED,
    WANDB_PROVENANCE,
    WANDB_CONFIG_HISTORY,
    WANDB_DATA,
    "_wandb",  # W&B's own
)
# The W&B summary's keys for a run that stopped early: why (one line), and its status (one of STOPPED_STATUSES).
SUMMARY_STOPPED = "stopped"
SUMMARY_STATUS = "status"


def is_wandb_extra(key: str) -> bool:
    """Whether a W&B config key is one of ours beside the config's fields (not a field)."""
    return key.startswith(WANDB_EXTRA_KEYS)


# ---------------------------------------------------------------- the best model
def improves(accuracy: float, best: float | None) -> bool:
    """Whether a validation accuracy makes a new best model: among equal accuracies the latest is best (as
    orbax's BestN keeps it), so the training loop, the checkpoints and a record read back agree."""
    return best is None or accuracy >= best
