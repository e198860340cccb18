"""Whole-model candidates: the ways to run a whole model that the end-to-end race weighs against fastrun's plan.

Each candidate is a name and how to make its plan from the selected plan (None: it does not apply
to this graph). The plan says what runs it: ``whole_model`` (onnxruntime on fastrun's specialised
graph) or an ``engine`` of :mod:`fastrun.runtime.engines` (the original model, unchanged). The
race (:func:`fastrun.workflows.verify.verify_plan`) compiles, checks and times every candidate the
same way; adding an engine is one :func:`fastrun.runtime.engines.register` call and one
:func:`register` call here, without touching the race.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

from fastrun.ir.graph import Graph
from fastrun.planning import planner
from fastrun.runtime.engines import OriginalModelSource
from fastrun.runtime.plan import ENGINE_ORIGINAL, Plan

# The default: what a user had without fastrun. Every other candidate must beat it to be kept.
BASELINE = ENGINE_ORIGINAL
SPECIALISED = "onnxruntime"  # onnxruntime on fastrun's specialised graph (``plan.whole_model``)
ONNXRUNTIME = "onnxruntime"  # the engine of both: every race has it (:mod:`fastrun.workflows.engine_choice`)


@dataclass(frozen=True)
class WholeModelCandidate:
    name: str                                             # what ``plan.winner`` reports when it wins
    # its plan from the selected one and the original model (None: it does not apply here)
    make_plan: Callable[[Graph, Plan, Optional[OriginalModelSource]], Optional[Plan]]
    needs_original: bool = True                           # runs the original model (needs its source)
    engine: str = ONNXRUNTIME                             # what runs it: FASTRUN_ENGINES / --engines choose


def engine_plan(plan: Plan, engine: str, reason: str = "") -> Plan:
    """``plan`` handed to a whole-model engine of the original model (its node choices kept for reports)."""
    return dataclasses.replace(plan, engine=engine, whole_model=False, reorders=[], tensor_formats={},
                               segment_threads=[], host_threads=0, fallback_reason=reason)


_CANDIDATES: dict[str, WholeModelCandidate] = {}


def register(candidate: WholeModelCandidate) -> None:
    _CANDIDATES[candidate.name] = candidate


def candidates() -> list[WholeModelCandidate]:
    return list(_CANDIDATES.values())


register(WholeModelCandidate(ENGINE_ORIGINAL, lambda graph, plan, original: engine_plan(plan, ENGINE_ORIGINAL)))
register(WholeModelCandidate(SPECIALISED, lambda graph, plan, original: planner.whole_model_plan(graph, plan),
                             needs_original=False))
