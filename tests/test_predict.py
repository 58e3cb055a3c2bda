"""`python -m mnist_flax predict`: PNG files written from the test images give predictions.csv back (labels, and
probabilities within 1e-5), whether the model is the ONNX export, the run or one checkpoint; .npy arrays and IDX
files agree; `--top` and `--json` have their shapes; bad input is one line, exit 2, nothing written.

The trained runs and the CNN's export are tests/shared.py's, made once per session.
"""

import gzip
import json
import os

import numpy as np
import onnx
import pytest
from conftest import make_learnable_split, write_idx
from PIL import Image
from shared import (
    TOLERANCE,
    assert_one_line_error,
    onnx_export,
    run_cli,
    run_in_process,
    snapshot,
    split_images,
)

from mnist_flax import layout
from mnist_flax.errors import DataError, MnistFlaxError
from mnist_flax.records import files
from mnist_flax.serving import images, predictor

COUNT = 12  # test images written as PNG files


@pytest.fixture(scope="module")
def runs(served_runs):
    return served_runs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_data_dir) -> dict:
    """The first test images as PNG files and as one .npy array, and the test split's IDX file."""
    folder = tmp_path_factory.mktemp("predict_inputs")
    pixels = split_images(tiny_data_dir)
    pngs = []
    for i in range(COUNT):
        pngs.append(str(folder / f"test_{i:02d}.png"))
        Image.fromarray(pixels[i], mode="L").save(pngs[-1])
    np.save(folder / "first.npy", pixels[:COUNT])
    return {
        "folder": str(folder),
        "pixels": pixels,
        "pngs": pngs,
        "npy": str(folder / "first.npy"),
        "idx": os.path.join(tiny_data_dir, "t10k-images-idx3-ubyte.gz"),
    }


def predict_json(model: str, *paths: str, cwd: str | None = None) -> dict:
    result = run_cli("predict", model, *paths, "--json", **({"cwd": cwd} if cwd else {}))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def probabilities(document: dict) -> np.ndarray:
    return np.array([row["probabilities"] for row in document["predictions"]])


def expected(run: str) -> dict:
    return files.read_predictions(os.path.join(run, layout.PREDICTIONS))


# ---------------------------------------------------------------- the predictions


@pytest.mark.slow
def test_png_files_give_the_runs_predictions_through_the_export(runs, inputs):
    document = predict_json(onnx_export(runs, "cnn"), *inputs["pngs"])
    assert document["model"]["kind"] == "onnx" and document["model"]["data_set"] == "fashion_mnist"
    truth = expected(runs["cnn"])
    rows = document["predictions"]
    assert [row["image"] for row in rows] == inputs["pngs"] and all(row["index"] is None for row in rows)
    assert [row["label"] for row in rows] == list(truth["predicted"][:COUNT])
    assert [row["class"] for row in rows] == [document["model"]["class_names"][c] for c in truth["predicted"][:COUNT]]
    assert np.abs(probabilities(document) - truth["probs"][:COUNT]).max() < TOLERANCE
    assert [row["probability"] for row in rows] == [max(row["probabilities"]) for row in rows]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_the_run_the_export_a_npy_and_an_idx_file_agree(runs, inputs, name):
    # One call through JAX (the run: its best checkpoint) with every kind of input, one through onnxruntime.
    paths = [*inputs["pngs"], inputs["npy"], inputs["idx"]]
    through_run = predict_json(runs[name], *paths)
    through_export = predict_json(onnx_export(runs, name), *paths)
    assert through_run["model"]["kind"] == "checkpoint" and through_export["model"]["kind"] == "onnx"
    best = files.read_json(os.path.join(runs[name], layout.FINAL_METRICS))["best_validation"]["step"]
    assert through_run["model"]["step"] == best
    truth = expected(runs[name])
    pixels = inputs["pixels"]
    want = np.concatenate([truth["probs"][:COUNT], truth["probs"][:COUNT], truth["probs"]])
    for document in (through_run, through_export):
        rows = document["predictions"]
        assert len(rows) == 2 * COUNT + len(pixels)
        assert rows[COUNT]["image"] == f"{inputs['npy']}[0]" and rows[2 * COUNT + 5]["index"] == 5
        assert np.abs(probabilities(document) - want).max() < TOLERANCE
        assert [row["label"] for row in rows] == list(want.argmax(axis=1))
    assert np.abs(probabilities(through_run) - probabilities(through_export)).max() < TOLERANCE


@pytest.mark.slow
def test_a_checkpoint_step_and_the_checkpoints_folder_are_models_too(runs, inputs):
    run = runs["mlp"]
    best = files.read_json(os.path.join(run, layout.FINAL_METRICS))["best_validation"]["step"]
    step = predict_json(os.path.join(run, layout.CHECKPOINTS, str(best)), inputs["npy"])
    assert step["model"]["source"] == os.path.join(run, layout.CHECKPOINTS, str(best))
    assert np.abs(probabilities(step) - expected(run)["probs"][:COUNT]).max() < TOLERANCE
    # The checkpoints folder: the kept step with the best validation accuracy (the latest among equals).
    folder = predict_json(os.path.join(run, layout.CHECKPOINTS), inputs["npy"])
    assert folder["model"]["step"] == best


@pytest.mark.slow
def test_top_k_and_json_shapes(runs, inputs):
    export = onnx_export(runs, "cnn")
    result = run_cli("predict", export, *inputs["pngs"][:2], inputs["npy"], "--top", "3")
    assert result.returncode == 0, result.stderr
    header, *lines = result.stdout.rstrip("\n").splitlines()
    assert header.split() == ["image", "label", "class", "probability"]
    assert len(lines) == 3 * (2 + COUNT)
    document = predict_json(export, *inputs["pngs"][:2], inputs["npy"])
    for group, row in zip(range(0, len(lines), 3), document["predictions"], strict=True):
        first, *rest = lines[group : group + 3]
        assert first.startswith(row["image"] + " ") and all(line.startswith(" " * len(row["image"])) for line in rest)
        ranked = np.argsort(-np.array(row["probabilities"]), kind="stable")[:3]
        labels = [int(first.split()[1])] + [int(line.split()[0]) for line in rest]
        assert labels == list(ranked)
        assert float(first.split()[-1]) == pytest.approx(row["probability"], abs=1e-6)
    result = run_cli("predict", export, inputs["pngs"][0], "--json", "--top", "3")
    (row,) = json.loads(result.stdout)["predictions"]
    assert set(row) == {"image", "file", "index", "label", "class", "probability", "top", "probabilities"}
    assert len(row["top"]) == 3 and len(row["probabilities"]) == 10 and sum(row["probabilities"]) == pytest.approx(1)
    assert [t["probability"] for t in row["top"]] == sorted(row["probabilities"], reverse=True)[:3]
    assert row["top"][0] == {"label": row["label"], "class": row["class"], "probability": row["probability"]}


@pytest.mark.slow
def test_colour_any_size_jpeg_and_inverted_images(runs, inputs, tmp_path):
    export, pixels = onnx_export(runs, "cnn"), inputs["pixels"]
    grey = pixels[:3]
    colour = []
    for i, image in enumerate(grey):  # R = G = B: the luma is the grey value itself; twice the size
        rgb = Image.fromarray(np.stack([image] * 3, axis=-1), mode="RGB").resize((56, 56), Image.Resampling.NEAREST)
        colour.append(str(tmp_path / f"colour_{i}.png"))
        rgb.save(colour[-1])
    jpeg = str(tmp_path / "grey.jpg")
    Image.fromarray(grey[0], mode="L").save(jpeg, quality=95)
    np.save(tmp_path / "inverted.npy", 255 - grey)
    document = predict_json(export, *colour, jpeg)
    labels = expected(runs["cnn"])["predicted"]
    assert [row["label"] for row in document["predictions"]] == [*labels[:3], labels[0]]
    result = run_cli("predict", export, str(tmp_path / "inverted.npy"), "--invert", "--json")
    assert np.abs(probabilities(json.loads(result.stdout)) - expected(runs["cnn"])["probs"][:3]).max() < TOLERANCE


GREY_28 = (28, 28, 1)  # the image shape of the runs' data set (Fashion-MNIST), as they recorded it


def test_images_are_read_as_the_docs_say(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    Image.fromarray(grey, mode="L").save(tmp_path / "grey.png")
    read = images.fit(images.read(str(tmp_path / "grey.png")), GREY_28)
    assert read.kind == "image" and not read.indexed and np.array_equal(read.pixels, grey[None, ..., None])
    assert read.note == ""  # grey, as the model takes: nothing converted
    colour = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    Image.fromarray(colour, mode="RGB").save(tmp_path / "colour.png")
    luma = Image.fromarray(colour, mode="RGB").convert("L").resize((28, 28), Image.Resampling.LANCZOS)
    fitted = images.fit(images.read(str(tmp_path / "colour.png")), GREY_28)
    assert np.array_equal(fitted.pixels[0, ..., 0], np.asarray(luma))
    assert fitted.note == f"{tmp_path / 'colour.png'}: colour (RGB) images converted to grey, as the model takes"
    # A colour model takes it as it is (resized); a grey picture is repeated into its three channels.
    rgb = images.fit(images.read(str(tmp_path / "colour.png")), (40, 30, 3))
    assert np.array_equal(rgb.pixels[0], colour) and rgb.note == ""
    repeated = images.fit(images.read(str(tmp_path / "grey.png")), (28, 28, 3))
    assert np.array_equal(repeated.pixels[0], np.stack([grey] * 3, axis=-1))
    assert "grey images converted" in repeated.note
    weighted = colour @ np.array([0.299, 0.587, 0.114])  # ITU-R 601-2 luma, as Pillow's "L"
    assert np.abs(np.asarray(Image.fromarray(colour).convert("L"), float) - weighted).max() <= 1
    np.save(tmp_path / "one.npy", grey)
    assert images.fit(images.read(str(tmp_path / "one.npy")), GREY_28).pixels.shape == (1, 28, 28, 1)
    write_idx(str(tmp_path / "raw-idx"), np.stack([grey, grey]), compress=False)
    read = images.fit(images.read(str(tmp_path / "raw-idx")), GREY_28)
    assert read.kind == "idx" and read.indexed and read.pixels.shape == (2, 28, 28, 1)
    assert np.array_equal(images.invert(read.pixels), 255 - read.pixels)


def test_bad_images_are_data_errors(tmp_path):
    (tmp_path / "text.png").write_text("not an image")
    noise = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "whole.png")
    whole = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    np.save(tmp_path / "float.npy", np.zeros((2, 28, 28), np.float32))
    np.save(tmp_path / "shape.npy", np.zeros((2, 28, 27), np.uint8))
    np.save(tmp_path / "empty.npy", np.zeros((0, 28, 28), np.uint8))
    write_idx(str(tmp_path / "labels.gz"), np.zeros(5, np.uint8))
    write_idx(str(tmp_path / "images.gz"), np.zeros((3, 28, 28), np.uint8))
    (tmp_path / "cut-idx.gz").write_bytes(gzip.compress(gzip.decompress((tmp_path / "images.gz").read_bytes())[:900]))
    cases = {
        "text.png": "not an image",
        "cut.png": "cannot be decoded",
        "float.npy": "float32 [2, 28, 28]; expected uint8",
        "shape.npy": "uint8 [2, 28, 27]; expected uint8",
        "empty.npy": "holds no image",
        "labels.gz": "expected IDX images",
        "cut-idx.gz": "truncated",
        "missing.png": "No such file",
    }
    for name, message in cases.items():
        with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
            images.fit(images.read(str(tmp_path / name)), GREY_28)


def test_exports_of_before_the_channel_axis_still_load(tmp_path):
    # Exports written before the models took a channel axis take uint8 [N, 28, 28] (ONNX and jax.export alike):
    # they load, and take grey images with or without the channel axis, as a current export does.
    import jax
    from jax import export
    from jax2onnx import to_onnx

    from mnist_flax.serving import trained

    model = trained.TrainedModel({"model": {"name": "mlp"}, "data": {"name": "fashion_mnist"}}, {}, 0, "")
    model.params = model.module().init(jax.random.PRNGKey(0), np.zeros((1, 28, 28, 1), np.float32))["params"]
    probabilities = model.probabilities_fn()

    def before(images):  # [N, 28, 28]
        return probabilities(model.variables, images[..., None])

    (tmp_path / "onnx").mkdir()
    (tmp_path / "jax").mkdir()
    proto = to_onnx(before, [jax.ShapeDtypeStruct(("N", 28, 28), np.uint8)], opset=17, input_names=["images"])
    onnx.save(proto, tmp_path / "onnx" / "model.onnx")
    (batch,) = export.symbolic_shape("N")
    program = export.export(jax.jit(before))(jax.ShapeDtypeStruct((batch, 28, 28), np.uint8))
    (tmp_path / "jax" / "model.jaxexport").write_bytes(program.serialize())
    pixels = make_learnable_split(16, seed=2)[0]
    want = np.asarray(jax.jit(probabilities)(model.variables, pixels[..., None]))
    for folder in ("onnx", "jax"):
        old = predictor.load(str(tmp_path / folder))
        assert old.image_shape == (28, 28) and old.class_names == [str(c) for c in range(10)]
        for given in (pixels, pixels[..., None]):
            assert np.abs(old(given) - want).max() < TOLERANCE
        with pytest.raises(MnistFlaxError, match=r"takes images of shape \[28, 28\]; these are \[28, 27\]$"):
            old(pixels[:, :, :27])


# ---------------------------------------------------------------- bad input, end to end


def predict_fails(model: str, *paths: str, folder: str, fragments=(), env=None) -> None:
    before = snapshot(folder)
    result = run_in_process("predict", model, *paths, cwd=folder, env=env)
    assert_one_line_error(result, *fragments)
    assert snapshot(folder) == before  # nothing written


@pytest.mark.slow
def test_bad_input_is_one_line_and_exit_2(runs, inputs, tmp_path):
    export, folder = onnx_export(runs, "cnn"), str(tmp_path)
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "cut.png").write_bytes(open(inputs["pngs"][0], "rb").read()[:100])
    np.save(tmp_path / "float.npy", inputs["pixels"][:2].astype(np.float64))
    np.save(tmp_path / "shape.npy", inputs["pixels"][:2, :, :20])
    labels = os.path.join(os.path.dirname(inputs["idx"]), "t10k-labels-idx1-ubyte.gz")
    for path, fragment in [
        (tmp_path / "text.png", "not an image"),
        (tmp_path / "cut.png", "cannot be decoded"),
        (tmp_path / "float.npy", "an array of float64 [2, 28, 28]"),
        (tmp_path / "shape.npy", "an array of uint8 [2, 28, 20]"),
        (labels, "expected IDX images"),
    ]:
        predict_fails(export, str(path), folder=folder, fragments=[str(path), fragment])
    # Through the real entry too: one line, no traceback.
    assert_one_line_error(run_cli("predict", export, str(tmp_path / "text.png"), cwd=folder), "not an image")
    predict_fails(export, inputs["pngs"][0], "--top", "0", folder=folder, fragments=["--top: 0"])
    predict_fails(export, folder=folder, fragments=["the following arguments are required: IMAGE"])
    predict_fails(str(tmp_path / "nowhere"), inputs["pngs"][0], folder=folder, fragments=["no such folder"])
    no_key = {"WANDB_API_KEY": "", "WANDB_TOKEN": ""}
    predict_fails("someone/project/model-abc:best", inputs["pngs"][0], folder=folder, env=no_key,
                  fragments=["needs a W&B key"])  # fmt: skip


@pytest.mark.slow
def test_a_model_of_another_kind_is_refused(runs, inputs, tmp_path):
    import shutil

    folder, png = str(tmp_path), inputs["pngs"][0]
    # A model artifact (a checkpoint step folder, as W&B downloads it) whose parameters are another model's.
    run, mlp_config = runs["cnn"], files.read_json(os.path.join(runs["mlp"], layout.CONFIG))["model"]
    best = files.read_json(os.path.join(run, layout.FINAL_METRICS))["best_validation"]["step"]
    artifact = tmp_path / "model-abcd1234:v1"
    shutil.copytree(os.path.join(run, layout.CHECKPOINTS, str(best)), artifact)
    meta = json.loads((artifact / "meta" / "metadata").read_text())
    meta["config"]["model"] = mlp_config
    (artifact / "meta" / "metadata").write_text(json.dumps(meta))
    predict_fails(str(artifact), png, folder=folder, fragments=["holds the parameters of another model than the mlp"])
    # An artifact of another type: the run's predictions.
    other = tmp_path / "predictions-abcd1234:v0"
    other.mkdir()
    shutil.copy(os.path.join(run, layout.PREDICTIONS), other)
    predict_fails(str(other), png, folder=folder, fragments=["is no run workdir, checkpoints folder"])
    # An ONNX model that takes something else than uint8 images.
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])],
        "other",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 3])],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    (tmp_path / "foreign").mkdir()
    onnx.save(model, tmp_path / "foreign" / "model.onnx")
    predict_fails(str(tmp_path / "foreign"), png, folder=folder, fragments=["an ONNX model of another kind"])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.onnx").write_bytes(b"not a model")
    predict_fails(str(tmp_path / "broken"), png, folder=folder, fragments=["onnxruntime cannot load it"])
