"""The library's profiling entry point: graph -> planner (profile + search) -> verified plan -> stored.

The CLI, :func:`fastrun.warmup` and :class:`fastrun.InferenceSession` call it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import onnx

from fastrun.measure import load, timing
from fastrun.runtime import compiler
from fastrun.runtime.program import Program, instantiate
from fastrun.system import fingerprint as fp
from fastrun.ir import reader
from fastrun.planning import planner
from fastrun.ops import registry
from fastrun.store.cache import Caches
from fastrun.ir.graph import Graph
from fastrun.ir.reader import ModelSource
from fastrun.runtime.plan import Plan
from fastrun.runtime.recipe import Recipe
from fastrun.measure.profiler import DEFAULT_OP_LIMIT, Profiler, Stats
from fastrun.ops import builtin  # noqa: F401  (registers the built-in implementations this module queries)
from fastrun.workflows.lookup import store_plan
from fastrun.runtime.engines import OriginalModelSource, model_source
from fastrun.system import ortutil
from fastrun.system import precision as precisions
from fastrun.workflows import eligibility, engine_choice, fallback
from fastrun.workflows.verify import (choose_threads, model_reference, random_feed, relative_error, serving_original,
                                      verify_plan)

log = logging.getLogger(__name__)


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
    measure_load: Optional[load.Load] = None  # other processes' use of the cores during the closing measurement

    @property
    def speedup(self) -> Optional[float]:
        if self.measured_ms and self.onnxruntime_ms:
            return self.onnxruntime_ms / self.measured_ms
        return None

    @property
    def threads_gain(self) -> float:
        """What the thread choice gained end to end: the plan on all cores over it on the chosen counts."""
        threads = self.plan.solver.get("threads") or {}
        ms, chosen = threads.get("ms") or {}, threads.get("chosen")
        if self.plan.measured_under_load or not ms or str(chosen) not in ms:
            return 1.0
        return ms[max(ms, key=int)] / ms[str(chosen)]

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
                       "runner_up_ms": n.runner_up_ms, "candidates": n.candidates, "errors": n.errors,
                       **self.edges.get(n.name, {})}
                      for n in plan.nodes],
            "predicted_ms": plan.predicted_ms,
            "measured_ms": self.measured_ms,
            "onnxruntime_ms": self.onnxruntime_ms,
            "speedup": self.speedup,
            "speedup_selection": self.speedup / self.threads_gain if self.speedup else None,
            "speedup_threads": self.threads_gain,
            "measured_under_load": plan.measured_under_load,
            "exact": plan.exact,
            "load": dict(plan.solver.get("load") or {},
                         **({"measure": self.measure_load.to_json()} if self.measure_load else {})),
            "greedy_ms": plan.greedy_ms,
            "nchw_only_ms": plan.nchw_only_ms,
            "reorders": len(plan.reorders),
            "reorder_list": plan.reorders,
            "solver": plan.solver,
            "threads": plan.threads,
            "segment_threads": plan.segment_threads,
            "host_threads": plan.host_threads,
            "whole_model": plan.whole_model,
            "verified": plan.verified,
            "engines": plan.engines,
            "engine": plan.engine,
            "winner": plan.winner,
            "fallback_reason": plan.fallback_reason,
            "engine_version": plan.engine_version,
            "precision": plan.precision,
            "precision_policy": plan.precision_policy,
            "tolerance": plan.tolerance,
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
        ort_times = [v for k, v in times.items() if registry.is_onnxruntime_kernel(n.op_type, k)]
        if ort_times:
            best += min(times.values())
            ort += min(ort_times)
    return (best, ort) if ort else None


@dataclass
class MadePlan:
    """What :func:`make_and_store_plan` made: the plan, its compiled recipe, the profiling counts."""

    plan: Plan
    recipe: Recipe
    stats: Stats


def make_and_store_plan(graph: Graph, model_proto: onnx.ModelProto, caches: Caches, fingerprint: str,
                        original: OriginalModelSource, *, budget: Optional[float] = None,
                        op_limit: float = DEFAULT_OP_LIMIT, op_timeout: Optional[float] = None,
                        isolate: bool = True, refresh: bool = False, repeats: int = 10, verify: bool = True,
                        exact: bool = False, allowed: Optional[precisions.PrecisionPolicy] = None,
                        inputs: Optional[Mapping[str, np.ndarray]] = None,
                        progress: Optional[Callable[[str], None]] = None,
                        engines: "str | Sequence[str] | None" = None) -> MadePlan:
    """The one way a plan is made: profile, search, race end to end, choose threads, store.

    ``fastrun profile``, ``fastrun warmup`` and ``InferenceSession(policy="profile")`` all call it,
    so their plans are the same. It runs under the cache's profiling lock and watches the load
    other processes put on the cores (:func:`_mark_load`). With ``verify``, the plan is raced
    against the whole-model candidates (:func:`verify_plan`), gets its thread counts measured
    (:func:`choose_threads`) and is marked ``verified``; a profile cut short by ``budget`` (policy
    ``partial``: its unprofiled nodes on estimated costs) races too, so that no stored plan runs
    slower than onnxruntime on the original model, and warmup resumes its profiling later. The race
    uses the whole-model ``engines`` (:func:`fastrun.workflows.engine_choice.allowed`: default
    ``$FASTRUN_ENGINES``, else all) and the plan records those it ran. The plan is stored under its precision policy (``allowed``: fp32 by default) with its compiled program
    (a read-only cache logs and carries on).
    """
    allowed = allowed or precisions.policy()
    racing = engine_choice.allowed(engines)
    with caches.profiling_lock():
        profiler = Profiler(caches, fingerprint, budget_s=budget, op_limit_s=op_limit, op_timeout=op_timeout,
                            isolate=isolate, refresh=refresh)
        loads = {"before": load.check()}
        plan = planner.make_plan(graph, fingerprint, profiler, progress=progress, exact=exact)
        plan.precision_policy, plan.tolerance = allowed.precision, allowed.tolerance
        if verify:
            if progress:
                progress("racing the plan end to end against the whole-model candidates")
            reference = model_reference(graph, original, bool(eligibility.quantized_ops(model_proto)), inputs)
            plan = verify_plan(graph, plan, profiler, fingerprint, repeats, original, reference, racing)
            plan.engines = engine_choice.raced(racing)
            if not plan.runs_original:
                monitor = load.LoadMonitor().start()
                plan = choose_threads(graph, plan, repeats)
                loads["threads"] = monitor.stop()
            plan.verified = True
        loads["after"] = load.check()
        _mark_load(plan, loads)
        if not store_plan(caches, plan):
            log.warning("the plan could not be stored in %s (read-only?)", caches.root)
        recipe = compiler.build_recipe(graph, plan, original=original)
        caches.programs.save(plan, recipe, reader.declared_interface(model_proto))
    return MadePlan(plan, recipe, profiler.stats)


def profile(model: ModelSource, input_shapes: Optional[Mapping[str, Sequence[int]]] = None,
            cache_dir: Optional[str] = None, budget: Optional[float] = None,
            op_limit: float = DEFAULT_OP_LIMIT, progress: Optional[Callable[[str], None]] = None,
            measure: bool = True, repeats: int = 10, verify: bool = True,
            op_timeout: Optional[float] = None, isolate: bool = True, refresh: bool = False,
            exact: bool = False, precision: Optional[str] = None, tolerance: Optional[float] = None,
            inputs: Optional[Mapping[str, np.ndarray]] = None,
            engines: "str | Sequence[str] | None" = None) -> ProfileReport:
    """Make and store a model's plan (:func:`make_and_store_plan`), then measure it against onnxruntime.

    ``refresh`` measures everything again, ignoring (and then overwriting) cached timings.

    ``exact`` makes an exact-mode plan (kept under its own key): only implementations declared
    exact whose measured error stays within :func:`fastrun.planning.planner.exact_limit`.

    It runs under the cache's profiling lock, and checks that other processes leave the cores
    free (:mod:`fastrun.measure.load`): a plan measured under load keeps no thread count.

    Candidates run in a killable worker process (``isolate``); one that crashes, or whose build
    or single call takes longer than ``op_timeout`` seconds (default
    :data:`fastrun.measure.profiler.DEFAULT_OP_TIMEOUT`), is recorded as failed and never chosen.

    ``verify`` times the optimal assignment against the heuristic one end to end and keeps the
    faster: per-operator timings predict the whole well, not perfectly (caches, segment
    boundaries), and a profiled plan must never be slower than not profiling.

    ``precision`` (fp32 by default; bf16 or fp16 where the CPU computes them natively) lets
    whole-model candidates compute in that precision when their outputs stay within
    ``tolerance`` of onnxruntime's on the check inputs: ``inputs`` (one feed of the model's
    inputs), or random ones. The plan is stored under its precision policy.

    ``engines`` (a comma list or names; default ``$FASTRUN_ENGINES``, else every installed engine)
    are the whole-model engines the race may use (:mod:`fastrun.workflows.engine_choice`).

    A model fastrun's front end cannot take gets the plan that runs the original model as is.
    """
    allowed = precisions.policy(precision, tolerance)
    racing = engine_choice.allowed(engines)
    start = time.perf_counter()
    model_proto, data = reader.read_model(model)
    original = OriginalModelSource(model_source(model if isinstance(model, (str, Path)) else data))
    caches = Caches(cache_dir)
    reader.input_shapes(model_proto, input_shapes)  # the caller's shapes must fit the model: their error
    making = dict(budget=budget, op_limit=op_limit, op_timeout=op_timeout, isolate=isolate, refresh=refresh,
                  repeats=repeats, verify=verify, exact=exact, allowed=allowed, inputs=inputs, progress=progress,
                  engines=racing)
    try:
        with caches.profiling_lock():
            report = _profile_locked(model, model_proto, data, original, input_shapes, caches, making, measure)
    finally:
        caches.close()
    report.seconds = time.perf_counter() - start
    return report


def _profile_locked(model: ModelSource, model_proto, data: bytes, original: OriginalModelSource,
                    input_shapes: Optional[Mapping[str, Sequence[int]]], caches: Caches, making: dict,
                    measure: bool) -> ProfileReport:
    """:func:`profile` under the cache's profiling lock (``making``: :func:`make_and_store_plan`'s options)."""
    fingerprint = fp.fingerprint()
    try:
        graph = reader.from_proto(model_proto, data, input_shapes)
    except Exception as exc:  # the front end cannot take it: onnxruntime decides, and runs the original
        return _fallback(model, model_proto, data, original, input_shapes, caches, fingerprint, exc)
    made = make_and_store_plan(graph, model_proto, caches, fingerprint, original, **making)
    report = ProfileReport(model=_model_label(model, graph), plan=made.plan, stats=made.stats,
                           seconds=0.0, edges=_edges(graph))
    if measure:
        if making["progress"]:
            making["progress"]("measuring the plan end to end against onnxruntime")
        program = instantiate(made.recipe, original=serving_original(original))  # as serving runs it
        _measure(report, graph, program, original, making["repeats"])
    return report


def _mark_load(plan: Plan, loads: dict[str, load.Load]) -> None:
    """Record what other processes used while profiling; under load, keep no thread count measured then."""
    plan.solver = dict(plan.solver, load={k: v.to_json() for k, v in loads.items()})
    busy = {k: v for k, v in loads.items() if v.busy}
    if not busy:
        return
    plan.measured_under_load = True
    plan.threads, plan.segment_threads, plan.host_threads = 0, [], 0
    seen = ", ".join(f"{v.other_cores:.2f} cores {k}" for k, v in busy.items())
    log.warning("THE MACHINE WAS BUSY while profiling: other processes used %s of fastrun's %d. The plan is "
                "marked 'measured under load' and keeps all cores; run `fastrun warmup` (or `fastrun profile "
                "--refresh`) on a quiet machine to measure it again", seen, ortutil.default_threads())


def _fallback(model: ModelSource, model_proto, data: bytes, original: OriginalModelSource,
              input_shapes: Optional[Mapping[str, Sequence[int]]], caches: Caches, fingerprint: str,
              exc: Exception) -> ProfileReport:
    """Store the plan that runs the original model on onnxruntime (or raise onnxruntime's refusal)."""
    log.debug("front end failed", exc_info=exc)
    plan, recipe = fallback.original_model_plan(model_proto, reader.model_hash(data), original, input_shapes,
                                                fingerprint, fallback.front_end_reason(exc))
    if not store_plan(caches, plan):
        log.warning("the plan could not be stored in %s (read-only?)", caches.root)
    caches.programs.save(plan, recipe, reader.declared_interface(model_proto))
    label = str(model) if isinstance(model, (str, Path)) else (model_proto.graph.name or "model")
    return ProfileReport(model=label, plan=plan, stats=Stats(), seconds=0.0)


# The closing measurement races at least this long: 10 rounds of a 5 ms model are 0.1 s, in which
# one of the VM's slow episodes moved the ratio by 5% (ResNet-50 b1's whole-model plan printed 0.95x).
MEASURE_MIN_SECONDS = 2.0


def _measure(report: ProfileReport, graph: Graph, program: Program, original: OriginalModelSource,
             repeats: int) -> None:
    baseline = ortutil.session(original.source, level="all", spin_after_run=True)  # onnxruntime's default
    feed = random_feed(graph)
    names = list(program.outputs)
    ours = program.run(feed)
    ref = baseline.run(names, feed)
    report.max_error = relative_error([ours[n] for n in names], ref)
    monitor = load.LoadMonitor().start()
    times = timing.interleaved({"fastrun": lambda: program.run(feed), "onnxruntime": lambda: baseline.run(names, feed)},
                               repeats=repeats, min_seconds=MEASURE_MIN_SECONDS, max_seconds=60,
                               block_seconds=timing.SERVING_BLOCK_SECONDS)
    report.measure_load = monitor.stop()
    report.measured_ms, report.onnxruntime_ms = times["fastrun"], times["onnxruntime"]
    report.segments, report.host_steps, report.reorders = program.segments, program.host_steps, program.reorders


def _edges(graph: Graph) -> dict:
    """Each node's runtime input and output tensors (the report places reorders with them)."""
    return {n.name: {"inputs": graph.runtime_inputs(n), "outputs": list(n.outputs)}
            for n in graph.nodes}


def _model_label(model: ModelSource, graph: Graph) -> str:
    if isinstance(model, (str, Path)):
        return str(model)
    return graph.name
