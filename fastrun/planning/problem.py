"""The selection problem as plain data, what an answer costs, and the baselines.

A :class:`SearchProblem` holds one implementation choice list per node and the reorder costs per
tensor; an :class:`Assignment` is one answer with its cost. :func:`greedy` (fastest per node) and
:func:`brute_force` (the oracle for tests) solve it without the MILP of
:mod:`fastrun.planning.search`. Everything is JSON-able and knows nothing about ONNX.
"""
from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Union


__all__ = [
    "Choice", "SearchNode", "SearchProblem", "Assignment", "InfeasibleError",
    "evaluate", "greedy", "restricted", "brute_force", "lower_bound",
]


INF = math.inf


_TINY = 1e-12


BRUTE_FORCE_LIMIT = 1_000_000


class InfeasibleError(ValueError):
    """No selection has a finite cost (every way through needs an unusable choice or reorder)."""


def finite(x: float) -> bool:
    return x == x and -INF < x < INF


def _j(x: float) -> Any:
    """A float for JSON: non-finite values become strings, strict JSON parsers choke on Infinity."""
    return x if finite(x) else ("inf" if x > 0 else "-inf" if x < 0 else "nan")


def _f(x: Any) -> float:
    return float(x)  # float("inf") / float("nan") parse the strings written by _j


@dataclass
class Choice:
    """One way to run a node: an implementation plus the formats it reads and writes."""

    impl: str
    in_formats: tuple[str, ...]
    out_format: str
    cost: float

    def __post_init__(self) -> None:
        self.in_formats = tuple(self.in_formats)

    def to_json(self) -> dict:
        return {"impl": self.impl, "in_formats": list(self.in_formats),
                "out_format": self.out_format, "cost": _j(self.cost)}

    @classmethod
    def from_json(cls, d: dict) -> "Choice":
        return cls(d["impl"], tuple(d["in_formats"]), d["out_format"], _f(d["cost"]))


@dataclass
class SearchNode:
    name: str
    inputs: list[str]
    outputs: list[str]
    choices: list[Choice]

    def to_json(self) -> dict:
        return {"name": self.name, "inputs": list(self.inputs), "outputs": list(self.outputs),
                "choices": [c.to_json() for c in self.choices]}

    @classmethod
    def from_json(cls, d: dict) -> "SearchNode":
        return cls(d["name"], list(d["inputs"]), list(d["outputs"]),
                   [Choice.from_json(c) for c in d["choices"]])


@dataclass
class SearchProblem:
    nodes: list[SearchNode]
    input_formats: dict[str, str]
    output_formats: dict[str, str]
    reorder_costs: dict[str, dict[str, float]] = field(default_factory=dict)

    def reorder_cost(self, tensor: str, src: str, dst: str) -> float:
        """Cost of reordering ``tensor`` from ``src`` to ``dst``: 0 if equal, inf if not offered."""
        if src == dst:
            return 0.0
        return self.reorder_costs.get(tensor, {}).get(f"{src}>{dst}", INF)

    def to_json(self) -> dict:
        return {"nodes": [n.to_json() for n in self.nodes],
                "input_formats": dict(self.input_formats),
                "output_formats": dict(self.output_formats),
                "reorder_costs": {t: {k: _j(v) for k, v in d.items()}
                                  for t, d in self.reorder_costs.items()}}

    @classmethod
    def from_json(cls, d: Union[dict, str]) -> "SearchProblem":
        if isinstance(d, str):
            d = json.loads(d)
        return cls([SearchNode.from_json(n) for n in d["nodes"]], dict(d["input_formats"]),
                   dict(d["output_formats"]),
                   {t: {k: _f(v) for k, v in r.items()} for t, r in d.get("reorder_costs", {}).items()})


@dataclass
class Assignment:
    """A selection and what it costs; ``status`` says how much to trust it.

    ``status``: ``"optimal"`` (proven), ``"feasible"`` (finite cost, optimality not proven:
    see ``lower_bound``/``gap``), ``"heuristic"`` (greedy baseline), ``"infeasible"``
    (the selection needs an unusable choice or a reorder that is not offered: cost is inf).
    """

    choices: dict[str, int]
    formats: dict[str, str]
    reorders: list[tuple[str, str, str]]
    cost: float
    lower_bound: float
    gap: float
    status: str
    method: str
    seconds: float

    def to_json(self) -> dict:
        return {"choices": dict(self.choices), "formats": dict(self.formats),
                "reorders": [list(r) for r in self.reorders], "cost": _j(self.cost),
                "lower_bound": _j(self.lower_bound), "gap": _j(self.gap),
                "status": self.status, "method": self.method, "seconds": self.seconds}

    @classmethod
    def from_json(cls, d: Union[dict, str]) -> "Assignment":
        if isinstance(d, str):
            d = json.loads(d)
        return cls(choices={k: int(v) for k, v in d["choices"].items()},
                   formats=dict(d["formats"]),
                   reorders=[tuple(r) for r in d["reorders"]],
                   cost=_f(d["cost"]), lower_bound=_f(d["lower_bound"]), gap=_f(d["gap"]),
                   status=d["status"], method=d["method"], seconds=float(d["seconds"]))


def relative_gap(cost: float, lb: float) -> float:
    if not finite(cost):
        return INF
    if not finite(lb):
        return INF if lb < cost else 0.0
    return max(0.0, (cost - lb) / max(abs(cost), _TINY))


def validate(problem: SearchProblem) -> dict[str, int]:
    """Validate the structure; return tensor -> producer node index (-1: graph input).

    Why: a wrong problem (unknown tensor, non-topological order, arity mismatch) must fail
    loudly here, not turn into a silently "optimal" nonsense plan.
    """
    producer: dict[str, int] = {t: -1 for t in problem.input_formats}
    names = set()
    for i, node in enumerate(problem.nodes):
        if node.name in names:
            raise ValueError(f"duplicate node name {node.name!r}")
        names.add(node.name)
        if not node.choices:
            raise ValueError(f"node {node.name!r} has no choices")
        for t in node.inputs:
            if t not in producer:
                raise ValueError(f"node {node.name!r} reads {t!r}, which is neither a graph input "
                                 "nor produced by an earlier node (nodes must be in topological order)")
        for c in node.choices:
            if len(c.in_formats) != len(node.inputs):
                raise ValueError(f"node {node.name!r} choice {c.impl!r}: {len(c.in_formats)} input "
                                 f"formats for {len(node.inputs)} inputs")
        for t in node.outputs:
            if t in producer:
                raise ValueError(f"tensor {t!r} is produced twice (or is also a graph input)")
            producer[t] = i
    for t in problem.output_formats:
        if t not in producer:
            raise ValueError(f"graph output {t!r} is never produced")
    for t, d in problem.reorder_costs.items():
        for k, v in d.items():
            if ">" not in k:
                raise ValueError(f"reorder key {k!r} of {t!r} is not 'SRC>DST'")
            if v < 0:
                raise ValueError(f"negative reorder cost {v} for {t!r} {k}")
    return producer


def lower_bound(problem: SearchProblem) -> float:
    """A cheap proven lower bound: every node at its cheapest usable choice, no reorders.

    Why: it gives the greedy baseline and fixed selections an honest gap at no cost.
    """
    total = []
    for node in problem.nodes:
        fin = [c.cost for c in node.choices if finite(c.cost)]
        if not fin:
            return INF
        total.append(min(fin))
    return math.fsum(total)


def _assemble(problem: SearchProblem, choices: dict[str, int]) -> tuple[dict, list, list, list]:
    formats: dict[str, str] = dict(problem.input_formats)
    needs: dict[str, set[str]] = {}
    node_costs: list[float] = []
    for node in problem.nodes:
        if node.name not in choices:
            raise KeyError(f"no choice given for node {node.name!r}")
        k = choices[node.name]
        if not 0 <= k < len(node.choices):
            raise IndexError(f"choice {k} out of range for node {node.name!r} ({len(node.choices)} choices)")
        c = node.choices[k]
        node_costs.append(c.cost)
        for t, g in zip(node.inputs, c.in_formats):
            needs.setdefault(t, set()).add(g)
        for t in node.outputs:
            formats[t] = c.out_format
    for t, g in problem.output_formats.items():
        needs.setdefault(t, set()).add(g)
    reorders = sorted((t, formats[t], g) for t, gs in needs.items() for g in gs if g != formats[t])
    reorder_costs = [problem.reorder_cost(t, s, d) for t, s, d in reorders]
    return formats, reorders, node_costs, reorder_costs


def evaluate(problem: SearchProblem, choices: dict[str, int]) -> Assignment:
    """The exact cost of a given selection (reorders shared per tensor and format).

    Why: the single source of truth for what a selection costs; every solver's answer is
    re-priced through it, so all methods report comparable numbers.
    """
    t0 = time.perf_counter()
    validate(problem)
    res = assess(problem, choices)
    res.seconds = time.perf_counter() - t0
    return res


def assess(problem: SearchProblem, choices: dict[str, int], lb: Optional[float] = None,
           status: str = "feasible", method: str = "fixed") -> Assignment:
    formats, reorders, node_costs, reorder_costs = _assemble(problem, choices)
    terms = node_costs + reorder_costs
    if any(x != x for x in terms):
        cost = math.nan
    elif any(x == INF for x in terms):
        cost = INF
    else:
        cost = math.fsum(terms)  # exact rounding: the same selection always prices the same
    if lb is None:
        lb = lower_bound(problem)
    if not finite(cost):
        status = "infeasible"
    elif finite(lb) and lb > cost:
        lb = cost
    return Assignment(choices={n.name: int(choices[n.name]) for n in problem.nodes},
                      formats=formats, reorders=reorders, cost=cost, lower_bound=lb,
                      gap=relative_gap(cost, lb), status=status, method=method, seconds=0.0)


def greedy(problem: SearchProblem) -> Assignment:
    """Each node's cheapest choice, ignoring reorders (ties: first): the baseline to beat.

    Why: this is what per-node autotuning without a global view does; comparing against it
    measures what the global search is worth.
    """
    t0 = time.perf_counter()
    validate(problem)
    sel = {}
    for node in problem.nodes:
        best, best_cost = 0, INF
        for i, c in enumerate(node.choices):
            if finite(c.cost) and c.cost < best_cost:
                best, best_cost = i, c.cost
        sel[node.name] = best
    res = assess(problem, sel, status="heuristic", method="greedy")
    res.seconds = time.perf_counter() - t0
    return res


def restricted(problem: SearchProblem, allowed_formats: Iterable[str]) -> SearchProblem:
    """The same problem where only choices whose formats are all in ``allowed_formats`` remain.

    Why: baselines such as "NCHW only" are the same search over fewer formats. Disallowed
    choices are kept but priced ``math.inf`` (unusable), so choice indices stay valid for the
    original problem and an Assignment of the restricted problem can be re-priced with
    ``evaluate(problem, a.choices)``. Graph input/output formats are left as they are.
    """
    allowed = set(allowed_formats)
    nodes = []
    for n in problem.nodes:
        cs = []
        for c in n.choices:
            ok = c.out_format in allowed and all(f in allowed for f in c.in_formats)
            cs.append(Choice(c.impl, tuple(c.in_formats), c.out_format, c.cost if ok else INF))
        nodes.append(SearchNode(n.name, list(n.inputs), list(n.outputs), cs))
    return SearchProblem(nodes, dict(problem.input_formats), dict(problem.output_formats),
                         {t: dict(d) for t, d in problem.reorder_costs.items()})


def brute_force(problem: SearchProblem, limit: int = BRUTE_FORCE_LIMIT) -> Assignment:
    """Try every combination of finite-cost choices (tests only: the oracle for :func:`solve`).

    Why: independent of the MILP model and of the pruning, so it checks both. Refuses
    (ValueError) above ``limit`` combinations; raises InfeasibleError if all are infinite.
    """
    t0 = time.perf_counter()
    validate(problem)
    nodes = problem.nodes
    opts = [[k for k, c in enumerate(n.choices) if finite(c.cost)] for n in nodes]
    count = 1
    for o in opts:
        count *= len(o)
        if count > limit:
            raise ValueError(f"brute force refuses more than {limit} combinations")
    if count == 0:
        raise InfeasibleError("a node has no finite-cost choice")

    # compiled evaluation: tensors numbered, reorder prices looked up in a dict
    tid = {t: j for j, t in enumerate(list(problem.input_formats) + [t for n in nodes for t in n.outputs])}
    inputs_fixed = [(tid[t], f) for t, f in problem.input_formats.items()]
    outs = [(tid[t], g) for t, g in problem.output_formats.items()]
    per_node = []
    for n, o in zip(nodes, opts):
        per_node.append([(n.choices[k].cost, [(tid[t], g) for t, g in zip(n.inputs, n.choices[k].in_formats)],
                          n.choices[k].out_format, [tid[t] for t in n.outputs]) for k in o])
    names = {j: t for t, j in tid.items()}
    price_cache: dict[tuple[int, str, str], float] = {}

    def price(j: int, f: str, g: str) -> float:
        key = (j, f, g)
        v = price_cache.get(key)
        if v is None:
            v = price_cache[key] = problem.reorder_cost(names[j], f, g)
        return v

    best, best_cost = None, INF
    nt = len(tid)
    for combo in itertools.product(*[range(len(o)) for o in opts]):
        fmt: list[Optional[str]] = [None] * nt
        for j, f in inputs_fixed:
            fmt[j] = f
        cost = 0.0
        needs = set(outs)
        for pn, k in zip(per_node, combo):
            cc, ins, of, os_ = pn[k]
            cost += cc
            needs.update(ins)
            for j in os_:
                fmt[j] = of
        for j, g in needs:
            if fmt[j] != g:
                cost += price(j, fmt[j], g)
        if cost < best_cost:
            best, best_cost = combo, cost
    if best is None:
        raise InfeasibleError("every combination has infinite cost")
    sel = {n.name: opts[i][best[i]] for i, n in enumerate(nodes)}
    a = assess(problem, sel, status="optimal", method="bruteforce")
    a.lower_bound, a.gap = a.cost, 0.0
    a.seconds = time.perf_counter() - t0
    return a
