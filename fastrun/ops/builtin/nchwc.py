"""onnxruntime's blocked-layout (``com.microsoft.nchwc``) convolutions as registered implementations.

MLAS's NCHWc kernels read and write activations as ``[N, C/b, H, W, b]`` (``b`` = the CPU's
SIMD width in floats: 16 with AVX-512F, 8 with AVX/AVX2, 4 with SSE/NEON) and want the filter
reordered into one of two blocked layouts, exactly as onnxruntime's own ``NchwcTransformer``
(``onnxruntime/core/optimizer/nchwc_transformer.cc``; reorders in ``core/mlas/lib/reorder.cpp``)
stores it. Fed plain OIHW weights the op silently computes garbage, so the layouts here are
checked against what the transformer itself writes (see ``tests/test_nchwc.py``).

* ``OIHWBiBo`` (input in NCHWc): ``[Kp/b][Cp/b][R][S][b_in][b_out]``, with the output channels
  ``K`` and the input channels ``C`` (per group) zero-padded to ``Kp``/``Cp``, multiples of ``b``.
  The initializer is declared ``[Kp, Cp, R, S]`` (the kernel takes ``K`` from dim 0 and checks
  ``X.shape[1] == W.shape[1] * group``).
* ``OIHWBo`` (NCHW input with ``C < b``, and depthwise): ``[Kp/b][C][R][S][b_out]``, declared
  ``[Kp, C, R, S]``.

MLAS picks its algorithm from the physical input channels per group (``snchwc.cpp``,
``MlasNchwcConv``): ``>= b`` -> blocked (pointwise kernel for unpadded 1x1), ``== 1`` with one
output channel per group -> depthwise, otherwise the NCHW-input kernel. The weight layout must
match that choice.

At a fragment boundary a blocked tensor has the 5-D shape ``formats.physical_shape`` gives,
``[N, Cp/b, H, W, b]``; the nchwc ops themselves take and return 4-D ``[N, Cp, H, W]`` (same
memory), so the fragments wrap them in ``Reshape`` nodes (aliasing in onnxruntime, no copy).

Padded output channels hold ``activation(0)`` (e.g. 0.5 after Sigmoid), never NaN; every
consumer fastrun emits ignores them (zero filter weights, per-channel ops, ``ReorderOutput``).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from onnx import helper

from fastrun.ops import formats
from fastrun.ops.registry import OnnxFragment, OpSpec, implementation
from fastrun.ops.builtin import estimates

NCHWC_DOMAIN = "com.microsoft.nchwc"
NCHWC_OPSETS = {NCHWC_DOMAIN: 1}
# Activations the nchwc Conv kernel fuses (contrib_ops/cpu/fused_activation.cc), with their
# parameter counts in ``activation_params``.
NCHWC_ACTIVATIONS = {"Relu": 0, "Tanh": 0, "Sigmoid": 0, "LeakyRelu": 1, "Clip": 2, "HardSigmoid": 2}


def _ceil_to(x: int, b: int) -> int:
    return -(-x // b) * b


# ---------------------------------------------------------------------------------------------
# Filter reorders (numpy versions of MlasReorderFilterOIHWBiBo / MlasReorderFilterOIHWBo)
# ---------------------------------------------------------------------------------------------

def reorder_filter_oihwbibo(w: np.ndarray, block: int, pad_input: bool = True) -> np.ndarray:
    """OIHW -> OIHWBiBo, output channels (and input channels if ``pad_input``) padded to ``block``.

    Returns the array with the declared shape ``[Kp, Cp, R, S]`` whose memory is the blocked
    layout ``[Kp/b][Cp/b][R][S][b_in][b_out]``.
    """
    k, c, r, s = w.shape
    kp = _ceil_to(k, block)
    cp = _ceil_to(c, block) if pad_input else c
    if cp % block:
        raise ValueError(f"OIHWBiBo needs input channels per group ({c}) padded to the block {block}")
    padded = np.zeros((kp, cp, r, s), dtype=np.float32)
    padded[:k, :c] = w
    blocked = padded.reshape(kp // block, block, cp // block, block, r, s).transpose(0, 2, 4, 5, 3, 1)
    return np.ascontiguousarray(blocked).reshape(kp, cp, r, s)


def reorder_filter_oihwbo(w: np.ndarray, block: int) -> np.ndarray:
    """OIHW -> OIHWBo, output channels padded to ``block``; declared shape ``[Kp, C, R, S]``."""
    k, c, r, s = w.shape
    kp = _ceil_to(k, block)
    padded = np.zeros((kp, c, r, s), dtype=np.float32)
    padded[:k] = w
    blocked = padded.reshape(kp // block, block, c, r, s).transpose(0, 2, 3, 4, 1)
    return np.ascontiguousarray(blocked).reshape(kp, c, r, s)


def pad_bias(bias: Optional[np.ndarray], channels: int) -> Optional[np.ndarray]:
    if bias is None:
        return None
    out = np.zeros(channels, dtype=np.float32)
    out[: bias.shape[0]] = bias
    return out


# ---------------------------------------------------------------------------------------------
# Applicability
# ---------------------------------------------------------------------------------------------

def _block() -> int:
    return formats.native_block_size()


def _conv_basics(spec: OpSpec) -> bool:
    """What every nchwc Conv needs: a float 2-D conv with static weights (and bias)."""
    if spec.op_type != "Conv" or spec.dtype != "float32" or _block() < 4:
        return False
    if len(spec.inputs) < 2 or spec.inputs[0] is None or len(spec.inputs[0]) != 4:
        return False
    if not spec.const[1] or spec.inputs[1] is None or len(spec.inputs[1]) != 4:
        return False
    if len(spec.inputs) > 2 and spec.inputs[2] is not None and not spec.const[2]:
        return False
    if len(spec.inputs) > 4 or (len(spec.inputs) == 4 and not spec.has_sum):
        return False
    if spec.activation is not None:
        if spec.activation not in NCHWC_ACTIVATIONS:
            return False
        if len(spec.activation_params) != NCHWC_ACTIVATIONS[spec.activation]:
            return False
    ks = spec.attr("kernel_shape")
    if ks is not None and tuple(ks) != tuple(spec.inputs[1][2:]):
        return False
    return len(tuple(spec.attr("strides", (1, 1)))) == 2 and len(tuple(spec.attr("pads", (0, 0, 0, 0)))) == 4


def _group(spec: OpSpec) -> int:
    return int(spec.attr("group", 1) or 1)


def blocked_applies(spec: OpSpec) -> bool:
    """NCHWc in -> NCHWc out.

    group == 1: any C and K (both zero-padded; ORT's own transformer only takes C % 4 == 0 because
    its ReorderInput needs it, but the conv kernel only needs the padded C, and fastrun's reorders
    pad any C). group > 1 (not depthwise): C/g and K/g multiples of the block, as in the
    transformer (the group's channels must start on block boundaries).
    """
    if not _conv_basics(spec):
        return False
    b = _block()
    c = spec.inputs[0][1]
    k, cg = spec.inputs[1][0], spec.inputs[1][1]
    g = _group(spec)
    if g == 1:
        return cg == c
    if cg == 1 and k == g == c:
        return False  # depthwise: ort_nchwc_depthwise
    return c == cg * g and k % g == 0 and cg % b == 0 and (k // g) % b == 0


def nchw_in_applies(spec: OpSpec) -> bool:
    """NCHW in (C < block, group 1) -> NCHWc out: MLAS's NCHW-input kernel, the first-conv path."""
    if not _conv_basics(spec):
        return False
    c = spec.inputs[0][1]
    return _group(spec) == 1 and spec.inputs[1][1] == c and c < _block()


def depthwise_applies(spec: OpSpec) -> bool:
    """Depthwise (group == C == K, one filter per channel), any C: run with group = padded C."""
    if not _conv_basics(spec):
        return False
    c = spec.inputs[0][1]
    k, cg = spec.inputs[1][0], spec.inputs[1][1]
    return cg == 1 and k == c and _group(spec) == c


# ---------------------------------------------------------------------------------------------
# Fragment builders
# ---------------------------------------------------------------------------------------------

def _conv_node_attrs(spec: OpSpec, group: int) -> dict:
    attrs = {
        "kernel_shape": [int(v) for v in spec.inputs[1][2:]],
        "strides": [int(v) for v in spec.attr("strides", (1, 1))],
        "pads": [int(v) for v in spec.attr("pads", (0, 0, 0, 0))],
        "dilations": [int(v) for v in spec.attr("dilations", (1, 1))],
        "group": int(group),
    }
    if spec.activation is not None:
        attrs["activation"] = spec.activation
        if spec.activation_params:
            attrs["activation_params"] = [float(p) for p in spec.activation_params]
    return attrs


def to_4d_node(src: str, dst: str, shape_name: str) -> "helper.NodeProto":
    """[N, Cb, H, W, b] -> [N, Cb*b, H, W] (shape initializer ``[0, -1, 0, 0]``)."""
    return helper.make_node("Reshape", [src, shape_name], [dst])


def to_5d_node(src: str, dst: str, shape_name: str) -> "helper.NodeProto":
    """[N, Cp, H, W] -> [N, Cp/b, H, W, b] (shape initializer ``[0, -1, 0, 0, b]``)."""
    return helper.make_node("Reshape", [src, shape_name], [dst])


def shape_4d() -> np.ndarray:
    return np.array([0, -1, 0, 0], dtype=np.int64)


def shape_5d(block: int) -> np.ndarray:
    return np.array([0, -1, 0, 0, block], dtype=np.int64)


def _fragment(spec: OpSpec, w: np.ndarray, bias: Optional[np.ndarray], group: int,
              blocked_input: bool) -> OnnxFragment:
    b = _block()
    inits: dict[str, np.ndarray] = {"w": w, "shape5": shape_5d(b)}
    nodes = []
    x = "in0"
    if blocked_input:
        inits["shape4"] = shape_4d()
        nodes.append(to_4d_node("in0", "x4", "shape4"))
        x = "x4"
    conv_inputs = [x, "w"]
    if bias is not None or spec.has_sum:
        inits["b"] = bias if bias is not None else np.zeros(_ceil_to(spec.output[1], b), np.float32)
        conv_inputs.append("b")
    if spec.has_sum:  # the residual, blocked like the output, accumulated before the activation
        inits.setdefault("shape4", shape_4d())
        nodes.append(to_4d_node("in3", "sum4", "shape4"))
        conv_inputs.append("sum4")
    nodes.append(helper.make_node("Conv", conv_inputs, ["y4"], domain=NCHWC_DOMAIN,
                                  **_conv_node_attrs(spec, group)))
    nodes.append(to_5d_node("y4", "out", "shape5"))
    return OnnxFragment(nodes, inits, dict(NCHWC_OPSETS))


def _bias(consts: dict[int, np.ndarray]) -> Optional[np.ndarray]:
    return consts.get(2)


@implementation("Conv", "ort_nchwc", version=2, kind="onnx", in_format="NCHWc", out_format="NCHWc",
                heuristic_rank=5, sum_input=True, applies=blocked_applies)
def ort_nchwc(spec: OpSpec, consts: dict[int, np.ndarray]) -> OnnxFragment:
    """onnxruntime's NCHWc (MLAS blocked) convolution, blocked in and out, activation fused."""
    b = _block()
    w = np.asarray(consts[1], dtype=np.float32)
    k = w.shape[0]
    g = _group(spec)
    wr = reorder_filter_oihwbibo(w, b, pad_input=(g == 1))
    bias = _bias(consts)
    bias = pad_bias(bias, _ceil_to(k, b)) if bias is not None else None
    return _fragment(spec, wr, bias, g, blocked_input=True)


@implementation("Conv", "ort_nchwc_nchw_in", version=2, kind="onnx", in_format="NCHW", out_format="NCHWc",
                heuristic_rank=5, sum_input=True, applies=nchw_in_applies)
def ort_nchwc_nchw_in(spec: OpSpec, consts: dict[int, np.ndarray]) -> OnnxFragment:
    """onnxruntime's NCHWc convolution reading a plain NCHW input with few channels (first conv)."""
    b = _block()
    w = np.asarray(consts[1], dtype=np.float32)
    wr = reorder_filter_oihwbo(w, b)
    bias = _bias(consts)
    bias = pad_bias(bias, _ceil_to(w.shape[0], b)) if bias is not None else None
    return _fragment(spec, wr, bias, 1, blocked_input=False)


# Depthwise convolutions are bound by traffic: time / traffic (estimates.direct_ms) ~1.15 for this
# kernel against ~2.8 for onnxruntime's NCHW one (ShuffleNet's 272@14x14 layers: 0.049 vs 0.120
# ms). Without this rule the heuristic kept ShuffleNet all-NCHW and ran 0.70-0.85x onnxruntime.
@implementation("Conv", "ort_nchwc_depthwise", version=2, kind="onnx", in_format="NCHWc", out_format="NCHWc",
                heuristic_rank=5, sum_input=True, applies=depthwise_applies,
                cost=estimates.direct(5, depthwise_traffic=1.15))
def ort_nchwc_depthwise(spec: OpSpec, consts: dict[int, np.ndarray]) -> OnnxFragment:
    """onnxruntime's NCHWc depthwise convolution (group = padded channel count)."""
    b = _block()
    w = np.asarray(consts[1], dtype=np.float32)
    cp = _ceil_to(w.shape[0], b)
    wr = reorder_filter_oihwbo(w, b)  # [Cp, 1, R, S]
    bias = _bias(consts)
    bias = pad_bias(bias, cp) if bias is not None else None
    return _fragment(spec, wr, bias, cp, blocked_input=True)
