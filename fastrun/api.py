"""The library's entry points: profile a model, find its cached plan.

These only wire the stages together (graph -> planner (profile + search) -> plan -> executor);
the CLI and :class:`fastrun.InferenceSession` call them.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from . import benchmark, executor, fingerprint as fp, graph as graph_mod, ortutil, planner, registry
from .cache import Caches
from .graph import Graph, ModelSource
from .plan import Plan
from .profiler import DEFAULT_OP_LIMIT, Profiler, Stats

log = logging.getLogger(__name__)

# Whole-model outputs must match onnxruntime's within this (max abs error relative to max |ref|).
MODEL_TOLERANCE = 1e-3


@dataclass
class ProfileReport:
    """Everything ``fastrun profile`` prints or writes with ``--json``."""

    model: str
    plan: Plan
    stats: Stats
    seconds: float
    measured_ms: Optional[float] = None
    onnxruntime_ms: Optional[float] = None
    max_error: Optional[float] = None
    segments: int = 0
    host_steps: int = 0
    reorders: int = 0
    edges: dict = field(default_factory=dict)  # node name -> {"inputs": runtime input tensors, "outputs": [...]}

    @property
    def speedup(self) -> Optional[float]:
        if self.measured_ms and self.onnxruntime_ms:
            return self.onnxruntime_ms / self.measured_ms
        return None

    def to_json(self) -> dict:
        plan = self.plan
        ceiling = kernel_ceiling(plan)
        return {
            "model": self.model,
            "fingerprint": plan.fingerprint,
            "fingerprint_fields": fp.describe(),
            "input_shapes": plan.input_shapes,
            "policy": plan.policy,
            "nodes": [{"name": n.name, "op_type": n.op_type, "impl": n.impl, "time_ms": n.time_ms,
                       "in_formats": n.in_formats, "out_format": n.out_format, "spec": n.spec,
                       "source": n.source, "ort_ms": n.ort_ms, "runner_up": n.runner_up,
                       "runner_up_ms": n.runner_up_ms, "candidates": n.candidates, **self.edges.get(n.name, {})}
                      for n in plan.nodes],
            "predicted_ms": plan.predicted_ms,
            "measured_ms": self.measured_ms,
            "onnxruntime_ms": self.onnxruntime_ms,
            "speedup": self.speedup,
            "greedy_ms": plan.greedy_ms,
            "nchw_only_ms": plan.nchw_only_ms,
            "reorders": len(plan.reorders),
            "reorder_list": plan.reorders,
            "solver": plan.solver,
            "threads": plan.threads,
            "segment_threads": plan.segment_threads,
            "host_threads": plan.host_threads,
            "whole_model": plan.whole_model,
            "kernel_ceiling_ms": list(ceiling) if ceiling else None,
            "max_error": self.max_error,
            "segments": self.segments,
            "host_steps": self.host_steps,
            "profiled_now": self.stats.measured,
            "from_cache": self.stats.from_cache,
            "specs_measured": self.stats.specs_measured,
            "specs_cached": self.stats.specs_cached,
            "skipped_budget": self.stats.skipped_budget,
            "unmeasured": [list(u) for u in self.stats.unmeasured],
            "failed": [list(f) for f in self.stats.failed],
            "seconds": self.seconds,
        }


def kernel_ceiling(plan: Plan) -> Optional[tuple[float, float]]:
    """(fastest candidate, fastest onnxruntime kernel) of every profiled node of ``plan``, summed.

    The most choosing kernels can gain on this model and machine, before reorders and split
    sessions are paid, and before onnxruntime's whole-graph fusions are counted against it:
    when the two sums are close, no plan will beat onnxruntime by much.
    """
    best = ort = 0.0
    for n in plan.nodes:
        times = {k: v for k, v in n.candidates.items() if isinstance(v, (int, float))}
        ort_times = [v for k, v in times.items() if _is_onnxruntime_kernel(n.op_type, k)]
        if ort_times:
            best += min(times.values())
            ort += min(ort_times)
    return (best, ort) if ort else None


def _is_onnxruntime_kernel(op_type: str, impl_id: str) -> bool:
    try:
        return registry.by_id(op_type, impl_id).kind == "onnx"
    except KeyError:  # no longer registered: not onnxruntime's
        return False


def find_plan(caches: Caches, fingerprint: str, graph: Graph) -> Optional[Plan]:
    """The cached plan for this graph's model and input shapes, if one exists and is valid."""
    plan = stored_plan(caches, fingerprint, graph.model_hash, graph.input_shapes(), graph.name)
    if plan is None:
        return None
    from .plancheck import plan_problem

    why = plan_problem(graph, plan) or _mismatch(plan, graph)
    if why:
        log.warning("ignoring the cached plan for %s: %s", graph.name, why)
        return None
    return plan


def stored_plan(caches: Caches, fingerprint: str, model_hash: str, shapes: Mapping[str, Sequence[int]],
                label: str = "the model") -> Optional[Plan]:
    """The cached plan for a model hash and input shapes, checked against everything but the graph
    (versions, machine, registered implementations); :func:`find_plan` checks the graph too."""
    value = caches.plans.get(Caches.plan_key(fingerprint, model_hash, {k: tuple(v) for k, v in shapes.items()}))
    if value is None:
        return None
    try:
        plan = Plan.from_json(value)
    except (TypeError, ValueError, KeyError) as exc:
        log.warning("ignoring a corrupt cached plan for %s: %s", label, exc)
        return None
    why = plan.stale_reason(model_hash, fingerprint) or implementation_change(plan)
    if why:
        log.warning("ignoring the cached plan for %s: %s", label, why)
        return None
    return plan


def _mismatch(plan: Plan, graph: Graph) -> Optional[str]:
    names = {n.name for n in graph.nodes}
    if {n.name for n in plan.nodes} != names:
        return "its nodes do not match the model's"
    return None


def implementation_change(plan: Plan) -> Optional[str]:
    """Why the plan's implementations no longer match the registry's (None: they all do)."""
    from . import registry

    for n in plan.nodes:
        if n.impl == "onnxruntime":
            continue
        try:
            registry.by_id(n.op_type, n.impl)
        except KeyError as exc:
            return str(exc).strip("'\"")
        except (AttributeError, TypeError):  # a damaged plan
            return f"node {n.name!r} names implementation {n.impl!r}"
    return None


def store_plan(caches: Caches, plan: Plan) -> bool:
    shapes = {k: tuple(v) for k, v in plan.input_shapes.items()}
    return caches.plans.set(Caches.plan_key(plan.fingerprint, plan.model_hash, shapes), plan.to_json())


def load_plan(model: ModelSource, input_shapes: Optional[Mapping[str, Sequence[int]]] = None,
              cache_dir: Optional[str] = None) -> Optional[Plan]:
    """The cached plan for a model (None when it has not been profiled on this machine)."""
    graph = graph_mod.load(model, input_shapes)
    caches = Caches(cache_dir, writable=False)
    try:
        return find_plan(caches, fp.fingerprint(), graph)
    finally:
        caches.close()


def random_feed(graph: Graph, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feed = {}
    for name in graph.inputs:
        info = graph.tensors[name]
        if info.dtype.startswith("float"):
            feed[name] = rng.standard_normal(info.shape).astype(info.dtype)
        else:
            feed[name] = np.zeros(info.shape, dtype=info.dtype)
    return feed


def onnxruntime_baseline(graph: Graph, model_bytes: bytes, level: str = "all"):
    """onnxruntime's own session of the original model (same threading policy as ours)."""
    return ortutil.session(model_bytes, level=level)


def relative_error(outs: Sequence[np.ndarray], refs: Sequence[np.ndarray]) -> float:
    worst = 0.0
    for o, r in zip(outs, refs):
        o, r = np.asarray(o, dtype=np.float64), np.asarray(r, dtype=np.float64)
        scale = max(float(np.max(np.abs(r))) if r.size else 0.0, 1e-30)
        worst = max(worst, float(np.max(np.abs(o - r))) / scale if r.size else 0.0)
    return worst


def profile(model: ModelSource, input_shapes: Optional[Mapping[str, Sequence[int]]] = None,
            cache_dir: Optional[str] = None, budget: Optional[float] = None,
            op_limit: float = DEFAULT_OP_LIMIT, progress: Optional[Callable[[str], None]] = None,
            measure: bool = True, repeats: int = 10, verify: bool = True,
            op_timeout: Optional[float] = None, isolate: bool = True, refresh: bool = False) -> ProfileReport:
    """Profile every heavy node (cached signatures are reused), solve, store and measure the plan.

    ``refresh`` measures everything again, ignoring (and then overwriting) cached timings.

    Candidates run in a killable worker process (``isolate``); one that crashes, or whose build
    or single call takes longer than ``op_timeout`` seconds (default
    :data:`fastrun.profiler.DEFAULT_OP_TIMEOUT`), is recorded as failed and never chosen.

    ``verify`` times the optimal assignment against the heuristic one end to end and keeps the
    faster: per-operator timings predict the whole well, not perfectly (caches, segment
    boundaries), and a profiled plan must never be slower than not profiling.
    """
    start = time.perf_counter()
    model_proto, data = graph_mod.read_model(model)
    graph = graph_mod.from_proto(model_proto, data, input_shapes)
    caches = Caches(cache_dir)
    fingerprint = fp.fingerprint()
    profiler = Profiler(caches, fingerprint, budget_s=budget, op_limit_s=op_limit, op_timeout=op_timeout,
                        isolate=isolate, refresh=refresh)
    plan = planner.make_plan(graph, fingerprint, profiler, progress=progress)
    if verify and plan.policy == "profiled":
        if progress:
            progress("verifying the plan end to end against the heuristic assignment")
        plan = verify_plan(graph, plan, profiler, fingerprint, repeats)
        plan = choose_threads(graph, plan, repeats)
    if not store_plan(caches, plan):
        log.warning("the plan could not be stored in %s (read-only?)", caches.root)
    recipe = executor.build_recipe(graph, plan)
    caches.programs.save(plan, recipe, graph_mod.declared_interface(model_proto))
    report = ProfileReport(model=_model_label(model, graph), plan=plan, stats=profiler.stats,
                           seconds=0.0, edges=_edges(graph))
    if measure:
        if progress:
            progress("measuring the plan end to end against onnxruntime")
        _measure(report, graph, executor.instantiate(recipe), data, repeats)
    report.seconds = time.perf_counter() - start
    caches.close()
    return report


def _races(graph: Graph, programs: dict[str, executor.Program], rounds: int, max_seconds: float,
           count: int = 1) -> list[dict[str, float]]:
    """``count`` consecutive interleaved races of programs of one graph on the same random feed (ms)."""
    feed = random_feed(graph)
    runners = {k: (lambda p=p: p.run(feed)) for k, p in programs.items()}
    return [benchmark.interleaved(runners, repeats=rounds, max_seconds=max_seconds) for _ in range(count)]


def _race(graph: Graph, programs: dict[str, executor.Program], repeats: int) -> dict[str, float]:
    """End-to-end ms of alternative programs of one graph, interleaved on the same random feed."""
    return _races(graph, programs, max(5, repeats), 60)[0]


def _race_blocks(graph: Graph, programs: dict[str, executor.Program], repeats: int) -> list[dict[str, float]]:
    """:func:`_race` as VERIFY_BLOCKS consecutive races of a share of the rounds each (at least 5)."""
    return _races(graph, programs, max(5, -(-repeats // VERIFY_BLOCKS)), 60 / VERIFY_BLOCKS, VERIFY_BLOCKS)


VERIFY_MARGIN = 0.0  # the faster of the optimum and the heuristic assignment, measured, is kept
WHOLE_MODEL_MARGIN = 0.02  # an assignment must beat onnxruntime alone by this much to be kept...
VERIFY_BLOCKS = 3  # ...in each of this many consecutive races


def verify_plan(graph: Graph, plan: Plan, profiler: Profiler, fingerprint: str, repeats: int) -> Plan:
    """The fastest, measured end to end (interleaved), of ``plan``, the heuristic assignment and
    the whole model on onnxruntime (:func:`fastrun.planner.whole_model_plan`).

    Of the optimum and the heuristic assignment the measured faster is kept (the optimum is a
    prediction from per-operator times; VGG-19's ran 2-6% slower end to end than the heuristic
    assignment in three runs out of three); the better of the two must then beat onnxruntime alone
    by WHOLE_MODEL_MARGIN in each of VERIFY_BLOCKS consecutive races, or the plan runs the whole
    model on onnxruntime: the default is what a user had without fastrun, and a plan replaces it
    only on a win larger than the noise of one race (~1-3% here) that lasts. One race was not
    enough: Inception v2 b8's plan of 42 host steps won one by 5% and ran 0.87-1.12x onnxruntime's
    time in 15 later races (docs/benchmarks.md).
    """
    saved = copy.deepcopy(profiler.stats)  # re-planning reads the cache; don't count it twice
    alternative = planner.make_plan(graph, fingerprint, profiler, assignment="heuristic")
    profiler.stats = saved
    contenders = {"optimal": plan}
    if plan.assignment() != alternative.assignment():
        contenders["heuristic"] = alternative
    whole = planner.whole_model_plan(graph, plan)
    if whole is not None:
        contenders["onnxruntime"] = whole
    if len(contenders) == 1:
        plan.solver["verified"] = {"kept": "optimal", "note": "no alternative to time"}
        return plan
    blocks = _race_blocks(graph, {k: executor.compile_plan(graph, p) for k, p in contenders.items()}, repeats)
    times = {k: float(np.median([block[k] for block in blocks])) for k in contenders}
    kept = "optimal"
    if "heuristic" in times and times["heuristic"] < (1 - VERIFY_MARGIN) * times["optimal"]:
        kept = "heuristic"
    if "onnxruntime" in times and not all(block[kept] < (1 - WHOLE_MODEL_MARGIN) * block["onnxruntime"]
                                          for block in blocks):
        kept = "onnxruntime"
    chosen = contenders[kept]
    chosen.solver = dict(plan.solver, verified={"kept": kept, **{f"{k}_ms": v for k, v in times.items()}})
    if kept == "heuristic":
        log.info("the heuristic assignment measured faster end to end (%.2f vs %.2f ms for the predicted "
                 "optimum): keeping it", times[kept], times["optimal"])
    elif kept == "onnxruntime":
        log.info("no assignment beat the whole model on onnxruntime (%.2f ms; the predicted optimum ran %.2f ms) "
                 "by %.0f%% in each of %d races: running it that way", times[kept], times["optimal"],
                 100 * WHOLE_MODEL_MARGIN, VERIFY_BLOCKS)
    return chosen


THREADS_MARGIN = 0.03  # fewer threads must be this much faster to replace all of them


def thread_counts(available: int) -> list[int]:
    """Intra-op thread counts worth timing on a machine with ``available`` cores (all first)."""
    return sorted({available, max(1, available // 2), 1}, reverse=True)


def choose_threads(graph: Graph, plan: Plan, repeats: int) -> Plan:
    """The plan with the thread counts of its onnxruntime segments and host kernels measured, not assumed.

    A deployment knob like the assignment: small models, and small segments of big ones, can lose
    more to waking and joining threads than they gain from them. Every count of
    :func:`thread_counts` runs the whole plan, interleaved, timing each segment as well; fewer
    threads than all must win by ``THREADS_MARGIN``, for the plan (``plan.threads``) and for each
    segment (``plan.segment_threads``, kept only if the mix then wins end to end by the margin).
    Then, if the plan has host kernels, the same counts race for them (``plan.host_threads``),
    with the onnxruntime counts just chosen. The times are kept in ``plan.solver["threads"]``.
    """
    counts = thread_counts(ortutil.default_threads())
    if len(counts) == 1:
        return plan
    programs = {n: executor.compile_plan(graph, plan, threads=n) for n in counts}
    feed = random_feed(graph)
    part_seconds: dict[int, list[list[float]]] = {n: [[] for _ in programs[n].program] for n in counts}
    times = benchmark.interleaved({str(n): (lambda n=n: programs[n].run(feed, part_seconds[n])) for n in counts},
                                  repeats=max(5, repeats), max_seconds=60)
    best = _faster_by_margin(counts, {n: times[str(n)] for n in counts})
    plan.threads = best
    record: dict[str, Any] = {"chosen": best, "ms": times}
    segments = [i for i, p in enumerate(programs[best].program) if isinstance(p, executor.Segment)]
    timed = all(part_seconds[n][i] for n in counts for i in segments)
    per_segment = [_faster_by_margin(counts, {n: benchmark.typical_ms(part_seconds[n][i]) for n in counts}, best)
                   for i in segments] if timed else []
    program = programs[best]  # every segment on ``best`` threads
    if len(set(per_segment)) > 1:
        mixed = copy.copy(plan)
        mixed.segment_threads = per_segment
        mixed_program = executor.compile_plan(graph, mixed)
        raced = _race(graph, {"mixed": mixed_program, "uniform": program}, repeats)
        record.update(segments=per_segment, mixed_ms=raced["mixed"], uniform_ms=raced["uniform"])
        if raced["mixed"] < (1 - THREADS_MARGIN) * raced["uniform"]:
            plan.segment_threads = per_segment
            program = mixed_program
    if program.host_steps:
        host_ms = _race(graph, {str(n): executor.with_host_threads(program, n) for n in counts}, repeats)
        plan.host_threads = _faster_by_margin(counts, {n: host_ms[str(n)] for n in counts})
        record.update(host=plan.host_threads, host_ms=host_ms)
    plan.solver = dict(plan.solver, threads=record)
    if best != counts[0]:
        log.info("%d intra-op thread(s) ran faster end to end than %d (%.2f vs %.2f ms): keeping %d",
                 best, counts[0], times[str(best)], times[str(counts[0])], best)
    return plan


def _faster_by_margin(counts: list[int], ms: dict[int, float], default: Optional[int] = None) -> int:
    """The fastest count, unless it beats ``default`` (all cores) by less than THREADS_MARGIN."""
    default = default or counts[0]
    fastest = min(counts, key=lambda n: ms[n])
    return fastest if ms[fastest] < (1 - THREADS_MARGIN) * ms[default] else default


# The closing measurement races at least this long: 10 rounds of a 5 ms model are 0.1 s, in which
# one of the VM's slow episodes moved the ratio by 5% (ResNet-50 b1's whole-model plan printed 0.95x).
MEASURE_MIN_SECONDS = 2.0


def _measure(report: ProfileReport, graph: Graph, program: executor.Program, data: bytes, repeats: int) -> None:
    baseline = onnxruntime_baseline(graph, data)
    feed = random_feed(graph)
    names = list(program.outputs)
    ours = program.run(feed)
    ref = baseline.run(names, feed)
    report.max_error = relative_error([ours[n] for n in names], ref)
    times = benchmark.interleaved({"fastrun": lambda: program.run(feed), "onnxruntime": lambda: baseline.run(names, feed)},
                                  repeats=repeats, min_seconds=MEASURE_MIN_SECONDS, max_seconds=60)
    report.measured_ms, report.onnxruntime_ms = times["fastrun"], times["onnxruntime"]
    report.segments, report.host_steps, report.reorders = program.segments, program.host_steps, program.reorders


def _edges(graph: Graph) -> dict:
    """Each node's runtime input and output tensors (the report places reorders with them)."""
    return {n.name: {"inputs": [t for t in n.inputs if t and t not in graph.constants], "outputs": list(n.outputs)}
            for n in graph.nodes}


def _model_label(model: ModelSource, graph: Graph) -> str:
    if isinstance(model, (str, Path)):
        return str(model)
    return graph.name
