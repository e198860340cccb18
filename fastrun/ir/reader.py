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
from typing import BinaryIO, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import onnx
from google.protobuf import message
from onnx import external_data_helper, helper

from fastrun.system import ortutil
from fastrun.errors import InputError, ModelError
from fastrun.shapes import as_shape, dims_text
from fastrun.ir import modelinterface
from fastrun.ir.graph import (Graph, Node, TensorInfo, check_heavy_nodes, dtype_name, first_line, node_from_proto, normalize_attrs, outer_scope_reads, quiet_run_options, to_array, to_proto, toposort)
from fastrun.ir.rewrites import (drop_unused_constants, fold_batchnorm, fold_channel_affine, fold_constants, fuse_activations, fuse_residual_adds, remove_identities)

log = logging.getLogger(__name__)


ModelSource = Union[str, os.PathLike, bytes, onnx.ModelProto]


MIN_OPSET = 7


KNOWN_DOMAINS = ("", "ai.onnx", "com.microsoft", "com.microsoft.nchwc", "ai.onnx.ml")


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
    """Parse a model from a path, bytes or ModelProto; return it with its serialized bytes.

    A model file's external data is read from the file's own directory, wherever the process runs.
    """
    if isinstance(source, onnx.ModelProto):
        return source, source.SerializeToString()
    data = read_bytes(source)
    model = parse_model(data, _where(source))
    if isinstance(source, (str, os.PathLike)):
        resolve_external_data(model, source)
    return model, data


def resolve_external_data(model: onnx.ModelProto, path: "str | os.PathLike") -> bool:
    """Load the tensors the model file keeps in other files, relative to its directory (True: some)."""
    if not any(t.data_location == onnx.TensorProto.EXTERNAL for t in _tensors(model.graph)):
        return False
    try:
        external_data_helper.load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
    except Exception as exc:
        raise ModelError(f"{os.fspath(path)}: cannot read its external data: {first_line(exc)}") from None
    return True


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                yield from _tensors(g)


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
    """The model's runtime inputs and its outputs as ``[name, dims, dtype]`` (a dim: int, name or None)."""
    return modelinterface.of_model(model)


def model_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``"input:1x3x224x224"`` -> ("input", (1, 3, 224, 224)); the CLI's ``--shape`` syntax."""
    name, sep, dims = text.rpartition(":")
    if not sep or not name or not dims:
        raise InputError(f"bad shape {text!r}: expected NAME:D1xD2x... (e.g. data:1x3x224x224)")
    try:
        shape = as_shape(dims.lower().split("x"))
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
               input_shapes: Optional[Mapping[str, Sequence[int]]] = None,
               initializers: Optional[dict[str, np.ndarray]] = None) -> Graph:
    """:func:`load` for a model already read (``data``: its serialized bytes, hashed as its identity).

    ``initializers`` (filled on first use) shares the model's weight arrays between the graphs of
    several shape sets: fastrun reads the weights once however many shapes a session compiles
    (onnxruntime still copies a segment's weights into each session it makes).
    """
    _check(model, data)
    init_names = {t.name for t in model.graph.initializer}
    real_inputs = [vi for vi in model.graph.input if vi.name not in init_names]
    _check_declarations(model, real_inputs)
    shapes = _input_shapes(real_inputs, dict(input_shapes or {}))

    if initializers is None:
        initializers = {}
    if not initializers:
        initializers.update((t.name, to_array(t)) for t in model.graph.initializer)
    constants = dict(initializers)
    nodes = [node_from_proto(i, n) for i, n in enumerate(model.graph.node)]
    nodes = toposort(nodes, set(shapes) | set(constants))
    opsets = {o.domain if o.domain != "ai.onnx" else "": o.version for o in model.opset_import}
    outputs = [o.name for o in model.graph.output]
    nodes = _drop_dead_nodes(nodes, outputs)

    nodes, constants = fold_constants(nodes, constants, outputs, opsets)
    dtypes = {vi.name: dtype_name(vi.type.tensor_type.elem_type) for vi in real_inputs}
    graph = Graph(nodes=nodes, tensors={}, constants=constants, inputs=list(shapes), outputs=outputs,
                  opsets=opsets, model_hash=model_hash(data), ir_version=model.ir_version,
                  name=model.graph.name or "model")
    graph.tensors = _infer_shapes(graph, shapes, dtypes)
    remove_identities(graph)
    fold_batchnorm(graph)
    fold_channel_affine(graph)
    drop_unused_constants(graph)
    fuse_residual_adds(graph)
    fuse_activations(graph)
    for node in graph.nodes:
        normalize_attrs(node, graph)
    check_heavy_nodes(graph)
    return graph


def _check(model: onnx.ModelProto, data: bytes) -> None:
    try:
        _run_checker(model, data)
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


def _run_checker(model: onnx.ModelProto, data: bytes) -> None:
    """onnx's checker on what onnxruntime would load: the bytes we have (a ModelProto would be
    serialized again: 0.18 s on ResNet-50); the model with its external data read in, when the
    bytes point elsewhere; the nodes in topological order, when the file lists them out of order
    (onnxruntime sorts them itself)."""
    try:
        onnx.checker.check_model(data)
        return
    except onnx.checker.ValidationError as exc:
        text = str(exc)
        if "topologically sorted" not in text and "external" not in text.lower() and "stored in" not in text:
            raise
    checked = onnx.ModelProto()
    checked.CopyFrom(model)
    nodes = sorted_nodes(list(checked.graph.node), {i.name for i in checked.graph.input} |
                         {t.name for t in checked.graph.initializer})
    del checked.graph.node[:]
    checked.graph.node.extend(nodes)
    if _serialized_size(checked) < MAX_CHECKED_BYTES:  # larger protos cannot be serialized: onnxruntime judges them
        onnx.checker.check_model(checked)


MAX_CHECKED_BYTES = (2 << 30) - 1


def _serialized_size(model: onnx.ModelProto) -> int:
    """The proto's serialized size; protobuf raises rather than count past 2 GB."""
    try:
        return model.ByteSize()
    except message.EncodeError:
        return MAX_CHECKED_BYTES


def sorted_nodes(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """The nodes in a topological order (the given order among ready nodes; cycles left at the end)."""
    available = set(available)
    pending, order = list(nodes), []
    while pending:
        rest = []
        for node in pending:
            if all(not t or t in available for t in list(node.input) + outer_scope_reads(node)):
                order.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            return order + rest
        pending = rest
    return order


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
            needed.update(t for t in node.reads if t)
    if len(kept) != len(nodes):
        log.debug("dropped %d nodes no output depends on", len(nodes) - len(kept))
    return kept[::-1]


def input_shapes(model: onnx.ModelProto,
                 given: Optional[Mapping[str, Sequence[int]]] = None) -> dict[str, tuple[int, ...]]:
    """The runtime inputs' shapes: ``given`` for symbolic dims, the declared ones otherwise
    (:class:`InputError` when a shape is missing or does not fit the declaration)."""
    init_names = {t.name for t in model.graph.initializer}
    return _input_shapes([vi for vi in model.graph.input if vi.name not in init_names], dict(given or {}))


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
            shape = as_shape(given[vi.name])
            if vi.type.tensor_type.HasField("shape") and len(shape) != len(declared):
                raise InputError(f"input {vi.name}: shape {dims_text(shape)} has rank {len(shape)}, the model declares rank {len(declared)}")
            for i, (want, got) in enumerate(zip(declared, shape)):
                if want is not None and want > 0 and want != got and not (i == 0):
                    raise InputError(f"input {vi.name}: dim {i} is fixed to {want} by the model, --shape gives {got}")
        else:
            if any(d is None or d <= 0 for d in declared):
                raise InputError(f"input {vi.name} has symbolic dims {_declared(dims)}; give them with "
                                 f"--shape {vi.name}:{dims_text(d or 1 for d in declared)} (API: input_shapes=)")
            shape = tuple(declared)
        shapes[vi.name] = shape
    return shapes


def _declared(dims) -> str:
    return "[" + ", ".join(d.dim_param or str(d.dim_value) if (d.dim_param or d.dim_value) else "?" for d in dims) + "]"


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
        strict_error = exc
        try:  # onnx cannot type some function bodies onnxruntime runs: what it can infer, then the probe
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
        except Exception:
            raise InputError(f"shapes do not fit the model: {first_line(strict_error)}") from None
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            tensors[vi.name] = TensorInfo(tuple(d.dim_value for d in tt.shape.dim), dtype_name(tt.elem_type))
    used = {t for node in graph.nodes for t in node.reads} | set(graph.outputs)
    # Unused outputs (Dropout's mask) need no shape; asking onnxruntime for them would run the model.
    missing = [t for node in graph.nodes for t in node.outputs if t and t not in tensors and t in used]
    if missing:
        log.debug("onnx shape inference left %s unknown; running onnxruntime once", missing[:5])
        del model.graph.output[:]
        model.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in missing)
        feed = {n: np.zeros(s, dtype=dtypes[n]) for n, s in shapes.items()}
        feed.update(large)
        try:
            values = ortutil.session(model, level="disable").run(missing, feed, quiet_run_options())
        except Exception as exc:
            raise InputError(f"the model cannot run with input shapes {shapes}: {first_line(exc)}") from None
        tensors.update({t: TensorInfo(tuple(v.shape), str(v.dtype)) for t, v in zip(missing, values)})
    return tensors
