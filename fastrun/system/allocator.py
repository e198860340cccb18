"""Keep freed memory in the process, so host kernels' outputs reuse pages already mapped.

Host kernels return fresh numpy arrays. glibc serves a large allocation with ``mmap`` (above a
threshold that starts at 128 KiB) and hands it back to the kernel when it is freed, and it trims
the top of its heap when a lot is free there: so on every inference, every host kernel's output
faults in fresh zeroed pages, and the kernel pays for that inside its own time. onnxruntime's
segments don't: their arena keeps its buffers. Measured on VGG-19 (2-core VM, its stored plan
summed part by part): 1400 ms at batch 8 and 189 ms at batch 1 with glibc's defaults, 1059 and
174 ms with the settings below, which brought the Winograd layers back to their profiled times.

:func:`keep_freed_memory` raises glibc's mmap threshold to its maximum (32 MiB with 64-bit longs)
and its trim threshold to 2 GiB: freed outputs stay in the heap and the next inference reuses
them. The price is that the process keeps its peak heap, as onnxruntime's arena does. It is
applied when a program with host kernels is built; a ``MALLOC_MMAP_THRESHOLD_`` or
``MALLOC_TRIM_THRESHOLD_`` in the environment is respected, and other C libraries are left alone.
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)  # glibc's upper limit
TRIM_THRESHOLD = 2**31 - 1
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_applied = False


def keep_freed_memory() -> bool:
    """Apply the settings once per process; whether they are in force."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux") or any(v in os.environ for v in USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _applied = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not _applied:
        log.debug("mallopt refused the settings; host kernel outputs will fault in fresh pages")
    return _applied
