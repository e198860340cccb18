"""Which whole-model outputs may replace the original model's: the eligibility rule of the race.

Float models (fp32, fp16): a candidate's outputs must match onnxruntime's on the original model
(default optimizations) within MODEL_TOLERANCE (max abs error relative to max |reference|).

Quantized models (QDQ, QOperator, dynamic quantization: found by their op types): onnxruntime's
own fusions already move the outputs away from the model's semantics, which are onnxruntime with
every optimization off (``ORT_DISABLE_ALL``) on the original. A candidate is eligible when its
error against those semantics is no larger than the error of a default onnxruntime session against
them, times QUANTIZED_SLACK plus QUANTIZED_ABS_SLACK. The error there is the RMS error relative
to the reference's RMS (worst output): one int8 rounding step that flips in one element moves a
max-abs error by a whole step and an RMS error by almost nothing, so the rule compares how far
the outputs moved, not which single element rounded the other way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import onnx

from fastrun.ir.graph import is_quantized_op

# Whole-model outputs must match onnxruntime's within this (max abs error relative to max |ref|).
MODEL_TOLERANCE = 1e-3
QUANTIZED_SLACK = 1.1
QUANTIZED_ABS_SLACK = 1e-4

def quantized_ops(model: onnx.ModelProto) -> list[str]:
    """The quantization op types of a model, subgraphs included (empty: a float model)."""
    found = set()
    for node in _all_nodes(model.graph):
        if is_quantized_op(node.op_type):
            found.add(node.op_type)
    return sorted(found)


def _all_nodes(graph: onnx.GraphProto) -> Iterable[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_nodes(g)


def max_relative_error(outs: Sequence[np.ndarray], refs: Sequence[np.ndarray]) -> float:
    """Worst output's max abs error relative to its max |reference|."""
    worst = 0.0
    for o, r in zip(outs, refs):
        o, r = np.asarray(o, dtype=np.float64), np.asarray(r, dtype=np.float64)
        if r.size:
            scale = max(float(np.max(np.abs(r))), 1e-30)
            worst = max(worst, float(np.max(np.abs(o - r))) / scale)
    return worst


def rms_relative_error(outs: Sequence[np.ndarray], refs: Sequence[np.ndarray]) -> float:
    """Worst output's RMS error relative to its reference's RMS."""
    worst = 0.0
    for o, r in zip(outs, refs):
        o, r = np.asarray(o, dtype=np.float64), np.asarray(r, dtype=np.float64)
        if r.size:
            scale = max(float(np.sqrt(np.mean(r * r))), 1e-30)
            worst = max(worst, float(np.sqrt(np.mean((o - r) ** 2))) / scale)
    return worst


@dataclass
class Reference:
    """The outputs candidates are judged against, on one feed, and how far they may be."""

    feed: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    quantized: bool
    bound: float                  # the largest eligible error
    onnxruntime_error: float = 0.0  # the error of a default onnxruntime session (quantized models)

    def error(self, outputs: dict[str, np.ndarray]) -> float:
        names = list(self.outputs)
        measure = rms_relative_error if self.quantized else max_relative_error
        return measure([outputs[n] for n in names], [self.outputs[n] for n in names])

    def accepts(self, outputs: dict[str, np.ndarray]) -> bool:
        return self.error(outputs) <= self.bound

    def describe(self) -> dict:
        return {"quantized": self.quantized, "bound": self.bound, "onnxruntime_error": self.onnxruntime_error,
                "rule": (f"rms error vs ORT_DISABLE_ALL <= onnxruntime's x{QUANTIZED_SLACK} + {QUANTIZED_ABS_SLACK}"
                         if self.quantized else f"max error vs onnxruntime <= {MODEL_TOLERANCE}")}


def make_reference(feed: dict[str, np.ndarray], names: Sequence[str], default: Sequence[np.ndarray],
                   semantics: Sequence[np.ndarray] = ()) -> Reference:
    """The reference of a float model (``default``: onnxruntime's outputs), or of a quantized one
    (``semantics``: onnxruntime's with optimizations off; ``default`` then sets the bound)."""
    if not semantics:
        return Reference(feed, dict(zip(names, default)), False, MODEL_TOLERANCE)
    ort_error = rms_relative_error(default, semantics)
    return Reference(feed, dict(zip(names, semantics)), True, ort_error * QUANTIZED_SLACK + QUANTIZED_ABS_SLACK,
                     ort_error)
