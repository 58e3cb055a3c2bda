"""What `predict` runs on the images: an export, or a checkpoint.

`load(MODEL)` gives a Predictor for
- an export folder (or its model file): `model.onnx` run by onnxruntime, so no JAX is imported at all, or
  `model.jaxexport` called through `jax.export.deserialize`;
- a run workdir, a checkpoints folder, one checkpoint step or a W&B model artifact (entity/project/name:alias):
  the model rebuilt from its config and run by JAX (serving.trained), the same function an export holds.
Each takes uint8 images [N, 28, 28] and gives the class probabilities [N, 10].
"""

import json
import os

import numpy as np

from mnist_flax.errors import CheckpointError, MnistFlaxError, first_line
from mnist_flax.records import files
from mnist_flax.serving import model_card

IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10


class Predictor:
    """A model that gives class probabilities for uint8 images [N, 28, 28]."""

    kind = ""  # "onnx", "jax export" or "checkpoint"

    def __init__(self, source: str, class_names: list[str], data_name: str | None):
        self.source = source
        self.class_names = class_names
        self.data_name = data_name

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        try:
            return np.asarray(self._run(np.ascontiguousarray(pixels, np.uint8)), np.float32)
        except MnistFlaxError:
            raise
        except Exception as e:  # a runtime's own error, on a model of someone else's say
            raise MnistFlaxError(f"{self.source}: the model failed on the images: {first_line(e)}") from None

    def _run(self, pixels: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"kind": self.kind, "source": self.source, "data_set": self.data_name, "class_names": self.class_names}


class OnnxPredictor(Predictor):
    """An ONNX export, run by onnxruntime on the CPU."""

    kind = "onnx"

    def __init__(self, path: str, card: dict):
        import onnxruntime

        try:
            options = onnxruntime.SessionOptions()
            options.log_severity_level = 3  # errors only: its warnings are not the user's to act on
            self.session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise CheckpointError(f"{path}: onnxruntime cannot load it: {first_line(e)}") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if not (
            len(inputs) == 1
            and inputs[0].type == "tensor(uint8)"
            and tuple(inputs[0].shape[1:]) == IMAGE_SHAPE
            and len(outputs) >= 1
            and outputs[0].shape[-1] == NUM_CLASSES
        ):
            found = ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs)
            raise CheckpointError(
                f"{path} is an ONNX model of another kind: it takes {found}, not uint8 [N, 28, 28] images "
                "giving 10 class probabilities"
            )
        self.input = inputs[0].name
        meta = self.session.get_modelmeta().custom_metadata_map
        names = card.get("class_names") or _json_list(meta.get("class_names"))
        super().__init__(path, names or [str(c) for c in range(NUM_CLASSES)], card_data(card) or meta.get("data_set"))

    def _run(self, pixels):
        return self.session.run(None, {self.input: pixels})[0]


class JaxExportPredictor(Predictor):
    """A `jax.export` program (export --format jax), called by JAX on this machine's platform."""

    kind = "jax export"

    def __init__(self, path: str, card: dict):
        from jax import export

        try:
            with open(path, "rb") as f:
                self.program = export.deserialize(bytearray(f.read()))
        except Exception as e:
            raise CheckpointError(f"{path}: not a jax.export program JAX can read: {first_line(e)}") from None
        (aval,) = self.program.in_avals or (None,)
        if aval is None or str(aval.dtype) != "uint8" or tuple(aval.shape[1:]) != IMAGE_SHAPE:
            raise CheckpointError(f"{path} is a jax.export program of another kind: it takes {self.program.in_avals}")
        names = card.get("class_names") or [str(c) for c in range(NUM_CLASSES)]
        super().__init__(path, names, card_data(card))

    def _run(self, pixels):
        return self.program.call(pixels)


class CheckpointPredictor(Predictor):
    """A checkpoint's variables in the model its config names, run by JAX (jit-compiled once per batch size)."""

    kind = "checkpoint"

    def __init__(self, trained):
        import jax

        self.variables = trained.variables
        self.function = jax.jit(trained.probabilities_fn())
        self.step = trained.step
        self.image_shape = tuple(trained.image_shape)  # (height, width, channels): what predict fits images to
        super().__init__(trained.checkpoint, trained.class_names, trained.data_name)

    def _run(self, pixels):
        return self.function(self.variables, pixels)

    def describe(self) -> dict:
        return {**super().describe(), "step": self.step}


def load(reference: str) -> Predictor:
    """The predictor MODEL names: an export folder or file, a run, a checkpoint (folder or step), a W&B artifact.

    Raises:
      MnistFlaxError: no such model, or one of another kind (one line).
    """
    path = os.path.abspath(os.path.expanduser(reference))
    model_file = _export_file(path)
    if model_file is not None:
        card_path = os.path.join(os.path.dirname(model_file), model_card.JSON_NAME)
        card = files.read_json(card_path, {})
        if model_file.endswith(model_card.MODEL_FILES["jax"]):
            return JaxExportPredictor(model_file, card)
        return OnnxPredictor(model_file, card)
    if os.path.isfile(path):
        raise CheckpointError(f"{path}: not a model file (an export's {' or '.join(model_card.MODEL_FILES.values())})")
    from mnist_flax.serving import trained  # JAX: only for a model that is not an export

    return CheckpointPredictor(trained.open_model(reference))


def _export_file(path: str) -> str | None:
    """The model file of an export folder (ONNX first), or the path when it is one; None if neither."""
    if os.path.isdir(path):
        found = [os.path.join(path, name) for name in model_card.MODEL_FILES.values()]
        return next((f for f in found if os.path.isfile(f)), None)
    if os.path.isfile(path) and path.endswith((".onnx", ".jaxexport")):
        return path
    return None


def card_data(card: dict) -> str | None:
    return (card.get("data") or {}).get("name")


def _json_list(text: str | None) -> list | None:
    try:
        value = json.loads(text) if text else None
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, list) else None
