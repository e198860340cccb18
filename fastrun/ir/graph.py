"""The IR: nodes, tensors with concrete shapes, constants; the :class:`OpSpec` of a heavy node."""
from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from fastrun.errors import InputError, ModelError
from fastrun.ops.registry import OpSpec
from fastrun.ops.registry import heavy_op_types
from fastrun.shapes import dims_text
from fastrun.ops import builtin  # noqa: F401  (registers the built-in implementations this module queries)


# Element-wise activations a Conv implementation may apply to its own output.
FUSABLE_ACTIVATIONS = ("Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh")


# Op types of quantized models (QDQ, QOperator, dynamic quantization). The front end never folds
# them: onnxruntime's quantization fusions must see the graph's Q/DQ groups as they are.
QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
    "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "MatMulIntegerToFloat", "QGemm", "QAttention",
    "QEmbedLayerNormalization", "MatMulNBits", "MatMulBnb4", "QOrderedMatMul",
})


def is_quantized_op(op_type: str) -> bool:
    return op_type in QUANTIZED_OPS or op_type.startswith("QLinear")


@dataclass
class Node:
    name: str
    op_type: str
    domain: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any]
    activation: Optional[str] = None
    activation_params: tuple = ()
    outer_reads: list[str] = field(default_factory=list)  # read by its subgraphs (If/Loop/Scan bodies)

    @property
    def reads(self) -> list[str]:
        """Every tensor the node reads: its inputs and its subgraphs' outer-scope reads."""
        return self.inputs + self.outer_reads if self.outer_reads else self.inputs


@dataclass
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str


@dataclass
class Graph:
    nodes: list[Node]
    tensors: dict[str, TensorInfo]
    constants: dict[str, np.ndarray]
    inputs: list[str]
    outputs: list[str]
    opsets: dict[str, int]
    model_hash: str = ""
    ir_version: int = 8
    name: str = "model"

    def consumers(self) -> dict[str, list[Node]]:
        users: dict[str, list[Node]] = defaultdict(list)
        for node in self.nodes:
            for t in node.inputs:
                if t:
                    users[t].append(node)
        return users

    def outer_reads(self) -> set[str]:
        """Tensors some node's subgraph reads from this graph's scope: names that must stay as they are."""
        return {t for node in self.nodes for t in node.outer_reads}

    def producer(self) -> dict[str, Node]:
        return {t: node for node in self.nodes for t in node.outputs}

    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: self.tensors[name].shape for name in self.inputs}

    def runtime_inputs(self, node: Node) -> list[str]:
        """The inputs of ``node`` that arrive at run time, in order: not omitted, not constants."""
        return [t for t in node.inputs if t and t not in self.constants]


_RAW_DTYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64,
               onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32}


def to_array(t: onnx.TensorProto) -> np.ndarray:
    """The initializer's values; plain raw little-endian data is viewed read-only rather than
    converted (ResNet-50's weights: 54 ms at load). Constants are never written in place."""
    dtype = _RAW_DTYPES.get(t.data_type)
    if dtype is not None and t.HasField("raw_data") and t.data_location != onnx.TensorProto.EXTERNAL \
            and sys.byteorder == "little":
        raw = t.raw_data  # each access of a bytes field copies it: once
        if len(raw) == int(np.prod(t.dims)) * np.dtype(dtype).itemsize:
            return np.frombuffer(raw, dtype=dtype).reshape(tuple(t.dims))
    try:
        return numpy_helper.to_array(t)
    except Exception as exc:
        raise ModelError(f"initializer {t.name!r} cannot be read: {exc}") from None


def dtype_name(elem_type: int) -> str:
    try:
        return str(helper.tensor_dtype_to_np_dtype(elem_type))
    except Exception:
        return "float32"


def node_from_proto(index: int, proto: onnx.NodeProto) -> Node:
    attrs = {a.name: helper.get_attribute_value(a) for a in proto.attribute}
    try:
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
    except UnicodeDecodeError:
        raise ModelError(f"node {proto.name or proto.op_type!r}: a string attribute is not valid UTF-8") from None
    return Node(name=proto.name or f"{proto.op_type}_{index}", op_type=proto.op_type,
                domain=proto.domain if proto.domain != "ai.onnx" else "", inputs=list(proto.input),
                outputs=list(proto.output), attrs=attrs, outer_reads=outer_scope_reads(proto))


def outer_scope_reads(proto: onnx.NodeProto) -> list[str]:
    """Names a node's subgraphs read from the enclosing scope (not defined inside them)."""
    reads: list[str] = []
    for attr in proto.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            reads.extend(_free_names(attr.g))
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for g in attr.graphs:
                reads.extend(_free_names(g))
    return list(dict.fromkeys(reads))


def _free_names(g: onnx.GraphProto) -> list[str]:
    defined = {i.name for i in g.input} | {t.name for t in g.initializer} | \
        {t.values.name for t in g.sparse_initializer}
    free = []
    for node in g.node:
        free.extend(t for t in list(node.input) + outer_scope_reads(node) if t and t not in defined)
        defined.update(node.output)
    return free


def to_proto(node: Node) -> onnx.NodeProto:
    """The node as ONNX, without fused activation (callers handle that)."""
    attrs = {k: v for k, v in node.attrs.items() if not k.startswith("_")}
    return helper.make_node(node.op_type, node.inputs, node.outputs, name=node.name, domain=node.domain or None, **attrs)


def toposort(nodes: list[Node], available: set[str]) -> list[Node]:
    produced_by = {}
    for node in nodes:
        for t in node.outputs:
            if not t:  # an optional output left out
                continue
            if t in produced_by or t in available:
                raise ModelError(f"tensor {t!r} is produced more than once")
            produced_by[t] = node
    for node in nodes:
        for t in node.reads:
            if t and t not in produced_by and t not in available:
                raise ModelError(f"node {node.name!r} reads {t!r}, which no node, input or initializer provides")
    order, state = [], {}
    for root in nodes:
        stack = [(root, False)]
        while stack:
            node, done = stack.pop()
            if done:
                state[node.name] = 2
                order.append(node)
                continue
            if state.get(node.name) == 2:
                continue
            if state.get(node.name) == 1:
                continue
            state[node.name] = 1
            stack.append((node, True))
            for t in node.reads:
                dep = produced_by.get(t)
                if dep is None:
                    continue
                if state.get(dep.name) == 1:
                    raise ModelError(f"the graph has a cycle through node {dep.name!r}")
                if state.get(dep.name) != 2:
                    stack.append((dep, False))
    return order


def quiet_run_options():
    """Run options that keep onnxruntime from logging the errors fastrun reports itself."""
    import onnxruntime

    options = onnxruntime.RunOptions()
    options.log_severity_level = 4
    return options


def first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


def normalize_attrs(node: Node, graph: Graph) -> None:
    """Fill defaults (and resolve auto_pad) so equal convolutions have equal specs."""
    if node.domain:
        return
    if node.op_type == "Conv":
        x = graph.tensors[node.inputs[0]].shape
        w_shape = _shape_of(graph, node.inputs[1])
        spatial = len(x) - 2
        kernel = tuple(node.attrs.get("kernel_shape") or w_shape[2:])
        strides = tuple(node.attrs.get("strides") or [1] * spatial)
        dilations = tuple(node.attrs.get("dilations") or [1] * spatial)
        pads = node.attrs.get("pads") or [0] * (2 * spatial)
        auto_pad = node.attrs.get("auto_pad", "NOTSET")
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            pads = _same_pads(x[2:], kernel, strides, dilations, upper=auto_pad == "SAME_UPPER")
        elif auto_pad == "VALID":
            pads = [0] * (2 * spatial)
        node.attrs = {"kernel_shape": kernel, "strides": strides, "pads": tuple(pads),
                      "dilations": dilations, "group": int(node.attrs.get("group", 1))}
    elif node.op_type == "Gemm":
        node.attrs = {"alpha": float(node.attrs.get("alpha", 1.0)), "beta": float(node.attrs.get("beta", 1.0)),
                      "transA": int(node.attrs.get("transA", 0)), "transB": int(node.attrs.get("transB", 0))}


def _same_pads(spatial: Sequence[int], kernel, strides, dilations, upper: bool) -> list[int]:
    begins, ends = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, big = total // 2, total - total // 2
        begins.append(small if upper else big)
        ends.append(big if upper else small)
    return begins + ends


def _shape_of(graph: Graph, tensor: str) -> tuple[int, ...]:
    if tensor in graph.constants:
        return tuple(graph.constants[tensor].shape)
    return graph.tensors[tensor].shape


def _dtype_of(graph: Graph, tensor: str) -> str:
    if tensor in graph.constants:
        return str(graph.constants[tensor].dtype)
    return graph.tensors[tensor].dtype


def check_heavy_nodes(graph: Graph) -> None:
    heavy = heavy_op_types()
    for node in graph.nodes:
        if node.op_type in heavy and not node.domain:
            dtypes = {t: _dtype_of(graph, t) for t in node.inputs if t}
            if len(set(dtypes.values())) > 1:
                listed = ", ".join(f"{t} is {d}" for t, d in dtypes.items())
                raise ModelError(f"{node.op_type} {node.name!r}: its inputs must share one element type ({listed})")
        if node.op_type == "Conv" and not node.domain and len(node.inputs) > 1:
            x, w = _shape_of(graph, node.inputs[0]), _shape_of(graph, node.inputs[1])
            g = node.attrs["group"]
            if g < 1 or len(w) != len(x) or w[1] * g != x[1] or w[0] % g:
                raise ModelError(f"Conv {node.name!r}: weight shape {list(w)} contradicts input shape {list(x)} with group={g}")
            spatial = len(x) - 2
            a = node.attrs
            if tuple(a["kernel_shape"]) != tuple(w[2:]):
                raise ModelError(f"Conv {node.name!r}: kernel_shape {list(a['kernel_shape'])} contradicts weight shape {list(w)}")
            if spatial < 1 or len(a["strides"]) != spatial or len(a["dilations"]) != spatial \
                    or len(a["pads"]) != 2 * spatial or any(v < 1 for v in (*a["strides"], *a["dilations"])) \
                    or any(p < 0 for p in a["pads"]):
                raise ModelError(f"Conv {node.name!r}: invalid strides {list(a['strides'])}, dilations "
                                 f"{list(a['dilations'])} or pads {list(a['pads'])} for {spatial} spatial dims")
            out = graph.tensors[node.outputs[0]].shape
            if any(d <= 0 for d in out):
                raise InputError(f"shapes do not fit the model: Conv {node.name!r} would turn input {dims_text(x)} "
                                 f"into an empty output {dims_text(out)}")
            if len(node.inputs) > 2 and node.inputs[2] and _shape_of(graph, node.inputs[2]) != (w[0],):
                raise ModelError(f"Conv {node.name!r}: bias shape {list(_shape_of(graph, node.inputs[2]))} "
                                 f"contradicts {w[0]} output channels")


def spec_for_node(node: Node, graph: Graph) -> OpSpec:
    """The graph-independent description of a node that implementations and caches key on."""
    shapes = tuple(_shape_of(graph, t) if t else None for t in node.inputs)
    const = tuple(bool(t) and t in graph.constants for t in node.inputs)
    out = graph.tensors[node.outputs[0]]
    attrs = tuple(sorted((k, _plain(v)) for k, v in node.attrs.items()))
    return OpSpec(op_type=node.op_type, domain=node.domain, inputs=shapes, const=const, output=out.shape,
                  dtype=out.dtype, attrs=attrs, activation=node.activation,
                  activation_params=tuple(node.activation_params))


def _plain(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return tuple(_plain(x) for x in v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    return v


def const_inputs(node: Node, graph: Graph) -> dict[int, np.ndarray]:
    return {i: graph.constants[t] for i, t in enumerate(node.inputs) if t and t in graph.constants}
