"""The Run record: any finished or interrupted run, read into one object.

`load(reference)` reads a run workdir (a sweep member is one), an offline W&B
run folder (its `.wandb` file, not uploaded), or a W&B run path
`entity/project/run_id` (or an artifact `entity/project/name:alias`; needs a
key) into a `RunRecord` with the same fields whatever the source.
`expand(reference)` gives a sweep root's members, or the one run. `commands.diff`,
`sweep`, `sync` and the notebooks read runs here. Imports neither jax nor
TensorFlow, and wandb only to read a `.wandb` file or a W&B run.
"""

import glob
import json
import os
import tempfile
from dataclasses import dataclass

import numpy as np

from mnist_flax import datasets, layout
from mnist_flax.config import schema
from mnist_flax.errors import ConfigError, MnistFlaxError, first_line
from mnist_flax.records import files
from mnist_flax.tracking import wandb_files

PER_CLASS = ("precision", "recall", "f1", "auroc")


@dataclass
class RunRecord:
    """One run, whatever it was read from.

    `source` is "workdir", "wandb_offline" or "wandb_online"; `path` the
    workdir, the run folder or the W&B path. `config` is the resolved config,
    `requested_config` the config file with the command line's overrides before
    "auto" was resolved (the resolved config where the run did not record it),
    both flat (`optimizer.learning_rate`). `history` holds one dict per write,
    each with "step"; `final` is `final_metrics.json` (for a W&B source, the
    same keys rebuilt from the summary and history), None until the run
    finished. `predictions` is as `files.read_predictions` gives it. `status`
    is one of layout.STATUSES; `stopped` says why a run stopped early (`stopped.json`). `data` is the data
    set's description as the run recorded it (`data.json`; for a run recorded before there was one, its data set
    as every data set then was: datasets.recorded): readers take its image shape and class names from here.
    """

    name: str
    source: str
    path: str
    config: dict
    requested_config: dict
    config_changes: dict
    history: list[dict] | None
    final: dict | None
    predictions: dict[str, np.ndarray] | None
    git: dict
    wandb_id: str | None
    status: str
    stopped: dict | None = None
    data: datasets.Description | None = None

    @property
    def finished(self) -> bool:
        return self.status == layout.FINISHED

    @property
    def best_val_accuracy(self) -> float | None:
        return ((self.final or {}).get("best_validation") or {}).get("val_accuracy")

    @property
    def test_accuracy(self) -> float | None:
        return ((self.final or {}).get("test") or {}).get("accuracy")

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of one logged scalar, by step; a step logged again (a resumed run) keeps its last value."""
        if self.history is None:
            raise ValueError(f"the history of {self.path} was not loaded (runs.load(..., history=True))")
        points = {row["step"]: row[key] for row in self.history if key in row}
        steps = sorted(points)
        return np.array(steps, dtype=int), np.array([points[s] for s in steps], dtype=float)


# ---------------------------------------------------------------- references


def is_wandb_path(reference: str) -> bool:
    """`entity/project/run_id` (or `entity/project/artifact:alias`), and not a local path."""
    parts = reference.split("/")
    return (
        len(parts) == 3 and all(parts) and not reference.startswith(("/", ".", "~")) and not os.path.exists(reference)
    )


def is_sweep_root(path: str) -> bool:
    """Whether `path` is a sweep's root (it holds sweep.json), not a run's workdir (which holds config.json)."""
    return (
        os.path.isdir(path)
        and os.path.isfile(os.path.join(path, layout.SWEEP))
        and not os.path.isfile(os.path.join(path, layout.CONFIG))
    )


def sweep_members(root: str) -> list[str]:
    """The workdirs of a sweep root's trials, by trial number (an Optuna sweep: each holds `trial.json`).

    A root from the grid runner before Optuna lists its runs in `sweep.json` (trained or not); those are read too.
    """
    root = os.path.abspath(root)
    record = files.read_json(os.path.join(root, layout.SWEEP))
    if isinstance(record, dict) and "runs" in record:
        try:
            return [os.path.join(root, run["name"]) for run in record["runs"]]
        except (KeyError, TypeError):
            raise ConfigError(f"{root}/sweep.json does not list the sweep's runs") from None
    trials = []
    for path in glob.glob(os.path.join(root, "*", layout.TRIAL)):
        number = files.read_json(path).get("number")
        trials.append((number if isinstance(number, int) else 10**9, os.path.dirname(path)))
    return [folder for _, folder in sorted(trials)]


def offline_run_folders(path: str) -> list[str]:
    """The offline W&B run folders of a run folder, a workdir (one per start, in order) or a sweep root."""
    if glob.glob(os.path.join(path, "run-*.wandb")):
        return [path]
    if is_sweep_root(path):
        return [folder for member in sweep_members(path) for folder in offline_run_folders(member)]
    return sorted(glob.glob(os.path.join(path, layout.WANDB, "offline-run-*"))) or sorted(
        glob.glob(os.path.join(path, "offline-run-*"))
    )


def load(
    reference: str, *, history: bool = True, predictions: bool = True, download_dir: str | None = None
) -> RunRecord:
    """The record of one run.

    Args:
      reference: a run workdir, an offline W&B run folder, or a W&B run path / artifact.
      history, predictions: False skips reading them (the fields stay None): faster for a config or a status.
      download_dir: where a W&B run's predictions artifact is downloaded (default: a temporary folder).

    Raises:
      ConfigError: the reference is not a run (one line saying what it is).
      MnistFlaxError: a W&B run without a key, or one W&B cannot give.
    """
    path = os.path.expanduser(reference)
    if os.path.isdir(path):
        path = os.path.abspath(path)
        if os.path.isfile(os.path.join(path, layout.CONFIG)):
            return _load_workdir(path, history, predictions)
        if glob.glob(os.path.join(path, "run-*.wandb")):
            return _load_offline(path, history, predictions)
        if is_sweep_root(path):
            members = sweep_members(path)
            example = f" (e.g. {members[0]})" if members else ""
            raise ConfigError(f"{path} is a sweep of {len(members)} runs, not one run: name one of them{example}")
        raise ConfigError(
            f"{path} is not a run workdir (no config.json), an offline W&B run folder (no run-*.wandb) or a sweep"
        )
    if is_wandb_path(reference):
        return _load_online(reference, history, predictions, download_dir)
    raise ConfigError(f"{reference}: no such run folder, and not a W&B run path (entity/project/run_id)")


def expand(reference: str, **kwargs) -> list[RunRecord]:
    """A sweep root's members that have started (in the sweep's order), else [load(reference)]; kwargs go to load."""
    path = os.path.expanduser(reference)
    if is_sweep_root(path):
        members = sweep_members(path)
        return [load(m, **kwargs) for m in members if os.path.isfile(os.path.join(m, layout.CONFIG))]
    return [load(reference, **kwargs)]


# ---------------------------------------------------------------- a workdir


def _load_workdir(path: str, history: bool, predictions: bool) -> RunRecord:
    config = schema.flatten(files.read_json(os.path.join(path, layout.CONFIG)))
    requested_path = os.path.join(path, layout.CONFIG_REQUESTED)
    requested = schema.flatten(files.read_json(requested_path)) if os.path.isfile(requested_path) else dict(config)
    final = files.read_json(os.path.join(path, layout.FINAL_METRICS), None)
    stopped = files.read_json(os.path.join(path, layout.STOPPED), None)
    if stopped is not None:  # stopped.json is removed when a later start finishes, so it is the latest word
        status = stopped.get("status") if stopped.get("status") in layout.STOPPED_STATUSES else layout.FAILED
    else:
        status = layout.FINISHED if final is not None else layout.INCOMPLETE
    predictions_path = os.path.join(path, layout.PREDICTIONS)
    git = (final or {}).get("git") or _workdir_git(path)
    return RunRecord(
        name=os.path.basename(path),
        source="workdir",
        path=path,
        config=config,
        requested_config=requested,
        config_changes=files.read_json(os.path.join(path, layout.CONFIG_CHANGES), None) or _no_changes(),
        history=_read_jsonl(os.path.join(path, layout.METRICS)) if history else None,
        final=final,
        predictions=_read_predictions(predictions_path) if predictions and os.path.isfile(predictions_path) else None,
        git=git,
        wandb_id=_read_text(os.path.join(path, layout.WANDB_RUN_ID))
        or ((final or {}).get("wandb") or {}).get("run_id"),
        status=status,
        stopped=stopped,
        data=datasets.recorded(files.read_json(os.path.join(path, layout.DATA), None), config.get("data.name")),
    )


def _workdir_git(path: str) -> dict:
    """The git state a run recorded before it finished: in the config of its latest W&B run folder."""
    folders = offline_run_folders(path)
    if not folders:
        return {}
    try:
        return _git(wandb_files.config_values(wandb_files.summarize(wandb_files.run_file(folders[-1]))))
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------- W&B


def _load_offline(run_dir: str, history: bool, predictions: bool) -> RunRecord:
    try:
        run = wandb_files.summarize(wandb_files.run_file(run_dir))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the W&B run folder {run_dir}: {e}") from None
    run["config"] = wandb_files.config_values(run)
    status = {None: layout.INCOMPLETE, layout.EXIT_OK: layout.FINISHED, layout.EXIT_PREEMPTED: layout.PREEMPTED}.get(
        run["exit_code"], layout.FAILED
    )
    if status == layout.FAILED and run["summary"].get(layout.SUMMARY_STATUS) in layout.STOPPED_STATUSES:
        status = run["summary"][layout.SUMMARY_STATUS]  # pruned: a verdict the run recorded, not a failure
    parent, preds = os.path.dirname(run_dir), None
    in_workdir = os.path.basename(parent) == layout.WANDB
    if predictions:  # the logged table; else, for a finished start of WORKDIR/wandb/, the workdir's file
        preds = _table_predictions(run_dir, run["summary"])
        enclosing_csv = os.path.join(os.path.dirname(parent), layout.PREDICTIONS)
        if preds is None and status == layout.FINISHED and in_workdir and os.path.isfile(enclosing_csv):
            preds = _read_predictions(enclosing_csv)
    name = os.path.basename(os.path.dirname(parent) if in_workdir else run_dir)
    return _from_wandb(run, "wandb_offline", run_dir, name, status, history, preds)


def _load_online(reference: str, history: bool, predictions: bool, download_dir: str | None) -> RunRecord:
    from mnist_flax.tracking import wandb_run  # here: reading a local run needs nothing of tracking's

    if wandb_run.read_token() is None:
        raise MnistFlaxError(
            f"{reference}: no such folder, and reading it as a W&B run path needs a W&B key: "
            "set WANDB_API_KEY (or WANDB_TOKEN) in the environment, or run `wandb login`"
        )
    try:
        import wandb

        api = wandb.Api()
        run = api.artifact(reference).logged_by() if ":" in reference else api.run(reference)
        summary = dict(run.summary)
        rows = list(run.scan_history()) if history else []
        preds = None
        if predictions:
            folder = os.path.join(download_dir or os.path.join(tempfile.gettempdir(), "mnist_flax_wandb"), run.id)
            artifact = next((a for a in run.logged_artifacts() if a.type == "predictions"), None)
            if artifact is not None:
                preds = _read_predictions(os.path.join(artifact.download(root=folder), layout.PREDICTIONS))
        raw = {"run_id": run.id, "config": dict(run.config), "history": rows, "summary": summary, "exit_code": None}
        state, path, name = run.state, "/".join(run.path), run.name or run.id
    except MnistFlaxError:
        raise
    except Exception as e:  # not found, no permission, no network: W&B's own message, first line
        message = first_line(e)
        raise MnistFlaxError(f"cannot read W&B run {reference}: {message}") from None
    return _from_wandb(raw, "wandb_online", path, name, _online_status(state, summary), history, preds)


def _online_status(state: str, summary: dict) -> str:
    """W&B's run state as one of layout.STATUSES; a stopped run ended with a non-zero exit, so W&B says "failed":
    the status the run recorded in its summary says which."""
    if state == "finished":
        return layout.FINISHED
    if state in ("preempted", "preempting"):
        return layout.PREEMPTED
    if state == "failed":
        recorded = summary.get(layout.SUMMARY_STATUS)
        return recorded if recorded in layout.STOPPED_STATUSES else layout.FAILED
    return layout.INCOMPLETE  # running, pending, crashed, killed


def _from_wandb(
    run: dict, source: str, path: str, name: str, status: str, history: bool, predictions: dict | None
) -> RunRecord:
    """The record of a W&B run from what `wandb_files.summarize` gives (an online run's the same way)."""
    config, summary, wandb_id = run["config"], run["summary"], run["run_id"]
    rows = [r for r in map(_scalars, run["history"]) if "step" in r and len(r) > 1]
    scalars = _scalars(summary)
    git = _git(config)
    final = None
    if status == layout.FINISHED and "test/accuracy" in scalars:
        final = _final(scalars, rows, predictions, git, {"mode": source.removeprefix("wandb_"), "run_id": wandb_id})
    stopped = None
    if status in layout.STOPPED_STATUSES:
        reason = str(summary.get(layout.SUMMARY_STOPPED, ""))
        stopped = {"status": status, "reason": reason, "step": scalars.get("step"), "exit_code": run["exit_code"]}
    fields = {k: v for k, v in config.items() if not layout.is_wandb_extra(k)}
    requested = config.get(layout.WANDB_CONFIG_REQUESTED)
    return RunRecord(
        name=name,
        source=source,
        path=path,
        config=fields,
        requested_config=schema.flatten(requested) if isinstance(requested, dict) else dict(fields),
        config_changes=config.get(layout.WANDB_CONFIG_CHANGES) or _no_changes(),
        history=rows if history else None,
        final=final,
        predictions=predictions,
        git=git,
        wandb_id=wandb_id,
        status=status,
        stopped=stopped,
        data=datasets.recorded(config.get(layout.WANDB_DATA), fields.get("data.name")),
    )


def _final(scalars: dict, history: list[dict] | None, predictions: dict | None, git: dict, wandb: dict) -> dict:
    """final_metrics.json's keys, as far as W&B holds them: the summary, the best validation row, the predictions."""
    best_row = None
    for row in history or []:
        if "val/accuracy" in row and layout.improves(row["val/accuracy"], best_row and best_row["val/accuracy"]):
            best_row = row
    best = {"val_accuracy": scalars.get("best_val_accuracy", best_row and best_row["val/accuracy"])}
    if best_row is not None:
        best["step"] = best_row["step"]
    test = _report(scalars, "test")
    if predictions is not None:
        num_classes = predictions["probs"].shape[1]
        matrix = np.zeros((num_classes, num_classes), dtype=int)
        np.add.at(matrix, (predictions["label"], predictions["predicted"]), 1)
        test.update(num_examples=len(predictions["label"]), confusion_matrix=matrix.tolist())
    return {
        "best_validation": best,
        "validation": {k: v for k, v in _report(best_row, "val").items() if k != "eval_seconds"} if best_row else None,
        "test": test,
        "steps": scalars.get("step"),
        "compile_seconds": scalars.get("compile_seconds"),
        "git": git,
        "wandb": wandb,
    }


def _report(scalars: dict, prefix: str) -> dict:
    """A classification report ({"accuracy": ..., "per_class": {"f1": [...], ...}}) from `prefix/` scalars."""
    names = {k.removeprefix(prefix + "/"): v for k, v in scalars.items() if k.startswith(prefix + "/")}
    report = {k: v for k, v in names.items() if "_class_" not in k}
    counts = {m: sum(k.startswith(f"{m}_class_") for k in names) for m in PER_CLASS}
    report["per_class"] = {m: [names[f"{m}_class_{c}"] for c in range(n)] for m, n in counts.items() if n}
    return report


def _scalars(row) -> dict:
    """The numbers of a W&B history row or summary: no W&B keys (`_step`), no media (tables, images, ...)."""
    media = {key.rsplit("/", 1)[0] for key in row if key.endswith("/_type")}
    return {
        key: value
        for key, value in dict(row).items()
        if not key.startswith("_")
        and isinstance(value, (int, float))
        and not any(key.startswith(m + "/") for m in media)
    }


def _no_changes() -> dict:
    return {"changed": {}, "added": {}, "removed": {}}


def _git(config: dict) -> dict:
    return {
        k.removeprefix(layout.WANDB_GIT_PREFIX): v for k, v in config.items() if k.startswith(layout.WANDB_GIT_PREFIX)
    }


def _table_predictions(run_dir: str, summary: dict) -> dict[str, np.ndarray] | None:
    """The logged `test/predictions` table of an offline run folder, as read_predictions gives predictions.csv."""
    relative = summary.get("test/predictions/path")
    paths = [os.path.join(run_dir, "files", relative)] if relative else []
    paths += sorted(glob.glob(os.path.join(run_dir, "files", "media", "table", "test", "predictions_*.table.json")))
    path = next((p for p in paths if os.path.isfile(p)), None)
    if path is None:
        return None
    table = files.read_json(path)
    data = np.asarray(table["data"], dtype=float).reshape(-1, len(table["columns"]))
    column = {name: i for i, name in enumerate(table["columns"])}
    return {
        "index": data[:, column["index"]].astype(int),
        "label": data[:, column["label"]].astype(int),
        "predicted": data[:, column["predicted"]].astype(int),
        "confidence": data[:, column["confidence"]],
        "probs": data[:, [i for name, i in column.items() if name.startswith("prob_")]],
    }


# ---------------------------------------------------------------- files


def _read_jsonl(path: str) -> list[dict]:
    """metrics.jsonl; a last line cut short (a killed run) is left out, a bad line before it is an error."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.read().splitlines()
    last = max((n for n, line in enumerate(lines, 1) if line.strip()), default=0)
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number < last:
                raise ConfigError(f"{path}:{number}: not a JSON object") from None
    return rows


def _read_text(path: str) -> str | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip() or None


def _read_predictions(path: str) -> dict[str, np.ndarray]:
    try:
        return files.read_predictions(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
