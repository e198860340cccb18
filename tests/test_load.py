"""A busy machine is seen before a measurement is trusted: a process spinning on one of fastrun's
cores is detected, reported, and no thread count measured beside it is stored."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

import fastrun
from fastrun.cli import main
from fastrun.measure import load
from fastrun.store.cache import Caches
from fastrun.workflows import lookup

@pytest.fixture(autouse=True)
def load_check_on(monkeypatch):
    """The busy-machine check at its default threshold (the suite's conftest turns it off)."""
    monkeypatch.delenv(load.ENV_BUSY, raising=False)


SPIN = "import os, sys; os.sched_setaffinity(0, {int(sys.argv[1])}); print('spinning', flush=True)\nwhile True: pass"


@pytest.fixture
def spinner():
    """A second process spinning on one of this process's cores."""
    core = min(os.sched_getaffinity(0))
    proc = subprocess.Popen([sys.executable, "-c", SPIN, str(core)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "spinning"
    time.sleep(0.2)
    yield core
    proc.kill()
    proc.wait()


def test_a_process_spinning_on_one_core_is_detected(spinner):
    seen = load.check(0.5)
    assert seen.busy and seen.other_cores >= 0.7, seen


def test_this_process_s_own_work_is_not_counted_as_load():
    """Spinning here for the whole window is our use, not another process's."""
    monitor = load.LoadMonitor({min(os.sched_getaffinity(0))}).start()
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        pass
    seen = monitor.stop()
    spinning_alone = load.check(0.5, {min(os.sched_getaffinity(0))})
    # whatever else this shared machine runs shows up in both windows alike; our spin adds nothing
    assert seen.other_cores <= spinning_alone.other_cores + 0.3, (seen, spinning_alone)


def test_profiling_beside_a_spinning_process_stores_no_thread_count(tiny_model, cache_dir, spinner):
    res = CliRunner().invoke(main, ["profile", tiny_model, "--cache-dir", cache_dir, "--op-limit", "0.02",
                                    "--json", cache_dir + ".json"])
    assert res.exit_code == 0, res.output
    assert "WARNING: the machine was busy" in res.output and "measured under load" in res.output
    assert "(kernels/formats)" in res.output and "(threads)" in res.output
    report = json.loads(open(cache_dir + ".json").read())
    assert report["measured_under_load"] and report["load"]["before"]["busy"]
    plan = fastrun.load_plan(tiny_model, cache_dir=cache_dir)
    assert plan.measured_under_load
    assert (plan.threads, plan.segment_threads, plan.host_threads) == (0, [], 0)
    listing = CliRunner().invoke(main, ["cache", "ls", "--cache-dir", cache_dir])
    assert "loaded: measured under load" in listing.output


def test_warmup_measures_a_plan_made_under_load_again_once_the_machine_is_quiet(tiny_model, cache_dir, monkeypatch):
    fastrun.profile(tiny_model, cache_dir=cache_dir, op_limit=0.02, measure=False, verify=False)
    caches = Caches(cache_dir)
    plan = fastrun.load_plan(tiny_model, cache_dir=cache_dir)
    plan.measured_under_load = True
    lookup.store_plan(caches, plan)
    caches.close()
    monkeypatch.setattr(load, "check", lambda *a, **k: load.Load(2.0, 0.5))  # busy now: kept, not measured again
    (result,) = fastrun.warmup([tiny_model], cache_dir=cache_dir, op_limit=0.02, verify=False)
    assert result.ok and result.status == "cached" and result.measured_under_load
    monkeypatch.undo()
    monkeypatch.setenv(load.ENV_BUSY, "inf")  # quiet now: measured again, timings refreshed
    (result,) = fastrun.warmup([tiny_model], cache_dir=cache_dir, op_limit=0.02, verify=False)
    assert result.ok and result.status == "profiled" and result.measured > 0 and not result.measured_under_load


def _stat(path, ticks: dict[int, tuple[int, int, int]]) -> None:
    """A /proc/stat with per-core (user, idle, steal) ticks."""
    lines = ["cpu  0 0 0 0 0 0 0 0 0 0"]
    lines += [f"cpu{c} {u} 0 0 {i} 0 0 0 {s} 0 0" for c, (u, i, s) in sorted(ticks.items())]
    path.write_text("\n".join(lines) + "\n")


def test_other_processes_use_is_busy_plus_steal_of_the_watched_cores_per_second(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    _stat(stat, {0: (1000, 5000, 0), 1: (1000, 5000, 0), 2: (0, 0, 0)})
    monitor = load.LoadMonitor({0, 1}, str(stat)).start()
    time.sleep(0.5)
    tick = load._TICK
    # over ~0.5 s: core 0 busy 0.25 s, core 1 stolen 0.1 s, core 2 (not watched) busy 0.5 s
    _stat(stat, {0: (1000 + tick // 4, 5000 + tick // 4, 0), 1: (1000, 5000 + 2 * tick // 5, tick // 10),
                 2: (tick // 2, 0, 0)})
    seen = monitor.stop()
    assert seen.other_cores == pytest.approx(0.35 / seen.seconds, abs=0.05)
    assert not load.Load(load.BUSY_CORES, 0.5).busy and load.Load(load.BUSY_CORES + 0.01, 0.5).busy
    monkeypatch.setenv(load.ENV_BUSY, "inf")
    assert not load.Load(100.0, 0.5).busy
