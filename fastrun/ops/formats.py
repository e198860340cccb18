"""Tensor memory formats and the reorders between them.

A format only describes how a logical NCHW activation is laid out in memory:

* ``NCHW``   - the logical layout; for tensors that are not 4-D it simply means "plain".
* ``NHWC``   - channels last.
* ``NCHWc<b>`` - onnxruntime's blocked layout ``[N, ceil(C/b), H, W, b]`` with the channel
  dimension zero-padded to a multiple of ``b`` (the CPU's SIMD width in floats: 8 with AVX2,
  16 with AVX-512).

Formats are plain strings so that plans stay JSON.
"""
from __future__ import annotations

import functools
import re
from typing import Sequence

import numpy as np
from fastrun.system.fingerprint import cpu_flags
from fastrun.shapes import as_shape

NCHW = "NCHW"
NHWC = "NHWC"

_BLOCKED = re.compile(r"^NCHWc(\d+)$")


def blocked(block: int) -> str:
    return f"NCHWc{block}"


def block_size(fmt: str) -> int:
    """The channel block of a blocked format, 0 for unblocked ones."""
    m = _BLOCKED.match(fmt)
    return int(m.group(1)) if m else 0


def is_valid(fmt: str) -> bool:
    return fmt in (NCHW, NHWC) or block_size(fmt) > 0


@functools.lru_cache(maxsize=1)
def native_block_size() -> int:
    """The NCHWc block onnxruntime's MLAS uses on this CPU (0: no blocked kernels)."""
    flags = cpu_flags()
    if "avx512f" in flags:
        return 16
    if "avx2" in flags or "avx" in flags:
        return 8
    if "sse4_1" in flags or "sse2" in flags:
        return 4
    return 0


def machine_formats() -> list[str]:
    """Formats worth considering on this machine."""
    b = native_block_size()
    return [NCHW, NHWC] + ([blocked(b)] if b else [])


def physical_shape(shape: Sequence[int], fmt: str) -> tuple[int, ...]:
    """Shape of the array that holds a logical NCHW tensor of ``shape`` in ``fmt``."""
    shape = as_shape(shape)
    if fmt == NCHW:
        return shape
    if len(shape) != 4:
        raise ValueError(f"format {fmt} needs a 4-D tensor, got shape {shape}")
    n, c, h, w = shape
    if fmt == NHWC:
        return (n, h, w, c)
    b = block_size(fmt)
    if b:
        return (n, -(-c // b), h, w, b)
    raise ValueError(f"unknown format {fmt!r}")


def applicable(shape: Sequence[int], fmt: str) -> bool:
    """Whether a tensor of this logical shape can be held in ``fmt``."""
    return fmt == NCHW or len(shape) == 4


def to_format(x: np.ndarray, fmt: str) -> np.ndarray:
    """Logical NCHW array -> contiguous array in ``fmt``."""
    if fmt == NCHW:
        return np.ascontiguousarray(x)
    if fmt == NHWC:
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    b = block_size(fmt)
    if not b:
        raise ValueError(f"unknown format {fmt!r}")
    n, c, h, w = x.shape
    cb = -(-c // b)
    if cb * b != c:
        padded = np.zeros((n, cb * b, h, w), dtype=x.dtype)
        padded[:, :c] = x
        x = padded
    return np.ascontiguousarray(x.reshape(n, cb, b, h, w).transpose(0, 1, 3, 4, 2))


def from_format(x: np.ndarray, fmt: str, channels: int) -> np.ndarray:
    """Array in ``fmt`` -> contiguous logical NCHW array with ``channels`` channels."""
    if fmt == NCHW:
        return np.ascontiguousarray(x)
    if fmt == NHWC:
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    b = block_size(fmt)
    if not b:
        raise ValueError(f"unknown format {fmt!r}")
    n, cb, h, w, _ = x.shape
    out = x.transpose(0, 1, 4, 2, 3).reshape(n, cb * b, h, w)
    return np.ascontiguousarray(out[:, :channels])


def reorder(x: np.ndarray, src: str, dst: str, channels: int) -> np.ndarray:
    """Convert between any two formats (through NCHW when neither is NCHW)."""
    if src == dst:
        return x
    return to_format(from_format(x, src, channels), dst)
