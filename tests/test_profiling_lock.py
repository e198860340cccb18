"""Every writer of plans profiles under the cache's one lock: ``fastrun profile``, ``warmup`` and
``policy="profile"`` wait for another process holding it, and re-enter it within a process."""
from __future__ import annotations

import logging
import subprocess
import sys
import threading

import numpy as np
import pytest

import fastrun
from fastrun.store.cache import Caches
from fastrun.workflows import profile as profiling

HOLD = """
import sys, time
from fastrun.store.cache import Caches
with Caches(sys.argv[1]).profiling_lock() as held:
    print("locked" if held else "no lock", flush=True)
    time.sleep(float(sys.argv[2]))
"""


@pytest.fixture
def lock_held_elsewhere(cache_dir):
    """Another process holding the profiling lock of ``cache_dir`` for 3 s."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, cache_dir, "3"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    yield
    holder.wait(timeout=60)


def _waited(caplog) -> bool:
    return any("waiting for another fastrun process" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("writer", ["profile", "policy=profile", "warmup"])
def test_each_writer_waits_for_the_lock(tiny_model, cache_dir, lock_held_elsewhere, caplog, writer):
    with caplog.at_level(logging.INFO, logger="fastrun"):
        if writer == "profile":
            fastrun.profile(tiny_model, cache_dir=cache_dir, op_limit=0.02, measure=False, verify=False)
        elif writer == "policy=profile":
            sess = fastrun.InferenceSession(tiny_model, cache_dir=cache_dir, policy="profile")
            sess.run(None, {"x": np.zeros((1, 8, 12, 12), np.float32)})
            assert sess.profiled == 1
        else:
            (result,) = fastrun.warmup([tiny_model], cache_dir=cache_dir, op_limit=0.02, verify=False)
            assert result.ok, result.error
    assert _waited(caplog)
    assert fastrun.load_plan(tiny_model, cache_dir=cache_dir) is not None


def test_the_lock_is_reentrant_and_serializes_threads(cache_dir):
    caches = Caches(cache_dir)
    order = []

    def other() -> None:
        with caches.profiling_lock():
            order.append("other")

    with caches.profiling_lock() as outer:
        with Caches(cache_dir).profiling_lock() as inner:  # another Caches of the same root: re-entered
            assert outer and inner
        thread = threading.Thread(target=other)
        thread.start()
        thread.join(0.3)
        order.append("holder")
    thread.join()
    assert order == ["holder", "other"]
    caches.close()


def test_profile_after_policy_profile_in_another_process_measures_nothing(tiny_model, cache_dir):
    fastrun.InferenceSession(tiny_model, cache_dir=cache_dir, policy="profile").run(
        None, {"x": np.zeros((1, 8, 12, 12), np.float32)})
    report = profiling.profile(tiny_model, cache_dir=cache_dir, op_limit=0.02, measure=False, verify=False)
    assert report.stats.measured == 0
