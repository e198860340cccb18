"""Usable cores, CPU identity and BLAS: each source faked, each seen in the fingerprint."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fastrun.system import blas, fingerprint as fp, machine

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC
stepping\t: 1
microcode\t: 0xa0011d1
flags\t\t: fpu sse4_1 avx avx2 fma f16c

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC
stepping\t: 1
flags\t\t: fpu sse4_1 avx avx2 fma f16c
"""
BLAS = {"internal_api": "openblas", "version": "0.3.27", "architecture": "Haswell", "threading_layer": "pthreads"}


def fake(tmp_path: Path, cpuinfo: str = CPUINFO, v2: str = "", v1: tuple[str, str] = ("", ""),
         affinity: int = 64, env: dict | None = None) -> machine.Sources:
    """A machine of ``affinity`` cores in a cgroup with the given v2 ``cpu.max`` or v1 quota/period."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    root = tmp_path / "cgroup"
    (tmp_path / "cpuinfo").write_text(cpuinfo)
    if v1[0]:
        group = root / "cpu,cpuacct" / "docker" / "abc"
        group.mkdir(parents=True)
        (group / "cpu.cfs_quota_us").write_text(v1[0])
        (group / "cpu.cfs_period_us").write_text(v1[1])
        (tmp_path / "self_cgroup").write_text("12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n")
    else:
        group = root / "system.slice" / "app.scope"
        group.mkdir(parents=True)
        if v2:
            (group / "cpu.max").write_text(v2)
        (root / "cpu.max").write_text("max 100000\n")
        (tmp_path / "self_cgroup").write_text("0::/system.slice/app.scope\n")
    return machine.Sources(cpuinfo=str(tmp_path / "cpuinfo"), self_cgroup=str(tmp_path / "self_cgroup"),
                           cgroup_root=str(root), meminfo=str(tmp_path / "meminfo"), affinity=affinity,
                           env=env or {})


def key(sources: machine.Sources, blas_fields: dict = BLAS) -> str:
    return fp.fingerprint(fp.describe(sources, blas_fields))


@pytest.mark.parametrize("v2, v1, cores", [
    ("", ("", ""), 64),                        # no quota: the affinity
    ("200000 100000\n", ("", ""), 2),          # docker --cpus=2 (cgroup v2)
    ("150000 100000\n", ("", ""), 1),          # --cpus=1.5: rounded down
    ("max 100000\n", ("", ""), 64),
    ("", ("400000", "100000"), 4),             # cgroup v1
    ("", ("-1", "100000"), 64),
])
def test_usable_cores_are_capped_by_the_cgroup_quota(tmp_path, v2, v1, cores):
    assert machine.usable_cores(fake(tmp_path, v2=v2, v1=v1)) == cores


def test_a_parent_cgroup_quota_applies(tmp_path):
    sources = fake(tmp_path)
    (Path(sources.cgroup_root) / "system.slice" / "cpu.max").write_text("300000 100000\n")
    assert machine.usable_cores(sources) == 3


def test_fastrun_threads_caps_the_cores(tmp_path):
    assert machine.usable_cores(fake(tmp_path, v2="400000 100000", env={"FASTRUN_THREADS": "3"})) == 3
    assert machine.usable_cores(fake(tmp_path / "b", v2="200000 100000", env={"FASTRUN_THREADS": "8"})) == 2


def test_each_source_changes_the_key(tmp_path):
    base = key(fake(tmp_path / "a"))
    assert key(fake(tmp_path / "b")) == base                                     # same facts, same key
    assert key(fake(tmp_path / "c", v2="200000 100000")) != base                  # a container quota
    assert key(fake(tmp_path / "c1", v1=("200000", "100000"))) != base           # a cgroup v1 quota
    assert key(fake(tmp_path / "c2", affinity=8)) != base                         # taskset / cpuset
    assert key(fake(tmp_path / "c3", env={"FASTRUN_THREADS": "4"})) != base
    assert key(fake(tmp_path / "c4", cpuinfo=CPUINFO.replace("AuthenticAMD", "GenuineIntel"))) != base
    assert key(fake(tmp_path / "d", cpuinfo=CPUINFO.replace("model\t\t: 1", "model\t\t: 17"))) != base
    assert key(fake(tmp_path / "e", cpuinfo=CPUINFO.replace("stepping\t: 1", "stepping\t: 2"))) != base
    assert key(fake(tmp_path / "f", cpuinfo=CPUINFO.replace("cpu family\t: 25", "cpu family\t: 26"))) != base
    assert key(fake(tmp_path / "g", cpuinfo=CPUINFO.replace("microcode\t: 0xa0011d1", "microcode\t: 0xa0011d5"))) == base
    assert key(fake(tmp_path / "h"), dict(BLAS, internal_api="mkl", threading_layer="intel")) != base
    assert key(fake(tmp_path / "i"), dict(BLAS, architecture="SkylakeX")) != base


def test_cpu_identity_reads_the_first_processor(tmp_path):
    fields = fp.describe(fake(tmp_path), BLAS)["cpu_id"]
    assert fields == {"vendor_id": "AuthenticAMD", "cpu family": "25", "model": "1", "stepping": "1"}


PRINT_KEY = "import numpy, scipy.linalg; from fastrun.system import fingerprint; print(fingerprint.fingerprint())"


def test_the_key_is_stable_across_processes_and_import_orders():
    """scipy loads a second OpenBLAS: the fingerprint still describes numpy's."""
    orders = [PRINT_KEY, PRINT_KEY.replace("import numpy, scipy.linalg; ", "")]
    keys = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           check=True).stdout.strip() for code in orders + orders}
    assert len(keys) == 1


def test_host_steps_lower_every_loaded_blas_and_restore_it():
    before = blas.thread_counts()
    if not before:
        pytest.skip("no BLAS threadpoolctl can control")
    restore = blas.lower_threads(1)
    assert blas.thread_counts() == [min(1, b) for b in before]
    restore()
    assert blas.thread_counts() == before
    assert blas.describe()["internal_api"] in ("openblas", "mkl", "blis", "flexiblas")
