"""onnxruntime's own kernels as registered implementations.

They are ``kind="onnx"``: each emits ONNX nodes that the executor merges into one onnxruntime
session with its neighbours. Fragment names follow the registry convention: runtime input ``i``
is ``in{i}``, the output is ``out``; every other name is local to the fragment.
Version 2 (here and in ``nchwc.py``): timed in sessions whose threads spin during ``run``
(``fastrun.system.ortutil``), 2-10% faster on small layers than version 1's.
"""
from __future__ import annotations

import numpy as np
from onnx import helper

from fastrun.ops.registry import OnnxFragment, OpSpec, implementation
from fastrun.ops.builtin import estimates
from fastrun.ops.builtin.common import activation_nodes
from fastrun.system.ortutil import STANDALONE_OPSET

MS_DOMAIN = "com.microsoft"
FUSABLE = ("Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid")


def _io_names(spec: OpSpec, consts: dict[int, np.ndarray]) -> tuple[list[str], dict[str, np.ndarray]]:
    """Input names for a fragment: ``in{i}`` for runtime inputs, ``c{i}`` for constants."""
    names, inits = [], {}
    for i, shape in enumerate(spec.inputs):
        if shape is None:
            names.append("")
        elif spec.const[i]:
            names.append(f"c{i}")
            inits[f"c{i}"] = consts[i]
        else:
            names.append(f"in{i}")
    while names and names[-1] == "":
        names.pop()
    return names, inits


def _conv_attrs(spec: OpSpec) -> dict:
    return {k: list(spec.attr(k)) if k != "group" else spec.attr(k)
            for k in ("kernel_shape", "strides", "pads", "dilations", "group")}


# Depthwise convolutions: time / traffic (estimates.direct_ms) ~2.8 for this NCHW kernel.
@implementation("Conv", "ort", version=2, kind="onnx", heuristic_rank=10, sum_input=True,
                applies=lambda spec: spec.activation in (None,) + FUSABLE,
                cost=estimates.direct(10, depthwise_traffic=2.8))
def ort_conv(spec: OpSpec, consts: dict[int, np.ndarray]) -> OnnxFragment:
    """onnxruntime's default (MLAS) convolution in NCHW, with the activation (and residual) fused."""
    names, inits = _io_names(spec, consts)
    attrs = _conv_attrs(spec)
    if spec.activation is None and spec.has_sum:
        nodes = [helper.make_node("Conv", names[:3], ["conv"], **attrs), helper.make_node("Add", ["conv", names[3]], ["out"])]
        return OnnxFragment(nodes, inits)
    if spec.activation is None:
        node = helper.make_node("Conv", names, ["out"], **attrs)
    else:
        if spec.activation_params:
            attrs["activation_params"] = [float(p) for p in spec.activation_params]
        node = helper.make_node("FusedConv", names, ["out"], domain=MS_DOMAIN, activation=spec.activation, **attrs)
    return OnnxFragment([node], inits, {MS_DOMAIN: 1})


@implementation("MatMul", "ort", version=2, kind="onnx", heuristic_rank=10,
                applies=lambda spec: spec.activation is None)
def ort_matmul(spec: OpSpec, consts: dict[int, np.ndarray]) -> OnnxFragment:
    """onnxruntime's MatMul kernel."""
    names, inits = _io_names(spec, consts)
    return OnnxFragment([helper.make_node("MatMul", names, ["out"])], inits)


@implementation("Gemm", "ort", version=2, kind="onnx", heuristic_rank=10,
                applies=lambda spec: spec.activation is None)
def ort_gemm(spec: OpSpec, consts: dict[int, np.ndarray]) -> OnnxFragment:
    """onnxruntime's Gemm kernel."""
    names, inits = _io_names(spec, consts)
    attrs = {k: spec.attr(k) for k in ("alpha", "beta", "transA", "transB")}
    return OnnxFragment([helper.make_node("Gemm", names, ["out"], **attrs)], inits)


def reference_fragment(spec: OpSpec, consts: dict[int, np.ndarray]) -> OnnxFragment:
    """The plain ONNX semantics of a spec (op, then its activation as a separate node).

    Used as the ground truth every candidate is checked against; emitted for a standalone
    model at :data:`fastrun.system.ortutil.STANDALONE_OPSET`.
    """
    names, inits = _io_names(spec, consts)
    attrs = dict(spec.attrs)
    out = "out" if spec.activation is None else "pre"
    if spec.has_sum:
        nodes = [helper.make_node("Conv", names[:3], ["conv"], **attrs), helper.make_node("Add", ["conv", names[3]], [out])]
    else:
        nodes = [helper.make_node(spec.op_type, names, [out], domain=spec.domain, **attrs)]
    if spec.activation is not None:
        nodes += activation_nodes(spec.activation, spec.activation_params, "pre", inits, opset=STANDALONE_OPSET)
    return OnnxFragment(nodes, inits)
