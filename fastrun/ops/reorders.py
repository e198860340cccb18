"""Reorders between tensor formats: as ONNX nodes for a segment, as a host callable for timing.

Physical layouts are those of :mod:`fastrun.ops.formats`; onnxruntime's ``ReorderInput`` /
``ReorderOutput`` (``com.microsoft.nchwc``) do the blocked ones, see :mod:`fastrun.ops.layout_ops`
for what they accept.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from fastrun.ops import formats
from fastrun.system import ortutil
from fastrun.shapes import as_shape
from fastrun.ops.registry import OnnxFragment

NCHWC_DOMAIN = "com.microsoft.nchwc"


NCHWC_OPSETS = {NCHWC_DOMAIN: 1}


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


def make_node(op_type: str, inputs: Sequence[str], outputs: Sequence[str], name: str, domain: str = "",
              attrs: Optional[dict] = None) -> onnx.NodeProto:
    attrs = {k: _attr_value(v) for k, v in (attrs or {}).items() if not k.startswith("_")}
    return helper.make_node(op_type, list(inputs), list(outputs), name=name, domain=domain or None, **attrs)


def to4_shape() -> np.ndarray:
    return np.array([0, -1, 0, 0], dtype=np.int64)


def to5_shape(block: int) -> np.ndarray:
    return np.array([0, -1, 0, 0, block], dtype=np.int64)


def reorder_fragment(src_name: str, dst_name: str, src_fmt: str, dst_fmt: str,
                     shape: tuple[int, ...]) -> OnnxFragment:
    """ONNX nodes converting the logical-``shape`` tensor ``src_name`` (in ``src_fmt``) to
    ``dst_name`` (in ``dst_fmt``). Intermediate names and initializers start with ``dst_name``.

    Native-block conversions use onnxruntime's ``ReorderInput``/``ReorderOutput`` (which also read
    and write NHWC directly); other ones use Transpose/Reshape (a foreign block then needs ``C``
    to be a multiple of it). Only default-domain ops whose signature is the same in every opset
    from 7 on (Reshape, Transpose, Concat, Identity) are used.
    """
    shape = as_shape(shape)
    p = f"{dst_name}/reorder"
    if src_fmt == dst_fmt:
        return OnnxFragment([make_node("Identity", [src_name], [dst_name], p)])
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
        return OnnxFragment([make_node("Transpose", [src_name], [dst_name], p, attrs={"perm": perm})])

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
            nodes.append(make_node("Concat", [x, f"{p}/zeros"], [f"{p}/padded"], f"{p}/pad",
                                   attrs={"axis": 3 if channels_last else 1}))
            x = f"{p}/padded"
        nodes.append(make_node("ReorderInput", [x], [f"{p}/y4"], f"{p}/reorder_input", NCHWC_DOMAIN,
                               {"channels_last": channels_last}))
        inits[f"{p}/shape5"] = to5_shape(bd)
        nodes.append(make_node("Reshape", [f"{p}/y4", f"{p}/shape5"], [dst_name], f"{p}/to5"))
        return OnnxFragment(nodes, inits, dict(NCHWC_OPSETS))

    # NCHWc (native) -> NCHW / NHWC: ReorderOutput, any C
    inits[f"{p}/shape4"] = to4_shape()
    nodes.append(make_node("Reshape", [src_name, f"{p}/shape4"], [f"{p}/x4"], f"{p}/to4"))
    nodes.append(make_node("ReorderOutput", [f"{p}/x4"], [dst_name], f"{p}/reorder_output", NCHWC_DOMAIN,
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
        nodes.append(make_node("Transpose", [x], [f"{p}/nchw"], f"{p}/t0", attrs={"perm": [0, 3, 1, 2]}))
        x = f"{p}/nchw"
    elif bs:
        if c % bs:
            raise ValueError(f"reorder from {src_fmt} with {c} channels needs the native block")
        nodes.append(make_node("Transpose", [x], [f"{p}/t5"], f"{p}/t0", attrs={"perm": [0, 1, 4, 2, 3]}))
        inits[f"{p}/s4"] = np.array([n, c, h, w], dtype=np.int64)
        nodes.append(make_node("Reshape", [f"{p}/t5", f"{p}/s4"], [f"{p}/nchw"], f"{p}/r0"))
        x = f"{p}/nchw"
    # from NCHW
    bd = formats.block_size(dst_fmt)
    if dst_fmt == formats.NCHW:
        nodes.append(make_node("Identity", [x], [dst_name], f"{p}/id"))
    elif dst_fmt == formats.NHWC:
        nodes.append(make_node("Transpose", [x], [dst_name], f"{p}/t1", attrs={"perm": [0, 2, 3, 1]}))
    else:
        if c % bd:
            raise ValueError(f"reorder to {dst_fmt} with {c} channels needs the native block")
        inits[f"{p}/s5"] = np.array([n, c // bd, bd, h, w], dtype=np.int64)
        nodes.append(make_node("Reshape", [x, f"{p}/s5"], [f"{p}/r5"], f"{p}/r1"))
        nodes.append(make_node("Transpose", [f"{p}/r5"], [dst_name], f"{p}/t1", attrs={"perm": [0, 1, 3, 4, 2]}))
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
