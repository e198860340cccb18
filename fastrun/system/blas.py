"""numpy's BLAS: its threads kept from busy-waiting between host kernels, capped per host step,
and described for the fingerprint (through ``threadpoolctl``: OpenBLAS, MKL, BLIS alike).

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


@functools.lru_cache(maxsize=1)
def _controllers() -> tuple:
    """threadpoolctl's controller of every loaded BLAS (OpenBLAS, MKL, BLIS, FlexiBLAS), looked
    up once: host steps call :func:`lower_threads` often and a lookup scans the loaded libraries."""
    import numpy  # noqa: F401  (the BLAS is loaded with numpy)
    from threadpoolctl import ThreadpoolController

    return tuple(ThreadpoolController().select(user_api="blas").lib_controllers)


def thread_counts() -> list[int]:
    """The thread count of every loaded BLAS (what :func:`lower_threads` changes)."""
    return [c.get_num_threads() for c in _controllers()]


def reload_libraries() -> None:
    """Look the loaded BLAS libraries up again: call it after loading one (scipy's)."""
    _controllers.cache_clear()


def lower_threads(count: int) -> Callable[[], None]:
    """Cap every loaded BLAS at ``count`` threads; returns the function that restores the previous counts."""
    lowered = []
    for controller in _controllers():
        before = controller.get_num_threads()
        if before is not None and count < before:
            controller.set_num_threads(count)
            lowered.append((controller, before))
    if not lowered:
        return _nothing

    def restore() -> None:
        for controller, before in lowered:
            controller.set_num_threads(before)
    return restore


def _nothing() -> None:
    pass


@functools.lru_cache(maxsize=1)
def describe() -> dict:
    """numpy's BLAS for the fingerprint: implementation, version, kernel architecture, threading layer.

    When several are loaded (scipy brings its own), numpy's is the one fastrun's host kernels
    call: the library found under numpy's directories, else the first by path, so that the
    answer does not depend on what the process imported before.
    """
    import numpy
    from threadpoolctl import threadpool_info

    infos = sorted((i for i in threadpool_info() if i.get("user_api") == "blas"), key=lambda i: i.get("filepath", ""))
    numpy_root = os.path.dirname(numpy.__file__)
    numpy_dirs = (numpy_root + os.sep, os.path.join(os.path.dirname(numpy_root), "numpy.libs") + os.sep)
    ours = [i for i in infos if i.get("filepath", "").startswith(numpy_dirs)]
    chosen = (ours or infos or [{}])[0]
    fields = {k: chosen.get(k) for k in ("internal_api", "version", "architecture", "threading_layer")}
    return {k: v for k, v in fields.items() if v is not None} or {"internal_api": _configured_blas()}


def _configured_blas() -> str:
    """numpy's build-time BLAS name (when no BLAS library is found loaded)."""
    import numpy

    try:
        blas = numpy.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:
        return "unknown"


def _loaded_openblas() -> list[str]:
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower() and ".so" in line}
    except OSError:  # not Linux: only the environment variable applies
        return []
    return sorted(p for p in paths if os.path.isfile(p))
