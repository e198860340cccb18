"""Host (numpy + OpenBLAS) 2-D convolutions.

* ``im2col_gemm``      any 2-D conv: a strided view of the padded input copied into columns,
                       then one (grouped: batched over groups) GEMM.
* ``conv1x1_gemm``     1x1, stride 1, no padding: the convolution *is* a GEMM, W[K,C] @ X[C,HW]
                       (grouped 1x1 as a batched matmul over groups).
* ``conv1x1_nhwc``     the same in channels-last: X[NHW,C] @ W^T[C,K] (strides by subsampling).
* ``conv1x1_strided``  strided 1x1 without padding: subsample, then the 1x1 GEMM.
* ``depthwise_taps``   depthwise (with channel multiplier): accumulate R*S broadcast multiplies.

Bias and the fused activation are applied in place on the GEMM output.
"""
from __future__ import annotations

import threading

import numpy as np
from numpy.lib.stride_tricks import as_strided

from fastrun.ops.registry import OpSpec, implementation
from fastrun.ops.builtin import estimates
from fastrun.ops.builtin.common import activation, conv_geometry, is_conv2d, is_depthwise

HOST_ACTIVATIONS = (None, "Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh")


def host_conv_ok(spec: OpSpec) -> bool:
    """Shared preconditions of every host conv: float32 2-D conv, constant weights (and bias)."""
    if not is_conv2d(spec) or spec.activation not in HOST_ACTIVATIONS:
        return False
    return len(spec.inputs) < 3 or spec.inputs[2] is None or spec.const[2]


def bias_of(spec: OpSpec, consts: dict[int, np.ndarray]):
    if len(spec.inputs) > 2 and spec.inputs[2] is not None:
        return np.ascontiguousarray(consts[2], dtype=np.float32)
    return None


def pad_input(x: np.ndarray, pads, extra_h: int = 0, extra_w: int = 0) -> np.ndarray:
    """Zero-pad the spatial dims (top, left, bottom, right), plus optional extra bottom/right."""
    t, l, b, r = pads
    b, r = b + extra_h, r + extra_w
    if not (t or l or b or r):
        return x
    n, c, h, w = x.shape
    xp = np.zeros((n, c, h + t + b, w + l + r), dtype=x.dtype)
    xp[:, :, t:t + h, l:l + w] = x
    return xp


class Scratch(threading.local):
    """Per-thread work buffers, reused across calls and shared by all host kernels.

    Kernels run one at a time per thread and never return a scratch buffer, so kernels whose
    intermediates have the same name and shape can share them: a model's resident scratch is one
    buffer per distinct (name, shape), not one per layer. Reuse avoids re-faulting fresh pages on
    every call (a fresh 115 MB im2col matrix per call costs about as much as a GEMM pass over it).
    Zero-initialized buffers keep their zero borders: users only ever rewrite interiors.
    """

    def __init__(self) -> None:
        self.buffers: dict = {}

    def get(self, name: str, shape, zero: bool = False) -> np.ndarray:
        key = (name, tuple(shape), zero)
        buf = self.buffers.get(key)
        if buf is None:
            buf = np.zeros(shape, np.float32) if zero else np.empty(shape, np.float32)
            self.buffers[key] = buf
        return buf

    def clear(self) -> None:
        self.buffers.clear()


SCRATCH = Scratch()


def padded(x: np.ndarray, pads, scratch: Scratch, extra_h: int = 0, extra_w: int = 0) -> np.ndarray:
    """``pad_input`` into a reused zero-bordered buffer (x itself when there is nothing to pad)."""
    t, l, b, r = pads
    b, r = b + extra_h, r + extra_w
    if not (t or l or b or r):
        return x
    n, c, h, w = x.shape
    # the key holds the pads: only buffers with the same zero border may be shared
    xp = scratch.get(f"pad{t},{l},{b},{r}", (n, c, h + t + b, w + l + r), zero=True)
    xp[:, :, t:t + h, l:l + w] = x
    return xp


def _is_1x1(g: dict) -> bool:
    return g["R"] == 1 and g["S"] == 1 and g["pads"] == (0, 0, 0, 0)


def _finish(spec: OpSpec, bias):
    """In-place bias + activation on an NCHW (or NHWC when ``channels_last``) output."""
    act = activation(spec)

    def finish(y: np.ndarray, channels_last: bool = False) -> np.ndarray:
        if bias is not None:
            y += bias if channels_last else bias[:, None, None]
        return act(y)

    return finish


# ----------------------------------------------------------------------------------- im2col

@implementation("Conv", "im2col_gemm", heuristic_rank=60, applies=host_conv_ok)
def build_im2col(spec: OpSpec, consts: dict[int, np.ndarray]):
    """im2col (strided view of the padded input) + one BLAS GEMM, grouped as a batched matmul."""
    g = conv_geometry(spec)
    N, C, K, Cg, R, S, G = g["N"], g["C"], g["K"], g["Cg"], g["R"], g["S"], g["group"]
    P, Q = g["P"], g["Q"]
    sh, sw = g["strides"]
    dh, dw = g["dilations"]
    Kg = K // G
    # W[K, Cg, R, S] -> [G, Kg, Cg*R*S]: rows match the column matrix's (c, r, s) order.
    w = np.ascontiguousarray(np.asarray(consts[1], np.float32).reshape(G, Kg, Cg * R * S))
    finish = _finish(spec, bias_of(spec, consts))
    pads = g["pads"]
    scratch = SCRATCH

    def run(x):
        xp = padded(x, pads, scratch)
        s0, s1, s2, s3 = xp.strides
        # view[n, c, r, s, p, q] = xp[n, c, p*sh + r*dh, q*sw + s*dw]
        view = as_strided(xp, shape=(N, C, R, S, P, Q),
                          strides=(s0, s1, s2 * dh, s3 * dw, s2 * sh, s3 * sw), writeable=False)
        cols = scratch.get("cols", (N, C, R, S, P, Q))
        np.copyto(cols, view)  # the one copy
        y = np.matmul(w, cols.reshape(N, G, Cg * R * S, P * Q))  # [N, G, Kg, PQ]
        return finish(y.reshape(N, K, P, Q))

    return run


# ------------------------------------------------------------------------------------- 1x1

def _conv1x1_applies(spec: OpSpec) -> bool:
    if not host_conv_ok(spec):
        return False
    g = conv_geometry(spec)
    return _is_1x1(g) and g["strides"] == (1, 1)


@implementation("Conv", "conv1x1_gemm", heuristic_rank=30, applies=_conv1x1_applies)
def build_conv1x1(spec: OpSpec, consts: dict[int, np.ndarray]):
    """1x1 stride-1 conv as GEMM W[K,C] @ X[C,HW] per image (grouped: batched over groups)."""
    g = conv_geometry(spec)
    N, K, G, Cg, H, W = g["N"], g["K"], g["group"], g["Cg"], g["H"], g["W"]
    w = np.ascontiguousarray(np.asarray(consts[1], np.float32).reshape(G, K // G, Cg))
    finish = _finish(spec, bias_of(spec, consts))

    if G == 1:
        w2 = w[0]

        def run(x):
            y = np.matmul(w2, x.reshape(N, Cg, H * W))
            return finish(y.reshape(N, K, H, W))
    else:
        def run(x):
            y = np.matmul(w, x.reshape(N, G, Cg, H * W))
            return finish(y.reshape(N, K, H, W))

    return run


def _conv1x1_strided_applies(spec: OpSpec) -> bool:
    if not host_conv_ok(spec):
        return False
    g = conv_geometry(spec)
    return _is_1x1(g) and g["strides"] != (1, 1)


@implementation("Conv", "conv1x1_strided", heuristic_rank=40, applies=_conv1x1_strided_applies)
def build_conv1x1_strided(spec: OpSpec, consts: dict[int, np.ndarray]):
    """Strided 1x1 conv: subsample the input (one copy), then the 1x1 GEMM."""
    g = conv_geometry(spec)
    N, K, G, Cg, P, Q = g["N"], g["K"], g["group"], g["Cg"], g["P"], g["Q"]
    sh, sw = g["strides"]
    w = np.ascontiguousarray(np.asarray(consts[1], np.float32).reshape(G, K // G, Cg))
    finish = _finish(spec, bias_of(spec, consts))
    scratch = SCRATCH

    def run(x):
        xs = scratch.get("sub", (N, G * Cg, P, Q))
        np.copyto(xs, x[:, :, ::sh, ::sw])
        y = np.matmul(w if G > 1 else w[0], xs.reshape((N, G, Cg, P * Q) if G > 1 else (N, Cg, P * Q)))
        return finish(y.reshape(N, K, P, Q))

    return run


def _conv1x1_nhwc_applies(spec: OpSpec) -> bool:
    if not host_conv_ok(spec):
        return False
    g = conv_geometry(spec)
    return _is_1x1(g) and g["group"] == 1


@implementation("Conv", "conv1x1_nhwc", in_format="NHWC", out_format="NHWC", heuristic_rank=45,
                applies=_conv1x1_nhwc_applies)
def build_conv1x1_nhwc(spec: OpSpec, consts: dict[int, np.ndarray]):
    """1x1 conv in channels-last: X[NHW,C] @ W^T[C,K] (strided: subsample first), NHWC out."""
    g = conv_geometry(spec)
    N, C, K, P, Q = g["N"], g["C"], g["K"], g["P"], g["Q"]
    sh, sw = g["strides"]
    wt = np.ascontiguousarray(np.asarray(consts[1], np.float32).reshape(K, C).T)
    finish = _finish(spec, bias_of(spec, consts))
    strided = (sh, sw) != (1, 1)
    scratch = SCRATCH

    def run(x):  # x: [N, H, W, C]
        if strided:
            xs = scratch.get("sub", (N, P, Q, C))
            np.copyto(xs, x[:, ::sh, ::sw, :])
            x = xs
        y = np.dot(x.reshape(N * P * Q, C), wt)
        return finish(y.reshape(N, P, Q, K), channels_last=True)

    return run


# ------------------------------------------------------------------------------- depthwise

def _depthwise_applies(spec: OpSpec) -> bool:
    return host_conv_ok(spec) and is_depthwise(spec)


@implementation("Conv", "depthwise_taps", heuristic_rank=50, applies=_depthwise_applies,
                cost=estimates.direct(50, depthwise_traffic=7.0))  # time / traffic ~7 on depthwise
def build_depthwise(spec: OpSpec, consts: dict[int, np.ndarray]):
    """Depthwise conv (any channel multiplier): sum over the R*S taps of broadcast multiplies."""
    g = conv_geometry(spec)
    N, C, K, R, S, P, Q = g["N"], g["C"], g["K"], g["R"], g["S"], g["P"], g["Q"]
    sh, sw = g["strides"]
    dh, dw = g["dilations"]
    mult = K // C
    # w[c*mult + j, 0, r, s] -> taps[r, s][c, j, 1, 1]
    w = np.asarray(consts[1], np.float32).reshape(C, mult, R, S)
    taps = [[np.ascontiguousarray(w[:, :, r, s]).reshape(1, C, mult, 1, 1) for s in range(S)] for r in range(R)]
    finish = _finish(spec, bias_of(spec, consts))
    pads = g["pads"]
    scratch = SCRATCH

    def run(x):
        xp = padded(x, pads, scratch)
        y = np.empty((N, C, mult, P, Q), np.float32)
        tmp = scratch.get("tmp", y.shape)
        first = True
        for r in range(R):
            for s in range(S):
                h0, w0 = r * dh, s * dw
                xs = xp[:, :, None, h0:h0 + (P - 1) * sh + 1:sh, w0:w0 + (Q - 1) * sw + 1:sw]
                if first:
                    np.multiply(xs, taps[r][s], out=y)
                    first = False
                else:
                    np.multiply(xs, taps[r][s], out=tmp)
                    y += tmp
        return finish(y.reshape(N, K, P, Q))

    return run
