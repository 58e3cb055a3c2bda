"""Experiment tracking: the W&B run (start or resume, artifacts, result tables) and the token.

The token is read here and nowhere else in Python: from the environment
(WANDB_API_KEY, or WANDB_TOKEN as an `.env` file names it), else where
`wandb login` stored it (wandb's own lookup: its netrc, then its settings). It
is never written anywhere: not to the config, the workdir, the log, or a
command line. Online
runs need a clean git tree (`provenance.git_info`), so the logged commit
reproduces them; offline runs record the dirty flag, and `sync` refuses to
upload a dirty run unless forced. When the run's stream fails mid-run (W&B's
service gone), the run's Tracker remembers it and sends nothing more; training
goes on. An artifact W&B refuses costs only that artifact: one warning, an entry
in the workdir's wandb_undelivered.json (tracking/wandb_artifacts.py), which
`sync` delivers later; metrics, summary and other artifacts keep flowing.
"""

import functools
import os
import secrets
import string
import sys

import ml_collections
import numpy as np

from mnist_flax import layout
from mnist_flax.config import schema
from mnist_flax.errors import CheckpointError, TrackingError, first_line
from mnist_flax.tracking import wandb_artifacts, wandb_internals

TOKEN_VARIABLES = ("WANDB_API_KEY", "WANDB_TOKEN")


def new_run_id() -> str:
    """A fresh W&B run id (8 lowercase letters and digits)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def read_token(stored: bool = True) -> str | None:
    """The W&B token: the environment's (WANDB_TOKEN is exported as WANDB_API_KEY), else, with `stored`, the key
    `wandb login` stored, found the way wandb finds it (wandb_internals.stored_api_key; wandb reads it itself)."""
    for name in TOKEN_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value:
            os.environ["WANDB_API_KEY"] = value
            return value
    return wandb_internals.stored_api_key() if stored else None


def resolve_mode(mode: str, token: str | None) -> str:
    """Mode "auto": WANDB_MODE if set (the entrypoint sets it), else online with a token, offline without."""
    if mode == "auto":
        env_mode = os.environ.get("WANDB_MODE", "").lower()
        if env_mode in ("online", "offline", "disabled"):
            return env_mode if (env_mode != "online" or token) else "offline"
        return "online" if token else "offline"
    return mode


def check_dirty(git: dict, mode: str, allow_dirty: bool) -> None:
    """Refuses an online run from a tree with uncommitted changes to tracked files."""
    if mode == "online" and git["dirty"] and not allow_dirty:
        raise TrackingError(
            "tracked files have uncommitted changes, so the logged commit would not reproduce this run; "
            "commit them, or pass --config.wandb.mode=offline or --config.wandb.allow_dirty=True"
        )


def _survives_wandb_failure(method):
    """A Tracker method that warns (once) instead of stopping the training when W&B fails mid-run."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if self.run is None or self.failure:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as e:
            self.record_failure(e)
            return None

    return wrapper


class Tracker:
    """One W&B run (or none, when disabled): config, artifacts, tables, summary.

    Metrics go through writers.WandbWriter; this class does what has no place
    in the MetricWriter interface.
    """

    def __init__(self, run, mode: str, git: dict, workdir: str = ""):
        self.workdir = workdir
        self.run = run
        self.mode = mode
        self.git = git
        self.failure: str | None = None  # why W&B stopped accepting data, once it has

    @classmethod
    def start(
        cls,
        config: ml_collections.ConfigDict,
        workdir: str,
        git: dict,
        overrides: dict,
        config_changes: dict | None = None,
        is_primary: bool = True,
        requested: dict | None = None,
        extra: dict | None = None,
        flat: dict | None = None,
    ):
        """Starts (or resumes, with the workdir's run id) the run in the resolved `config.wandb.mode`.

        `requested` is the config as the file and overrides gave it (before "auto" was resolved), and `extra`
        more of the record (provenance, config history), both logged in the W&B config beside the fields;
        `flat` is the config's flat form, when the caller has it.
        """
        mode = config.wandb.mode
        check_dirty(git, mode, config.wandb.allow_dirty)
        if mode == "disabled" or not is_primary:
            return cls(None, "disabled", git, workdir)
        id_path = os.path.join(workdir, layout.WANDB_RUN_ID)
        # A W&B sweep agent names the run itself (WANDB_RUN_ID); wandb ignores any other id then.
        run_id = os.environ.get("WANDB_RUN_ID") or (
            open(id_path).read().strip() if os.path.exists(id_path) else new_run_id()
        )
        run_config = {
            **(flat if flat is not None else schema.flatten(config)),
            **{f"{layout.WANDB_GIT_PREFIX}{k}": v for k, v in git.items()},
            layout.WANDB_OVERRIDES: overrides,
            layout.WANDB_CONFIG_CHANGES: config_changes or {},
            layout.WANDB_CONFIG_REQUESTED: requested or {},
            **(extra or {}),
        }
        run, mode = _init_run(mode, workdir, _init_kwargs(config, workdir, run_id, run_config, git))
        if run is not None:
            wandb_internals.check(run)  # a wandb whose internals moved: one warning now, not a crash later
        with open(id_path, "w") as f:
            f.write(run_id)
        return cls(run, mode, git, workdir)

    def record_failure(self, error: Exception) -> None:
        """Says once, in one line, that W&B stopped working and where the metrics still go; sends nothing more."""
        if self.failure is None:
            reason = first_line(error, 160, last=True)
            self.failure = (
                f"W&B stopped accepting data ({type(error).__name__}: {reason}); training goes on, and every "
                "metric is still written to metrics.jsonl, TensorBoard and the log"
            )
            print(f"warning: {self.failure}", file=sys.stderr, flush=True)
            wandb_internals.stop_console(self.run)  # no more printed lines forwarded to the dead service

    def send_artifact(self, description: dict) -> bool:
        """Sends an artifact spec (wandb_artifacts.spec); True once W&B took it. A refusal costs only it: one
        warning line and an entry in the workdir's wandb_undelivered.json, to deliver with `sync`; a lost stream
        stops W&B for the rest of the run (record_failure)."""
        if not self.active:
            return False
        try:
            wandb_artifacts.send(self.run, description, offline=self.mode == "offline")
            return True
        except Exception as e:
            if wandb_internals.stream_failed(e):
                self.record_failure(e)
                return False
            entry = wandb_artifacts.record_undelivered(self.workdir, self.run, description, e)
            print(
                f"warning: W&B did not take {wandb_artifacts.label(description)} ({entry['why']}); metrics and the "
                f"rest of the run still go to W&B; it is listed in {wandb_artifacts.record_path(self.workdir)}: "
                f"deliver it later with python -m mnist_flax sync {self.workdir}",
                file=sys.stderr,
                flush=True,
            )
            return False

    @property
    def active(self) -> bool:
        """Whether there is a W&B run that still accepts data."""
        return self.run is not None and self.failure is None

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run else None

    def sync_hint(self) -> str | None:
        """How to upload this run later, for offline runs."""
        if self.run is None or self.mode != "offline":
            return None
        return f"python -m mnist_flax sync {self.workdir}"

    @_survives_wandb_failure
    def use_dataset(self, name: str, source: str, fingerprint: dict, sizes: dict) -> None:
        """Declares the data the run trains on as its input: a `dataset` artifact named for `data.name`.

        Its content is `fingerprint.json` (each split's SHA-256 of the decoded images and labels, and the source
        files' hashes), so the same data gives the same digest, and W&B the same version, in every run; changed
        data (another file, one label, another validation split) a new one. Local IDX files are added by
        reference (file://, without W&B hashing them again: their hashes are in fingerprint.json), not
        uploaded: they are a public data set every machine installs from its own package, so copying 30 MB
        into W&B per version would buy nothing the hashes do not already pin.
        """
        if self.run is None:
            return
        kind, _, location = source.partition(":")
        content = {"name": name, "source": kind, **fingerprint, "examples": sizes}
        references = {}
        if kind == "idx":
            for file_name in sorted(fingerprint.get("files", {})):
                references[file_name] = f"file://{os.path.abspath(os.path.join(location, file_name))}"
        self.send_artifact(
            wandb_artifacts.spec(
                name, "dataset", "use", metadata=content, contents={"fingerprint.json": content}, references=references
            )
        )

    @_survives_wandb_failure
    def use_model(self, reference: str) -> None:
        """Declares the W&B model artifact a run starts from (init_from) as its input, so the lineage of a
        fine-tuned model goes back to its parent and the parent's data. Online only: an offline run cannot
        name an artifact of the server (`init_from` downloaded it, so a network was there; run it online)."""
        if self.run is not None and self.mode == "online":
            self.send_artifact(wandb_artifacts.spec(reference, "model", "use_reference", reference=reference))

    @_survives_wandb_failure
    def use_checkpoint(self, step_dir: str, parent_run_id: str) -> None:
        """Declares a local checkpoint step a run starts from (init_from, eval_only) as its input: the parent
        run's `model-<run id>` artifact, with the step's files as the parent logged them, so it has the
        digest of the parent's version of that step, and W&B (which keeps one version per digest) links this
        run to it: the lineage goes back to the parent and its data, offline (on sync) as online."""
        if self.run is not None:
            self.send_artifact(wandb_artifacts.spec(f"model-{parent_run_id}", "model", "use", dirs=[step_dir]))

    @_survives_wandb_failure
    def log_checkpoint(self, step_dir: str, step: int, aliases: list[str], metadata: dict) -> None:
        """Uploads one checkpoint step directory as a `model` artifact."""
        if self.run is not None:
            self.send_artifact(
                wandb_artifacts.spec(
                    f"model-{self.run.id}", "model", metadata=metadata, aliases=aliases, dirs=[step_dir]
                )
            )

    @_survives_wandb_failure
    def log_results(
        self,
        test_report: dict,
        log_probs: np.ndarray,
        labels: np.ndarray,
        images: np.ndarray,
        predictions_path: str,
        num_misclassified: int,
        class_names: list[str],
    ) -> None:
        """Confusion matrix, ROC and PR curves, predictions (file and table), misclassified images."""
        if self.run is None:
            return
        import wandb

        probs = np.exp(log_probs)
        predicted = probs.argmax(axis=1)
        self.run.log(
            {
                "test/confusion_matrix": wandb.plot.confusion_matrix(
                    y_true=labels.tolist(), preds=predicted.tolist(), class_names=class_names
                ),
                "test/roc": roc_chart(labels, probs, class_names),
                "test/pr": wandb.plot.pr_curve(labels, probs, labels=class_names),
            }
        )
        columns = ["index", "label", "predicted", "confidence"] + [f"prob_{c}" for c in range(probs.shape[1])]
        rows = [
            [i, int(labels[i]), int(predicted[i]), float(probs[i].max()), *map(float, probs[i])]
            for i in range(len(labels))
        ]
        # Declared column types: wandb checks each row against them, instead of inferring them row by row.
        table = wandb.Table(columns=columns, data=rows, dtype=[int] * 3 + [float] * (len(columns) - 3), optional=False)
        self.run.log({"test/predictions": table})
        wrong = np.flatnonzero(predicted != labels)[:num_misclassified]
        table = wandb.Table(columns=["index", "image", "label", "predicted", "confidence"])
        for i in wrong:
            table.add_data(
                int(i),
                wandb.Image(images[i, :, :, 0] if images.shape[-1] == 1 else images[i]),  # grey, or colour as it is
                class_names[labels[i]],
                class_names[predicted[i]],
                float(probs[i].max()),
            )
        self.run.log({"test/misclassified": table})
        name = os.path.basename(predictions_path)
        self.send_artifact(
            wandb_artifacts.spec(f"predictions-{self.run.id}", "predictions", files={name: predictions_path})
        )

    @_survives_wandb_failure
    def mark_preempting(self) -> None:
        """Tells W&B the run is being preempted (shown as such, not as failed)."""
        self.run.mark_preempting()

    @_survives_wandb_failure
    def set_summary(self, values: dict) -> None:
        if self.run is not None:
            for key, value in values.items():
                self.run.summary[key] = value

    def finish(self, exit_code: int = 0) -> None:
        """Marks the run finished (with the exit code); after a failure, tears W&B's broken connection down."""
        if self.run is not None:
            try:
                self.run.finish(exit_code=exit_code)
            except Exception as e:  # the service is gone: what it wrote stays in the run's .wandb file
                self.record_failure(e)
            if self.failure:
                wandb_internals.stop_broken_wandb(self.run)
            self.run = None


ROC_GRID = np.linspace(0.0, 1.0, 201)  # the false positive rates at which the logged ROC curves are drawn


def roc_points(scores: np.ndarray, positives: np.ndarray, fpr_grid: np.ndarray = ROC_GRID) -> np.ndarray:
    """The ROC curve at the false positive rates of `fpr_grid`: at each, the highest true positive rate a
    threshold on `scores` reaches without a higher false positive rate. NaN when one class is absent.

    A few hundred points draw the curve; W&B's own roc_curve keeps every threshold of the test set (thousands
    a class, through pandas and scikit-learn, a large part of a sweep trial's end) and, past 10,000 rows, a
    random sample of them.
    """
    positives = np.asarray(positives, dtype=bool)
    num_pos = int(positives.sum())
    num_neg = len(positives) - num_pos
    if num_pos == 0 or num_neg == 0:
        return np.full(len(fpr_grid), np.nan)
    order = np.argsort(-np.asarray(scores), kind="stable")
    ordered = np.asarray(scores)[order]
    last_of_tie = np.append(ordered[1:] != ordered[:-1], True)  # a threshold takes all of its equal scores
    true_pos = np.concatenate([[0], np.cumsum(positives[order])[last_of_tie]])
    false_pos = np.concatenate([[0], np.cumsum(~positives[order])[last_of_tie]])
    at = np.searchsorted(false_pos / num_neg, fpr_grid, side="right") - 1  # the last threshold within each rate
    return true_pos[at] / num_pos


def roc_chart(labels: np.ndarray, probs: np.ndarray, class_names: list[str]):
    """W&B's ROC chart (its area-under-curve panel, as wandb.plot.roc_curve draws), one curve a class."""
    import wandb

    rows = []
    for c, name in enumerate(class_names):
        curve = roc_points(probs[:, c], labels == c)
        if not np.isnan(curve).any():  # a class absent from the test labels has no curve
            rows += [[name, float(fpr), float(tpr)] for fpr, tpr in zip(ROC_GRID, curve, strict=True)]
    table = wandb.Table(columns=["class", "fpr", "tpr"], data=rows, dtype=[str, float, float], optional=False)
    return wandb.plot_table(
        "wandb/area-under-curve/v0",
        table,
        {"x": "fpr", "y": "tpr", "class": "class"},
        {"title": "ROC Curve", "x-axis-title": "False positive rate", "y-axis-title": "True positive rate"},
    )


def _init_kwargs(config: ml_collections.ConfigDict, workdir: str, run_id: str, run_config: dict, git: dict) -> dict:
    """wandb.init's arguments, mode aside."""
    import wandb

    return dict(
        project=config.wandb.project,
        entity=config.wandb.entity or None,
        name=config.wandb.name or None,
        group=config.wandb.group or None,
        tags=list(config.wandb.tags) or None,
        notes=config.wandb.notes or None,
        dir=workdir,
        id=run_id,
        resume="allow",
        config=run_config,
        settings=wandb.Settings(
            silent=True,
            save_code=False,
            disable_git=True,
            git_commit=git["commit"],
            init_timeout=config.wandb.init_timeout,
        ),
    )


def _init_run(mode: str, workdir: str, init_kwargs: dict):
    """(run, mode): the run in `mode`; an online run that cannot reach W&B is kept offline instead."""
    import wandb

    try:
        return wandb.init(mode=mode, **init_kwargs), mode
    except Exception as e:  # no network, rejected token, server error: keep the run offline
        if mode != "online":
            raise TrackingError(f"W&B could not start an {mode} run: {e}") from None
        if "401" in str(e) or "invalid" in str(e).lower() and "key" in str(e).lower():
            raise TrackingError("the W&B token was rejected (401); check WANDB_API_KEY in your .env") from None
        wandb.teardown()  # the failed online attempt still holds the run id in W&B's service
        run = wandb.init(mode="offline", **init_kwargs)
        print(
            f"W&B is unreachable ({first_line(e, 160)}); the run is kept offline. "
            f"Upload it later with: python -m mnist_flax sync {workdir}",
            file=sys.stderr,
            flush=True,
        )
        return run, "offline"


def download_model_artifact(reference: str) -> str:
    """Downloads a W&B `model` artifact (`entity/project/name:alias`); returns its local folder."""
    try:
        import wandb

        return wandb.Api().artifact(reference, type="model").download()
    except Exception as e:
        raise CheckpointError(f"init_from: cannot fetch W&B artifact {reference}: {first_line(e)}") from None
