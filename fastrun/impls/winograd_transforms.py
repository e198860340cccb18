"""Multi-threaded Winograd tile transforms, compiled with numba (optional: ImportError without it).

The numpy transforms in ``winograd.py`` run their gathers on one core; these run on every core
(``prange`` over equal parts of the tiles, scratch per part) and skip the zero entries of B^T and
A^T, which are mostly zeros and small integers. They read and write NCHWc or NHWC activations,
with inner loops along 64 contiguous channels, which the compiler turns into SIMD code. Measured
on the 2-core AVX2 VM (256->256@56, F(4,3), batch 1): about 2 ms per transform, against 8 ms
when the inner loop ran over one 8-lane block only, and 5 ms for session 4's NCHW kernels, whose
inner loops ran along a row of tiles (strided).

:func:`fused` runs the whole convolution per chunk of tiles on each thread (transform, product
through single-threaded BLAS, transform back), for layers whose transformed filters are small.

numba's "workqueue" threading layer is the one that survives ``fork`` (the profiler forks its
workers; the OpenMP layer aborts there), and it aborts the process when two threads enter it at
once: every call into these kernels holds :data:`LOCK` (concurrent sessions, parallel builds).
Each call already uses every core, so callers lose nothing by queueing.
"""
from __future__ import annotations

import os
import threading

import numba
import numpy as np
from numba import njit, prange

from .. import blas, hostthreads

if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"

LOCK = threading.Lock()
_scipy_blas_loaded = False


def threads() -> int:
    """How many parts to split a transform into: one per thread the host step may use."""
    return max(1, min(numba.get_num_threads(), hostthreads.current()))


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
    bt = np.eye(4, dtype=np.float32)
    v = np.empty((1, 16, 1), np.float32)
    x, y, strides = np.zeros(1, np.float32), np.zeros(4, np.float32), (0, 0, 0, 1)
    with LOCK:
        input_transform(x, strides, 1, 1, 1, 1, 1, bt, 2, 0, 0, 1, 1, 0, v, 1)
        output_transform(v, bt[:2], 2, 1, 1, 0, x, True, y, strides, 2, 2, 1, 1, 1, 1)
        fused(x, strides, 1, 1, 1, 1, 1, bt, bt[:2], 2, 0, 0, 1, 1, 1, v.reshape(16, 1, 1), x, True, y, strides,
              2, 2, 1, 1, 1, 1, 1)


@njit(inline="always")
def _tile_position(t, tp_n, tq_n):  # pragma: no cover - compiled
    """(image, tile row, tile column) of tile t = (n*tp_n + tp)*tq_n + tq."""
    return t // (tp_n * tq_n), (t % (tp_n * tq_n)) // tq_n, t % tq_n


@njit(inline="always", fastmath=True)
def _input_tile(x, strides, H, W, cp, L, cc, bt, m, pad_top, pad_left, tp_n, tq_n, t, v, base, pos_stride,
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
    for c0 in range(0, cp, cc):
        for i in range(A):
            h = h0 + i
            for j in range(A):
                w = w0 + j
                dij = d[i, j]
                if h >= 0 and h < H and w >= 0 and w < W:
                    pixel = n * sn + h * sh + w * sw
                    for g in range(cc // L):
                        src = x[pixel + (c0 // L + g) * sg:]
                        for l in range(L):
                            dij[g * L + l] = src[l]
                else:
                    dij[:] = 0.0
        for a in range(A):
            for j in range(A):
                r[a, j] = 0.0
            for i in range(A):
                coef = bt[a, i]
                if coef != 0.0:
                    for j in range(A):
                        raj = r[a, j]
                        dij = d[i, j]
                        for c in range(cc):
                            raj[c] += coef * dij[c]
        for b in range(A):
            for a in range(A):
                at_ba = base + (b * A + a) * pos_stride + c0
                out = v[at_ba:at_ba + cc]
                out[:] = 0.0
                for j in range(A):
                    coef = bt[b, j]
                    if coef != 0.0:
                        raj = r[a, j]
                        for c in range(cc):
                            out[c] += coef * raj[c]


@njit(inline="always", fastmath=True)
def _output_tile(mm, base, pos_stride, at, m, tp_n, tq_n, t, bias, relu, y, strides, P, Q, kp, L, kc,
                 y1, acc):  # pragma: no cover - compiled
    """y at (n, channel k, tp*m + i, tq*m + j) = (A^T M A)[i, j] + bias[k] (then ReLU if ``relu``),
    cropped to P x Q, for tile t, M[b, a] = mm[base + (b*A + a)*pos_stride + k]. ``y`` is flat and
    addressed like ``x`` above; output channels go kc at a time; ``y1`` (A, m, kc) and ``acc``
    (m, kc) are scratch."""
    A = m + 2
    sn, sg, sh, sw = strides
    n, tp, tq = _tile_position(t, tp_n, tq_n)
    for k0 in range(0, kp, kc):
        for a in range(A):
            for j in range(m):
                y1aj = y1[a, j]
                y1aj[:] = 0.0
                for b in range(A):
                    coef = at[j, b]
                    if coef != 0.0:
                        at_ba = base + (b * A + a) * pos_stride + k0
                        src = mm[at_ba:at_ba + kc]
                        for k in range(kc):
                            y1aj[k] += coef * src[k]
        for i in range(min(m, P - tp * m)):
            for j in range(m):
                acc[j] = bias[k0:k0 + kc]
            for a in range(A):
                coef = at[i, a]
                if coef != 0.0:
                    for j in range(m):
                        accj = acc[j]
                        y1aj = y1[a, j]
                        for k in range(kc):
                            accj[k] += coef * y1aj[k]
            if relu:
                for j in range(m):
                    for k in range(kc):
                        acc[j, k] = max(acc[j, k], 0.0)
            row = n * sn + (tp * m + i) * sh
            for j in range(min(m, Q - tq * m)):
                pixel = row + (tq * m + j) * sw
                for g in range(kc // L):
                    dst = y[pixel + (k0 // L + g) * sg:]
                    for l in range(L):
                        dst[l] = acc[j, g * L + l]


@njit(parallel=True, fastmath=True, cache=True)
def input_transform(x, strides, H, W, cp, L, cc, bt, m, pad_top, pad_left, tp_n, tq_n, t0, v,
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
            _input_tile(x, strides, H, W, cp, L, cc, bt, m, pad_top, pad_left, tp_n, tq_n, t0 + job, flat,
                        job * A * A * cp, cp, d, r)


@njit(parallel=True, fastmath=True, cache=True)
def output_transform(mm, at, m, tp_n, tq_n, t0, bias, relu, y, strides, P, Q, kp, L, kc,
                     parts):  # pragma: no cover - compiled
    """The output tiles t0, t0 + 1, ... from their products mm[t - t0, b*A + a, k]:
    :func:`_output_tile` over equal parts of the tiles."""
    A = m + 2
    tiles = mm.shape[0]
    flat = mm.reshape(-1)
    for part in prange(parts):
        y1 = np.empty((A, m, kc), np.float32)
        acc = np.empty((m, kc), np.float32)
        for job in range(part * tiles // parts, (part + 1) * tiles // parts):
            _output_tile(flat, job * A * A * kp, kp, at, m, tp_n, tq_n, t0 + job, bias, relu, y, strides, P, Q,
                         kp, L, kc, y1, acc)


@njit(parallel=True, fastmath=True, cache=True)
def fused(x, x_strides, H, W, cp, L, cc, bt, at, m, pad_top, pad_left, tp_n, tq_n, tiles, u, bias, relu, y,
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
        acc = np.empty((m, kc), np.float32)
        v = np.empty(A * A * chunk * cp, np.float32)
        mm = np.empty(A * A * chunk * kp, np.float32)
        for index in range(part * chunks // parts, (part + 1) * chunks // parts):
            t0 = index * chunk
            nt = min(tiles, t0 + chunk) - t0
            for job in range(nt):
                _input_tile(x, x_strides, H, W, cp, L, cc, bt, m, pad_top, pad_left, tp_n, tq_n, t0 + job, v,
                            job * cp, chunk * cp, d, r)
            for pos in range(A * A):
                vp = v[pos * chunk * cp:(pos * chunk + nt) * cp].reshape((nt, cp))
                np.dot(vp, u[pos], mm[pos * chunk * kp:(pos * chunk + nt) * kp].reshape((nt, kp)))
            for job in range(nt):
                _output_tile(mm, job * kp, chunk * kp, at, m, tp_n, tq_n, t0 + job, bias, relu, y, y_strides, P, Q,
                             kp, kL, kc, y1, acc)
