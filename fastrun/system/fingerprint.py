"""Hardware/software fingerprint: what makes a timing valid on another machine or not.

Everything that changes which implementation wins goes in (CPU model, vendor, family, model
number and stepping, the ISA flags that matter, usable cores with the cgroup quota, thread
setting, BLAS implementation with its kernel architecture and threading layer,
onnxruntime/numpy/fastrun versions); nothing that changes across reboots of the same machine
does (hostname, time, load, microcode).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
from typing import Optional

import numpy as np
import onnxruntime

from fastrun._version import __version__
from fastrun.system import blas as blas_mod, machine

# ISA features that change which kernels MLAS/OpenBLAS pick.
RELEVANT_FLAGS = ("sse4_1", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                  "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "neon", "asimd", "sve")


def cpu_flags(sources: machine.Sources = machine.SYSTEM) -> set[str]:
    info = machine.cpu_identity(sources)
    return set((info.get("flags") or info.get("Features") or "").split())


def cpu_model(sources: machine.Sources = machine.SYSTEM) -> str:
    info = machine.cpu_identity(sources)
    return info.get("model name") or info.get("Hardware") or platform.processor() or platform.machine()


def installed_version(distribution: str) -> str:
    """An installed package's version without importing it ("" when it is not installed)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return ""


def describe(sources: machine.Sources = machine.SYSTEM, blas: Optional[dict] = None) -> dict:
    """The fingerprint's fields, readable (what ``fastrun fingerprint`` prints).

    ``sources`` and ``blas`` (:func:`fastrun.system.blas.describe`'s fields) replace the real system's.
    """
    info = machine.cpu_identity(sources)
    flags = cpu_flags(sources)
    return {
        "cpu": cpu_model(sources),
        "cpu_id": {k: info[k] for k in machine.CPU_ID_FIELDS if k in info},
        "machine": platform.machine(),
        "isa": sorted(f for f in RELEVANT_FLAGS if f in flags),
        "cores": machine.usable_cores(sources),
        "threads": sources.environ().get(machine.ENV_THREADS, "default"),
        "blas": blas if blas is not None else blas_mod.describe(),
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
