"""Example models that need no download: the real architectures shipped in the ``onnx`` wheel.

``onnx/backend/test/data/light/`` holds ResNet-50, VGG-19, DenseNet-121, Inception v1/v2,
ShuffleNet, SqueezeNet, AlexNet and ZFNet-512 with their weights replaced by ``ConstantOfShape``
(every weight 0.02). :func:`randomized` gives them random He-scaled weights so that comparisons
against onnxruntime exercise every channel (constant weights hide layout bugs).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from fastrun.shapes import as_shape

EXAMPLES = ("resnet50", "vgg19", "densenet121", "inception_v1", "inception_v2", "shufflenet", "squeezenet",
            "bvlc_alexnet", "zfnet512")
ALIASES = {"alexnet": "bvlc_alexnet", "zfnet": "zfnet512", "densenet": "densenet121", "vgg": "vgg19",
           "resnet": "resnet50", "inception": "inception_v1"}


def light_dir() -> Path:
    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def example_path(name: str) -> Path:
    """Path of a light example model by short name (``resnet50``, ``vgg19``, ...)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in EXAMPLES:
        raise KeyError(f"unknown example {name!r}; choose from {', '.join(EXAMPLES)}")
    path = light_dir() / f"light_{key}.onnx"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed onnx package")
    return path


def pytorch_converted_dir() -> Path:
    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "pytorch-converted"


def randomized(path: "str | Path", seed: int = 0, batch: int | None = None,
               strip_softmax: bool = False) -> onnx.ModelProto:
    """The model with every ``ConstantOfShape`` weight replaced by a random initializer.

    Weights (rank >= 2) get He scaling; 1-D parameters named like BatchNorm variances stay
    positive. ``batch`` rewrites a fixed batch of 1 (input dim 0 and Reshape constants whose
    first entry is 1) so the model runs at another batch size.
    """
    model = onnx.load(str(path))
    rng = np.random.default_rng(seed)
    shapes = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    keep, new_inits = [], []
    for node in model.graph.node:
        if node.op_type == "ConstantOfShape" and node.input and node.input[0] in shapes:
            shape = as_shape(shapes[node.input[0]])
            new_inits.append(numpy_helper.from_array(_random_param(node.output[0], shape, rng), node.output[0]))
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    used = {i for n in keep for i in n.input}
    inits = [t for t in model.graph.initializer if t.name in used] + new_inits
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
    init_names = {t.name for t in inits}
    inputs = [vi for vi in model.graph.input if vi.name not in init_names and vi.name in used]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    if strip_softmax:
        _strip_final_softmax(model)
    model.ir_version = max(model.ir_version, 4)  # initializers need not be graph inputs from IR 4 on
    if batch is not None:
        _set_batch(model, batch)
    return model


def _random_param(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    lowered = name.lower()
    if len(shape) >= 2:
        fan_in = int(np.prod(shape[1:]))
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    if any(k in lowered for k in ("riv", "var", "_s_", "scale", "_s_0")):
        return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    return (rng.standard_normal(shape) * 0.1).astype(np.float32)


def _set_batch(model: onnx.ModelProto, batch: int) -> None:
    for vi in model.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if dims:
            dims[0].dim_value = batch
    for vi in model.graph.output:
        dims = vi.type.tensor_type.shape.dim
        if dims:
            dims[0].dim_value = batch
    reshape_shapes = {n.input[1] for n in model.graph.node if n.op_type == "Reshape" and len(n.input) > 1}
    for i, t in enumerate(model.graph.initializer):
        if t.name in reshape_shapes:
            arr = numpy_helper.to_array(t).copy()
            if arr.ndim == 1 and arr.size and arr[0] == 1:
                arr[0] = -1
                model.graph.initializer[i].CopyFrom(numpy_helper.from_array(arr, t.name))
    del model.graph.value_info[:]


def _strip_final_softmax(model: onnx.ModelProto) -> None:
    outputs = {o.name for o in model.graph.output}
    for node in list(model.graph.node):
        if node.op_type == "Softmax" and node.output[0] in outputs:
            model.graph.node.remove(node)
            for o in model.graph.output:
                if o.name == node.output[0]:
                    o.name = node.input[0]


def dynamic_encoder(hidden: int = 64, heads: int = 4, layers: int = 2, vocab: int = 1000,
                    seed: int = 0) -> onnx.ModelProto:
    """A BERT-style encoder with symbolic batch and sequence dims (``input_ids``: int64
    ``[batch, sequence]`` -> ``hidden_states``: float ``[batch, sequence, hidden]``), random weights.

    What serving meets with text models: every request length is a new shape set.
    """
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def weight(name: str, *shape: int) -> str:
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), name))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    head_dim = hidden // heads
    inits += [numpy_helper.from_array(np.array([0, 0, heads, head_dim], np.int64), "split_heads"),
              numpy_helper.from_array(np.array([0, 0, hidden], np.int64), "merge_heads"),
              numpy_helper.from_array(np.array(1 / np.sqrt(head_dim), np.float32), "scale"),
              numpy_helper.from_array(np.ones(hidden, np.float32), "ln_scale"),
              numpy_helper.from_array(np.zeros(hidden, np.float32), "ln_bias")]
    x = node("Gather", [weight("embedding", vocab, hidden), "input_ids"], "embedded")
    for i in range(layers):
        p = f"layer{i}"
        normed = node("LayerNormalization", [x, "ln_scale", "ln_bias"], f"{p}.ln", axis=-1)
        qkv = {}
        for part in ("q", "k", "v"):
            projected = node("MatMul", [normed, weight(f"{p}.w{part}", hidden, hidden)], f"{p}.{part}")
            split = node("Reshape", [projected, "split_heads"], f"{p}.{part}.heads")
            qkv[part] = node("Transpose", [split], f"{p}.{part}.t", perm=[0, 2, 3, 1] if part == "k" else [0, 2, 1, 3])
        scores = node("Mul", [node("MatMul", [qkv["q"], qkv["k"]], f"{p}.qk"), "scale"], f"{p}.scores")
        attended = node("MatMul", [node("Softmax", [scores], f"{p}.probs", axis=-1), qkv["v"]], f"{p}.attended")
        merged = node("Reshape", [node("Transpose", [attended], f"{p}.merged.t", perm=[0, 2, 1, 3]), "merge_heads"],
                      f"{p}.merged")
        x = node("Add", [x, node("MatMul", [merged, weight(f"{p}.wo", hidden, hidden)], f"{p}.out")], f"{p}.res1")
        up = node("Relu", [node("MatMul", [x, weight(f"{p}.w1", hidden, 4 * hidden)], f"{p}.up")], f"{p}.act")
        x = node("Add", [x, node("MatMul", [up, weight(f"{p}.w2", 4 * hidden, hidden)], f"{p}.down")], f"{p}.res2")
    nodes[-1].output[0] = "hidden_states"
    graph = helper.make_graph(nodes, "encoder",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
                              [helper.make_tensor_value_info("hidden_states", TensorProto.FLOAT,
                                                             ["batch", "sequence", hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
