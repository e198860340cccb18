"""Warm a cache ahead of serving: profile every model and shape set that has no plan, nothing else.

This is the offline half of "profile once, serve many times" (a container build step, a fleet's
provisioning): ``fastrun warmup models/ --shape ...`` makes every missing plan, and a second run
over the same inputs finds them all and times nothing. Each plan's compiled program is stored too
(:mod:`fastrun.store.programs`; compiled now if the plan came from elsewhere, e.g. an imported bundle),
so that serving starts without compiling. A plan not checked end to end on this machine (see
``Plan.verified``: imported, unchecked, older) is made again by the same function as a new one
(:func:`fastrun.workflows.profile.make_and_store_plan`), reusing its cached timings. A model that
fails is reported and the others still run. Processes sharing a cache profile one at a time (:meth:`Caches.profiling_lock`).
A plan whose race the allowed engines would change (:mod:`fastrun.workflows.engine_choice`) is raced again.
"""
from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from fastrun.measure import load
from fastrun.workflows import engine_choice, lookup
from fastrun.workflows import profile as profiling
from fastrun.runtime import compiler
from fastrun.system import fingerprint as fp
from fastrun.ir import graph as graph_mod
from fastrun.ir import reader
from fastrun.store.cache import Caches
from fastrun.errors import FastrunError, InputError
from fastrun.runtime.plan import Plan
from fastrun.shapes import shapes_text
from fastrun.runtime.engines import OriginalModelSource
from fastrun.system import precision as precisions

log = logging.getLogger(__name__)

ShapeSet = dict[str, tuple[int, ...]]


_BRACKET = re.compile(r"\[([^\]]*)\]")


def expand_shape(text: str) -> list[str]:
    """One ``--shape`` value with brackets -> the plain values it stands for.

    A bracket in place of a dim is a range, ``[START:STOP:STEP]`` with STOP included (STEP 1 if
    left out), or a list, ``[1,4,8]``: ``ids:1x[8:32:8]`` -> ``ids:1x8 ids:1x16 ids:1x24 ids:1x32``.
    Several brackets give every combination, the last varying fastest.
    """
    match = _BRACKET.search(text)
    if match is None:
        return [text]
    head, tail = text[:match.start()], text[match.end():]
    return [e for value in _bracket_values(match.group(1), text) for e in expand_shape(f"{head}{value}{tail}")]


def _bracket_values(inner: str, text: str) -> list[int]:
    try:
        if ":" not in inner:
            values = [int(v) for v in inner.split(",")]
        else:
            start, stop, *step = (int(v) for v in inner.split(":"))
            if len(step) > 1 or (step and step[0] <= 0) or stop < start:
                raise ValueError
            values = list(range(start, stop + 1, step[0] if step else 1))
    except ValueError:
        raise InputError(f"bad shape {text!r}: a bracket is START:STOP[:STEP] (STOP included) or a list "
                         f"like 1,4,8") from None
    return values


def shape_sets(texts: Sequence[str]) -> list[ShapeSet]:
    """``--shape`` values -> shape sets, one plan each.

    Repeating an input name gives several sets (``x:1x3x8x8 x:8x3x8x8`` -> two), and so does a
    bracket (:func:`expand_shape`: ``ids:1x[8:32:8]`` -> four); with several inputs, the i-th shape
    of every input forms the i-th set, so each input needs as many.
    """
    per_input: dict[str, list[tuple[int, ...]]] = {}
    for text in (t for given in texts for t in expand_shape(given)):
        name, shape = reader.parse_shape(text)
        per_input.setdefault(name, []).append(shape)
    counts = {name: len(shapes) for name, shapes in per_input.items()}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{name}: {n}" for name, n in counts.items())
        raise InputError(f"--shape: every input needs the same number of shapes (they pair up in order), got {listed}")
    n = next(iter(counts.values()), 0)
    sets = [{name: shapes[i] for name, shapes in per_input.items()} for i in range(n)]
    return [s for i, s in enumerate(sets) if s not in sets[:i]]


def predicted_speedup(plan: Plan) -> Optional[float]:
    """Profiled time of onnxruntime's own kernels over the chosen ones, on the plan's heavy nodes."""
    pairs = [(n.ort_ms, n.time_ms) for n in plan.nodes if n.spec and n.ort_ms and n.time_ms]
    if not pairs:
        return None
    return sum(o for o, _ in pairs) / sum(t for _, t in pairs)


@dataclass
class WarmupResult:
    """One model and shape set of a warm-up: found, made, or failed (a row of the summary)."""

    model: str
    shapes: dict[str, list[int]] = field(default_factory=dict)
    status: str = "failed"             # "cached" | "profiled" | "rechecked" (an unverified plan made again) | "failed"
    measured: int = 0                  # candidate timings measured now
    reused: int = 0                    # candidate timings found in the cache
    plan_policy: str = ""              # the plan's policy: "profiled" | "partial"
    measured_under_load: bool = False  # other processes used the cores while it was profiled
    verified: bool = False             # the plan was checked end to end on this machine
    predicted_ms: Optional[float] = None
    speedup: Optional[float] = None    # :func:`predicted_speedup`
    program: str = ""                  # stored program: "cached" | "compiled" (now) | "missing" (not stored)
    error: str = ""
    note: str = ""                     # what was left to onnxruntime and why, or why a plan was raced again
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status != "failed"

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__} | {"ok": self.ok}


def find_models(paths: Sequence[os.PathLike]) -> list[tuple[Path, str]]:
    """(model file, problem) for each of ``paths``: files as given, directories searched for ``*.onnx``."""
    found: list[tuple[Path, str]] = []
    for p in map(Path, paths):
        if p.is_dir():
            models = sorted(f for f in p.rglob("*.onnx") if f.is_file())
            found += [(f, "") for f in models] or [(p, f"no *.onnx files under {p}")]
        elif p.exists():
            found.append((p, ""))
        else:
            found.append((p, f"model file not found: {p}"))
    return list(dict.fromkeys(found))


def warmup(paths: Sequence[os.PathLike], shapes_list: Sequence[Mapping[str, Sequence[int]]] = (),
           cache_dir: Optional[os.PathLike] = None, progress: Optional[Callable[[str], None]] = None,
           **profile_options: Any) -> list[WarmupResult]:
    """Make the missing plans of every model under ``paths`` for every shape set; one result each.

    No shape sets means each model's declared shapes. ``profile_options`` go to
    :func:`fastrun.workflows.profile.profile`, which makes plans with
    :func:`fastrun.workflows.profile.make_and_store_plan` (``op_limit``, ``budget``, ``verify``...); the
    end-to-end measurement against onnxruntime is skipped unless ``measure=True`` is among them.
    """
    profile_options.setdefault("measure", False)
    allowed = precisions.policy(profile_options.get("precision"), profile_options.get("tolerance"))
    profile_options.update(precision=allowed.precision, tolerance=allowed.tolerance,
                           engines=engine_choice.allowed(profile_options.get("engines")))
    sets: list[Optional[Mapping[str, Sequence[int]]]] = list(shapes_list) or [None]
    caches = Caches(cache_dir)
    fingerprint = fp.fingerprint()
    results = []
    try:
        for path, problem in find_models(paths):
            for shapes in sets:
                if problem:
                    results.append(WarmupResult(model=str(path), error=problem))
                    break
                if progress:
                    progress(f"{path}: {shapes_text(shapes) if shapes else 'declared shapes'}")
                results.append(_warm_one(path, shapes, caches, fingerprint, progress, profile_options))
    finally:
        caches.close()
    return results


def _warm_one(path: Path, shapes: Optional[Mapping[str, Sequence[int]]], caches: Caches, fingerprint: str,
              progress: Optional[Callable[[str], None]], options: dict[str, Any]) -> WarmupResult:
    start = time.perf_counter()
    result = WarmupResult(model=str(path), shapes={k: list(v) for k, v in (shapes or {}).items()})
    try:
        model, data = reader.read_model(path)
        reader.input_shapes(model, shapes)  # the caller's shapes must fit the model
        try:
            graph = reader.from_proto(model, data, shapes)
        except Exception:  # the front end cannot take it: profile stores onnxruntime's plan, or its refusal
            return _fall_back(path, shapes, caches, result, start, options)
        result.shapes = {k: list(v) for k, v in graph.input_shapes().items()}
        exact = bool(options.get("exact"))
        precision = options["precision"]
        checked = options.get("verify", True)
        engines = options["engines"] if checked else None
        plan = _complete_plan(caches, fingerprint, graph, exact, precision, checked, engines)
        result.status = "cached"
        if plan is None:
            with caches.profiling_lock():
                plan = _complete_plan(caches, fingerprint, graph, exact, precision, checked, engines)  # made meanwhile?
                if plan is None:
                    earlier = lookup.find_plan(caches, fingerprint, graph, exact, precision)
                    if earlier is not None and earlier.measured_under_load:  # its timings are suspect too
                        options = dict(options, refresh=True)
                    report = profiling.profile(path, shapes, cache_dir=caches.root, progress=progress, **options)
                    unverified = (checked and earlier is not None and earlier.policy != "partial"
                                  and not earlier.verified and not earlier.measured_under_load)
                    result.status = "rechecked" if unverified else "profiled"
                    if earlier is not None and earlier.verified and engines is not None:
                        why = engine_choice.race_again_reason(earlier, engines)
                        result.note = f"raced again: {why}" if why else ""
                    result.measured, result.reused = report.stats.measured, report.stats.from_cache
                    plan = lookup.find_plan(caches, fingerprint, graph, exact, precision)
                    if plan is None:
                        raise FastrunError(f"the plan could not be stored in {caches.root} (read-only?)")
        result.plan_policy, result.predicted_ms, result.speedup = plan.policy, plan.predicted_ms, predicted_speedup(plan)
        result.measured_under_load, result.verified = plan.measured_under_load, plan.verified
        result.program = _ensure_program(caches, plan, graph, model, path, fresh=result.status != "cached")
    except FastrunError as exc:
        result.status, result.error = "failed", str(exc)
    except Exception as exc:  # a bug on one model must not stop the others
        log.debug("warm-up of %s failed", path, exc_info=True)
        result.status, result.error = "failed", f"{type(exc).__name__}: {exc}"
    result.seconds = time.perf_counter() - start
    return result


def _fall_back(path: Path, shapes: Optional[Mapping[str, Sequence[int]]], caches: Caches, result: WarmupResult,
               start: float, options: dict[str, Any]) -> WarmupResult:
    """A model the front end cannot take: the plan that runs it on onnxruntime as is (or its refusal)."""
    try:
        report = profiling.profile(path, shapes, cache_dir=caches.root, **options)
    except FastrunError as exc:
        result.status, result.error = "failed", str(exc)
    else:
        plan = report.plan
        result.shapes = {k: list(v) for k, v in plan.input_shapes.items()}
        result.status, result.plan_policy, result.program = "profiled", plan.policy, "compiled"
        result.note = f"left to onnxruntime (the original model runs as is): {plan.fallback_reason}"
    result.seconds = time.perf_counter() - start
    return result


def _ensure_program(caches: Caches, plan: Plan, graph: graph_mod.Graph, model, path: Path, fresh: bool) -> str:
    """Store the plan's compiled program unless it is there (``fresh``: profiling just stored it)."""
    if caches.programs.has(plan):
        return "compiled" if fresh else "cached"
    recipe = compiler.build_recipe(graph, plan, original=OriginalModelSource(str(path)))
    return "compiled" if caches.programs.save(plan, recipe, reader.declared_interface(model)) else "missing"


def _complete_plan(caches: Caches, fingerprint: str, graph: graph_mod.Graph, exact: bool = False,
                   precision: str = precisions.FP32, checked: bool = True,
                   engines: Optional[Sequence[str]] = None) -> Optional[Plan]:
    """The cached plan, unless there is none, its profiling ran out of budget (then it resumes),
    it was measured under load and the machine is quiet now (then it is measured again) or, when
    plans are ``checked``, it was not checked end to end here or its race the allowed ``engines``
    would change (then it is checked again)."""
    plan = lookup.find_plan(caches, fingerprint, graph, exact, precision)
    if plan is None or plan.policy == "partial" or (checked and not plan.verified):
        return None
    if engines is not None and engine_choice.race_again_reason(plan, engines):
        return None
    if plan.measured_under_load and not load.check().busy:
        return None
    return plan
