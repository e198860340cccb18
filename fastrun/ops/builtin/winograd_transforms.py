"""Multi-threaded Winograd tile transforms, compiled with numba (optional: ImportError without it).

The numpy transforms in ``winograd.py`` run their gathers on one core; these run on every core
(``prange`` over equal parts of the tiles, scratch per part). They read and write NCHWc or NHWC
activations, with inner loops along 64 contiguous channels, which the compiler turns into SIMD
code (over one 8-lane block the same kernels ran 5x slower).

A tile's 2-D transform is two passes of a 1-D one (rows, then columns), and the 1-D transforms of
F(4,3) and F(6,3) are written out (:func:`_bt4`, :func:`_bt6`, :func:`_at4`, :func:`_at6`: the
nonzeros of B^T and A^T, with their common sums), so one loop over the channels computes a whole
column of outputs: 12-16 loops per tile and channel group. The first version looped over B^T's
entries, one channel loop per nonzero coefficient (~270 per tile); the written-out passes made the
compiled layers mostly 1.1-1.6x faster, 1.0-2.1x over every layer and variant measured
(scripts/bench_kernels.py, b1: 128->128@112 fused F(6,3) 16.6 -> 10.9 ms, 512->512@28 F(4,3)
NHWC 13.6 -> 9.8; docs/benchmarks.md).

:func:`fused` runs the whole convolution per chunk of tiles on each thread (transform, product
through single-threaded BLAS, transform back), for layers whose transformed filters are small.

numba's "workqueue" threading layer is the one that survives ``fork`` (the profiler forks its
workers; the OpenMP layer aborts there), and it aborts the process when two threads enter it at
once: every call into these kernels holds :data:`LOCK` (concurrent sessions, parallel builds).
Each call already uses every core, so callers lose nothing by queueing.

numba's worker threads are pinned one per core (:func:`threads`, once per process; opt out with
``FASTRUN_PIN_THREADS=0``). Left to the scheduler, the two workers of a call that followed an
onnxruntime segment often shared one core for part of the call (the process then used 1.0-1.7
cores, not 2). Measured on the 2-vCPU VM, whole stored plans run round-robin pinned against not
pinned (lower quartiles of 15): ResNet-50 b8 431 -> 423 ms, VGG-19 b1 147 -> 143, Inception v2
b8 203 -> 186. Pinning onnxruntime's workers as well (``session.intra_op_thread_affinities``)
gained nothing (Inception v2 b8 188 -> 195).
"""
from __future__ import annotations

import ctypes
import logging
import os
import threading

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from fastrun.system import blas, hostthreads

if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"

log = logging.getLogger(__name__)

LOCK = threading.Lock()
f32 = np.float32  # the transforms' constants: a bare 4.0 is a float64 and turns the sums into float64
PIN_ENV = "FASTRUN_PIN_THREADS"
_scipy_blas_loaded = False
_pinned_in = None  # the process whose workers are pinned (a forked child starts new workers)
_HAS_GETTID = hasattr(ctypes.CDLL(None), "gettid")  # glibc >= 2.30


def threads() -> int:
    """How many parts to split a transform into: one per thread the host step may use.

    Called under :data:`LOCK` before each kernel; pins the workers first in a new process."""
    if _pinned_in != os.getpid():
        pin_workers()
    return max(1, min(numba.get_num_threads(), hostthreads.current()))


def pin_workers() -> dict[int, int]:
    """Pin each of numba's worker threads to one allowed core, round robin; {thread id: core}.

    Call it under :data:`LOCK`. Nothing is pinned with ``FASTRUN_PIN_THREADS=0``, on one allowed
    core, or where the C library has no ``gettid``; the calling thread is never pinned."""
    global _pinned_in
    _pinned_in = os.getpid()
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if os.environ.get(PIN_ENV, "1") == "0" or len(cores) < 2 or not _HAS_GETTID:
        return {}
    count = numba.get_num_threads()
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)  # reach every worker, then restore
    try:
        ids = _worker_thread_ids(numba.config.NUMBA_NUM_THREADS)
    finally:
        numba.set_num_threads(count)
    workers = sorted(set(int(t) for t in ids) - {threading.get_native_id()})
    pinned = {}
    for k, tid in enumerate(workers):
        try:
            os.sched_setaffinity(tid, {cores[k % len(cores)]})
            pinned[tid] = cores[k % len(cores)]
        except OSError as exc:  # the thread ended, or a policy forbids it: leave it to the scheduler
            log.debug("cannot pin numba worker %d: %s", tid, exc)
    return pinned


@intrinsic
def _gettid(typingctx):  # pragma: no cover - compiled
    """The C library's gettid(), called by name (a ctypes function would keep numba from caching)."""
    def codegen(context, builder, signature, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []), "gettid")
        return builder.call(fn, [])
    return types.int32(), codegen


@njit(parallel=True, cache=True)
def _worker_thread_ids(n):  # pragma: no cover - compiled
    """The kernel thread id that ran each of n iterations (one per worker with n = the workers)."""
    ids = np.zeros(n, np.int64)
    for i in prange(n):
        ids[i] = _gettid()
    return ids


def ready() -> None:
    """Compile the kernels now (or load them from numba's on-disk cache: ~0.3 s).

    The compiled implementations' ``prepare`` hook calls it before the profiler forks its workers, so
    that the first compilation (~15 s, once per machine and numba version) runs outside any time
    limit and once, not in every worker; builders call it too (a serving process loads the cache).
    """
    global _scipy_blas_loaded
    if not _scipy_blas_loaded:  # np.dot in compiled code calls scipy's BLAS (~0.1 s to import: not at import)
        import scipy.linalg.cython_blas  # noqa: F401

        blas.reload_libraries()  # so that blas.lower_threads reaches it too
        _scipy_blas_loaded = True
    v = np.empty((1, 36, 1), np.float32)  # one F(4,3) tile of one channel
    x, y, strides = np.zeros(1, np.float32), np.zeros(1, np.float32), (0, 0, 0, 1)
    with LOCK:
        input_transform(x, strides, 1, 1, 1, 1, 1, 4, 0, 0, 1, 1, 0, v, 1)
        output_transform(v, 4, 1, 1, 0, x, True, y, strides, 1, 1, 1, 1, 1, 1)
        fused(x, strides, 1, 1, 1, 1, 1, 4, 0, 0, 1, 1, 1, v.reshape(36, 1, 1), x, True, y, strides,
              1, 1, 1, 1, 1, 1, 1)


@njit(inline="always")
def _tile_position(t, tp_n, tq_n):  # pragma: no cover - compiled
    """(image, tile row, tile column) of tile t = (n*tp_n + tp)*tq_n + tq."""
    return t // (tp_n * tq_n), (t % (tp_n * tq_n)) // tq_n, t % tq_n


@njit(inline="always", fastmath=True)
def _bt4(s0, s1, s2, s3, s4, s5, t0, t1, t2, t3, t4, t5, n):  # pragma: no cover - compiled
    """t = B^T s of F(4,3) (points 0, +-1, +-2), element-wise along n channels."""
    for c in range(n):
        d0, d1, d2, d3, d4, d5 = s0[c], s1[c], s2[c], s3[c], s4[c], s5[c]
        t0[c] = f32(4.0) * d0 - f32(5.0) * d2 + d4
        t1[c] = d3 + d4 - f32(4.0) * (d1 + d2)
        t2[c] = d4 - d3 + f32(4.0) * (d1 - d2)
        t3[c] = d4 - d2 + f32(2.0) * (d3 - d1)
        t4[c] = d4 - d2 - f32(2.0) * (d3 - d1)
        t5[c] = f32(4.0) * d1 - f32(5.0) * d3 + d5


@njit(inline="always", fastmath=True)
def _bt6(s0, s1, s2, s3, s4, s5, s6, s7, t0, t1, t2, t3, t4, t5, t6, t7, n):  # pragma: no cover - compiled
    """t = B^T s of F(6,3) (points 0, +-1, +-2, +-1/2), element-wise along n channels."""
    for c in range(n):
        d0, d1, d2, d3, d4, d5, d6, d7 = s0[c], s1[c], s2[c], s3[c], s4[c], s5[c], s6[c], s7[c]
        even, odd = d2 + d6 - f32(4.25) * d4, d1 + d5 - f32(4.25) * d3
        t0[c] = d6 - d0 + f32(5.25) * (d2 - d4)
        t1[c] = even + odd
        t2[c] = even - odd
        even, odd = f32(0.25) * d2 - f32(1.25) * d4 + d6, f32(0.5) * d1 - f32(2.5) * d3 + f32(2.0) * d5
        t3[c] = even + odd
        t4[c] = even - odd
        even, odd = f32(4.0) * d2 - f32(5.0) * d4 + d6, f32(2.0) * d1 - f32(2.5) * d3 + f32(0.5) * d5
        t5[c] = even + odd
        t6[c] = even - odd
        t7[c] = d7 - d1 + f32(5.25) * (d3 - d5)


@njit(inline="always", fastmath=True)
def _at4(s0, s1, s2, s3, s4, s5, t0, t1, t2, t3, n):  # pragma: no cover - compiled
    """t = A^T s of F(4,3), element-wise along n channels."""
    for c in range(n):
        plus1, minus1 = s1[c] + s2[c], s1[c] - s2[c]
        plus2, minus2 = s3[c] + s4[c], s3[c] - s4[c]
        t0[c] = s0[c] + plus1 + plus2
        t1[c] = minus1 + f32(2.0) * minus2
        t2[c] = plus1 + f32(4.0) * plus2
        t3[c] = minus1 + f32(8.0) * minus2 + s5[c]


@njit(inline="always", fastmath=True)
def _at6(s0, s1, s2, s3, s4, s5, s6, s7, t0, t1, t2, t3, t4, t5, n):  # pragma: no cover - compiled
    """t = A^T s of F(6,3), element-wise along n channels."""
    for c in range(n):
        plus1, minus1 = s1[c] + s2[c], s1[c] - s2[c]
        plus2, minus2 = s3[c] + s4[c], s3[c] - s4[c]
        plus_half, minus_half = s5[c] + s6[c], s5[c] - s6[c]
        t0[c] = s0[c] + plus1 + plus2 + plus_half
        t1[c] = minus1 + f32(2.0) * minus2 + f32(0.5) * minus_half
        t2[c] = plus1 + f32(4.0) * plus2 + f32(0.25) * plus_half
        t3[c] = minus1 + f32(8.0) * minus2 + f32(0.125) * minus_half
        t4[c] = plus1 + f32(16.0) * plus2 + f32(0.0625) * plus_half
        t5[c] = minus1 + f32(32.0) * minus2 + f32(0.03125) * minus_half + s7[c]


@njit(inline="always", fastmath=True)
def _input_tile(x, strides, H, W, cp, L, cc, m, pad_top, pad_left, tp_n, tq_n, t, v, base, pos_stride,
                d, r):  # pragma: no cover - compiled
    """v[base + (b*A + a)*pos_stride + c] = (B^T d B)[a, b] for tile t, d = that tile of channel c
    (zero outside the image); ``d`` and ``r`` are (A, A, cc) scratch.

    ``x`` is flat: channel c = g*L + l of pixel (h, w) of image n is at
    ``n*strides[0] + g*strides[1] + h*strides[2] + w*strides[3] + l`` (NCHWc: L is the block;
    NHWC: L = cc and strides[1] = cc). Channels go cc at a time (a multiple of L): the tile's
    scratch stays in L1 and the inner loops run over cc contiguous channels, which is what the
    compiler vectorizes (loops over an 8-lane block alone ran 5x slower).
    """
    A = m + 2
    sn, sg, sh, sw = strides
    n, tp, tq = _tile_position(t, tp_n, tq_n)
    h0 = tp * m - pad_top
    w0 = tq * m - pad_left
    step = A * pos_stride  # from (b, a) to (b + 1, a) in v
    # a tile inside the image, with its channels contiguous (NHWC): the rows pass reads x itself
    inside = L == cc and h0 >= 0 and h0 + A <= H and w0 >= 0 and w0 + A <= W
    flat_d = d.reshape(-1)
    for c0 in range(0, cp, cc):
        if inside:
            src, at0, si, sj = x, n * sn + h0 * sh + w0 * sw + (c0 // L) * sg, sh, sw
        else:
            src, at0, si, sj = flat_d, 0, A * cc, cc
            for i in range(A):
                h = h0 + i
                for j in range(A):
                    w = w0 + j
                    dij = d[i, j]
                    if h >= 0 and h < H and w >= 0 and w < W:
                        pixel = n * sn + h * sh + w * sw
                        for g in range(cc // L):
                            pixel_group = x[pixel + (c0 // L + g) * sg:]
                            for l in range(L):
                                dij[g * L + l] = pixel_group[l]
                    else:
                        dij[:] = 0.0
        # rows: r[a, j] = sum_i B^T[a, i] d[i, j] (d[i, j] = src[at0 + i*si + j*sj:]);
        # columns: v at (b, a) = sum_j B^T[b, j] r[a, j]
        if A == 6:
            for j in range(6):
                o = at0 + j * sj
                _bt4(src[o:], src[o + si:], src[o + 2 * si:], src[o + 3 * si:], src[o + 4 * si:], src[o + 5 * si:],
                     r[0, j], r[1, j], r[2, j], r[3, j], r[4, j], r[5, j], cc)
            for a in range(6):
                o = base + a * pos_stride + c0
                _bt4(r[a, 0], r[a, 1], r[a, 2], r[a, 3], r[a, 4], r[a, 5],
                     v[o:], v[o + step:], v[o + 2 * step:], v[o + 3 * step:], v[o + 4 * step:], v[o + 5 * step:],
                     cc)
        else:
            for j in range(8):
                o = at0 + j * sj
                _bt6(src[o:], src[o + si:], src[o + 2 * si:], src[o + 3 * si:], src[o + 4 * si:], src[o + 5 * si:],
                     src[o + 6 * si:], src[o + 7 * si:],
                     r[0, j], r[1, j], r[2, j], r[3, j], r[4, j], r[5, j], r[6, j], r[7, j], cc)
            for a in range(8):
                o = base + a * pos_stride + c0
                _bt6(r[a, 0], r[a, 1], r[a, 2], r[a, 3], r[a, 4], r[a, 5], r[a, 6], r[a, 7],
                     v[o:], v[o + step:], v[o + 2 * step:], v[o + 3 * step:], v[o + 4 * step:], v[o + 5 * step:],
                     v[o + 6 * step:], v[o + 7 * step:], cc)


@njit(inline="always", fastmath=True)
def _output_tile(mm, base, pos_stride, m, tp_n, tq_n, t, bias, relu, y, strides, P, Q, kp, L, kc,
                 y1, acc):  # pragma: no cover - compiled
    """y at (n, channel k, tp*m + i, tq*m + j) = (A^T M A)[i, j] + bias[k] (then ReLU if ``relu``),
    cropped to P x Q, for tile t, M[b, a] = mm[base + (b*A + a)*pos_stride + k]. ``y`` is flat and
    addressed like ``x`` above; output channels go kc at a time; ``y1`` (A, m, kc) and ``acc``
    (m, m, kc) are scratch."""
    A = m + 2
    sn, sg, sh, sw = strides
    n, tp, tq = _tile_position(t, tp_n, tq_n)
    step = A * pos_stride
    for k0 in range(0, kp, kc):
        # columns: y1[a, j] = sum_b A^T[j, b] M[b, a]; rows: acc[i, j] = sum_a A^T[i, a] y1[a, j]
        if A == 6:
            for a in range(6):
                o = base + a * pos_stride + k0
                _at4(mm[o:], mm[o + step:], mm[o + 2 * step:], mm[o + 3 * step:], mm[o + 4 * step:],
                     mm[o + 5 * step:], y1[a, 0], y1[a, 1], y1[a, 2], y1[a, 3], kc)
            for j in range(4):
                _at4(y1[0, j], y1[1, j], y1[2, j], y1[3, j], y1[4, j], y1[5, j],
                     acc[0, j], acc[1, j], acc[2, j], acc[3, j], kc)
        else:
            for a in range(8):
                o = base + a * pos_stride + k0
                _at6(mm[o:], mm[o + step:], mm[o + 2 * step:], mm[o + 3 * step:], mm[o + 4 * step:],
                     mm[o + 5 * step:], mm[o + 6 * step:], mm[o + 7 * step:],
                     y1[a, 0], y1[a, 1], y1[a, 2], y1[a, 3], y1[a, 4], y1[a, 5], kc)
            for j in range(6):
                _at6(y1[0, j], y1[1, j], y1[2, j], y1[3, j], y1[4, j], y1[5, j], y1[6, j], y1[7, j],
                     acc[0, j], acc[1, j], acc[2, j], acc[3, j], acc[4, j], acc[5, j], kc)
        for i in range(min(m, P - tp * m)):
            row = n * sn + (tp * m + i) * sh
            for j in range(min(m, Q - tq * m)):
                pixel = row + (tq * m + j) * sw
                accij = acc[i, j]
                for g in range(kc // L):
                    dst = y[pixel + (k0 // L + g) * sg:]
                    for l in range(L):
                        value = accij[g * L + l] + bias[k0 + g * L + l]
                        dst[l] = max(value, f32(0.0)) if relu else value


@njit(parallel=True, fastmath=True, cache=True)
def input_transform(x, strides, H, W, cp, L, cc, m, pad_top, pad_left, tp_n, tq_n, t0, v,
                    parts):  # pragma: no cover - compiled
    """v[t - t0, b*A + a, c] = (B^T d B)[a, b] for the tiles t = t0 .. t0 + v.shape[0] - 1
    (t = (n*tp_n + tp)*tq_n + tq): :func:`_input_tile` over equal parts of the tiles."""
    A = m + 2
    tiles = v.shape[0]
    flat = v.reshape(-1)
    for part in prange(parts):
        d = np.empty((A, A, cc), np.float32)
        r = np.empty((A, A, cc), np.float32)
        for job in range(part * tiles // parts, (part + 1) * tiles // parts):
            _input_tile(x, strides, H, W, cp, L, cc, m, pad_top, pad_left, tp_n, tq_n, t0 + job, flat,
                        job * A * A * cp, cp, d, r)


@njit(parallel=True, fastmath=True, cache=True)
def output_transform(mm, m, tp_n, tq_n, t0, bias, relu, y, strides, P, Q, kp, L, kc,
                     parts):  # pragma: no cover - compiled
    """The output tiles t0, t0 + 1, ... from their products mm[t - t0, b*A + a, k]:
    :func:`_output_tile` over equal parts of the tiles."""
    A = m + 2
    tiles = mm.shape[0]
    flat = mm.reshape(-1)
    for part in prange(parts):
        y1 = np.empty((A, m, kc), np.float32)
        acc = np.empty((m, m, kc), np.float32)
        for job in range(part * tiles // parts, (part + 1) * tiles // parts):
            _output_tile(flat, job * A * A * kp, kp, m, tp_n, tq_n, t0 + job, bias, relu, y, strides, P, Q,
                         kp, L, kc, y1, acc)


@njit(parallel=True, fastmath=True, cache=True)
def fused(x, x_strides, H, W, cp, L, cc, m, pad_top, pad_left, tp_n, tq_n, tiles, u, bias, relu, y,
          y_strides, P, Q, kp, kL, kc, chunk, parts):  # pragma: no cover - compiled
    """The whole convolution, ``chunk`` tiles at a time per thread: transform them into
    v[b*A + a, tile, c], multiply position by position with single-threaded BLAS (np.dot: scipy's
    BLAS) by u[b*A + a] ([cp, kp]) into mm, transform back. v and mm stay in the core's cache, and
    no thread waits for another between the stages; it pays when u is small enough to be read
    once per chunk (few channels). The caller keeps BLAS on one thread."""
    A = m + 2
    chunks = (tiles + chunk - 1) // chunk
    for part in prange(parts):
        d = np.empty((A, A, cc), np.float32)
        r = np.empty((A, A, cc), np.float32)
        y1 = np.empty((A, m, kc), np.float32)
        acc = np.empty((m, m, kc), np.float32)
        v = np.empty(A * A * chunk * cp, np.float32)
        mm = np.empty(A * A * chunk * kp, np.float32)
        for index in range(part * chunks // parts, (part + 1) * chunks // parts):
            t0 = index * chunk
            nt = min(tiles, t0 + chunk) - t0
            for job in range(nt):
                _input_tile(x, x_strides, H, W, cp, L, cc, m, pad_top, pad_left, tp_n, tq_n, t0 + job, v,
                            job * cp, chunk * cp, d, r)
            for pos in range(A * A):
                vp = v[pos * chunk * cp:(pos * chunk + nt) * cp].reshape((nt, cp))
                np.dot(vp, u[pos], mm[pos * chunk * kp:(pos * chunk + nt) * kp].reshape((nt, kp)))
            for job in range(nt):
                _output_tile(mm, job * kp, chunk * kp, m, tp_n, tq_n, t0 + job, bias, relu, y, y_strides, P, Q,
                             kp, kL, kc, y1, acc)
