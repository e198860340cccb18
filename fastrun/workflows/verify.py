"""End-to-end checks of a plan: outputs against onnxruntime, races against it, the thread count."""
from __future__ import annotations

import copy
import logging
from dataclasses import replace
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from fastrun.errors import InputError
from fastrun.measure import timing
from fastrun.runtime import compiler
from fastrun.runtime.program import Program, Segment, with_host_threads
from fastrun.system import ortutil
from fastrun.planning import planner
from fastrun.ir.graph import Graph
from fastrun.runtime.plan import Plan
from fastrun.measure.profiler import Profiler
from fastrun.runtime.engines import OriginalModelSource
from fastrun.system.precision import FP32
from fastrun.workflows import candidates, engine_candidates  # noqa: F401  (registers the engines' candidates)
from fastrun.workflows.eligibility import MODEL_TOLERANCE, Reference, make_reference, max_relative_error  # noqa: F401

log = logging.getLogger(__name__)



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


relative_error = max_relative_error


def check_feed(graph: Graph, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The user's check inputs as a feed of ``graph``: every input, of the planned shape and dtype."""
    feed = {}
    for name in graph.inputs:
        info = graph.tensors[name]
        if name not in inputs:
            raise InputError(f"the check inputs have no {name!r} (they have {', '.join(inputs) or 'nothing'})")
        value = np.asarray(inputs[name])
        if tuple(value.shape) != tuple(info.shape):
            raise InputError(f"check input {name!r} has shape {list(value.shape)}; the plan is for {list(info.shape)}")
        feed[name] = value.astype(info.dtype, copy=False)
    return feed


def model_reference(graph: Graph, original: OriginalModelSource, quantized: bool,
                    inputs: Optional[Mapping[str, np.ndarray]] = None) -> Reference:
    """The outputs of the original model that whole-model candidates must match, on ``inputs``
    (the user's check inputs) or a random feed (:mod:`fastrun.workflows.eligibility`)."""
    feed = check_feed(graph, inputs) if inputs is not None else random_feed(graph)
    names = list(graph.outputs)
    default = ortutil.session(original.source, level="all").run(names, feed)
    semantics = ortutil.session(original.source, level="disable").run(names, feed) if quantized else ()
    return make_reference(feed, names, default, semantics)


def _races(graph: Graph, programs: dict[str, Program], rounds: int, max_seconds: float,
           count: int = 1) -> list[dict[str, float]]:
    """``count`` consecutive interleaved races of programs of one graph on the same random feed (ms),
    each timed in blocks of calls as it serves (programs compiled with ``serving=True``)."""
    feed = random_feed(graph)
    runners = {k: (lambda p=p: p.run(feed)) for k, p in programs.items()}
    return [timing.interleaved(runners, repeats=rounds, max_seconds=max_seconds,
                               block_seconds=timing.SERVING_BLOCK_SECONDS) for _ in range(count)]


def _race(graph: Graph, programs: dict[str, Program], repeats: int) -> dict[str, float]:
    """End-to-end ms of alternative programs of one graph, interleaved on the same random feed."""
    return _races(graph, programs, max(5, repeats), 60)[0]


def _race_blocks(graph: Graph, programs: dict[str, Program], repeats: int) -> list[dict[str, float]]:
    """:func:`_race` as VERIFY_BLOCKS consecutive races of a share of the rounds each (at least 5)."""
    return _races(graph, programs, max(5, -(-repeats // VERIFY_BLOCKS)), 60 / VERIFY_BLOCKS, VERIFY_BLOCKS)


VERIFY_MARGIN = 0.0  # the faster of the optimum and the heuristic assignment, measured, is kept
# The optimum among onnxruntime's kernels alone: no host step splits its session (per-operator
# times do not price a split; VGG-19 b8's optimum with host Winograd kernels ran 1.15x slower
# than onnxruntime end to end, where its 3x3 convs as Winograd ONNX fragments ran 1.26x faster).
UNSPLIT = "unsplit"


WHOLE_MODEL_MARGIN = 0.02  # an assignment must beat onnxruntime alone by this much to be kept...


VERIFY_BLOCKS = 3  # ...in each of this many consecutive races


def verify_plan(graph: Graph, plan: Plan, profiler: Profiler, fingerprint: str, repeats: int,
                original: Optional[OriginalModelSource] = None, reference: Optional[Reference] = None,
                engines: Optional[Sequence[str]] = None) -> Plan:
    """The fastest eligible one, measured end to end (interleaved), of ``plan``, the heuristic
    assignment, the optimum among onnxruntime's kernels (:data:`UNSPLIT`) and the whole-model
    candidates (:mod:`fastrun.workflows.candidates`: onnxruntime on the ``original`` model,
    onnxruntime on fastrun's specialised graph, any registered engine of ``engines``, default all).

    Eligible: outputs within ``reference``'s bound (:mod:`fastrun.workflows.eligibility`; without a
    reference every candidate is). Of the optimum and the heuristic assignment the measured faster
    is kept (the optimum is a prediction from per-operator times; VGG-19's ran 2-6% slower end to
    end than the heuristic assignment in three runs out of three). The default is the baseline
    candidate (onnxruntime on the original model; without it, on the specialised graph): what a
    user had without fastrun. Another whole-model candidate replaces it only by beating it by
    WHOLE_MODEL_MARGIN in each of VERIFY_BLOCKS consecutive races, and the assignment must then beat
    the whole-model winner the same way: a win larger than the noise of one race (~1-3% here) that
    lasts. One race was not enough: Inception v2 b8's plan of 42 host steps won one by 5% and ran
    0.87-1.12x onnxruntime's time in 15 later races (docs/benchmarks.md).
    """
    saved = copy.deepcopy(profiler.stats)  # re-planning reads the cache; don't count it twice
    alternative = planner.make_plan(graph, fingerprint, profiler, assignment="heuristic", exact=plan.exact)
    unsplit = planner.make_plan(graph, fingerprint, profiler, exact=plan.exact, onnx_kernels=True)
    profiler.stats = saved
    contenders = {"optimal": plan}
    if plan.assignment() != alternative.assignment():
        contenders["heuristic"] = alternative
    if unsplit.assignment() not in (plan.assignment(), alternative.assignment()):
        contenders[UNSPLIT] = unsplit
    whole = _whole_model_plans(graph, plan, original, engines)
    contenders.update(whole)
    programs, errors, failed = _checked_programs(graph, contenders, set(whole) - {candidates.BASELINE}, original,
                                                 reference)
    eligible = [k for k in programs if k == candidates.BASELINE or not reference or errors[k] <= _bound(contenders[k], reference)]
    eligible = eligible or ["optimal"]  # no baseline to fall back on: the plan as before
    solver = dict(plan.solver)
    if failed:
        solver["failed_candidates"] = {**solver.get("failed_candidates", {}), **failed}
    record = {"errors": errors, **(reference.describe() if reference else {})}
    if len(eligible) == 1:
        verified = {"kept": eligible[0], "note": "no alternative to time", **record}
        return replace(contenders[eligible[0]], solver=dict(solver, verified=verified))
    blocks = _race_blocks(graph, {k: programs[k] for k in eligible}, repeats)
    times = {k: float(np.median([block[k] for block in blocks])) for k in eligible}
    kept = _winner(times, blocks, [k for k in eligible if k in whole])
    if kept != "optimal":
        log.info("kept %s (%.2f ms; the predicted optimum ran %s ms)", kept, times[kept],
                 f"{times['optimal']:.2f}" if "optimal" in times else "n/a, ineligible")
    verified = {"kept": kept, **{f"{k}_ms": v for k, v in times.items()}, **record}
    return replace(contenders[kept], solver=dict(solver, verified=verified))


def _checked_programs(graph: Graph, contenders: dict[str, Plan], fallible: set[str],
                      original: Optional[OriginalModelSource], reference: Optional[Reference]):
    """Every contender's program and its error against ``reference``; a ``fallible`` one (another
    engine) that fails to compile or to run is left out, and why is returned (name -> reason)."""
    programs, errors, failed = {}, {}, {}
    served = serving_original(original) if original is not None else None
    for k, p in contenders.items():
        try:
            programs[k] = compiler.compile_plan(graph, p, original=served, serving=True)
            if reference:
                errors[k] = reference.error(programs[k].run(dict(reference.feed)))
        except Exception as exc:
            if k not in fallible:
                raise
            log.info("whole-model candidate %s failed: %s", k, exc)
            failed[k] = f"raised {type(exc).__name__}: " + (str(exc).strip().splitlines() or [""])[-1][:200]
            programs.pop(k, None)
    return programs, errors, failed


def serving_original(original: OriginalModelSource) -> OriginalModelSource:
    """``original`` with the session serving runs it on: the caller's, else onnxruntime's default
    session (it spins between calls), called as serving calls it (:func:`ortutil.matched_run`)."""
    if original.shared is not None:
        return original
    served = ortutil.session(original.source, level="all", spin_after_run=True)
    return OriginalModelSource(original.source, ortutil.matched_run(served))


def _whole_model_plans(graph: Graph, plan: Plan, original: Optional[OriginalModelSource],
                       engines: Optional[Sequence[str]] = None) -> dict[str, Plan]:
    """The plan of every whole-model candidate that applies (those of the original need its source)
    on one of ``engines`` (None: any)."""
    plans = {}
    for c in candidates.candidates():
        if (c.needs_original and original is None) or (engines is not None and c.engine not in engines):
            continue
        made = c.make_plan(graph, plan, original)
        if made is not None:
            plans[c.name] = made
    return plans


def _bound(plan: Plan, reference: Reference) -> float:
    """The largest error ``plan`` may have: the reference's, or a reduced precision's own budget."""
    return max(reference.bound, plan.tolerance or 0.0) if plan.precision != FP32 else reference.bound


def _beats(a: str, b: str, blocks: list[dict[str, float]]) -> bool:
    return all(block[a] < (1 - WHOLE_MODEL_MARGIN) * block[b] for block in blocks)


def _winner(times: dict[str, float], blocks: list[dict[str, float]], whole: list[str]) -> str:
    """The race's winner among eligible contenders (see :func:`verify_plan`)."""
    assignments = [k for k in ("optimal", "heuristic", UNSPLIT) if k in times]
    kept = None
    if assignments:
        kept = assignments[0]
        for other in assignments[1:]:
            if times[other] < (1 - VERIFY_MARGIN) * times[kept]:
                kept = other
    if not whole:
        return kept
    baseline = candidates.BASELINE if candidates.BASELINE in whole else whole[0]
    best = baseline
    for name in sorted((w for w in whole if w != baseline), key=times.get):
        if _beats(name, baseline, blocks):
            best = name
            break
    return kept if kept is not None and _beats(kept, best, blocks) else best


THREADS_MARGIN = 0.03  # fewer threads must be this much faster to replace all of them


def thread_counts(available: int) -> list[int]:
    """Intra-op thread counts worth timing on a machine with ``available`` cores (all first)."""
    return sorted({available, max(1, available // 2), 1}, reverse=True)


def choose_threads(graph: Graph, plan: Plan, repeats: int) -> Plan:
    """The plan with the thread counts of its onnxruntime segments and host kernels measured, not assumed
    (a new plan, made once the counts are chosen: ``plan`` is left as it is).

    A deployment knob like the assignment: small models, and small segments of big ones, can lose
    more to waking and joining threads than they gain from them. Every count of
    :func:`thread_counts` runs the whole plan, interleaved and as it serves (a lone session spinning
    between calls, timed in blocks: call by call, a small model's threads wake up for every call
    and one thread looks faster than it serves), timing each segment as well; fewer
    threads than all must win by ``THREADS_MARGIN``, for the plan (``plan.threads``) and for each
    segment (``plan.segment_threads``, kept only if the mix then wins end to end by the margin).
    Then, if the plan has host kernels, the same counts race for them (``plan.host_threads``),
    with the onnxruntime counts just chosen. The times are kept in ``plan.solver["threads"]``.
    """
    counts = thread_counts(ortutil.default_threads())
    if len(counts) == 1:
        return plan
    programs = {n: compiler.compile_plan(graph, plan, threads=n, serving=True) for n in counts}
    feed = random_feed(graph)
    part_seconds: dict[int, list[list[float]]] = {n: [[] for _ in programs[n].program] for n in counts}
    times = timing.interleaved({str(n): (lambda n=n: programs[n].run(feed, part_seconds[n])) for n in counts},
                               repeats=max(5, repeats), max_seconds=60, block_seconds=timing.SERVING_BLOCK_SECONDS)
    best = _faster_by_margin(counts, {n: times[str(n)] for n in counts})
    if best != counts[0]:
        log.info("%d intra-op thread(s) ran faster end to end than %d (%.2f vs %.2f ms): keeping %d",
                 best, counts[0], times[str(best)], times[str(counts[0])], best)
    record: dict[str, Any] = {"chosen": best, "ms": times}
    segments = [i for i, p in enumerate(programs[best].program) if isinstance(p, Segment)]
    timed = all(part_seconds[n][i] for n in counts for i in segments)
    per_segment = [_faster_by_margin(counts, {n: timing.typical_ms(part_seconds[n][i]) for n in counts}, best)
                   for i in segments] if timed else []
    program, segment_threads = programs[best], []  # every segment on ``best`` threads
    if len(set(per_segment)) > 1:
        mixed_program = compiler.compile_plan(graph, replace(plan, threads=best, segment_threads=per_segment))
        raced = _race(graph, {"mixed": mixed_program, "uniform": program}, repeats)
        record.update(segments=per_segment, mixed_ms=raced["mixed"], uniform_ms=raced["uniform"])
        if raced["mixed"] < (1 - THREADS_MARGIN) * raced["uniform"]:
            program, segment_threads = mixed_program, per_segment
    host_threads = plan.host_threads
    if program.host_steps:
        host_ms = _race(graph, {str(n): with_host_threads(program, n) for n in counts}, repeats)
        host_threads = _faster_by_margin(counts, {n: host_ms[str(n)] for n in counts})
        record.update(host=host_threads, host_ms=host_ms)
    return replace(plan, threads=best, segment_threads=segment_threads, host_threads=host_threads,
                   solver=dict(plan.solver, threads=record))


def _faster_by_margin(counts: list[int], ms: dict[int, float], default: Optional[int] = None) -> int:
    """The fastest count, unless it beats ``default`` (all cores) by less than THREADS_MARGIN."""
    default = default or counts[0]
    fastest = min(counts, key=lambda n: ms[n])
    return fastest if ms[fastest] < (1 - THREADS_MARGIN) * ms[default] else default
