"""The global selection solver: exact against brute force, better than greedy where it should be."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import time

import pytest

from fastrun.planning import search
from fastrun.planning.problem import Assignment, Choice, InfeasibleError, SearchNode, SearchProblem, brute_force, evaluate, greedy, restricted
from fastrun.planning.search import solve

INF = math.inf
HERE = os.path.dirname(os.path.abspath(__file__))


def _bench():
    spec = importlib.util.spec_from_file_location(
        "bench_search", os.path.join(HERE, "..", "scripts", "bench_search.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def C(impl, ins, out, cost):
    return Choice(impl, tuple(ins), out, cost)


def _all_pairs(tensors, formats, cost):
    return {t: {f"{a}>{b}": cost for a in formats for b in formats if a != b} for t in tensors}


# --------------------------------------------------------------------------------------------
# random small DAGs against brute force
# --------------------------------------------------------------------------------------------

ALL_FORMATS = ["NCHW", "NHWC", "NCHWc8", "NCHWc16"]


def random_problem(rng: random.Random, max_combos: int = 3000) -> SearchProblem:
    formats = ALL_FORMATS[: rng.randint(2, 4)]
    n_inputs = rng.randint(1, 2)
    inputs = {f"in{i}": rng.choice(["NCHW"] * 3 + formats) for i in range(n_inputs)}
    tensors = list(inputs)
    nodes = []
    combos = 1
    n_nodes = rng.randint(1, 10)
    for i in range(n_nodes):
        k = rng.randint(1, 3)
        # favour recent tensors but let old ones get many consumers too
        ins = [rng.choice(tensors[-3:] if rng.random() < 0.6 else tensors) for _ in range(k)]
        outs = [f"t{i}"] + ([f"t{i}b"] if rng.random() < 0.1 else [])
        n_choices = rng.randint(1, 4)
        while combos * n_choices > max_combos and n_choices > 1:
            n_choices -= 1
        combos *= n_choices
        choices = []
        for j in range(n_choices):
            r = rng.random()
            cost = INF if r < 0.08 else 0.0 if r < 0.13 else round(rng.uniform(0.0, 10.0), 3)
            ins_f = tuple(rng.choice(formats) for _ in ins)
            if rng.random() < 0.4:  # same-format kernels are common
                f = rng.choice(formats)
                ins_f, out_f = tuple(f for _ in ins), f
            else:
                out_f = rng.choice(formats)
            choices.append(C(f"impl{j}", ins_f, out_f, cost))
        nodes.append(SearchNode(f"n{i}", ins, outs, choices))
        tensors += outs
    reorders = {}
    for t in tensors:
        d = {}
        for a in formats:
            for b in formats:
                if a != b and rng.random() < 0.85:
                    r = rng.random()
                    d[f"{a}>{b}"] = 0.0 if r < 0.05 else round(rng.uniform(0.01, 3.0), 3)
        reorders[t] = d
    produced = [t for n in nodes for t in n.outputs]
    consumed = {t for n in nodes for t in n.inputs}
    outputs = {t: rng.choice(["NCHW"] * 2 + formats) for t in produced
               if t not in consumed or rng.random() < 0.15}
    return SearchProblem(nodes, inputs, outputs, reorders)


def _check_assignment(problem: SearchProblem, a: Assignment) -> None:
    """The assignment is internally consistent: formats, reorders and cost agree."""
    e = evaluate(problem, a.choices)
    assert e.cost == pytest.approx(a.cost, rel=1e-12, abs=1e-12)
    assert e.formats == a.formats
    assert e.reorders == a.reorders
    assert a.reorders == sorted(set(a.reorders))
    assert a.lower_bound <= a.cost + 1e-9
    for t, src, dst in a.reorders:
        assert a.formats[t] == src != dst


def test_random_dags_match_brute_force():
    rng = random.Random(12345)
    feasible = infeasible = 0
    strictly_better = 0
    while feasible < 250:
        p = random_problem(rng)
        try:
            bf = brute_force(p)
        except InfeasibleError:
            infeasible += 1
            with pytest.raises(InfeasibleError):
                solve(p)
            assert greedy(p).cost == INF
            assert infeasible < 1000
            continue
        feasible += 1
        a = solve(p)
        assert a.status == "optimal", (a, p)
        assert a.cost == pytest.approx(bf.cost, rel=1e-9, abs=1e-12), (a, bf, p)
        assert a.lower_bound == pytest.approx(a.cost, rel=1e-9, abs=1e-12)
        assert a.gap <= 1e-9
        _check_assignment(p, a)
        _check_assignment(p, bf)
        g = greedy(p)
        assert g.cost >= a.cost - 1e-9 * max(1.0, a.cost)
        strictly_better += g.cost > a.cost + 1e-9
    print(f"{feasible} feasible, {infeasible} infeasible, greedy worse on {strictly_better}")
    assert infeasible > 0  # the generator really exercises missing reorders / infinite costs
    assert strictly_better > 20


# --------------------------------------------------------------------------------------------
# hand-made cases with the optimum computed by hand
# --------------------------------------------------------------------------------------------


def squeeze_problem() -> SearchProblem:
    """x(NCHW) -> conv1 -> mid -> conv2 -> y(NCHW). mid is cheapest in NHWC, but both convs
    are cheapest in NCHWc8: NHWC in the middle costs two extra reorders."""
    fm = ["NCHW", "NHWC", "NCHWc8"]
    reorders = _all_pairs("xaby", fm, 0.5)
    for t in "xaby":
        reorders[t]["NCHWc8>NCHW"] = 0.3
        reorders[t]["NCHW>NCHWc8"] = 0.3
    nodes = [
        SearchNode("conv1", ["x"], ["a"], [C("ort@2", ["NCHW"], "NCHW", 5.0),
                                           C("ort_nchwc@2", ["NCHW"], "NCHWc8", 3.0)]),
        SearchNode("mid", ["a"], ["b"], [C("nhwc@1", ["NHWC"], "NHWC", 0.5),
                                         C("nchwc@1", ["NCHWc8"], "NCHWc8", 1.0),
                                         C("nchw@1", ["NCHW"], "NCHW", 1.2)]),
        SearchNode("conv2", ["b"], ["y"], [C("ort@2", ["NCHW"], "NCHW", 5.0),
                                           C("ort_nchwc@2", ["NCHWc8"], "NCHWc8", 3.0)]),
    ]
    return SearchProblem(nodes, {"x": "NCHW"}, {"y": "NCHW"}, reorders)


def test_squeezed_nhwc_node():
    p = squeeze_problem()
    g = greedy(p)
    # greedy: 3 + 0.5 + 3 + a:c8>NHWC 0.5 + b:NHWC>c8 0.5 + y:c8>NCHW 0.3
    assert g.cost == pytest.approx(7.8)
    assert g.status == "heuristic" and g.method == "greedy"
    a = solve(p)
    # optimum: everything blocked, one reorder of the output
    assert a.cost == pytest.approx(7.3)
    assert a.choices == {"conv1": 1, "mid": 1, "conv2": 1}
    assert a.reorders == [("y", "NCHWc8", "NCHW")]
    assert a.status == "optimal" and a.method == "milp" and a.gap == 0.0
    assert brute_force(p).cost == pytest.approx(7.3)


def sharing_problem() -> SearchProblem:
    """Tensor a is read by three consumers. Each saves 0.1 in NHWC, but a reorder costs 0.25:
    not worth it for one consumer, worth it when the three share one reorder."""
    nodes = [SearchNode("P", ["x"], ["a"], [C("plain", ["NCHW"], "NCHW", 1.0),
                                            C("blocked", ["NCHW"], "NCHWc8", 0.8)])]
    for i in range(3):
        nodes.append(SearchNode(f"C{i}", ["a"], [f"o{i}"], [C("plain", ["NCHW"], "NCHW", 1.0),
                                                          C("nhwc", ["NHWC"], "NHWC", 0.9)]))
    reorders = {"a": {"NCHW>NHWC": 0.25, "NCHWc8>NHWC": 0.5, "NCHWc8>NCHW": 0.3}}
    return SearchProblem(nodes, {"x": "NCHW"}, {}, reorders)


def test_reorder_sharing_matters():
    p = sharing_problem()
    # candidates by hand:
    #   P plain, all NCHW:             1.0 + 3.0                = 4.0
    #   P plain, all NHWC (1 reorder): 1.0 + 0.25 + 2.7         = 3.95  <- optimum
    #   P plain, k NHWC consumers:     1.0 + 0.25 + 3.0 - 0.1k  > 3.95 for k < 3
    #   P blocked, all NHWC:           0.8 + 0.5 + 2.7          = 4.0   (greedy)
    #   P blocked, all NCHW:           0.8 + 0.3 + 3.0          = 4.1
    g = greedy(p)
    assert g.cost == pytest.approx(4.0)
    a = solve(p)
    assert a.cost == pytest.approx(3.95)
    assert a.choices == {"P": 0, "C0": 1, "C1": 1, "C2": 1}
    assert a.reorders == [("a", "NCHW", "NHWC")]
    # pricing each consumer's reorder separately would have said 1.0 + 3*(0.9+0.25) = 4.45
    assert brute_force(p).cost == pytest.approx(3.95)


def test_three_consumers_one_reorder():
    nodes = [SearchNode("prod", ["x"], ["t"], [C("only", ["NCHW"], "NCHW", 1.0)])]
    for i in range(3):
        nodes.append(SearchNode(f"c{i}", ["t"], [f"y{i}"], [C("blk", ["NCHWc8"], "NCHWc8", 2.0),
                                                          C("slow", ["NCHW"], "NCHW", 9.0)]))
    # t is also a graph output wanted in the same foreign format: still the same single reorder
    outputs = {"t": "NCHWc8", **{f"y{i}": "NCHWc8" for i in range(3)}}
    p = SearchProblem(nodes, {"x": "NCHW"}, outputs, {"t": {"NCHW>NCHWc8": 0.7}})
    a = solve(p)
    assert [r for r in a.reorders if r[0] == "t"] == [("t", "NCHW", "NCHWc8")]
    assert len(a.reorders) == 1
    assert a.cost == pytest.approx(1.0 + 3 * 2.0 + 0.7)
    assert evaluate(p, a.choices).cost == pytest.approx(a.cost)


def test_tensor_read_twice_by_one_node():
    # Add(t, t) reading t in two different formats needs one reorder, in the same format none
    nodes = [SearchNode("p", ["x"], ["t"], [C("a", ["NCHW"], "NCHW", 1.0)]),
             SearchNode("add", ["t", "t"], ["y"], [C("mixed", ["NCHW", "NHWC"], "NCHW", 0.1),
                                                   C("same", ["NCHW", "NCHW"], "NCHW", 0.5)])]
    p = SearchProblem(nodes, {"x": "NCHW"}, {"y": "NCHW"}, {"t": {"NCHW>NHWC": 0.3}})
    a = solve(p)
    assert a.cost == pytest.approx(1.4) and a.choices["add"] == 0
    assert a.reorders == [("t", "NCHW", "NHWC")]
    assert brute_force(p).cost == pytest.approx(1.4)


# --------------------------------------------------------------------------------------------
# edge cases and API
# --------------------------------------------------------------------------------------------


def test_missing_reorder_pair_is_respected():
    # the cheap consumer needs NHWC, but t cannot be reordered NCHWc8 -> NHWC
    nodes = [SearchNode("p", ["x"], ["t"], [C("plain", ["NCHW"], "NCHW", 2.0),
                                            C("blk", ["NCHW"], "NCHWc8", 1.0)]),
             SearchNode("c", ["t"], ["y"], [C("nhwc", ["NHWC"], "NCHW", 0.1),
                                            C("blk", ["NCHWc8"], "NCHW", 5.0)])]
    p = SearchProblem(nodes, {"x": "NCHW"}, {"y": "NCHW"}, {"t": {"NCHW>NHWC": 0.2}})
    assert greedy(p).cost == INF and greedy(p).status == "infeasible"
    a = solve(p)
    assert a.cost == pytest.approx(2.3) and a.status == "optimal"


def test_infeasible_raises():
    nodes = [SearchNode("p", ["x"], ["y"], [C("nhwc", ["NHWC"], "NHWC", 1.0)])]
    p = SearchProblem(nodes, {"x": "NCHW"}, {"y": "NCHW"}, {"x": {"NCHW>NHWC": 0.1}})
    with pytest.raises(InfeasibleError):
        solve(p)
    p2 = SearchProblem([SearchNode("p", ["x"], ["y"], [C("a", ["NCHW"], "NCHW", INF)])],
                       {"x": "NCHW"}, {"y": "NCHW"}, {})
    with pytest.raises(InfeasibleError):
        solve(p2)


def test_single_choice_problem_needs_no_solver():
    nodes = [SearchNode("p", ["x"], ["t"], [C("a", ["NCHW"], "NHWC", 1.0)]),
             SearchNode("q", ["t"], ["y"], [C("b", ["NCHW"], "NCHW", 2.0), C("c", ["NCHW"], "NCHW", INF)])]
    p = SearchProblem(nodes, {"x": "NCHW"}, {"y": "NCHW"}, {"t": {"NHWC>NCHW": 0.5}})
    a = solve(p)
    assert a.method == "fixed" and a.status == "optimal"
    assert a.cost == pytest.approx(3.5) and a.choices == {"p": 0, "q": 0}


def test_validation_errors():
    bad = SearchProblem([SearchNode("n", ["nope"], ["y"], [C("a", ["NCHW"], "NCHW", 1.0)])],
                        {"x": "NCHW"}, {"y": "NCHW"}, {})
    with pytest.raises(ValueError, match="topological"):
        solve(bad)
    arity = SearchProblem([SearchNode("n", ["x", "x"], ["y"], [C("a", ["NCHW"], "NCHW", 1.0)])],
                          {"x": "NCHW"}, {"y": "NCHW"}, {})
    with pytest.raises(ValueError, match="input formats"):
        evaluate(arity, {"n": 0})


def test_restricted_keeps_indices_and_formats():
    p = squeeze_problem()
    r = restricted(p, {"NCHW"})
    a = solve(r)
    assert a.cost == pytest.approx(5.0 + 1.2 + 5.0)
    assert set(a.formats.values()) == {"NCHW"} and a.reorders == []
    assert evaluate(p, a.choices).cost == pytest.approx(a.cost)  # indices valid in the original
    assert [len(n.choices) for n in r.nodes] == [len(n.choices) for n in p.nodes]


def test_json_round_trip():
    p = squeeze_problem()
    a = solve(p)
    d = json.loads(json.dumps(a.to_json(), allow_nan=False))
    assert Assignment.from_json(d) == a
    assert Assignment.from_json(json.dumps(d)) == a
    g = greedy(SearchProblem(p.nodes, p.input_formats, p.output_formats, {}))
    assert g.cost == INF
    assert Assignment.from_json(json.loads(json.dumps(g.to_json(), allow_nan=False))).cost == INF
    p2 = SearchProblem.from_json(json.loads(json.dumps(restricted(p, {"NCHW"}).to_json(), allow_nan=False)))
    assert solve(p2).cost == pytest.approx(11.2)


def test_time_limit_fallback_is_honest(monkeypatch):
    """If HiGHS stops without proof, the answer is the best known, flagged "feasible"."""
    from scipy.optimize import OptimizeResult

    def stopped(m, time_limit):
        return OptimizeResult(status=1, x=None, mip_dual_bound=None, success=False), 1.0

    monkeypatch.setattr(search, "_run_highs", stopped)
    p = squeeze_problem()
    a = solve(p)
    assert a.status == "feasible"
    assert a.cost <= greedy(p).cost and math.isfinite(a.cost)
    assert a.lower_bound <= a.cost and a.gap == pytest.approx((a.cost - a.lower_bound) / a.cost)
    assert a.lower_bound == pytest.approx(3.0 + 0.5 + 3.0)  # cheapest choice of every node


def test_brute_force_refuses_large():
    nodes = [SearchNode(f"n{i}", ["x"], [f"y{i}"], [C(str(j), ["NCHW"], "NCHW", j) for j in range(10)])
             for i in range(7)]
    with pytest.raises(ValueError, match="refuses"):
        brute_force(SearchProblem(nodes, {"x": "NCHW"}, {}, {}))


# --------------------------------------------------------------------------------------------
# scale
# --------------------------------------------------------------------------------------------


def test_densenet_like_problem_is_fast_and_optimal():
    bench = _bench()
    p = bench.densenet121_problem(seed=1)
    assert 400 <= len(p.nodes) <= 500
    fan_out: dict[str, int] = {}
    for n in p.nodes:
        for t in set(n.inputs):
            fan_out[t] = fan_out.get(t, 0) + 1
    assert max(fan_out.values()) >= 20  # the many-consumers case really occurs
    solve(bench.resnet50_problem(seed=1))  # warm up imports before timing
    t0 = time.perf_counter()
    a = solve(p)
    dt = time.perf_counter() - t0
    g = greedy(p)
    nchw = solve(restricted(p, {"NCHW"}))
    print(f"densenet-like: {len(p.nodes)} nodes solved in {dt * 1e3:.0f} ms; optimal {a.cost:.3f} ms, "
          f"greedy {g.cost:.3f} ms, NCHW only {nchw.cost:.3f} ms")
    assert a.status == "optimal" and a.gap <= 1e-9
    assert dt < 5.0
    assert g.cost > a.cost and nchw.cost >= a.cost
    _check_assignment(p, a)


def test_resnet_like_problem():
    bench = _bench()
    p = bench.resnet50_problem(seed=2)
    a = solve(p)
    assert a.status == "optimal"
    assert greedy(p).cost >= a.cost
    _check_assignment(p, a)
