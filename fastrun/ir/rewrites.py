"""Rewrites of a loaded graph: constant folding, inference no-ops, BatchNorm and affine folding, fusions.

Each keeps the graph's outputs exactly as onnxruntime computes them and leaves shapes inferred.
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import onnx
from onnx import helper

from fastrun.system import ortutil
from fastrun.errors import ModelError
from fastrun.ir.graph import (FUSABLE_ACTIVATIONS, Graph, Node, first_line, is_quantized_op, quiet_run_options, to_proto,
                              toposort)

log = logging.getLogger(__name__)

# Ops whose output differs between runs: never folded even with constant inputs.
NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


def fold_constants(nodes: list[Node], constants: dict[str, np.ndarray], outputs: list[str],
                   opsets: dict[str, int]) -> tuple[list[Node], dict[str, np.ndarray]]:
    """Evaluate every node whose inputs are all constant, with onnxruntime, in one session."""
    const_names = set(constants)
    folded, kept = [], []
    for node in nodes:
        if node.op_type not in NONDETERMINISTIC and all((not t) or t in const_names for t in node.inputs) \
                and not _has_subgraph(node) and not is_quantized_op(node.op_type):
            folded.append(node)
            const_names.update(node.outputs)
        else:
            kept.append(node)
    if not folded:
        return nodes, constants
    needed = {t for node in kept for t in node.reads if t} | set(outputs)
    wanted = [t for node in folded for t in node.outputs if t in needed]
    fold_inputs = {t for node in folded for t in node.inputs}
    if wanted:
        _check_constant_sizes(folded, constants)
        model = ortutil.make_model([to_proto(n) for n in folded], [], [helper.make_empty_tensor_value_info(t) for t in wanted],
                                   {k: v for k, v in constants.items() if k in fold_inputs}, opsets)
        try:
            values = ortutil.session(model, level="disable").run(wanted, {}, quiet_run_options())
        except Exception as exc:
            raise ModelError(f"cannot evaluate the model's constant sub-graph: {first_line(exc)}") from None
        constants = dict(constants)
        constants.update(zip(wanted, values))
    log.debug("folded %d constant nodes", len(folded))
    used = {t for node in kept for t in node.reads} | set(outputs)
    return kept, {k: v for k, v in constants.items() if k in used}


MAX_CONSTANT_BYTES = 2 << 30  # no tensor of a valid ONNX file is larger (protobuf's limit)


def _check_constant_sizes(folded: list[Node], constants: dict[str, np.ndarray]) -> None:
    """Refuse constants a model would build far beyond any real weight (before allocating them)."""
    for node in folded:
        if node.op_type not in ("ConstantOfShape", "Expand") or node.domain:
            continue
        shape_input = node.inputs[0] if node.op_type == "ConstantOfShape" else node.inputs[1] if len(node.inputs) > 1 else ""
        dims = constants.get(shape_input)
        if dims is None or dims.dtype.kind not in "iu":
            continue
        dims = [int(d) for d in np.asarray(dims).reshape(-1)]
        if any(d < 0 for d in dims):
            raise ModelError(f"node {node.name!r} ({node.op_type}) has a negative dimension in its shape {dims}")
        size = 8
        for d in dims:
            size *= d
        if size > MAX_CONSTANT_BYTES:
            raise ModelError(f"node {node.name!r} ({node.op_type}) would build a constant of shape {dims} "
                             f"(over {MAX_CONSTANT_BYTES >> 30} GiB)")


def _has_subgraph(node: Node) -> bool:
    return any(isinstance(v, onnx.GraphProto) or (isinstance(v, list) and v and isinstance(v[0], onnx.GraphProto))
               for v in node.attrs.values())


def _rename_input(graph: Graph, old: str, new: str) -> None:
    for node in graph.nodes:
        node.inputs = [new if t == old else t for t in node.inputs]


def remove_identities(graph: Graph) -> None:
    """Dropout (inference) and Identity forward their input unless they produce a graph output."""
    used = {t for node in graph.nodes for t in node.reads} | set(graph.outputs)
    kept_names = set(graph.outputs) | graph.outer_reads()  # names a subgraph reads must stay
    kept = []
    for node in graph.nodes:
        is_noop = node.op_type == "Identity" or (node.op_type == "Dropout" and not any(o in used for o in node.outputs[1:]))
        if is_noop and node.outputs[0] not in kept_names and node.inputs[0] not in graph.constants:
            _rename_input(graph, node.outputs[0], node.inputs[0])
            continue
        kept.append(node)
    graph.nodes = kept


def _single_consumer(graph: Graph, tensor: str, users: dict[str, list[Node]]) -> Optional[Node]:
    if tensor in graph.outputs or len(users.get(tensor, [])) != 1 or tensor in graph.outer_reads():
        return None
    return users[tensor][0]


def _foldable_conv(node: Node, graph: Graph) -> bool:
    """A plain Conv whose weights are constant: its output's scale and bias can fold into them."""
    return node.op_type == "Conv" and not node.domain and len(node.inputs) >= 2 and node.inputs[1] in graph.constants


def _conv_params(conv: Node, graph: Graph) -> tuple[np.ndarray, np.ndarray]:
    """(weights, bias) of a foldable Conv; a zero bias when it has none."""
    w = graph.constants[conv.inputs[1]]
    has_bias = len(conv.inputs) > 2 and conv.inputs[2]
    return w, graph.constants[conv.inputs[2]] if has_bias else np.zeros(w.shape[0], w.dtype)


def _absorb(graph: Graph, conv: Node, follower: Node, w: np.ndarray, b: np.ndarray) -> None:
    """Give ``conv`` new weights and bias, in its weights' own element type (float16 stays float16),
    and make it produce ``follower``'s output."""
    dtype = graph.constants[conv.inputs[1]].dtype
    w_name, b_name = f"{conv.name}/{follower.name}/W", f"{conv.name}/{follower.name}/B"
    graph.constants[w_name], graph.constants[b_name] = w.astype(dtype, copy=False), b.astype(dtype)
    conv.inputs = [conv.inputs[0], w_name, b_name]
    conv.outputs = [o for o in follower.outputs if o][:1]


def fold_batchnorm(graph: Graph) -> None:
    """Conv -> BatchNormalization (inference) becomes one Conv with scaled weights and a bias."""
    users = graph.consumers()
    removed = set()
    for conv in graph.nodes:
        if not _foldable_conv(conv, graph):
            continue
        bn = _single_consumer(graph, conv.outputs[0], users)
        if bn is None or bn.op_type != "BatchNormalization" or len([o for o in bn.outputs if o]) != 1:
            continue
        if bn.attrs.get("training_mode", 0) or not all(t in graph.constants for t in bn.inputs[1:5]):
            continue
        scale, bias, mean, var = (graph.constants[t].astype(np.float64) for t in bn.inputs[1:5])
        w, b = _conv_params(conv, graph)
        factor = scale / np.sqrt(var + bn.attrs.get("epsilon", 1e-5))
        # The per-channel factor in float64, the weights scaled in their own precision (one
        # rounding, as onnxruntime's fusion): a float64 copy of ResNet-50's weights cost 25 ms at load.
        # float16 weights are scaled in float32 and rounded once, back to float16.
        work = np.float32 if w.dtype == np.float16 else w.dtype
        w_scaled = w.astype(work, copy=False) * factor.astype(work).reshape(-1, *([1] * (w.ndim - 1)))
        _absorb(graph, conv, bn, w_scaled, (b.astype(np.float64) - mean) * factor + bias)
        removed.add(id(bn))
    graph.nodes = [n for n in graph.nodes if id(n) not in removed]


def fold_channel_affine(graph: Graph) -> None:
    """Conv -> Mul/Add by a per-output-channel constant (as BN-style scale/bias) folds into Conv."""
    users = graph.consumers()
    removed = set()
    for conv in graph.nodes:
        if not _foldable_conv(conv, graph):
            continue
        while True:
            nxt = _single_consumer(graph, conv.outputs[0], users)
            if nxt is None or nxt.op_type not in ("Mul", "Add") or nxt.domain or len(nxt.inputs) != 2:
                break
            other = nxt.inputs[1] if nxt.inputs[0] == conv.outputs[0] else nxt.inputs[0]
            w, b = _conv_params(conv, graph)
            per_channel = _per_channel(graph.constants.get(other), w.shape[0], len(graph.tensors[conv.outputs[0]].shape))
            if per_channel is None or other == conv.outputs[0]:
                break
            if nxt.op_type == "Mul":
                w, b = w * per_channel.reshape(-1, *([1] * (w.ndim - 1))), b * per_channel
            else:
                b = b + per_channel
            _absorb(graph, conv, nxt, w, b)
            removed.add(id(nxt))
    graph.nodes = [n for n in graph.nodes if id(n) not in removed]


def _per_channel(value: Optional[np.ndarray], channels: int, rank: int) -> Optional[np.ndarray]:
    """A constant that broadcasts against [N, K, ...] only along K (or is a scalar), as a [K] vector."""
    if value is None or value.dtype not in (np.float32, np.float16) or value.ndim > rank:
        return None
    shape = (1,) * (rank - value.ndim) + value.shape
    if shape[0] != 1 or any(d != 1 for d in shape[2:]) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(value.reshape(-1), (channels,)).astype(np.float32)


def fuse_residual_adds(graph: Graph) -> None:
    """Conv -> Add(Conv output, residual) becomes one Conv with the residual as input 3.

    Kernels that accumulate into their output (onnxruntime's FusedConv and NCHWc Conv) then skip
    a full pass over the tensor; the activation that follows the Add fuses as usual. When both
    operands come from Convs, the later one takes the residual (the other is computed first).
    """
    users = graph.consumers()
    producer = graph.producer()
    order = {node.name: i for i, node in enumerate(graph.nodes)}
    removed = set()
    for add in graph.nodes:
        if add.op_type not in ("Add", "Sum") or add.domain or len(add.inputs) != 2 or add.inputs[0] == add.inputs[1]:
            continue
        convs = [producer.get(t) for t in add.inputs]
        best = None
        for k, conv in enumerate(convs):
            other = add.inputs[1 - k]
            if conv is None or not _foldable_conv(conv, graph) or conv.activation or len(conv.inputs) > 3 \
                    or other in graph.constants or other not in graph.tensors \
                    or _single_consumer(graph, conv.outputs[0], users) is not add \
                    or graph.tensors[other].shape != graph.tensors[conv.outputs[0]].shape:
                continue
            if best is None or order[conv.name] > order[best[0].name]:
                best = (conv, other)
        if best is None:
            continue
        conv, other = best
        if len(conv.inputs) < 3 or not conv.inputs[2]:
            zero = f"{conv.name}/zero_bias"
            graph.constants[zero] = np.zeros(graph.constants[conv.inputs[1]].shape[0], np.float32)
            conv.inputs = conv.inputs[:2] + [zero]
        conv.inputs = conv.inputs + [other]
        conv.outputs = list(add.outputs)
        removed.add(id(add))
    graph.nodes = [n for n in graph.nodes if id(n) not in removed]
    if removed:
        graph.nodes = toposort(graph.nodes, set(graph.inputs) | set(graph.constants))


def fuse_activations(graph: Graph) -> None:
    """Conv followed by its only consumer Relu/Clip/... computes the activation itself."""
    users = graph.consumers()
    removed = set()
    for conv in graph.nodes:
        if conv.op_type != "Conv" or conv.domain or conv.activation:
            continue
        act = _single_consumer(graph, conv.outputs[0], users)
        if act is None or act.op_type not in FUSABLE_ACTIVATIONS or act.domain:
            continue
        params = _activation_params(act, graph)
        if params is None:
            continue
        conv.activation, conv.activation_params = act.op_type, params
        conv.outputs = list(act.outputs)
        removed.add(id(act))
    graph.nodes = [n for n in graph.nodes if id(n) not in removed]


def _activation_params(act: Node, graph: Graph) -> Optional[tuple]:
    if act.op_type == "Clip":
        lo, hi = act.attrs.get("min", -3.4028234663852886e38), act.attrs.get("max", 3.4028234663852886e38)
        extra = act.inputs[1:]
        for i, t in enumerate(extra):
            if not t:
                continue
            if t not in graph.constants:
                return None
            value = float(graph.constants[t])
            lo, hi = (value, hi) if i == 0 else (lo, value)
        return (float(lo), float(hi))
    if act.op_type == "LeakyRelu":
        return (float(act.attrs.get("alpha", 0.01)),)
    return ()


def drop_unused_constants(graph: Graph) -> None:
    used = {t for node in graph.nodes for t in node.reads} | set(graph.outputs)
    graph.constants = {k: v for k, v in graph.constants.items() if k in used}
