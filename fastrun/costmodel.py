"""The no-profile cost model: rough times from FLOPs and bytes, for the heuristic plan.

Without measurements fastrun still solves the same global search, on estimated costs: an
implementation's time is its direct-convolution FLOPs at a nominal rate, scaled by its
``heuristic_rank`` (lower rank = trusted faster); light ops and reorders cost their memory
traffic. This reproduces what onnxruntime's own layout transformer does (blocked kernels with
few reorders) without timing anything.
"""
from __future__ import annotations

import numpy as np

from .registry import Implementation, OpSpec

NOMINAL_GFLOPS = 100.0   # per implementation, before the rank factor
NOMINAL_GBPS = 10.0      # memory traffic of light ops and reorders


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
    return direct_flops(spec) / (NOMINAL_GFLOPS * 1e6) * (1.0 + impl.heuristic_rank / 100.0)


def traffic_ms(elements: int, passes: float = 2.0) -> float:
    """Time to read and write ``elements`` floats ``passes`` times in total."""
    return elements * 4.0 * passes / (NOMINAL_GBPS * 1e6)
