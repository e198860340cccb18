#!/usr/bin/env python
"""Engine race: onnxruntime against OpenVINO on whole models, interleaved in one process.

For each model and batch size these contestants run round-robin (order rotated every round, so
machine noise and thread wake-ups hit all alike):
  ort          a default ``onnxruntime.InferenceSession`` (ORT_ENABLE_ALL, default threads): the baseline
  ov_f32       OpenVINO CPU, INFERENCE_PRECISION_HINT=f32 set explicitly (its default is bf16 on CPUs with
               native bf16), PERFORMANCE_HINT=LATENCY
  ov_bf16      OpenVINO CPU, INFERENCE_PRECISION_HINT=bf16 (only when the CPU has avx512_bf16 or amx_bf16)
``--variants`` adds others: ort_stop (onnxruntime spinning only during run), ort_t1 (one thread),
ov_default (no hints), ov_f16, ov_f32_t1 / ov_f32_t2 / ov_bf16_t1 (INFERENCE_NUM_THREADS),
ov_f32_nopin (ENABLE_CPU_PINNING off). One-thread contestants compare kernels with less noise on a
loaded machine: their ratio against ort_t1 is printed too.

Each round times every contestant for about ``--block`` seconds and keeps that block's median call;
a ratio is ort's block median over the contestant's in the same round, and the table prints the median
ratio over rounds with its lowest and highest. The error column is max|y - y_ort| / max|y_ort| over all
outputs. ``--ort-alone`` also times onnxruntime by itself before any OpenVINO model is compiled and
again after the race, to show whether OpenVINO's threads leave onnxruntime slower.

    python scripts/bench_engines.py --models resnet50 squeezenet --batch 1 8 --rounds 7
    python scripts/bench_engines.py --models tests/fixtures/bert_encoder.onnx --dim sequence=128 --batch 1 8
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort

from fastrun.workflows import models

FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
                     "amx_int8", "avx_vnni")
OV_CONFIGS = {
    "ov_f32": {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"},
    "ov_bf16": {"INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "LATENCY"},
    "ov_f16": {"INFERENCE_PRECISION_HINT": "f16", "PERFORMANCE_HINT": "LATENCY"},
    "ov_default": {},
    "ov_f32_t1": {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": 1},
    "ov_f32_t2": {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": 2},
    "ov_bf16_t1": {"INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": 1},
    "ov_f32_nopin": {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
                     "ENABLE_CPU_PINNING": False},
}
ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8,
             "tensor(int8)": np.int8, "tensor(bool)": np.bool_}


def cpu_flags() -> set[str]:
    """The ISA flags of the first CPU in /proc/cpuinfo (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(flags: set[str]) -> bool:
    """bf16 arithmetic in hardware; without it OpenVINO's bf16 is emulated and slower, not faster."""
    return "avx512_bf16" in flags or "amx_bf16" in flags


def load_model(spec: str, batch: int) -> onnx.ModelProto:
    """A light example by name (random weights, batch rewritten) or an ONNX file as it is."""
    if Path(spec).suffix == ".onnx":
        return onnx.load(spec)
    return models.randomized(models.example_path(spec), seed=1, batch=batch if batch != 1 else None,
                             strip_softmax=True)


def parse_dims(items: list[str]) -> dict[str, int]:
    """``--dim NAME=N`` pairs as sizes by name."""
    try:
        return {k: int(v) for k, v in (item.split("=", 1) for item in items)}
    except ValueError:
        raise SystemExit("--dim takes NAME=N pairs, e.g. --dim sequence=128")


def make_feed(session: ort.InferenceSession, batch: int, dims: dict[str, int],
              seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs; a symbolic dimension named in ``dims`` gets that size, any other first one ``batch``."""
    rng = np.random.default_rng(seed)
    feed = {}
    for i, arg in enumerate(session.get_inputs()):
        shape = []
        for axis, dim in enumerate(arg.shape):
            if isinstance(dim, int):
                shape.append(dim)
            elif dim in dims:
                shape.append(dims[dim])
            elif axis == 0:
                shape.append(batch)
            else:
                raise SystemExit(f"input {arg.name} has symbolic dimension {dim!r} at axis {axis}: give --dim {dim}=N")
        dtype = ORT_TYPES[arg.type]
        if np.issubdtype(dtype, np.floating):
            feed[arg.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feed[arg.name] = rng.integers(0, 2, shape).astype(dtype)
    return feed


def ort_contestant(model_bytes: bytes, feed: dict, stop_spinning: bool,
                   threads: int = 0) -> tuple[Callable[[], list], float]:
    start = time.perf_counter()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if stop_spinning:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    return (lambda: session.run(None, feed)), time.perf_counter() - start


def ov_contestant(core, model_bytes: bytes, feed: dict, config: dict) -> tuple[Callable[[], list], float]:
    start = time.perf_counter()
    compiled = core.compile_model(core.read_model(model_bytes), "CPU", config)
    request = compiled.create_infer_request()
    by_index = dict(enumerate(feed.values()))

    def run() -> list:
        return list(request.infer(by_index, share_inputs=True).values())
    return run, time.perf_counter() - start


def block_median(run: Callable[[], list], seconds: float) -> float:
    """Median call time (ms) of calls made for about ``seconds`` (at least 3)."""
    times: list[float] = []
    end = time.perf_counter() + seconds
    while len(times) < 3 or time.perf_counter() < end:
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def race(runs: dict[str, Callable[[], list]], rounds: int, seconds: float) -> dict[str, list[float]]:
    """Round-robin block medians per contestant, the order rotated each round."""
    names = list(runs)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            samples[name].append(block_median(runs[name], seconds))
    return samples


def ratio_stats(baseline: list[float], times: list[float]) -> tuple[float, float, float]:
    """Median, lowest and highest of the per-round speed-ups over ``baseline``."""
    ratios = sorted(b / t for b, t in zip(baseline, times))
    return statistics.median(ratios), ratios[0], ratios[-1]


def relative_error(outputs: list, reference: list) -> float:
    """max|y - ref| / max|ref|, the worst over all outputs: scale-free, so one number reads for every model."""
    worst = 0.0
    for y, ref in zip(outputs, reference):
        ref = np.asarray(ref, dtype=np.float64)
        diff = np.abs(np.asarray(y, dtype=np.float64) - ref).max() if ref.size else 0.0
        worst = max(worst, float(diff / max(np.abs(ref).max(), 1e-30)))
    return worst


def bench(spec: str, batch: int, variants: list[str], args: argparse.Namespace, core) -> dict:
    model_bytes = load_model(spec, batch).SerializeToString()
    feed = make_feed(ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"]), batch, args.dim)
    runs, start_s = {}, {}
    runs["ort"], start_s["ort"] = ort_contestant(model_bytes, feed, stop_spinning=False)
    reference = runs["ort"]()
    alone_before = block_median(runs["ort"], args.block * args.rounds / 2) if args.ort_alone else None
    for name in variants:
        if name == "ort_stop":
            runs[name], start_s[name] = ort_contestant(model_bytes, feed, stop_spinning=True)
        elif name == "ort_t1":
            runs[name], start_s[name] = ort_contestant(model_bytes, feed, stop_spinning=True, threads=1)
        else:
            runs[name], start_s[name] = ov_contestant(core, model_bytes, feed, OV_CONFIGS[name])
    errors = {name: relative_error(run(), reference) for name, run in runs.items()}
    for run in runs.values():
        run()
    samples = race(runs, args.rounds, args.block)
    row = {"model": spec, "batch": batch, "load_avg_1min": os.getloadavg()[0], "start_s": start_s,
           "errors": errors, "samples_ms": samples, "ms": {n: statistics.median(s) for n, s in samples.items()},
           "ratios": {n: ratio_stats(samples["ort"], s) for n, s in samples.items()}}
    if "ort_t1" in samples:
        row["ratios_t1"] = {n: ratio_stats(samples["ort_t1"], s) for n, s in samples.items() if n.endswith("t1")}
    if args.ort_alone:
        for name in variants:
            runs[name]()  # OpenVINO has just run: does onnxruntime pay for it?
        alone_after = block_median(runs["ort"], args.block * args.rounds / 2)
        row["ort_alone_ms"] = {"before_ov": alone_before, "after_ov": alone_after}
    return row


def print_row(row: dict) -> None:
    print(f"\n{row['model']} b{row['batch']} (load average {row['load_avg_1min']:.1f} on {os.cpu_count()} CPUs)")
    print("  contestant      median ms   vs ort (median [min, max])   max rel err   start-up s")
    for name, ms in row["ms"].items():
        med, lo, hi = row["ratios"][name]
        print(f"  {name:<14} {ms:10.2f}   {med:6.2f}x [{lo:.2f}, {hi:.2f}]        {row['errors'][name]:9.1e}"
              f"   {row['start_s'][name]:8.3f}")
    for name, (med, lo, hi) in row.get("ratios_t1", {}).items():
        print(f"  {name:<14} vs ort_t1: {med:.2f}x [{lo:.2f}, {hi:.2f}]")
    if "ort_alone_ms" in row:
        a = row["ort_alone_ms"]
        print(f"  ort alone: {a['before_ov']:.2f} ms before any OpenVINO run, {a['after_ov']:.2f} ms right after")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet50", "squeezenet"],
                   help="light example names (fastrun.workflows.models) or .onnx paths")
    p.add_argument("--batch", nargs="+", type=int, default=[1])
    p.add_argument("--dim", nargs="*", default=[], metavar="NAME=N",
                   help="sizes of symbolic input dimensions (e.g. sequence=128)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--block", type=float, default=0.3, help="seconds per contestant per round")
    p.add_argument("--variants", nargs="*", default=[], choices=["ort_stop", "ort_t1", *OV_CONFIGS],
                   help="contestants beside ort, ov_f32 and (native bf16 only) ov_bf16")
    p.add_argument("--no-bf16", action="store_true", help="leave out ov_bf16 even on a bf16 CPU")
    p.add_argument("--ort-alone", action="store_true", help="time onnxruntime alone before and after OpenVINO")
    p.add_argument("--json", type=Path, help="write the rows here")
    args = p.parse_args(argv)
    args.dim = parse_dims(args.dim)
    try:
        import openvino as ov
    except ImportError:
        raise SystemExit("openvino is not installed: pip install openvino")
    flags = cpu_flags()
    print("CPU flags:", " ".join(f for f in FLAGS_OF_INTEREST if f in flags) or "(none of interest)")
    print(f"onnxruntime {ort.__version__}, openvino {ov.__version__}; the machine may be shared: "
          "compare ratios, not absolute times")
    variants = ["ov_f32"] + (["ov_bf16"] if native_bf16(flags) and not args.no_bf16 else [])
    variants += [v for v in args.variants if v not in variants]
    core = ov.Core()
    rows = []
    for spec in args.models:
        for batch in args.batch:
            rows.append(bench(spec, batch, variants, args, core))
            print_row(rows[-1])
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
