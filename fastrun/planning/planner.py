"""Graph + timings -> search problem -> Plan.

This is the only place that knows both the graph and the search: it turns every node into
choices (heavy nodes: each implementation that passed its check, with its measured time; light
nodes: onnxruntime in each format the op supports, with its measured time), every tensor into
reorder costs, solves the assignment exactly and writes the result down as a :class:`Plan`.
Without a profiler it builds the heuristic plan: each heavy node's top-ranked implementation.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from fastrun.planning import costmodel, search
from fastrun.planning.problem import Assignment, Choice, SearchNode, SearchProblem, evaluate, restricted
from fastrun.planning.problem import greedy as greedy_assignment
from fastrun.ops import formats, registry
from fastrun.ir.graph import Graph, Node, spec_for_node
from fastrun.system.ortutil import default_threads
from fastrun.runtime.plan import LIGHT_IMPL, NodeChoice, Plan
from fastrun.measure.auxiliary import AuxiliaryTimer
from fastrun.measure.checking import tolerance
from fastrun.measure.profiler import Profiler, Timing
from fastrun.ops.registry import OpSpec
from fastrun.ops import layout_ops
from fastrun.ops import builtin  # noqa: F401  (registers the built-in implementations this module queries)

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass
class HeavyNode:
    node: Node
    spec: OpSpec
    impls: list[registry.Implementation]


# Exact mode keeps a candidate whose measured error is at most this share of the usual tolerance
# (measure.checking.tolerance: 1e-4 x sqrt(reduction / 64) in float32). Measured on VGG-19's first two
# convolutions (reductions 27 and 576; limits 1e-6 and 3e-6): direct evaluation in another order
# (onnxruntime's NCHWc kernels, im2col GEMM) 0-8.4e-7; Winograd F(4,3) 3.4e-6-9.9e-6, F(6,3)
# 5.6e-6-1.2e-5. F(2,3) measured 2.7e-7-4.4e-7: implementations also declare exactness.
EXACT_SHARE = 0.01


def exact_limit(spec: OpSpec) -> float:
    """The largest measured relative error an exact-mode candidate of ``spec`` may have."""
    return EXACT_SHARE * tolerance(spec)


def heavy_nodes(graph: Graph, exact: bool = False) -> list[HeavyNode]:
    """Nodes that have registered implementations (the ones fastrun selects for); ``exact`` keeps
    only the implementations declared exact."""
    heavy_types = registry.heavy_op_types()
    out = []
    for node in graph.nodes:
        if node.op_type not in heavy_types or node.domain:
            continue
        spec = spec_for_node(node, graph)
        impls = [i for i in registry.candidates(spec) if i.exact or not exact]
        if impls:
            out.append(HeavyNode(node, spec, impls))
    return out


def _heavy_choice(impl: registry.Implementation, spec: OpSpec, cost: float) -> Choice:
    return Choice(impl.id, impl.input_formats(spec), registry.resolve_format(impl.out_format), cost)


def light_formats(node: Node, graph: Graph, allowed: set[str]) -> list[str]:
    """Formats a light node may run in: NCHW always, others where layout_ops supports them."""
    try:
        extra = layout_ops.light_formats(node, graph)
    except Exception as exc:  # an unexpected node shape must not stop planning
        log.debug("light_formats(%s) raised %s", node.name, exc)
        extra = []
    return [formats.NCHW] + [f for f in extra if f in allowed and f != formats.NCHW]


# Share of the heavy nodes' estimated time that host kernels must save before the no-profile plan
# leaves onnxruntime's whole-model session (see heuristic_plan).
HEURISTIC_MIN_GAIN = 0.05


def heuristic_plan(graph: Graph, fingerprint: str, exact: bool = False) -> Plan:
    """The no-profile plan: the heuristic assignment where its host kernels are predicted to save
    at least HEURISTIC_MIN_GAIN (e.g. Winograd on VGG's deep layers), else the whole model on
    onnxruntime.

    Rules read off the light models' profiles: assignments of onnxruntime's own kernels, chosen
    without measurements, ran 0.74-1.03x the whole model on onnxruntime (DenseNet-121 lowest;
    the median 1.00), so without a predicted win the heuristic does not second-guess its layouts;
    and a few host kernels predicted to win narrowly (Winograd on five of ResNet-50's 256@14
    layers at batch 8, 1% of its time) lose more than that to the sessions they split.
    """
    plan = make_plan(graph, fingerprint, None, exact=exact)
    if host_gain(graph, plan) >= HEURISTIC_MIN_GAIN:
        return plan
    return whole_model_plan(graph, plan) or plan


def host_gain(graph: Graph, plan: Plan) -> float:
    """Estimated share of the heavy nodes' time (on onnxruntime's kernels) that ``plan``'s host
    kernels save (cost model estimates); 0 without enumerating candidates when it has none."""
    host = {n.name for n in plan.nodes if n.spec and not registry.by_id(n.op_type, n.impl).is_onnxruntime_kernel}  # spec: heavy
    if not host:
        return 0.0
    total = saved = 0.0
    for h in heavy_nodes(graph):
        onnx_ms = [costmodel.impl_ms(i, h.spec) for i in h.impls if i.is_onnxruntime_kernel]
        if not onnx_ms:
            continue
        total += min(onnx_ms)
        if h.node.name in host:
            impl = registry.by_id(h.node.op_type, plan.node(h.node.name).impl)
            saved += min(onnx_ms) - costmodel.impl_ms(impl, h.spec)
    return saved / total if total else 0.0


def whole_model_plan(graph: Graph, plan: Plan) -> Optional[Plan]:
    """``plan`` handed back to onnxruntime: every node on its own kernel in NCHW, run as one
    ORT_ENABLE_ALL session whose layout transformer and fusions decide the rest.

    The one candidate no per-operator choice covers: onnxruntime's graph-wide rewrites (its NCHWc
    transformer fuses across nodes an assignment keeps apart) can win end to end where every
    operator measured no faster alone. None if some heavy node has no onnxruntime kernel.
    """
    ort_impl = {}
    for h in heavy_nodes(graph):
        impl = registry.onnxruntime_nchw_kernel(h.impls)
        if impl is None:
            return None
        ort_impl[h.node.name] = impl.id
    nodes = []
    for n in plan.nodes:
        impl = ort_impl.get(n.name, LIGHT_IMPL)
        ms = n.candidates.get(impl) if impl != LIGHT_IMPL else n.time_ms
        nodes.append(dataclasses.replace(n, impl=impl, in_formats=[formats.NCHW] * len(n.in_formats),
                                         out_format=formats.NCHW, time_ms=ms if isinstance(ms, float) else None))
    return dataclasses.replace(plan, nodes=nodes, tensor_formats={t: formats.NCHW for t in plan.tensor_formats},
                               reorders=[], segment_threads=[], whole_model=True)


def make_plan(graph: Graph, fingerprint: str, profiler: Optional[Profiler] = None,
              allowed_formats: Optional[set[str]] = None, progress: Optional[Progress] = None,
              assignment: str = "optimal", exact: bool = False, onnx_kernels: bool = False) -> Plan:
    """The plan for ``graph``: profiled (with a profiler) or heuristic (without).

    ``assignment="heuristic"`` with a profiler keeps the heuristic choices but prices them with
    the measured costs: the alternative that end-to-end verification compares against.
    ``onnx_kernels`` chooses among onnxruntime's kernels only (its own and ONNX fragments such as
    ``winograd_onnx``): a plan with no host step, one session that no host kernel splits.
    ``exact`` runs only exact implementations whose measured error is within :func:`exact_limit`.
    """
    allowed = set(allowed_formats or formats.machine_formats())
    heavy = {h.node.name: h for h in heavy_nodes(graph, exact)}
    timings: dict[str, dict[str, Timing]] = {}
    if profiler is not None:
        specs: dict[str, HeavyNode] = {}
        for h in heavy.values():
            specs.setdefault(h.spec.key(), h)
        for i, (key, h) in enumerate(specs.items()):
            if progress:
                progress(f"[{i + 1}/{len(specs)}] {h.node.op_type} {h.spec.describe()}")
            timings[key] = profiler.profile(h.spec, h.impls)
    aux = AuxiliaryTimer(profiler) if profiler is not None else None
    dispatch = aux.dispatch() if aux else 0.0

    nodes = []
    outer_reads = graph.outer_reads()  # read by name inside subgraphs: produced in NCHW under that name
    for node in graph.nodes:
        runtime = graph.runtime_inputs(node)
        h = heavy.get(node.name)
        if h is not None:
            choices = _heavy_choices(h, timings.get(h.spec.key(), {}), allowed, dispatch, exact, onnx_kernels)
        else:
            choices = []
            for fmt in light_formats(node, graph, allowed):
                cost = aux.light(node, graph, fmt) if aux else costmodel.light_ms(node, graph, fmt)
                if cost is None and fmt != formats.NCHW:
                    continue
                choices.append(Choice(LIGHT_IMPL, (fmt,) * len(runtime), fmt, _in_segment(cost or 0.0, dispatch)))
        if outer_reads.intersection(node.outputs):
            choices = [c for c in choices if c.out_format == formats.NCHW] or choices
        nodes.append(SearchNode(node.name, runtime, [t for t in node.outputs if t], choices))

    problem = SearchProblem(nodes, {t: formats.NCHW for t in graph.inputs},
                            {t: formats.NCHW for t in graph.outputs if t not in graph.constants},
                            _reorder_costs(graph, nodes, aux, dispatch))
    if progress:
        progress("solving the format assignment")
    if assignment == "heuristic" and profiler is not None:
        result = evaluate(problem, _choices_like(problem, make_plan(graph, fingerprint, None, allowed, exact=exact)))
    else:
        result = search.solve(problem)
    greedy = nchw_only = None
    if profiler is not None:
        greedy = greedy_assignment(problem)
        try:
            nchw_only = search.solve(restricted(problem, {formats.NCHW}))
        except Exception as exc:
            log.debug("NCHW-only baseline unavailable: %s", exc)
            nchw_only = None

    plan = _to_plan(graph, fingerprint, problem, result, heavy, timings, greedy, nchw_only,
                    partial=profiler is not None and profiler.stats.skipped_budget > 0,
                    profiled=profiler is not None)
    plan.exact = exact
    return plan


def _choices_like(problem: SearchProblem, plan: Plan) -> dict[str, int]:
    """Indices of ``plan``'s choices in ``problem`` (the cheapest choice where it has none)."""
    picked = {}
    for sn in problem.nodes:
        want = plan.node(sn.name)
        same = [i for i, c in enumerate(sn.choices) if c.impl == want.impl and c.out_format == want.out_format
                and list(c.in_formats) == list(want.in_formats)]
        picked[sn.name] = same[0] if same else min(range(len(sn.choices)), key=lambda i: sn.choices[i].cost)
    return picked


def _in_segment(standalone_ms: float, dispatch: float) -> float:
    """Cost of an ONNX node inside a merged segment, from its standalone one-node time."""
    return max(standalone_ms - dispatch, 0.1 * standalone_ms)


def _heavy_choices(h: HeavyNode, timings: dict[str, Timing], allowed: set[str],
                   dispatch: float = 0.0, exact: bool = False, onnx_kernels: bool = False) -> list[Choice]:
    """The node's choices; ``onnx_kernels``: onnxruntime's kernels only, where the node has one
    (the plan still records every candidate's timing)."""
    impls = [i for i in h.impls if i.is_onnxruntime_kernel] if onnx_kernels else []
    impls = impls or h.impls
    by_id = {impl.id: impl for impl in impls}
    choices = []
    for impl_id, t in timings.items():
        impl = by_id.get(impl_id)
        if impl is None or not t.ok or (exact and t.error > exact_limit(h.spec)):
            continue
        cost = _in_segment(t.time_ms, dispatch) if impl.is_onnxruntime_kernel else t.time_ms + dispatch
        c = _heavy_choice(impl, h.spec, cost)
        if c.out_format in allowed and all(f in allowed for f in c.in_formats):
            choices.append(c)
    if not choices:  # unprofiled (heuristic or out of budget): estimated costs, never a known failure
        for impl in impls:
            if impl.id in timings and not timings[impl.id].ok:
                continue
            c = _heavy_choice(impl, h.spec, costmodel.impl_ms(impl, h.spec))
            if c.out_format in allowed and all(f in allowed for f in c.in_formats):
                choices.append(c)
    return choices


def _reorder_costs(graph: Graph, nodes: list[SearchNode], aux: Optional[AuxiliaryTimer],
                   dispatch: float = 0.0) -> dict[str, dict[str, float]]:
    """Reorder cost of every format pair a tensor might need (measured per shape, cached)."""
    involved: dict[str, set[str]] = {}
    for n in nodes:
        for c in n.choices:
            for t, f in zip(n.inputs, c.in_formats):
                involved.setdefault(t, set()).add(f)
            for t in n.outputs:
                involved.setdefault(t, set()).add(c.out_format)
    costs: dict[str, dict[str, float]] = {}
    for t, fmts in involved.items():
        fmts = fmts | {formats.NCHW}
        if len(fmts) < 2 or t not in graph.tensors:
            continue
        shape = graph.tensors[t].shape
        costs[t] = {}
        for src in fmts:
            for dst in fmts:
                if src == dst or not (formats.applicable(shape, src) and formats.applicable(shape, dst)):
                    continue
                ms = aux.reorder(shape, src, dst, graph.tensors[t].dtype) if aux \
                    else costmodel.reorder_ms(int(np.prod(shape)))
                if ms is not None:
                    costs[t][f"{src}>{dst}"] = _in_segment(ms, dispatch)
    return costs


def _to_plan(graph: Graph, fingerprint: str, problem: SearchProblem, result: Assignment,
             heavy: dict[str, HeavyNode], timings: dict[str, dict[str, Timing]],
             greedy: Optional[Assignment], nchw_only: Optional[Assignment],
             partial: bool, profiled: bool) -> Plan:
    op_types = {n.name: n.op_type for n in graph.nodes}
    choices = []
    for sn in problem.nodes:
        c = sn.choices[result.choices[sn.name]]
        nc = NodeChoice(name=sn.name, op_type=op_types[sn.name], impl=c.impl,
                        in_formats=list(c.in_formats), out_format=c.out_format,
                        time_ms=c.cost if profiled else None, source="heuristic")
        h = heavy.get(sn.name)
        if h is not None:
            t = timings.get(h.spec.key(), {})
            nc.spec, nc.spec_key = h.spec.describe(), h.spec.key()
            nc.candidates = {k: (round(v.time_ms, 4) if v.ok else f"failed: {v.reason}") for k, v in t.items()}
            nc.errors = {k: float(f"{v.error:.3g}") for k, v in t.items() if v.ok}
            ok = sorted((v.time_ms, k) for k, v in t.items() if v.ok)
            if ok:
                nc.source = "profiled"
                if c.impl in t:
                    nc.time_ms = t[c.impl].time_ms  # the standalone measurement, comparable with ort_ms
                others = [(ms, k) for ms, k in ok if k != c.impl]
                if others:
                    nc.runner_up_ms, nc.runner_up = others[0]
                ort = [v.time_ms for k, v in t.items() if v.ok and registry.is_onnxruntime_kernel(nc.op_type, k)]
                nc.ort_ms = min(ort) if ort else None
            elif profiled:
                nc.time_ms = None
        elif profiled:
            nc.source = "profiled"
        choices.append(nc)
    solver = {"status": result.status, "gap": result.gap, "seconds": result.seconds, "method": result.method,
              "lower_bound": result.lower_bound,
              "greedy_reorders": len(greedy.reorders) if greedy else None,
              "nchw_only_reorders": len(nchw_only.reorders) if nchw_only else None}
    policy = "heuristic" if not profiled else ("partial" if partial else "profiled")
    return Plan(model_hash=graph.model_hash, model_name=graph.name, fingerprint=fingerprint,
                input_shapes={k: list(v) for k, v in graph.input_shapes().items()}, nodes=choices,
                tensor_formats=dict(result.formats), reorders=[list(r) for r in result.reorders],
                predicted_ms=result.cost if profiled else None,
                greedy_ms=greedy.cost if greedy else None,
                nchw_only_ms=nchw_only.cost if nchw_only else None,
                solver=solver if profiled else {}, threads=default_threads(), policy=policy)
