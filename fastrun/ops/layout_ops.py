"""Formats of the light (non-selected) operators, and the reorders between formats.

The heavy ops (Conv, MatMul, Gemm) choose their formats through registered implementations.
Everything else in the graph is "light": element-wise ops, pooling, concatenation... This module
says in which formats such a node can run (:func:`light_formats`), emits it as ONNX nodes in a
chosen format (:func:`emit_light`), and emits/times the reorders between any two formats
(:func:`reorder_fragment`, :func:`reorder_callable`).

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

from typing import Any, Callable, Optional, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from fastrun.ops import formats
from fastrun.system import ortutil
from fastrun.ops.registry import OnnxFragment

NCHWC_DOMAIN = "com.microsoft.nchwc"
NCHWC_OPSETS = {NCHWC_DOMAIN: 1}

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


# ------------------------------------------------------------------------------------------ helpers

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


def _runtime_inputs(node, graph) -> list[str]:
    return [t for t in node.inputs if t and t not in graph.constants]


def _used_outputs(node) -> list[str]:
    return [t for t in node.outputs if t]


def _attr_value(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return numpy_helper.from_array(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, tuple):
        return [_attr_value(x) for x in v]
    return v


def _make(op_type: str, inputs: Sequence[str], outputs: Sequence[str], name: str, domain: str = "",
          attrs: Optional[dict] = None) -> onnx.NodeProto:
    attrs = {k: _attr_value(v) for k, v in (attrs or {}).items() if not k.startswith("_")}
    return helper.make_node(op_type, list(inputs), list(outputs), name=name, domain=domain or None, **attrs)


def _activation_nodes(node, src: str, dst: str) -> tuple[list, dict]:
    """A fused activation carried by a light node (rare), as a separate element-wise node."""
    act, params = node.activation, list(node.activation_params)
    name = f"{node.name}/{act}"
    if act == "Clip":
        # attribute form (opset < 11) and input form (>= 11) differ: use Max/Min, valid everywhere
        lo, hi = f"{node.name}/clip_lo", f"{node.name}/clip_hi"
        mid = f"{node.name}/clip_mid"
        return ([_make("Max", [src, lo], [mid], name + "_max"), _make("Min", [mid, hi], [dst], name + "_min")],
                {lo: np.array(params[0], np.float32), hi: np.array(params[1], np.float32)})
    if act == "LeakyRelu":
        return [_make("LeakyRelu", [src], [dst], name, attrs={"alpha": params[0]})], {}
    if act == "HardSigmoid":
        return [_make("HardSigmoid", [src], [dst], name, attrs={"alpha": params[0], "beta": params[1]})], {}
    return [_make(act, [src], [dst], name)], {}


def _finish(node, nodes: list, inits: dict, out_tmp: Optional[str], opsets: dict) -> OnnxFragment:
    if node.activation is not None:
        extra, extra_inits = _activation_nodes(node, out_tmp, node.outputs[0])
        nodes = nodes + extra
        inits = {**inits, **extra_inits}
    return OnnxFragment(nodes, inits, opsets)


def _out_name(node) -> tuple[str, Optional[str]]:
    """Name the main computation writes: the real output, or a temporary if an activation follows."""
    if node.activation is None:
        return node.outputs[0], None
    tmp = f"{node.name}/pre_act"
    return tmp, tmp


def _to4() -> np.ndarray:
    return np.array([0, -1, 0, 0], dtype=np.int64)


def _to5(block: int) -> np.ndarray:
    return np.array([0, -1, 0, 0, block], dtype=np.int64)


def _broadcast4(shape: Sequence[int]) -> Optional[tuple[int, ...]]:
    """A shape right-aligned to rank 4 (None if its rank exceeds 4)."""
    shape = tuple(int(d) for d in shape)
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


# ---------------------------------------------------------------------------------- light_formats

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
    runtime = _runtime_inputs(node, graph)
    if not runtime:
        return []
    if node.activation is not None and node.activation not in SAFE_UNARY:
        return []
    blocked = _native_blocked()
    b = formats.native_block_size()
    c = out_shape[1]
    op = node.op_type
    result: list[str] = []

    if op in SAFE_UNARY or op in UNSAFE_UNARY:
        if len(runtime) != 1 or _shape(graph, runtime[0]) != out_shape:
            return []
        if op == "Dropout" and node.attrs.get("training_mode"):
            return []
        result.append(formats.NHWC)
        if blocked and (op in SAFE_UNARY or c % b == 0):
            result.append(blocked)
        return result

    if op in SAFE_BINARY or op in UNSAFE_BINARY:
        if op == "Pow" and any(t not in graph.constants for t in node.inputs[1:]):
            return []
        shapes = [_shape(graph, t) for t in node.inputs if t]
        if any(s is None for s in shapes):
            return []
        rt_shapes = [_shape(graph, t) for t in runtime]
        if any(len(s) != 4 for s in rt_shapes):
            return []
        consts = [t for t in node.inputs if t and t in graph.constants]
        nhwc_ok = all(_const_ok(graph.constants[t].shape, out_shape, formats.NHWC) for t in consts)
        if nhwc_ok:
            result.append(formats.NHWC)
        if blocked:
            ok = all(s[1] == c for s in rt_shapes)  # a 1-channel runtime operand would not broadcast over lanes
            ok = ok and all(_const_ok(graph.constants[t].shape, out_shape, blocked) for t in consts)
            if op in UNSAFE_BINARY and c % b:
                ok = False
            if ok:
                result.append(blocked)
        return result

    if op in POOLS:
        if not blocked or not _is_float(graph, node) or len(node.inputs) != 1:
            return []
        x = _shape(graph, node.inputs[0])
        if x is None or len(x) != 4:
            return []
        if op in ("MaxPool", "AveragePool"):
            ks = node.attrs.get("kernel_shape")
            if ks is None or len(ks) != 2:
                return []
            for key in ("strides", "dilations"):
                if node.attrs.get(key) is not None and len(node.attrs[key]) != 2:
                    return []
            if node.attrs.get("pads") is not None and len(node.attrs["pads"]) != 4:
                return []
        return [blocked]

    if op == "BatchNormalization":
        if _bn_affine(node, graph) is None:
            return []
        return [formats.NHWC] + ([blocked] if blocked else [])

    if op == "Concat":
        axis = int(node.attrs.get("axis", 1))
        axis = axis + 4 if axis < 0 else axis
        shapes = [_shape(graph, t) for t in node.inputs if t]
        if any(s is None or len(s) != 4 for s in shapes):
            return []
        result.append(formats.NHWC)
        if blocked:
            if axis != 1 or all(s[1] % b == 0 for s in shapes):
                result.append(blocked)
        return result

    return []


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


# -------------------------------------------------------------------------------------- emit_light

def emit_light(node, graph, fmt: str) -> OnnxFragment:
    """ONNX nodes computing ``node`` in ``fmt`` with its real tensor names.

    Default-domain nodes keep the original op and attributes (valid in the graph's own opset);
    constants the node reads are included as initializers (re-laid out ones under
    ``"{node.name}/..."`` names).
    """
    out, tmp = _out_name(node)
    opsets: dict[str, int] = {}
    if fmt == formats.NCHW:
        nodes = [_make(node.op_type, node.inputs, [out] + node.outputs[1:], node.name, node.domain, node.attrs)]
        inits = {t: graph.constants[t] for t in node.inputs if t and t in graph.constants}
        return _finish(node, nodes, inits, tmp, opsets)

    if fmt not in light_formats(node, graph):
        raise ValueError(f"{node.op_type} node {node.name!r} cannot run in format {fmt}")
    out_shape = _shape(graph, node.outputs[0])
    op = node.op_type

    if op == "Dropout" or op == "Identity":
        return _finish(node, [_make("Identity", [node.inputs[0]], [out], node.name)], {}, tmp, opsets)

    if op in SAFE_UNARY or op in UNSAFE_UNARY:
        inits, inputs = {}, list(node.inputs)
        for t in node.inputs[1:]:  # e.g. Clip-11 min/max scalars: layout independent
            if t:
                inits[t] = graph.constants[t]
        return _finish(node, [_make(op, inputs, [out], node.name, node.domain, node.attrs)], inits, tmp, opsets)

    if op in SAFE_BINARY or op in UNSAFE_BINARY:
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
        return _finish(node, [_make(op, inputs, [out], node.name, node.domain, node.attrs)], inits, tmp, opsets)

    if op == "BatchNormalization":
        factor, shift = _bn_affine(node, graph)
        c = out_shape[1]
        if fmt == formats.NHWC:  # two element-wise passes with channels-last constants
            s_name, b_name, mid = f"{node.name}/NHWC/scale", f"{node.name}/NHWC/shift", f"{node.name}/scaled"
            nodes = [_make("Mul", [node.inputs[0], s_name], [mid], f"{node.name}/mul"),
                     _make("Add", [mid, b_name], [out], f"{node.name}/add")]
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
        inits = {f"{p}/w": w, f"{p}/b": bias, f"{p}/shape4": _to4(), f"{p}/shape5": _to5(b)}
        nodes = [_make("Reshape", [node.inputs[0], f"{p}/shape4"], [f"{p}/x4"], f"{p}/to4"),
                 _make("Conv", [f"{p}/x4", f"{p}/w", f"{p}/b"], [f"{p}/y4"], node.name, NCHWC_DOMAIN,
                       {"kernel_shape": [1, 1], "group": cp}),
                 _make("Reshape", [f"{p}/y4", f"{p}/shape5"], [out], f"{p}/to5")]
        return _finish(node, nodes, inits, tmp, dict(NCHWC_OPSETS))

    if op == "Concat":
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
        return _finish(node, [_make("Concat", inputs, [out], node.name, "", attrs)], inits, tmp, opsets)

    if op in POOLS:
        b = formats.block_size(fmt)
        s4, s5 = f"{node.name}/shape4", f"{node.name}/shape5"
        x4, y4 = f"{node.name}/x4", f"{node.name}/y4"
        attrs = {k: v for k, v in node.attrs.items() if k in _POOL_ATTRS.get(op, ())}
        nodes = [
            _make("Reshape", [node.inputs[0], s4], [x4], f"{node.name}/to4"),
            _make(op, [x4], [y4], node.name, NCHWC_DOMAIN, attrs),
            _make("Reshape", [y4, s5], [out], f"{node.name}/to5"),
        ]
        return _finish(node, nodes, {s4: _to4(), s5: _to5(b)}, tmp, dict(NCHWC_OPSETS))

    raise ValueError(f"{op} has no emitter for format {fmt}")  # pragma: no cover (light_formats said yes)


_POOL_ATTRS = {
    "MaxPool": ("auto_pad", "kernel_shape", "dilations", "strides", "pads", "ceil_mode", "storage_order"),
    "AveragePool": ("auto_pad", "kernel_shape", "dilations", "strides", "pads", "ceil_mode", "count_include_pad"),
    "GlobalMaxPool": (),
    "GlobalAveragePool": (),
}


# ------------------------------------------------------------------------------------------ reorders

def reorder_fragment(src_name: str, dst_name: str, src_fmt: str, dst_fmt: str,
                     shape: tuple[int, ...]) -> OnnxFragment:
    """ONNX nodes converting the logical-``shape`` tensor ``src_name`` (in ``src_fmt``) to
    ``dst_name`` (in ``dst_fmt``). Intermediate names and initializers start with ``dst_name``.

    Native-block conversions use onnxruntime's ``ReorderInput``/``ReorderOutput`` (which also read
    and write NHWC directly); other ones use Transpose/Reshape (a foreign block then needs ``C``
    to be a multiple of it). Only default-domain ops whose signature is the same in every opset
    from 7 on (Reshape, Transpose, Concat, Identity) are used.
    """
    shape = tuple(int(d) for d in shape)
    p = f"{dst_name}/reorder"
    if src_fmt == dst_fmt:
        return OnnxFragment([_make("Identity", [src_name], [dst_name], p)])
    if len(shape) != 4:
        raise ValueError(f"cannot reorder a {len(shape)}-D tensor from {src_fmt} to {dst_fmt}")
    n, c, h, w = shape
    native = formats.native_block_size()
    bs, bd = formats.block_size(src_fmt), formats.block_size(dst_fmt)
    for f in (src_fmt, dst_fmt):
        if not formats.is_valid(f):
            raise ValueError(f"unknown format {f!r}")

    # NCHW <-> NHWC
    if {src_fmt, dst_fmt} == {formats.NCHW, formats.NHWC}:
        perm = [0, 2, 3, 1] if src_fmt == formats.NCHW else [0, 3, 1, 2]
        return OnnxFragment([_make("Transpose", [src_name], [dst_name], p, attrs={"perm": perm})])

    nodes: list = []
    inits: dict[str, np.ndarray] = {}

    # Foreign block sizes (not MLAS's): plain Transpose/Reshape, block must divide C.
    if (bs and bs != native) or (bd and bd != native) or native < 4:
        return _generic_reorder(src_name, dst_name, src_fmt, dst_fmt, shape, p)

    if bd:  # -> NCHWc (native): ReorderInput reads NCHW or NHWC, needs C % 4 == 0
        x = src_name
        if bs:  # NCHWc -> NCHWc cannot happen (same native block) - handled by equality above
            raise AssertionError
        channels_last = 1 if src_fmt == formats.NHWC else 0
        if c % 4:
            extra = 4 - c % 4
            zshape = (n, h, w, extra) if channels_last else (n, extra, h, w)
            inits[f"{p}/zeros"] = np.zeros(zshape, dtype=np.float32)
            nodes.append(_make("Concat", [x, f"{p}/zeros"], [f"{p}/padded"], f"{p}/pad",
                               attrs={"axis": 3 if channels_last else 1}))
            x = f"{p}/padded"
        nodes.append(_make("ReorderInput", [x], [f"{p}/y4"], f"{p}/reorder_input", NCHWC_DOMAIN,
                           {"channels_last": channels_last}))
        inits[f"{p}/shape5"] = _to5(bd)
        nodes.append(_make("Reshape", [f"{p}/y4", f"{p}/shape5"], [dst_name], f"{p}/to5"))
        return OnnxFragment(nodes, inits, dict(NCHWC_OPSETS))

    # NCHWc (native) -> NCHW / NHWC: ReorderOutput, any C
    inits[f"{p}/shape4"] = _to4()
    nodes.append(_make("Reshape", [src_name, f"{p}/shape4"], [f"{p}/x4"], f"{p}/to4"))
    nodes.append(_make("ReorderOutput", [f"{p}/x4"], [dst_name], f"{p}/reorder_output", NCHWC_DOMAIN,
                       {"channels": c, "channels_last": 1 if dst_fmt == formats.NHWC else 0}))
    return OnnxFragment(nodes, inits, dict(NCHWC_OPSETS))


def _generic_reorder(src_name: str, dst_name: str, src_fmt: str, dst_fmt: str, shape: tuple[int, ...],
                     p: str) -> OnnxFragment:
    n, c, h, w = shape
    nodes, inits = [], {}
    x = src_name
    # to NCHW
    bs = formats.block_size(src_fmt)
    if src_fmt == formats.NHWC:
        nodes.append(_make("Transpose", [x], [f"{p}/nchw"], f"{p}/t0", attrs={"perm": [0, 3, 1, 2]}))
        x = f"{p}/nchw"
    elif bs:
        if c % bs:
            raise ValueError(f"reorder from {src_fmt} with {c} channels needs the native block")
        nodes.append(_make("Transpose", [x], [f"{p}/t5"], f"{p}/t0", attrs={"perm": [0, 1, 4, 2, 3]}))
        inits[f"{p}/s4"] = np.array([n, c, h, w], dtype=np.int64)
        nodes.append(_make("Reshape", [f"{p}/t5", f"{p}/s4"], [f"{p}/nchw"], f"{p}/r0"))
        x = f"{p}/nchw"
    # from NCHW
    bd = formats.block_size(dst_fmt)
    if dst_fmt == formats.NCHW:
        nodes.append(_make("Identity", [x], [dst_name], f"{p}/id"))
    elif dst_fmt == formats.NHWC:
        nodes.append(_make("Transpose", [x], [dst_name], f"{p}/t1", attrs={"perm": [0, 2, 3, 1]}))
    else:
        if c % bd:
            raise ValueError(f"reorder to {dst_fmt} with {c} channels needs the native block")
        inits[f"{p}/s5"] = np.array([n, c // bd, bd, h, w], dtype=np.int64)
        nodes.append(_make("Reshape", [x, f"{p}/s5"], [f"{p}/r5"], f"{p}/r1"))
        nodes.append(_make("Transpose", [f"{p}/r5"], [dst_name], f"{p}/t1", attrs={"perm": [0, 1, 3, 4, 2]}))
    return OnnxFragment(nodes, inits, {})


def reorder_callable(src_fmt: str, dst_fmt: str, shape: tuple[int, ...], threads: Optional[int] = None,
                     dtype: str = "float32") -> Callable[[np.ndarray], np.ndarray]:
    """A one-fragment onnxruntime session running :func:`reorder_fragment`, for timing reorders."""
    frag = reorder_fragment("x", "y", src_fmt, dst_fmt, shape)
    model = ortutil.make_model(frag.nodes, [ortutil.value_info("x", formats.physical_shape(shape, src_fmt), dtype)],
                               [ortutil.value_info("y", formats.physical_shape(shape, dst_fmt), dtype)],
                               frag.initializers, frag.opsets)
    sess = ortutil.session(model, level="extended", threads=threads)

    def run(x: np.ndarray) -> np.ndarray:
        return sess.run(None, {"x": x})[0]

    return run
