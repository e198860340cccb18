"""Keep OpenBLAS worker threads from busy-waiting between host kernels.

OpenBLAS threads spin ~0.1 s (2^28 cycles) after each BLAS call before they sleep. A host kernel
(numpy GEMM) followed by an onnxruntime segment then leaves those threads burning the cores
onnxruntime needs: on 2 cores a 3x3 conv after a numpy GEMM ran 19 ms instead of 11.4 ms, and
one-node candidate timings taken round-robin after host candidates came out 1.5x too slow.
``OPENBLAS_THREAD_TIMEOUT=4`` (2^4 cycles) makes them sleep at once, but OpenBLAS reads it only
when it starts - with numpy's import. :func:`calm_openblas` sets it before that, and when numpy
was imported first it makes every loaded OpenBLAS re-read its environment and restart its
threads (they pick the timeout up when they start again, at the next BLAS call).
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

ENV = "OPENBLAS_THREAD_TIMEOUT"
TIMEOUT = "4"  # OpenBLAS's minimum: 2^4 cycles


def calm_openblas() -> int:
    """Apply the short OpenBLAS thread timeout; returns how many loaded libraries were restarted.

    A timeout the user set in the environment is respected. Called at ``import fastrun``, before
    any BLAS work of fastrun's runs (restarting OpenBLAS's threads while a call is in flight in
    another thread would be unsafe).
    """
    if os.environ.get(ENV, TIMEOUT) != TIMEOUT:
        return 0
    os.environ[ENV] = TIMEOUT
    if "numpy" not in sys.modules:
        return 0  # OpenBLAS starts with numpy and reads the variable then
    restarted = 0
    for path in _loaded_openblas():
        try:
            lib = ctypes.CDLL(path)
            if lib.openblas_thread_timeout() == int(TIMEOUT):
                continue
            lib.openblas_read_env()
            lib.blas_thread_shutdown_()  # the next BLAS call starts threads with the new timeout
            restarted += 1
        except (OSError, AttributeError) as exc:  # another BLAS build: leave it as it is
            log.debug("cannot set the thread timeout of %s: %s", path, exc)
    return restarted


def _loaded_openblas() -> list[str]:
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower() and ".so" in line}
    except OSError:  # not Linux: only the environment variable applies
        return []
    return sorted(p for p in paths if os.path.isfile(p))
