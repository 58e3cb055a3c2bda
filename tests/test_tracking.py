"""Tracking end to end: the W&B run files, resume, checkpoints, init_from, the dirty-tree guard, the token."""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import REPO_ROOT, SUBPROCESS_ENV, run_main, start_main, tiny_overrides

from mnist_flax import layout
from mnist_flax.commands import sync
from mnist_flax.config import schema
from mnist_flax.datasets import fashion_mnist
from mnist_flax.records import provenance
from mnist_flax.tracking import wandb_files, wandb_run
from mnist_flax.training import checkpointing

FAKE_TOKEN = "f" * 8 + "0123456789abcdef0123456789abcdef"


def _wandb_summary(workdir) -> dict:
    run_dir = sorted(glob.glob(os.path.join(workdir, "wandb", "offline-run-*")))[-1]
    return wandb_files.summarize(wandb_files.run_file(run_dir))


def _cnn_args(data_dir) -> list[str]:
    """A three-epoch tiny CNN run that logs every step (so a SIGTERM can come after any step)."""
    return ["--config=configs/cnn.py", *tiny_overrides(data_dir, num_epochs=3, log_every_steps=1)]


@pytest.fixture(scope="module")
def offline_run(tiny_data_dir, tmp_path_factory):
    """One real offline run from main.py, with a planted token in the environment; also the uninterrupted run
    that a preempted and resumed one must match."""
    workdir = tmp_path_factory.mktemp("offline_run")
    result = run_main([*_cnn_args(tiny_data_dir), f"--workdir={workdir}"], env={"WANDB_API_KEY": FAKE_TOKEN})
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


@pytest.mark.slow
def test_history_has_falling_train_loss_and_accuracy(offline_run):
    workdir, _ = offline_run
    history = _wandb_summary(workdir)["history"]
    losses = [row["train/loss"] for row in history if "train/loss" in row]
    accuracies = [row["train/accuracy"] for row in history if "train/accuracy" in row]
    assert len(losses) >= 10 and len(accuracies) == len(losses)
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3])
    assert any("val/auroc_macro" in row for row in history)
    assert any("test/accuracy" in row for row in history)
    # The JSON-lines sink got the same train series.
    jsonl = [json.loads(line) for line in open(workdir / layout.METRICS)]
    assert [r["train/loss"] for r in jsonl if "train/loss" in r] == pytest.approx(losses)


@pytest.mark.slow
def test_config_matches_config_json_and_records_git(offline_run):
    workdir, _ = offline_run
    logged = wandb_files.config_values(_wandb_summary(workdir))
    on_disk = schema.flatten(json.loads((workdir / layout.CONFIG).read_text()))
    for key, value in on_disk.items():
        assert logged[key] == value, key
    commit = subprocess.run(["git", "-C", REPO_ROOT, "rev-parse", "HEAD"], capture_output=True, text=True)
    assert logged["git.commit"] == commit.stdout.strip()
    assert isinstance(logged["git.dirty"], bool)
    assert logged["overrides"]["num_epochs"] == "3"
    assert logged["config_changes"]["changed"]["num_epochs"] == [10, 3]


@pytest.mark.slow
def test_checkpoint_and_prediction_artifacts_are_logged(offline_run):
    workdir, _ = offline_run
    summary = _wandb_summary(workdir)
    models = [a for a in summary["artifacts"] if a["type"] == "model"]
    assert len(models) == 3  # one per epoch
    assert all("latest" in a["aliases"] for a in models)
    assert any("best" in a["aliases"] for a in models)
    assert all(a["metadata"]["git"]["commit"] and "step" in a["metadata"] for a in models)
    assert any(f.startswith("state/") for f in models[-1]["files"])
    # Each save's upload waits for the next save (or the run's end), so the async save stays async: every saved
    # step is uploaded once, the last too, and "best" names the best validation's step.
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert [a["metadata"]["step"] for a in models] == saved
    best_step = json.loads((workdir / layout.FINAL_METRICS).read_text())["best_validation"]["step"]
    assert [a["metadata"]["step"] for a in models if "best" in a["aliases"]][-1] == best_step
    predictions = [a for a in summary["artifacts"] if a["type"] == "predictions"]
    assert predictions and predictions[0]["files"] == [layout.PREDICTIONS]
    tables = {a["name"].split("-")[2] for a in summary["artifacts"] if a["type"] == "run_table"}
    assert {"testconfusion_matrix_table", "testroc_table", "testpr_table", "testmisclassified"} <= tables
    assert (
        summary["summary"]["test_accuracy"]
        == json.loads((workdir / layout.FINAL_METRICS).read_text())["test"]["accuracy"]
    )
    assert summary["exit_code"] == 0


@pytest.mark.slow
def test_the_logged_roc_curves_are_those_of_the_predictions(offline_run):
    workdir, _ = offline_run
    run_dir = sorted(glob.glob(os.path.join(workdir, "wandb", "offline-run-*")))[-1]
    (path,) = glob.glob(os.path.join(run_dir, "files", "media", "table", "test", "roc_table_*.table.json"))
    table = json.loads(open(path).read())
    assert table["columns"] == ["class", "fpr", "tpr"]
    # The logged predictions table holds the probabilities unrounded (predictions.csv keeps 6 decimals).
    (logged,) = glob.glob(os.path.join(run_dir, "files", "media", "table", "test", "predictions_*.table.json"))
    rows = np.array(json.loads(open(logged).read())["data"])
    predictions = {"label": rows[:, 1].astype(int), "probs": rows[:, 4:]}
    names = fashion_mnist.CLASS_NAMES
    curves = {}
    for name, fpr, tpr in table["data"]:
        curves.setdefault(name, []).append((fpr, tpr))
    present = [c for c in range(10) if (predictions["label"] == c).any()]
    assert sorted(curves) == sorted(names[c] for c in present)
    for c in present:
        fpr, tpr = np.array(curves[names[c]]).T
        np.testing.assert_array_equal(fpr, wandb_run.ROC_GRID)
        np.testing.assert_array_equal(tpr, wandb_run.roc_points(predictions["probs"][:, c], predictions["label"] == c))
        assert tpr[-1] == 1.0 and (np.diff(tpr) >= 0).all()


@pytest.mark.parametrize("distinct_values", [4, None])  # ties everywhere; continuous scores
def test_roc_points_are_sklearns_curve_at_each_false_positive_rate(distinct_values):
    from sklearn import metrics as sk

    rng = np.random.default_rng(0)
    raw = rng.random(2000)
    scores = np.floor(raw * distinct_values) / distinct_values if distinct_values else raw
    positives = rng.random(2000) < 0.2 + 0.6 * raw
    fpr, tpr, _ = sk.roc_curve(positives, scores, drop_intermediate=False)
    grid = np.linspace(0.0, 1.0, 101)
    expected = [tpr[fpr <= g].max() for g in grid]
    np.testing.assert_array_equal(wandb_run.roc_points(scores, positives, grid), expected)


def test_roc_points_small_cases():
    grid = np.array([0.0, 0.5, 1.0])
    roc = wandb_run.roc_points
    np.testing.assert_array_equal(roc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([1, 1, 0, 0]), grid), [1, 1, 1])
    # one positive above the negative, one below: half the positives before any false positive
    np.testing.assert_array_equal(roc(np.array([0.9, 0.5, 0.1]), np.array([1, 0, 1]), grid), [0.5, 0.5, 1])
    # a positive and a negative of equal score are one threshold: both or neither
    np.testing.assert_array_equal(roc(np.array([0.5, 0.5]), np.array([1, 0]), grid), [0, 0, 1])
    assert np.isnan(roc(np.array([0.2, 0.7]), np.array([1, 1]), grid)).all()


@pytest.mark.slow
def test_planted_token_is_nowhere(offline_run):
    workdir, result = offline_run
    assert FAKE_TOKEN not in result.stdout + result.stderr
    for path in glob.glob(os.path.join(workdir, "**", "*"), recursive=True):
        if os.path.isfile(path) and not os.path.islink(path):
            with open(path, "rb") as f:
                assert FAKE_TOKEN.encode() not in f.read(), path


@pytest.mark.slow
def test_resume_after_sigterm_ends_with_the_same_metrics(offline_run, tiny_data_dir, tmp_path):
    args, (straight, _) = _cnn_args(tiny_data_dir), offline_run
    workdir = tmp_path / "interrupted"
    process = start_main([*args, f"--workdir={workdir}"])
    fired = False
    for line in process.stdout:  # stop inside the second epoch (20 steps each; fused steps a call, as by default)
        progress = re.search(r"step (\d+)/", line)
        if progress and 20 < int(progress.group(1)) < 40:
            process.send_signal(signal.SIGTERM)
            fired = True
            break
    _, stderr = process.communicate(timeout=300)
    assert fired, stderr[-2000:]
    assert process.returncode == 3, stderr[-2000:]
    assert "SIGTERM" in stderr
    saved = checkpointing.Checkpoints(
        str(workdir / "checkpoints"),
        ml_collections.ConfigDict({"max_to_keep": 3, "keep_best": True, "async_save": False}),
    )
    assert 20 < saved.latest_step() < 40
    resumed = run_main([*args, f"--workdir={workdir}"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed at step" in resumed.stdout
    a = json.loads((straight / layout.FINAL_METRICS).read_text())
    b = json.loads((workdir / layout.FINAL_METRICS).read_text())
    # Same data order, dropout keys and optimizer state: the same numbers (tolerance 1e-6 for float noise).
    assert b["test"]["accuracy"] == a["test"]["accuracy"]
    assert b["test"]["loss"] == pytest.approx(a["test"]["loss"], rel=1e-6, abs=1e-7)
    assert b["best_validation"] == a["best_validation"]
    # The same W&B run continues: two offline folders of one run id.
    run_ids = {os.path.basename(p).rsplit("-", 1)[1] for p in glob.glob(str(workdir / "wandb" / "offline-run-*"))}
    assert len(run_ids) == 1 and len(glob.glob(str(workdir / "wandb" / "offline-run-*"))) == 2


def test_retention_keeps_the_latest_and_the_best(tmp_path):
    config = ml_collections.ConfigDict({"max_to_keep": 2, "keep_best": True, "async_save": True})
    manager = checkpointing.Checkpoints(str(tmp_path), config)
    accuracies = {1: 0.5, 2: 0.9, 3: 0.6, 4: 0.7, 5: 0.65, 6: 0.8}
    for step, accuracy in accuracies.items():
        state = {"w": jnp.full((3,), float(step))}
        manager.save(step, state, {"step": step}, metrics={"val_accuracy": accuracy}, force=True)
    manager.wait()
    assert manager.all_steps() == [2, 5, 6]
    assert manager.best_step() == 2
    restored, meta = manager.restore(2, {"w": jnp.zeros((3,))})
    np.testing.assert_array_equal(restored["w"], [2.0, 2.0, 2.0])
    assert meta == {"step": 2}
    manager.close()


@pytest.mark.slow
def test_init_from_restores_exactly_the_saved_parameters(offline_run, tiny_data_dir, tmp_path):
    workdir, _ = offline_run
    # Evaluate the run's best checkpoint: the predictions equal the run's own final ones, to the byte.
    best_step = json.loads((workdir / layout.FINAL_METRICS).read_text())["best_validation"]["step"]
    result = run_main(
        [
            "--config=configs/cnn.py",
            f"--workdir={tmp_path}",
            f"--config.init_from={workdir}/checkpoints/{best_step}",
            "--config.eval_only=True",
            *tiny_overrides(tiny_data_dir, num_epochs=3),
        ]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / layout.PREDICTIONS).read_text() == (workdir / layout.PREDICTIONS).read_text()


def _clone(tmp_path, name) -> str:
    clone = str(tmp_path / name)
    subprocess.run(["git", "clone", "-q", REPO_ROOT, clone], check=True)
    return clone


def test_dirty_tree_guard(tmp_path):
    clone = _clone(tmp_path, "repo")
    clean = provenance.git_info(clone)
    assert clean["dirty"] is False and len(clean["commit"]) == 40
    wandb_run.check_dirty(clean, "online", allow_dirty=False)  # clean: allowed
    with open(os.path.join(clone, "configs", "default.py"), "a") as f:
        f.write("\n# an uncommitted change\n")
    dirty = provenance.git_info(clone)
    assert dirty["dirty"] is True
    with pytest.raises(wandb_run.TrackingError, match="uncommitted changes"):
        wandb_run.check_dirty(dirty, "online", allow_dirty=False)
    wandb_run.check_dirty(dirty, "online", allow_dirty=True)
    wandb_run.check_dirty(dirty, "offline", allow_dirty=False)


@pytest.mark.slow
def test_online_run_from_dirty_tree_refuses_through_main(tiny_data_dir, tmp_path):
    clone = _clone(tmp_path, "repo")
    with open(os.path.join(clone, "configs", "default.py"), "a") as f:
        f.write("\n# an uncommitted change\n")
    result = subprocess.run(
        [
            sys.executable,
            "main.py",
            "--config=configs/mlp.py",
            f"--workdir={tmp_path / 'run'}",
            *tiny_overrides(tiny_data_dir),
            "--config.wandb.mode=online",
        ],
        cwd=clone,
        env={**os.environ, **SUBPROCESS_ENV, "WANDB_API_KEY": FAKE_TOKEN},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: tracked files have uncommitted changes")
    assert FAKE_TOKEN not in result.stdout + result.stderr


@pytest.mark.slow
def test_sync_refuses_dirty_runs_and_accepts_clean_ones(tiny_data_dir, tmp_path):
    clone = _clone(tmp_path, "repo")
    runs = {}
    for name in ("clean", "dirty"):
        if name == "dirty":
            with open(os.path.join(clone, "configs", "default.py"), "a") as f:
                f.write("\n# an uncommitted change\n")
        workdir = tmp_path / name
        result = subprocess.run(
            [
                sys.executable,
                "main.py",
                "--config=configs/mlp.py",
                f"--workdir={workdir}",
                *tiny_overrides(tiny_data_dir, num_epochs=1),
            ],
            cwd=clone,
            env={**os.environ, **SUBPROCESS_ENV},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        runs[name] = str(workdir)
    assert sync.main([runs["clean"], "--dry-run"]) == 0
    assert sync.main([runs["dirty"], "--dry-run"]) == 2
    assert sync.main([runs["dirty"], "--dry-run", "--force"]) == 0
    # Without a token, a real sync stops before uploading anything.
    env = without_stored_token(tmp_path / "home")
    no_token = subprocess.run(
        [sys.executable, "-m", "mnist_flax", "sync", runs["clean"]],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert no_token.returncode == 2 and "no W&B token" in no_token.stderr


def without_stored_token(home) -> dict:
    """The environment with no W&B token in it and an empty HOME (no ~/.netrc, no wandb settings)."""
    os.makedirs(home, exist_ok=True)
    hidden = (*wandb_run.TOKEN_VARIABLES, "NETRC", "WANDB_CONFIG_DIR", "WANDB_MODE", "WANDB_BASE_URL")
    return {**{k: v for k, v in os.environ.items() if k not in hidden}, "HOME": str(home)}


def token_decision(env: dict) -> list[str]:
    """What a process with `env` decides: [the token it found or None, wandb.mode=auto's mode]."""
    code = (
        "from mnist_flax.tracking import wandb_run; token = wandb_run.read_token(); "
        "print(token, wandb_run.resolve_mode('auto', token))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.split()


def test_a_key_stored_by_wandb_login_makes_auto_online_and_lets_sync_upload(tmp_path):
    # `wandb login` writes the key to ~/.netrc under the server's host; wandb's own lookup finds it there, and so
    # does ours. No network: only the decision is checked (online, a token for sync), not an upload.
    home = tmp_path / "home"
    env = without_stored_token(home)
    assert token_decision(env) == ["None", "offline"]
    (home / ".netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {FAKE_TOKEN}\n")
    (home / ".netrc").chmod(0o600)
    assert token_decision(env) == [FAKE_TOKEN, "online"]
    # The environment's key comes first, as in wandb.
    assert token_decision({**env, "WANDB_API_KEY": "e" * 40}) == ["e" * 40, "online"]
    # A netrc entry for another server is not this server's key.
    assert token_decision({**env, "WANDB_BASE_URL": "http://127.0.0.1:9"}) == ["None", "offline"]


@pytest.mark.slow
def test_unreachable_wandb_keeps_the_run_offline(tiny_data_dir, tmp_path):
    start = time.monotonic()
    result = run_main(
        [
            "--config=configs/mlp.py",
            f"--workdir={tmp_path}",
            *tiny_overrides(tiny_data_dir, num_epochs=1),
            "--config.wandb.mode=online",
            "--config.wandb.allow_dirty=True",
            "--config.wandb.init_timeout=5",
        ],
        env={"WANDB_API_KEY": FAKE_TOKEN, "WANDB_MODE": "online"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "kept offline" in result.stderr and "mnist_flax sync" in result.stderr
    summary = _wandb_summary(tmp_path)
    assert any("train/loss" in row for row in summary["history"])
    assert time.monotonic() - start < 240


@pytest.mark.slow
def test_rejected_token_is_one_line_and_exit_2(tiny_data_dir, tmp_path):
    import http.server
    import threading

    class Reject(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"errors": [{"message": "user is not logged in"}]}')

        do_GET = do_POST

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Reject)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = run_main(
            [
                "--config=configs/mlp.py",
                f"--workdir={tmp_path}",
                *tiny_overrides(tiny_data_dir, num_epochs=1),
                "--config.wandb.mode=online",
                "--config.wandb.allow_dirty=True",
                "--config.wandb.init_timeout=20",
            ],
            env={"WANDB_API_KEY": FAKE_TOKEN, "WANDB_BASE_URL": f"http://127.0.0.1:{server.server_port}"},
        )
    finally:
        server.shutdown()
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: the W&B token was rejected (401); check WANDB_API_KEY in your .env"
    )
    assert "Traceback" not in result.stderr and FAKE_TOKEN not in result.stdout + result.stderr
