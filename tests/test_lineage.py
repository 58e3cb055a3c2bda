"""The lineage W&B draws, data -> run -> model, read back from offline runs' files.

Each run declares the data it trained on as a `dataset` artifact (its input) and logs its checkpoints as
`model` artifacts (its outputs). The same data is the same artifact digest (so the same W&B version); changed
data is a new one.
"""

import json
import os
import pathlib

import pytest
from conftest import run_main, tiny_overrides, write_idx_dataset

from mnist_flax import layout
from mnist_flax.tracking import wandb_files

# Six tiny runs through main.py: in make test, not in make test-fast.
pytestmark = pytest.mark.slow


def train(workdir, data_dir, **extra) -> dict:
    result = run_main(
        ["--config=configs/mlp.py", f"--workdir={workdir}", *tiny_overrides(data_dir, num_epochs=1, **extra)]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return summary_of(workdir)


def summary_of(workdir) -> dict:
    """What the run's offline W&B run file says: its artifacts, inputs and outputs."""
    (run_dir,) = [os.path.join(workdir, "wandb", d) for d in os.listdir(os.path.join(workdir, "wandb"))
                  if d.startswith("offline-run-")]  # fmt: skip
    return wandb_files.summarize(wandb_files.run_file(run_dir))


def datasets_of(summary: dict) -> list[dict]:
    return [a for a in summary["artifacts"] if a["type"] == "dataset"]


@pytest.fixture(scope="module")
def runs_on_data(tiny_data_dir, tmp_path_factory, finished_mlp_run):
    """One-epoch runs: the first (tests/shared.py's run) with its checkpoints (the model artifacts); two that start
    from it (init_from, one eval_only); and runs on the same data, on other files, and on another validation split.
    Only the first keeps checkpoints: of the others, only the artifacts they use are read."""
    root = tmp_path_factory.mktemp("lineage")
    changed = write_idx_dataset(str(root / "changed_data"), num_train=1100)  # other examples: other files
    bare = {"checkpoint.enabled": False}
    first = pathlib.Path(finished_mlp_run)
    return {
        "first": (first, summary_of(first)),
        # Runs that start from the first one's checkpoint: fine-tuned, and evaluated only.
        "fine_tuned": (root / "fine_tuned", train(root / "fine_tuned", tiny_data_dir, **bare, init_from=str(first))),
        "evaluated": (
            root / "evaluated",
            train(root / "evaluated", tiny_data_dir, **bare, init_from=str(first), eval_only=True),
        ),
        "second": (root / "second", train(root / "second", tiny_data_dir, **bare)),
        "changed": (root / "changed", train(root / "changed", changed, **bare)),
        "other_split": (
            root / "other_split",
            train(root / "other_split", tiny_data_dir, **bare, **{"data.validation_size": 300}),
        ),
    }


def test_a_run_declares_its_data_as_its_input_and_its_models_as_outputs(runs_on_data):
    workdir, summary = runs_on_data["first"]
    (dataset,) = datasets_of(summary)
    assert dataset["used"] and dataset["name"] == "fashion_mnist"  # data.name
    recorded = json.loads((workdir / layout.PROVENANCE).read_text())["data"]
    for split in ("train", "validation", "test"):
        assert dataset["metadata"][split] == recorded[split]
    assert dataset["metadata"]["files"] == recorded["files"] and len(recorded["files"]) == 4
    # The IDX files by reference (file://), beside the fingerprint that pins their content.
    assert sorted(os.path.basename(r) for r in dataset["references"]) == sorted(recorded["files"])
    assert all(r.startswith("file:///") for r in dataset["references"]) and "fingerprint.json" in dataset["files"]
    models = [a for a in summary["artifacts"] if a["type"] == "model"]
    assert models and not any(a["used"] for a in models)  # outputs


@pytest.mark.parametrize("child", ["fine_tuned", "evaluated"])
def test_a_run_started_from_a_checkpoint_declares_its_parents_model_version_as_input(runs_on_data, child):
    workdir, parent = runs_on_data["first"]
    latest = max(int(step) for step in os.listdir(workdir / layout.CHECKPOINTS) if step.isdigit())
    (logged,) = [a for a in parent["artifacts"] if a["type"] == "model" and a["metadata"]["step"] == latest]
    _, summary = runs_on_data[child]
    (used,) = [a for a in summary["artifacts"] if a["type"] == "model" and a["used"]]
    # The parent's artifact, with the digest of the version it logged for that step: W&B keeps one version per
    # digest, so on sync the child's input is that version, and its lineage goes on to the parent's data.
    assert used["name"] == f"model-{parent['run_id']}" == logged["name"]
    assert used["digest"] == logged["digest"] and sorted(used["files"]) == sorted(logged["files"])
    assert [a["digest"] for a in datasets_of(summary)] == [datasets_of(parent)[0]["digest"]]


def test_the_same_data_is_the_same_version_and_changed_data_a_new_one(runs_on_data):
    digest = {name: datasets_of(summary)[0]["digest"] for name, (_, summary) in runs_on_data.items()}
    digest = {name: digest[name] for name in ("first", "second", "changed", "other_split")}
    assert digest["first"] == digest["second"]
    assert digest["changed"] != digest["first"]  # other files
    assert digest["other_split"] != digest["first"]  # the same files, another validation split: other data
    assert len(set(digest.values())) == 3
