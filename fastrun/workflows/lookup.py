"""Finding a model's stored plan: what serving needs, without the profiler."""
from __future__ import annotations

import logging
from typing import Mapping, Optional, Sequence

from fastrun.system import fingerprint as fp
from fastrun.ir import reader
from fastrun.ops import registry
from fastrun.store.cache import Caches
from fastrun.ir.graph import Graph
from fastrun.ir.reader import ModelSource
from fastrun.runtime.plan import Plan
from fastrun.system.precision import FP32
from fastrun.planning.plancheck import plan_problem
from fastrun.ops import builtin  # noqa: F401  (registers the built-in implementations this module queries)

log = logging.getLogger(__name__)


def find_plan(caches: Caches, fingerprint: str, graph: Graph, exact: bool = False,
              precision: str = FP32) -> Optional[Plan]:
    """The cached plan for this graph's model and input shapes (the exact-mode one with ``exact``;
    the one of a precision policy), if one exists and is valid."""
    plan = stored_plan(caches, fingerprint, graph.model_hash, graph.input_shapes(), graph.name, exact, precision)
    if plan is None:
        return None

    why = plan_problem(graph, plan) or _mismatch(plan, graph)
    if why:
        log.warning("ignoring the cached plan for %s: %s", graph.name, why)
        return None
    return plan


def stored_plan(caches: Caches, fingerprint: str, model_hash: str, shapes: Mapping[str, Sequence[int]],
                label: str = "the model", exact: bool = False, precision: str = FP32) -> Optional[Plan]:
    """The cached plan for a model hash and input shapes, checked against everything but the graph
    (versions, machine, registered implementations); :func:`find_plan` checks the graph too."""
    value = caches.plans.get(Caches.plan_key(fingerprint, model_hash, {k: tuple(v) for k, v in shapes.items()},
                                             exact, precision))
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
    if plan.runs_original:
        return None
    names = {n.name for n in graph.nodes}
    if {n.name for n in plan.nodes} != names:
        return "its nodes do not match the model's"
    return None


def implementation_change(plan: Plan) -> Optional[str]:
    """Why the plan's implementations no longer match the registry's (None: they all do)."""
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
    return caches.plans.set(Caches.plan_key(plan.fingerprint, plan.model_hash, shapes, plan.exact,
                                            plan.precision_policy), plan.to_json())


def load_plan(model: ModelSource, input_shapes: Optional[Mapping[str, Sequence[int]]] = None,
              cache_dir: Optional[str] = None, exact: bool = False) -> Optional[Plan]:
    """The cached plan for a model (None when it has not been profiled on this machine)."""
    graph = reader.load(model, input_shapes)
    caches = Caches(cache_dir, writable=False)
    try:
        return find_plan(caches, fp.fingerprint(), graph, exact)
    finally:
        caches.close()
