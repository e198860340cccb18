"""Multi-threaded Winograd tile transforms, compiled with numba (optional: ImportError without it).

The numpy transforms in ``winograd.py`` run their gathers on one core; these run on every core
(``prange`` over equal parts of the tile rows, one scratch tile per part) and skip the zero
entries of B^T and A^T, which are mostly zeros and small integers. Measured per transform on the
2-core VM (``scripts/bench_kernels.py``): about 2-3x faster than the numpy gathers, still
compute- rather than memory-bound.

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

if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"

LOCK = threading.Lock()


def threads() -> int:
    """How many parts to split a transform into: one per numba thread."""
    return numba.get_num_threads()


def ready() -> None:
    """Compile both kernels now (or load them from numba's on-disk cache: ~0.2 s).

    The jit implementations' ``prepare`` hook calls it before the profiler forks its workers, so
    that the first compilation (~5 s, once per machine and numba version) runs outside any time
    limit and once, not in every worker; builders call it too (a serving process loads the cache).
    """
    bt = np.eye(4, dtype=np.float32)
    d = np.empty((16, 1, 1), np.float32)
    with LOCK:
        input_transform(np.zeros((1, 1, 4, 4), np.float32), bt, 2, 1, 1, d, 1)
        output_transform(d, bt[:2], 2, 1, 1, 0, np.zeros(1, np.float32), True, np.empty((1, 1, 2, 2), np.float32), 1)


@njit(parallel=True, fastmath=True, cache=True)
def input_transform(xp, bt, m, tp_n, tq_n, d, parts):  # pragma: no cover - compiled
    """d[b*A + a, c, n*T + tp*tq_n + tq] = (B^T x B)[a, b] over the tile (tp, tq) of xp[n, c]."""
    N, C = xp.shape[0], xp.shape[1]
    A = bt.shape[0]
    T = tp_n * tq_n
    jobs = C * N * tp_n
    for part in prange(parts):
        xt = np.empty((A, A, tq_n), np.float32)  # xt[i, j, tq] = x[tp*m + i, tq*m + j]
        r = np.empty((A, A, tq_n), np.float32)   # r[a, j, tq] = sum_i BT[a, i] xt[i, j, tq]
        for job in range(part * jobs // parts, (part + 1) * jobs // parts):
            c = job // (N * tp_n)
            n = (job // tp_n) % N
            tp = job % tp_n
            col0 = n * T + tp * tq_n
            for i in range(A):
                row = xp[n, c, tp * m + i]
                for j in range(A):
                    for tq in range(tq_n):
                        xt[i, j, tq] = row[tq * m + j]
            for a in range(A):
                r[a] = 0.0
                for i in range(A):
                    coef = bt[a, i]
                    if coef != 0.0:
                        for j in range(A):
                            for tq in range(tq_n):
                                r[a, j, tq] += coef * xt[i, j, tq]
            for b in range(A):
                for a in range(A):
                    out = d[b * A + a, c, col0:col0 + tq_n]
                    out[:] = 0.0
                    for j in range(A):
                        coef = bt[b, j]
                        if coef != 0.0:
                            for tq in range(tq_n):
                                out[tq] += coef * r[a, j, tq]


@njit(parallel=True, fastmath=True, cache=True)
def output_transform(mm, at, m, tp_n, tq_n, row0, bias, relu, y, parts):  # pragma: no cover - compiled
    """y[n, k, tp*m + i, tq*m + j] = (A^T M A)[i, j] + bias[k] (then ReLU if ``relu``), cropped
    to y's P x Q, for the tile rows row0, row0 + 1, ... (row = n*tp_n + tp) whose products
    mm[b*A + a, k, (row - row0)*tq_n + tq] holds."""
    K = mm.shape[1]
    A = at.shape[1]
    rows = mm.shape[2] // tq_n
    P, Q = y.shape[2], y.shape[3]
    jobs = K * rows
    for part in prange(parts):
        y1 = np.empty((A, m, tq_n), np.float32)  # y1[a, j, tq] = sum_b AT[j, b] M[b*A + a]
        acc = np.empty((m, tq_n), np.float32)
        for job in range(part * jobs // parts, (part + 1) * jobs // parts):
            k = job // rows
            rr = job % rows
            n = (row0 + rr) // tp_n
            tp = (row0 + rr) % tp_n
            c0 = rr * tq_n
            for a in range(A):
                for j in range(m):
                    y1[a, j] = 0.0
                    for b in range(A):
                        coef = at[j, b]
                        if coef != 0.0:
                            src = mm[b * A + a, k, c0:c0 + tq_n]
                            for tq in range(tq_n):
                                y1[a, j, tq] += coef * src[tq]
            for i in range(min(m, P - tp * m)):
                acc[:] = bias[k]
                for a in range(A):
                    coef = at[i, a]
                    if coef != 0.0:
                        for j in range(m):
                            for tq in range(tq_n):
                                acc[j, tq] += coef * y1[a, j, tq]
                dst = y[n, k, tp * m + i]
                for tq in range(tq_n):
                    for j in range(min(m, Q - tq * m)):
                        v = acc[j, tq]
                        dst[tq * m + j] = max(v, 0.0) if relu else v
