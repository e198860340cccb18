"""Global selection: one implementation per node and one memory format per tensor.

The problem is a graph problem, not a per-node one. Total cost is

    sum over nodes of the chosen implementation's predicted time
  + sum over tensors t and formats g != format(t) that somebody reads t in, of reorder(t, f->g)

where a reorder of ``t`` into ``g`` is paid ONCE however many consumers read ``t`` in ``g``
(and graph outputs must be delivered in their required format, sharing such reorders).
Picking each node's fastest implementation in isolation ("greedy") ignores the reorders its
formats force on its neighbours; :func:`solve` minimises the whole sum exactly with a small
mixed-integer program solved by HiGHS (``scipy.optimize.milp``).

Everything here is plain data (dataclasses, JSON-able) and knows nothing about ONNX: the
caller turns a graph plus profiled timings into a :class:`SearchProblem` and turns the
:class:`Assignment` back into a plan.

MILP formulation (only over what is actually free after pruning):

* ``x[n,c]`` binary: node ``n`` uses its choice ``c``; ``sum_c x[n,c] = 1``.
* ``p[t,f]`` (an expression, not a variable): ``t`` is produced in ``f``
  = sum of the producer's ``x`` whose ``out_format`` is ``f`` (a constant for graph inputs
  and for tensors with one possible format).
* ``y[t,g]`` in [0, 1]: ``t`` is needed in ``g``; ``y >= sum of x[n,c] over the choices c of
  consumer n that read t in g`` for each consumer n; the constant 1 for a required graph-output
  format or when a consumer reads ``t`` in ``g`` whatever it chooses. It need not be declared
  integer: for integral ``x`` the cheapest feasible ``y`` is integral.
* ``z[t,f,g]`` in [0, 1] for ``f != g``: the reorder ``t: f->g`` is done;
  ``z >= p[t,f] + y[t,g] - 1`` and (aggregated, a tighter relaxation)
  ``sum_f z[t,f,g] >= y[t,g] - 1 + sum_f p[t,f]`` over the ``f`` with a positive finite cost.
  Where ``p`` or ``y`` is constant the product collapses and no ``z`` is created.
* impossible reorders (missing pairs): ``p[t,f] + y[t,g] <= 1``.
"""
from __future__ import annotations

import itertools
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Union

import numpy as np

__all__ = [
    "Choice", "SearchNode", "SearchProblem", "Assignment", "InfeasibleError",
    "evaluate", "greedy", "restricted", "solve", "brute_force", "lower_bound",
]

INF = math.inf
_TINY = 1e-12
BRUTE_FORCE_LIMIT = 1_000_000


class InfeasibleError(ValueError):
    """No selection has a finite cost (every way through needs an unusable choice or reorder)."""


def _finite(x: float) -> bool:
    return x == x and -INF < x < INF


def _j(x: float) -> Any:
    """A float for JSON: non-finite values become strings, strict JSON parsers choke on Infinity."""
    return x if _finite(x) else ("inf" if x > 0 else "-inf" if x < 0 else "nan")


def _f(x: Any) -> float:
    return float(x)  # float("inf") / float("nan") parse the strings written by _j


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


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


def _gap(cost: float, lb: float) -> float:
    if not _finite(cost):
        return INF
    if not _finite(lb):
        return INF if lb < cost else 0.0
    return max(0.0, (cost - lb) / max(abs(cost), _TINY))


# --------------------------------------------------------------------------------------------
# validation and evaluation
# --------------------------------------------------------------------------------------------


def _check(problem: SearchProblem) -> dict[str, int]:
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
        fin = [c.cost for c in node.choices if _finite(c.cost)]
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
    _check(problem)
    res = _evaluate(problem, choices)
    res.seconds = time.perf_counter() - t0
    return res


def _evaluate(problem: SearchProblem, choices: dict[str, int], lb: Optional[float] = None,
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
    if not _finite(cost):
        status = "infeasible"
    elif _finite(lb) and lb > cost:
        lb = cost
    return Assignment(choices={n.name: int(choices[n.name]) for n in problem.nodes},
                      formats=formats, reorders=reorders, cost=cost, lower_bound=lb,
                      gap=_gap(cost, lb), status=status, method=method, seconds=0.0)


def greedy(problem: SearchProblem) -> Assignment:
    """Each node's cheapest choice, ignoring reorders (ties: first): the baseline to beat.

    Why: this is what per-node autotuning without a global view does; comparing against it
    measures what the global search is worth.
    """
    t0 = time.perf_counter()
    _check(problem)
    sel = {}
    for node in problem.nodes:
        best, best_cost = 0, INF
        for i, c in enumerate(node.choices):
            if _finite(c.cost) and c.cost < best_cost:
                best, best_cost = i, c.cost
        sel[node.name] = best
    res = _evaluate(problem, sel, status="heuristic", method="greedy")
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


# --------------------------------------------------------------------------------------------
# pruning
# --------------------------------------------------------------------------------------------


class _Pruned:
    """Per node, the choices that can take part in a finite-cost selection."""

    def __init__(self, problem: SearchProblem, producer: dict[str, int]):
        self.problem = problem
        self.producer = producer
        nodes = problem.nodes
        # consumers[t] = list of (node index, positions where it reads t)
        self.consumers: dict[str, list[tuple[int, list[int]]]] = {}
        for i, node in enumerate(nodes):
            pos: dict[str, list[int]] = {}
            for j, t in enumerate(node.inputs):
                pos.setdefault(t, []).append(j)
            for t, js in pos.items():
                self.consumers.setdefault(t, []).append((i, js))
        self.usable: list[list[int]] = [
            [k for k, c in enumerate(n.choices) if _finite(c.cost)] for n in nodes]
        self._fixpoint()

    def possible(self, t: str) -> set[str]:
        p = self.producer[t]
        if p < 0:
            return {self.problem.input_formats[t]}
        node = self.problem.nodes[p]
        return {node.choices[k].out_format for k in self.usable[p]}

    def _ok(self, t: str, f: str, g: str) -> bool:
        return f == g or _finite(self.problem.reorder_cost(t, f, g))

    def _fixpoint(self) -> None:
        """Forward: a choice needs each input reachable from some possible format of it.
        Backward: an output format must let every consumer keep some choice, and reach the
        required graph-output format. Repeat until nothing changes."""
        prob = self.problem
        nodes = prob.nodes
        changed = True
        while changed:
            changed = False
            poss: dict[str, set[str]] = {t: {f} for t, f in prob.input_formats.items()}
            for i, node in enumerate(nodes):
                keep = []
                for k in self.usable[i]:
                    c = node.choices[k]
                    if not all(any(self._ok(t, f, g) for f in poss[t])
                               for t, g in zip(node.inputs, c.in_formats)):
                        continue
                    if not all(self._ok(t, c.out_format, prob.output_formats[t])
                               for t in node.outputs if t in prob.output_formats):
                        continue
                    keep.append(k)
                changed |= self._narrow(i, keep, "has no usable choice (all infinite, or their formats "
                                                 "cannot be reached)")
                outs = {node.choices[k].out_format for k in keep}
                for t in node.outputs:
                    poss[t] = outs
            for i in range(len(nodes) - 1, -1, -1):
                node = nodes[i]
                keep = []
                for k in self.usable[i]:
                    f = node.choices[k].out_format
                    ok = True
                    for t in node.outputs:
                        for n2, js in self.consumers.get(t, ()):
                            cand = nodes[n2].choices
                            if not any(all(self._ok(t, f, cand[k2].in_formats[j]) for j in js)
                                       for k2 in self.usable[n2]):
                                ok = False
                                break
                        if not ok:
                            break
                    if ok:
                        keep.append(k)
                changed |= self._narrow(i, keep, "has no choice whose output format its consumers can read")

    def _narrow(self, i: int, keep: list[int], why: str) -> bool:
        """Keep only ``keep`` of node ``i``'s usable choices; whether that removed any."""
        if not keep:
            raise InfeasibleError(f"node {self.problem.nodes[i].name!r} {why}")
        removed = len(keep) != len(self.usable[i])
        self.usable[i] = keep
        return removed


# --------------------------------------------------------------------------------------------
# exact solver
# --------------------------------------------------------------------------------------------


class _Model:
    """Sparse MILP under construction: columns, objective, rows."""

    def __init__(self) -> None:
        self.c: list[float] = []
        self.integer: list[int] = []
        self.rows: list[int] = []
        self.cols: list[int] = []
        self.vals: list[float] = []
        self.lo: list[float] = []
        self.hi: list[float] = []
        self.ub: list[float] = []
        self.constant: list[float] = []

    def var(self, cost: float = 0.0, integer: bool = False) -> int:
        self.c.append(cost)
        self.integer.append(1 if integer else 0)
        self.ub.append(1.0)
        return len(self.c) - 1

    def row(self, coefs: Iterable[tuple[int, float]], lo: float, hi: float) -> None:
        r = len(self.lo)
        for j, v in coefs:
            self.rows.append(r)
            self.cols.append(j)
            self.vals.append(v)
        self.lo.append(lo)
        self.hi.append(hi)


def _build(pr: _Pruned):
    """Translate the pruned problem into the MILP described in the module docstring."""
    prob = pr.problem
    nodes = prob.nodes
    m = _Model()
    xvar: dict[tuple[int, int], int] = {}   # (node, choice) -> column
    for i, node in enumerate(nodes):
        ks = pr.usable[i]
        if len(ks) == 1:
            m.constant.append(node.choices[ks[0]].cost)
            continue
        cols = [m.var(node.choices[k].cost, integer=True) for k in ks]
        for k, j in zip(ks, cols):
            xvar[(i, k)] = j
        m.row(((j, 1.0) for j in cols), 1.0, 1.0)

    def choice_expr(i: int, ks: list[int]):
        """sum of x over choices ks of node i: (constant, [columns])."""
        if len(pr.usable[i]) == 1:
            return (1.0 if ks else 0.0), []
        if len(ks) == len(pr.usable[i]):
            return 1.0, []
        return 0.0, [xvar[(i, k)] for k in ks]

    tensors = list(prob.input_formats) + [t for n in nodes for t in n.outputs]
    for t in tensors:
        p_node = pr.producer[t]
        # p[t,f] as (constant, columns)
        if p_node < 0:
            P = {prob.input_formats[t]: (1.0, [])}
        else:
            byf: dict[str, list[int]] = {}
            for k in pr.usable[p_node]:
                byf.setdefault(nodes[p_node].choices[k].out_format, []).append(k)
            P = {f: choice_expr(p_node, ks) for f, ks in byf.items()}
        # demands per format: list of (constant, columns) one per consumer; forced if constant 1
        G: dict[str, list[tuple[float, list[int]]]] = {}
        for n2, js in pr.consumers.get(t, ()):
            byg: dict[str, list[int]] = {}
            for k in pr.usable[n2]:
                for j in js:
                    g = nodes[n2].choices[k].in_formats[j]
                    lst = byg.setdefault(g, [])
                    if not lst or lst[-1] != k:
                        lst.append(k)
            for g, ks in byg.items():
                G.setdefault(g, []).append(choice_expr(n2, ks))
        if t in prob.output_formats:
            G.setdefault(prob.output_formats[t], []).append((1.0, []))

        for g, demands in G.items():
            others = [f for f in P if f != g and prob.reorder_cost(t, f, g) != 0.0]
            if not others:
                continue  # t is produced in g, or reordering into g is free
            forced = any(cst >= 1.0 for cst, _ in demands)
            if forced:
                y = None
            else:
                y = m.var(0.0)
                for cst, cols in demands:
                    if cols:
                        m.row([(y, 1.0)] + [(j, -1.0) for j in cols], 0.0, INF)
            zcols = []
            pos_p: list[tuple[float, list[int]]] = []
            for f in others:
                r = prob.reorder_cost(t, f, g)
                pc, pcols = P[f]
                if r == INF:
                    # p[t,f] + y[t,g] <= 1
                    if y is None:
                        if pc >= 1.0:
                            raise InfeasibleError(f"tensor {t!r} must be reordered {f}>{g}, "
                                                  "which is not offered")
                        m.row(((j, 1.0) for j in pcols), -INF, 0.0)
                    elif pc >= 1.0:
                        m.ub[y] = 0.0
                    else:
                        m.row([(y, 1.0)] + [(j, 1.0) for j in pcols], -INF, 1.0)
                    continue
                pos_p.append((pc, pcols))
                if y is None and pc >= 1.0:
                    m.constant.append(r)
                elif y is None:
                    for j in pcols:
                        m.c[j] += r
                elif pc >= 1.0:
                    m.c[y] += r
                else:
                    z = m.var(r)
                    zcols.append(z)
                    # z >= p + y - 1
                    m.row([(z, 1.0), (y, -1.0)] + [(j, -1.0) for j in pcols], -1.0, INF)
            if y is not None and len(zcols) >= 2:
                # sum z >= y - 1 + sum p  (valid since exactly one p is 1; tighter than McCormick)
                m.row([(z, 1.0) for z in zcols] + [(y, -1.0)]
                      + [(j, -1.0) for _, cols in pos_p for j in cols], -1.0, INF)
    return m, xvar


def _run_highs(m: _Model, time_limit: float):
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_matrix

    n = len(m.c)
    c = np.asarray(m.c, dtype=float)
    scale = 1.0
    mx = float(np.max(np.abs(c))) if n else 0.0
    if mx > 0:
        scale = 100.0 / mx  # keep HiGHS's absolute tolerances meaningful for ms- or s-sized costs
    constraints = ()
    if m.lo:
        A = csr_matrix((m.vals, (m.rows, m.cols)), shape=(len(m.lo), n))
        constraints = (LinearConstraint(A, np.asarray(m.lo), np.asarray(m.hi)),)
    opts = {"time_limit": max(float(time_limit), 0.01), "mip_rel_gap": 1e-9,
            "presolve": True, "disp": False}
    extra = {"mip_abs_gap": 1e-9}
    kw = dict(integrality=np.asarray(m.integer), bounds=Bounds(np.zeros(n), np.asarray(m.ub)),
              constraints=constraints)
    try:
        with warnings.catch_warnings():
            # scipy passes options it does not know to HiGHS verbatim, and warns that it does;
            # the default absolute gap (1e-6) would let "optimal" differ from the optimum
            warnings.simplefilter("ignore", RuntimeWarning)
            res = milp(c * scale, options={**opts, **extra}, **kw)
    except (TypeError, ValueError):  # a scipy that refuses unknown options
        res = milp(c * scale, options=opts, **kw)
    return res, scale


def solve(problem: SearchProblem, time_limit: float = 10.0) -> Assignment:
    """The selection of minimum total cost (node costs + shared reorders), proven optimal.

    Why: per-node choices ignore the reorders they force on neighbours; only a global search
    sees that e.g. a cheap NHWC kernel between two blocked convolutions costs two reorders.
    Falls back to the best known selection with status "feasible" and an honest gap if HiGHS
    fails or runs out of ``time_limit`` seconds. Raises :class:`InfeasibleError` if no
    selection has a finite cost.
    """
    t0 = time.perf_counter()
    producer = _check(problem)
    pr = _Pruned(problem, producer)
    trivial_lb = lower_bound(problem)
    nodes = problem.nodes

    def selection(pick) -> dict[str, int]:
        return {n.name: pick(i) for i, n in enumerate(nodes)}

    m, xvar = _build(pr)
    if not m.c:  # nothing left to choose
        sel = selection(lambda i: pr.usable[i][0])
        a = _evaluate(problem, sel, status="optimal", method="fixed")
        if not _finite(a.cost):  # pruning is pairwise; should not happen, but never claim it
            raise InfeasibleError("the only remaining selection has infinite cost")
        a.lower_bound, a.gap = a.cost, 0.0
        a.seconds = time.perf_counter() - t0
        return a

    res, scale = _run_highs(m, time_limit - (time.perf_counter() - t0))
    const = math.fsum(m.constant)
    if res.status == 2:
        raise InfeasibleError("no selection has a finite cost (HiGHS: infeasible)")

    candidates: list[Assignment] = []
    if res.x is not None:
        xv = res.x

        def pick(i: int) -> int:
            ks = pr.usable[i]
            if len(ks) == 1:
                return ks[0]
            return max(ks, key=lambda k: xv[xvar[(i, k)]])

        candidates.append(_evaluate(problem, selection(pick), status="feasible", method="milp"))

    dual = getattr(res, "mip_dual_bound", None)
    lb = trivial_lb
    if dual is not None and _finite(float(dual)):
        lb = max(lb, float(dual) / scale + const)

    if res.status == 0 and candidates and _finite(candidates[0].cost):
        a = candidates[0]
        # HiGHS proved optimality to 1e-9 (relative and absolute on the scaled objective)
        a.status = "optimal"
        if not (_finite(lb) and lb <= a.cost) or a.cost - lb <= 1e-7 * max(abs(a.cost), 1.0):
            lb = a.cost
        a.lower_bound, a.gap = lb, _gap(a.cost, lb)
        a.seconds = time.perf_counter() - t0
        return a

    # time limit or solver trouble: best of what we have, never claimed optimal
    candidates.append(greedy(problem))
    candidates.append(_forward_greedy(problem, pr))
    best = min(candidates, key=lambda a: (a.cost if a.cost == a.cost else INF))
    best.status = "feasible" if _finite(best.cost) else "infeasible"
    best.lower_bound = min(lb, best.cost) if _finite(best.cost) else lb
    best.gap = _gap(best.cost, best.lower_bound)
    best.seconds = time.perf_counter() - t0
    return best


def _forward_greedy(problem: SearchProblem, pr: _Pruned) -> Assignment:
    """Topological greedy that prices the reorders each choice adds given its producers.

    Why: a fallback that, unlike plain greedy, avoids choices whose reorders are not offered.
    """
    formats = dict(problem.input_formats)
    done: set[tuple[str, str]] = set()
    sel: dict[str, int] = {}
    for i, node in enumerate(problem.nodes):
        best, best_cost = pr.usable[i][0], INF
        for k in pr.usable[i]:
            c = node.choices[k]
            extra, seen = c.cost, set()
            for t, g in zip(node.inputs, c.in_formats):
                if (t, g) not in done and (t, g) not in seen:
                    seen.add((t, g))
                    extra += problem.reorder_cost(t, formats[t], g)
            for t in node.outputs:
                if t in problem.output_formats:
                    extra += problem.reorder_cost(t, c.out_format, problem.output_formats[t])
            if extra < best_cost:
                best, best_cost = k, extra
        c = node.choices[best]
        sel[node.name] = best
        done.update(zip(node.inputs, c.in_formats))
        for t in node.outputs:
            formats[t] = c.out_format
    return _evaluate(problem, sel, status="heuristic", method="greedy")


# --------------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------------


def brute_force(problem: SearchProblem, limit: int = BRUTE_FORCE_LIMIT) -> Assignment:
    """Try every combination of finite-cost choices (tests only: the oracle for :func:`solve`).

    Why: independent of the MILP model and of the pruning, so it checks both. Refuses
    (ValueError) above ``limit`` combinations; raises InfeasibleError if all are infinite.
    """
    t0 = time.perf_counter()
    _check(problem)
    nodes = problem.nodes
    opts = [[k for k, c in enumerate(n.choices) if _finite(c.cost)] for n in nodes]
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
    a = _evaluate(problem, sel, status="optimal", method="bruteforce")
    a.lower_bound, a.gap = a.cost, 0.0
    a.seconds = time.perf_counter() - t0
    return a
