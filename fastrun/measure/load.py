"""Is the machine free? CPU time spent by other processes on the cores fastrun uses.

A timing taken while something else runs measures the contention, not the candidate: profiling
a model on 2 cores with one of them busy chose 1 intra-op thread (one thread ran 6.6 ms, two
13.7 ms) and the stored plan then ran single-threaded on the idle serving machine. Before and
after profiling, and around the thread-count race, :class:`LoadMonitor` reads ``/proc/stat``
(the busy and stolen time of each core fastrun may use) and this process's own CPU time; what
is left is other processes' (and the hypervisor's) use of those cores, in cores.
"""
from __future__ import annotations

import logging
import os
import resource
import time
from dataclasses import dataclass
from typing import Optional

log = logging.getLogger(__name__)

# Other processes' average use of fastrun's cores above which a measurement is "under load";
# ``FASTRUN_BUSY_CORES`` replaces it (``inf``: never, for machines with known background work).
BUSY_CORES = 0.25
ENV_BUSY = "FASTRUN_BUSY_CORES"
# How long an idle check watches the machine.
CHECK_SECONDS = 0.5
PROC_STAT = "/proc/stat"
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass
class Snapshot:
    wall: float
    busy: Optional[float]      # seconds the watched cores were busy or stolen (None: unknown)
    own: float                 # this process's CPU seconds (all its threads)


def busy_threshold() -> float:
    """Other processes' use of the cores, in cores, above which the machine counts as busy."""
    try:
        return float(os.environ.get(ENV_BUSY, BUSY_CORES))
    except ValueError:
        return BUSY_CORES


def _busy_seconds(cores: set[int], path: str = PROC_STAT) -> Optional[float]:
    """Busy + steal seconds summed over ``cores`` since boot (None where /proc/stat is missing)."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    total = 0
    found = False
    for line in lines:
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cores:
            continue
        values = [int(v) for v in rest.split()]
        # user nice system idle iowait irq softirq steal (guest time is inside user)
        idle = values[3] + (values[4] if len(values) > 4 else 0)
        total += sum(values[:8]) - idle
        found = True
    return total / _TICK if found else None


def _own_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Load:
    """Other processes' use of the watched cores over a window."""

    other_cores: Optional[float]   # None: not measurable here
    seconds: float

    @property
    def busy(self) -> bool:
        return self.other_cores is not None and self.other_cores > busy_threshold()

    def to_json(self) -> dict:
        return {"other_cores": None if self.other_cores is None else round(self.other_cores, 3),
                "seconds": round(self.seconds, 3), "busy": self.busy}


class LoadMonitor:
    """Watches fastrun's cores between :meth:`start` and :meth:`stop` (others' use, in cores)."""

    def __init__(self, cores: Optional[set[int]] = None, stat_path: str = PROC_STAT):
        if cores is None:
            cores = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set()
        self.cores, self.stat_path = cores, stat_path
        self._start: Optional[Snapshot] = None

    def snapshot(self) -> Snapshot:
        return Snapshot(time.monotonic(), _busy_seconds(self.cores, self.stat_path), _own_seconds())

    def start(self) -> "LoadMonitor":
        self._start = self.snapshot()
        return self

    def stop(self) -> Load:
        end, start = self.snapshot(), self._start
        if start is None:
            raise RuntimeError("LoadMonitor.stop() before start()")
        seconds = end.wall - start.wall
        if start.busy is None or end.busy is None or seconds <= 0:
            return Load(None, seconds)
        others = (end.busy - start.busy) - (end.own - start.own)
        return Load(max(0.0, others / seconds), seconds)


def check(seconds: float = CHECK_SECONDS, cores: Optional[set[int]] = None) -> Load:
    """Others' use of fastrun's cores while this process sleeps for ``seconds``."""
    monitor = LoadMonitor(cores).start()
    time.sleep(seconds)
    return monitor.stop()
