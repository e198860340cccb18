"""Winograd minimal-filtering convolutions F(m x m, 3 x 3) for 3x3, stride 1, dilation 1, group 1.

Per output tile of m x m pixels the input tile d (alpha x alpha, alpha = m + 2) is transformed to
B^T d B, multiplied element-wise with the pre-transformed filter U = G g G^T, summed over the
input channels (that sum, for all alpha^2 positions at once, is one batched matmul
[alpha^2, K, C] @ [alpha^2, C, tiles]) and transformed back with A^T (.) A. Multiplications per
output drop from 9 to alpha^2/m^2 (4: 2.25, 6: 1.78) at the price of the transforms, which are
memory-bound: they decide whether Winograd wins (see docs/design.md).

Two engines compute this. The numpy one (``winograd_f{2,4,6}``, NCHW): both transforms are
separable and run as GEMMs with the small transform matrices over gathered strided views (rows
first, then columns), channel chunk by channel chunk so that intermediates stay in L2; the output
transform, crop and bias run per chunk of tile rows right after that chunk's batched product. The
filter transform is done once, in float64.

The compiled one, with numba installed (``pip install fastrun[numba]``): the
``winograd_f{4,6}_nchwc`` / ``_nhwc`` variants run on blocked / channels-last activations (so they
sit in the format search next to onnxruntime's blocked kernels, without reorders) with compiled
multi-threaded transforms (``winograd_transforms.py``: B^T and A^T written out, vectorized along
64 contiguous channels at a time); the product is one batched GEMM over every tile,
[alpha^2, tiles, C] @ [alpha^2, C, K]. This is the fast engine: 2-core AVX2 VM,
``scripts/bench_kernels.py --only 3x3``, batch 1, against onnxruntime's blocked kernel (session
7, best variant): 64->64@224 1.1x, 128->128@112 1.6-1.7x, 256->256@56 1.7-1.85x, 512->512@28
1.85-2.0x, 512->512@14 0.95-1.0x (docs/benchmarks.md). Splitting the tiles into L2-sized chunks
made it slower (every chunk re-streams the transformed filters and runs 36 small GEMMs; OpenBLAS
wakes its threads for each), so chunks only cap memory.

The fused variants (``winograd_f{4,6}_fused_nhwc``) do chunk, the other way round: each thread
takes up to 128 tiles at a time through the input transform, alpha^2 (36 or 64) single-threaded
GEMMs and the output transform, so the transformed tiles stay in its cache and the threads never
wait for each other. Every chunk reads the whole transformed filter, so they are candidates only
where it is small (few channels), which is where the batched engine loses to its memory traffic: 64->64@224
13.5 ms against onnxruntime's 21.2 and the batched engine's 19.1, 64->128@112 6.3 against 10.5.
Channels-last only: on NCHWc8 each tile writes 32-byte pieces of 8 planes, and at batch 8
(64@224, a 102 MB output) that variant ran anywhere from 165 to 245 ms call to call while the
NHWC one ran 151-153 (onnxruntime: 170); plans that used it lost end to end.

A compiled NCHW engine (transforms vectorized along a row of tiles) lost to it on every VGG shape
(e.g. 256->256@56: 19 vs 11-15 ms). The numpy engine stays for machines without numba.

Accuracy (fp32, He-scaled random weights, relative to max|y|), either engine: F(2,3) ~1e-6,
F(4,3) ~1e-5, F(6,3) ~1e-5 to 1e-4 -- the transform matrices' dynamic range grows with m.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np
from numpy.lib.stride_tricks import as_strided

from fastrun.system import blas
from fastrun.ops import formats
from fastrun.ops.registry import OpSpec, implementation, resolve_format
from fastrun.ops.builtin import estimates
from fastrun.ops.builtin.common import activation, conv_geometry, transposed
from fastrun.ops.builtin.conv_host import SCRATCH, bias_of, host_conv_ok, padded

try:
    from fastrun.ops.builtin import winograd_transforms as compiled
except ImportError:  # numba is optional: without it only the numpy-transform variants exist
    compiled = None

# Interpolation points (plus the point at infinity) of the Toom-Cook construction.
POINTS = {
    2: (0, 1, -1),
    4: (0, 1, -1, 2, -2),
    6: (0, 1, -1, 2, -2, Fraction(1, 2), Fraction(-1, 2)),
}


def winograd_matrices(m: int, r: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A^T [m, alpha], G [alpha, r], B^T [alpha, alpha]) of F(m, r), in float64.

    A^T and G follow the Cook-Toom construction (Lavin & Gray); B^T is solved from the defining
    identity sum_j A^T[i,j] G[j,k] B^T[j,l] = [l == i + k], exactly for these point sets.
    """
    alpha = m + r - 1
    pts = [Fraction(p) for p in POINTS[m]]
    at = np.zeros((m, alpha))
    g = np.zeros((alpha, r))
    for j, p in enumerate(pts):
        f = Fraction(1)
        for q in pts:
            if q != p:
                f *= p - q
        for i in range(m):
            at[i, j] = float(p ** i)
        for k in range(r):
            g[j, k] = float(p ** k / f)
    at[m - 1, alpha - 1] = 1.0
    g[alpha - 1, r - 1] = 1.0
    bt = np.zeros((alpha, alpha))
    e = np.array([[at[i, j] * g[j, k] for j in range(alpha)] for i in range(m) for k in range(r)])
    for col in range(alpha):
        rhs = np.array([1.0 if col == i + k else 0.0 for i in range(m) for k in range(r)])
        bt[:, col] = np.linalg.lstsq(e, rhs, rcond=None)[0]
    bt = np.round(bt * 64) / 64  # entries are multiples of 1/4 for these points
    assert np.allclose(np.einsum("ij,jk,jl->ikl", at, g, bt).reshape(m * r, alpha),
                       [[1.0 if col == i + k else 0.0 for col in range(alpha)] for i in range(m) for k in range(r)])
    return at, g, bt


# ---------------------------------------------------------------------------------- builder

def winograd_applies(spec: OpSpec) -> bool:
    if not host_conv_ok(spec):
        return False
    g = conv_geometry(spec)
    return (g["R"], g["S"]) == (3, 3) and g["strides"] == (1, 1) and g["dilations"] == (1, 1) and g["group"] == 1


def winograd_compiled_applies(spec: OpSpec) -> bool:
    return compiled is not None and winograd_applies(spec)


# Working-set target of one chunk: the transforms run chunk by chunk (input: channels, output:
# rows of tiles) so that their intermediates stay in cache instead of streaming through memory.
CHUNK_BYTES = 1 << 20
MIN_TILE_COLUMNS = 128  # keep the batched product's GEMMs wide enough to run at speed


def build_winograd(spec: OpSpec, consts: dict[int, np.ndarray], m: int, fmt: str = formats.NCHW,
                   fused: bool = False):
    """F(m x m, 3 x 3) on activations in ``fmt``: numpy transforms for NCHW, compiled ones else
    (``fused``: the per-thread engine, see :func:`_compiled_run`)."""
    if fmt != formats.NCHW and m not in COMPILED_TILE_SIZES:
        raise ValueError(f"the compiled Winograd engine has no F({m}x{m},3x3) transforms "
                         f"(it has F(4x4,3x3) and F(6x6,3x3))")
    g = conv_geometry(spec)
    N, C, K, H, W, P, Q = g["N"], g["C"], g["K"], g["H"], g["W"], g["P"], g["Q"]
    pads = g["pads"]
    at64, g64, bt64 = winograd_matrices(m)
    A = m + 2
    tp_n, tq_n = -(-P // m), -(-Q // m)
    T = tp_n * tq_n
    hp, wp = tp_n * m + 2, tq_n * m + 2
    # U[b*A + a, k, c] = (G g G^T)[a, b]: b (the column transform) outer, as the input transform
    # below produces it.
    # As one GEMM [(k, c), (r, s)] @ [(r, s), (b, a)] and a tiled transpose: the 4-operand einsum
    # took ~0.1 s per VGG layer at session start.
    kron = np.einsum("ar,bs->rsba", g64, g64).reshape(9, A * A)
    u_kc = np.asarray(consts[1], np.float64).reshape(K * C, 9) @ kron
    u = transposed(u_kc).reshape(A * A, K, C)
    bias = bias_of(spec, consts)
    if fmt != formats.NCHW:
        return _compiled_run(spec, u, bias, m, tp_n, tq_n, fmt, fused)
    at, bt = at64.astype(np.float32), bt64.astype(np.float32)  # the compiled transforms write theirs out
    act = activation(spec)
    extra_h, extra_w = hp - (H + pads[0] + pads[2]), wp - (W + pads[1] + pads[3])
    cs = max(1, CHUNK_BYTES // (4 * N * A * tp_n * wp))  # input channels per chunk
    # rows of tiles (over images and tile rows, n outer) per chunk of the product
    rs = max(-(-MIN_TILE_COLUMNS // tq_n), CHUNK_BYTES // (4 * A * A * K * tq_n))
    f = 4
    scratch = SCRATCH

    def run(x):
        xp = padded(x, pads, scratch, extra_h, extra_w)
        s0, s1, s2, s3 = xp.strides
        # d[b*A + a, c, (n, tp, tq)]: the batch joins the tiles as GEMM columns
        d = scratch.get("wino_d", (A * A, C, N * T))
        for c0 in range(0, C, cs):
            cc = min(C, c0 + cs) - c0
            # rows: R[a, c, n, tp, w] = sum_i BT[a, i] xp[n, c, tp*m + i, w]   (gather i, one GEMM)
            v1 = as_strided(xp[:, c0:], (A, cc, N, tp_n, wp), (s2, s1, s0, m * s2, s3), writeable=False)
            g1 = scratch.get("wino_g1", (A, cc * N * tp_n * wp))
            np.copyto(g1.reshape(v1.shape), v1)
            r = np.dot(bt, g1, out=scratch.get("wino_r", g1.shape))
            # cols: D[b, a, c, n, tp, tq] = sum_j BT[b, j] R[a, c, n, tp, tq*m + j]
            v2 = as_strided(r, (A, A, cc, N, tp_n, tq_n),
                            (f, cc * N * tp_n * wp * f, N * tp_n * wp * f, tp_n * wp * f, wp * f, m * f),
                            writeable=False)
            g2 = scratch.get("wino_g2", (A, A * cc * N * T))
            np.copyto(g2.reshape(v2.shape), v2)
            if cc == C:
                np.dot(bt, g2, out=d.reshape(A, -1))
            else:
                dd = np.dot(bt, g2, out=scratch.get("wino_dd", g2.shape))
                d[:, c0:c0 + cc] = dd.reshape(A * A, cc, N * T)
        y = np.empty((N, K, P, Q), np.float32)
        for t0 in range(0, N * tp_n, rs):
            tr = min(N * tp_n, t0 + rs) - t0
            mm = np.matmul(u, d[:, :, t0 * tq_n:(t0 + tr) * tq_n], out=scratch.get("wino_mm", (A * A, K, tr * tq_n)))
            # cols back, j innermost: Y1[(a, k, row, tq), j] = sum_b M[b, (a, ...)] AT[j, b]
            rest = A * K * tr * tq_n
            y1 = np.dot(mm.reshape(A, rest).T, at.T, out=scratch.get("wino_y1", (rest, m)))
            # rows: Y2[i, (k, row, tq, j)] = sum_a AT[i, a] Y1[a, ...]: each image row is contiguous
            y2 = np.dot(at, y1.reshape(A, -1), out=scratch.get("wino_y2", (m, K * tr * tq_n * m)))
            y2 = y2.reshape(m, K, tr, tq_n * m)
            for n in range(t0 // tp_n, (t0 + tr - 1) // tp_n + 1):  # the images this chunk's rows cover
                lo, hi = max(t0, n * tp_n), min(t0 + tr, (n + 1) * tp_n)
                h0, h1 = (lo - n * tp_n) * m, min(P, (hi - n * tp_n) * m)
                for i in range(min(m, h1 - h0)):
                    dst = y[n, :, h0 + i:h1:m]
                    src = y2[i, :, lo - t0:lo - t0 + dst.shape[1], :Q]
                    if bias is not None:
                        np.add(src, bias[:, None, None], out=dst)
                    else:
                        dst[...] = src
        return act(y)

    return run


COMPILED_TILE_SIZES = (4, 6)  # winograd_transforms writes out B^T and A^T of these
COMPILED_CHUNK_BYTES = 32 << 20  # transformed inputs + products per chunk of tiles: a memory cap
MIN_CHUNK_TILES = 64  # GEMM rows per chunk (each chunk streams every transformed filter again)
# Channels per pass through a tile's transform (its scratch stays in L1). Input transform,
# 256->256@56, F(4,3), b1: 1.65 ms with 64, 2.6 with all 256, 3.0 with 32, ~8 with one 8-lane
# block; at 512@28 all 512 ran 1.0 ms against 1.5 with 64.
CHANNEL_GROUP = 64


# The fused engine: at most this many tiles per chunk in each thread (batch 1, with chunks
# balanced between the threads: 64@224 F(4,3) 32 tiles 14.3 ms, 64 12.0, 96 11.0, 128 10.7, 192
# 10.2; 64->64@56 F(4,3) 1.6 ms with chunks of 96, unbalanced, 0.87 with 128, balanced; 96-192
# alike within noise elsewhere).
FUSED_CHUNK_TILES = 128
# The largest transformed filter it is a candidate for: each chunk reads all of it (256->256@56
# F(4,3), 9.4 MB: 14.4 ms against 11.5 for the batched GEMM; 128->128@112 F(6,3), 4.2 MB: 13.0
# against 13.5; 64->128@112 F(4,3), 1.2 MB: 8.2 against 11.5).
FUSED_MAX_FILTER_BYTES = 4 << 20


def fused_chunk_tiles(tiles: int, parts: int) -> int:
    """Tiles per chunk of the fused engine: at most FUSED_CHUNK_TILES, and as many chunks for
    every thread (64->64@56 F(6,3), 100 tiles: chunks of 96 would leave one thread 4 tiles)."""
    per_part = -(-tiles // parts)
    return -(-per_part // -(-per_part // FUSED_CHUNK_TILES))


def winograd_fused_applies(spec: OpSpec, m: int) -> bool:
    if not winograd_compiled_applies(spec):
        return False
    g = conv_geometry(spec)
    return 4 * (m + 2) ** 2 * g["C"] * g["K"] <= FUSED_MAX_FILTER_BYTES


def _channel_group(channels: int, lanes: int) -> int:
    """The largest divisor of ``channels`` that is a multiple of ``lanes`` and <= CHANNEL_GROUP."""
    return max(g for g in range(lanes, max(lanes, min(channels, CHANNEL_GROUP)) + 1, lanes) if channels % g == 0)


def _compiled_run(spec: OpSpec, u: np.ndarray, bias, m: int, tp_n: int, tq_n: int, fmt: str, fused: bool = False):
    """``run`` for NCHWc / NHWC activations: the compiled transforms vectorize along groups of
    contiguous channels, and the product is [tiles, C] @ [C, K] per transform position: one
    batched GEMM over every tile (on all cores), or, ``fused``, per chunk of tiles inside each
    thread (winograd_transforms.fused; chunks from :func:`fused_chunk_tiles`)."""
    if compiled is None:  # a plan made where numba was installed, served where it is not
        raise RuntimeError("the compiled Winograd transforms need numba, which is not installed "
                           "(pip install fastrun[numba])")
    g = conv_geometry(spec)
    N, C, K, H, W, P, Q = g["N"], g["C"], g["K"], g["H"], g["W"], g["P"], g["Q"]
    A, tiles = m + 2, N * tp_n * tq_n
    blocked = formats.block_size(fmt)
    lanes = blocked or 1  # NHWC: no channel padding, any channel count
    cp, kp = -(-C // lanes) * lanes, -(-K // lanes) * lanes
    ub = np.zeros((A * A, cp, kp), np.float32)  # zero rows/columns for the padded channels
    ub[:, :C, :K] = u.transpose(0, 2, 1)
    bias_p = np.zeros(kp, np.float32)
    if bias is not None:
        bias_p[:K] = bias
    relu = spec.activation == "Relu"
    act = (lambda y: y) if relu else activation(spec)
    # element strides (image, channel group, row, column) of both activations; channels go
    # ``group`` at a time through the transforms (see winograd_transforms.input_transform)
    group_c, group_k = _channel_group(cp, lanes), _channel_group(kp, lanes)
    if blocked:
        x_strides, x_lanes = (cp * H * W, H * W * lanes, W * lanes, lanes), lanes
        y_strides, y_lanes = (kp * P * Q, P * Q * lanes, Q * lanes, lanes), lanes
    else:
        x_strides, x_lanes = (H * W * C, group_c, W * C, C), group_c
        y_strides, y_lanes = (P * Q * K, group_k, Q * K, K), group_k
    compiled.ready()  # loads numba's on-disk cache in a process that never profiled
    chunk = max(MIN_CHUNK_TILES, COMPILED_CHUNK_BYTES // (4 * A * A * (cp + kp)))
    y_shape = formats.physical_shape(spec.output, fmt)
    pad_top, pad_left = g["pads"][0], g["pads"][1]
    scratch = SCRATCH

    def run(x):
        x = np.ascontiguousarray(x).reshape(-1)
        y = np.empty(y_shape, np.float32)
        with compiled.LOCK:
            parts = compiled.threads()
            if fused:
                single_threaded_blas = blas.lower_threads(1)
                try:
                    compiled.fused(x, x_strides, H, W, cp, x_lanes, group_c, m, pad_top, pad_left, tp_n, tq_n,
                                   tiles, ub, bias_p, relu, y.reshape(-1), y_strides, P, Q, kp, y_lanes,
                                   group_k, fused_chunk_tiles(tiles, parts), parts)
                finally:
                    single_threaded_blas()
            else:
                for t0 in range(0, tiles, chunk):
                    nt = min(tiles, t0 + chunk) - t0
                    v = scratch.get("wino_v", (nt, A * A, cp))
                    compiled.input_transform(x, x_strides, H, W, cp, x_lanes, group_c, m, pad_top, pad_left,
                                             tp_n, tq_n, t0, v, parts)
                    mm = scratch.get("wino_mv", (nt, A * A, kp))
                    np.matmul(v.transpose(1, 0, 2), ub, out=mm.transpose(1, 0, 2))
                    compiled.output_transform(mm, m, tp_n, tq_n, t0, bias_p, relu, y.reshape(-1), y_strides,
                                              P, Q, kp, y_lanes, group_k, parts)
        return act(y)

    return run


# Cost estimates (estimates.winograd: product GFLOP/s, ns per transformed element), fitted on the
# profiled 3x3 layers (scripts/bench_kernels.py --only 3x3, scripts/bench.py caches; 2-core AVX2 VM,
# batch 1 and 8). The numpy-transform variants: ~100 GFLOP/s and ~2.5 ns; against onnxruntime's
# blocked kernel this called win or loss right on 11 of 12 shapes (64..512 channels, 14..224
# pixels): Winograd pays where channels are many (>= 256) and the image not tiny, never at 64
# channels. The compiled engine (NCHWc / NHWC), on its 352 timings over the 3x3 layers of VGG-19,
# ResNet-50, Inception v1/v2 and DenseNet-121: ~150 GFLOP/s and ~1 ns, 83 of 88 shapes called
# right; the fused engine on its 88 timings: ~150 GFLOP/s and ~0.5 ns, 43 of 50 shapes right.

@implementation("Conv", "winograd_f2", exact=False, heuristic_rank=13, applies=winograd_applies,
                cost=estimates.winograd(2, 100.0, 2.5, rank=13))
def build_winograd_f2(spec: OpSpec, consts: dict[int, np.ndarray]):
    """Winograd F(2x2,3x3): 2.25x fewer multiplies, GEMM-based chunked transforms."""
    return build_winograd(spec, consts, 2)


@implementation("Conv", "winograd_f4", exact=False, heuristic_rank=11, applies=winograd_applies,
                cost=estimates.winograd(4, 100.0, 2.5, rank=11))
def build_winograd_f4(spec: OpSpec, consts: dict[int, np.ndarray]):
    """Winograd F(4x4,3x3): 4x fewer multiplies, GEMM-based chunked transforms."""
    return build_winograd(spec, consts, 4)


@implementation("Conv", "winograd_f6", exact=False, heuristic_rank=12, applies=winograd_applies,
                cost=estimates.winograd(6, 100.0, 2.5, rank=12))
def build_winograd_f6(spec: OpSpec, consts: dict[int, np.ndarray]):
    """Winograd F(6x6,3x3): 5.06x fewer multiplies, least exact (~1e-4 relative)."""
    return build_winograd(spec, consts, 6)


def _prepare_compiled() -> None:
    """Compile the numba kernels (~15 s the first time on a machine) before any time limit runs."""
    if compiled is not None:
        compiled.ready()


@implementation("Conv", "winograd_f4_nchwc", exact=False, version=3, in_format="NCHWc", heuristic_rank=14,
                applies=winograd_compiled_applies, prepare=_prepare_compiled,
                cost=estimates.winograd(4, 150.0, 1.0, rank=14))
def build_winograd_f4_nchwc(spec: OpSpec, consts: dict[int, np.ndarray]):
    """Winograd F(4x4,3x3) on blocked NCHWc activations, compiled transforms (needs numba)."""
    return build_winograd(spec, consts, 4, fmt=resolve_format("NCHWc"))


@implementation("Conv", "winograd_f6_nchwc", exact=False, version=3, in_format="NCHWc", heuristic_rank=14,
                applies=winograd_compiled_applies, prepare=_prepare_compiled,
                cost=estimates.winograd(6, 150.0, 1.0, rank=14))
def build_winograd_f6_nchwc(spec: OpSpec, consts: dict[int, np.ndarray]):
    """Winograd F(6x6,3x3) on blocked NCHWc activations, compiled transforms (needs numba)."""
    return build_winograd(spec, consts, 6, fmt=resolve_format("NCHWc"))


@implementation("Conv", "winograd_f4_nhwc", exact=False, version=3, in_format="NHWC", heuristic_rank=14,
                applies=winograd_compiled_applies, prepare=_prepare_compiled,
                cost=estimates.winograd(4, 150.0, 1.0, rank=14))
def build_winograd_f4_nhwc(spec: OpSpec, consts: dict[int, np.ndarray]):
    """Winograd F(4x4,3x3) on channels-last activations, compiled transforms (needs numba)."""
    return build_winograd(spec, consts, 4, fmt=formats.NHWC)


@implementation("Conv", "winograd_f6_nhwc", exact=False, version=3, in_format="NHWC", heuristic_rank=14,
                applies=winograd_compiled_applies, prepare=_prepare_compiled,
                cost=estimates.winograd(6, 150.0, 1.0, rank=14))
def build_winograd_f6_nhwc(spec: OpSpec, consts: dict[int, np.ndarray]):
    """Winograd F(6x6,3x3) on channels-last activations, compiled transforms (needs numba)."""
    return build_winograd(spec, consts, 6, fmt=formats.NHWC)


@implementation("Conv", "winograd_f4_fused_nhwc", exact=False, version=3, in_format="NHWC", heuristic_rank=15,
                applies=lambda spec: winograd_fused_applies(spec, 4), prepare=_prepare_compiled,
                cost=estimates.winograd(4, 150.0, 0.5, rank=15))
def build_winograd_f4_fused_nhwc(spec: OpSpec, consts: dict[int, np.ndarray]):
    """Winograd F(4x4,3x3) on NHWC, each thread all stages on its own tiles (small filters; needs numba)."""
    return build_winograd(spec, consts, 4, fmt=formats.NHWC, fused=True)


@implementation("Conv", "winograd_f6_fused_nhwc", exact=False, version=3, in_format="NHWC", heuristic_rank=15,
                applies=lambda spec: winograd_fused_applies(spec, 6), prepare=_prepare_compiled,
                cost=estimates.winograd(6, 150.0, 0.5, rank=15))
def build_winograd_f6_fused_nhwc(spec: OpSpec, consts: dict[int, np.ndarray]):
    """Winograd F(6x6,3x3) on NHWC, each thread all stages on its own tiles (small filters; needs numba)."""
    return build_winograd(spec, consts, 6, fmt=formats.NHWC, fused=True)
