#!/usr/bin/env python
"""Benchmark the global selection solver on synthetic ResNet-50- and DenseNet-121-like problems.

The problems mimic what the profiler produces (no ONNX, no timing): per-node choices among
NCHW, NHWC and NCHWc8 implementations with costs from a simple FLOP / bandwidth model plus
seeded noise, and per-tensor reorder costs proportional to the tensor size. Prints solve time,
the greedy and NCHW-only baselines, the optimum and the proven gap.

    python scripts/bench_search.py [--seed 0] [--repeat 3] [--json out.json]

``resnet50_problem`` / ``densenet121_problem`` are also used by tests/test_search.py.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fastrun.planning.problem import Choice, SearchNode, SearchProblem, evaluate, greedy, restricted
from fastrun.planning.search import solve

NCHW, NHWC, NCHWC = "NCHW", "NHWC", "NCHWc8"
FORMATS = (NCHW, NHWC, NCHWC)


class _Builder:
    """Accumulates nodes with plausible costs; tensors carry (C, H, W) for the cost model."""

    def __init__(self, seed: int, bandwidth_gbs: float = 10.0):
        self.rng = random.Random(seed)
        self.nodes: list[SearchNode] = []
        self.shape: dict[str, tuple[int, int, int]] = {}
        self.bw = bandwidth_gbs
        self.count = 0

    def _noise(self) -> float:
        return self.rng.uniform(0.85, 1.15)

    def _ms_bytes(self, nbytes: float) -> float:
        return nbytes / (self.bw * 1e6)

    def _new(self, prefix: str, shape: tuple[int, int, int]) -> str:
        self.count += 1
        t = f"{prefix}{self.count}"
        self.shape[t] = shape
        return t

    def input(self, name: str, c: int, h: int, w: int) -> str:
        self.shape[name] = (c, h, w)
        return name

    def conv(self, x: str, cout: int, k: int, s: int = 1) -> str:
        cin, h, w = self.shape[x]
        ho, wo = (h + s - 1) // s, (w + s - 1) // s
        y = self._new("conv", (cout, ho, wo))
        gflop = 2.0 * cin * cout * k * k * ho * wo / 1e9
        ms = lambda rate: gflop / rate * 1e3 * self._noise()  # noqa: E731
        cs = [Choice("ort@1", (NCHW,), NCHW, ms(120.0))]
        # onnxruntime's NCHWc conv; the first layer (few channels) reads plain NCHW
        cs.append(Choice("ort_nchwc@1", (NCHW if cin < 8 else NCHWC,), NCHWC, ms(170.0)))
        if k == 1:
            cs.append(Choice("gemm_nhwc@1", (NHWC,), NHWC, ms(140.0)))
        if k == 3 and s == 1:
            rate = 260.0 if cin >= 256 else 150.0 if cin >= 128 else 70.0
            cs.append(Choice("winograd_f4@1", (NCHW,), NCHW, ms(rate)))
            cs.append(Choice("winograd_f4_nhwc@1", (NHWC,), NHWC, ms(rate * 1.05)))
        self.nodes.append(SearchNode(f"Conv_{y}", [x], [y], cs))
        return y

    def eltwise(self, op: str, xs: list[str], shape=None, passes: float = 2.0,
                formats=FORMATS) -> str:
        """Element-wise / data-movement op (BN, Relu, Add, Concat, pools) in any format."""
        shape = shape or self.shape[xs[0]]
        y = self._new(op.lower(), shape)
        n = shape[0] * shape[1] * shape[2] + sum(
            self.shape[x][0] * self.shape[x][1] * self.shape[x][2] for x in xs)
        base = self._ms_bytes(4.0 * n * passes / 2.0)
        factor = {NCHW: 1.0, NHWC: 1.03, NCHWC: 0.9}
        cs = [Choice(f"{op.lower()}_{f.lower()}@1", tuple(f for _ in xs), f, base * factor[f] * self._noise())
              for f in formats]
        self.nodes.append(SearchNode(f"{op}_{y}", list(xs), [y], cs))
        return y

    def pool(self, op: str, x: str, s: int) -> str:
        c, h, w = self.shape[x]
        return self.eltwise(op, [x], (c, (h + s - 1) // s, (w + s - 1) // s), formats=(NCHW, NCHWC))

    def gap(self, x: str) -> str:
        c, _, _ = self.shape[x]
        return self.eltwise("GlobalAveragePool", [x], (c, 1, 1), formats=(NCHW, NCHWC))

    def head(self, x: str, classes: int = 1000) -> str:
        c, _, _ = self.shape[x]
        f = self._new("flat", (c, 1, 1))
        self.nodes.append(SearchNode(f"Flatten_{f}", [x], [f], [Choice("ort@1", (NCHW,), NCHW, 0.002)]))
        y = self._new("logits", (classes, 1, 1))
        ms = 2.0 * c * classes / 1e9 / 20.0 * 1e3  # memory bound GEMV
        self.nodes.append(SearchNode(f"Gemm_{y}", [f], [y], [Choice("ort@1", (NCHW,), NCHW, ms)]))
        return y

    def problem(self, inputs: list[str], outputs: list[str]) -> SearchProblem:
        reorders = {}
        for t, (c, h, w) in self.shape.items():
            one = self._ms_bytes(4.0 * c * h * w * 2)  # read + write
            d = {}
            for a in FORMATS:
                for b in FORMATS:
                    if a != b:
                        d[f"{a}>{b}"] = one * (1.4 if NHWC in (a, b) and NCHWC in (a, b) else 1.0) * self._noise()
            reorders[t] = d
        return SearchProblem(list(self.nodes), {t: NCHW for t in inputs}, {t: NCHW for t in outputs}, reorders)


def resnet50_problem(seed: int = 0) -> SearchProblem:
    """ResNet-50 v1 at 224x224, batch 1: conv (+fused BN/Relu), Add, Relu, pools, head."""
    b = _Builder(seed)
    x = b.input("data", 3, 224, 224)
    x = b.conv(x, 64, 7, 2)
    x = b.pool("MaxPool", x, 2)
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
        for i in range(blocks):
            s = 2 if (i == 0 and stage > 0) else 1
            y = b.conv(x, width, 1, 1)
            y = b.conv(y, width, 3, s)
            y = b.conv(y, width * 4, 1, 1)
            sc = b.conv(x, width * 4, 1, s) if i == 0 else x
            x = b.eltwise("Relu", [b.eltwise("Add", [y, sc])])
    x = b.gap(x)
    y = b.head(x)
    return b.problem(["data"], [y])


def densenet121_problem(seed: int = 0, blocks=(6, 12, 24, 16), growth: int = 32) -> SearchProblem:
    """DenseNet-121 at 224x224, batch 1, as exported from torchvision (~430 nodes).

    Every layer concatenates all previous features of its block, so each feature tensor is
    read by every later Concat of the block: up to 24 consumers, the reorder-sharing case.
    """
    b = _Builder(seed)
    x = b.input("data", 3, 224, 224)
    x = b.conv(x, 64, 7, 2)
    x = b.eltwise("Relu", [b.eltwise("BatchNormalization", [x])])
    x = b.pool("MaxPool", x, 2)
    for bi, nlayers in enumerate(blocks):
        feats = [x]
        for _ in range(nlayers):
            c = sum(b.shape[f][0] for f in feats)
            h, w = b.shape[x][1:]
            cat = b.eltwise("Concat", feats, (c, h, w))
            y = b.eltwise("Relu", [b.eltwise("BatchNormalization", [cat])])
            y = b.conv(y, 4 * growth, 1)
            y = b.eltwise("Relu", [b.eltwise("BatchNormalization", [y])])
            y = b.conv(y, growth, 3)
            feats.append(y)
        c = sum(b.shape[f][0] for f in feats)
        x = b.eltwise("Concat", feats, (c,) + b.shape[x][1:])
        if bi != len(blocks) - 1:
            x = b.eltwise("Relu", [b.eltwise("BatchNormalization", [x])])
            x = b.conv(x, c // 2, 1)
            x = b.pool("AveragePool", x, 2)
    x = b.eltwise("Relu", [b.eltwise("BatchNormalization", [x])])
    x = b.gap(x)
    y = b.head(x)
    return b.problem(["data"], [y])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3, help="solves per problem (best time shown)")
    ap.add_argument("--time-limit", type=float, default=10.0)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    solve(restricted(resnet50_problem(0), {NCHW}))  # import scipy / HiGHS before timing
    rows = []
    for name, make in (("resnet50", resnet50_problem), ("densenet121", densenet121_problem)):
        p = make(args.seed)
        ntensors = sum(len(n.outputs) for n in p.nodes)
        best = None
        times = []
        for _ in range(args.repeat):
            a = solve(p, time_limit=args.time_limit)
            times.append(a.seconds)
            best = a
        g = greedy(p)
        nchw = solve(restricted(p, {NCHW}), time_limit=args.time_limit)
        assert abs(evaluate(p, best.choices).cost - best.cost) <= 1e-9 * best.cost
        row = {
            "model": name, "nodes": len(p.nodes), "tensors": ntensors,
            "choices": sum(len(n.choices) for n in p.nodes),
            "solve_s": min(times), "status": best.status, "method": best.method,
            "optimal_ms": best.cost, "lower_bound_ms": best.lower_bound, "gap": best.gap,
            "greedy_ms": g.cost, "nchw_only_ms": nchw.cost,
            "reorders": len(best.reorders), "greedy_reorders": len(g.reorders),
        }
        rows.append(row)
        print(f"{name:12s} {row['nodes']:4d} nodes {row['choices']:5d} choices | solve "
              f"{row['solve_s'] * 1e3:7.1f} ms ({best.status}, gap {best.gap:.1e}) | optimal "
              f"{best.cost:8.3f} ms ({row['reorders']} reorders) | greedy {g.cost:8.3f} ms "
              f"({row['greedy_reorders']} reorders, +{(g.cost / best.cost - 1) * 100:.1f}%) | "
              f"NCHW only {nchw.cost:8.3f} ms (+{(nchw.cost / best.cost - 1) * 100:.1f}%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
