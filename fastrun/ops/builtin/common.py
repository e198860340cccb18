"""Helpers shared by the built-in implementations: convolution geometry, fused activations."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
from onnx import NodeProto, helper

from fastrun.ops.registry import OpSpec
from fastrun.system.ortutil import default_threads


def conv_geometry(spec: OpSpec) -> dict:
    """Normalized 2-D convolution parameters of a Conv spec (attrs already have defaults)."""
    n, c, h, w = spec.inputs[0]
    k, cg, r, s = spec.inputs[1]
    pads = spec.attr("pads")
    return {
        "N": n, "C": c, "H": h, "W": w, "K": k, "Cg": cg, "R": r, "S": s,
        "group": spec.attr("group", 1),
        "strides": tuple(spec.attr("strides")),
        "dilations": tuple(spec.attr("dilations")),
        "pads": tuple(pads),  # (top, left, bottom, right)
        "P": spec.output[2], "Q": spec.output[3],
    }


def is_depthwise(spec: OpSpec) -> bool:
    """A 2-D conv with one group per input channel (any channel multiplier)."""
    if spec.op_type != "Conv" or len(spec.inputs) < 2 or len(spec.inputs[0]) != 4:
        return False
    group = spec.attr("group", 1)
    return group > 1 and group == spec.inputs[0][1] and spec.inputs[1][1] == 1


def is_conv2d(spec: OpSpec) -> bool:
    return spec.op_type == "Conv" and len(spec.inputs[0]) == 4 and spec.const[1] and spec.dtype == "float32"


def activation(spec: OpSpec) -> Callable[[np.ndarray], np.ndarray]:
    """In-place fused activation for host kernels (identity when the spec has none)."""
    act, params = spec.activation, spec.activation_params
    if act is None:
        return lambda y: y
    if act == "Relu":
        return lambda y: np.maximum(y, 0, out=y)
    if act == "Clip":
        lo, hi = params
        return lambda y: np.clip(y, lo, hi, out=y)
    if act == "LeakyRelu":
        alpha = params[0]
        return lambda y: np.where(y >= 0, y, y * np.float32(alpha)).astype(y.dtype, copy=False)
    if act == "Sigmoid":
        return lambda y: np.divide(1, 1 + np.exp(-y, out=y), out=y)
    if act == "Tanh":
        return lambda y: np.tanh(y, out=y)
    raise ValueError(f"unsupported fused activation {act}")


def activation_nodes(act: Optional[str], params: Sequence[float], x: str, inits: dict[str, np.ndarray],
                     out: str = "out", prefix: str = "", opset: Optional[int] = None) -> list[NodeProto]:
    """A fused activation as separate ONNX nodes from ``x`` to ``out`` (an Identity when there is none).

    For ONNX fragments, the reference semantics and light ops alike. ``prefix`` starts the names of the
    nodes and of the initializers added to ``inits``. Clip takes its bounds as inputs from opset 11 and
    as attributes before: at a known ``opset`` of 11 or more it is a Clip, otherwise Max then Min
    (the same in every opset).
    """
    params = [float(p) for p in params]
    name = f"{prefix}{act}"
    if act is None:
        return [helper.make_node("Identity", [x], [out], name=f"{prefix}identity")]
    if act == "Clip":
        lo, hi = f"{prefix}clip_lo", f"{prefix}clip_hi"
        inits[lo], inits[hi] = np.array(params[0], np.float32), np.array(params[1], np.float32)
        if opset is not None and opset >= 11:
            return [helper.make_node("Clip", [x, lo, hi], [out], name=name)]
        mid = f"{prefix}clip_mid"
        return [helper.make_node("Max", [x, lo], [mid], name=name + "_max"),
                helper.make_node("Min", [mid, hi], [out], name=name + "_min")]
    if act == "LeakyRelu":
        return [helper.make_node(act, [x], [out], name=name, alpha=params[0])]
    if act == "HardSigmoid":
        return [helper.make_node(act, [x], [out], name=name, alpha=params[0], beta=params[1])]
    return [helper.make_node(act, [x], [out], name=name)]


TRANSPOSE_BLOCK = 256  # square tiles: one source tile and one destination tile stay in L2


def transposed(x: np.ndarray, dtype=np.float32) -> np.ndarray:
    """``x.T`` of a 2-D array as a new contiguous array, built tile by tile on every core.

    Build-time packing of large weights: numpy's own strided copy of VGG-19's 4096x25088 fc6
    took 0.6-1.5 s here, this 0.16 s (a plain copy of it takes 0.15 s). numpy releases the GIL
    while it copies, so the threads run in parallel.
    """
    from concurrent.futures import ThreadPoolExecutor

    rows, cols = x.shape
    out = np.empty((cols, rows), dtype)
    bs = TRANSPOSE_BLOCK

    def band(start: int) -> None:  # bands along the longer side, so that every core gets some
        if rows >= cols:
            for j0 in range(0, cols, bs):
                out[j0:j0 + bs, start:start + bs] = x[start:start + bs, j0:j0 + bs].T
        else:
            for i0 in range(0, rows, bs):
                out[start:start + bs, i0:i0 + bs] = x[i0:i0 + bs, start:start + bs].T

    starts = range(0, max(rows, cols), bs)
    if x.size < bs * bs * 16:
        for start in starts:
            band(start)
    else:
        with ThreadPoolExecutor(default_threads()) as pool:
            list(pool.map(band, starts))
    return out
