"""The precision policy: which numerics a plan may use, and how far its outputs may move.

fp32 is the default and keeps onnxruntime's numerics. A reduced precision (bf16, fp16) is
allowed only when the user asks for it with an error budget (``tolerance``: the largest max abs
error relative to max |reference| on the plan's check inputs), and only on a CPU that computes
in it natively: emulated bf16 or fp16 is slower than fp32, so offering it would only lose.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

from fastrun.errors import FastrunError

FP32 = "fp32"
PRECISIONS = (FP32, "bf16", "fp16")
DEFAULT_TOLERANCE = 1e-2  # the budget of a reduced precision when the user names none

ALIASES = {"f32": FP32, "float32": FP32, "bfloat16": "bf16", "f16": "fp16", "float16": "fp16"}

# CPU flags (as /proc/cpuinfo names them) that compute each reduced precision in hardware.
NATIVE_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}


class PrecisionError(FastrunError, ValueError):
    """A precision that is unknown, or that this CPU does not compute natively."""


@dataclass(frozen=True)
class PrecisionPolicy:
    """What a plan may compute in: ``precision`` and, below fp32, the error budget it must keep."""

    precision: str = FP32
    tolerance: Optional[float] = None  # None at fp32: the race's own bound applies

    @property
    def reduced(self) -> bool:
        return self.precision != FP32

    def key_suffix(self) -> str:
        """What plan keys carry so that a reduced-precision plan never serves an fp32 session."""
        return "" if not self.reduced else f"@{self.precision}"


def native(flags: Iterable[str]) -> tuple[str, ...]:
    """The precisions this CPU computes natively, fp32 first."""
    present = set(flags)
    return (FP32,) + tuple(p for p, needed in NATIVE_FLAGS.items() if present.intersection(needed))


def policy(precision: Optional[str] = None, tolerance: Optional[float] = None,
           flags: Optional[Iterable[str]] = None) -> PrecisionPolicy:
    """The policy for a user's ``precision`` and ``tolerance``, refused with a clear message when
    the precision is unknown or not native to this CPU (``flags``: the CPU's, by default)."""
    name = ALIASES.get((precision or FP32).lower(), (precision or FP32).lower())
    if name not in PRECISIONS:
        raise PrecisionError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if tolerance is not None and not tolerance > 0:
        raise PrecisionError(f"the tolerance must be a positive number, not {tolerance!r}")
    if name == FP32:
        return PrecisionPolicy(FP32, tolerance)
    if flags is None:
        from fastrun.system.fingerprint import cpu_flags
        flags = cpu_flags()
    if name not in native(flags):
        raise PrecisionError(f"this CPU has no native {name} ({' or '.join(NATIVE_FLAGS[name])} missing): "
                             f"{name} would be emulated and slower than fp32; use --precision fp32")
    return PrecisionPolicy(name, DEFAULT_TOLERANCE if tolerance is None else float(tolerance))
