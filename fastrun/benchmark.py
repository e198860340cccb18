"""Side-by-side timing: interleaved repeats and medians, the only comparison this noisy machine allows."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np


def interleaved(runners: dict[str, Callable[[], object]], repeats: int = 10, min_seconds: float = 0.0,
                max_seconds: float = 60.0) -> dict[str, float]:
    """Median ms of each runner, measured round-robin so that noise hits them alike.

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
    return {n: float(np.median(v)) * 1e3 for n, v in samples.items()}
