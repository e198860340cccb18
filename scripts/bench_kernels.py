#!/usr/bin/env python
"""Time every applicable implementation of a handful of real layer shapes; print a Markdown table.

Implementations are timed interleaved (round-robin over repeats, so machine noise hits all of them
alike) and summarised by the median; ratios are ort's median / the implementation's (>1: faster
than onnxruntime). Inputs arrive already in each implementation's in_format (reorders are not
counted; the format search prices those separately). ``err`` is max|y - ort| / max|ort|.

    python scripts/bench_kernels.py [--repeats 15] [--only 3x3,1x1] [--batch 1]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

_CORES = str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, _CORES)

import numpy as np  # noqa: E402

from fastrun.ops import formats, kernels, registry  # noqa: E402
from fastrun.ops.registry import OpSpec, resolve_format  # noqa: E402


def _attrs(d: dict) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in d.items()))


def conv(n, c, hw, k, r, stride=1, pad=None, group=1, act="Relu"):
    pad = r // 2 if pad is None else pad
    p = (hw + 2 * pad - r) // stride + 1
    return OpSpec("Conv", ((n, c, hw, hw), (k, c // group, r, r), (k,)), (False, True, True), (n, k, p, p),
                  attrs=_attrs({"kernel_shape": (r, r), "strides": (stride, stride), "pads": (pad,) * 4,
                                "dilations": (1, 1), "group": group}), activation=act)


def matmul(a, b):
    return OpSpec("MatMul", (a, b), (False, True), a[:-1] + (b[-1],))


def gemm(m, k, n):
    return OpSpec("Gemm", ((m, k), (n, k), (n,)), (False, True, True), (m, n),
                  attrs=_attrs({"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 1}))


def layers(batch: int) -> dict[str, OpSpec]:
    b = batch
    return {
        "3x3 64->64 @224": conv(b, 64, 224, 64, 3),
        "3x3 64->64 @112": conv(b, 64, 112, 64, 3),
        "3x3 64->128 @112": conv(b, 64, 112, 128, 3),
        "3x3 64->64 @56": conv(b, 64, 56, 64, 3),
        "3x3 96->128 @28": conv(b, 96, 28, 128, 3),
        "3x3 128->128 @112": conv(b, 128, 112, 128, 3),
        "3x3 128->128 @56": conv(b, 128, 56, 128, 3),
        "3x3 256->256 @56": conv(b, 256, 56, 256, 3),
        "3x3 512->512 @28": conv(b, 512, 28, 512, 3),
        "3x3 512->512 @14": conv(b, 512, 14, 512, 3),
        "3x3 256->256 @14": conv(b, 256, 14, 256, 3),
        "3x3 s2 128->128 @56": conv(b, 128, 56, 128, 3, stride=2),
        "1x1 256->64 @56": conv(b, 256, 56, 64, 1),
        "1x1 64->256 @56": conv(b, 64, 56, 256, 1),
        "1x1 1024->256 @14": conv(b, 1024, 14, 256, 1),
        "1x1 512->2048 @7": conv(b, 512, 7, 2048, 1),
        "1x1 s2 256->512 @56": conv(b, 256, 56, 512, 1, stride=2),
        "dw3x3 144 @56": conv(b, 144, 56, 144, 3, group=144),
        "dw3x3 s2 96 @112": conv(b, 96, 112, 96, 3, stride=2, group=96),
        "g1x1 240->240 g3 @28": conv(b, 240, 28, 240, 1, group=3),
        "5x5 32->96 @28": conv(b, 32, 28, 96, 5),
        "5x5 48->128 @14": conv(b, 48, 14, 128, 5),
        "7x7 s2 3->64 @224": conv(b, 3, 224, 64, 7, stride=2),
        "MatMul 128x768 @ 768x768": matmul((b, 128, 768), (768, 768)),
        "Gemm fc 2048->1000": gemm(b, 2048, 1000),
        "Gemm fc 4096->4096": gemm(b, 4096, 4096),
    }


def bench_layer(spec: OpSpec, repeats: int, budget_s: float) -> list[tuple[str, float, float]]:
    rng = np.random.default_rng(0)
    consts, runtime = kernels.random_inputs(spec, rng)
    impls = registry.candidates(spec)
    fns, args, ref = {}, {}, None
    for impl in impls:
        fn = kernels.build_callable(impl, spec, consts)
        a = list(runtime)
        fmt_in, fmt_out = resolve_format(impl.in_format), resolve_format(impl.out_format)
        if a:
            a[0] = formats.to_format(a[0], fmt_in)
        y = fn(*a)  # warm-up (numba compiles here), and the correctness figure
        if len(spec.output) == 4:
            y = formats.from_format(y, fmt_out, spec.output[1])
        if ref is None and impl.is_onnxruntime_kernel:
            ref = y
        fns[impl.name], args[impl.name] = (fn, y), a
    errors = {name: float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-12)) if ref is not None else float("nan")
              for name, (fn, y) in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    for rep in range(repeats):
        for name, (fn, _) in fns.items():
            t0 = time.perf_counter()
            fn(*args[name])
            times[name].append(time.perf_counter() - t0)
        if rep >= 2 and time.perf_counter() - start > budget_s:
            break
    return [(name, float(np.median(ts)) * 1e3, errors[name]) for name, ts in times.items()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--budget", type=float, default=8.0, help="seconds per layer (at least 3 rounds)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--only", default="", help="comma-separated substrings of layer names")
    opts = ap.parse_args(argv)
    print(f"threads={_CORES}, batch={opts.batch}, median of <= {opts.repeats} "
          f"interleaved runs; ratio = ort ms / impl ms\n")
    print("| layer | impl | ms | vs ort | err |")
    print("|---|---|---:|---:|---:|")
    wanted = [s for s in opts.only.split(",") if s]
    for name, spec in layers(opts.batch).items():
        if wanted and not any(w in name for w in wanted):
            continue
        rows = bench_layer(spec, opts.repeats, opts.budget)
        ort = registry.onnxruntime_nchw_kernel(registry.candidates(spec))
        ort_ms = dict((n, ms) for n, ms, _ in rows).get(ort.name if ort else None)
        best = min(ms for _, ms, _ in rows)
        for impl, ms, err in sorted(rows, key=lambda r: r[1]):
            ratio = f"{ort_ms / ms:.2f}x" if ort_ms else "-"
            mark = "**" if ms == best else ""
            print(f"| {name} | {mark}{impl}{mark} | {ms:.2f} | {ratio} | {err:.1e} |")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
