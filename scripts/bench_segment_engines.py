#!/usr/bin/env python
"""Engine per graph segment: does running some blocks of a model on OpenVINO and the others on
onnxruntime beat the faster of the two engines on the whole model?

For each model and batch size:

1. cuts: the nodes in their topological order, and the positions between them where exactly one
   tensor that is not a constant is live (constants: initializers and whatever only they feed);
   ``--segments`` of them are chosen about evenly spaced by FLOPs (Conv/Gemm/MatMul 2*MACs, other
   nodes one per output element), cutting the model into a chain with one activation per cut.
   Each segment is a standalone model (``onnx.utils.Extractor`` on the shape-inferred model with
   its inputs fixed to the batch size).
2. segment race: every segment on onnxruntime (a default ``InferenceSession``, CPUExecutionProvider)
   and on OpenVINO fp32 (fastrun's ``OpenVINOEngine``: the same compile configuration and wrapper
   the end-to-end race uses), fed the activation the whole model computes at its cut; all
   2 x segments contestants round-robin, order rotated every round, median of block medians.
3. the best assignment: a DP over the chain, sum of segment medians plus ``--switch-ms`` per change
   of engine (0 by default: the measured pipeline below pays the real hand-over).
4. whole race: whole model on onnxruntime, whole model on OpenVINO, and the mixed pipeline of the
   DP's assignment (adjacent segments on one engine merged into one model; numpy arrays passed from
   one engine to the next), round-robin as above.

The segment race also runs the whole model on each engine, so the sums compare with them within
one race; the machine's load moves between the two races, so a row's ms from one race do not
compare with the other's: compare the gains. The table's columns: ``ort``/``ov`` whole-model ms
(whole race), ``best`` the faster of them, ``sum_ort``/``sum_ov`` the segments' sums on one engine
and ``pred`` the DP's sum (segment race), ``pred_gain`` the faster whole model of the segment race
over ``pred``, ``mixed`` the measured pipeline, ``gain`` best / mixed per round of the whole race
(median [min, max]): above 1 the mixed pipeline wins. ``err`` is max|mixed - ort| / max|ort|. Where the assignment mixes engines,
``quiet`` is the same pipeline with onnxruntime's threads not spinning after a run (they would take
the cores from OpenVINO's next segment), and its gain over ``best``.

    python scripts/bench_segment_engines.py --models squeezenet inception_v1 --batch 1 --rounds 10
    python scripts/bench_segment_engines.py --models tests/fixtures/resnet.onnx --image 64 --batch 1 8

The machine may be shared: compare columns of one row (one process, interleaved), not rows of runs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnx.utils
import onnxruntime as ort
from onnx import numpy_helper, shape_inference

from bench_engines import FLAGS_OF_INTEREST, block_median, cpu_flags, load_model, make_feed, relative_error
from fastrun.runtime.openvino_engine import OpenVINOEngine

ENGINES = ("ort", "ov")
WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


# -- the graph: constants, cuts, FLOPs

def fixed_model(spec: str, batch: int) -> onnx.ModelProto:
    """The model with a concrete batch on every input whose first axis is symbolic, shapes inferred."""
    model = load_model(spec, batch)
    for vi in model.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = batch
        if any(not d.HasField("dim_value") for d in dims):
            raise SystemExit(f"{spec}: input {vi.name} has symbolic axes beyond the batch")
    return shape_inference.infer_shapes(model, data_prop=True)


def constant_names(model: onnx.ModelProto) -> set[str]:
    """Initializers and the outputs of nodes fed by constants only (Constant, densenet's folded BN)."""
    names = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if all(i in names for i in node.input if i):
            names.update(node.output)
    return names


def compute_nodes(model: onnx.ModelProto, constants: set[str]) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if not set(n.output) <= constants]


def cut_candidates(model: onnx.ModelProto, nodes: list[onnx.NodeProto], constants: set[str]) -> dict[int, str]:
    """Position p (after ``nodes[p]``) -> the one non-constant tensor live there, where there is one."""
    graph_outputs = {o.name for o in model.graph.output}
    last_use: dict[str, int] = {}
    for p, node in enumerate(nodes):
        for name in node.input:
            if name and name not in constants:
                last_use[name] = p
    live = {vi.name for vi in model.graph.input if vi.name not in constants}
    cuts = {}
    for p, node in enumerate(nodes[:-1]):
        live.update(o for o in node.output if o and (o in last_use or o in graph_outputs))
        live = {t for t in live if last_use.get(t, -1) > p or t in graph_outputs}
        if len(live) == 1 and not live & graph_outputs:
            cuts[p] = next(iter(live))
    return cuts


def node_flops(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> list[float]:
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    for vi in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        shapes[vi.name] = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    flops = []
    for node in nodes:
        out = float(np.prod(shapes.get(node.output[0], [0])))
        weight = shapes.get(node.input[1]) if len(node.input) > 1 else None
        if node.op_type in WEIGHTED and weight and out:
            channels = weight[0] if node.op_type.startswith("Conv") else weight[-1]
            flops.append(2 * out * float(np.prod(weight)) / max(channels, 1))
        else:
            flops.append(out)
    return flops


def choose_cuts(cuts: dict[int, str], flops: list[float], segments: int) -> list[int]:
    """About ``segments`` - 1 cut positions, each the candidate nearest an even share of the FLOPs."""
    cumulative = np.cumsum(flops)
    total = cumulative[-1]
    chosen = set()
    for j in range(1, segments):
        target = total * j / segments
        chosen.add(min(cuts, key=lambda p: abs(cumulative[p] - target)))
    return sorted(chosen)


# -- segments and the engines running them

@dataclass
class Segment:
    inputs: list[str]
    outputs: list[str]
    model: bytes
    gflop: float
    runs: dict[str, Callable[[dict], list]] = field(default_factory=dict)


def extract(extractor: onnx.utils.Extractor, inputs: list[str], outputs: list[str], gflop: float) -> Segment:
    return Segment(inputs, outputs, extractor.extract_model(inputs, outputs).SerializeToString(), gflop)


def compile_runs(segment: Segment, engines: tuple[str, ...] = ENGINES, spin: bool = True) -> None:
    """The segment's callables ``feed -> outputs`` on each engine (onnxruntime's threads spinning
    between runs, its default, unless ``spin`` is off)."""
    if "ort" in engines:
        options = ort.SessionOptions()
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(segment.model, options, providers=["CPUExecutionProvider"])
        segment.runs["ort"] = lambda feed: session.run(segment.outputs, feed)
    if "ov" in engines:
        compiled = OpenVINOEngine().compile(segment.model, {}, "fp32", 0)
        segment.runs["ov"] = lambda feed: compiled.run(segment.outputs, feed)


def split(model: onnx.ModelProto, segments: int) -> list[Segment]:
    constants = constant_names(model)
    nodes = compute_nodes(model, constants)
    cuts = cut_candidates(model, nodes, constants)
    if not cuts:
        raise SystemExit("the model has no position with a single live activation")
    flops = node_flops(model, nodes)
    positions = choose_cuts(cuts, flops, segments)
    extractor = onnx.utils.Extractor(model)
    inputs = [vi.name for vi in model.graph.input if vi.name not in constants]
    bounds = [-1, *positions, len(nodes) - 1]
    chain = []
    for start, end in zip(bounds, bounds[1:]):
        outputs = [cuts[end]] if end in cuts else [o.name for o in model.graph.output]
        chain.append(extract(extractor, inputs, outputs, sum(flops[start + 1:end + 1]) / 1e9))
        inputs = outputs
    return chain


def best_assignment(times: list[dict[str, float]], switch_ms: float) -> tuple[list[str], float]:
    """The cheapest engine per segment: DP over the chain, ``switch_ms`` per change of engine."""
    best = {e: (times[0][e], [e]) for e in ENGINES}
    for seg in times[1:]:
        best = {e: min(((cost + seg[e] + (switch_ms if path[-1] != e else 0.0), path + [e])
                        for cost, path in best.values()), key=lambda x: x[0]) for e in ENGINES}
    cost, path = min(best.values(), key=lambda x: x[0])
    return path, cost


def pipeline(model: onnx.ModelProto, chain: list[Segment], assignment: list[str],
             spin: bool = True) -> Callable[[dict], list]:
    """The mixed pipeline: runs of segments on one engine merged into one model, arrays handed over."""
    extractor = onnx.utils.Extractor(model)
    stages, start = [], 0
    for i in range(1, len(chain) + 1):
        if i == len(chain) or assignment[i] != assignment[start]:
            stage = extract(extractor, chain[start].inputs, chain[i - 1].outputs, 0.0)
            compile_runs(stage, (assignment[start],), spin)
            stages.append((stage, stage.runs[assignment[start]]))
            start = i

    def run(feed: dict) -> list:
        values = feed
        for stage, call in stages:
            values = dict(zip(stage.outputs, call({n: values[n] for n in stage.inputs})))
        return list(values.values())
    return run


# -- timing

def race(runs: dict[str, Callable[[], list]], rounds: int, seconds: float, settle: float) -> dict[str, list[float]]:
    """Round-robin block medians, the order rotated each round; each block first runs its contestant
    for ``settle`` seconds untimed, so the engine that ran before has stopped taking the cores."""
    names = list(runs)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            block_median(runs[name], settle)
            samples[name].append(block_median(runs[name], seconds))
    return samples


# -- one model

def segment_race(model: onnx.ModelProto, chain: list[Segment], whole: Segment, feed: dict,
                 args: argparse.Namespace) -> tuple[list[dict[str, float]], dict[str, float], list]:
    """Median ms of every segment on each engine, fed the activation the whole model computes at its
    cut, and of the whole model on each engine in the same race (the sums' yardstick)."""
    cut_names = [s.outputs[0] for s in chain[:-1]]
    traced = ort.InferenceSession(extract(onnx.utils.Extractor(model), whole.inputs, whole.outputs + cut_names,
                                          0.0).model, providers=["CPUExecutionProvider"]).run(None, feed)
    values = {**feed, **dict(zip(whole.outputs + cut_names, traced))}
    runs = {f"whole:{e}": (lambda c=call: c(feed)) for e, call in whole.runs.items()}
    for i, segment in enumerate(chain):
        compile_runs(segment)
        seg_feed = {n: values[n] for n in segment.inputs}
        for engine, call in segment.runs.items():
            runs[f"{i}:{engine}"] = (lambda c=call, f=seg_feed: c(f))
    for call in runs.values():
        call()
    samples = race(runs, args.rounds, args.block, args.settle)
    seg_ms = [{e: statistics.median(samples[f"{i}:{e}"]) for e in ENGINES} for i in range(len(chain))]
    return seg_ms, {e: statistics.median(samples[f"whole:{e}"]) for e in ENGINES}, traced[:len(whole.outputs)]


def whole_race(model: onnx.ModelProto, chain: list[Segment], whole: Segment, feed: dict, assignment: list[str],
               args: argparse.Namespace) -> tuple[dict[str, list[float]], float]:
    """Round-robin samples of the whole model on each engine and of the mixed pipeline(s); the
    pipeline's error against onnxruntime's whole model."""
    mixed = pipeline(model, chain, assignment)
    error = relative_error(mixed(feed), whole.runs["ort"](feed))
    runs = {"ort": lambda: whole.runs["ort"](feed), "ov": lambda: whole.runs["ov"](feed),
            "mixed": lambda: mixed(feed)}
    if len(set(assignment)) > 1:
        quiet = pipeline(model, chain, assignment, spin=False)
        runs["mixed_nospin"] = lambda: quiet(feed)
    for call in runs.values():
        call()
    return race(runs, args.rounds, args.block, args.settle), error


def gain(samples: dict[str, list[float]], baseline: str, contestant: str) -> tuple[float, float, float]:
    """Median, lowest and highest per-round speed-up of ``contestant`` over ``baseline``."""
    ratios = sorted(b / m for b, m in zip(samples[baseline], samples[contestant]))
    return statistics.median(ratios), ratios[0], ratios[-1]


def bench(spec: str, batch: int, args: argparse.Namespace) -> dict:
    model = fixed_model(spec, batch)
    chain = split(model, args.segments)
    whole = Segment([vi.name for vi in model.graph.input], [o.name for o in model.graph.output],
                    model.SerializeToString(), sum(s.gflop for s in chain))
    compile_runs(whole)
    feed = make_feed(ort.InferenceSession(whole.model, providers=["CPUExecutionProvider"]), batch, {})
    seg_ms, whole_ms, reference = segment_race(model, chain, whole, feed, args)
    assignment, predicted = best_assignment(seg_ms, args.switch_ms)
    samples, error = whole_race(model, chain, whole, feed, assignment, args)
    ms = {n: statistics.median(s) for n, s in samples.items()}
    best = "ort" if ms["ort"] <= ms["ov"] else "ov"
    return {"model": spec, "batch": batch, "load_avg_1min": os.getloadavg()[0], "ms": ms, "best": best,
            "segment_race_whole_ms": whole_ms, "sum_ms": {e: sum(s[e] for s in seg_ms) for e in ENGINES},
            "predicted_ms": predicted, "predicted_gain": min(whole_ms.values()) / predicted,
            "assignment": "".join("O" if e == "ov" else "R" for e in assignment), "error": error,
            "gain": gain(samples, best, "mixed"),
            "nospin_gain": gain(samples, best, "mixed_nospin")[0] if "mixed_nospin" in samples else None,
            "segments": [{"cut": s.outputs[0] if i < len(chain) - 1 else "(outputs)", "gflop": s.gflop, **t}
                         for i, (s, t) in enumerate(zip(chain, seg_ms))],
            "samples_ms": samples}


def print_segments(row: dict) -> None:
    print(f"\n{row['model']} b{row['batch']} (load average {row['load_avg_1min']:.1f})")
    print("  seg  ends at                              MFLOP    ort ms     ov ms   winner")
    for i, s in enumerate(row["segments"]):
        winner = "ov" if s["ov"] < s["ort"] else "ort"
        print(f"  {i:3d}  {s['cut'][:34]:<34} {s['gflop'] * 1e3:7.1f} {s['ort']:9.2f} {s['ov']:9.2f}   {winner}"
              f"  ({max(s['ort'], s['ov']) / min(s['ort'], s['ov']):.2f}x)")
    w, total = row["segment_race_whole_ms"], row["sum_ms"]
    print(f"  whole model in this race: ort {w['ort']:.2f} ms, ov {w['ov']:.2f} ms; segments' sums: ort "
          f"{total['ort']:.2f}, ov {total['ov']:.2f}, best per segment {row['predicted_ms']:.2f} "
          f"({row['predicted_gain']:.2f}x the faster whole model)")


def print_table(rows: list[dict]) -> None:
    print("\nmodel                b     ort      ov    best  sum_ort  sum_ov    pred pred_gain   mixed  assign"
          "   gain [min, max]      err   quiet  gain")
    for r in rows:
        ms, name = r["ms"], Path(r["model"]).stem
        med, lo, hi = r["gain"]
        quiet = f"{ms['mixed_nospin']:7.2f} {r['nospin_gain']:5.2f}x" if "mixed_nospin" in ms else "      -      -"
        print(f"{name[:18]:<18} {r['batch']:3d} {ms['ort']:7.2f} {ms['ov']:7.2f} {min(ms['ort'], ms['ov']):7.2f}"
              f" {r['sum_ms']['ort']:8.2f} {r['sum_ms']['ov']:7.2f} {r['predicted_ms']:7.2f} {r['predicted_gain']:8.2f}x {ms['mixed']:7.2f}"
              f"  {r['assignment']:<8} {med:.2f}x [{lo:.2f}, {hi:.2f}]  {r['error']:.0e} {quiet}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["squeezenet", "inception_v1"],
                   help="light example names (fastrun.workflows.models) or .onnx paths")
    p.add_argument("--batch", nargs="+", type=int, default=[1])
    p.add_argument("--segments", type=int, default=6, help="segments per model (fewer where cuts are scarce)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--block", type=float, default=0.2, help="seconds per contestant per round")
    p.add_argument("--settle", type=float, default=0.1, help="untimed seconds before each block")
    p.add_argument("--switch-ms", type=float, default=0.0, help="cost of a change of engine in the DP")
    p.add_argument("--json", type=Path, help="write the rows here")
    args = p.parse_args(argv)
    import openvino as ov
    flags = cpu_flags()
    print("CPU flags:", " ".join(f for f in FLAGS_OF_INTEREST if f in flags) or "(none of interest)")
    print(f"onnxruntime {ort.__version__}, openvino {ov.__version__}, {os.cpu_count()} CPUs")
    print("start:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    rows = []
    for spec in args.models:
        for batch in args.batch:
            rows.append(bench(spec, batch, args))
            print_segments(rows[-1])
            sys.stdout.flush()
    print_table(rows)
    print("end:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
