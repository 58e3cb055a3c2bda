"""Two sweep workers, as on two machines, sharing one Optuna study on a real PostgreSQL server."""

import json
import os
import subprocess
import sys

import pytest
import services
from conftest import REPO_ROOT, SUBPROCESS_ENV
from test_sweep import tiny_settings

PASSWORD = "s3cret-Pg-word"
RATES = ("0.001", "0.003", "0.01", "0.03")


@pytest.mark.slow
def test_two_workers_share_one_study_and_train_each_trial_once(tiny_data_dir, tmp_path):
    import optuna

    with services.postgresql(PASSWORD) as url:
        workers = []
        for machine in ("a", "b"):  # each its own sweep root, as on two machines; one study by name
            command = [sys.executable, "-m", "mnist_flax.sweep", "--config=configs/mlp.py", "--study=lr-study"]
            command += [f"--root={tmp_path / machine / 'lr'}", f"--storage={url}", "--pruner=none"]
            command += ["--grid", f"optimizer.learning_rate={','.join(RATES)}", *tiny_settings(tiny_data_dir)]
            workers.append(
                subprocess.Popen(
                    command,
                    cwd=REPO_ROOT,
                    env={**os.environ, **SUBPROCESS_ENV},
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        outputs = [worker.communicate(timeout=600) for worker in workers]
        for worker, (out, err) in zip(workers, outputs, strict=True):
            assert worker.returncode == 0, out[-3000:] + err[-3000:]
        trials = optuna.load_study(study_name="lr-study", storage=url).get_trials()

    # Every planned trial exactly once: four trials, each point of the grid, all complete, no retries.
    assert len(trials) == len(RATES)
    assert sorted(t.params["optimizer.learning_rate"] for t in trials) == sorted(map(float, RATES))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    # Each trial trained in one worker's root, once: the workdirs of the two roots are disjoint and cover them.
    workdirs = {t.number: t.user_attrs["workdir"] for t in trials}
    found = sorted(str(p.parent) for p in tmp_path.glob("*/lr/*/final_metrics.json"))
    assert found == sorted(workdirs.values())
    for trial in trials:
        final = json.loads(open(os.path.join(workdirs[trial.number], "final_metrics.json")).read())
        assert trial.value == final["best_validation"]["val_accuracy"]
        config = json.loads(open(os.path.join(workdirs[trial.number], "config.json")).read())
        assert config["wandb"]["group"] == "lr-study"
    # Both workers end with the same study counts; each says how many trials the other trained.
    for out, _ in outputs:
        assert "study lr-study: 4 complete" in out
    here = [len(list((tmp_path / machine / "lr").glob("*/trial.json"))) for machine in ("a", "b")]
    assert sum(here) == 4
    for (out, _), count in zip(outputs, here, strict=True):
        assert (f"({4 - count} trained elsewhere)" in out) == (count < 4)
    # The password is in no record, log or output.
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.suffix != ".db":
            assert PASSWORD not in path.read_text(errors="replace"), path
    assert all(PASSWORD not in out + err for out, err in outputs)
    assert "sweeper:***@127.0.0.1" in outputs[0][0]
