"""The no-profile cost model: rough times from FLOPs and bytes, for the heuristic plan.

Without measurements fastrun still solves the same global search, on estimated costs. What an
implementation is worth is its own estimator's answer (``cost=`` in its registration, beside its
builder; ``fastrun.ops.builtin.estimates`` has the units), or, for one that gives none, its
direct-algorithm FLOPs at the nominal rate slowed by its ``heuristic_rank``. This module keeps the
rules shared by every plan: light ops and reorders cost their memory traffic, per format. This
reproduces what onnxruntime's own layout transformer does (blocked kernels with few reorders)
without timing anything.

A fitted table (time = fixed + a*GFLOP + b*MB per implementation, per light op and format, for
reorders; non-negative least squares on the profiles of all light models at batch 1 and 8) was
tried and measured worse end to end (heuristic/ORT 0.78-0.90 instead of 0.98-1.01 on SqueezeNet,
Inception v2, ResNet-50): its light-op fits were poor (median relative error 0.45-0.78) and it
moved layouts away from the ones onnxruntime's kernels are tuned for. Hence these few rules.
"""
from __future__ import annotations

import numpy as np

from fastrun.ir.graph import Graph, Node
from fastrun.ops import formats
from fastrun.ops.builtin import estimates
from fastrun.ops.registry import Implementation, OpSpec

# Rules read off profiles of the light models (2-core AVX-512 VM; scripts/bench.py caches):
# - reorders between activations that fit in cache ran at ~50 GB/s (fitted 0.0195 ms/MB);
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


def impl_ms(impl: Implementation, spec: OpSpec) -> float:
    """Estimated time of ``impl`` on ``spec``: its own estimator's, else a direct algorithm's."""
    if impl.cost is not None:
        return impl.cost(spec)
    return estimates.direct_ms(spec, impl.heuristic_rank)


def light_ms(node: Node, graph: Graph, fmt: str) -> float:
    """Estimated time of a light (non-heavy) node run by onnxruntime in ``fmt``."""
    out = sum(int(np.prod(graph.tensors[t].shape)) for t in node.outputs if t in graph.tensors)
    kind = node.op_type
    if kind in BROADCAST_OPS and any(t in graph.tensors and int(np.prod(graph.tensors[t].shape)) < out
                                     for t in node.inputs):
        kind = "broadcast"
    family = "NCHWc" if formats.block_size(fmt) else fmt
    return estimates.traffic_ms(out) * LAYOUT_FACTOR.get((kind, family), 1.0)


def reorder_ms(elements: int) -> float:
    """Estimated time of a layout reorder of ``elements`` floats."""
    return estimates.traffic_ms(elements, gbps=REORDER_GBPS)
