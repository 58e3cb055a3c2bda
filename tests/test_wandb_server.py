"""The upload path against a W&B-compatible server: openwandb 0.5.25 on loopback (tests/services.py), read back
through its own HTTP API. An online run's config, history and summary arrive, although the server refuses its
dataset artifact (openwandb rejects wandb 0.31's artifact query: the refusal is the server's own); offline runs,
a resumed run's two segments and a sweep's runs arrive through `sync`; a dirty tree sends nothing; the token is
never on a command line or in a file the run writes. What a real W&B server adds: docs/internals/tracking.md."""

import contextlib
import json
import os
import subprocess
import sys
import threading

import pytest
from conftest import REPO_ROOT, SUBPROCESS_ENV, run_main, run_sweep, tiny_overrides
from services import OpenWandb, OwnWandb
from shared import copy_run

from mnist_flax import layout
from mnist_flax.tracking import wandb_artifacts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server():
    """openwandb on loopback; or, with MNIST_FLAX_TEST_WANDB_SERVER=URL (`make test-wandb-server`), that server."""
    url = os.environ.get("MNIST_FLAX_TEST_WANDB_SERVER")
    started = OwnWandb(url) if url else OpenWandb()
    try:
        yield started
    finally:
        started.close()


@contextlib.contextmanager
def command_lines_watched(secret: str):
    """Yields a list that gathers every process command line holding `secret`, read from /proc while the block runs."""
    seen, stop = [], threading.Event()

    def watch():
        needle = secret.encode()
        while not stop.wait(0.05):
            for entry in os.listdir("/proc"):
                if entry.isdigit():
                    with contextlib.suppress(OSError), open(f"/proc/{entry}/cmdline", "rb") as f:
                        line = f.read()
                    if needle in line:
                        seen.append(line.replace(b"\0", b" ").decode(errors="replace"))

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join()


def files_holding(folder, secret: str) -> list[str]:
    """The files under `folder` whose bytes hold `secret` (W&B's debug logs included)."""
    found = []
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            with contextlib.suppress(OSError), open(path, "rb") as f:
                if secret.encode() in f.read():
                    found.append(path)
    return found


def local_history(workdir, key: str) -> list[float]:
    with open(os.path.join(workdir, layout.METRICS)) as f:
        return [row[key] for row in map(json.loads, f) if key in row]


def server_history(run: dict, key: str) -> list[float]:
    return [point["value"] for point in run["metrics"].get(key, [])]


def run_id_of(workdir) -> str:
    with open(os.path.join(workdir, layout.WANDB_RUN_ID)) as f:
        return f.read().strip()


def sync(*paths, server) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mnist_flax", "sync", *map(str, paths), "--force"],  # the checkout may be dirty
        cwd=REPO_ROOT, env={**os.environ, **SUBPROCESS_ENV, **server.env}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_an_online_run_arrives_whole_although_the_server_refuses_an_artifact(server, tiny_data_dir, tmp_path):
    workdir = tmp_path / "online"
    online = {"wandb.mode": "online", "wandb.allow_dirty": True, "num_epochs": 1, "log_every_steps": 1}
    with command_lines_watched(server.key) as seen:
        result = run_main(
            ["--config=configs/mlp.py", f"--workdir={workdir}", *tiny_overrides(tiny_data_dir, **online)],
            env=server.env,
        )
    assert result.returncode == 0, result.stderr[-3000:]
    # The token: never on a command line, never in a file of the run (W&B's logs included) or its output.
    assert seen == [] and files_holding(workdir, server.key) == []
    assert server.key not in result.stdout + result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    if not server.refuses_artifacts:  # a real W&B server: every artifact arrives
        assert warnings == [] and "fashion_mnist" in [a["name"] for a in server.run(run_id_of(workdir))["artifacts"]]
        assert wandb_artifacts.read_undelivered(str(workdir)) == []
        return
    assert len(warnings) == 1, warnings  # the refused artifact, and nothing more: W&B did not stop
    assert warnings[0].startswith(
        "warning: W&B did not take the dataset artifact fashion_mnist (ValueError: unexpected artifact state)"
    )
    run_id = run_id_of(workdir)
    on_server = server.run(run_id)
    assert on_server["state"] == "finished"
    with open(workdir / layout.CONFIG) as f:
        config = json.load(f)
    logged_config = json.loads(on_server["config_json"])
    for field in ("batch_size", "optimizer.learning_rate", "model.name", "data.validation_size"):
        flat = config
        for part in field.split("."):
            flat = flat[part]
        assert logged_config[field]["value"] == flat, field
    # The full history arrived after the refusal (the dataset is declared before the first step).
    loss = local_history(workdir, "train/loss")
    assert len(loss) >= 4 and server_history(on_server, "train/loss") == pytest.approx(loss)
    assert server_history(on_server, "val/accuracy") == pytest.approx(local_history(workdir, "val/accuracy"))
    with open(workdir / layout.FINAL_METRICS) as f:
        final = json.load(f)
    assert json.loads(on_server["summary_json"])["test/loss"] == pytest.approx(final["test"]["loss"])
    names = [a["name"] for a in on_server["artifacts"]]
    assert f"model-{run_id}" in names and f"predictions-{run_id}" in names and "fashion_mnist" not in names
    (entry,) = wandb_artifacts.read_undelivered(str(workdir))
    assert entry["name"] == "fashion_mnist" and entry["why"] == "ValueError: unexpected artifact state"

    # `sync` tries to deliver it; openwandb still refuses: the record stays, and nothing that arrived is sent again.
    with command_lines_watched(server.key) as seen_by_sync:
        delivery = sync(workdir, server=server)
    assert delivery.returncode == 1, delivery.stdout + delivery.stderr
    assert "W&B still refuses the dataset artifact fashion_mnist" in delivery.stderr
    assert "Traceback" not in delivery.stderr
    assert [a["name"] for a in server.run(run_id)["artifacts"]] == names
    assert [e["name"] for e in wandb_artifacts.read_undelivered(str(workdir))] == ["fashion_mnist"]
    assert seen_by_sync == [] and files_holding(workdir, server.key) == []
    assert server.key not in delivery.stdout + delivery.stderr


def test_offline_runs_a_resumed_run_and_a_sweep_arrive_through_sync(
    server,
    finished_mlp_run,
    resumed_mlp_run,
    tiny_data_dir,
    tmp_path,
):
    # Copies of tests/shared.py's runs: syncing marks a run's offline folders as synced.
    finished = copy_run(finished_mlp_run, tmp_path / "finished")
    resumed_offline_run = copy_run(resumed_mlp_run, tmp_path / "resumed")
    root = str(tmp_path / "sweep")
    sweep = run_sweep(root, "configs/mlp.py", "optimizer.learning_rate=0.001,0.003", tiny_data_dir,
                      num_epochs=1, **{"checkpoint.enabled": False})  # fmt: skip
    assert sweep.returncode == 0, sweep.stdout[-2000:] + sweep.stderr[-2000:]
    members = sorted(
        os.path.join(root, m) for m in os.listdir(root) if os.path.isfile(os.path.join(root, m, layout.WANDB_RUN_ID))
    )
    assert len(members) == 2

    result = sync(finished, resumed_offline_run, root, server=server)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]

    for workdir in (finished, resumed_offline_run, *members):
        on_server = server.run(run_id_of(workdir))
        assert on_server["state"] == "finished", workdir
        # Every logged value (sorted: the server orders a resumed run's two segments by its own row index).
        loss = sorted(local_history(workdir, "train/loss"))
        assert sorted(server_history(on_server, "train/loss")) == pytest.approx(loss), workdir
        with open(os.path.join(workdir, layout.FINAL_METRICS)) as f:
            final = json.load(f)
        assert json.loads(on_server["summary_json"])["test/loss"] == pytest.approx(final["test"]["loss"]), workdir
    # The artifacts of a run with checkpoints: its model and its predictions; the data it trained on (its input)
    # only where the server lists a run's inputs (openwandb lists only what a run created).
    run_id = run_id_of(finished)
    names = {a["name"] for a in server.run(run_id)["artifacts"]}
    assert {f"model-{run_id}", f"predictions-{run_id}"} <= names
    assert server.refuses_artifacts or "fashion_mnist" in names
    # Both segments of the resumed run went into its one run: steps of the first and of the second start.
    steps = server_history(server.run(run_id_of(resumed_offline_run)), "step")
    assert min(steps) < 20 and max(steps) == 40


def test_a_dirty_tree_sends_nothing(server, tiny_data_dir, tmp_path):
    clone = str(tmp_path / "repo")
    subprocess.run(["git", "clone", "-q", REPO_ROOT, clone], check=True, timeout=120)
    with open(os.path.join(clone, "configs", "default.py"), "a") as f:
        f.write("\n# an uncommitted change\n")
    before = server.run_ids()
    result = subprocess.run(
        [sys.executable, "main.py", "--config=configs/mlp.py", f"--workdir={tmp_path / 'run'}",
         *tiny_overrides(tiny_data_dir, num_epochs=1), "--config.wandb.mode=online"],
        cwd=clone, env={**os.environ, **SUBPROCESS_ENV, **server.env}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: tracked files have uncommitted changes")
    assert server.run_ids() == before
