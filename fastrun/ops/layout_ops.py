"""Formats of the light (non-selected) operators.

The heavy ops (Conv, MatMul, Gemm) choose their formats through registered implementations.
Everything else in the graph is "light": element-wise ops, pooling, concatenation... This module
says in which formats such a node can run (:func:`light_formats`) and emits it as ONNX nodes in a
chosen format (:func:`emit_light`), both by the rule of the node's op family (:data:`FAMILIES`);
:mod:`fastrun.ops.reorders` emits and times the reorders between any two formats.

Physical layouts are those of :mod:`fastrun.ops.formats`: a blocked tensor crosses fragment
boundaries as 5-D ``[N, ceil(C/b), H, W, b]``. onnxruntime's ``com.microsoft.nchwc`` ops take the
same memory as 4-D ``[N, Cp, H, W]``, so the fragments wrap them in (aliasing, copy-free)
``Reshape`` nodes. Element-wise ops and Concat run on the 5-D view directly.

Padded channels of a blocked tensor are *finite but not necessarily zero* (a Sigmoid writes 0.5
there); every consumer emitted here or in :mod:`fastrun.ops.builtin.nchwc` ignores them (zero filter
weights, per-channel ops, ``ReorderOutput``). Ops that could turn finite padding into inf/NaN
(Div, Exp, Log, ...) are therefore offered in a blocked format only when ``C`` is a multiple of
the block (no padding at all).

What onnxruntime 1.32 provides (read from ``contrib_ops/cpu/nchwc_ops.{h,cc}``,
``core/graph/contrib_ops/nchwc_schema_defs.cc``, ``core/mlas/lib/reorder.cpp``, and checked by
``tests/test_nchwc.py``):

* ``ReorderInput(channels_last=0|1)``: NCHW or NHWC -> NCHWc, 4-D only, **C % 4 == 0 enforced**
  (zero-fills the padded block). Other channel counts are padded to a multiple of 4 by a
  ``Concat`` with zeros first.
* ``ReorderOutput(channels=C, channels_last=0|1)``: NCHWc -> NCHW or NHWC, any ``C``.
* ``MaxPool``/``AveragePool`` (kernel_shape 2-D, pads, strides, dilations, ceil_mode, auto_pad,
  storage_order / count_include_pad), ``GlobalMaxPool``/``GlobalAveragePool``: float, 4-D,
  physical channels a multiple of the block. No index output.
* ``BatchNormalization`` left unfolded (e.g. DenseNet's pre-activation BN after a Concat) runs
  blocked as a 1x1 depthwise nchwc ``Conv`` (as ORT's transformer does), in NHWC as Mul + Add.
* No float NHWC pooling kernel exists on the CPU EP (``com.microsoft.NhwcMaxPool`` is int8/uint8
  only; ``com.ms.internal.nhwc`` has no CPU float kernels), so pooling is never offered in NHWC.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from fastrun.ops import formats
from fastrun.ops.builtin.common import activation_nodes
from fastrun.ops.registry import OnnxFragment
from fastrun.shapes import as_shape
from fastrun.ops.reorders import NCHWC_DOMAIN, NCHWC_OPSETS, make_node, to4_shape, to5_shape

# f(finite) stays finite and of the same order: safe on the (arbitrary, finite) padding lanes.
SAFE_UNARY = {
    "Relu", "LeakyRelu", "Clip", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Identity", "Dropout",
    "Neg", "Abs", "Elu", "Selu", "Celu", "Softsign", "Erf", "Floor", "Ceil", "Round", "Sign", "ThresholdedRelu",
}


# Element-wise but able to create inf/NaN from padding (or to amplify it): blocked only without padding.
UNSAFE_UNARY = {"Exp", "Log", "Sqrt", "Reciprocal", "Softplus", "Sin", "Cos", "Mish", "Gelu"}


SAFE_BINARY = {"Add", "Sub", "Mul", "Max", "Min", "Sum", "Mean", "PRelu"}


UNSAFE_BINARY = {"Div", "Pow"}


POOLS = {"MaxPool", "AveragePool", "GlobalMaxPool", "GlobalAveragePool"}


def _native_blocked() -> Optional[str]:
    b = formats.native_block_size()
    return formats.blocked(b) if b >= 4 else None


def _shape(graph, name: str) -> Optional[tuple[int, ...]]:
    if name in graph.constants:
        return tuple(graph.constants[name].shape)
    info = graph.tensors.get(name)
    return tuple(info.shape) if info is not None else None


def _dtype(graph, name: str) -> str:
    if name in graph.constants:
        return str(graph.constants[name].dtype)
    info = graph.tensors.get(name)
    return info.dtype if info is not None else "float32"


def _used_outputs(node) -> list[str]:
    return [t for t in node.outputs if t]


def _finish(node, nodes: list, inits: dict, out_tmp: Optional[str], opsets: dict) -> OnnxFragment:
    if node.activation is not None:
        inits = dict(inits)
        nodes = nodes + activation_nodes(node.activation, node.activation_params, out_tmp, inits,
                                         out=node.outputs[0], prefix=f"{node.name}/")
    return OnnxFragment(nodes, inits, opsets)


def _out_name(node) -> tuple[str, Optional[str]]:
    """Name the main computation writes: the real output, or a temporary if an activation follows."""
    if node.activation is None:
        return node.outputs[0], None
    tmp = f"{node.name}/pre_act"
    return tmp, tmp


def _broadcast4(shape: Sequence[int]) -> Optional[tuple[int, ...]]:
    """A shape right-aligned to rank 4 (None if its rank exceeds 4)."""
    shape = as_shape(shape)
    if len(shape) > 4:
        return None
    return (1,) * (4 - len(shape)) + shape


def _const_ok(shape: Sequence[int], out: tuple[int, ...], fmt: str) -> bool:
    """Whether a constant operand of ``shape`` can be re-laid out to broadcast in ``fmt``."""
    s = _broadcast4(shape)
    if s is None:
        return False
    n, c, h, w = out
    return s[0] in (1, n) and s[1] in (1, c) and s[2] in (1, h) and s[3] in (1, w)


def _const_in_format(value: np.ndarray, out: tuple[int, ...], fmt: str, fill: float = 0.0) -> np.ndarray:
    """A constant broadcasting against a logical ``out`` tensor, laid out to broadcast in ``fmt``."""
    if fmt == formats.NCHW:
        return value
    if value.ndim == 0 or value.size == 1:
        return value.reshape(())  # scalars broadcast the same way in every layout
    v = value.reshape(_broadcast4(value.shape))
    if fmt == formats.NHWC:
        return np.ascontiguousarray(v.transpose(0, 2, 3, 1))
    b = formats.block_size(fmt)
    if v.shape[1] == 1:
        return np.ascontiguousarray(v.reshape(v.shape[0], 1, v.shape[2], v.shape[3], 1))
    blocked = formats.to_format(v, fmt)
    c = v.shape[1]
    if fill != 0.0 and c % b:
        blocked[:, -1, :, :, c % b:] = fill
    return blocked


def _is_float(graph, node) -> bool:
    return all(_dtype(graph, t) == "float32" for t in node.inputs if t) and \
        all(graph.tensors[t].dtype == "float32" for t in _used_outputs(node) if t in graph.tensors)


def light_formats(node, graph) -> list[str]:
    """Formats other than NCHW in which ``node`` can run with all runtime inputs and outputs in it.

    Returns a subset of ``["NHWC", "NCHWc<b>"]`` (``b`` the machine's native block).
    """
    if node.domain not in ("", "ai.onnx"):
        return []
    outs = _used_outputs(node)
    if len(outs) != 1:
        if not (node.op_type == "Dropout" and outs and outs[0] == node.outputs[0] and _mask_unused(node, graph)):
            return []
    out_shape = _shape(graph, node.outputs[0])
    if out_shape is None or len(out_shape) != 4:
        return []
    runtime = graph.runtime_inputs(node)
    if not runtime:
        return []
    if node.activation is not None and node.activation not in SAFE_UNARY:
        return []
    family = _FAMILIES.get(node.op_type)
    return family.formats(node, graph, out_shape, runtime) if family else []


def _unary_formats(node, graph, out_shape: tuple[int, ...], runtime: list[str]) -> list[str]:
    if len(runtime) != 1 or _shape(graph, runtime[0]) != out_shape:
        return []
    if node.op_type == "Dropout" and node.attrs.get("training_mode"):
        return []
    blocked = _native_blocked()
    result = [formats.NHWC]
    if blocked and (node.op_type in SAFE_UNARY or out_shape[1] % formats.native_block_size() == 0):
        result.append(blocked)
    return result


def _binary_formats(node, graph, out_shape: tuple[int, ...], runtime: list[str]) -> list[str]:
    op, c, b, blocked = node.op_type, out_shape[1], formats.native_block_size(), _native_blocked()
    if op == "Pow" and any(t not in graph.constants for t in node.inputs[1:]):
        return []
    shapes = [_shape(graph, t) for t in node.inputs if t]
    if any(s is None for s in shapes):
        return []
    rt_shapes = [_shape(graph, t) for t in runtime]
    if any(len(s) != 4 for s in rt_shapes):
        return []
    consts = [t for t in node.inputs if t and t in graph.constants]
    result: list[str] = []
    if all(_const_ok(graph.constants[t].shape, out_shape, formats.NHWC) for t in consts):
        result.append(formats.NHWC)
    if blocked:
        ok = all(s[1] == c for s in rt_shapes)  # a 1-channel runtime operand would not broadcast over lanes
        ok = ok and all(_const_ok(graph.constants[t].shape, out_shape, blocked) for t in consts)
        if op in UNSAFE_BINARY and c % b:
            ok = False
        if ok:
            result.append(blocked)
    return result


def _pool_formats(node, graph, out_shape: tuple[int, ...], runtime: list[str]) -> list[str]:
    blocked = _native_blocked()
    if not blocked or not _is_float(graph, node) or len(node.inputs) != 1:
        return []
    x = _shape(graph, node.inputs[0])
    if x is None or len(x) != 4:
        return []
    if node.op_type in ("MaxPool", "AveragePool"):
        ks = node.attrs.get("kernel_shape")
        if ks is None or len(ks) != 2:
            return []
        for key in ("strides", "dilations"):
            if node.attrs.get(key) is not None and len(node.attrs[key]) != 2:
                return []
        if node.attrs.get("pads") is not None and len(node.attrs["pads"]) != 4:
            return []
    return [blocked]


def _batchnorm_formats(node, graph, out_shape: tuple[int, ...], runtime: list[str]) -> list[str]:
    if _bn_affine(node, graph) is None:
        return []
    blocked = _native_blocked()
    return [formats.NHWC] + ([blocked] if blocked else [])


def _concat_formats(node, graph, out_shape: tuple[int, ...], runtime: list[str]) -> list[str]:
    axis = int(node.attrs.get("axis", 1))
    axis = axis + 4 if axis < 0 else axis
    shapes = [_shape(graph, t) for t in node.inputs if t]
    if any(s is None or len(s) != 4 for s in shapes):
        return []
    result = [formats.NHWC]
    blocked = _native_blocked()
    if blocked and (axis != 1 or all(s[1] % formats.native_block_size() == 0 for s in shapes)):
        result.append(blocked)
    return result


def _bn_affine(node, graph) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """Inference BatchNormalization with constant statistics as (scale, shift) per channel."""
    if len(node.inputs) != 5 or node.attrs.get("training_mode", 0) or node.attrs.get("spatial", 1) != 1:
        return None
    if not all(t in graph.constants for t in node.inputs[1:]):
        return None
    x = _shape(graph, node.inputs[0])
    if x is None or len(x) != 4 or not _is_float(graph, node):
        return None
    scale, bias, mean, var = (graph.constants[t].astype(np.float64).reshape(-1) for t in node.inputs[1:])
    if any(v.shape != (x[1],) for v in (scale, bias, mean, var)):
        return None
    factor = scale / np.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))
    return factor.astype(np.float32), (bias - mean * factor).astype(np.float32)


def _mask_unused(node, graph) -> bool:
    mask = node.outputs[1] if len(node.outputs) > 1 else ""
    if not mask:
        return True
    if mask in graph.outputs:
        return False
    return not any(mask in n.inputs for n in graph.nodes)


def emit_light(node, graph, fmt: str) -> OnnxFragment:
    """ONNX nodes computing ``node`` in ``fmt`` with its real tensor names.

    Default-domain nodes keep the original op and attributes (valid in the graph's own opset);
    constants the node reads are included as initializers (re-laid out ones under
    ``"{node.name}/..."`` names).
    """
    out, tmp = _out_name(node)
    if fmt == formats.NCHW:
        nodes = [make_node(node.op_type, node.inputs, [out] + node.outputs[1:], node.name, node.domain, node.attrs)]
        inits = {t: graph.constants[t] for t in node.inputs if t and t in graph.constants}
        return _finish(node, nodes, inits, tmp, {})

    if fmt not in light_formats(node, graph):
        raise ValueError(f"{node.op_type} node {node.name!r} cannot run in format {fmt}")
    return _FAMILIES[node.op_type].emit(node, graph, fmt, out, tmp, _shape(graph, node.outputs[0]))


def _emit_unary(node, graph, fmt: str, out: str, tmp: Optional[str], out_shape) -> OnnxFragment:
    if node.op_type in ("Dropout", "Identity"):
        return _finish(node, [make_node("Identity", [node.inputs[0]], [out], node.name)], {}, tmp, {})
    # further inputs (Clip-11's min/max) are scalars: layout independent
    inits = {t: graph.constants[t] for t in node.inputs[1:] if t}
    return _finish(node, [make_node(node.op_type, node.inputs, [out], node.name, node.domain, node.attrs)],
                   inits, tmp, {})


def _emit_binary(node, graph, fmt: str, out: str, tmp: Optional[str], out_shape) -> OnnxFragment:
    op, opsets = node.op_type, {}
    inits, inputs = {}, []
    for i, t in enumerate(node.inputs):
        if t and t in graph.constants:
            value = graph.constants[t]
            if op == "Pow" and i > 0:
                inits[t] = value  # exponent: element-wise only when it is scalar-like
                inputs.append(t)
                continue
            fill = 1.0 if (op == "Div" and i > 0) else 0.0
            new = f"{node.name}/{fmt}/{i}"
            inits[new] = _const_in_format(value, out_shape, fmt, fill)
            inputs.append(new)
        else:
            inputs.append(t)
    return _finish(node, [make_node(op, inputs, [out], node.name, node.domain, node.attrs)], inits, tmp, opsets)


def _emit_batchnorm(node, graph, fmt: str, out: str, tmp: Optional[str], out_shape) -> OnnxFragment:
    opsets: dict[str, int] = {}
    factor, shift = _bn_affine(node, graph)
    c = out_shape[1]
    if fmt == formats.NHWC:  # two element-wise passes with channels-last constants
        s_name, b_name, mid = f"{node.name}/NHWC/scale", f"{node.name}/NHWC/shift", f"{node.name}/scaled"
        nodes = [make_node("Mul", [node.inputs[0], s_name], [mid], f"{node.name}/mul"),
                 make_node("Add", [mid, b_name], [out], f"{node.name}/add")]
        return _finish(node, nodes, {s_name: factor.reshape(1, 1, 1, c), b_name: shift.reshape(1, 1, 1, c)},
                       tmp, opsets)
    # blocked: a 1x1 depthwise nchwc Conv over the padded channels (what ORT's transformer does)
    b = formats.block_size(fmt)
    cp = -(-c // b) * b
    w = np.zeros((cp, 1, 1, 1), np.float32)
    w[:c, 0, 0, 0] = factor
    bias = np.zeros(cp, np.float32)
    bias[:c] = shift
    p = f"{node.name}/{fmt}"
    inits = {f"{p}/w": w, f"{p}/b": bias, f"{p}/shape4": to4_shape(), f"{p}/shape5": to5_shape(b)}
    nodes = [make_node("Reshape", [node.inputs[0], f"{p}/shape4"], [f"{p}/x4"], f"{p}/to4"),
             make_node("Conv", [f"{p}/x4", f"{p}/w", f"{p}/b"], [f"{p}/y4"], node.name, NCHWC_DOMAIN,
                       {"kernel_shape": [1, 1], "group": cp}),
             make_node("Reshape", [f"{p}/y4", f"{p}/shape5"], [out], f"{p}/to5")]
    return _finish(node, nodes, inits, tmp, dict(NCHWC_OPSETS))


def _emit_concat(node, graph, fmt: str, out: str, tmp: Optional[str], out_shape) -> OnnxFragment:
    opsets: dict[str, int] = {}
    axis = int(node.attrs.get("axis", 1))
    axis = axis + 4 if axis < 0 else axis
    new_axis = {formats.NHWC: {0: 0, 1: 3, 2: 1, 3: 2}}.get(fmt, {0: 0, 1: 1, 2: 2, 3: 3})[axis]
    inits, inputs = {}, []
    for i, t in enumerate(node.inputs):
        if t in graph.constants:
            new = f"{node.name}/{fmt}/{i}"
            inits[new] = formats.to_format(graph.constants[t], fmt)
            inputs.append(new)
        else:
            inputs.append(t)
    attrs = dict(node.attrs)
    attrs["axis"] = new_axis
    return _finish(node, [make_node("Concat", inputs, [out], node.name, "", attrs)], inits, tmp, opsets)


def _emit_pool(node, graph, fmt: str, out: str, tmp: Optional[str], out_shape) -> OnnxFragment:
    op = node.op_type
    b = formats.block_size(fmt)
    s4, s5 = f"{node.name}/shape4", f"{node.name}/shape5"
    x4, y4 = f"{node.name}/x4", f"{node.name}/y4"
    attrs = {k: v for k, v in node.attrs.items() if k in _POOL_ATTRS.get(op, ())}
    nodes = [
        make_node("Reshape", [node.inputs[0], s4], [x4], f"{node.name}/to4"),
        make_node(op, [x4], [y4], node.name, NCHWC_DOMAIN, attrs),
        make_node("Reshape", [y4, s5], [out], f"{node.name}/to5"),
    ]
    return _finish(node, nodes, {s4: to4_shape(), s5: to5_shape(b)}, tmp, dict(NCHWC_OPSETS))


_POOL_ATTRS = {
    "MaxPool": ("auto_pad", "kernel_shape", "dilations", "strides", "pads", "ceil_mode", "storage_order"),
    "AveragePool": ("auto_pad", "kernel_shape", "dilations", "strides", "pads", "ceil_mode", "count_include_pad"),
    "GlobalMaxPool": (),
    "GlobalAveragePool": (),
}


@dataclass(frozen=True)
class LightFamily:
    """One family of light ops and its rule outside NCHW: the formats a node can run in
    (``formats(node, graph, out_shape, runtime_inputs)``) and how it is emitted in one of them
    (``emit(node, graph, fmt, out, tmp, out_shape)``, ``tmp`` the name a fused activation reads)."""

    ops: frozenset[str]
    formats: Callable[..., list[str]]
    emit: Callable[..., OnnxFragment]


FAMILIES = (
    LightFamily(frozenset(SAFE_UNARY | UNSAFE_UNARY), _unary_formats, _emit_unary),
    LightFamily(frozenset(SAFE_BINARY | UNSAFE_BINARY), _binary_formats, _emit_binary),
    LightFamily(frozenset(POOLS), _pool_formats, _emit_pool),
    LightFamily(frozenset({"BatchNormalization"}), _batchnorm_formats, _emit_batchnorm),
    LightFamily(frozenset({"Concat"}), _concat_formats, _emit_concat),
)
_FAMILIES = {op: family for family in FAMILIES for op in family.ops}
