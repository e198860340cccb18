"""Hardware/software fingerprint: what makes a timing valid on another machine or not.

Everything that changes which implementation wins goes in (CPU model and the ISA flags that
matter, usable cores, thread setting, BLAS, onnxruntime/numpy/fastrun versions); nothing that
changes across reboots of the same machine does (hostname, time, load).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import platform

import numpy as np
import onnxruntime

from fastrun._version import __version__
from fastrun.system import ortutil

# ISA features that change which kernels MLAS/OpenBLAS pick.
RELEVANT_FLAGS = ("sse4_1", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                  "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "neon", "asimd", "sve")


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() not in info:
                    info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def cpu_flags() -> set[str]:
    info = _cpuinfo()
    return set((info.get("flags") or info.get("Features") or "").split())


def cpu_model() -> str:
    info = _cpuinfo()
    return info.get("model name") or info.get("Hardware") or platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def blas_name() -> str:
    try:
        config = np.show_config(mode="dicts")
        blas = config["Build Dependencies"]["blas"]
        return f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:
        return "unknown"


def installed_version(distribution: str) -> str:
    """An installed package's version without importing it ("" when it is not installed)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return ""


def describe() -> dict:
    """The fingerprint's fields, readable (what ``fastrun fingerprint`` prints)."""
    flags = cpu_flags()
    return {
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "isa": sorted(f for f in RELEVANT_FLAGS if f in flags),
        "cores": ortutil.default_threads(),
        "threads": os.environ.get("FASTRUN_THREADS", "default"),
        "blas": blas_name(),
        "numpy": np.__version__,
        "onnxruntime": onnxruntime.__version__,
        "openvino": installed_version("openvino"),  # a whole-model engine plans may choose
        "fastrun": __version__,
        "python": platform.python_version(),
    }


def fingerprint(fields: dict | None = None) -> str:
    """Short stable id of :func:`describe` (``FASTRUN_FINGERPRINT`` overrides, for tests and fleets)."""
    override = os.environ.get("FASTRUN_FINGERPRINT")
    if override:
        return override
    text = json.dumps(fields or describe(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
