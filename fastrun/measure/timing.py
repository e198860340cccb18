"""Side-by-side timing: interleaved repeats, the only comparison a noisy machine allows."""
from __future__ import annotations

import math
import random
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


# A block of calls lasting about this long is one sample of a model timed as it serves
# (:func:`interleaved`'s ``block_seconds``): long enough that the calls settle into the loop a
# server runs, short enough for dozens of samples per candidate.
SERVING_BLOCK_SECONDS = 0.005
# Untimed calls before each block: three calls' worth, within these bounds. Another runner's
# spinning threads and cached data take a few calls to clear (a 7 ms EfficientNet ran 10-12 ms
# after one untimed call, 7.6-8 after two, 6.9-7.2 after four: its time in a loop); for a model
# of microseconds what lingers is the other's spinning, a few milliseconds. A call longer than
# the upper bound is timed without one: an untimed call would halve the race's samples of a
# VGG-19 at batch 8 (0.9 s a call) for nothing that lingers.
SETTLE_CALLS = 3
SETTLE_SECONDS = (0.005, 0.03)
MAX_BLOCK_CALLS = 1000


def block_calls(one_call_seconds: float, block_seconds: float) -> tuple[int, int]:
    """Untimed and timed calls per sample of a runner whose call lasts ``one_call_seconds``:
    the settle (:data:`SETTLE_CALLS` calls' worth, bounded by :data:`SETTLE_SECONDS`; none for a
    call longer than the bound, whose caches no call restores and which no spinning slows) and a
    block of ``block_seconds``, at least one call."""
    one = max(one_call_seconds, 1e-7)
    settle = min(max(SETTLE_CALLS * one, SETTLE_SECONDS[0]), SETTLE_SECONDS[1])
    untimed = min(MAX_BLOCK_CALLS, math.ceil(settle / one)) if one < SETTLE_SECONDS[1] else 0
    return untimed, min(MAX_BLOCK_CALLS, max(1, int(block_seconds / one)))


def interleaved(runners: dict[str, Callable[[], object]], repeats: int = 10, min_seconds: float = 0.0,
                max_seconds: float = 60.0, block_seconds: float = 0.0) -> dict[str, float]:
    """Time (:func:`typical_ms`) of each runner, measured round-robin so that noise hits them alike.

    Each runner is called once to warm up; then rounds run every runner once, in a shuffled
    order, until ``repeats`` rounds and ``min_seconds`` have passed (or ``max_seconds``). Shuffled,
    not rotated: a rotation keeps each runner behind the same predecessor, whose lingering threads
    or evicted caches would then always slow the same one.

    ``block_seconds`` > 0 times each runner as a server calls it, back to back: a sample is the
    mean call of a block lasting about that long (at least one call), after untimed calls
    (:func:`block_calls`). Another runner's threads spin on after it returns and its data fills the
    caches; call by call, each runner pays for its predecessor (a 7 ms EfficientNet measured 10-16
    ms that way), and one that spins itself looks faster than it serves.
    """
    names = list(runners)
    calls = {name: _block_calls(runners[name], block_seconds) for name in names}
    samples: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    rnd, shuffle = 0, random.Random(0).shuffle
    order = list(names)
    while True:
        shuffle(order)
        for name in order:
            run, (untimed, count) = runners[name], calls[name]
            for _ in range(untimed):
                run()
            t0 = time.perf_counter()
            for _ in range(count):
                run()
            samples[name].append((time.perf_counter() - t0) / count)
        rnd += 1
        elapsed = time.perf_counter() - start
        if (rnd >= repeats and elapsed >= min_seconds) or elapsed >= max_seconds:
            break
    return {n: typical_ms(v) for n, v in samples.items()}


def _block_calls(run: Callable[[], object], block_seconds: float) -> tuple[int, int]:
    """Untimed and timed calls per sample of ``run`` (after its warm-up call): (0, 1), or
    :func:`block_calls` of a second call's time."""
    run()
    if block_seconds <= 0:
        return 0, 1
    t0 = time.perf_counter()
    run()
    return block_calls(time.perf_counter() - t0, block_seconds)
