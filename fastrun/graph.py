"""ONNX model -> a small IR with concrete shapes, ready for selection.

Loading does, in order: read and check the model, fix input shapes (symbolic dims from the
caller), fold every constant sub-graph into constants (the light models build their weights with
``ConstantOfShape``), infer concrete shapes of every tensor, drop inference no-ops (Dropout,
Identity), fold BatchNormalization into the Conv before it, fuse a following activation into
Conv, and fill in attribute defaults of the heavy ops so that their :class:`OpSpec` is canonical.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import mmap
import os
import sys
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import ortutil
from .errors import InputError, ModelError
from .registry import OpSpec

log = logging.getLogger(__name__)

ModelSource = Union[str, os.PathLike, bytes, onnx.ModelProto]

MIN_OPSET = 7
KNOWN_DOMAINS = ("", "ai.onnx", "com.microsoft", "com.microsoft.nchwc", "ai.onnx.ml")
# Ops whose output differs between runs: never folded even with constant inputs.
NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
# Element-wise activations a Conv implementation may apply to its own output.
FUSABLE_ACTIVATIONS = ("Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh")


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

    def producer(self) -> dict[str, Node]:
        return {t: node for node in self.nodes for t in node.outputs}

    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: self.tensors[name].shape for name in self.inputs}


# ----------------------------------------------------------------------------------------- loading

def read_bytes(source: ModelSource) -> bytes:
    """A model's serialized bytes from a path, bytes or ModelProto (not parsed: see read_model)."""
    if isinstance(source, onnx.ModelProto):
        return source.SerializeToString()
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    else:
        with _open_model_file(source) as f:
            data = f.read()
    if not data:
        raise ModelError(f"{_where(source)}: empty file, not an ONNX model")
    return data


def source_hash(source: ModelSource) -> str:
    """:func:`model_hash` of a model's bytes; a file is hashed through ``mmap``, without reading it
    into memory (VGG-19 with its weights: 0.3 s instead of 0.7-1.4 s to read and hash)."""
    if isinstance(source, (bytes, bytearray, onnx.ModelProto)):
        return model_hash(read_bytes(source))
    with _open_model_file(source) as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise ModelError(f"{_where(source)}: empty file, not an ONNX model")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
            return hashlib.sha256(view).hexdigest()


@contextlib.contextmanager
def _open_model_file(source: "str | os.PathLike") -> Iterator[BinaryIO]:
    path = os.fspath(source)
    if not os.path.exists(path):
        raise ModelError(f"model file not found: {path}")
    if os.path.isdir(path):
        raise ModelError(f"{path} is a directory, not an ONNX model file")
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror}") from None
    with f:
        try:
            yield f
        except OSError as exc:
            raise ModelError(f"cannot read {path}: {exc.strerror}") from None


def read_model(source: ModelSource) -> tuple[onnx.ModelProto, bytes]:
    """Parse a model from a path, bytes or ModelProto; return it with its serialized bytes."""
    if isinstance(source, onnx.ModelProto):
        return source, source.SerializeToString()
    data = read_bytes(source)
    return parse_model(data, _where(source)), data


def parse_model(data: bytes, where: str = "the given bytes") -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception:
        raise ModelError(f"{where}: not an ONNX model (protobuf parse failed)") from None
    if not model.graph.node and not model.graph.output:
        raise ModelError(f"{where}: not an ONNX model (no graph)")
    return model


def _where(source: ModelSource) -> str:
    return "the given bytes" if isinstance(source, (bytes, bytearray, onnx.ModelProto)) else os.fspath(source)


def declared_interface(model: onnx.ModelProto) -> dict[str, list]:
    """The model's runtime inputs and its outputs as ``[name, dims, dtype]`` (a dim: int, name or None).

    Plain data, so that serving a stored program can answer ``get_inputs()`` without parsing the model.
    """
    init_names = {t.name for t in model.graph.initializer}

    def describe(values) -> list:
        out = []
        for vi in values:
            tt = vi.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
            out.append([vi.name, dims, _dtype(tt.elem_type)])
        return out

    return {"inputs": describe(vi for vi in model.graph.input if vi.name not in init_names),
            "outputs": describe(model.graph.output)}


def model_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``"input:1x3x224x224"`` -> ("input", (1, 3, 224, 224)); the CLI's ``--shape`` syntax."""
    name, sep, dims = text.rpartition(":")
    if not sep or not name or not dims:
        raise InputError(f"bad shape {text!r}: expected NAME:D1xD2x... (e.g. data:1x3x224x224)")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x"))
    except ValueError:
        raise InputError(f"bad shape {text!r}: dimensions must be integers separated by 'x'") from None
    if any(d <= 0 for d in shape):
        raise InputError(f"bad shape {text!r}: dimensions must be positive")
    return name, shape


def load(source: ModelSource, input_shapes: Optional[Mapping[str, Sequence[int]]] = None) -> Graph:
    """Load a model into the IR. ``input_shapes`` fixes symbolic (or overrides batch) dims."""
    model, data = read_model(source)
    return from_proto(model, data, input_shapes)


def from_proto(model: onnx.ModelProto, data: bytes,
               input_shapes: Optional[Mapping[str, Sequence[int]]] = None) -> Graph:
    """:func:`load` for a model already read (``data``: its serialized bytes, hashed as its identity)."""
    _check(model, data)
    init_names = {t.name for t in model.graph.initializer}
    real_inputs = [vi for vi in model.graph.input if vi.name not in init_names]
    _check_declarations(model, real_inputs)
    shapes = _input_shapes(real_inputs, dict(input_shapes or {}))

    constants = {t.name: _to_array(t) for t in model.graph.initializer}
    nodes = [_node_from_proto(i, n) for i, n in enumerate(model.graph.node)]
    nodes = _toposort(nodes, set(shapes) | set(constants))
    opsets = {o.domain if o.domain != "ai.onnx" else "": o.version for o in model.opset_import}
    outputs = [o.name for o in model.graph.output]
    nodes = _drop_dead_nodes(nodes, outputs)

    nodes, constants = _fold_constants(nodes, constants, outputs, opsets)
    dtypes = {vi.name: _dtype(vi.type.tensor_type.elem_type) for vi in real_inputs}
    graph = Graph(nodes=nodes, tensors={}, constants=constants, inputs=list(shapes), outputs=outputs,
                  opsets=opsets, model_hash=model_hash(data), ir_version=model.ir_version,
                  name=model.graph.name or "model")
    graph.tensors = _infer_shapes(graph, shapes, dtypes)
    _remove_identities(graph)
    _fold_batchnorm(graph)
    _fold_channel_affine(graph)
    _drop_unused_constants(graph)
    _fuse_residual_adds(graph)
    _fuse_activations(graph)
    for node in graph.nodes:
        _normalize_attrs(node, graph)
    _check_heavy_nodes(graph)
    return graph


def _check(model: onnx.ModelProto, data: bytes) -> None:
    try:
        onnx.checker.check_model(data)  # the bytes we have: a ModelProto would be serialized again (0.18 s on ResNet-50)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "validation failed"
        raise ModelError(f"invalid ONNX model: {first}") from None
    except Exception as exc:  # the checker raises other types on badly broken protos
        raise ModelError(f"invalid ONNX model: {exc}") from None
    _check_text(model)
    default = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not default:
        raise ModelError("model imports no default-domain opset")
    if default[0] < MIN_OPSET:
        raise ModelError(f"opset {default[0]} is too old; fastrun supports opset {MIN_OPSET} and newer")
    for n in model.graph.node:
        if n.domain not in KNOWN_DOMAINS:
            raise ModelError(f"node {n.name or n.op_type!r} uses op {n.op_type} from unknown domain {n.domain!r}")
        if n.domain in ("", "ai.onnx") and not onnx.defs.has(n.op_type):
            raise ModelError(f"node {n.name or n.op_type!r}: unknown op {n.op_type}")


def _check_declarations(model: onnx.ModelProto, real_inputs: Sequence[onnx.ValueInfoProto]) -> None:
    """Graph inputs must have a tensor type fastrun knows; one backed by an initializer must
    declare the initializer's own type and shape (onnxruntime refuses the model otherwise)."""
    for vi in real_inputs:
        if not vi.type.HasField("tensor_type"):
            raise ModelError(f"input {vi.name!r} is not a tensor")
        elem = vi.type.tensor_type.elem_type
        try:
            ortutil.onnx_dtype(str(helper.tensor_dtype_to_np_dtype(elem)))
        except Exception:
            raise ModelError(f"input {vi.name!r} has unsupported element type {_type_name(elem)}") from None
    inits = {t.name: t for t in model.graph.initializer}
    for vi in model.graph.input:
        t = inits.get(vi.name)
        if t is None or not vi.type.HasField("tensor_type"):
            continue
        tt = vi.type.tensor_type
        if tt.elem_type != t.data_type:
            raise ModelError(f"input {vi.name!r} declares element type {_type_name(tt.elem_type)}, "
                             f"its initializer has {_type_name(t.data_type)}")
        if tt.HasField("shape"):
            declared = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
            if len(declared) != len(t.dims) or any(d is not None and d != a for d, a in zip(declared, t.dims)):
                raise ModelError(f"input {vi.name!r} declares shape {_declared(tt.shape.dim)}, "
                                 f"its initializer has {list(t.dims)}")


def _type_name(elem_type: int) -> str:
    try:
        return onnx.TensorProto.DataType.Name(elem_type)
    except ValueError:
        return str(elem_type)


def _drop_dead_nodes(nodes: list[Node], outputs: Sequence[str]) -> list[Node]:
    """Only nodes that some graph output depends on (``nodes`` in topological order)."""
    needed = set(outputs)
    kept = []
    for node in reversed(nodes):
        if any(t in needed for t in node.outputs if t):
            kept.append(node)
            needed.update(t for t in node.inputs if t)
    if len(kept) != len(nodes):
        log.debug("dropped %d nodes no output depends on", len(nodes) - len(kept))
    return kept[::-1]


def _input_shapes(real_inputs: Sequence[onnx.ValueInfoProto], given: dict[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
    names = [vi.name for vi in real_inputs]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise InputError(f"--shape names unknown input(s) {', '.join(unknown)}; the model's inputs are: {', '.join(names)}")
    shapes = {}
    for vi in real_inputs:
        dims = vi.type.tensor_type.shape.dim
        declared = [d.dim_value if d.HasField("dim_value") else None for d in dims]
        if vi.name in given:
            shape = tuple(int(d) for d in given[vi.name])
            if vi.type.tensor_type.HasField("shape") and len(shape) != len(declared):
                raise InputError(f"input {vi.name}: shape {_fmt(shape)} has rank {len(shape)}, the model declares rank {len(declared)}")
            for i, (want, got) in enumerate(zip(declared, shape)):
                if want is not None and want > 0 and want != got and not (i == 0):
                    raise InputError(f"input {vi.name}: dim {i} is fixed to {want} by the model, --shape gives {got}")
        else:
            if any(d is None or d <= 0 for d in declared):
                raise InputError(f"input {vi.name} has symbolic dims {_declared(dims)}; give them with "
                                 f"--shape {vi.name}:{'x'.join(str(d or 1) for d in declared)} (API: input_shapes=)")
            shape = tuple(declared)
        shapes[vi.name] = shape
    return shapes


def _declared(dims) -> str:
    return "[" + ", ".join(d.dim_param or str(d.dim_value) if (d.dim_param or d.dim_value) else "?" for d in dims) + "]"


def _fmt(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


_RAW_DTYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64,
               onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32}


def _to_array(t: onnx.TensorProto) -> np.ndarray:
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


def _dtype(elem_type: int) -> str:
    try:
        return str(helper.tensor_dtype_to_np_dtype(elem_type))
    except Exception:
        return "float32"


def _check_text(model: onnx.ModelProto) -> None:
    """Names must be text: protobuf hands back ``bytes`` for a string field that is not UTF-8."""
    g = model.graph
    names = [("graph", g.name)] + [("opset domain", o.domain) for o in model.opset_import]
    for kind, items in (("input", g.input), ("output", g.output), ("value_info", g.value_info),
                        ("initializer", g.initializer)):
        names += [(kind, x.name) for x in items]
    for i, n in enumerate(g.node):
        names += [(f"node #{i}", x) for x in [n.name, n.op_type, n.domain, *n.input, *n.output]]
        names += [(f"node #{i} attribute", a.name) for a in n.attribute]
    for where, text in names:
        if not isinstance(text, str):
            raise ModelError(f"invalid ONNX model: a name of {where} is not valid UTF-8 text ({bytes(text)[:40]!r})")


def _node_from_proto(index: int, proto: onnx.NodeProto) -> Node:
    attrs = {a.name: helper.get_attribute_value(a) for a in proto.attribute}
    try:
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
    except UnicodeDecodeError:
        raise ModelError(f"node {proto.name or proto.op_type!r}: a string attribute is not valid UTF-8") from None
    return Node(name=proto.name or f"{proto.op_type}_{index}", op_type=proto.op_type,
                domain=proto.domain if proto.domain != "ai.onnx" else "", inputs=list(proto.input),
                outputs=list(proto.output), attrs=attrs)


def to_proto(node: Node) -> onnx.NodeProto:
    """The node as ONNX, without fused activation (callers handle that)."""
    attrs = {k: v for k, v in node.attrs.items() if not k.startswith("_")}
    return helper.make_node(node.op_type, node.inputs, node.outputs, name=node.name, domain=node.domain or None, **attrs)


def _toposort(nodes: list[Node], available: set[str]) -> list[Node]:
    produced_by = {}
    for node in nodes:
        for t in node.outputs:
            if t in produced_by or t in available:
                raise ModelError(f"tensor {t!r} is produced more than once")
            produced_by[t] = node
    for node in nodes:
        for t in node.inputs:
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
            for t in node.inputs:
                dep = produced_by.get(t)
                if dep is None:
                    continue
                if state.get(dep.name) == 1:
                    raise ModelError(f"the graph has a cycle through node {dep.name!r}")
                if state.get(dep.name) != 2:
                    stack.append((dep, False))
    return order


# ---------------------------------------------------------------------------------- simplification

def _fold_constants(nodes: list[Node], constants: dict[str, np.ndarray], outputs: list[str],
                    opsets: dict[str, int]) -> tuple[list[Node], dict[str, np.ndarray]]:
    """Evaluate every node whose inputs are all constant, with onnxruntime, in one session."""
    const_names = set(constants)
    folded, kept = [], []
    for node in nodes:
        if node.op_type not in NONDETERMINISTIC and all((not t) or t in const_names for t in node.inputs) \
                and not _has_subgraph(node):
            folded.append(node)
            const_names.update(node.outputs)
        else:
            kept.append(node)
    if not folded:
        return nodes, constants
    needed = {t for node in kept for t in node.inputs if t} | set(outputs)
    wanted = [t for node in folded for t in node.outputs if t in needed]
    fold_inputs = {t for node in folded for t in node.inputs}
    if wanted:
        _check_constant_sizes(folded, constants)
        model = ortutil.make_model([to_proto(n) for n in folded], [], [helper.make_empty_tensor_value_info(t) for t in wanted],
                                   {k: v for k, v in constants.items() if k in fold_inputs}, opsets)
        try:
            values = ortutil.session(model, level="disable").run(wanted, {}, _quiet())
        except Exception as exc:
            raise ModelError(f"cannot evaluate the model's constant sub-graph: {_first_line(exc)}") from None
        constants = dict(constants)
        constants.update(zip(wanted, values))
    log.debug("folded %d constant nodes", len(folded))
    used = {t for node in kept for t in node.inputs} | set(outputs)
    return kept, {k: v for k, v in constants.items() if k in used}


MAX_CONSTANT_BYTES = 2 << 30  # no tensor of a valid ONNX file is larger (protobuf's limit)


def _check_constant_sizes(folded: list[Node], constants: dict[str, np.ndarray]) -> None:
    """Refuse constants a model would build far beyond any real weight (before allocating them)."""
    for node in folded:
        if node.op_type not in ("ConstantOfShape", "Expand") or node.domain:
            continue
        shape_input = node.inputs[0] if node.op_type == "ConstantOfShape" else node.inputs[1] if len(node.inputs) > 1 else ""
        dims = constants.get(shape_input)
        if dims is None or dims.dtype.kind not in "iu":
            continue
        dims = [int(d) for d in np.asarray(dims).reshape(-1)]
        if any(d < 0 for d in dims):
            raise ModelError(f"node {node.name!r} ({node.op_type}) has a negative dimension in its shape {dims}")
        size = 8
        for d in dims:
            size *= d
        if size > MAX_CONSTANT_BYTES:
            raise ModelError(f"node {node.name!r} ({node.op_type}) would build a constant of shape {dims} "
                             f"(over {MAX_CONSTANT_BYTES >> 30} GiB)")


def _quiet():
    """Run options that keep onnxruntime from logging the errors fastrun reports itself."""
    import onnxruntime

    options = onnxruntime.RunOptions()
    options.log_severity_level = 4
    return options


def _has_subgraph(node: Node) -> bool:
    return any(isinstance(v, onnx.GraphProto) or (isinstance(v, list) and v and isinstance(v[0], onnx.GraphProto))
               for v in node.attrs.values())


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


SMALL_CONSTANT = 4096  # elements; larger constants stay out of the shape-inference model


def _infer_shapes(graph: Graph, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str]) -> dict[str, TensorInfo]:
    """Concrete shape and dtype of every runtime tensor (onnx inference, onnxruntime as fallback).

    Large constants (weights) enter the inference model as typed inputs rather than initializers:
    their values never matter for shapes and serializing them costs seconds on VGG-sized models.
    """
    small = {k: v for k, v in graph.constants.items() if v.size <= SMALL_CONSTANT}
    large = {k: v for k, v in graph.constants.items() if k not in small}
    inputs = [ortutil.value_info(n, s, dtypes[n]) for n, s in shapes.items()]
    inputs += [ortutil.value_info(k, v.shape, str(v.dtype)) for k, v in large.items()]
    model = ortutil.make_model([to_proto(n) for n in graph.nodes], inputs,
                               [helper.make_empty_tensor_value_info(t) for t in graph.outputs], small, graph.opsets)
    tensors = {n: TensorInfo(tuple(s), dtypes[n]) for n, s in shapes.items()}
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception as exc:
        raise InputError(f"shapes do not fit the model: {_first_line(exc)}") from None
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            tensors[vi.name] = TensorInfo(tuple(d.dim_value for d in tt.shape.dim), _dtype(tt.elem_type))
    used = {t for node in graph.nodes for t in node.inputs} | set(graph.outputs)
    # Unused outputs (Dropout's mask) need no shape; asking onnxruntime for them would run the model.
    missing = [t for node in graph.nodes for t in node.outputs if t and t not in tensors and t in used]
    if missing:
        log.debug("onnx shape inference left %s unknown; running onnxruntime once", missing[:5])
        del model.graph.output[:]
        model.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in missing)
        feed = {n: np.zeros(s, dtype=dtypes[n]) for n, s in shapes.items()}
        feed.update(large)
        try:
            values = ortutil.session(model, level="disable").run(missing, feed, _quiet())
        except Exception as exc:
            raise InputError(f"the model cannot run with input shapes {shapes}: {_first_line(exc)}") from None
        tensors.update({t: TensorInfo(tuple(v.shape), str(v.dtype)) for t, v in zip(missing, values)})
    return tensors


def _rename_input(graph: Graph, old: str, new: str) -> None:
    for node in graph.nodes:
        node.inputs = [new if t == old else t for t in node.inputs]


def _remove_identities(graph: Graph) -> None:
    """Dropout (inference) and Identity forward their input unless they produce a graph output."""
    used = {t for node in graph.nodes for t in node.inputs} | set(graph.outputs)
    kept = []
    for node in graph.nodes:
        is_noop = node.op_type == "Identity" or (node.op_type == "Dropout" and not any(o in used for o in node.outputs[1:]))
        if is_noop and node.outputs[0] not in graph.outputs and node.inputs[0] not in graph.constants:
            _rename_input(graph, node.outputs[0], node.inputs[0])
            continue
        kept.append(node)
    graph.nodes = kept


def _single_consumer(graph: Graph, tensor: str, users: dict[str, list[Node]]) -> Optional[Node]:
    if tensor in graph.outputs or len(users.get(tensor, [])) != 1:
        return None
    return users[tensor][0]


def _foldable_conv(node: Node, graph: Graph) -> bool:
    """A plain Conv whose weights are constant: its output's scale and bias can fold into them."""
    return node.op_type == "Conv" and not node.domain and len(node.inputs) >= 2 and node.inputs[1] in graph.constants


def _conv_params(conv: Node, graph: Graph) -> tuple[np.ndarray, np.ndarray]:
    """(weights, bias) of a foldable Conv; a zero bias when it has none."""
    w = graph.constants[conv.inputs[1]]
    has_bias = len(conv.inputs) > 2 and conv.inputs[2]
    return w, graph.constants[conv.inputs[2]] if has_bias else np.zeros(w.shape[0], w.dtype)


def _absorb(graph: Graph, conv: Node, follower: Node, w: np.ndarray, b: np.ndarray) -> None:
    """Give ``conv`` new float32 weights and bias and make it produce ``follower``'s output."""
    w_name, b_name = f"{conv.name}/{follower.name}/W", f"{conv.name}/{follower.name}/B"
    graph.constants[w_name], graph.constants[b_name] = w.astype(np.float32, copy=False), b.astype(np.float32)
    conv.inputs = [conv.inputs[0], w_name, b_name]
    conv.outputs = [o for o in follower.outputs if o][:1]


def _fold_batchnorm(graph: Graph) -> None:
    """Conv -> BatchNormalization (inference) becomes one Conv with scaled weights and a bias."""
    users = graph.consumers()
    removed = set()
    for conv in graph.nodes:
        if not _foldable_conv(conv, graph):
            continue
        bn = _single_consumer(graph, conv.outputs[0], users)
        if bn is None or bn.op_type != "BatchNormalization" or len([o for o in bn.outputs if o]) != 1:
            continue
        if bn.attrs.get("training_mode", 0) or not all(t in graph.constants for t in bn.inputs[1:5]):
            continue
        scale, bias, mean, var = (graph.constants[t].astype(np.float64) for t in bn.inputs[1:5])
        w, b = _conv_params(conv, graph)
        factor = scale / np.sqrt(var + bn.attrs.get("epsilon", 1e-5))
        # The per-channel factor in float64, the weights scaled in their own precision (one
        # rounding, as onnxruntime's fusion): a float64 copy of ResNet-50's weights cost 25 ms at load.
        w_scaled = w * factor.astype(w.dtype).reshape(-1, *([1] * (w.ndim - 1)))
        _absorb(graph, conv, bn, w_scaled, (b.astype(np.float64) - mean) * factor + bias)
        removed.add(id(bn))
    graph.nodes = [n for n in graph.nodes if id(n) not in removed]


def _fold_channel_affine(graph: Graph) -> None:
    """Conv -> Mul/Add by a per-output-channel constant (as BN-style scale/bias) folds into Conv."""
    users = graph.consumers()
    removed = set()
    for conv in graph.nodes:
        if not _foldable_conv(conv, graph):
            continue
        while True:
            nxt = _single_consumer(graph, conv.outputs[0], users)
            if nxt is None or nxt.op_type not in ("Mul", "Add") or nxt.domain or len(nxt.inputs) != 2:
                break
            other = nxt.inputs[1] if nxt.inputs[0] == conv.outputs[0] else nxt.inputs[0]
            w, b = _conv_params(conv, graph)
            per_channel = _per_channel(graph.constants.get(other), w.shape[0], len(graph.tensors[conv.outputs[0]].shape))
            if per_channel is None or other == conv.outputs[0]:
                break
            if nxt.op_type == "Mul":
                w, b = w * per_channel.reshape(-1, *([1] * (w.ndim - 1))), b * per_channel
            else:
                b = b + per_channel
            _absorb(graph, conv, nxt, w, b)
            removed.add(id(nxt))
    graph.nodes = [n for n in graph.nodes if id(n) not in removed]


def _per_channel(value: Optional[np.ndarray], channels: int, rank: int) -> Optional[np.ndarray]:
    """A constant that broadcasts against [N, K, ...] only along K (or is a scalar), as a [K] vector."""
    if value is None or value.dtype != np.float32 or value.ndim > rank:
        return None
    shape = (1,) * (rank - value.ndim) + value.shape
    if shape[0] != 1 or any(d != 1 for d in shape[2:]) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(value.reshape(-1), (channels,)).astype(np.float32)


def _fuse_residual_adds(graph: Graph) -> None:
    """Conv -> Add(Conv output, residual) becomes one Conv with the residual as input 3.

    Kernels that accumulate into their output (onnxruntime's FusedConv and NCHWc Conv) then skip
    a full pass over the tensor; the activation that follows the Add fuses as usual. When both
    operands come from Convs, the later one takes the residual (the other is computed first).
    """
    users = graph.consumers()
    producer = graph.producer()
    order = {node.name: i for i, node in enumerate(graph.nodes)}
    removed = set()
    for add in graph.nodes:
        if add.op_type not in ("Add", "Sum") or add.domain or len(add.inputs) != 2 or add.inputs[0] == add.inputs[1]:
            continue
        convs = [producer.get(t) for t in add.inputs]
        best = None
        for k, conv in enumerate(convs):
            other = add.inputs[1 - k]
            if conv is None or not _foldable_conv(conv, graph) or conv.activation or len(conv.inputs) > 3 \
                    or other in graph.constants or other not in graph.tensors \
                    or _single_consumer(graph, conv.outputs[0], users) is not add \
                    or graph.tensors[other].shape != graph.tensors[conv.outputs[0]].shape:
                continue
            if best is None or order[conv.name] > order[best[0].name]:
                best = (conv, other)
        if best is None:
            continue
        conv, other = best
        if len(conv.inputs) < 3 or not conv.inputs[2]:
            zero = f"{conv.name}/zero_bias"
            graph.constants[zero] = np.zeros(graph.constants[conv.inputs[1]].shape[0], np.float32)
            conv.inputs = conv.inputs[:2] + [zero]
        conv.inputs = conv.inputs + [other]
        conv.outputs = list(add.outputs)
        removed.add(id(add))
    graph.nodes = [n for n in graph.nodes if id(n) not in removed]
    if removed:
        graph.nodes = _toposort(graph.nodes, set(graph.inputs) | set(graph.constants))


def _fuse_activations(graph: Graph) -> None:
    """Conv followed by its only consumer Relu/Clip/... computes the activation itself."""
    users = graph.consumers()
    removed = set()
    for conv in graph.nodes:
        if conv.op_type != "Conv" or conv.domain or conv.activation:
            continue
        act = _single_consumer(graph, conv.outputs[0], users)
        if act is None or act.op_type not in FUSABLE_ACTIVATIONS or act.domain:
            continue
        params = _activation_params(act, graph)
        if params is None:
            continue
        conv.activation, conv.activation_params = act.op_type, params
        conv.outputs = list(act.outputs)
        removed.add(id(act))
    graph.nodes = [n for n in graph.nodes if id(n) not in removed]


def _activation_params(act: Node, graph: Graph) -> Optional[tuple]:
    if act.op_type == "Clip":
        lo, hi = act.attrs.get("min", -3.4028234663852886e38), act.attrs.get("max", 3.4028234663852886e38)
        extra = act.inputs[1:]
        for i, t in enumerate(extra):
            if not t:
                continue
            if t not in graph.constants:
                return None
            value = float(graph.constants[t])
            lo, hi = (value, hi) if i == 0 else (lo, value)
        return (float(lo), float(hi))
    if act.op_type == "LeakyRelu":
        return (float(act.attrs.get("alpha", 0.01)),)
    return ()


def _drop_unused_constants(graph: Graph) -> None:
    used = {t for node in graph.nodes for t in node.inputs} | set(graph.outputs)
    graph.constants = {k: v for k, v in graph.constants.items() if k in used}


def _normalize_attrs(node: Node, graph: Graph) -> None:
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


def _check_heavy_nodes(graph: Graph) -> None:
    from .registry import heavy_op_types

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
                raise InputError(f"shapes do not fit the model: Conv {node.name!r} would turn input {_fmt(x)} "
                                 f"into an empty output {_fmt(out)}")
            if len(node.inputs) > 2 and node.inputs[2] and _shape_of(graph, node.inputs[2]) != (w[0],):
                raise ModelError(f"Conv {node.name!r}: bias shape {list(_shape_of(graph, node.inputs[2]))} "
                                 f"contradicts {w[0]} output channels")


# ------------------------------------------------------------------------------------------- specs

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
