"""Timing harness: build every candidate of an op signature, check it, time it, cache the result.

For one :class:`OpSpec` all applicable implementations are built with the same random weights,
run once and compared with onnxruntime's plain answer (a wrong or crashing candidate is recorded
as failed and never chosen), then timed round-robin - interleaved so that machine noise hits all
candidates alike - until the medians are stable or the per-op time limit is reached. Candidates
more than ``DROP_FACTOR`` times slower than the best so far stop early: they cannot win.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from . import formats, kernels, registry
from .cache import Caches
from .registry import Implementation, OpSpec

log = logging.getLogger(__name__)

MIN_ROUNDS = 5
MAX_ROUNDS = 200
MIN_SECONDS = 0.05
STABLE_SPREAD = 0.05
DROP_FACTOR = 4.0
DEFAULT_OP_LIMIT = 2.0


@dataclass
class Timing:
    """One candidate's result on one op signature (what the timing cache stores)."""

    impl: str
    status: str  # "ok" | "failed"
    median_ms: Optional[float] = None
    spread: float = 0.0  # interquartile range / median
    repeats: int = 0
    error: float = 0.0  # max |candidate - reference| / max |reference|
    reason: str = ""
    in_format: str = formats.NCHW
    out_format: str = formats.NCHW

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.median_ms is not None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Timing":
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**fields)


def tolerance(spec: OpSpec) -> float:
    """Relative error allowed for fp32: grows with the reduction length (sqrt of it)."""
    if spec.op_type == "Conv" and len(spec.inputs) > 1:
        w = spec.inputs[1]
        reduction = int(np.prod(w[1:]))
    elif spec.op_type in ("MatMul", "Gemm"):
        a = spec.inputs[0]
        reduction = a[0] if spec.op_type == "Gemm" and spec.attr("transA") else a[-1]
    else:
        reduction = 1
    base = 1e-4 if spec.dtype == "float32" else 1e-2
    return base * max(1.0, math.sqrt(reduction / 64))


def compare(out: np.ndarray, ref: np.ndarray) -> tuple[float, str]:
    """Relative max error and a reason if the candidate's output is unacceptable in kind."""
    if out is None or not isinstance(out, np.ndarray):
        return math.inf, f"returned {type(out).__name__}, not an array"
    if out.shape != ref.shape:
        return math.inf, f"output shape {out.shape} != reference {ref.shape}"
    if out.dtype != ref.dtype:
        return math.inf, f"output dtype {out.dtype} != reference {ref.dtype}"
    ref_nan, out_nan = np.isnan(ref), np.isnan(out)
    if not np.array_equal(ref_nan, out_nan):
        return math.inf, "NaNs differ from the reference"
    finite = ~ref_nan
    if not np.array_equal(np.isinf(ref[finite]), np.isinf(out[finite])):
        return math.inf, "infinities differ from the reference"
    ok = finite & ~np.isinf(ref)
    scale = float(np.max(np.abs(ref[ok]))) if ok.any() else 0.0
    err = float(np.max(np.abs(out[ok] - ref[ok]))) if ok.any() else 0.0
    return err / max(scale, 1e-30), ""


@dataclass
class Stats:
    """What a profiling run did (counters are what tests check, never times)."""

    measured: int = 0        # (spec, impl) pairs timed now
    from_cache: int = 0      # (spec, impl) pairs whose timing came from the cache
    specs_measured: int = 0
    specs_cached: int = 0
    skipped_budget: int = 0  # specs left unprofiled because the budget ran out
    failed: list = field(default_factory=list)  # (spec description, impl, reason)


class Profiler:
    """Measures candidates of op signatures, backed by the timing cache."""

    def __init__(self, caches: Optional[Caches], fingerprint: str, budget_s: Optional[float] = None,
                 op_limit_s: float = DEFAULT_OP_LIMIT, seed: int = 0):
        self.caches = caches
        self.fingerprint = fingerprint
        self.deadline = time.monotonic() + budget_s if budget_s else None
        self.op_limit_s = op_limit_s
        self.rng = np.random.default_rng(seed)
        self.stats = Stats()

    def budget_left(self) -> bool:
        return self.deadline is None or time.monotonic() < self.deadline

    def cached(self, spec: OpSpec, impls: Sequence[Implementation]) -> dict[str, Timing]:
        found = {}
        if self.caches is None:
            return found
        skey = spec.key()
        for impl in impls:
            value = self.caches.timings.get(Caches.timing_key(self.fingerprint, skey, impl.id))
            if value is not None:
                try:
                    found[impl.id] = Timing.from_json(value)
                except TypeError:
                    continue
        return found

    def profile(self, spec: OpSpec, impls: Optional[Sequence[Implementation]] = None) -> dict[str, Timing]:
        """Timings of every candidate of ``spec``: cached ones reused, missing ones measured."""
        impls = list(impls if impls is not None else registry.candidates(spec))
        timings = self.cached(spec, impls)
        self.stats.from_cache += len(timings)
        todo = [impl for impl in impls if impl.id not in timings]
        if not todo:
            self.stats.specs_cached += 1
            return timings
        if not self.budget_left():
            self.stats.skipped_budget += 1
            return timings
        measured = self._measure(spec, todo)
        self.stats.specs_measured += 1
        self.stats.measured += len(measured)
        for impl_id, t in measured.items():
            if not t.ok:
                self.stats.failed.append((spec.describe(), impl_id, t.reason))
            if self.caches is not None:
                self.caches.timings.set(Caches.timing_key(self.fingerprint, spec.key(), impl_id), t.to_json())
        timings.update(measured)
        return timings

    def _measure(self, spec: OpSpec, impls: Sequence[Implementation]) -> dict[str, Timing]:
        consts, args = kernels.random_inputs(spec, self.rng)
        ref = kernels.reference_callable(spec, consts)(*args)
        tol = tolerance(spec)
        results: dict[str, Timing] = {}
        runners: dict[str, Callable[[], np.ndarray]] = {}
        for impl in impls:
            fin, fout = registry.resolve_format(impl.in_format), registry.resolve_format(impl.out_format)
            timing = Timing(impl=impl.id, status="failed", in_format=fin, out_format=fout)
            results[impl.id] = timing
            try:
                fn = kernels.build_callable(impl, spec, consts)
                call_args = [formats.to_format(a, f) for a, f in zip(args, impl.input_formats(spec))]
                out = fn(*call_args)
                if fout != formats.NCHW and isinstance(out, np.ndarray):
                    out = formats.from_format(out, fout, spec.output[1])
            except Exception as exc:  # a crashing candidate is a result, not an error
                timing.reason = f"raised {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
                log.debug("candidate %s failed on %s: %s", impl.id, spec.describe(), timing.reason)
                continue
            err, why = compare(out, ref)
            timing.error = err
            if why or err > tol:
                timing.reason = why or f"wrong result: relative error {err:.2e} > tolerance {tol:.1e}"
                log.debug("candidate %s rejected on %s: %s", impl.id, spec.describe(), timing.reason)
                continue
            runners[impl.id] = (lambda fn=fn, a=call_args: fn(*a))
        samples = self._time_round_robin(runners)
        for impl_id, times in samples.items():
            t = results[impl_id]
            arr = np.array(times) * 1e3
            q1, med, q3 = np.percentile(arr, [25, 50, 75])
            t.status, t.median_ms, t.repeats = "ok", float(med), len(arr)
            t.spread = float((q3 - q1) / med) if med > 0 else 0.0
        return results

    def _time_round_robin(self, runners: dict[str, Callable[[], np.ndarray]]) -> dict[str, list[float]]:
        samples: dict[str, list[float]] = {k: [] for k in runners}
        active = list(runners)
        start = time.perf_counter()
        for fn in runners.values():  # warm-up (first calls allocate, JIT, fill caches)
            fn()
        for rnd in range(MAX_ROUNDS):
            for k in active:
                t0 = time.perf_counter()
                runners[k]()
                samples[k].append(time.perf_counter() - t0)
            elapsed = time.perf_counter() - start
            if rnd + 1 >= MIN_ROUNDS:
                best = min(float(np.median(samples[k])) for k in active)
                active = [k for k in active if float(np.median(samples[k])) <= DROP_FACTOR * best]
                if elapsed >= MIN_SECONDS and all(_stable(samples[k]) for k in active):
                    break
            if elapsed > self.op_limit_s and rnd + 1 >= 3:
                break
        return samples


def _stable(times: list[float]) -> bool:
    arr = np.array(times[-MIN_ROUNDS * 2:])
    q1, med, q3 = np.percentile(arr, [25, 50, 75])
    return med > 0 and (q3 - q1) / med < STABLE_SPREAD * 4 and len(times) >= MIN_ROUNDS


def time_callable(fn: Callable[[], object], limit_s: float = 0.5, min_rounds: int = MIN_ROUNDS) -> float:
    """Median milliseconds of ``fn()`` (one warm-up call, then repeats until ``limit_s``)."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_rounds or (time.perf_counter() - start < min(limit_s, MIN_SECONDS * 2) and len(times) < MAX_ROUNDS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > limit_s and len(times) >= 3:
            break
    return float(np.median(times)) * 1e3


# ------------------------------------------------------------------ light ops and reorders

def light_key(node, graph, fmt: str) -> str:
    """Signature of a light (non-selected) node: op, attributes, shapes, small constants, opset."""
    import hashlib
    import json

    consts = {}
    for i, t in enumerate(node.inputs):
        if t in graph.constants:
            consts[i] = hashlib.sha256(np.ascontiguousarray(graph.constants[t]).tobytes()).hexdigest()[:16]
    shapes = [(list(graph.tensors[t].shape), graph.tensors[t].dtype) if t in graph.tensors else None for t in node.inputs]
    text = json.dumps({"op": node.op_type, "domain": node.domain, "attrs": repr(sorted(node.attrs.items())),
                       "inputs": shapes, "consts": consts, "opset": graph.opsets.get("", 0), "fmt": fmt,
                       "out": [list(graph.tensors[t].shape) for t in node.outputs if t in graph.tensors]},
                      sort_keys=True)
    return "light:" + hashlib.sha256(text.encode()).hexdigest()[:32]


class AuxiliaryTimer:
    """Times light nodes and reorders (the rest of the cost model), cached like operators."""

    def __init__(self, profiler: Profiler):
        self.p = profiler

    def _cached_or(self, key: str, measure: Callable[[], float]) -> Optional[float]:
        caches = self.p.caches
        full = Caches.timing_key(self.p.fingerprint, key, "ms")
        if caches is not None:
            hit = caches.timings.get(full)
            if hit is not None and "ms" in hit:
                return hit["ms"]
        if not self.p.budget_left():
            return None
        try:
            ms = measure()
        except Exception as exc:
            log.debug("could not time %s: %s", key, exc)
            ms = None
        if caches is not None and ms is not None:
            caches.timings.set(full, {"ms": ms})
        return ms

    def dispatch(self) -> float:
        """Fixed cost of one onnxruntime ``run`` call (feeds, fetches, thread wake-up).

        Standalone one-node timings include it, yet nodes merged into a segment do not pay it
        per node, while every host kernel splits a segment and pays it once more: the planner
        corrects candidate costs by this amount.
        """
        return self._cached_or("dispatch", self._time_dispatch) or 0.0

    def _time_dispatch(self) -> float:
        from onnx import helper

        from . import ortutil

        model = ortutil.make_model([helper.make_node("Identity", ["x"], ["y"])], [ortutil.value_info("x", [1, 16])],
                                   [ortutil.value_info("y", [1, 16])])
        sess = ortutil.session(model, level="extended")
        feed = {"x": np.zeros((1, 16), np.float32)}
        return time_callable(lambda: sess.run(None, feed), limit_s=0.2, min_rounds=50)

    def light(self, node, graph, fmt: str) -> Optional[float]:
        return self._cached_or(light_key(node, graph, fmt), lambda: self._time_light(node, graph, fmt))

    def reorder(self, shape: Sequence[int], src: str, dst: str, dtype: str = "float32") -> Optional[float]:
        key = f"reorder:{'x'.join(map(str, shape))}:{dtype}:{src}>{dst}"
        return self._cached_or(key, lambda: self._time_reorder(tuple(shape), src, dst, dtype))

    def _time_light(self, node, graph, fmt: str) -> float:
        from . import ortutil
        from .graph import to_proto

        runtime = [t for t in dict.fromkeys(node.inputs) if t and t not in graph.constants]
        if fmt == formats.NCHW:
            frag_nodes, inits = [to_proto(node)], {}
        else:
            from . import layout_ops

            frag = layout_ops.emit_light(node, graph, fmt)
            frag_nodes, inits = frag.nodes, dict(frag.initializers)
        inits.update({t: graph.constants[t] for t in node.inputs if t in graph.constants})
        feed, vis = {}, []
        for t in runtime:
            info = graph.tensors[t]
            shape = formats.physical_shape(info.shape, fmt) if fmt != formats.NCHW else info.shape
            arr = self.p.rng.standard_normal(shape).astype(info.dtype) if info.dtype.startswith("float") \
                else np.zeros(shape, dtype=info.dtype)
            feed[t] = arr
            vis.append(ortutil.value_info(t, shape, info.dtype))
        from onnx import helper

        outs = [helper.make_empty_tensor_value_info(t) for t in node.outputs if t]
        model = ortutil.make_model(frag_nodes, vis, outs, inits, graph.opsets)
        sess = ortutil.session(model, level="extended")
        return time_callable(lambda: sess.run(None, feed), limit_s=0.2)

    def _time_reorder(self, shape: tuple[int, ...], src: str, dst: str, dtype: str) -> float:
        from . import layout_ops

        fn = layout_ops.reorder_callable(src, dst, shape)
        x = formats.to_format(self.p.rng.standard_normal(shape).astype(dtype), src)
        return time_callable(lambda: fn(x), limit_s=0.2)
