"""Is a plan from the cache one that fastrun itself could have made for this graph?

A cached plan is foreign data: its schema, model hash and fingerprint may all match while its
content is damaged or edited by hand. Running it would then raise at serving time (a tensor never
produced in the format a node reads) or, worse, compute a wrong answer (an implementation that
does not apply to the node's shapes). :func:`plan_problem` checks, without building anything,
the contract between the planner and the executor:

* every node of the graph has exactly one choice; heavy nodes name a registered implementation,
  of the same version, that accepts the node's :class:`~fastrun.ops.registry.OpSpec`, with exactly
  that implementation's input and output formats; light nodes run as ONNX in one format that
  :mod:`fastrun.ops.layout_ops` supports for them (NCHW always);
* every format is a format; graph inputs arrive in NCHW; each tensor is produced in the format
  the plan says; every reorder starts from a format the tensor exists in; every node input and
  graph output is available in the format it is read in.

A plan that fails is ignored (the caller logs why once and uses the heuristic plan).
"""
from __future__ import annotations

from typing import Optional

from fastrun.ops import formats, registry
from fastrun.ir.graph import Graph, spec_for_node
from fastrun.runtime import engines
from fastrun.runtime.plan import LIGHT_IMPL, Plan
from fastrun.ops import layout_ops
from fastrun.ops import builtin  # noqa: F401  (registers the built-in implementations this module queries)


def plan_problem(graph: Graph, plan: Plan) -> Optional[str]:
    """Why ``plan`` must not run ``graph`` (None: it may)."""
    try:
        return _problem(graph, plan)
    except Exception as exc:  # a plan damaged in a way not foreseen below is still just unusable
        return f"it is malformed ({type(exc).__name__}: {exc})"


def _fmt_ok(f) -> bool:
    return isinstance(f, str) and formats.is_valid(f)


def _problem(graph: Graph, plan: Plan) -> Optional[str]:
    if plan.runs_original:  # the original model runs as is: nothing of the graph's to check
        return None if plan.engine in engines.names() else f"it names an unknown engine {plan.engine!r}"
    choices = {c.name: c for c in plan.nodes}
    if len(choices) != len(plan.nodes) or set(choices) != {n.name for n in graph.nodes}:
        return "its nodes do not match the model's"
    if not isinstance(plan.tensor_formats, dict) or not isinstance(plan.reorders, list):
        return "its tensor formats or reorders are malformed"
    if not isinstance(plan.whole_model, bool):
        return f"whole_model is {plan.whole_model!r}, not true or false"
    if plan.whole_model and (plan.reorders or any(f != formats.NCHW for f in plan.tensor_formats.values())):
        return "a whole-model plan must keep every tensor in NCHW"
    produced = {t: formats.NCHW for t in graph.inputs}
    for t, f in plan.tensor_formats.items():
        if not _fmt_ok(f):
            return f"tensor {t!r} has format {f!r}"
        if t in graph.inputs and f != formats.NCHW:
            return f"graph input {t!r} is said to arrive in {f}"
        produced[t] = f
    available = {(t, f) for t, f in produced.items()}
    pending = list(plan.reorders)
    while pending:  # reorders may start from the result of another reorder
        progress = False
        for r in list(pending):
            if not (isinstance(r, list) and len(r) == 3 and all(isinstance(x, str) for x in r)):
                return f"reorder {r!r} is malformed"
            t, src, dst = r
            if t not in graph.tensors or not _fmt_ok(src) or not _fmt_ok(dst):
                return f"reorder {r!r} names an unknown tensor or format"
            if not formats.applicable(graph.tensors[t].shape, dst):
                return f"reorder {r!r}: {dst} does not apply to shape {list(graph.tensors[t].shape)}"
            if (t, src) in available:
                available.add((t, dst))
                pending.remove(r)
                progress = True
        if not progress:
            return f"reorder {pending[0]!r} starts from a format the tensor never has"
    heavy_types = registry.heavy_op_types()
    for node in graph.nodes:
        c = choices[node.name]
        runtime = graph.runtime_inputs(node)
        if not isinstance(c.in_formats, list) or len(c.in_formats) != len(runtime) or not _fmt_ok(c.out_format):
            return f"node {node.name!r} has malformed formats"
        for t, f in zip(runtime, c.in_formats):
            if (t, f) not in available:
                return f"node {node.name!r} reads {t!r} in {f}, which the plan never provides"
        for t in node.outputs:
            if t and produced.get(t, formats.NCHW) != c.out_format:
                return f"node {node.name!r} writes {t!r} in {c.out_format}, the plan says {produced.get(t, formats.NCHW)}"
        if c.impl == LIGHT_IMPL:
            if node.op_type in heavy_types and not node.domain and registry.candidates(spec_for_node(node, graph)):
                return f"node {node.name!r} ({node.op_type}) must run a registered implementation"
            if any(f != c.out_format for f in c.in_formats):
                return f"light node {node.name!r} mixes formats"
            if c.out_format != formats.NCHW:
                if c.out_format not in layout_ops.light_formats(node, graph):
                    return f"node {node.name!r} ({node.op_type}) cannot run in {c.out_format}"
            continue
        if node.op_type not in heavy_types or node.domain or not isinstance(c.impl, str):
            return f"node {node.name!r} ({node.op_type}) has no implementation {c.impl!r}"
        try:
            impl = registry.by_id(node.op_type, c.impl)
        except KeyError as exc:
            return str(exc).strip("'\"")
        spec = spec_for_node(node, graph)
        if not impl.accepts(spec):
            return f"implementation {c.impl} does not apply to node {node.name!r} ({spec.describe()})"
        if tuple(c.in_formats) != tuple(impl.input_formats(spec)) or \
                c.out_format != registry.resolve_format(impl.out_format):
            return f"node {node.name!r}: {c.impl} reads/writes other formats than the plan says"
    for t in graph.outputs:
        if t not in graph.constants and (t, formats.NCHW) not in available:
            return f"graph output {t!r} is never available in NCHW"
    return None
