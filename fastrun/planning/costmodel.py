"""The no-profile cost model: rough times from FLOPs and bytes, for the heuristic plan.

Without measurements fastrun still solves the same global search, on estimated costs: an
implementation's time is its direct-convolution FLOPs at a nominal rate, scaled by its
``heuristic_rank`` (lower rank = trusted faster); light ops and reorders cost their memory
traffic; depthwise convolutions cost their traffic times a per-kernel factor. The constants are
rules read off profiles (below). This reproduces what onnxruntime's own layout transformer does
(blocked kernels with few reorders) without timing anything.

A fitted table (time = fixed + a*GFLOP + b*MB per implementation, per light op and format, for
reorders; non-negative least squares on the profiles of all light models at batch 1 and 8) was
tried and measured worse end to end (heuristic/ORT 0.78-0.90 instead of 0.98-1.01 on SqueezeNet,
Inception v2, ResNet-50): its light-op fits were poor (median relative error 0.45-0.78) and it
moved layouts away from the ones onnxruntime's kernels are tuned for. Hence these few rules.
"""
from __future__ import annotations

import numpy as np

from fastrun.ops import formats
from fastrun.ir.graph import Graph, Node
from fastrun.ops.builtin.common import is_depthwise
from fastrun.ops.registry import Implementation, OpSpec

NOMINAL_GFLOPS = 100.0   # per implementation, before the rank factor
NOMINAL_GBPS = 10.0      # memory traffic of light ops
# Rules read off profiles of the light models (2-core AVX-512 VM; scripts/bench.py caches):
# - reorders between activations that fit in cache ran at ~50 GB/s (fitted 0.0195 ms/MB);
# - depthwise convolutions are bound by traffic, not FLOPs: time / (input + output bytes at
#   NOMINAL_GBPS) was ~2.8 for onnxruntime's NCHW kernel, ~1.15 for its blocked depthwise
#   kernel (ShuffleNet's 272@14x14 layers: 0.120 vs 0.049 ms) and ~7 for the numpy taps kernel;
#   an implementation not listed is assumed as slow as the slowest. Without this rule the
#   heuristic kept ShuffleNet all-NCHW and ran 0.70-0.85x onnxruntime.
# - Winograd F(m x m, 3 x 3) (fitted on scripts/bench_kernels.py --only 3x3 on a 2-core AVX2 VM, batch
#   1 and 8): its batched product runs at ~WINOGRAD_GEMM_GFLOPS, every transformed element
#   (alpha^2 (C + K) per tile, alpha = m + 2) costs ~WINOGRAD_NS_PER_ELEMENT and the transformed
#   weights (alpha^2 K C) stream from memory once per call, where onnxruntime's direct kernels run
#   at ~ORT_GFLOPS. That called win or loss against onnxruntime's blocked kernel right on 11 of
#   the 12 measured shapes (F(4,3); 64..512 channels, 14..224 pixels; the miss, 512@14 at batch
#   8, by 2%): Winograd pays where channels are many (>= 256) and the image not tiny, i.e. VGG's
#   deep layers, never at 64 channels. Before this rule the heuristic never chose Winograd and
#   ran VGG-19 1.21x slower than the profiled plan.
# - per-channel affine ops left after folding (DenseNet-121's pre-activation BatchNormalization,
#   unfolded as Mul + Add with a broadcast constant) cost more outside NCHW: measured over its 62
#   layers (time / traffic estimate, medians) broadcast Mul/Add 1.29 blocked vs 0.36 in NCHW and
#   0.29 in NHWC; BatchNormalization 0.54 blocked, 0.52 NHWC vs 0.27 NCHW. Other light ops
#   (Relu, Concat, pools) cost the same in every format. Without this rule the heuristic kept
#   them blocked and ran DenseNet 0.75x onnxruntime.
REORDER_GBPS = 50.0
LAYOUT_FACTOR = {("broadcast", "NCHWc"): 3.5, ("BatchNormalization", "NCHWc"): 2.0,
                 ("BatchNormalization", "NHWC"): 2.0}
BROADCAST_OPS = ("Add", "Sub", "Mul", "Div")
DEPTHWISE_TRAFFIC_FACTOR = {"ort": 2.8, "ort_nchwc_depthwise": 1.15, "depthwise_taps": 7.0}
#   The compiled engine (NCHWc / NHWC variants), refitted in session 7 after its transforms got
#   1.1-1.6x faster: on its 352 profiled timings over the 3x3 layers of VGG-19, ResNet-50,
#   Inception v1/v2 and DenseNet-121 at batch 1 and 8 (scripts/bench.py caches, 2-core AVX2 VM)
#   product ~150 GFLOP/s, ~1 ns per transformed element, transformed weights at NOMINAL_GBPS and
#   ~0.5 ms per call alone; against onnxruntime's blocked kernel that calls 83 of the 88 shapes
#   right (session 6's constants, 200 GFLOP/s and 2 ns: 72). The fused engine
#   (winograd_f*_fused_nhwc), fitted the same way on its 88 timings: ~150 GFLOP/s, ~0.5 ns per
#   element; 43 of 50 shapes called right.
#   The per-call term the model charges (2 ms) is larger than a call costs alone: in the model a
#   host step runs 0.1-1.3 ms slower than repeated alone (Inception v2 b8, timed step by step), and
#   each splits a session, often with reorders around it. With 0.5 ms the heuristic put Winograd
#   on ResNet-50's small layers at batch 8 and ran 5-7% slower than without it (with 0 ms, session
#   5: 0.78-0.93x onnxruntime on ResNet-50 and Inception). Interleaved A/B of the heuristic plans
#   against session 6's rules (/tmp scripts, 9-11 rounds): VGG-19 b1 0.89-0.97, b8 0.92-0.97;
#   Inception v1 b8 0.98, v2 b8 0.95-0.99; AlexNet b8 1.01-1.05 (a marginal Winograd layer
#   dropped); ResNet-50, DenseNet-121 and every batch-1 model but VGG-19: the same plan.
#   The numpy-transform variants (the engine without numba) charged 0.5 ms until session 9; with
#   2 ms their heuristic plans (numba hidden) were the same on VGG-19 b1, ResNet-50 b1/b8,
#   Inception v1/v2 b8 and AlexNet b8, and ZFNet-512 b8 dropped one of three host steps: 296-299
#   ms against 288-308 with 0.5, onnxruntime 304-317 (three races). One charge for every Winograd call.
HOST_CALL_MS = 2.0
# name -> (m, product GFLOP/s, ns per transformed element)
WINOGRAD_VARIANTS = {
    "winograd_f2": (2, 100.0, 2.5), "winograd_f4": (4, 100.0, 2.5), "winograd_f6": (6, 100.0, 2.5),
    "winograd_f4_nchwc": (4, 150.0, 1.0), "winograd_f6_nchwc": (6, 150.0, 1.0),
    "winograd_f4_nhwc": (4, 150.0, 1.0), "winograd_f6_nhwc": (6, 150.0, 1.0),
    "winograd_f4_fused_nhwc": (4, 150.0, 0.5), "winograd_f6_fused_nhwc": (6, 150.0, 0.5),
}
ORT_GFLOPS = 180.0


def direct_flops(spec: OpSpec) -> float:
    """Multiply-adds x2 of the direct algorithm (what GFLOP/s figures are quoted against)."""
    if spec.op_type == "Conv" and len(spec.inputs) > 1:
        w = spec.inputs[1]
        return 2.0 * float(np.prod(spec.output)) * float(np.prod(w[1:]))
    if spec.op_type in ("MatMul", "Gemm"):
        a = spec.inputs[0]
        reduction = a[0] if spec.op_type == "Gemm" and spec.attr("transA") else a[-1]
        return 2.0 * float(np.prod(spec.output)) * float(reduction)
    return 0.0


def impl_ms(impl: Implementation, spec: OpSpec) -> float:
    rank_factor = 1.0 + impl.heuristic_rank / 100.0
    if impl.name in WINOGRAD_VARIANTS:  # on the nominal scale: as if onnxruntime ran at NOMINAL_GFLOPS
        return winograd_ms(spec, *WINOGRAD_VARIANTS[impl.name]) * ORT_GFLOPS / NOMINAL_GFLOPS * rank_factor
    ms = direct_flops(spec) / (NOMINAL_GFLOPS * 1e6) * rank_factor
    if is_depthwise(spec):
        factor = DEPTHWISE_TRAFFIC_FACTOR.get(impl.name, max(DEPTHWISE_TRAFFIC_FACTOR.values()))
        elements = float(np.prod(spec.inputs[0])) + float(np.prod(spec.output))
        ms = max(ms, traffic_ms(elements, passes=1.0) * factor)
    return ms


def winograd_ms(spec: OpSpec, m: int, gemm_gflops: float, ns_per_element: float) -> float:
    """Estimated time of F(m x m, 3 x 3) on a 3x3 stride-1 Conv, in milliseconds."""
    (n, c, _, _), k, (p, q) = spec.inputs[0], spec.inputs[1][0], spec.output[2:]
    alpha = m + 2
    tiles = n * -(-p // m) * -(-q // m)
    gemm = 2.0 * alpha * alpha * k * c * tiles / (gemm_gflops * 1e6)
    transforms = alpha * alpha * (c + k) * tiles * ns_per_element * 1e-6
    return gemm + transforms + traffic_ms(alpha * alpha * k * c, passes=1.0) + HOST_CALL_MS


def light_ms(node: Node, graph: Graph, fmt: str) -> float:
    """Estimated time of a light (non-heavy) node run by onnxruntime in ``fmt``."""
    out = sum(int(np.prod(graph.tensors[t].shape)) for t in node.outputs if t in graph.tensors)
    kind = node.op_type
    if kind in BROADCAST_OPS and any(t in graph.tensors and int(np.prod(graph.tensors[t].shape)) < out
                                     for t in node.inputs):
        kind = "broadcast"
    family = "NCHWc" if formats.block_size(fmt) else fmt
    return traffic_ms(out) * LAYOUT_FACTOR.get((kind, family), 1.0)


def traffic_ms(elements: int, passes: float = 2.0, gbps: float = NOMINAL_GBPS) -> float:
    """Time to read and write ``elements`` floats ``passes`` times in total."""
    return elements * 4.0 * passes / (gbps * 1e6)


def reorder_ms(elements: int) -> float:
    return traffic_ms(elements, gbps=REORDER_GBPS)
