"""Checking a candidate against the reference: test inputs, tolerances, output comparison.

Every candidate runs on random inputs and on the special ones (all zeros, large magnitudes,
non-finite values) and must match onnxruntime's plain semantics within :func:`tolerance`.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Sequence

import numpy as np

from fastrun.ops import formats, registry
from fastrun.ops.registry import Implementation, OpSpec

log = logging.getLogger(__name__)

TOLERANCE_BASE = {"float64": 1e-12, "float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}


LARGE_MAGNITUDE = 1e30


SPECIAL_INPUTS = ("zeros", "large", "nonfinite")


CASE_WORDS = {"random": "random input", "zeros": "all-zero input", "large": "large-magnitude (1e30) input",
              "nonfinite": "input with NaN/Inf"}


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def tolerance(spec: OpSpec) -> float:
    """Relative error allowed: a base per dtype, growing with the reduction length (sqrt of it)."""
    if spec.op_type == "Conv" and len(spec.inputs) > 1:
        w = spec.inputs[1]
        reduction = int(np.prod(w[1:]))
    elif spec.op_type in ("MatMul", "Gemm"):
        a = spec.inputs[0]
        reduction = a[0] if spec.op_type == "Gemm" and spec.attr("transA") else a[-1]
    else:
        reduction = 1
    base = TOLERANCE_BASE.get(spec.dtype, 1e-2)
    return base * max(1.0, math.sqrt(reduction / 64))


def _kind_problem(out, ref: np.ndarray) -> str:
    if out is None or not isinstance(out, np.ndarray):
        return f"returned {type(out).__name__}, not an array"
    if out.shape != ref.shape:
        return f"output shape {out.shape} != reference {ref.shape}"
    if out.dtype != ref.dtype:
        return f"output dtype {out.dtype} != reference {ref.dtype}"
    return ""


def compare(out: np.ndarray, ref: np.ndarray) -> tuple[float, str]:
    """Relative max error and a reason if the candidate's output is unacceptable in kind.

    For finite inputs: NaN and Inf (with its sign) exactly where the reference has them.
    """
    problem = _kind_problem(out, ref)
    if problem:
        return math.inf, problem
    ref_nan, out_nan = np.isnan(ref), np.isnan(out)
    if not np.array_equal(ref_nan, out_nan):
        return math.inf, "NaNs differ from the reference"
    ref_inf = np.isinf(ref)
    if not np.array_equal(ref_inf, np.isinf(out)):
        return math.inf, "infinities differ from the reference"
    if not np.array_equal(np.signbit(ref[ref_inf]), np.signbit(out[ref_inf])):
        return math.inf, "infinities differ in sign from the reference"
    return _relative_error(out, ref, ~ref_nan & ~ref_inf), ""


def compare_nonfinite(out: np.ndarray, ref: np.ndarray) -> tuple[float, str]:
    """:func:`compare` for inputs holding NaN/Inf: propagate, never hide (see the module docstring)."""
    problem = _kind_problem(out, ref)
    if problem:
        return math.inf, problem
    ref_finite, out_finite = np.isfinite(ref), np.isfinite(out)
    hidden = int(np.count_nonzero(~ref_finite & out_finite))
    if hidden:
        return math.inf, f"hides NaN/Inf: {hidden} outputs are finite where the reference's are not"
    return _relative_error(out, ref, ref_finite & out_finite), ""


def _relative_error(out: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    if not mask.any():
        return 0.0
    r = ref[mask].astype(np.float64)
    scale = float(np.max(np.abs(r)))
    err = float(np.max(np.abs(out[mask].astype(np.float64) - r)))
    return err / max(scale, 1e-30)


def spec_seed(spec: OpSpec, seed: int = 0) -> list[int]:
    """Seed of a signature's random data: the same in every process and on every run."""
    return [seed, int(spec.key()[:15], 16)]


def check_inputs(spec: OpSpec, args: Sequence[np.ndarray], rng: np.random.Generator) -> dict[str, list[np.ndarray]]:
    """The runtime inputs each candidate is checked on (logical NCHW): random plus the special ones."""
    cases = {"random": list(args)}
    if not args:
        return cases
    first = args[0]
    cases["zeros"] = [np.zeros_like(first)] + list(args[1:])
    if first.dtype.kind == "f":
        big = LARGE_MAGNITUDE if first.dtype.itemsize >= 4 else float(np.finfo(first.dtype).max) ** 0.25
        cases["large"] = [(first.astype(np.float64) * big).astype(first.dtype)] + list(args[1:])
        bad = first.copy()
        flat = bad.reshape(-1)
        positions = rng.choice(flat.size, size=min(4, flat.size), replace=False)
        for pos, value in zip(positions, (np.nan, np.inf, -np.inf, np.nan)):
            flat[pos] = value
        cases["nonfinite"] = [bad] + list(args[1:])
    return cases


def run_candidate(fn: Callable[..., np.ndarray], impl: Implementation, spec: OpSpec,
                  args: Sequence[np.ndarray]) -> np.ndarray:
    """Call a built candidate on logical-NCHW inputs; its output back in logical NCHW."""
    call_args = [formats.to_format(a, f) for a, f in zip(args, impl.input_formats(spec))]
    out = fn(*call_args)
    fout = registry.resolve_format(impl.out_format)
    if fout != formats.NCHW and isinstance(out, np.ndarray):
        out = formats.from_format(out, fout, spec.output[1])
    return out
