#!/usr/bin/env python
"""End-to-end benchmark: onnxruntime vs fastrun, interleaved in one process (lower quartiles of interleaved samples: fastrun.measure.timing).

For each model and batch size it runs, round-robin so machine noise hits all alike:
  ort_all       onnxruntime ORT_ENABLE_ALL        (the baseline ratios are quoted against)
  ort_extended  onnxruntime ORT_ENABLE_EXTENDED   (no NCHWc layout transformer)
  heuristic     fastrun, heuristic plan (no profiling)
  profiled      fastrun, profiled plan (profiles first if the cache has no plan)
The "kernel ceiling" column is onnxruntime's fastest kernels over the fastest candidates, summed
over the plan's profiled nodes (fastrun.workflows.profile.kernel_ceiling): the most per-operator selection can
gain on that model, before reorders and split sessions.
Every session spins during ``run`` and stops when it returns (fastrun.system.ortutil; with onnxruntime's
default spinning after ``run`` too, sessions interleaved in one process spin against each other);
a lone default onnxruntime session is timed once per model to check that the baseline is not
handicapped by that setting.

    python scripts/bench.py --models resnet50 vgg19 --batch 1 8 --out bench-results
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import onnxruntime as ort

from fastrun.workflows import lookup, verify, models
from fastrun.workflows import profile as profiling
from fastrun.measure import timing as benchmark
from fastrun.ops.builtin import estimates
from fastrun.planning import planner
from fastrun.runtime import compiler
from fastrun.runtime.engines import OriginalModelSource
from fastrun.system import fingerprint, ortutil
from fastrun.ir import graph as G
from fastrun.ir import reader
from fastrun.store.cache import Caches
from fastrun.ir.graph import spec_for_node

log = logging.getLogger("bench")


def direct_gflop(graph: G.Graph) -> float:
    return sum(estimates.direct_flops(spec_for_node(h.node, graph)) for h in planner.heavy_nodes(graph)) / 1e9


def bench_model(name: str, batch: int, cache_dir: str, repeats: int, op_limit: float, precision: str = "fp32",
                tolerance: float | None = None, budget: float | None = None) -> dict:
    model = models.randomized(models.example_path(name), seed=0, batch=batch if batch != 1 else None)
    data = model.SerializeToString()
    graph = reader.from_proto(model, data)
    fp = fingerprint.fingerprint()
    caches = Caches(cache_dir)
    t0 = time.perf_counter()
    plan = lookup.find_plan(caches, fp, graph, precision=precision)
    if plan is None:
        log.info("%s b%d: profiling", name, batch)
        plan = profiling.profile(data, cache_dir=cache_dir, op_limit=op_limit, measure=False, precision=precision,
                                 tolerance=tolerance, budget=budget).plan
    profile_s = time.perf_counter() - t0
    profiled = compiler.compile_plan(graph, plan, original=OriginalModelSource(data))
    heuristic_plan = planner.heuristic_plan(graph, fp)
    heuristic = compiler.compile_plan(graph, heuristic_plan)
    ort_all = ortutil.session(data, level="all")
    ort_ext = ortutil.session(data, level="extended")
    feed = verify.random_feed(graph)
    names = list(profiled.outputs)
    ref = ort_all.run(names, feed)
    errors = {k: verify.relative_error([p.run(feed)[n] for n in names], ref) for k, p in
              (("heuristic", heuristic), ("profiled", profiled))}
    times = benchmark.interleaved({
        "ort_all": lambda: ort_all.run(names, feed),
        "ort_extended": lambda: ort_ext.run(names, feed),
        "heuristic": lambda: heuristic.run(feed),
        "profiled": lambda: profiled.run(feed),
    }, repeats=repeats, max_seconds=120)
    # The spinning check: a lone default session (spinning after run too) against the baseline, each timed
    # alone (warm caches, unlike the round-robin above) so the two see the same conditions.
    lone_ms = _alone_ms(ort.InferenceSession(data, providers=["CPUExecutionProvider"]), names, feed, repeats)
    all_alone_ms = _alone_ms(ort_all, names, feed, repeats)
    gflop = direct_gflop(graph)
    return {
        "model": name, "batch": batch, **{f"{k}_ms": v for k, v in times.items()},
        "winner": plan.winner, "precision": plan.precision,
        "ort_default_alone_ms": lone_ms, "ort_all_alone_ms": all_alone_ms,
        "ratio": times["ort_all"] / times["profiled"],
        "heuristic_ratio": times["ort_all"] / times["heuristic"],
        "heuristic_over_profiled": times["heuristic"] / times["profiled"],
        "same_assignment": heuristic_plan.assignment() == plan.assignment(),  # then the ratio is noise
        "predicted_ms": plan.predicted_ms, "gflop": gflop, "kernel_ceiling_ms": profiling.kernel_ceiling(plan),
        "profiled_gflops": gflop / times["profiled"] * 1e3, "ort_gflops": gflop / times["ort_all"] * 1e3,
        "max_error": errors, "segments": profiled.segments, "host_steps": profiled.host_steps,
        "reorders": profiled.reorders, "profile_s": profile_s, "plan_policy": plan.policy,
        "greedy_ms": plan.greedy_ms, "nchw_only_ms": plan.nchw_only_ms, "solver": plan.solver,
    }


def _alone_ms(session, names: list[str], feed: dict, repeats: int) -> float:
    """A session timed by itself; the caller drops it afterwards (a default session spins after run)."""
    return benchmark.interleaved({"alone": lambda: session.run(names, feed)}, repeats=repeats)["alone"]


def sgemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    """The machine's practical FMA peak: the best of a few large float32 GEMMs through numpy's BLAS
    on every core. A model above it ran fewer multiplications (Winograd), not faster ones."""
    import numpy as np

    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best / 1e9


def markdown(rows: list[dict]) -> str:
    head = ("| model | batch | runs | ORT_ALL ms | ORT_EXT ms | heuristic ms | profiled ms | max rel err | predicted ms | "
            "ratio ALL/profiled | ALL/heuristic | heuristic/profiled | kernel ceiling | GFLOP/s profiled | GFLOP/s ORT | "
            "alone: ORT_ALL / default ORT ms |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        pred = f"{r['predicted_ms']:.1f}" if r["predicted_ms"] else "-"
        runs = r.get("winner", "fastrun") + ("" if r.get("precision", "fp32") == "fp32" else f" {r['precision']}")
        lines.append(f"| {r['model']} | {r['batch']} | {runs} | {r['ort_all_ms']:.1f} | {r['ort_extended_ms']:.1f} | "
                     f"{r['heuristic_ms']:.1f} | {r['profiled_ms']:.1f} | {r['max_error']['profiled']:.1e} | "
                     f"{pred} | {r['ratio']:.2f} | "
                     f"{r['heuristic_ratio']:.2f} | {r['heuristic_over_profiled']:.2f}{' =' if r.get('same_assignment') else ''} | "
                     f"{_ceiling(r)} | "
                     f"{r['profiled_gflops']:.0f} | {r['ort_gflops']:.0f} | "
                     f"{r['ort_all_alone_ms']:.1f} / {r['ort_default_alone_ms']:.1f} |")
    return "\n".join(lines)


def _ceiling(row: dict) -> str:
    """onnxruntime's fastest kernels over the fastest candidates, summed per node (profiling.kernel_ceiling)."""
    ceiling = row.get("kernel_ceiling_ms")
    return f"{ceiling[1] / ceiling[0]:.2f}" if ceiling else "-"


def formats_markdown(rows: list[dict]) -> str:
    """The format-search view: prediction quality, baselines, reorders, solver time."""
    head = ("| model | batch | predicted ms | measured ms | pred/meas | greedy ms | NCHW-only ms | ORT_ALL ms | "
            "reorders (opt/greedy) | solver | solve s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        s = r["solver"] or {}
        pred = r["predicted_ms"] or float("nan")
        lines.append(f"| {r['model']} | {r['batch']} | {pred:.1f} | {r['profiled_ms']:.1f} | {pred / r['profiled_ms']:.2f} | "
                     f"{(r['greedy_ms'] or float('nan')):.1f} | {(r['nchw_only_ms'] or float('nan')):.1f} | "
                     f"{r['ort_all_ms']:.1f} | {r['reorders']}/{s.get('greedy_reorders', '-')} | "
                     f"{s.get('status', '-')} | {s.get('seconds', float('nan')):.2f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(models.EXAMPLES))
    p.add_argument("--batch", nargs="+", type=int, default=[1])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--op-limit", type=float, default=1.0)
    p.add_argument("--cache-dir", default=None, help="default: the fastrun default cache")
    p.add_argument("--out", default="bench-results", help="directory for bench.md and bench.json")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="the precision policy of the profiled plans (fastrun profile --precision)")
    p.add_argument("--tolerance", type=float, default=None, help="its error budget (fastrun profile --tolerance)")
    p.add_argument("--budget", type=float, default=None, help="seconds of per-operator profiling per model")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cache_dir = args.cache_dir or str(Caches().root)
    rows = []
    for name in args.models:
        for batch in args.batch:
            try:
                rows.append(bench_model(name, batch, cache_dir, args.repeats, args.op_limit, args.precision,
                                        args.tolerance, args.budget))
            except Exception as exc:  # one model failing must not lose the others' numbers
                log.error("%s batch %d failed: %s", name, batch, exc)
                continue
            log.info("%s", markdown(rows[-1:]).splitlines()[-1])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    peak = sgemm_gflops()
    described = fingerprint.describe()
    table = (f"CPU: {described['cpu']}; flags: {' '.join(described['isa'])}; onnxruntime {described['onnxruntime']}, "
             f"openvino {described.get('openvino') or 'not installed'}; precision policy {args.precision}"
             + (f" (tolerance {args.tolerance:g})" if args.tolerance else "") + "\n"
             f"sgemm peak (numpy BLAS, 2048^3, every core): {peak:.0f} GFLOP/s\n"
             "heuristic/profiled marked = : the two plans run the same assignment (the ratio is noise)\n\n"
             + markdown(rows) + "\n\n" + formats_markdown(rows))
    (out / "bench.md").write_text(table + "\n")
    (out / "bench.json").write_text(json.dumps({"fingerprint": fingerprint.describe(), "sgemm_gflops": peak,
                                                "rows": rows}, indent=1))
    print(table)
    return 0 if len(rows) == len(args.models) * len(args.batch) else 1


if __name__ == "__main__":
    sys.exit(main())
