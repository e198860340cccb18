"""Units for implementations' cost estimates: what an implementation is worth without measuring it.

An implementation registers its estimator beside its builder (``@implementation(...,
cost=fn)``, ``fn(spec) -> ms``), the way a kernel's performance model sits with the kernel. The
heuristic plan (``fastrun.planning.costmodel``) prices every candidate with it when nothing was
measured. Estimates are on one nominal scale: onnxruntime's direct kernels at
:data:`NOMINAL_GFLOPS`, memory traffic at :data:`NOMINAL_GBPS`. Only their ratios matter.

An implementation's ``heuristic_rank`` is its trust margin: the estimate is multiplied by
``1 + rank / 100`` (:func:`margin`), so that a lower rank wins ties.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from fastrun.ops.builtin.common import is_depthwise
from fastrun.ops.registry import OpSpec

Estimator = Callable[[OpSpec], float]

NOMINAL_GFLOPS = 100.0   # direct algorithms, before the margin
NOMINAL_GBPS = 10.0      # memory traffic
# onnxruntime's direct kernels on the 3x3 shapes where Winograd was fitted, measured alongside it:
# Winograd estimates are scaled by ORT_GFLOPS / NOMINAL_GFLOPS onto the nominal scale.
ORT_GFLOPS = 180.0
# Charged once per call of a host Winograd kernel. Larger than a call costs alone: inside a model a
# host step ran 0.1-1.3 ms slower than repeated alone (Inception v2 b8, timed step by step), and
# each one splits an onnxruntime session, often with reorders around it. With 0.5 ms the heuristic
# put Winograd on ResNet-50's small layers at batch 8 and ran 5-7% slower than without it.
HOST_CALL_MS = 2.0
# Depthwise convolutions are bound by traffic, not FLOPs: time / (input + output bytes at
# NOMINAL_GBPS) is this factor for an implementation that states none (the slowest measured).
SLOWEST_DEPTHWISE_TRAFFIC = 7.0


def margin(rank: int) -> float:
    """The trust margin of a ``heuristic_rank``."""
    return 1.0 + rank / 100.0


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


def traffic_ms(elements: float, passes: float = 2.0, gbps: float = NOMINAL_GBPS) -> float:
    """Time to read and write ``elements`` floats ``passes`` times in total."""
    return elements * 4.0 * passes / (gbps * 1e6)


def direct_ms(spec: OpSpec, rank: int, depthwise_traffic: Optional[float] = None) -> float:
    """A direct algorithm: its FLOPs at the nominal rate with the rank's margin; on a depthwise
    convolution at least its traffic times ``depthwise_traffic`` (the slowest measured if None)."""
    ms = direct_flops(spec) / (NOMINAL_GFLOPS * 1e6) * margin(rank)
    if is_depthwise(spec):
        factor = SLOWEST_DEPTHWISE_TRAFFIC if depthwise_traffic is None else depthwise_traffic
        elements = float(np.prod(spec.inputs[0])) + float(np.prod(spec.output))
        ms = max(ms, traffic_ms(elements, passes=1.0) * factor)
    return ms


def direct(rank: int, depthwise_traffic: Optional[float] = None) -> Estimator:
    """The estimator :func:`direct_ms` for an implementation of ``rank``."""
    return lambda spec: direct_ms(spec, rank, depthwise_traffic)


def winograd_ms(spec: OpSpec, m: int, gemm_gflops: float, ns_per_element: float, call_ms: float = HOST_CALL_MS,
                weights_per_image: bool = False) -> float:
    """Time of F(m x m, 3 x 3) on a 3x3 stride-1 Conv as measured beside onnxruntime, in ms.

    Its batched product runs at ``gemm_gflops``, every transformed element (alpha^2 (C + K) per
    tile, alpha = m + 2) costs ``ns_per_element``, the transformed weights (alpha^2 K C) stream
    from memory once per call (once per image with ``weights_per_image``), and the call pays
    ``call_ms`` (a host kernel: :data:`HOST_CALL_MS`).
    """
    (n, c, _, _), k, (p, q) = spec.inputs[0], spec.inputs[1][0], spec.output[2:]
    alpha = m + 2
    tiles = n * -(-p // m) * -(-q // m)
    gemm = 2.0 * alpha * alpha * k * c * tiles / (gemm_gflops * 1e6)
    transforms = alpha * alpha * (c + k) * tiles * ns_per_element * 1e-6
    weights = traffic_ms(alpha * alpha * k * c, passes=float(n) if weights_per_image else 1.0)
    return gemm + transforms + weights + call_ms


def winograd(m: int, gemm_gflops: float, ns_per_element: float, rank: int, call_ms: float = HOST_CALL_MS,
             weights_per_image: bool = False) -> Estimator:
    """The estimator of a Winograd variant of ``rank``, on the nominal scale."""
    return lambda spec: (winograd_ms(spec, m, gemm_gflops, ns_per_element, call_ms, weights_per_image)
                         * ORT_GFLOPS / NOMINAL_GFLOPS * margin(rank))
