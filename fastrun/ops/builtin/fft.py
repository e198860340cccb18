"""FFT convolution (numpy.fft, float32/complex64) for large kernels.

The padded input's real 2-D FFT, multiplied per frequency with the conjugated filter spectra
(a batched complex matmul [F, K, C] @ [F, C, N]), inverse-transformed and cropped. The filter
spectra are computed once at build time for this input size. Circular correlation of an
Hp x Wp transform does not wrap inside the valid P x Q window, so no extra padding is needed
beyond rounding the transform size up to a 2-3-5-smooth length.
"""
from __future__ import annotations

import numpy as np

from fastrun.ops.registry import OpSpec, implementation
from fastrun.ops.builtin.common import activation, conv_geometry
from fastrun.ops.builtin.conv_host import bias_of, host_conv_ok, pad_input

# Filter spectra larger than this are not worth (or able) to keep resident.
MAX_SPECTRUM_BYTES = 256 << 20


def good_size(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n (fast pocketfft length)."""
    best = 1 << max(0, (n - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            v = p35
            while v < n:
                v *= 2
            best = min(best, v)
            p35 *= 3
        p5 *= 5
    return best


def _sizes(g: dict) -> tuple[int, int]:
    t, l, b, r = g["pads"]
    return good_size(g["H"] + t + b), good_size(g["W"] + l + r)


def fft_applies(spec: OpSpec) -> bool:
    if not host_conv_ok(spec):
        return False
    g = conv_geometry(spec)
    if not (g["group"] == 1 and g["strides"] == (1, 1) and g["dilations"] == (1, 1) and g["R"] * g["S"] >= 25):
        return False
    fh, fw = _sizes(g)
    return g["K"] * g["C"] * fh * (fw // 2 + 1) * 8 <= MAX_SPECTRUM_BYTES


@implementation("Conv", "fft_conv", exact=False, heuristic_rank=70, applies=fft_applies)
def build_fft_conv(spec: OpSpec, consts: dict[int, np.ndarray]):
    """rfft2 convolution with the filter spectra precomputed for this input size (kernels >= 5x5)."""
    g = conv_geometry(spec)
    N, C, K, P, Q = g["N"], g["C"], g["K"], g["P"], g["Q"]
    fh, fw = _sizes(g)
    H, W = g["H"], g["W"]
    t, l, b, r = g["pads"]
    F = fh * (fw // 2 + 1)
    w = np.asarray(consts[1], np.float64)
    wf = np.conj(np.fft.rfft2(w, s=(fh, fw)))  # correlation = product with the conjugate
    wf = np.ascontiguousarray(wf.reshape(K, C, F).transpose(2, 0, 1).astype(np.complex64))  # [F, K, C]
    bias = bias_of(spec, consts)
    act = activation(spec)
    extra_h, extra_w = fh - (H + t + b), fw - (W + l + r)

    def run(x):
        xp = pad_input(x, (t, l, b, r), extra_h, extra_w)
        xf = np.fft.rfft2(xp)  # [N, C, fh, fw//2+1] complex64
        xf = np.ascontiguousarray(xf.reshape(N, C, F).transpose(2, 1, 0))  # [F, C, N]
        yf = np.matmul(wf, xf)  # [F, K, N]
        yf = yf.transpose(2, 1, 0).reshape(N, K, fh, fw // 2 + 1)
        y = np.fft.irfft2(yf, s=(fh, fw))
        y = np.ascontiguousarray(y[:, :, :P, :Q], dtype=np.float32)
        if bias is not None:
            y += bias[:, None, None]
        return act(y)

    return run
