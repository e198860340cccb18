"""Running untrusted candidate code in a child process that can be killed.

One job: call ``job(keys, channel)`` in a forked worker process, with a time limit on every
stretch of candidate code, and report which candidate was running if the worker crashed, hung
or ran out of memory. The job is the caller's (the profiler's build-check-time loop); this
module knows nothing about operators.

Protocol
--------
The job runs in the worker and brackets every call into candidate code with
``channel.running(key)`` (a context manager; ``channel.start(key)``/``channel.stop()`` in hot
loops). It reports each candidate's final result as a JSON-able dict with
``channel.send(key, result)``; results stream to the parent as JSON text as they are sent.
``running`` writes the candidate's index and start time into a small shared-memory block, so the
parent - polling it - knows which candidate a dead or stuck worker was in without any message
from the worker:

* a candidate whose stretch lasts longer than ``timeout`` seconds: the worker is killed
  (SIGKILL), the candidate is recorded as ``"timed out after X s"``;
* a worker that dies while a candidate runs: ``"crashed with signal SIGSEGV"`` (or the signal
  or exit status it died with);
* a candidate that raises ``MemoryError`` (or onnxruntime's ``bad_alloc``) because of the
  worker's address-space limit (``RLIMIT_AS`` = its size at start + ``memory_limit``): the job
  catches it like any other exception; :func:`describe_exception` words it ``"out of memory"``.

After a crash or a timeout the parent starts a fresh worker for the keys that have neither a
result nor a failure: the job must therefore be deterministic (seeded random data) and must not
care which subset of keys it gets. A worker that dies or stalls (``stall_timeout``) *outside*
candidate code is retried once; a second time, or a Python exception escaping the job, ends the
run with :attr:`Outcome.error` set and the remaining keys unmeasured (not the candidates' fault,
so callers should not record them as failed for good). If not even one worker can be started
(no ``fork``, a daemonic parent process...), :class:`WorkerStartError` lets the caller fall back
to :func:`run_in_process`.

Workers are forked (``multiprocessing`` "fork" start method): implementations registered by
decorators in the parent - user code, tests - exist in the worker without being importable.
Nothing but JSON text crosses from the worker to the parent. Workers ignore SIGINT (Ctrl-C
reaches the parent, which kills them), get SIGKILL if the parent dies (``PR_SET_PDEATHSIG``),
write no core files, and are killed in ``finally`` blocks and at interpreter exit: no worker
outlives a run, whether it succeeds, fails or is interrupted.

:func:`run_in_process` runs the same job with the same channel API in this process: fast, but
without time limits or protection (a crash or hang of a candidate is the caller's).
"""
from __future__ import annotations

import atexit
import ctypes
import faulthandler
import gc
import json
import logging
import mmap
import multiprocessing
import os
import resource
import signal
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0        # seconds one stretch of candidate code (build, one call) may take
DEFAULT_MEMORY_LIMIT = 8 << 30  # bytes of address space a worker may add to what it inherits
MIN_STALL_TIMEOUT = 60.0      # seconds a worker may spend outside candidate code without news
POLL_SECONDS = 0.05

Job = Callable[[Sequence[str], "Channel"], None]


def default_memory_limit() -> int:
    """:data:`DEFAULT_MEMORY_LIMIT`, but at most half of this machine's physical memory."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return DEFAULT_MEMORY_LIMIT
    return int(min(DEFAULT_MEMORY_LIMIT, physical // 2))


# ------------------------------------------------------------------------------- the job's side

class Channel:
    """What a job uses to mark candidate code and to report results."""

    def __init__(self, keys: Sequence[str]):
        self.keys = list(keys)
        self._index = {k: i for i, k in enumerate(self.keys)}

    def start(self, key: str) -> None:
        """Candidate ``key``'s code starts now (its time limit starts counting)."""

    def stop(self) -> None:
        """No candidate code runs now."""

    @contextmanager
    def running(self, key: str) -> Iterator[None]:
        """Bracket candidate code. An ``Exception`` ends the stretch (the job handles it); anything
        else (``SystemExit`` from candidate code...) leaves the candidate marked as the culprit."""
        self.start(key)
        try:
            yield
        except Exception:
            self.stop()
            raise
        self.stop()

    def send(self, key: str, result: dict) -> None:
        raise NotImplementedError


class _InProcessChannel(Channel):
    def __init__(self, keys: Sequence[str], on_result: Callable[[str, dict], None]):
        super().__init__(keys)
        self._on_result = on_result

    def send(self, key: str, result: dict) -> None:
        self._on_result(key, json.loads(json.dumps(result)))  # the same plain data as from a worker


class _WorkerChannel(Channel):
    """The worker's channel: a pipe for results, shared memory for "who is running since when"."""

    def __init__(self, keys: Sequence[str], conn, state: "_SharedState"):
        super().__init__(keys)
        self._conn = conn
        self._state = state

    def start(self, key: str) -> None:
        self._state.set(self._index[key])

    def stop(self) -> None:
        self._state.set(-1)

    def send(self, key: str, result: dict) -> None:
        self._message({"key": key, "result": result})

    def _message(self, msg: dict) -> None:
        self._conn.send_bytes(json.dumps(msg).encode())


class _SharedState:
    """Two doubles in an anonymous shared mapping: [running index or -1, time it was set]."""

    def __init__(self) -> None:
        self._map = mmap.mmap(-1, mmap.PAGESIZE)
        self._cells = (ctypes.c_double * 2).from_buffer(self._map)
        self.set(-1)

    def set(self, index: int) -> None:
        self._cells[1] = time.monotonic()  # time first: a reader that sees the index sees its time
        self._cells[0] = float(index)

    def get(self) -> tuple[int, float]:
        while True:
            index, since = self._cells[0], self._cells[1]
            if self._cells[0] == index:
                return int(index), since

    def close(self) -> None:
        del self._cells
        try:
            self._map.close()
        except BufferError:  # pragma: no cover - a view still exists; the mapping dies with us
            pass


# ------------------------------------------------------------------------------- the parent's side

@dataclass
class Outcome:
    """What happened to every key of :func:`run_isolated`."""

    results: dict[str, dict] = field(default_factory=dict)   # key -> what the job sent
    failures: dict[str, str] = field(default_factory=dict)   # key -> why its worker died or was killed
    timed_out: set[str] = field(default_factory=set)         # the failures that were time limits
    error: str = ""          # the run ended early for a reason that is no candidate's fault
    workers: int = 0         # worker processes started
    peak_rss: int = 0        # largest resident set of a worker that finished normally (bytes)

    def missing(self, keys: Sequence[str]) -> list[str]:
        return [k for k in keys if k not in self.results and k not in self.failures]


_live: dict[int, "multiprocessing.process.BaseProcess"] = {}


def _kill_all_workers() -> None:
    for proc in list(_live.values()):
        _kill(proc)


atexit.register(_kill_all_workers)


def live_workers() -> list[int]:
    """Process ids of workers this process started and has not reaped yet (tests check it is empty)."""
    return [pid for pid, proc in _live.items() if proc.exitcode is None]


def _kill(proc) -> None:
    try:
        if proc.exitcode is None:
            proc.kill()
        proc.join(5)
    except (OSError, ValueError, AssertionError):  # already reaped or closed
        pass
    _live.pop(proc.pid, None)


def exit_reason(exitcode: Optional[int]) -> str:
    """Words for how a worker ended: ``"crashed with signal SIGSEGV"``, ``"exited with status 3"``..."""
    if exitcode is None:
        return "did not exit"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        if -exitcode == signal.SIGKILL:
            return "was killed by SIGKILL (by the system's out-of-memory killer?)"
        return f"crashed with signal {name}"
    return f"exited with status {exitcode}"


_worker_memory_limit: Optional[int] = None  # set in a worker: the limit it runs under


def describe_exception(exc: BaseException) -> str:
    """A candidate's exception in one line; running out of memory is called so."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    lowered = str(exc).lower()
    if isinstance(exc, MemoryError) or any(s in lowered for s in ("bad_alloc", "failed to allocate",
                                                                   "out of memory", "cannot allocate memory")):
        limit = f" (worker limited to {_worker_memory_limit / 2**30:.1f} GiB more)" if _worker_memory_limit else ""
        return f"out of memory{limit}: {type(exc).__name__}" + (f": {text}" if text else "")
    return f"raised {type(exc).__name__}" + (f": {text}" if text else "")


def run_in_process(job: Job, keys: Sequence[str], on_result: Optional[Callable[[str, dict], None]] = None) -> Outcome:
    """Run ``job`` here, unprotected (no time limit, a crash is ours). Same results as isolated."""
    outcome = Outcome()

    def record(key: str, result: dict) -> None:
        outcome.results[key] = result
        if on_result is not None:
            on_result(key, result)

    job(list(keys), _InProcessChannel(keys, record))
    missing = outcome.missing(keys)
    if missing:
        outcome.error = f"the job reported no result for {', '.join(missing)}"
    return outcome


def run_isolated(job: Job, keys: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT,
                 memory_limit: Optional[int] = None, stall_timeout: Optional[float] = None,
                 on_result: Optional[Callable[[str, dict], None]] = None,
                 on_failure: Optional[Callable[[str, str], None]] = None) -> Outcome:
    """Run ``job(keys, channel)`` in forked workers until every key has a result or a failure.

    ``timeout`` bounds each stretch of candidate code; ``memory_limit`` (bytes, default
    :func:`default_memory_limit`, 0 for none) the address space a worker may add to what it
    inherits; ``stall_timeout`` (default ``max(60, 6 * timeout)``) the time a worker may spend
    outside candidate code. ``on_result(key, result)`` and ``on_failure(key, reason)`` are called
    in this process as soon as each is known (to persist progress).
    """
    keys = list(dict.fromkeys(keys))
    memory_limit = default_memory_limit() if memory_limit is None else memory_limit
    stall_timeout = stall_timeout if stall_timeout is not None else max(MIN_STALL_TIMEOUT, 6 * timeout)
    outcome = Outcome()
    idle_deaths = 0
    while True:
        pending = outcome.missing(keys)
        if not pending or outcome.error:
            return outcome
        try:
            worker = _Worker(job, pending, memory_limit)
        except (OSError, AssertionError, ValueError) as exc:  # no fork here (resources, daemonic parent...)
            if outcome.workers == 0:
                raise WorkerStartError(f"cannot start a profiling worker: {exc}") from None
            outcome.error = f"cannot start a profiling worker: {exc}"
            return outcome
        outcome.workers += 1
        try:
            died, reason = worker.watch(outcome, timeout, stall_timeout, on_result, on_failure)
        finally:
            worker.close()
        if died and not outcome.error:
            idle_deaths += 1
            if idle_deaths >= 2:
                outcome.error = f"the profiling worker {reason} twice outside candidate code"
            else:
                log.warning("the profiling worker %s outside candidate code; retrying once", reason)


class WorkerStartError(RuntimeError):
    """Not even one worker process could be started (the caller may run the job in-process)."""


class _Worker:
    """One forked worker process running ``job`` over ``keys``."""

    def __init__(self, job: Job, keys: list[str], memory_limit: int):
        ctx = multiprocessing.get_context("fork")
        self.keys = keys
        self.state = _SharedState()
        self.conn, child_conn = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=_worker_main, args=(job, keys, child_conn, self.state, memory_limit, os.getpid()),
                                name="fastrun-worker", daemon=True)
        sys.stdout.flush()
        sys.stderr.flush()
        gc.freeze()  # the worker must not collect (and finalize) the parent's garbage, nor copy its pages
        try:
            self.proc.start()
        except BaseException:
            child_conn.close()
            self.conn.close()
            self.state.close()
            raise
        finally:
            gc.unfreeze()
        _live[self.proc.pid] = self.proc
        child_conn.close()

    def watch(self, outcome: Outcome, timeout: float, stall_timeout: float,
              on_result, on_failure) -> tuple[bool, str]:
        """Collect messages until the worker is done, or killed, or dies.

        Returns ``(died outside candidate code, how)``; results and failures go into ``outcome``.
        """

        def fail(key: str, reason: str) -> None:
            outcome.failures[key] = reason
            if on_failure is not None:
                on_failure(key, reason)

        while True:
            try:
                ready = self.conn.poll(POLL_SECONDS)
            except (EOFError, OSError):
                ready = True
            if ready:
                try:
                    msg = json.loads(self.conn.recv_bytes())
                except (EOFError, OSError, ValueError):
                    break  # the worker is gone (or sent garbage while dying)
                if not isinstance(msg, dict):
                    continue
                key = msg.get("key")
                if "result" in msg and key in self.keys and key not in outcome.failures:
                    outcome.results[key] = msg["result"]
                    if on_result is not None:
                        on_result(key, msg["result"])
                elif "crash" in msg and key in self.keys:
                    fail(key, str(msg["crash"]))
                elif "error" in msg:
                    outcome.error = str(msg["error"])
                elif "done" in msg:
                    outcome.peak_rss = max(outcome.peak_rss, int(msg.get("peak_rss", 0)))
                    missing = [k for k in self.keys if k not in outcome.results and k not in outcome.failures]
                    if missing:
                        outcome.error = f"the job reported no result for {', '.join(missing)}"
                    return False, ""
                continue
            index, since = self.state.get()
            now = time.monotonic()
            if index >= 0 and now - since > timeout:
                self.kill()
                fail(self.keys[index], f"timed out after {timeout:g} s")
                outcome.timed_out.add(self.keys[index])
                return False, ""
            if index < 0 and now - since > stall_timeout:
                self.kill()
                return True, f"made no progress for {stall_timeout:g} s"
            if not self.proc.is_alive():
                break
        # the worker ended without saying "done"
        self.proc.join(5)
        index, _ = self.state.get()
        reason = exit_reason(self.proc.exitcode)
        if outcome.error:
            return False, ""
        if 0 <= index < len(self.keys):
            if self.keys[index] not in outcome.failures:
                fail(self.keys[index], reason)
            return False, ""
        return True, reason

    def kill(self) -> None:
        _kill(self.proc)

    def close(self) -> None:
        _kill(self.proc)
        try:
            self.proc.close()
        except ValueError:
            pass
        self.conn.close()
        self.state.close()


# ------------------------------------------------------------------------------- inside the worker

PR_SET_PDEATHSIG = 1


def _worker_main(job: Job, keys: list[str], conn, state: _SharedState, memory_limit: int, parent: int) -> None:
    global _worker_memory_limit
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os._exit(1)
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crashing candidate leaves no core file
    except (ValueError, OSError):
        pass
    if faulthandler.is_enabled() and not (os.environ.get("PYTHONFAULTHANDLER") or "faulthandler" in sys._xoptions):
        faulthandler.disable()  # enabled by a host program (pytest): the parent reports the crash in one line
    if memory_limit:
        _worker_memory_limit = memory_limit
        _limit_address_space(memory_limit)
    channel = _WorkerChannel(keys, conn, state)
    code = 0
    try:
        job(keys, channel)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        channel._message({"done": True, "peak_rss": peak})
    except BaseException as exc:  # noqa: BLE001 - whatever happens, tell the parent in words
        index, _ = state.get()
        try:
            if 0 <= index < len(keys):
                channel._message({"key": keys[index], "crash": describe_exception(exc)})
            else:
                tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
                channel._message({"error": f"{describe_exception(exc)} (in the profiler, not a candidate)",
                                  "traceback": "".join(tb)[-4000:]})
        except (OSError, ValueError):
            pass
        code = 1
    try:
        conn.close()
    finally:
        os._exit(code)  # no atexit handlers, no finalizers of objects inherited from the parent


def _limit_address_space(extra: int) -> None:
    try:
        with open("/proc/self/statm") as f:
            size = int(f.read().split()[0]) * mmap.PAGESIZE
    except (OSError, ValueError, IndexError):
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = size + extra
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    try:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ValueError, OSError):
        pass
