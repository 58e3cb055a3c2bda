"""W&B artifacts as plain descriptions: built, sent, and, when W&B does not take one, recorded to send later.

An artifact is described by a JSON-able dict (its spec): what it is (name, type, metadata, aliases), what it
holds (local files and folders, references, small JSON contents) and what the run does with it ("log" it as an
output, "use" it as an input, or "use_reference": declare an artifact already on the server as an input). The
Tracker sends specs; when W&B refuses one (a server that rejects it, a quota, an entity the key cannot write,
files gone), the spec goes into the workdir's `wandb_undelivered.json` with why, and the run goes on.
`deliver(workdir)` (run by `python -m mnist_flax sync WORKDIR`) resumes the W&B run and sends each recorded
spec again, waiting until the server has committed it, then removes it from the file: a second sync sends
nothing twice. W&B keeps one version per content digest, so an artifact that did arrive after all and is sent
again makes no new version.
"""

import contextlib
import datetime
import json
import os
import sys
import threading

from mnist_flax import layout
from mnist_flax.errors import MnistFlaxError, TrackingError, first_line
from mnist_flax.tracking import wandb_internals

ACTIONS = ("log", "use", "use_reference")
_record_lock = threading.Lock()  # a checkpoint's artifact may be sent from a background thread


def spec(
    name: str,
    type: str,
    action: str = "log",
    *,
    metadata: dict | None = None,
    aliases: list[str] | None = None,
    files: dict[str, str] | None = None,
    dirs: list[str] | None = None,
    references: dict[str, str] | None = None,
    contents: dict[str, object] | None = None,
    reference: str | None = None,
) -> dict:
    """An artifact's description. `files`: name in the artifact -> local path; `dirs`: local folders added
    whole; `references`: name -> URI (not uploaded); `contents`: name -> a JSON value written as that file;
    `reference`: for "use_reference", the server's `entity/project/name:alias`."""
    assert action in ACTIONS, action
    return {
        "action": action,
        "name": name,
        "type": type,
        "metadata": metadata or {},
        "aliases": list(aliases or []),
        "files": {k: os.path.abspath(v) for k, v in (files or {}).items()},
        "dirs": [os.path.abspath(d) for d in dirs or []],
        "references": dict(references or {}),
        "contents": dict(contents or {}),
        "reference": reference,
    }


def build(description: dict):
    """The wandb.Artifact a spec describes (raises when a file or folder it names is gone)."""
    import wandb

    artifact = wandb.Artifact(description["name"], type=description["type"], metadata=description["metadata"] or None)
    for name, value in description["contents"].items():
        with artifact.new_file(name) as f:
            json.dump(value, f, indent=2, sort_keys=True)
    for name, path in description["files"].items():
        artifact.add_file(path, name=name)
    for folder in description["dirs"]:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder} is gone")
        artifact.add_dir(folder)
    for name, uri in description["references"].items():
        artifact.add_reference(uri, name=name, checksum=False)
    return artifact


def send(run, description: dict, offline: bool, wait: bool = False) -> None:
    """Sends a spec to `run`; with `wait` (online), returns only once the server has committed a logged one."""
    if description["action"] == "use_reference":
        run.use_artifact(description["reference"], type=description["type"])
        return
    artifact = build(description)
    if description["action"] == "use":
        wandb_internals.use_new_artifact(run, artifact, offline=offline)
        return
    logged = run.log_artifact(artifact, aliases=description["aliases"] or None)
    if wait and not offline:
        logged.wait()


def label(description: dict) -> str:
    """How a warning names an artifact: `the model artifact model-abc (aliases latest, step-20)`."""
    name = description["reference"] if description["action"] == "use_reference" else description["name"]
    aliases = f" (aliases {', '.join(description['aliases'])})" if description["aliases"] else ""
    return f"the {description['type']} artifact {name}{aliases}"


# --- The record of what W&B did not take ---------------------------------------------------------------------


def record_path(workdir: str) -> str:
    return os.path.join(workdir, layout.WANDB_UNDELIVERED)


def read_undelivered(workdir: str) -> list[dict]:
    """The artifacts a run recorded as not delivered, oldest first ([] when none); MnistFlaxError when unreadable."""
    path = record_path(workdir)
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            entries = json.load(f)["artifacts"]
        assert isinstance(entries, list) and all(e["action"] in ACTIONS for e in entries)
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
        raise MnistFlaxError(f"{path} cannot be read ({first_line(e, 120)}); fix or remove it") from None
    return entries


def write_undelivered(workdir: str, entries: list[dict]) -> None:
    """Replaces the record (atomically); removes the file when nothing is left undelivered."""
    path = record_path(workdir)
    if not entries:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        return
    with open(path + ".tmp", "w") as f:
        json.dump({"deliver_with": f"python -m mnist_flax sync {workdir}", "artifacts": entries}, f, indent=2)
    os.replace(path + ".tmp", path)


def _key(entry: dict) -> tuple:
    return (entry["action"], entry["name"], entry["reference"], tuple(entry["aliases"]), tuple(entry["dirs"]))


def record_undelivered(workdir: str, run, description: dict, error: Exception) -> dict:
    """Adds a spec W&B refused to the workdir's record (replacing an equal one), with the run and why."""
    entry = {
        **description,
        "run_id": run.id,
        "project": run.project,
        "entity": run.entity,
        "why": f"{type(error).__name__}: {first_line(error, 200, last=True)}",
        "at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    with _record_lock:
        entries = [e for e in read_undelivered(workdir) if _key(e) != _key(entry)]
        write_undelivered(workdir, [*entries, entry])
    return entry


def deliver(workdir: str, settings=None) -> tuple[list[dict], list[dict]]:
    """Sends each artifact the workdir's record lists, into its W&B run (resumed online), and keeps in the record
    only those not delivered. Returns (delivered, left). TrackingError when W&B itself fails (the record then
    still lists everything not delivered)."""
    import wandb

    entries = read_undelivered(workdir)
    delivered, refused = [], {}  # refused: id(entry) -> why, this time
    runs: dict[tuple, list[dict]] = {}
    for entry in entries:
        runs.setdefault((entry["entity"], entry["project"], entry["run_id"]), []).append(entry)
    try:
        for (entity, project, run_id), group in runs.items():
            try:
                run = wandb.init(
                    id=run_id, project=project, entity=entity or None, resume="allow", mode="online", dir=workdir,
                    settings=settings or wandb.Settings(silent=True, save_code=False, disable_git=True),
                )  # fmt: skip
            except Exception as e:
                raise TrackingError(
                    f"W&B could not resume run {run_id} to deliver its artifacts: {first_line(e)}"
                ) from None
            try:
                for entry in group:
                    try:
                        send(run, entry, offline=False, wait=True)
                        delivered.append(entry)
                    except Exception as e:
                        if wandb_internals.stream_failed(e):
                            raise TrackingError(
                                f"W&B stopped while delivering run {run_id}'s artifacts: {first_line(e)}"
                            ) from None
                        refused[id(entry)] = f"{type(e).__name__}: {first_line(e, 200, last=True)}"
                        print(f"warning: W&B still refuses {label(entry)} ({refused[id(entry)]})", file=sys.stderr)
            finally:
                with contextlib.suppress(Exception):
                    run.finish()
    finally:
        left = [{**e, "why": refused.get(id(e), e["why"])} for e in entries if all(e is not d for d in delivered)]
        write_undelivered(workdir, left)
    return delivered, left
