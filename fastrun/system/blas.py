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
import functools
import logging
import os
import sys
from typing import Callable

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


# Thread-count entry points: OpenBLAS's own names and numpy's bundled build (scipy-openblas,
# 64-bit integers, prefixed and suffixed symbols).
_THREAD_SYMBOLS = (("openblas_get_num_threads", "openblas_set_num_threads"),
                   ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
                   ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"))


@functools.lru_cache(maxsize=1)
def _thread_controls() -> tuple:
    """(get, set) of every loaded OpenBLAS (looked up once: host steps call this often)."""
    import numpy  # noqa: F401  (OpenBLAS is loaded with numpy)

    controls = []
    for path in _loaded_openblas():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for get_name, set_name in _THREAD_SYMBOLS:
            if hasattr(lib, get_name) and hasattr(lib, set_name):
                getter, setter = getattr(lib, get_name), getattr(lib, set_name)
                getter.restype, setter.argtypes = ctypes.c_int, [ctypes.c_int]
                controls.append((getter, setter))
                break
    return tuple(controls)


def reload_libraries() -> None:
    """Look the loaded OpenBLAS libraries up again: call it after loading one (scipy's)."""
    _thread_controls.cache_clear()


def lower_threads(count: int) -> Callable[[], None]:
    """Cap OpenBLAS at ``count`` threads; returns the function that restores the previous counts."""
    lowered = []
    for getter, setter in _thread_controls():
        before = getter()
        if count < before:
            setter(count)
            lowered.append((setter, before))
    if not lowered:
        return _nothing

    def restore() -> None:
        for setter, before in lowered:
            setter(before)
    return restore


def _nothing() -> None:
    pass


def _loaded_openblas() -> list[str]:
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower() and ".so" in line}
    except OSError:  # not Linux: only the environment variable applies
        return []
    return sorted(p for p in paths if os.path.isfile(p))
