"""Winograd F(m x m, 3 x 3) written in standard ONNX ops, run by onnxruntime's own kernels.

The host Winograd kernels (``winograd.py``) win per layer but split onnxruntime's session around
every call; these are ``kind="onnx"`` fragments, merged into the neighbouring segments like
onnxruntime's Conv. The algorithm is the same (see ``winograd.py``), each stage one ONNX op:

* input transform: the input seen as ``[N, 1, C, H, W]`` through a 3-D Conv with a fixed
  ``[alpha^2, 1, 1, alpha, alpha]`` kernel (B^T d B for every tile position, the padding done by
  the Conv's ``pads``), stride m: ``V [N, alpha^2, C, tiles]`` with no transpose;
* the product: one MatMul of the pre-transformed filter ``U [alpha^2, K, C]`` with V, per image
  (``[N, alpha^2, K, tiles]``) or, in the ``gathered`` variants, over every image's tiles at once
  (a Transpose of V to ``[alpha^2, C, N*tiles]`` first, and of the result back after the output
  transform): per image re-reads U for each image, which small images (few tiles) cannot afford;
* output transform: MatMul with ``A^T (x) A^T`` (``[m^2, alpha^2]``), then DepthToSpace
  (blocksize m, DCR) scatters the m x m tiles back to NCHW; a Gather crops the spatial dims when
  the output is not whole tiles; then bias, residual and activation.

Only default-domain ops whose signature is the same in every opset from 7 on (Conv, MatMul,
Reshape, Transpose, DepthToSpace without ``mode``, Gather with non-negative indices, Add, the
activations), since a fragment runs in a segment at its model's opset.

Measured beside onnxruntime's Conv (NCHWc, fused ReLU) on a shared 2-core AVX-512 VM
(``scripts/bench_winograd_onnx.py --no-spin``): whole VGG-19 at batch 8 with every 3x3 conv of
>= 256 channels as a fragment ran 1.26x faster; per layer at batch 8 256@56 1.28x, 512@28 1.5x,
512@14 1.18x (gathered); it loses at 64 channels, at 112 rows and more (the transforms' memory
traffic outweighs the smaller product) and on ResNet-50's small layers (0.45-0.96x, but
512@7 gathered 1.11x). In ``fastrun profile`` of VGG-19 b8 the profiler picks it for the convs from
128@56 on against onnxruntime's kernels, and the end-to-end race times that one-session plan
(``unsplit`` in :mod:`fastrun.workflows.verify`).
"""
from __future__ import annotations

import numpy as np
from onnx import helper

from fastrun.ops.registry import OnnxFragment, OpSpec, implementation
from fastrun.ops.builtin import estimates
from fastrun.ops.builtin.common import activation_nodes, conv_geometry
from fastrun.ops.builtin.conv_host import bias_of
from fastrun.ops.builtin.winograd import winograd_applies, winograd_matrices

# Activations whose node has the same signature in every opset (Clip's changed at 11).
ACTIVATIONS = (None, "Relu", "LeakyRelu", "Sigmoid", "Tanh")


def winograd_onnx_applies(spec: OpSpec) -> bool:
    """3x3, stride 1, dilation 1, one group, constant float32 weights, an opset-stable activation."""
    return spec.activation in ACTIVATIONS and winograd_applies(spec)


def transformed_filter(w: np.ndarray, m: int) -> np.ndarray:
    """U [alpha^2, K, C] with U[a*alpha + b, k, c] = (G w[k, c] G^T)[a, b], computed in float64."""
    _, g, _ = winograd_matrices(m)
    k, c = w.shape[:2]
    alpha = m + 2
    # one GEMM [(k, c), (r, s)] @ [(r, s), (a, b)], then positions outermost
    kron = np.einsum("ar,bs->rsab", g, g).reshape(9, alpha * alpha)
    u = np.asarray(w, np.float64).reshape(k * c, 9) @ kron
    return np.ascontiguousarray(u.T.reshape(alpha * alpha, k, c), dtype=np.float32)


def winograd_fragment(spec: OpSpec, consts: dict[int, np.ndarray], m: int, gathered: bool) -> OnnxFragment:
    """F(m x m, 3 x 3) of a Conv spec as ONNX nodes (``in0`` -> ``out``; ``in3``: the residual)."""
    geo = conv_geometry(spec)
    n, c, h, w, k, p, q = (geo[x] for x in ("N", "C", "H", "W", "K", "P", "Q"))
    pt, pl, _, _ = geo["pads"]
    at, _, bt = winograd_matrices(m)
    alpha = m + 2
    th, tw = -(-p // m), -(-q // m)
    tiles = th * tw
    inits: dict[str, np.ndarray] = {
        "win": np.einsum("ai,bj->abij", bt, bt).reshape(alpha * alpha, 1, 1, alpha, alpha).astype(np.float32),
        "u": transformed_filter(consts[1], m),
        "aa": np.einsum("ia,jb->ijab", at, at).reshape(m * m, alpha * alpha).astype(np.float32),
    }

    def reshape(x: str, dims: list[int], y: str):
        inits[f"shape_{y}"] = np.array(dims, np.int64)
        return helper.make_node("Reshape", [x, f"shape_{y}"], [y])

    nodes = [
        reshape("in0", [n, 1, c, h, w], "x5"),
        # bottom/right padding grows to whole tiles: th*m + 2 rows in all
        helper.make_node("Conv", ["x5", "win"], ["v5"], kernel_shape=[1, alpha, alpha], strides=[1, m, m],
                         pads=[0, pt, pl, 0, th * m + 2 - h - pt, tw * m + 2 - w - pl]),
        reshape("v5", [n, alpha * alpha, c, tiles], "v"),
    ]
    if gathered:
        nodes += [
            helper.make_node("Transpose", ["v"], ["vt"], perm=[1, 2, 0, 3]),
            reshape("vt", [alpha * alpha, c, n * tiles], "vg"),
            helper.make_node("MatMul", ["u", "vg"], ["mm"]),
            reshape("mm", [alpha * alpha, k * n * tiles], "mr"),
            helper.make_node("MatMul", ["aa", "mr"], ["o"]),
            reshape("o", [m * m, k, n, tiles], "o4"),
            helper.make_node("Transpose", ["o4"], ["ot"], perm=[2, 0, 1, 3]),
        ]
    else:
        nodes += [
            helper.make_node("MatMul", ["u", "v"], ["mm"]),
            reshape("mm", [n, alpha * alpha, k * tiles], "mr"),
            helper.make_node("MatMul", ["aa", "mr"], ["ot"]),
        ]
    nodes += [reshape("ot", [n, m * m * k, th, tw], "blocks"),
              helper.make_node("DepthToSpace", ["blocks"], ["full"], blocksize=m)]  # DCR in every opset
    y = "full"
    if (th * m, tw * m) != (p, q):
        rows, cols = np.meshgrid(np.arange(p), np.arange(q), indexing="ij")
        inits["crop"] = (rows * tw * m + cols).reshape(-1).astype(np.int64)
        nodes += [reshape("full", [n, k, th * m * tw * m], "flat"),
                  helper.make_node("Gather", ["flat", "crop"], ["cropped"], axis=2),
                  reshape("cropped", [n, k, p, q], "y")]
        y = "y"
    bias = bias_of(spec, consts)
    if bias is not None:
        inits["bias"] = bias.reshape(k, 1, 1)
        nodes.append(helper.make_node("Add", [y, "bias"], ["biased"]))
        y = "biased"
    if spec.has_sum:
        nodes.append(helper.make_node("Add", [y, "in3"], ["summed"]))
        y = "summed"
    return OnnxFragment(nodes + activation_nodes(spec.activation, spec.activation_params, y, inits), inits)


# Cost estimates (estimates.winograd with no call cost: a fragment runs inside a segment), fitted on
# scripts/bench_winograd_onnx.py's batch-8 layers: the product ran at ~2/3 of onnxruntime's direct
# GFLOP/s, a transformed element cost ~3.2 ns beside it at ~120 GFLOP/s (gathered: ~4 ns, its two
# Transposes), both put on the ORT_GFLOPS scale the estimates share. They call the measured wins
# and losses of every VGG-19 layer (64@224 0.62x .. 512@28 1.5x) to within ~0.1x.

@implementation("Conv", "winograd_onnx_f4", kind="onnx", exact=False, heuristic_rank=12, sum_input=True,
                applies=winograd_onnx_applies,
                cost=estimates.winograd(4, 120.0, 2.1, rank=12, call_ms=0.0, weights_per_image=True))
def winograd_onnx_f4(spec: OpSpec, consts: dict[int, np.ndarray]) -> OnnxFragment:
    """Winograd F(4x4,3x3) in ONNX ops, one product per image (onnxruntime's kernels, no split)."""
    return winograd_fragment(spec, consts, 4, gathered=False)


@implementation("Conv", "winograd_onnx_f4_gathered", kind="onnx", exact=False, heuristic_rank=12, sum_input=True,
                applies=winograd_onnx_applies,
                cost=estimates.winograd(4, 120.0, 2.6, rank=12, call_ms=0.0))
def winograd_onnx_f4_gathered(spec: OpSpec, consts: dict[int, np.ndarray]) -> OnnxFragment:
    """Winograd F(4x4,3x3) in ONNX ops, one product over every image's tiles (small images)."""
    return winograd_fragment(spec, consts, 4, gathered=True)
