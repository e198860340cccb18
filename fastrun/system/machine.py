"""What this process may really use: cores (affinity, cgroup quota, ``FASTRUN_THREADS``), memory,
and what the CPU is (vendor, family, model, stepping).

Every source is a file or an environment variable read through :class:`Sources`, so that a test
can fake a container's ``cpu.max``, another CPU's ``/proc/cpuinfo`` or a BLAS and see the
fingerprint change. ``docker --cpus=2`` on a 64-core host leaves the affinity at 64 cores and
sets a CFS quota of 2 cores: counting the affinity alone plans, fingerprints and runs 64
threads that the kernel then throttles.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

ENV_THREADS = "FASTRUN_THREADS"

# cpuinfo fields that tell CPUs apart when their model names and flags agree ("AMD EPYC").
CPU_ID_FIELDS = ("vendor_id", "cpu family", "model", "stepping",
                 "CPU implementer", "CPU architecture", "CPU variant", "CPU part", "CPU revision")


@dataclass(frozen=True)
class Sources:
    """Where the machine's facts are read from (the real system by default)."""

    cpuinfo: str = "/proc/cpuinfo"
    self_cgroup: str = "/proc/self/cgroup"
    cgroup_root: str = "/sys/fs/cgroup"
    meminfo: str = "/proc/meminfo"
    affinity: Optional[int] = None          # None: os.sched_getaffinity
    env: Optional[Mapping[str, str]] = field(default=None, hash=False, compare=False)  # None: os.environ

    def environ(self) -> Mapping[str, str]:
        return os.environ if self.env is None else self.env


SYSTEM = Sources()


def _read(path: str, limit: int = 1 << 20) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(limit)
    except OSError:
        return ""


def affinity_cores(sources: Sources = SYSTEM) -> int:
    if sources.affinity is not None:
        return max(1, sources.affinity)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _cgroup_dirs(sources: Sources) -> list[tuple[str, Path]]:
    """(version, directory) of this process's cgroups that may carry a CPU limit, innermost first,
    with every ancestor up to the mount (a limit on a parent applies too)."""
    found: list[tuple[str, Path]] = []
    root = Path(sources.cgroup_root)
    for line in _read(sources.self_cgroup).splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if controllers == "":
            version, mount = "v2", root
        elif "cpu" in controllers.split(","):
            version, mount = "v1", next((root / name for name in (controllers, "cpu,cpuacct", "cpu")
                                         if (root / name).is_dir()), root / controllers)
        else:
            continue
        path = mount / rel.strip().lstrip("/")
        chain = [path, *[p for p in path.parents if mount in p.parents or p == mount]]
        found += [(version, d) for d in chain]
        if mount not in chain:
            found.append((version, mount))
    return found


def _quota(version: str, directory: Path) -> Optional[float]:
    """CPUs granted by one cgroup directory's quota (None: no limit there)."""
    if version == "v2":
        parts = _read(str(directory / "cpu.max")).split()
        if len(parts) == 2 and parts[0] != "max":
            quota, period = parts
        else:
            return None
    else:
        quota = _read(str(directory / "cpu.cfs_quota_us")).strip()
        period = _read(str(directory / "cpu.cfs_period_us")).strip()
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


@functools.lru_cache(maxsize=8)
def cgroup_cores(sources: Sources = SYSTEM) -> Optional[int]:
    """Whole cores the tightest cgroup CPU quota allows (at least 1; None: no quota).

    Rounded down: threads past the quota spin into throttling (a 100 ms period's budget gone
    in a burst, then every thread stopped until the next one).
    """
    quotas = [q for version, d in _cgroup_dirs(sources) if (q := _quota(version, d)) is not None]
    return max(1, math.floor(min(quotas) + 1e-9)) if quotas else None


def usable_cores(sources: Sources = SYSTEM) -> int:
    """Cores this process may use: affinity, capped by the cgroup quota and ``FASTRUN_THREADS``."""
    cores = affinity_cores(sources)
    quota = cgroup_cores(sources)
    if quota is not None:
        cores = min(cores, quota)
    env = sources.environ().get(ENV_THREADS)
    if env:
        try:
            cores = min(cores, max(1, int(env)))
        except ValueError:
            pass
    return cores


@functools.lru_cache(maxsize=8)
def cpu_identity(sources: Sources = SYSTEM) -> dict[str, str]:
    """The first processor's identifying cpuinfo fields (those present), plus model name and flags."""
    info: dict[str, str] = {}
    for line in _read(sources.cpuinfo).splitlines():
        key, sep, value = line.partition(":")
        key = key.strip()
        if not sep:
            if info:
                break  # end of the first processor's block
            continue
        info.setdefault(key, value.strip())
    return info


def memory_bytes(sources: Sources = SYSTEM) -> int:
    """Memory this process can count on: MemAvailable, capped by a cgroup memory limit."""
    available = None
    for line in _read(sources.meminfo).splitlines():
        if line.startswith("MemAvailable:"):
            available = int(line.split()[1]) * 1024
    limits = [available] if available else []
    for version, d in _cgroup_dirs(sources):
        text = _read(str(d / "memory.max")).strip() if version == "v2" else ""
        if text.isdigit():
            limits.append(int(text))
    return min(limits) if limits else 1 << 34
