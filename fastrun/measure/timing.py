"""Side-by-side timing: interleaved repeats, the only comparison a noisy machine allows."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

# Which percentile of the samples is "the time", here and in the profiler. Noise on a shared VM
# comes in episodes that only ever slow things down (for 0.1-0.5 s, ~15% of the time, a core is
# taken and everything runs ~1.6x slower): the lower quartile of samples spread over time is the
# undisturbed machine, and predictions (sums of profiled times) and end-to-end measurements are
# compared on the same statistic.
TIME_PERCENTILE = 25


def typical_ms(samples_s) -> float:
    """The :data:`TIME_PERCENTILE` of samples in seconds, in milliseconds."""
    return float(np.percentile(samples_s, TIME_PERCENTILE)) * 1e3


def interleaved(runners: dict[str, Callable[[], object]], repeats: int = 10, min_seconds: float = 0.0,
                max_seconds: float = 60.0) -> dict[str, float]:
    """Time (:func:`typical_ms`) of each runner, measured round-robin so that noise hits them alike.

    Each runner is called once to warm up; then rounds run every runner once, in a rotating
    order, until ``repeats`` rounds and ``min_seconds`` have passed (or ``max_seconds``).
    """
    names = list(runners)
    for name in names:
        runners[name]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    rnd = 0
    while True:
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        for name in order:
            t0 = time.perf_counter()
            runners[name]()
            samples[name].append(time.perf_counter() - t0)
        rnd += 1
        elapsed = time.perf_counter() - start
        if (rnd >= repeats and elapsed >= min_seconds) or elapsed >= max_seconds:
            break
    return {n: typical_ms(v) for n, v in samples.items()}
