"""Timing harness: build every candidate of an op signature, check it, time it, cache the result.

For one :class:`OpSpec` all applicable implementations are built with the same random weights,
run and compared with onnxruntime's plain answer (a wrong or crashing candidate is recorded as
failed, with the reason, and never chosen), then timed round-robin - interleaved so that machine
noise hits all candidates alike - until their times are stable or the per-op time limit is
reached. Candidates more than ``DROP_FACTOR`` times slower than the best so far stop early: they
cannot win.

Isolation
---------
By default (``Profiler(isolate=True)``) candidates are built, checked and timed in a worker
process (:mod:`fastrun.measure.isolation`) that the profiler kills when one stretch of candidate code -
building it, or one call - takes longer than ``op_timeout`` seconds, and that dies alone when a
candidate segfaults or aborts. Such a candidate is recorded as failed (``"timed out after 10 s"``,
``"crashed with signal SIGSEGV"``, ``"out of memory ..."``) and the remaining candidates of the
signature are measured in a fresh worker. Every result is written to the timing cache the moment
the parent receives it, so a killed run resumes where it stopped. A worker may grow its address
space by at most ``memory_limit`` bytes (default :func:`fastrun.measure.isolation.default_memory_limit`:
8 GiB, at most half the machine's memory) beyond what it inherits: that bounds the extra memory
of profiling. ``isolate=False`` runs everything in this process: faster to start, but a crash or
hang of a candidate is this process's.

Numerical checks (what "correct" means)
---------------------------------------
Every candidate runs on four inputs, all seeded from the signature (so a restarted worker sees
the same data) and compared with onnxruntime's reference (the plain ONNX op, no fusion, no
layout tricks, optimizations disabled):

* ``random``: standard normal activations, He-scaled weights;
* ``zeros``: the first runtime input all zeros (exposes uninitialized memory, wrong padding);
* ``large``: the random input times 1e30 (float32/float64; overflow and scaling bugs);
* ``nonfinite``: the random input with two NaNs, one +Inf and one -Inf at seeded positions.

On the three finite inputs the output must have the reference's shape and dtype, NaN/Inf exactly
where the reference has them (infinities with the same sign), and elsewhere a relative error -
max absolute difference over the largest finite reference magnitude - within :func:`tolerance`:
``base(dtype) * max(1, sqrt(reduction / 64))`` with base 1e-4 for float32 (1e-12 float64, 1e-2
float16).

On the ``nonfinite`` input the policy is *propagate, never hide*: every output where the
reference is NaN or +-Inf must be non-finite in the candidate too (NaN and Inf are
interchangeable there: Inf - Inf inside a transform is NaN), and outputs finite in both must
match within the tolerance. A candidate may, however, turn outputs that the reference keeps
finite into NaN/Inf: fast algorithms legitimately spread a non-finite value across a whole
Winograd tile, or an FFT's whole plane, and an output computed from a NaN input is garbage
either way. What is never accepted is a candidate that silently turns the reference's NaN/Inf
into plausible finite numbers.

A candidate must also leave its inputs unmodified. The first check that fails is the reason
recorded, shown by ``fastrun profile`` ("rejected: ...") and kept in the plan's candidate table.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from fastrun.measure import isolation, timing
from fastrun.ops import formats, kernels, registry
from fastrun.store.cache import Caches
from fastrun.ops.registry import Implementation, OpSpec
from fastrun.ops import builtin  # noqa: F401  (registers the built-in implementations this module queries)
from fastrun.measure.checking import (CASE_WORDS, check_inputs, compare, compare_nonfinite, is_number, run_candidate, spec_seed,
                                      tolerance)

log = logging.getLogger(__name__)

MIN_ROUNDS = 5


MAX_ROUNDS = 200


# A candidate's time is timing.TIME_PERCENTILE (the lower quartile) of samples spanning at
# least MIN_SECONDS: noise comes in 0.1-0.5 s episodes, and the median of a short window could sit
# inside one. Measured: predicted/measured end to end on squeezenet went from 1.45 to 0.99,
# shufflenet 1.19 -> 0.96, zfnet512 0.78 -> 1.00.
MIN_SECONDS = 0.25


STABLE_SPREAD = 0.05


DROP_FACTOR = 4.0


EARLY_DROP_FACTOR = 16.0  # after one round: this much slower than the best cannot win


DEFAULT_OP_LIMIT = 2.0


DEFAULT_OP_TIMEOUT = isolation.DEFAULT_TIMEOUT


STATUSES = ("ok", "failed")


@dataclass
class Timing:
    """One candidate's result on one op signature (what the timing cache stores)."""

    impl: str
    status: str  # "ok" | "failed"
    time_ms: Optional[float] = None  # timing.typical_ms of the samples
    spread: float = 0.0  # interquartile range / median
    repeats: int = 0
    error: float = 0.0  # max |candidate - reference| / max |reference|
    reason: str = ""
    in_format: str = formats.NCHW
    out_format: str = formats.NCHW
    limit_s: Optional[float] = None  # the time limit a "timed out" failure ran into

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.time_ms is not None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Timing":
        """A Timing from cache data; ValueError when the data is not a plausible Timing.

        Cache values are foreign data: a time that is not a finite non-negative number, or a
        status that is not one of ours, must never reach the planner (it would pick a fake winner).
        """
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        if not isinstance(fields.get("impl"), str) or fields.get("status") not in STATUSES:
            raise ValueError("impl or status missing or invalid")
        for name in ("time_ms", "limit_s"):
            v = fields.get(name)
            if v is not None and (not is_number(v) or not math.isfinite(v) or v < 0):
                raise ValueError(f"{name} is {v!r}")
        if fields["status"] == "ok" and fields.get("time_ms") is None:
            raise ValueError("status ok without a time")
        for name in ("spread", "error"):
            if name in fields and not is_number(fields[name]):
                raise ValueError(f"{name} is {fields[name]!r}")
        if "repeats" in fields and (not isinstance(fields["repeats"], int) or isinstance(fields["repeats"], bool)):
            raise ValueError(f"repeats is {fields['repeats']!r}")
        for name in ("reason", "in_format", "out_format"):
            if name in fields and not isinstance(fields[name], str):
                raise ValueError(f"{name} is {fields[name]!r}")
        for name in ("in_format", "out_format"):
            if name in fields and not formats.is_valid(fields[name]):
                raise ValueError(f"{name} {fields[name]!r} is not a format")
        return cls(**fields)


_prepared: set[str] = set()


def prepare(impl: Implementation) -> None:
    """Run ``impl.prepare`` once per process (a failure is logged; the candidate then fails its check)."""
    if impl.prepare is None or impl.id in _prepared:
        return
    _prepared.add(impl.id)
    t0 = time.perf_counter()
    try:
        impl.prepare()
    except Exception as exc:
        log.warning("preparing %s failed: %s", impl.id, exc)
    else:
        log.debug("prepared %s in %.2f s", impl.id, time.perf_counter() - t0)


def measure_candidates(spec: OpSpec, impls: Sequence[Implementation], channel: isolation.Channel,
                       seed: int = 0, op_limit_s: float = DEFAULT_OP_LIMIT) -> None:
    """Build, check and time ``impls`` on ``spec``; send each one's :class:`Timing` as JSON.

    The job that :func:`fastrun.measure.isolation.run_isolated` runs in a worker (or
    :func:`~fastrun.measure.isolation.run_in_process` here). All candidate code runs inside
    ``channel.running(impl.id)``; everything else (random data, the reference) is seeded from
    the signature, so a restarted worker sees exactly the same data.
    """
    rng = np.random.default_rng(spec_seed(spec, seed))
    consts, args = kernels.random_inputs(spec, rng)
    for c in consts.values():  # shared by every candidate's builder: one that writes into them raises
        c.setflags(write=False)
    cases = check_inputs(spec, args, rng)
    reference = kernels.reference_callable(spec, consts)
    with np.errstate(all="ignore"):
        refs = {name: reference(*case) for name, case in cases.items()}
    del reference  # its session holds a copy of the weights: free it before building candidates
    tol = tolerance(spec)
    timings: dict[str, Timing] = {}
    runners: dict[str, Callable[[], object]] = {}
    for impl in impls:
        fin, fout = registry.resolve_format(impl.in_format), registry.resolve_format(impl.out_format)
        result = Timing(impl=impl.id, status="failed", in_format=fin, out_format=fout)
        runner = _check_candidate(impl, spec, consts, cases, refs, tol, result, channel)
        if runner is None:
            log.debug("candidate %s rejected on %s: %s", impl.id, spec.describe(), result.reason)
            channel.send(impl.id, result.to_json())
        else:
            timings[impl.id], runners[impl.id] = result, runner
    samples, broken = _time_round_robin(runners, channel, op_limit_s)
    for impl_id, why in broken.items():
        t = timings[impl_id]
        t.reason = f"{why} while being timed"[:300]
        channel.send(impl_id, t.to_json())
    for impl_id, times in samples.items():
        t = timings[impl_id]
        arr = np.array(times) * 1e3
        q1, med, q3 = np.percentile(arr, [25, 50, 75])
        t.status, t.time_ms, t.repeats = "ok", timing.typical_ms(times), len(arr)
        t.spread = float((q3 - q1) / med) if med > 0 else 0.0
        channel.send(impl_id, t.to_json())


def _check_candidate(impl: Implementation, spec: OpSpec, consts: dict, cases: dict, refs: dict, tol: float,
                     result: Timing, channel: isolation.Channel) -> Optional[Callable[[], object]]:
    """Build ``impl`` and check it on every case: its timed call, or None with ``result.reason`` set."""
    try:
        with channel.running(impl.id):
            fn = kernels.build_callable(impl, spec, dict(consts))
    except Exception as exc:  # a crashing candidate is a result, not an error
        result.reason = f"build {isolation.describe_exception(exc)}"[:300]
        return None
    for name, case in cases.items():
        fresh = [a.copy() for a in case]
        try:
            with channel.running(impl.id), np.errstate(all="ignore"):  # judged by the comparison, not warnings
                out = run_candidate(fn, impl, spec, fresh)
        except Exception as exc:
            result.reason = (isolation.describe_exception(exc) + ("" if name == "random" else f" on {CASE_WORDS[name]}"))[:300]
            return None
        if any(not np.array_equal(a, b, equal_nan=a.dtype.kind in "fc") for a, b in zip(fresh, case)):
            result.reason = f"modified its input in place (on {CASE_WORDS[name]})"
            return None
        err, why = compare_nonfinite(out, refs[name]) if name == "nonfinite" else compare(out, refs[name])
        if why or err > tol:
            result.error = err if not why else result.error
            detail = why or f"relative error {err:.2e} > tolerance {tol:.1e}"
            result.reason = f"wrong result on {CASE_WORDS[name]}: {detail}"[:300]
            return None
        result.error = max(result.error, err)
    call_args = [formats.to_format(a, f) for a, f in zip(cases["random"], impl.input_formats(spec))]
    return lambda: fn(*call_args)


def _time_round_robin(runners: dict[str, Callable[[], object]], channel: isolation.Channel,
                      op_limit_s: float) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Samples (seconds) of every runner that kept working, and why the others stopped."""
    samples: dict[str, list[float]] = {k: [] for k in runners}
    broken: dict[str, str] = {}
    start = time.perf_counter()
    with np.errstate(all="ignore"):
        for k, fn in runners.items():  # warm-up (first calls allocate, JIT, fill caches)
            try:
                with channel.running(k):
                    fn()
            except Exception as exc:
                broken[k] = isolation.describe_exception(exc)
        active = [k for k in runners if k not in broken]
        for rnd in range(MAX_ROUNDS):
            for k in list(active):
                channel.start(k)
                try:
                    # Each sample is the second of two back-to-back calls: the first re-warms caches
                    # and thread pools after the other candidates ran (measured: a first call after a
                    # numpy candidate took 0.72 ms, the steady state a node sees in a segment 0.39 ms).
                    runners[k]()
                    t0 = time.perf_counter()
                    runners[k]()
                except Exception as exc:
                    channel.stop()
                    broken[k] = isolation.describe_exception(exc)
                    active.remove(k)
                    continue
                samples[k].append(time.perf_counter() - t0)
                channel.stop()
            if not active:
                break
            elapsed = time.perf_counter() - start
            if rnd == 0 and len(active) > 1:
                best = min(samples[k][0] for k in active)
                active = [k for k in active if samples[k][0] <= EARLY_DROP_FACTOR * best]
            if rnd + 1 >= MIN_ROUNDS:
                best = min(float(np.median(samples[k])) for k in active)
                active = [k for k in active if float(np.median(samples[k])) <= DROP_FACTOR * best]
                if elapsed >= MIN_SECONDS and all(_stable(samples[k]) for k in active):
                    break
            if elapsed > op_limit_s and rnd + 1 >= 3:
                break
    return {k: v for k, v in samples.items() if k not in broken}, broken


@dataclass
class Stats:
    """What a profiling run did (counters are what tests check, never times)."""

    measured: int = 0        # (spec, impl) pairs timed now
    from_cache: int = 0      # (spec, impl) pairs whose timing came from the cache
    specs_measured: int = 0
    specs_cached: int = 0
    skipped_budget: int = 0  # specs left unprofiled because the budget ran out
    failed: list = field(default_factory=list)  # (spec description, impl, reason): measured now or cached
    unmeasured: list = field(default_factory=list)  # (spec description, why): the worker failed; nothing cached
    workers: int = 0         # worker processes started (isolated profiling)
    worker_peak_rss: int = 0  # largest resident set of a worker that finished (bytes)


class Profiler:
    """Measures candidates of op signatures, backed by the timing cache.

    ``isolate`` runs candidates in a killable worker process (see the module docstring) with
    ``op_timeout`` seconds per build or call and ``memory_limit`` extra bytes of address space;
    ``isolate=False`` runs them here (no time limit). ``op_limit_s`` is the timing budget of one
    signature, ``budget_s`` the whole run's (signatures after it take the heuristic choice).
    """

    def __init__(self, caches: Optional[Caches], fingerprint: str, budget_s: Optional[float] = None,
                 op_limit_s: float = DEFAULT_OP_LIMIT, seed: int = 0, isolate: bool = True,
                 op_timeout: Optional[float] = None, memory_limit: Optional[int] = None,
                 refresh: bool = False):
        self.caches = caches
        # refresh: ignore timings cached before this run (re-profile a machine whose earlier
        # measurements were disturbed); what this run measures is reused within it.
        self.refresh = refresh
        self._fresh: set[str] = set()
        self.fingerprint = fingerprint
        self.deadline = time.monotonic() + budget_s if budget_s else None
        self.op_limit_s = op_limit_s
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.isolate = isolate
        self.op_timeout = float(op_timeout) if op_timeout else DEFAULT_OP_TIMEOUT
        self.memory_limit = memory_limit
        self.stats = Stats()
        self._reported: set[str] = set()

    def budget_left(self) -> bool:
        return self.deadline is None or time.monotonic() < self.deadline

    def _key(self, spec: OpSpec, impl_id: str) -> str:
        return Caches.timing_key(self.fingerprint, spec.key(), impl_id)

    def cached(self, spec: OpSpec, impls: Sequence[Implementation]) -> dict[str, Timing]:
        """Usable cached timings of ``impls``. Corrupt or foreign entries are reported once and
        measured again; a timeout recorded under a shorter ``op_timeout`` than now is retried."""
        found = {}
        if self.caches is None:
            return found
        for impl in impls:
            key = self._key(spec, impl.id)
            if self.refresh and key not in self._fresh:
                continue
            value = self.caches.timings.get(key)
            if value is None:
                continue
            try:
                t = Timing.from_json(value)
                if t.impl != impl.id:
                    raise ValueError(f"it holds the timing of {t.impl}")
            except (TypeError, ValueError) as exc:
                if key not in self._reported:
                    self._reported.add(key)
                    log.warning("ignoring a corrupt timing cache entry %s (%s); measuring again", key, exc)
                continue
            if t.limit_s is not None and self.isolate and self.op_timeout > t.limit_s:
                continue
            found[impl.id] = t
        return found

    def profile(self, spec: OpSpec, impls: Optional[Sequence[Implementation]] = None) -> dict[str, Timing]:
        """Timings of every candidate of ``spec``: cached ones reused, missing ones measured."""
        impls = list(impls if impls is not None else registry.candidates(spec))
        timings = self.cached(spec, impls)
        self.stats.from_cache += len(timings)
        self.stats.failed.extend((spec.describe(), k, t.reason) for k, t in timings.items() if not t.ok)
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
        self.stats.failed.extend((spec.describe(), k, t.reason) for k, t in measured.items() if not t.ok)
        timings.update(measured)
        return timings

    def _persist(self, spec: OpSpec, t: Timing) -> None:
        if self.caches is not None:
            self.caches.timings.set(self._key(spec, t.impl), t.to_json())
            self._fresh.add(self._key(spec, t.impl))

    def _measure(self, spec: OpSpec, impls: Sequence[Implementation]) -> dict[str, Timing]:
        """Measure ``impls`` on ``spec``; each result is persisted the moment it is known."""
        for impl in impls:
            prepare(impl)
        by_id = {impl.id: impl for impl in impls}
        results: dict[str, Timing] = {}

        def on_result(key: str, value: dict) -> None:
            try:
                t = Timing.from_json(value)
            except (TypeError, ValueError) as exc:
                t = Timing(impl=key, status="failed", reason=f"the worker sent an invalid result ({exc})")
            results[key] = t
            self._persist(spec, t)

        def on_failure(key: str, reason: str) -> None:
            impl = by_id[key]
            t = Timing(impl=key, status="failed", reason=reason, in_format=registry.resolve_format(impl.in_format),
                       out_format=registry.resolve_format(impl.out_format),
                       limit_s=self.op_timeout if reason.startswith("timed out") else None)
            results[key] = t
            self._persist(spec, t)
            log.warning("candidate %s on %s %s %s", key, spec.op_type, spec.describe(), reason)

        def job(keys: Sequence[str], channel: isolation.Channel) -> None:
            measure_candidates(spec, [by_id[k] for k in keys], channel, seed=self.seed, op_limit_s=self.op_limit_s)

        if self.isolate:
            try:
                outcome = isolation.run_isolated(job, list(by_id), timeout=self.op_timeout,
                                                 memory_limit=self.memory_limit, on_result=on_result,
                                                 on_failure=on_failure)
            except isolation.WorkerStartError as exc:
                log.warning("%s; profiling in this process, without isolation", exc)
                self.isolate = False
                return self._measure(spec, impls)
            self.stats.workers += outcome.workers
            self.stats.worker_peak_rss = max(self.stats.worker_peak_rss, outcome.peak_rss)
        else:
            outcome = isolation.run_in_process(job, list(by_id), on_result=on_result)
        if outcome.error:
            log.warning("could not profile %s %s: %s; its unmeasured candidates are not cached",
                        spec.op_type, spec.describe(), outcome.error)
            self.stats.unmeasured.append((spec.describe(), outcome.error))
            for key in by_id:
                results.setdefault(key, Timing(impl=key, status="failed", reason=f"not measured: {outcome.error}"))
        return results


def _stable(times: list[float]) -> bool:
    arr = np.array(times[-MIN_ROUNDS * 2:])
    q1, med, q3 = np.percentile(arr, [25, 50, 75])
    return med > 0 and (q3 - q1) / med < STABLE_SPREAD * 4 and len(times) >= MIN_ROUNDS


def time_callable(fn: Callable[[], object], limit_s: float = 0.5, min_rounds: int = MIN_ROUNDS) -> float:
    """Milliseconds of ``fn()`` as candidates are timed (one warm-up call, then samples over
    ``MIN_SECONDS`` or ``limit_s``, whichever is shorter; :func:`timing.typical_ms` of them)."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_rounds or (time.perf_counter() - start < min(limit_s, MIN_SECONDS) and len(times) < MAX_ROUNDS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > limit_s and len(times) >= 3:
            break
    return timing.typical_ms(times)
