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

import math
import time
import warnings
from typing import Iterable

import numpy as np

from fastrun.planning.problem import (INF, Assignment, InfeasibleError, SearchProblem, assess, finite, greedy, lower_bound,
                                      relative_gap, validate)


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
            [k for k, c in enumerate(n.choices) if finite(c.cost)] for n in nodes]
        self._fixpoint()

    def possible(self, t: str) -> set[str]:
        p = self.producer[t]
        if p < 0:
            return {self.problem.input_formats[t]}
        node = self.problem.nodes[p]
        return {node.choices[k].out_format for k in self.usable[p]}

    def _ok(self, t: str, f: str, g: str) -> bool:
        return f == g or finite(self.problem.reorder_cost(t, f, g))

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
    m = _Model()
    xvar = _choice_columns(pr, m)
    tensors = list(prob.input_formats) + [t for n in prob.nodes for t in n.outputs]
    for t in tensors:
        produced = _produced(pr, xvar, t)
        for g, demands in _demanded(pr, xvar, t).items():
            _reorder_rows(m, prob, t, g, produced, demands)
    return m, xvar


def _choice_columns(pr: _Pruned, m: _Model) -> dict[tuple[int, int], int]:
    """x[n,c] columns of the nodes with more than one usable choice: (node, choice) -> column."""
    xvar: dict[tuple[int, int], int] = {}
    for i, node in enumerate(pr.problem.nodes):
        ks = pr.usable[i]
        if len(ks) == 1:
            m.constant.append(node.choices[ks[0]].cost)
            continue
        cols = [m.var(node.choices[k].cost, integer=True) for k in ks]
        for k, j in zip(ks, cols):
            xvar[(i, k)] = j
        m.row(((j, 1.0) for j in cols), 1.0, 1.0)
    return xvar


def _choice_expr(pr: _Pruned, xvar: dict, i: int, ks: list[int]) -> tuple[float, list[int]]:
    """sum of x over choices ks of node i: (constant, [columns])."""
    if len(pr.usable[i]) == 1:
        return (1.0 if ks else 0.0), []
    if len(ks) == len(pr.usable[i]):
        return 1.0, []
    return 0.0, [xvar[(i, k)] for k in ks]


def _produced(pr: _Pruned, xvar: dict, t: str) -> dict[str, tuple[float, list[int]]]:
    """p[t,f] per format f as (constant, columns)."""
    prob, p_node = pr.problem, pr.producer[t]
    if p_node < 0:
        return {prob.input_formats[t]: (1.0, [])}
    byf: dict[str, list[int]] = {}
    for k in pr.usable[p_node]:
        byf.setdefault(prob.nodes[p_node].choices[k].out_format, []).append(k)
    return {f: _choice_expr(pr, xvar, p_node, ks) for f, ks in byf.items()}


def _demanded(pr: _Pruned, xvar: dict, t: str) -> dict[str, list[tuple[float, list[int]]]]:
    """Demands of ``t`` per format: one (constant, columns) per consumer; forced if constant 1."""
    prob = pr.problem
    demands: dict[str, list[tuple[float, list[int]]]] = {}
    for n2, js in pr.consumers.get(t, ()):
        byg: dict[str, list[int]] = {}
        for k in pr.usable[n2]:
            for j in js:
                g = prob.nodes[n2].choices[k].in_formats[j]
                lst = byg.setdefault(g, [])
                if not lst or lst[-1] != k:
                    lst.append(k)
        for g, ks in byg.items():
            demands.setdefault(g, []).append(_choice_expr(pr, xvar, n2, ks))
    if t in prob.output_formats:
        demands.setdefault(prob.output_formats[t], []).append((1.0, []))
    return demands


def _reorder_rows(m: _Model, prob: SearchProblem, t: str, g: str, P: dict, demands: list) -> None:
    """The y[t,g] and z[t,f,g] columns and rows of delivering ``t`` in ``g``."""
    others = [f for f in P if f != g and prob.reorder_cost(t, f, g) != 0.0]
    if not others:
        return  # t is produced in g, or reordering into g is free
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
    producer = validate(problem)
    pr = _Pruned(problem, producer)
    trivial_lb = lower_bound(problem)
    nodes = problem.nodes

    def selection(pick) -> dict[str, int]:
        return {n.name: pick(i) for i, n in enumerate(nodes)}

    m, xvar = _build(pr)
    if not m.c:  # nothing left to choose
        sel = selection(lambda i: pr.usable[i][0])
        a = assess(problem, sel, status="optimal", method="fixed")
        if not finite(a.cost):  # pruning is pairwise; should not happen, but never claim it
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

        candidates.append(assess(problem, selection(pick), status="feasible", method="milp"))

    dual = getattr(res, "mip_dual_bound", None)
    lb = trivial_lb
    if dual is not None and finite(float(dual)):
        lb = max(lb, float(dual) / scale + const)

    if res.status == 0 and candidates and finite(candidates[0].cost):
        a = candidates[0]
        # HiGHS proved optimality to 1e-9 (relative and absolute on the scaled objective)
        a.status = "optimal"
        if not (finite(lb) and lb <= a.cost) or a.cost - lb <= 1e-7 * max(abs(a.cost), 1.0):
            lb = a.cost
        a.lower_bound, a.gap = lb, relative_gap(a.cost, lb)
        a.seconds = time.perf_counter() - t0
        return a

    # time limit or solver trouble: best of what we have, never claimed optimal
    candidates.append(greedy(problem))
    candidates.append(_forward_greedy(problem, pr))
    best = min(candidates, key=lambda a: (a.cost if a.cost == a.cost else INF))
    best.status = "feasible" if finite(best.cost) else "infeasible"
    best.lower_bound = min(lb, best.cost) if finite(best.cost) else lb
    best.gap = relative_gap(best.cost, best.lower_bound)
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
    return assess(problem, sel, status="heuristic", method="greedy")
