#!/usr/bin/env python
"""A model's plan timed part by part: where the time goes between the prediction and the run.

Takes the plan stored in the cache (or makes one from the cache's timings, profiling what is
missing), compiles it, runs it
``--repeats`` times and prints, for every part of the program (onnxruntime segment or host step),
the median time in the chain and how many cores it kept busy (process CPU time / wall time), then
each host step again, run back to back on its own chain inputs ("alone"). Host steps are listed
beside the node they run and its profiled time.

``--optimum`` times the planner's optimum before the end-to-end check that may replace it by the
heuristic assignment or by onnxruntime alone (``plan.whole_model``): the plan whose parts a
wrong prediction is about.

    python scripts/plan_steps.py resnet50 --batch 8 --cache-dir /tmp/cache --optimum
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from fastrun.workflows import lookup, verify, models
from fastrun.runtime import compiler
from fastrun.runtime.program import HostCall
from fastrun.system import fingerprint
from fastrun.ir import reader
from fastrun.planning import planner
from fastrun.store.cache import Caches
from fastrun.measure.profiler import Profiler


def timed(part, values: dict) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call of a program part."""
    cpu, wall = time.process_time(), time.perf_counter()
    part(values)
    return time.perf_counter() - wall, time.process_time() - cpu


def describe(part) -> str:
    if isinstance(part, HostCall):
        return f"host -> {part.output}"
    return f"segment of {part.steps} steps -> {', '.join(part.outputs[:2])}{' ...' if len(part.outputs) > 2 else ''}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="example model name (fastrun.workflows.models.EXAMPLES) or path to an .onnx file")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--optimum", action="store_true", help="the planner's optimum, before the end-to-end check")
    args = ap.parse_args()

    path = models.example_path(args.model) if args.model in models.EXAMPLES else args.model
    model = models.randomized(path, seed=0, batch=args.batch if args.batch != 1 else None)
    graph = reader.from_proto(model, model.SerializeToString())
    fp = fingerprint.fingerprint()
    caches = Caches(args.cache_dir)
    plan = None if args.optimum else lookup.find_plan(caches, fp, graph)
    if plan is None:
        plan = planner.make_plan(graph, fp, Profiler(caches, fp))
    program = compiler.compile_plan(graph, plan)
    feed = verify.random_feed(graph)

    samples: list[list[tuple[float, float]]] = [[] for _ in program.program]
    chain_inputs: list[dict] = []
    for rep in range(args.repeats + 1):
        values = dict(feed)
        for i, part in enumerate(program.program):
            if rep == 0:
                chain_inputs.append(dict(values))  # the first run warms up and records inputs
                part(values)
            else:
                samples[i].append(timed(part, values))

    nodes = {n.name: n for n in plan.nodes}
    predicted = f"predicted {plan.predicted_ms:.1f} ms" if plan.predicted_ms is not None else "no prediction (heuristic plan)"
    print(f"{args.model} b{args.batch}: {predicted}{' (whole model on onnxruntime)' if plan.whole_model else ''}")
    print(f"{'chain ms':>9} {'cores':>5} {'alone ms':>9} {'cores':>5}  part")
    totals = {"segments": 0.0, "host chain": 0.0, "host alone": 0.0, "host predicted": 0.0}
    for i, part in enumerate(program.program):
        wall, cpu = np.median(np.array(samples[i]), axis=0)
        line = f"{wall * 1e3:9.2f} {cpu / wall:5.2f}"
        if isinstance(part, HostCall):
            alone = []
            for _ in range(max(3, args.repeats // 2)):
                alone.append(timed(part, dict(chain_inputs[i])))
            a_wall, a_cpu = np.median(np.array(alone), axis=0)
            line += f" {a_wall * 1e3:9.2f} {a_cpu / a_wall:5.2f}"
            totals["host chain"] += wall * 1e3
            totals["host alone"] += a_wall * 1e3
            node = nodes[part.node]
            line += f"  {describe(part)}: {node.name} {node.impl} (profiled {node.time_ms or 0:.2f})"
            totals["host predicted"] += node.time_ms or 0.0
        else:
            line += f" {'':9} {'':5}  {describe(part)}"
            totals["segments"] += wall * 1e3
        print(line)
    if plan.predicted_ms is not None:  # the rest of the prediction: onnxruntime's steps, reorders, per-step charges
        totals["segments predicted"] = plan.predicted_ms - totals["host predicted"]
    print("sums (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in totals.items()))


if __name__ == "__main__":
    main()
