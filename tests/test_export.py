"""`python -m mnist_flax export`: every registered model converts to ONNX (jax2onnx) that onnxruntime runs to
JAX's probabilities on real Fashion-MNIST images; a trained run's best model, run by onnxruntime in a process
that has nothing of ours, gives predictions.csv back (every label, every probability within 1e-5), for the CNN
and the MLP; the jax.export program too; the model card holds the run's record; W&B logs the export; bad input
(a model jax2onnx cannot convert among it) is one line.

One tiny run per model (tests/conftest.py's data, 2 epochs, W&B offline) is trained once per session and shared
with tests/test_predict.py (tests/shared.py's `served_runs` and `onnx_export`).
"""

import datetime
import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import numpy as np
import onnx
import onnxruntime
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

from mnist_flax import layout, models
from mnist_flax.datasets import _mnist_family, fashion_mnist
from mnist_flax.errors import ConfigError
from mnist_flax.records import files
from mnist_flax.serving import model_card
from mnist_flax.tracking import wandb_files

MODELS = SERVED_MODELS


@pytest.fixture
def runs(served_runs) -> dict[str, str]:
    return served_runs


# ---------------------------------------------------------------- every registered model, converted


def briefly_trained(name: str, images: np.ndarray, labels: np.ndarray):
    """Model `name` with its defaults after 20 Adam steps on real images: confident predictions (not an initial
    model's near-uniform ones), and any collection besides the parameters (BatchNorm's running averages) moved
    away from its initial values, so the export is held to evaluation by those averages."""
    import jax
    import optax

    from mnist_flax.serving import trained
    from mnist_flax.training import steps

    model = trained.TrainedModel({"model": {"name": name}, "data": {"name": "fashion_mnist"}}, {}, 0, "")
    module = model.module()
    variables = dict(module.init(jax.random.PRNGKey(0), steps.preprocess(images[:1]), train=False))
    params, state = variables.pop("params"), variables
    tx = optax.adam(3e-3)

    @jax.jit
    def step(params, state, opt_state, x, y, key):
        def loss(params):
            logits, updates = module.apply(
                {"params": params, **state}, steps.preprocess(x), train=True, rngs={"dropout": key}, mutable=list(state)
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates

        grads, updates = jax.grad(loss, has_aux=True)(params)
        changes, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, changes), {**state, **updates}, opt_state

    opt_state = tx.init(params)
    for i in range(20):
        batch = slice(64 * i, 64 * (i + 1))
        params, state, opt_state = step(params, state, opt_state, images[batch], labels[batch], jax.random.PRNGKey(i))
    model.params, model.model_state = jax.tree.map(np.asarray, params), jax.tree.map(np.asarray, state)
    return model


@pytest.mark.slow  # trains each model briefly on the real data set (~25 s a model)
@pytest.mark.parametrize("name", models.registered())
def test_every_registered_model_exports_to_onnx_that_computes_what_jax_does(name, fashion_dir):
    # Each model through export's own conversion (jax2onnx, from the function the jax.export path holds), run by
    # onnxruntime on real Fashion-MNIST test images; a model added to mnist_flax/models/ is covered as it lands.
    import jax

    from mnist_flax.serving import export

    read = _mnist_family.read_idx
    train = read(os.path.join(fashion_dir, "train-images-idx3-ubyte.gz"), _mnist_family.IMAGES_MAGIC)[:1280, ..., None]
    labels = read(os.path.join(fashion_dir, "train-labels-idx1-ubyte.gz"), _mnist_family.LABELS_MAGIC)[:1280]
    test = read(os.path.join(fashion_dir, "t10k-images-idx3-ubyte.gz"), _mnist_family.IMAGES_MAGIC)[:500, ..., None]
    model = briefly_trained(name, train, labels.astype(np.int32))
    payload, details = export.onnx_model(model, {"class_names": model.class_names})
    session = onnxruntime.InferenceSession(payload, providers=["CPUExecutionProvider"])
    (given,) = session.get_inputs()
    assert (given.name, given.type, given.shape) == ("images", "tensor(uint8)", ["N", 28, 28, 1])
    assert [(o.name, o.shape) for o in session.get_outputs()] == [("probabilities", ["N", 10])]
    from_onnx = session.run(None, {"images": test})[0]
    from_jax = np.asarray(jax.jit(model.probabilities_fn())(model.variables, test))
    difference = np.abs(from_onnx - from_jax).max()
    print(f"{name}: max |ONNX - JAX| = {difference:.3g} on {len(test)} Fashion-MNIST test images")
    assert from_onnx.shape == (len(test), 10) and difference < TOLERANCE
    assert from_jax.max(axis=1).mean() > 0.5  # a trained model's confident outputs, not near-uniform ones
    assert np.array_equal(from_onnx.argmax(axis=1), from_jax.argmax(axis=1))
    assert session.run(None, {"images": test[:1]})[0].shape == (1, 10)  # N is dynamic
    assert details["opset"] == export.ONNX_OPSET == 17 and details["converter"] == "jax2onnx 0.17.1"
    assert details["checked"]["images"] == export.CHECK_IMAGES
    assert details["checked"]["max_abs_difference"] <= export.CHECK_TOLERANCE


class HostCode(nn.Module):
    """A model whose forward pass calls back into Python: no ONNX operator holds that."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        import jax

        logits = nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))
        return jax.pure_callback(np.asarray, jax.ShapeDtypeStruct(logits.shape, logits.dtype), logits)


def test_a_model_jax2onnx_cannot_convert_is_one_config_error():
    import jax

    from mnist_flax.serving import export, trained

    model = trained.TrainedModel({"model": {"name": "mlp"}, "data": {"name": "fashion_mnist"}}, {}, 0, "")
    model.module = HostCode
    model.params = HostCode().init(jax.random.PRNGKey(0), np.zeros((1, 28, 28, 1), np.float32))["params"]
    with pytest.raises(ConfigError) as refused:
        export.onnx_model(model, {})
    message = str(refused.value)
    assert message.startswith("export --format onnx: jax2onnx 0.17.1 cannot convert the mlp model: ")
    assert "'pure_callback'" in message and "--format jax" in message and "\n" not in message


class FlaxPooling(nn.Module):
    """flax's pooling functions called as flax documents them: `window_shape` and `strides` by position."""

    @nn.compact
    def __call__(self, x):
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        return nn.Dense(3)(x.reshape((x.shape[0], -1)))


def test_flax_pooling_called_by_position_converts_and_computes_what_jax_does():
    import jax
    import jax2onnx

    from mnist_flax.serving import export

    module = FlaxPooling()
    variables = module.init(jax.random.PRNGKey(0), np.zeros((1, 12, 12, 1), np.float32))
    function = lambda x: module.apply(variables, x)  # noqa: E731
    spec = [jax.ShapeDtypeStruct((2, 12, 12, 1), np.float32)]
    # jax2onnx's own replacements take window_shape by keyword only (when it converts this, the shim can go).
    with pytest.raises(TypeError, match="positional argument"):
        jax2onnx.to_onnx(function, spec)
    with export.flax_pooling_signatures():
        proto = jax2onnx.to_onnx(function, spec)
    images = np.random.default_rng(0).random((2, 12, 12, 1), dtype=np.float32)
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: images})[0]
    np.testing.assert_allclose(outputs, np.asarray(function(images)), atol=1e-5)
    with pytest.raises(TypeError, match="positional argument"):  # jax2onnx's own patches are back
        jax2onnx.to_onnx(function, spec)


# ---------------------------------------------------------------- a trained run, exported


FRESH_RUNTIME = """
import sys
import numpy as np
import onnxruntime
model, images, out = sys.argv[1:]
session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
(given,) = session.get_inputs()
assert given.type == "tensor(uint8)" and given.shape == ["N", 28, 28, 1], given
np.save(out, session.run(None, {given.name: np.load(images)})[0])
print(sorted({m.split(".")[0] for m in sys.modules} & {"jax", "jaxlib", "flax", "mnist_flax", "tensorflow"}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_onnxruntime_in_a_fresh_process_gives_the_runs_predictions(runs, name, tiny_data_dir, tmp_path):
    folder = onnx_export(runs, name)
    pixels = split_images(tiny_data_dir)[..., None]  # [N, 28, 28, 1]: the data set's images with their channel
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
    assert program.platforms == ("cpu", "cuda", "rocm", "tpu") and str(program.in_avals[0]) == "uint8[N,28,28,1]"
    pixels = split_images(tiny_data_dir)[..., None]
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
    checked = card["format"].pop("checked")
    assert card["format"] == {"name": "onnx", "file": "model.onnx", "opset": 17, "ir_version": 10,
                              "converter": "jax2onnx 0.17.1", "runtime": "onnxruntime or any ONNX runtime"}  # fmt: skip
    assert checked["images"] == 8 and 0 <= checked["max_abs_difference"] <= 1e-4
    assert checked["runtime"] == f"onnxruntime {onnxruntime.__version__}"
    assert card["input"]["shape"] == ["N", 28, 28, 1] and card["output"]["shape"] == ["N", 10]
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
def test_a_model_jax2onnx_cannot_convert_is_one_line_through_the_cli(runs, tmp_path, monkeypatch):
    # The run's MLP, served through a function that calls back into Python (as a model of a user's might):
    # jax2onnx has no ONNX for it, JAX's own export neither. One line each, exit 2, nothing written.
    import jax

    from mnist_flax.serving import trained

    served = trained.TrainedModel.probabilities_fn

    def with_host_code(self):
        probabilities = served(self)

        def calling_python(variables, images):
            p = probabilities(variables, images)
            return jax.pure_callback(np.asarray, jax.ShapeDtypeStruct(p.shape, p.dtype), p)

        return calling_python

    monkeypatch.setattr(trained.TrainedModel, "probabilities_fn", with_host_code)
    out = tmp_path / "onnx"
    line = export_fails(runs["mlp"], "--out", str(out), "--no-wandb", fragments=["jax2onnx 0.17.1 cannot convert"])
    assert "the mlp model: [converter] No plugins registered for primitive 'pure_callback'" in line
    assert not out.exists()
    export_fails(runs["mlp"], "--format", "jax", "--out", str(out), fragments=["JAX cannot export the mlp model"])
    assert not out.exists()


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
