"""Time onnxruntime's NCHW Conv against its NCHWc Conv on ResNet-50 layer shapes, and the reorders.

    python scripts/bench_nchwc.py [--repeat 30] [--batch 1]

Both convolutions run as one-node sessions at level "extended" (so ORT's own NCHWc transformer
does not rewrite the plain one); the NCHWc time excludes the reorders, which are timed apart,
as the format search sees them.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from fastrun.ops import formats, kernels, registry, reorders
from fastrun.ops.builtin import nchwc  # noqa: F401  (registers the nchwc implementations)
from fastrun.ops.registry import OpSpec, resolve_format
from fastrun.shapes import dims_text


def conv_spec(n, c, hw, k, r, stride=1, group=1, act="Relu"):
    pad = r // 2
    out = (hw + 2 * pad - r) // stride + 1
    attrs = {"kernel_shape": (r, r), "strides": (stride, stride), "pads": (pad,) * 4, "dilations": (1, 1), "group": group}
    return OpSpec("Conv", ((n, c, hw, hw), (k, c // group, r, r), (k,)), (False, True, True), (n, k, out, out),
                  attrs=tuple(sorted(attrs.items())), activation=act)


def median_ms(fn, arg, repeat):
    for _ in range(3):
        fn(arg)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


LAYERS = [  # (C, HW, K, R, stride, note)
    (3, 224, 64, 7, 2, "conv1"),
    (64, 56, 64, 3, 1, "3x3"), (128, 28, 128, 3, 1, "3x3"), (256, 14, 256, 3, 1, "3x3"), (512, 7, 512, 3, 1, "3x3"),
    (128, 56, 128, 3, 2, "3x3 s2"),
    (64, 56, 256, 1, 1, "1x1"), (256, 56, 64, 1, 1, "1x1"), (256, 56, 128, 1, 1, "1x1"),
    (128, 28, 512, 1, 1, "1x1"), (512, 28, 128, 1, 1, "1x1"), (256, 14, 1024, 1, 1, "1x1"),
    (1024, 14, 256, 1, 1, "1x1"), (512, 7, 2048, 1, 1, "1x1"), (2048, 7, 512, 1, 1, "1x1"),
    (256, 56, 512, 1, 2, "1x1 s2 (downsample)"),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    blocked = formats.blocked(formats.native_block_size())
    print(f"block {formats.native_block_size()}, batch {args.batch}, median of {args.repeat}")
    print(f"{'layer':40s} {'ort ms':>8s} {'nchwc ms':>9s} {'impl':>18s} {'speedup':>8s}")
    for c, hw, k, r, stride, note in LAYERS:
        spec = conv_spec(args.batch, c, hw, k, r, stride)
        consts, runtime = kernels.random_inputs(spec, rng)
        t_ort = median_ms(kernels.build_callable(registry.get("Conv", "ort"), spec, consts), runtime[0], args.repeat)
        name = "ort_nchwc_nchw_in" if c < formats.native_block_size() else "ort_nchwc"
        impl = registry.get("Conv", name)
        x = formats.to_format(runtime[0], resolve_format(impl.in_format))
        t_nc = median_ms(kernels.build_callable(impl, spec, consts), x, args.repeat)
        label = f"{c}->{k} {r}x{r} s{stride} @{hw} ({note})"
        print(f"{label:40s} {t_ort:8.3f} {t_nc:9.3f} {name:>18s} {t_ort / t_nc:7.2f}x")
    print()
    for shape in [(args.batch, 256, 56, 56), (args.batch, 64, 56, 56), (args.batch, 512, 28, 28),
                  (args.batch, 1024, 14, 14), (args.batch, 2048, 7, 7), (args.batch, 3, 224, 224)]:
        x = rng.standard_normal(shape).astype(np.float32)
        row = []
        for src, dst in [(formats.NCHW, blocked), (blocked, formats.NCHW), (formats.NHWC, blocked),
                         (blocked, formats.NHWC), (formats.NCHW, formats.NHWC), (formats.NHWC, formats.NCHW)]:
            run = reorders.reorder_callable(src, dst, shape)
            row.append(f"{src}->{dst} {median_ms(run, formats.to_format(x, src), args.repeat):.3f}")
        print(f"reorder {dims_text(shape)}: " + ", ".join(row) + " ms")


if __name__ == "__main__":
    main()
