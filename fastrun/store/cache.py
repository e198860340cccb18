"""Persistent stores: operator timings per op signature, plans per model and input shapes.

Both live in diskcache directories under one cache root and are keyed by the hardware
fingerprint. Values are JSON text and nothing else: :class:`JsonOnlyDisk` refuses to write or
read pickled keys and values, so a cache directory copied from elsewhere can never execute code.
A value that does not parse, or carries another schema version, is reported and ignored.

Serving opens the stores read-only (``writable=False``): plain read-only SQLite, no diskcache,
so nothing is ever written and a read-only directory (a container image layer) works as is.

Compiled programs (binary: segment models and transformed weights) live beside them in plain
files, see :mod:`fastrun.store.programs`.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import sqlite3
import stat
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional
from urllib.parse import quote

import diskcache
from diskcache.core import MODE_BINARY, MODE_PICKLE, MODE_RAW, MODE_TEXT


try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: profiling runs are not serialized
    fcntl = None

from fastrun._version import SCHEMA
from fastrun.store import keys, untrusted
from fastrun.store.keys import default_cache_dir
from fastrun.store.programs import ProgramStore

log = logging.getLogger(__name__)

DB_NAME = "cache.db"
SQLITE_FILES = (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm")
LOCK_NAME = "profile.lock"
# Settings rows diskcache writes; it applies any other row of a database it opens (as a pragma,
# a Disk argument or an attribute of the cache), so a database carrying one is refused.
KNOWN_SETTINGS = frozenset(diskcache.DEFAULT_SETTINGS) | frozenset(diskcache.core.METADATA)


class CacheEntryError(Exception):
    """A cache row that is not fastrun's JSON (pickled, corrupt, foreign)."""


class JsonOnlyDisk(diskcache.Disk):
    """diskcache serialization limited to str keys and str (JSON) values."""

    def put(self, key):
        if type(key) is not str:
            raise TypeError("fastrun cache keys are str")
        return super().put(key)

    def get(self, key, raw):
        if not raw:
            raise CacheEntryError("refusing a pickled cache key")
        return super().get(key, raw)

    def store(self, value, read, key=diskcache.core.UNKNOWN):
        if type(value) is not str:
            raise TypeError("fastrun cache values are JSON text")
        return super().store(value, read, key)

    def fetch(self, mode, filename, value, read):
        if mode == MODE_PICKLE:
            raise CacheEntryError("refusing a pickled cache value")
        if mode in (MODE_TEXT, MODE_BINARY):
            return read_value_file(Path(self._directory), filename, text=mode == MODE_TEXT)
        return super().fetch(mode, filename, value, read)

    def remove(self, file_path):
        """Delete a value file (and its emptied sub-directories), never anything outside the store."""
        if not untrusted.remove_file(Path(self._directory), file_path, prune_levels=2):
            log.warning("not deleting %r: the cache row names a file outside %s", file_path, self._directory)


def read_value_file(directory: Path, filename: Any, text: bool = True) -> Any:
    """A value stored in its own file: a bounded regular file inside the store, or CacheEntryError."""
    try:
        data = untrusted.read_bytes(untrusted.inside(directory, filename), untrusted.MAX_JSON_BYTES)
        return data.decode("utf-8") if text else data
    except (untrusted.UntrustedDataError, UnicodeDecodeError) as exc:
        raise CacheEntryError(str(exc)) from None


@dataclass
class Entry:
    """One row of a store as found on disk: its decoded value, or why it cannot be used."""

    rowid: int
    key: Optional[str]          # None when the row's key is not text (a pickled key)
    value: Optional[dict]
    problem: str = ""           # "" when ``value`` is usable


def refusal(directory: Path, settings: bool = True) -> str:
    """Why a store directory from elsewhere must be neither read nor written ("" if it may be).

    Refused: the directory is a symbolic link or not a directory (fastrun would read and write
    wherever it points); a SQLite file of it is not a regular file (a link out, a FIFO); with
    ``settings``, its database carries Settings rows diskcache does not write.
    """
    why = untrusted.directory_refusal(directory)
    if why or not directory.is_dir():
        return why
    for name in SQLITE_FILES:
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISREG(os.lstat(directory / name).st_mode):
                return f"its {name} is not a regular file"
    foreign = _foreign_settings(directory / DB_NAME) if settings else []
    return f"its database carries settings fastrun never writes ({', '.join(foreign)})" if foreign else ""


def _foreign_settings(db: Path) -> list[str]:
    """Settings keys of ``db`` that diskcache does not write (none when it cannot be read: opening it fails then)."""
    if not db.is_file():
        return []
    try:
        con = sqlite3.connect(f"file:{quote(str(db))}?mode=ro", uri=True, timeout=30)
        try:
            rows = con.execute("SELECT key FROM Settings").fetchall()
        finally:
            con.close()
    except sqlite3.Error:
        return []
    return sorted(repr(k) for (k,) in rows if k not in KNOWN_SETTINGS)[:5]


def _decode(text: Any) -> tuple[Optional[dict], str]:
    if not isinstance(text, (str, bytes)):
        return None, "not JSON"
    try:
        value = untrusted.loads(text)
    except ValueError as exc:
        return None, str(exc)
    if not isinstance(value, dict) or value.get("schema") != SCHEMA:
        schema = value.get("schema") if isinstance(value, dict) else "?"
        return None, f"schema {schema} is not {SCHEMA}"
    return value, ""


class Store:
    """One JSON key-value store (a diskcache directory). Tolerates read-only directories.

    ``writable=False`` never opens diskcache (whose start-up writes settings and creates tables):
    reads go through a read-only SQLite connection that also sees rows still in the write-ahead
    log of a writer that did not close cleanly.
    """

    def __init__(self, directory: os.PathLike, writable: bool = True):
        self.directory = Path(directory)
        self._cache: Optional[diskcache.Cache] = None
        self._ro: Optional[sqlite3.Connection] = None
        self._ro_lock = threading.Lock()
        self._tmp: Optional[tempfile.TemporaryDirectory] = None
        self._reported: set[str] = set()
        self.refused = ""           # why the store is neither read nor written (:func:`refusal`)
        self._open(writable)

    def _open(self, writable: bool) -> None:
        self.refused = refusal(self.directory, settings=writable)
        if self.refused:
            log.warning("cache %s is refused (%s); running without it", self.directory, self.refused)
            return
        if not writable:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            # diskcache's own settings passed explicitly: the database's rows never choose them
            self._cache = diskcache.Cache(str(self.directory), disk=JsonOnlyDisk, timeout=30,
                                          **diskcache.DEFAULT_SETTINGS)
        except (OSError, sqlite3.Error) as exc:
            if (self.directory / DB_NAME).exists():
                log.debug("cache %s opened read-only (%s)", self.directory, exc)
            else:
                log.warning("cache %s is unusable (%s); running without it", self.directory, exc)

    def discard(self) -> bool:
        """Remove a refused store - the link itself, or the directory with everything in it, no link
        followed - and open a new empty one (what ``cache verify --fix`` and ``cache clear`` do)."""
        self.close()
        try:
            if stat.S_ISDIR(os.lstat(self.directory).st_mode):
                shutil.rmtree(self.directory)
            else:
                os.unlink(self.directory)
        except OSError as exc:
            log.debug("cannot remove %s: %s", self.directory, exc)
            return False
        self._open(writable=True)
        return not self.refused

    @property
    def read_only(self) -> bool:
        return self._cache is None

    # -- reading
    def get(self, key: str) -> Optional[dict]:
        value, problem = self.read(key)
        if problem:
            self._report(key, problem)
        return value

    def read(self, key: str) -> tuple[Optional[dict], str]:
        """The value under ``key`` (None if absent or unusable) and what is wrong with it ("" if nothing)."""
        if self._cache is not None:
            try:
                raw = self._cache.get(key, default=None, retry=True)
            except (CacheEntryError, OSError, sqlite3.Error, UnicodeDecodeError, TypeError) as exc:
                return None, f"unreadable entry ({exc})"
            return (None, "") if raw is None else _decode(raw)
        rows = self._query("SELECT rowid, key, raw, mode, filename, value FROM Cache WHERE key = ?", (key,))
        for row in rows:
            if row[2]:  # a text key, not a pickled one that happens to compare equal
                entry = self._row_entry(row)
                return entry.value, entry.problem
        return None, ""

    def entries(self, prefix: str = "") -> Iterator[Entry]:
        """Every row (under ``prefix``), decoded or with its problem: what listing and verifying read."""
        for row in self._query("SELECT rowid, key, raw, mode, filename, value FROM Cache"):
            key = row[1] if row[2] and isinstance(row[1], str) else None
            if prefix and (key is None or not key.startswith(prefix)):
                continue
            yield self._row_entry(row)

    def keys(self, prefix: str = "") -> list[str]:
        rows = self._query("SELECT key, raw FROM Cache")
        return [k for k, raw in rows if raw and isinstance(k, str) and k.startswith(prefix)]

    def _row_entry(self, row: tuple) -> Entry:
        rowid, key, raw, mode, filename, value = row
        if not raw or not isinstance(key, str):
            return Entry(rowid, None, None, "refusing a pickled key")
        if mode == MODE_PICKLE:
            return Entry(rowid, key, None, "refusing a pickled value")
        if mode == MODE_TEXT and filename:
            try:
                text = read_value_file(self.directory, filename)
            except (OSError, CacheEntryError) as exc:
                return Entry(rowid, key, None, f"value file unreadable ({exc})")
        elif mode == MODE_RAW and isinstance(value, str):
            text = value
        else:
            return Entry(rowid, key, None, "not JSON text")
        decoded, problem = _decode(text)
        return Entry(rowid, key, decoded, problem)

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._ro_lock:
            con = self._connection()
            if con is None:
                return []
            try:
                return con.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                self._report("<db>", f"cache database unreadable ({exc})")
                return []

    def _connection(self) -> Optional[sqlite3.Connection]:
        """A read-only SQLite connection to the store, opened on first use (None: no database)."""
        if self._ro is not None:
            return self._ro
        if self.refused:
            return None
        db = self.directory / DB_NAME
        if not db.is_file():
            return None
        try:
            con = sqlite3.connect(f"file:{quote(str(db))}?mode=ro", uri=True, timeout=30, check_same_thread=False)
            con.execute("SELECT 1 FROM Cache LIMIT 1").fetchall()
        except sqlite3.Error as exc:
            con = self._fallback_connection(db, exc)
        self._ro = con
        return con

    def _fallback_connection(self, db: Path, exc: Exception) -> Optional[sqlite3.Connection]:
        """Read a database that cannot be opened in place (read-only directory without SQLite's
        ``-shm`` file): as immutable, or from a private copy when rows are still in its ``-wal``."""
        wal = db.with_name(db.name + "-wal")
        try:
            if wal.is_file() and wal.stat().st_size > 0:
                self._tmp = tempfile.TemporaryDirectory(prefix="fastrun-cache-")
                copy = Path(self._tmp.name) / DB_NAME
                shutil.copyfile(db, copy)
                shutil.copyfile(wal, copy.with_name(copy.name + "-wal"))
                con = sqlite3.connect(str(copy), timeout=30, check_same_thread=False)
            else:
                con = sqlite3.connect(f"file:{quote(str(db))}?mode=ro&immutable=1", uri=True,
                                      check_same_thread=False)
            con.execute("SELECT 1 FROM Cache LIMIT 1").fetchall()
            log.debug("cache %s read through a fallback connection (%s)", self.directory, exc)
            return con
        except (OSError, sqlite3.Error) as exc2:
            self._report("<db>", f"cache database unreadable ({exc2})")
            return None

    def _report(self, key: str, why: str) -> None:
        if key not in self._reported:
            self._reported.add(key)
            log.warning("ignoring cache entry %s in %s: %s", key, self.directory, why)

    # -- writing
    def set(self, key: str, value: dict) -> bool:
        """Store ``value`` (a JSON-able dict); False (and a debug log) if the cache is read-only."""
        if self._cache is None:
            log.debug("cache %s is read-only: %s not persisted", self.directory, key)
            return False
        text = json.dumps({**value, "schema": SCHEMA}, sort_keys=True)
        try:
            self._cache.set(key, text, retry=True)
            return True
        except (OSError, sqlite3.Error) as exc:
            log.debug("cache write of %s failed (%s); continuing without persisting", key, exc)
            return False

    def delete(self, key: str) -> bool:
        if self._cache is None:
            return False
        try:
            return bool(self._cache.delete(key, retry=True))
        except (OSError, sqlite3.Error) as exc:
            log.debug("cache delete of %s failed: %s", key, exc)
            return False

    def delete_entry(self, entry: Entry) -> bool:
        """Remove a row found by :meth:`entries`, even one whose key diskcache cannot read."""
        if entry.key is not None:
            return self.delete(entry.key)
        if self._cache is None:
            return False
        try:
            con = sqlite3.connect(str(self.directory / DB_NAME), timeout=30)
            try:
                with con:
                    row = con.execute("SELECT filename FROM Cache WHERE rowid = ?", (entry.rowid,)).fetchone()
                    con.execute("DELETE FROM Cache WHERE rowid = ?", (entry.rowid,))
            finally:
                con.close()
        except sqlite3.Error as exc:
            log.debug("cache delete of row %s failed: %s", entry.rowid, exc)
            return False
        if row and row[0] and not untrusted.remove_file(self.directory, row[0], prune_levels=2):
            log.warning("not deleting %r: the cache row names a file outside %s", row[0], self.directory)
        return True

    def clear(self, prefix: str = "") -> int:
        """Delete every entry (under ``prefix``); how many went."""
        if self._cache is None:
            return 0
        if not prefix:
            return int(self._cache.clear(retry=True))
        return sum(self.delete(k) for k in self.keys(prefix))

    def close(self) -> None:
        """Close connections; a writer's close checkpoints SQLite's log into ``cache.db`` (copyable)."""
        with self._ro_lock:
            if self._ro is not None:
                self._ro.close()
                self._ro = None
        if self._cache is not None:
            self._cache.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


_process_locks: dict[str, threading.RLock] = {}
_process_locks_guard = threading.Lock()
_held: dict[str, tuple[int, Any]] = {}  # root -> (depth, locked file) of the thread holding it


@contextlib.contextmanager
def profiling_lock(root: os.PathLike) -> Iterator[bool]:
    """The profiling lock of the cache at ``root``: see :meth:`Caches.profiling_lock`."""
    key = os.path.abspath(root)
    with _process_locks_guard:
        in_process = _process_locks.setdefault(key, threading.RLock())
    with in_process:
        depth, f = _held.get(key, (0, None))
        if depth == 0:
            f = _lock_file(Path(key))
        _held[key] = (depth + 1, f)
        try:
            yield f is not None
        finally:
            depth, f = _held.pop(key)
            if depth > 1:
                _held[key] = (depth - 1, f)
            elif f is not None:
                fcntl.flock(f, fcntl.LOCK_UN)
                f.close()


def _lock_file(root: Path) -> Any:
    """The open, ``flock``-ed lock file of ``root`` (None: no lock can be taken there)."""
    if fcntl is None:
        return None
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT | untrusted.OPEN_FLAGS, 0o644)
    except OSError as exc:  # ELOOP: a symbolic link, never followed
        (log.warning if exc.errno == errno.ELOOP else log.debug)("no profiling lock in %s: %s", root, exc)
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        log.warning("no profiling lock in %s: %s is not a regular file", root, LOCK_NAME)
        return None
    os.set_blocking(fd, True)
    f = os.fdopen(fd, "r+b")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.info("waiting for another fastrun process profiling with cache %s", root)
        fcntl.flock(f, fcntl.LOCK_EX)
    return f


class Caches:
    """The stores fastrun keeps under one cache root: timings, plans (JSON) and compiled programs."""

    def __init__(self, root: Optional[os.PathLike] = None, writable: bool = True):
        self.root = Path(root) if root is not None else default_cache_dir()
        self.timings = Store(self.root / "timings", writable)
        self.plans = Store(self.root / "plans", writable)
        self.programs = ProgramStore(self.root / "programs", writable)

    @property
    def read_only(self) -> bool:
        return self.timings.read_only or self.plans.read_only

    timing_key = staticmethod(keys.timing_key)
    plan_key = staticmethod(keys.plan_key)
    shapes_text = staticmethod(keys.shapes_text)
    fingerprint_of = staticmethod(keys.fingerprint_of)

    def profiling_lock(self) -> "contextlib.AbstractContextManager[bool]":
        """Hold the cache's profiling lock (yields False when it cannot be taken: read-only, not POSIX).

        Every writer of plans and timings - ``fastrun profile``, ``warmup``, ``policy="profile"`` -
        profiles under it: timings measured while another process competes for the cores are
        wrong, and a plan another process just made need not be made again. The lock is an
        ``flock`` (the kernel releases it if its holder dies), re-entrant within a process (a
        warm-up holding it calls the profiling that takes it again) and serializing its threads.
        """
        return profiling_lock(self.root)

    def close(self) -> None:
        self.timings.close()
        self.plans.close()
