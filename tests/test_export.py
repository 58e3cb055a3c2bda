"""`python -m mnist_flax export`: a trained run's best model, run by onnxruntime in a process that has nothing of
ours, gives predictions.csv back (every label, every probability within 1e-5), for the CNN and the MLP; the
jax.export program too; the model card holds the run's record; W&B logs the export; bad input is one line.

One tiny run per model (tests/conftest.py's data, 2 epochs, W&B offline) is trained once per session and shared
with tests/test_predict.py (tests/shared.py's `served_runs` and `onnx_export`).
"""

import datetime
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from shared import (
    SERVED_MODELS,
    TOLERANCE,
    assert_one_line_error,
    onnx_export,
    run_cli,
    run_in_process,
    snapshot,
    split_images,
)

from mnist_flax import layout
from mnist_flax.datasets import fashion_mnist
from mnist_flax.records import files
from mnist_flax.serving import model_card, onnx_graph
from mnist_flax.tracking import wandb_files

MODELS = SERVED_MODELS


@pytest.fixture
def runs(served_runs) -> dict[str, str]:
    return served_runs


# ---------------------------------------------------------------- the graph, without a trained run


@pytest.mark.parametrize(
    "model_config",
    [
        {"name": "cnn", "conv_features": [4, 8, 8], "dense_features": [16], "dropout_rate": 0.3},  # 28-14-7-3
        {"name": "mlp", "dense_features": [32, 16, 8], "dropout_rate": 0.3},
    ],
    ids=["cnn-3-stages", "mlp-3-layers"],
)
def test_the_graph_computes_what_the_model_does(model_config):
    # Other shapes than the configs' (three conv stages, an odd 7 -> 3 pooling; three hidden layers): the graph is
    # written from the config, not for one architecture.
    import jax
    import onnxruntime

    from mnist_flax.serving import trained

    model = trained.TrainedModel({"model": model_config, "data": {"name": "mnist"}}, {}, 0, "")
    params = model.module().init(jax.random.PRNGKey(1), np.zeros((1, 28, 28, 1), np.float32), train=False)["params"]
    params = jax.tree.map(lambda p: np.asarray(p) + 0.05, params)  # non-zero biases too
    proto = onnx_graph.build(model_config, params, {"class_names": [str(c) for c in range(10)]})
    assert proto.opset_import[0].version == onnx_graph.OPSET and proto.ir_version == 8
    pixels = np.random.default_rng(0).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    from_onnx = session.run(None, {"images": pixels})[0]
    from_jax = np.asarray(jax.jit(model.probabilities_fn())({"params": params}, pixels))
    assert from_onnx.shape == (7, 10) and np.abs(from_onnx - from_jax).max() < TOLERANCE


# ---------------------------------------------------------------- a trained run, exported


FRESH_RUNTIME = """
import sys
import numpy as np
import onnxruntime
model, images, out = sys.argv[1:]
session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
(given,) = session.get_inputs()
assert given.type == "tensor(uint8)" and given.shape == ["N", 28, 28], given
np.save(out, session.run(None, {given.name: np.load(images)})[0])
print(sorted({m.split(".")[0] for m in sys.modules} & {"jax", "jaxlib", "flax", "mnist_flax", "tensorflow"}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_onnxruntime_in_a_fresh_process_gives_the_runs_predictions(runs, name, tiny_data_dir, tmp_path):
    folder = onnx_export(runs, name)
    pixels = split_images(tiny_data_dir)
    assert files.read_json(os.path.join(runs[name], layout.FINAL_METRICS))["data"]["source"] == f"idx:{tiny_data_dir}"
    np.save(tmp_path / "images.npy", pixels)
    result = subprocess.run(  # -I: no PYTHONPATH, no current folder: nothing of this code base can be imported
        [sys.executable, "-I", "-c", FRESH_RUNTIME, os.path.join(folder, "model.onnx"), "images.npy", "out.npy"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"  # onnxruntime and NumPy only
    probabilities = np.load(tmp_path / "out.npy")
    expected = files.read_predictions(os.path.join(runs[name], layout.PREDICTIONS))
    assert probabilities.shape == (len(pixels), 10) and len(expected["label"]) == len(pixels) == 300
    np.testing.assert_array_equal(probabilities.argmax(axis=1), expected["predicted"])
    assert np.abs(probabilities - expected["probs"]).max() < TOLERANCE


@pytest.mark.slow
def test_the_jax_format_round_trips(runs, tiny_data_dir, tmp_path):
    import jax
    from jax import export

    out = tmp_path / "jax_export"
    result = run_cli("export", runs["cnn"], "--format", "jax", "--out", str(out), "--no-wandb")
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == ["model.jaxexport", "model_card.json", "model_card.md"]
    program = export.deserialize(bytearray((out / "model.jaxexport").read_bytes()))
    assert program.platforms == ("cpu", "cuda", "rocm", "tpu") and str(program.in_avals[0]) == "uint8[N,28,28]"
    pixels = split_images(tiny_data_dir)
    probabilities = np.asarray(program.call(pixels))
    expected = files.read_predictions(os.path.join(runs["cnn"], layout.PREDICTIONS))
    np.testing.assert_array_equal(probabilities.argmax(axis=1), expected["predicted"])
    assert np.abs(probabilities - expected["probs"]).max() < TOLERANCE
    assert np.asarray(program.call(pixels[:1])).shape == (1, 10)  # N is dynamic
    card = json.loads((out / "model_card.json").read_text())
    assert card["format"]["name"] == "jax" and card["format"]["platforms"] == list(program.platforms)
    assert jax.__version__ in card["format"]["runtime"]


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_the_model_card_holds_the_runs_record(runs, name):
    run, folder = runs[name], onnx_export(runs, name)
    card = json.loads(open(os.path.join(folder, model_card.JSON_NAME)).read())
    final = files.read_json(os.path.join(run, layout.FINAL_METRICS))
    provenance = files.read_json(os.path.join(run, layout.PROVENANCE))
    assert card["git"]["commit"] == provenance["git"]["commit"] and card["git"] == provenance["git"]
    for key in ("best_validation", "validation", "test"):
        assert card["metrics"][key] == final[key]
    assert card["data"]["name"] == "fashion_mnist" and card["data"]["fingerprint"] == provenance["data"]
    assert card["config"] == files.read_json(os.path.join(run, layout.CONFIG))
    assert card["model"]["name"] == name and card["model"]["checkpoint_step"] == final["best_validation"]["step"]
    predictions = files.read_predictions(os.path.join(run, layout.PREDICTIONS))
    for row in card["per_class_accuracy"]:
        mine = predictions["label"] == row["label"]
        assert row["examples"] == mine.sum() and row["class"] == fashion_mnist.CLASS_NAMES[row["label"]]
        assert row["accuracy"] == pytest.approx((predictions["predicted"][mine] == row["label"]).mean())
    assert card["files"] == {"model.onnx": os.path.getsize(os.path.join(folder, "model.onnx"))}
    assert card["format"] == {"name": "onnx", "file": "model.onnx", "opset": 17, "ir_version": 8,
                              "runtime": "onnxruntime or any ONNX runtime"}  # fmt: skip
    assert card["run"]["workdir"] == run and card["run"]["wandb"]["run_id"] == open(f"{run}/wandb_run_id").read()
    exported = datetime.datetime.fromisoformat(card["exported"]["at"])
    assert abs((datetime.datetime.now(datetime.UTC) - exported).total_seconds()) < 3600
    text = open(os.path.join(folder, model_card.MARKDOWN_NAME)).read()
    assert provenance["git"]["commit"] in text and provenance["data"]["test"] in text and "Ankle boot" in text
    # The file alone names its classes and its origin.
    props = {p.key: p.value for p in onnx.load(os.path.join(folder, "model.onnx")).metadata_props}
    assert json.loads(props["class_names"]) == card["class_names"] and props["git_commit"] == card["git"]["commit"]


@pytest.mark.slow
def test_the_export_is_a_wandb_artifact_of_the_runs_wandb_run(runs):
    run = runs["cnn"]
    onnx_export(runs, "cnn")
    run_id = open(os.path.join(run, layout.WANDB_RUN_ID)).read()
    folders = sorted(f for f in os.listdir(os.path.join(run, layout.WANDB)) if f.startswith("offline-run-"))
    assert len(folders) == 2  # the training's, then the export's: one more segment of the same W&B run
    segment = wandb_files.summarize(wandb_files.run_file(os.path.join(run, layout.WANDB, folders[-1])))
    assert segment["run_id"] == run_id and segment["exit_code"] == 0
    (artifact,) = segment["artifacts"]
    assert artifact["type"] == "model-export" and artifact["name"] == f"export-{run_id}" and not artifact["used"]
    assert sorted(artifact["files"]) == ["model.onnx", "model_card.json", "model_card.md"]
    assert sorted(artifact["aliases"]) == ["latest", "onnx"]
    card = files.read_json(os.path.join(run, "export", model_card.JSON_NAME))
    assert artifact["metadata"]["git_commit"] == card["git"]["commit"]
    assert artifact["metadata"]["checkpoint_step"] == card["model"]["checkpoint_step"]
    assert artifact["metadata"]["test_accuracy"] == card["metrics"]["test"]["accuracy"]
    assert wandb_files.config_values(segment)["git.commit"] == card["git"]["commit"]  # what `sync` checks
    # `sync` uploads the export's segment after the training's, into the one W&B run (--force: the tests' tree
    # may have uncommitted changes, and the segment holds the run's git state, as the training's does).
    plan = run_cli("sync", "--dry-run", "--force", run)
    assert plan.returncode == 0, plan.stderr
    assert f"{run_id}: 2 segments" in plan.stdout and folders[-1] in plan.stdout


# ---------------------------------------------------------------- bad input


@pytest.fixture
def copy_of(runs, tmp_path):
    made = []

    def copy(name: str, *remove: str) -> str:
        made.append(name)
        target = str(tmp_path / f"{name}-copy{len(made)}")
        shutil.copytree(runs[name], target, ignore=shutil.ignore_patterns("export"))
        for relative in remove:
            path = os.path.join(target, relative)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        return target

    return copy


def export_fails(run: str, *args: str, fragments=()) -> str:
    before, out_parent = snapshot(run), os.path.dirname(run)
    siblings = sorted(os.listdir(out_parent))
    result = run_in_process("export", run, *args)
    line = assert_one_line_error(result, *fragments)
    assert snapshot(run) == before and sorted(os.listdir(out_parent)) == siblings  # nothing written or changed
    return line


@pytest.mark.slow
def test_a_run_that_did_not_finish_or_has_no_checkpoint_is_refused(copy_of):
    export_fails(copy_of("mlp", layout.FINAL_METRICS), fragments=["did not finish (incomplete)"])
    export_fails(copy_of("mlp", layout.CHECKPOINTS), fragments=["has no checkpoint of its best model"])
    best = files.read_json(os.path.join(copy_of("cnn"), layout.FINAL_METRICS))["best_validation"]["step"]
    export_fails(copy_of("cnn", f"{layout.CHECKPOINTS}/{best}"), fragments=[f"step {best}; kept steps:"])


@pytest.mark.slow
def test_a_checkpoint_of_another_model_than_the_config_is_refused(copy_of):
    run = copy_of("cnn")
    config = files.read_json(os.path.join(run, layout.CONFIG))
    config["model"] = files.read_json(os.path.join(copy_of("mlp"), layout.CONFIG))["model"]
    files.write_json(os.path.join(run, layout.CONFIG), config)
    export_fails(run, fragments=["holds the parameters of another model than the mlp its config names"])


@pytest.mark.slow
def test_an_unknown_format_or_a_used_out_folder_is_refused(runs, tmp_path):
    run = runs["mlp"]
    export_fails(run, "--format", "tflite", "--out", str(tmp_path / "x"), fragments=["unknown format 'tflite'"])
    assert not (tmp_path / "x").exists()
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    export_fails(run, "--out", str(used), fragments=["exists and is not empty"])
    assert os.listdir(used) == ["notes.txt"] and (used / "notes.txt").read_text() == "mine"
    (tmp_path / "a_file").write_text("")
    export_fails(run, "--out", str(tmp_path / "a_file"), fragments=["exists and is not a folder"])
    export_fails(str(tmp_path / "used"), fragments=["is not a run workdir"])
    # An empty folder is fine: it becomes the export.
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("export", run, "--out", str(empty), "--no-wandb")
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(empty)) == ["model.onnx", "model_card.json", "model_card.md"]
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]  # no staging folder left


def test_a_usage_error_is_one_line(tmp_path):
    assert_one_line_error(run_cli("export"), "the following arguments are required: RUN")
    assert_one_line_error(run_cli("export", str(tmp_path), "--colour"), "unrecognized arguments: --colour")
