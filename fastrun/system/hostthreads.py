"""How many cores host kernels use: the plan's ``host_threads`` knob, applied per host step.

onnxruntime segments take their intra-op thread count when their session is made; host kernels
have no session, so the executor wraps each host step in :func:`limited`. Compiled kernels split
their work into :func:`current` parts. The BLAS of numpy's GEMMs (OpenBLAS, MKL, BLIS) has one
process-wide count: it is lowered for the step and restored after it, and never raised, so
``OPENBLAS_NUM_THREADS`` or ``MKL_NUM_THREADS`` set by the user still caps it. Two threads running
host steps with different counts at once may see each other's BLAS count; that costs speed, never
correctness.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

from fastrun.system import blas
from fastrun.system.ortutil import default_threads

_local = threading.local()


def current() -> int:
    """The thread count of the host step running on this thread (all cores outside one)."""
    return getattr(_local, "count", 0) or default_threads()


@contextmanager
def limited(count: int) -> Iterator[None]:
    """Run the body as a host step with ``count`` threads (0: all cores, ``FASTRUN_THREADS``)."""
    count = count or default_threads()
    previous = getattr(_local, "count", 0)
    _local.count = count
    restore = blas.lower_threads(count)
    try:
        yield
    finally:
        _local.count = previous
        restore()
