"""An artifact W&B refuses costs only that artifact: one warning, an entry in wandb_undelivered.json, the run's
stream goes on; `sync` delivers the entries later, once, and keeps those still refused (tracking/wandb_artifacts.py).
These use a stand-in for wandb's Run; tests/test_wandb_server.py does the same against a real server."""

import json
import os

import pytest

from mnist_flax import layout
from mnist_flax.commands import sync
from mnist_flax.tracking import wandb_artifacts, wandb_run


class FakeRun:
    """The part of wandb's Run that artifacts use; `refuse` maps an artifact name to the error W&B gives it."""

    def __init__(self, refuse: dict | None = None, run_id: str = "abcd1234"):
        self.id, self.project, self.entity = run_id, "mnist_flax", "someone"
        self.refuse = refuse or {}
        self.logged, self.used, self.finished = [], [], False
        self.summary = {}

    def _check(self, name):
        if name in self.refuse:
            raise self.refuse[name]

    def log_artifact(self, artifact, aliases=None):
        self._check(artifact.name)
        self.logged.append((artifact.name, aliases))

        class Logged:
            def wait(self):
                return self

        return Logged()

    def use_artifact(self, artifact, type=None):
        name = artifact if isinstance(artifact, str) else artifact.name
        self._check(name)
        self.used.append(name)

    def finish(self, exit_code=0):
        self.finished = True


def _tracker(tmp_path, run) -> wandb_run.Tracker:
    return wandb_run.Tracker(run, "online", {"commit": "0" * 40, "dirty": False}, str(tmp_path))


def _checkpoint(tmp_path) -> str:
    step = tmp_path / "checkpoints" / "20"
    step.mkdir(parents=True)
    (step / "weights").write_bytes(b"\0" * 64)
    return str(step)


def test_a_refused_artifact_is_one_warning_and_a_record_and_the_run_goes_on(tmp_path, capsys):
    run = FakeRun(refuse={"fashion_mnist": ValueError("unexpected artifact state")})
    tracker = _tracker(tmp_path, run)
    (tmp_path / "a.gz").write_bytes(b"idx")
    tracker.use_dataset("fashion_mnist", f"idx:{tmp_path}", {"train": "ab", "files": {"a.gz": "cd"}}, {"train": 10})
    tracker.log_checkpoint(_checkpoint(tmp_path), 20, ["latest"], {"step": 20})
    tracker.set_summary({"test/accuracy": 0.5})

    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line.lower()]
    assert len(warnings) == 1 and warnings[0].startswith("warning: W&B did not take the dataset artifact fashion_mnist")
    err = warnings[0]
    assert "unexpected artifact state" in err and f"python -m mnist_flax sync {tmp_path}" in err
    assert tracker.active and tracker.failure is None  # the stream goes on: the model and the summary arrive
    assert run.logged == [("model-abcd1234", ["latest"])] and run.summary == {"test/accuracy": 0.5}
    (entry,) = wandb_artifacts.read_undelivered(str(tmp_path))
    assert entry["name"] == "fashion_mnist" and entry["action"] == "use" and entry["run_id"] == "abcd1234"
    assert entry["why"] == "ValueError: unexpected artifact state"
    assert (
        entry["references"] == {"a.gz": f"file://{tmp_path}/a.gz"}
        and entry["contents"]["fingerprint.json"]["train"] == "ab"
    )


def test_a_lost_stream_still_stops_wandb_for_the_rest_of_the_run(tmp_path, capsys):
    run = FakeRun(refuse={"model-abcd1234": ConnectionResetError("connection reset by peer")})
    tracker = _tracker(tmp_path, run)
    tracker.log_checkpoint(_checkpoint(tmp_path), 20, ["latest"], {})
    tracker.set_summary({"test/accuracy": 0.5})
    assert not tracker.active and "ConnectionResetError" in tracker.failure
    assert run.summary == {}  # nothing more sent
    assert not os.path.exists(tmp_path / layout.WANDB_UNDELIVERED)  # not an artifact's fault: no record
    assert "\nwarning: W&B stopped accepting data" in "\n" + capsys.readouterr().err


def test_an_artifact_whose_files_are_gone_is_recorded_not_fatal(tmp_path, capsys):
    tracker = _tracker(tmp_path, FakeRun())
    tracker.log_checkpoint(str(tmp_path / "checkpoints" / "40"), 40, ["latest"], {})
    assert tracker.active
    (entry,) = wandb_artifacts.read_undelivered(str(tmp_path))
    assert entry["why"].startswith("FileNotFoundError") and entry["aliases"] == ["latest"]


def test_deliver_sends_each_recorded_artifact_once_and_keeps_the_refused(tmp_path, monkeypatch, capsys):
    refusing = FakeRun(
        refuse={"fashion_mnist": ValueError("unexpected artifact state"), "model-abcd1234": ValueError("quota")}
    )
    tracker = _tracker(tmp_path, refusing)
    tracker.use_dataset("fashion_mnist", "idx:/data", {"train": "ab"}, {"train": 10})
    tracker.log_checkpoint(_checkpoint(tmp_path), 20, ["latest", "best"], {})
    assert len(wandb_artifacts.read_undelivered(str(tmp_path))) == 2

    import wandb

    server = FakeRun(refuse={"fashion_mnist": ValueError("still no")})
    resumed = []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: resumed.append(kwargs) or server)
    delivered, left = wandb_artifacts.deliver(str(tmp_path))
    assert resumed[0]["id"] == "abcd1234" and resumed[0]["resume"] == "allow" and resumed[0]["mode"] == "online"
    assert resumed[0]["entity"] == "someone" and resumed[0]["project"] == "mnist_flax" and server.finished
    assert [e["name"] for e in delivered] == ["model-abcd1234"] and server.logged == [
        ("model-abcd1234", ["latest", "best"])
    ]
    (entry,) = wandb_artifacts.read_undelivered(str(tmp_path))  # only the refused one is left, with today's reason
    assert entry["name"] == "fashion_mnist" and entry["why"] == "ValueError: still no" and left == [entry]

    server.refuse = {}
    delivered, left = wandb_artifacts.deliver(str(tmp_path))
    assert [e["name"] for e in delivered] == ["fashion_mnist"] and left == []
    assert server.logged == [("model-abcd1234", ["latest", "best"])]  # the model is not sent twice
    assert not os.path.exists(tmp_path / layout.WANDB_UNDELIVERED)  # nothing left: the record goes
    assert wandb_artifacts.deliver(str(tmp_path)) == ([], [])


def test_a_stream_lost_while_delivering_keeps_everything_recorded(tmp_path, monkeypatch, capsys):
    tracker = _tracker(tmp_path, FakeRun(refuse={"model-abcd1234": ValueError("quota")}))
    tracker.log_checkpoint(_checkpoint(tmp_path), 20, ["latest"], {})
    import wandb

    monkeypatch.setattr(wandb, "init", lambda **kwargs: FakeRun(refuse={"model-abcd1234": BrokenPipeError("gone")}))
    with pytest.raises(wandb_run.TrackingError, match="W&B stopped while delivering"):
        wandb_artifacts.deliver(str(tmp_path))
    assert [e["why"] for e in wandb_artifacts.read_undelivered(str(tmp_path))] == ["ValueError: quota"]


def test_sync_takes_an_online_run_with_only_a_record_and_refuses_a_dirty_one(tmp_path, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / layout.CONFIG).write_text("{}")
    with pytest.raises(sync.MnistFlaxError, match="no offline W&B run, and no undelivered"):
        sync._collect([str(workdir)], force=False)
    record = {
        "artifacts": [{**wandb_artifacts.spec("m", "model"), "run_id": "r", "project": "p", "entity": None, "why": "x"}]
    }
    (workdir / layout.WANDB_UNDELIVERED).write_text(json.dumps(record))
    assert sync.undelivered_workdirs(str(workdir)) == [str(workdir)]
    assert sync.main([str(workdir), "--dry-run"]) == 2  # no git record: taken for dirty, refused before any upload
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dirty tree" in err
    assert sync.main([str(workdir), "--dry-run", "--force"]) == 0
    assert "would deliver the model artifact m to run r (x)" in capsys.readouterr().out


def test_an_unreadable_record_is_one_line(tmp_path, capsys):
    (tmp_path / layout.WANDB_UNDELIVERED).write_text("{not json")
    assert sync.main([str(tmp_path), "--dry-run", "--force"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "wandb_undelivered.json cannot be read" in err
