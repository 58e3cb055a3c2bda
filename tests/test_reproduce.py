"""`python -m mnist_flax reproduce RUN`: the recorded commit in a temporary worktree, its own main.py on the
recorded resolved config; exit 0 the same results, 1 different, 2 bad input (one line, nothing left behind)."""

import contextlib
import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT, SUBPROCESS_ENV, tiny_overrides
from shared import write_lock

from mnist_flax import layout
from mnist_flax.commands import reproduce
from mnist_flax.records import provenance
from mnist_flax.records.files import write_json, write_predictions
from mnist_flax.tracking import wandb_run

FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"
GIT_USER = ["-c", "user.name=test", "-c", "user.email=test@example.com"]


def _git(repo, *args) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def _commit(repo, message) -> str:
    _git(repo, "add", "-A")
    # --allow-empty: from a clean checkout (CI's fresh clone) the working tree adds nothing to the clone's HEAD.
    _git(repo, *GIT_USER, "commit", "-q", "--allow-empty", "-m", message)
    return _git(repo, "rev-parse", "HEAD")


def _clone_of_the_working_tree(path) -> str:
    """A clone of this repository whose HEAD is the working tree as it is (the newest work may be uncommitted)."""
    subprocess.run(["git", "clone", "-q", REPO_ROOT, str(path)], check=True)
    for name in _git(path, "ls-files", "-z").split("\0"):
        if name:
            os.remove(os.path.join(path, name))
    for name in _git(REPO_ROOT, "ls-files", "-co", "--exclude-standard", "-z").split("\0"):
        source = os.path.join(REPO_ROOT, name)
        if name and os.path.isfile(source) and not os.path.islink(source):
            os.makedirs(os.path.dirname(os.path.join(path, name)), exist_ok=True)
            shutil.copy2(source, os.path.join(path, name))
    _commit(path, "X: the working tree")
    return str(path)


def _env(tmp_dir) -> dict:
    # TMPDIR: the reproduction's worktree folder is created where the test can see that it is gone afterwards.
    return {**os.environ, **SUBPROCESS_ENV, "TMPDIR": str(tmp_dir)}


def _train(clone, workdir, data_dir, tmp_dir):
    result = subprocess.run(
        [sys.executable, "main.py", "--config=configs/mlp.py", f"--workdir={workdir}",
         *tiny_overrides(data_dir, num_epochs=1)],
        cwd=clone, env=_env(tmp_dir), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return str(workdir)


def _reproduce(clone, tmp_dir, *args):
    return subprocess.run(
        [sys.executable, "-m", "mnist_flax", "reproduce", *map(str, args)],
        cwd=clone, env=_env(tmp_dir), capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def _assert_nothing_left(clone, tmp_dir):
    assert len(_git(clone, "worktree", "list").splitlines()) == 1  # the clone itself
    assert not glob.glob(os.path.join(tmp_dir, "mnist_flax_reproduce_*"))


def _one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def repo(tiny_data_dir, tmp_path_factory):
    """A clone at commit X, a tiny run trained there (W&B offline), then a commit that changes every result."""
    root = tmp_path_factory.mktemp("reproduce")
    tmp_dir = root / "tmp"
    tmp_dir.mkdir()
    clone = _clone_of_the_working_tree(root / "clone")
    commit_x = _git(clone, "rev-parse", "HEAD")
    run = _train(clone, root / "run", tiny_data_dir, tmp_dir)
    steps_py = os.path.join(clone, "mnist_flax", "training", "steps.py")
    with open(steps_py) as f:
        code = f.read()
    assert "/ 255.0" in code
    with open(steps_py, "w") as f:  # not in the config: every image becomes zeros, the predictions one class
        f.write(code.replace("/ 255.0", "* 0.0"))
    commit_y = _commit(clone, "Y: zero inputs")
    return {"root": root, "tmp": str(tmp_dir), "clone": clone, "run": run, "x": commit_x, "y": commit_y}


# ---------------------------------------------------------------- end to end, in a clone


@pytest.mark.slow
def test_reproduces_the_recorded_commit_not_the_checkout(repo):
    out = repo["root"] / "reproduced"
    # In the locked environment (make setup's .venv) the reproduction holds under --strict-environment too.
    locked = provenance.installed_environment()["locked"]
    strict = ["--strict-environment"] if locked else []
    result = _reproduce(repo["clone"], repo["tmp"], repo["run"], "--workdir", out, *strict)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert json.loads((out / layout.PROVENANCE).read_text())["environment"]["locked"] is locked
    assert "config: equal" in result.stdout and "reproduction matches" in result.stdout
    assert "provenance: the same data (train, validation, test) and environment" in result.stdout
    recorded = json.loads(open(os.path.join(repo["run"], layout.FINAL_METRICS)).read())
    reproduced = json.loads((out / layout.FINAL_METRICS).read_text())
    assert reproduced["git"]["commit"] == repo["x"] and reproduced["git"]["dirty"] is False
    assert reproduced["test"]["accuracy"] == recorded["test"]["accuracy"]  # commit Y would be at chance
    assert (out / layout.PREDICTIONS).read_text() == open(os.path.join(repo["run"], layout.PREDICTIONS)).read()
    # The recorded resolved config ran as it is: config.json equal apart from the W&B name and mode.
    a = json.loads(open(os.path.join(repo["run"], layout.CONFIG)).read())
    b = json.loads((out / layout.CONFIG).read_text())
    assert b["wandb"].pop("name") == "reproduced" and a["wandb"].pop("name") == ""
    assert a == b  # the recorded run was offline, and so is the reproduction by default
    assert _git(repo["clone"], "rev-parse", "HEAD") == repo["y"] and not _git(repo["clone"], "status", "--porcelain")
    _assert_nothing_left(repo["clone"], repo["tmp"])


@pytest.mark.slow
def test_a_dirty_run_needs_force(repo, tiny_data_dir):
    clone, default_py = repo["clone"], os.path.join(repo["clone"], "configs", "default.py")
    with open(default_py, "a") as f:
        f.write("\n# an uncommitted change\n")
    try:
        run = _train(clone, repo["root"] / "dirty", tiny_data_dir, repo["tmp"])
    finally:
        _git(clone, "checkout", "--", "configs/default.py")
    out = repo["root"] / "dirty-reproduced"
    refused = _reproduce(clone, repo["tmp"], run, "--workdir", out)
    assert refused.returncode == 2 and "dirty tree" in _one_error_line(refused) and refused.stdout == ""
    assert not out.exists()
    _assert_nothing_left(clone, repo["tmp"])
    forced = _reproduce(clone, repo["tmp"], run, "--workdir", out, "--force", "--wandb-mode=disabled")
    assert forced.returncode == 0, forced.stdout[-3000:] + forced.stderr[-3000:]  # the change was a comment
    assert "recorded from a dirty tree" in forced.stdout
    assert json.loads((out / layout.FINAL_METRICS).read_text())["git"] == {**json.loads(
        open(os.path.join(run, layout.FINAL_METRICS)).read())["git"], "dirty": False, "branch": "HEAD"}  # fmt: skip
    _assert_nothing_left(clone, repo["tmp"])


@pytest.mark.slow
def test_a_commit_the_repository_does_not_have(repo):
    run = repo["root"] / "fabricated"
    shutil.copytree(repo["run"], run)
    for name in (layout.FINAL_METRICS, layout.PROVENANCE):
        if (run / name).is_file():
            record = json.loads((run / name).read_text())
            record["git"]["commit"] = FAKE_COMMIT
            write_json(str(run / name), record)
    out = repo["root"] / "fabricated-reproduced"
    result = _reproduce(repo["clone"], repo["tmp"], run, "--workdir", out)
    assert result.returncode == 2 and f"commit {FAKE_COMMIT} is not in the repository" in _one_error_line(result)
    assert not out.exists()
    _assert_nothing_left(repo["clone"], repo["tmp"])


# ---------------------------------------------------------------- bad input, without training


def _fake_run(path, commit=FAKE_COMMIT, dirty=False, source="git", finished=True, test_loss=0.25, probs=None,
              predicted=None, provenance=None) -> str:  # fmt: skip
    """A workdir as a finished run leaves it, as far as reproduce reads it."""
    os.makedirs(path)
    write_json(os.path.join(path, layout.CONFIG), {"seed": 0, "model": {"name": "mlp", "dense_features": [8]}})
    probs = np.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]]) if probs is None else np.asarray(probs)
    labels = np.array([0, 1, 1])
    if finished:
        report = {"accuracy": 2 / 3, "loss": test_loss}
        write_json(os.path.join(path, layout.FINAL_METRICS), {
            "best_validation": {"step": 10, "val_accuracy": 0.5}, "validation": {"loss": 0.5, "accuracy": 0.5},
            "test": report, "steps": 10, "git": {"commit": commit, "branch": "main", "dirty": dirty, "source": source},
        })  # fmt: skip
        write_predictions(os.path.join(path, layout.PREDICTIONS), np.log(probs), labels)
    if provenance is not None:
        write_json(os.path.join(path, layout.PROVENANCE), provenance)
    return str(path)


def _main(capsys, *args):
    status = reproduce.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"finished": False}, "did not finish (status incomplete)"),
        ({"dirty": True}, "was recorded from a dirty tree"),
        ({"commit": "unknown", "source": "unknown"}, "recorded no commit"),
        ({"commit": "--exec=rm"}, "which is not a commit hash"),
        ({}, f"commit {FAKE_COMMIT} is not in the repository"),
    ],
)
def test_bad_runs_are_one_line_and_exit_2(tmp_path, capsys, kwargs, message):
    run = _fake_run(tmp_path / "run", **kwargs)
    status, out, err = _main(capsys, run, "--workdir", tmp_path / "out")
    assert status == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert not (tmp_path / "out").exists()


def test_no_git_no_repository_no_such_run_and_a_busy_workdir(tmp_path, capsys, monkeypatch):
    head = _git(REPO_ROOT, "rev-parse", "HEAD")
    run = _fake_run(tmp_path / "run", commit=head)
    assert _main(capsys, tmp_path / "nothing")[0] == 2
    not_a_repo = tmp_path / "plain"
    not_a_repo.mkdir()
    status, _, err = _main(capsys, run, "--repo", not_a_repo)
    assert status == 2 and "is not a git repository" in err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    status, _, err = _main(capsys, run, "--workdir", busy)
    assert status == 2 and "exists and is not empty" in err and (busy / "notes.txt").read_text() == "mine"
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    status, _, err = _main(capsys, run)
    assert status == 2 and err.strip() == "error: git is not installed: reproducing a run checks out its commit"


def test_a_wandb_path_without_a_key_is_one_line(capsys, monkeypatch):
    for name in wandb_run.TOKEN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    status, out, err = _main(capsys, "someone/mnist_flax/abc123")
    assert status == 2 and out == "" and err.count("\n") == 1 and "needs a W&B key" in err


def test_the_worktree_is_removed_on_ctrl_c(tmp_path, monkeypatch):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", REPO_ROOT, str(clone)], check=True)
    monkeypatch.setattr(reproduce.tempfile, "tempdir", str(tmp_path))
    head = _git(clone, "rev-parse", "HEAD")
    with pytest.raises(KeyboardInterrupt), reproduce.worktree(str(clone), head) as (folder, tree):
        assert os.path.isfile(os.path.join(tree, "main.py")) and tree.startswith(str(tmp_path))
        raise KeyboardInterrupt
    assert not os.path.exists(folder)
    assert len(_git(clone, "worktree", "list").splitlines()) == 1


# ---------------------------------------------------------------- the comparison


def _report(capsys, a, b, allow_different_data=False, strict_environment=False):
    """(whether the reproduction matches, what it printed)."""
    differs = reproduce.report(reproduce.runs.load(a), reproduce.runs.load(b), allow_different_data, strict_environment)
    return not differs, capsys.readouterr().out


def test_equal_runs_match_and_the_tolerances_hold(tmp_path, capsys):
    a = _fake_run(tmp_path / "a")
    assert _report(capsys, a, _fake_run(tmp_path / "same"))[0] is True
    rounding = [[0.900001, 0.099999], [0.3, 0.7], [0.6, 0.4]]  # one unit of predictions.csv's last decimal
    within = _fake_run(tmp_path / "within", test_loss=0.25 * (1 + 5e-7), probs=rounding)
    matches, out = _report(capsys, a, within)
    assert matches is True and "provenance: not recorded" in out
    loss = _fake_run(tmp_path / "loss", test_loss=0.25 * (1 + 3e-6))
    matches, out = _report(capsys, a, loss)
    assert matches is False and [line.split()[-1] for line in out.splitlines() if line.startswith("test loss")] == [
        "NO"
    ]
    flipped = _fake_run(tmp_path / "flipped", probs=[[0.9, 0.1], [0.3, 0.7], [0.4, 0.6]])
    matches, out = _report(capsys, a, flipped)
    assert matches is False and "1 differ" in out


def test_other_data_fails_and_another_environment_warns(tmp_path, capsys):
    def provenance(test="t0", jax="0.4.30"):
        return {"data": {"train": "a", "validation": "v", "test": test}, "environment": {"jax": jax, "backend": "cpu"}}

    a = _fake_run(tmp_path / "a", provenance=provenance())
    matches, out = _report(capsys, a, _fake_run(tmp_path / "env", provenance=provenance(jax="0.4.31")))
    assert matches is True and "warning: another environment (jax 0.4.30 -> 0.4.31)" in out
    data = _fake_run(tmp_path / "data", provenance=provenance(test="t1"))
    matches, out = _report(capsys, a, data)
    assert matches is False and "data differs: the test split(s)" in out
    assert _report(capsys, a, data, allow_different_data=True)[0] is True


def test_a_container_run_is_reproduced_from_the_commit_in_its_image(tmp_path):
    head = _git(REPO_ROOT, "rev-parse", "HEAD")
    record = reproduce.runs.load(_fake_run(tmp_path / "run", commit=head[:12], source="environment"))
    assert reproduce.resolve_commit(REPO_ROOT, reproduce.check_reproducible(record, force=False)) == head


# ---------------------------------------------------------------- the environment, --strict-environment


def _environment(tmp_path, **changes) -> dict:
    """This interpreter's environment as a run records it, against a uv.lock pinning exactly what is installed."""
    packages = provenance.installed_packages()
    lock = write_lock(tmp_path / "uv.lock", {n: v for n, v in packages.items() if n not in provenance.NOT_LOCKED})
    installed = provenance.installed_environment(lock)
    flat = {n: packages.get(n, provenance.NOT_INSTALLED) for n in provenance.ENVIRONMENT_PACKAGES}
    return {**flat, "backend": "cpu", "device_kind": "cpu", "cpu_count": 2, **installed, **changes}


def _with_environment(environment: dict) -> dict:
    return {"data": {"train": "a", "validation": "v", "test": "t"}, "environment": environment}


def test_another_environment_is_named_package_by_package_and_fails_when_strict(tmp_path, capsys):
    recorded = _environment(tmp_path)
    packages = {**recorded["packages"], **{f"extra-{i}": "1.0" for i in range(10)}}
    unlocked = {f"extra-{i}": ["not in uv.lock", "1.0"] for i in range(10)}
    other = {**recorded, "packages": packages, "locked": False, "unlocked": unlocked}
    a = _fake_run(tmp_path / "a", provenance=_with_environment(recorded))
    b = _fake_run(tmp_path / "b", provenance=_with_environment(other))
    matches, out = _report(capsys, a, b)
    assert matches is True  # a warning, as before
    lines = [line for line in out.splitlines() if line.startswith("warning: ")]
    assert lines[0].startswith("warning: another environment (locked True -> False, packages.extra-0 not installed")
    assert "and 3 more): the metrics may differ" in lines[0]  # 11 differences: 8 named
    assert lines[1].startswith("warning: the reproduction ran outside the locked environment (extra-0 1.0 (not in")
    assert lines[1].endswith("and 2 more)") and len(lines) == 2
    differs = reproduce.report(reproduce.runs.load(a), reproduce.runs.load(b), False, strict_environment=True)
    assert differs == [
        "another environment (--strict-environment)",
        "outside the locked environment (--strict-environment)",
    ]
    assert "environment differs (--strict-environment): another environment (" in capsys.readouterr().out
    assert _report(capsys, a, _fake_run(tmp_path / "same", provenance=_with_environment(recorded)), False, True)[0]


def _reproduce_in_process(monkeypatch, tmp_path, capsys, recorded_env, reproduced_env, lock_packages, *flags):
    """reproduce.main on a fake run recorded at HEAD: the worktree is a folder holding `lock_packages` as its
    uv.lock, and the training writes a run recording `reproduced_env` (None: training fails the test)."""
    head = _git(REPO_ROOT, "rev-parse", "HEAD")
    run = _fake_run(tmp_path / "run", commit=head, provenance=_with_environment(recorded_env))
    tree = tmp_path / "tree"
    tree.mkdir()
    write_lock(tree / "uv.lock", lock_packages)

    @contextlib.contextmanager
    def worktree(repo, commit):
        yield str(tmp_path), str(tree)

    def train_at(tree, folder, record, workdir, wandb_mode):
        assert reproduced_env is not None, "trained although the environment was refused"
        _fake_run(workdir, commit=head, provenance=_with_environment(reproduced_env))
        return 0

    monkeypatch.setattr(reproduce, "worktree", worktree)
    monkeypatch.setattr(reproduce, "train_at", train_at)
    return _main(capsys, run, "--workdir", tmp_path / "out", *flags)


def test_strict_environment_refuses_before_training(tmp_path, capsys, monkeypatch):
    recorded = _environment(tmp_path)
    lock = {n: v for n, v in recorded["packages"].items() if n not in provenance.NOT_LOCKED}
    older = {**recorded, "packages": {**recorded["packages"], "numpy": "1.0.0"}}
    status, out, err = _reproduce_in_process(monkeypatch, tmp_path / "1", capsys, older, None, lock,
                                             "--strict-environment")  # fmt: skip
    numpy = recorded["packages"]["numpy"]
    assert status == 2 and err.count("\n") == 1 and not (tmp_path / "1" / "out").exists()
    assert err.startswith(f"error: --strict-environment: this environment is not the recorded run's (packages.numpy "
                          f"1.0.0 -> {numpy}); nothing was trained; install ")  # fmt: skip
    unpinned = {n: v for n, v in lock.items() if n != "jax"}
    status, _, err = _reproduce_in_process(monkeypatch, tmp_path / "2", capsys, recorded, None, unpinned,
                                           "--strict-environment")  # fmt: skip
    assert status == 2 and f"and not the one uv.lock of {_git(REPO_ROOT, 'rev-parse', 'HEAD')[:12]} " in err
    assert f"pins (jax {recorded['packages']['jax']} (not in uv.lock)); nothing was trained" in err


def test_strict_environment_fails_a_reproduction_on_other_cores(tmp_path, capsys, monkeypatch):
    recorded = _environment(tmp_path)
    lock = {n: v for n, v in recorded["packages"].items() if n not in provenance.NOT_LOCKED}
    elsewhere = {**recorded, "cpu_count": 3}
    status, out, _ = _reproduce_in_process(monkeypatch, tmp_path / "1", capsys, recorded, elsewhere, lock)
    assert status == 0 and "warning: another environment (cpu_count 2 -> 3)" in out
    status, out, _ = _reproduce_in_process(monkeypatch, tmp_path / "2", capsys, recorded, elsewhere, lock,
                                           "--strict-environment")  # fmt: skip
    assert status == 1 and "environment differs (--strict-environment): another environment (cpu_count 2 -> 3)" in out
    last = out.strip().splitlines()[-1]
    assert last == f"reproduction DIFFERS (another environment (--strict-environment)): {tmp_path / '2' / 'out'}"
