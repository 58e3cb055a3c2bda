"""The ONNX graph of a trained CNN or MLP, written from its parameters with onnx's helper API.

The graph is the whole path from a raw image to the class probabilities, so a consumer feeds what a data set
file holds:

    images uint8 [N, 28, 28] -> Cast(float) -> Div(255)                    steps.preprocess
      CNN: Unsqueeze -> [N, 1, 28, 28], per stage Conv 3x3 (pads 1) -> Relu -> AveragePool 2x2 (stride 2),
           Transpose to NHWC (Flax flattens the features in (height, width, channel) order)
      -> Flatten -> per dense layer Gemm -> Relu, the last Gemm -> Softmax -> probabilities float32 [N, 10]

N is dynamic. Dropout is absent (inference). Opset 17 (onnxruntime 1.12 and later, and most other runtimes)
at the oldest IR version that carries it. The parameters are the graph's initializers; the metadata
(`metadata_props`) holds the class names and where the model came from, so the file alone is enough.
"""

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mnist_flax.errors import ConfigError

OPSET = 17
INPUT, OUTPUT = "images", "probabilities"
IMAGE_SIZE = 28


class _Graph:
    """Nodes and initializers, each node's output named after its op and position."""

    def __init__(self):
        self.nodes, self.initializers = [], []

    def constant(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], **attributes) -> str:
        output = f"{op[0].lower()}{op[1:]}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attributes))
        return output


def build(model_config: dict, params: dict, metadata: dict[str, str], num_classes: int = 10) -> onnx.ModelProto:
    """The ONNX model of `params` (a Flax CNN's or MLP's, as `models.create(model_config)` names them); another
    model is refused with one line (its graph is not written here)."""
    if model_config["name"] not in ("cnn", "mlp"):
        raise ConfigError(
            f"export --format onnx: the {model_config['name']} model has no ONNX graph yet (cnn and mlp have one); "
            "use --format jax"
        )
    graph = _Graph()
    x = graph.node("Cast", [INPUT], to=TensorProto.FLOAT)
    x = graph.node("Div", [x, graph.constant("pixel_scale", np.array(255.0, np.float32))])
    if model_config["name"] == "cnn":
        x = graph.node("Unsqueeze", [x, graph.constant("channel_axis", np.array([1], np.int64))])  # NCHW
        for i in range(len(model_config["conv_features"])):
            conv = params[f"Conv_{i}"]
            kernel = np.transpose(np.asarray(conv["kernel"], np.float32), (3, 2, 0, 1))  # HWIO -> OIHW
            weight = graph.constant(f"conv{i}_kernel", kernel)
            bias = graph.constant(f"conv{i}_bias", np.asarray(conv["bias"], np.float32))
            x = graph.node("Conv", [x, weight, bias], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1])
            x = graph.node("Relu", [x])
            x = graph.node("AveragePool", [x], kernel_shape=[2, 2], strides=[2, 2])
        x = graph.node("Transpose", [x], perm=[0, 2, 3, 1])  # back to NHWC, the order the dense kernel expects
    x = graph.node("Flatten", [x], axis=1)
    layers = len(model_config["dense_features"]) + 1  # the hidden layers, then the classifier
    for i in range(layers):
        dense = params[f"Dense_{i}"]
        weight = graph.constant(f"dense{i}_kernel", np.asarray(dense["kernel"], np.float32))
        bias = graph.constant(f"dense{i}_bias", np.asarray(dense["bias"], np.float32))
        x = graph.node("Gemm", [x, weight, bias])
        if i < layers - 1:
            x = graph.node("Relu", [x])
    graph.nodes.append(helper.make_node("Softmax", [x], [OUTPUT], name="softmax", axis=1))
    onnx_graph = helper.make_graph(
        graph.nodes,
        f"mnist_flax_{model_config['name']}",
        [helper.make_tensor_value_info(INPUT, TensorProto.UINT8, ["N", IMAGE_SIZE, IMAGE_SIZE])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["N", num_classes])],
        initializer=graph.initializers,
    )
    opsets = [helper.make_opsetid("", OPSET)]
    model = helper.make_model(
        onnx_graph,
        opset_imports=opsets,
        producer_name="mnist_flax export",
        doc_string="uint8 images [N, 28, 28] (0-255, light object on black) -> class probabilities [N, 10]",
    )
    model.ir_version = helper.find_min_ir_version_for(opsets)
    helper.set_model_props(model, {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    onnx.checker.check_model(model, full_check=True)
    return model
