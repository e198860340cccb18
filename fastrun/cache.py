"""Persistent stores: operator timings per op signature, plans per model and input shapes.

Both live in diskcache directories under one cache root and are keyed by the hardware
fingerprint. Values are JSON text and nothing else: :class:`JsonOnlyDisk` refuses to write or
read pickled keys and values, so a cache directory copied from elsewhere can never execute code.
A value that does not parse, or carries another schema version, is reported and ignored.
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
from pathlib import Path
from typing import Any, Iterator, Optional

import diskcache
from diskcache.core import MODE_PICKLE

log = logging.getLogger(__name__)

SCHEMA = 1
ENV_DIR = "FASTRUN_CACHE_DIR"


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
        return super().fetch(mode, filename, value, read)


def default_cache_dir() -> Path:
    """``$FASTRUN_CACHE_DIR``, else ``./cache`` in a fastrun checkout, else ``~/.cache/fastrun``."""
    env = os.environ.get(ENV_DIR)
    if env:
        return Path(env)
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "setup.cfg").exists() and (checkout / "cache").is_dir():
        return checkout / "cache"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastrun"


class Store:
    """One JSON key-value store (a diskcache directory). Tolerates read-only directories."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.read_only = False
        self._cache: Optional[diskcache.Cache] = None
        self._reported: set[str] = set()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._cache = diskcache.Cache(str(self.directory), disk=JsonOnlyDisk, timeout=30)
        except (OSError, sqlite3.Error) as exc:
            if (self.directory / "cache.db").exists():
                self.read_only = True
                log.debug("cache %s opened read-only (%s)", self.directory, exc)
            else:
                log.warning("cache %s is unusable (%s); running without it", self.directory, exc)
                self.read_only = True

    # -- reading
    def get(self, key: str) -> Optional[dict]:
        raw = self._get_raw(key)
        if raw is None:
            return None
        return self._decode(key, raw)

    def _get_raw(self, key: str) -> Optional[str]:
        if self._cache is not None:
            try:
                return self._cache.get(key, default=None, retry=True)
            except (CacheEntryError, OSError, sqlite3.Error, UnicodeDecodeError, TypeError) as exc:
                self._report(key, f"unreadable entry ({exc})")
                return None
        return self._read_only_get(key)

    def _read_only_get(self, key: str) -> Optional[str]:
        """Read straight from SQLite when diskcache cannot open the directory for writing."""
        db = self.directory / "cache.db"
        if not db.exists():
            return None
        try:
            con = sqlite3.connect(f"file:{db}?mode=ro&immutable=1", uri=True)
            try:
                row = con.execute("SELECT raw, mode, filename, value FROM Cache WHERE key = ?", (key,)).fetchone()
            finally:
                con.close()
        except sqlite3.Error as exc:
            self._report("<db>", f"cache database unreadable ({exc})")
            return None
        if row is None:
            return None
        raw, mode, filename, value = row
        if mode == MODE_PICKLE or not raw:
            self._report(key, "refusing a pickled entry")
            return None
        if filename:
            try:
                return (self.directory / filename).read_text(encoding="utf-8")
            except OSError:
                return None
        return value if isinstance(value, str) else None

    def _decode(self, key: str, raw: Any) -> Optional[dict]:
        try:
            value = json.loads(raw)
        except (TypeError, ValueError):
            self._report(key, "not JSON")
            return None
        if not isinstance(value, dict) or value.get("schema") != SCHEMA:
            self._report(key, f"schema {value.get('schema') if isinstance(value, dict) else '?'} is not {SCHEMA}")
            return None
        return value

    def _report(self, key: str, why: str) -> None:
        if key not in self._reported:
            self._reported.add(key)
            log.warning("ignoring cache entry %s in %s: %s", key, self.directory, why)

    def keys(self, prefix: str = "") -> Iterator[str]:
        if self._cache is None:
            return iter(())
        try:
            return iter([k for k in self._cache.iterkeys() if isinstance(k, str) and k.startswith(prefix)])
        except (CacheEntryError, sqlite3.Error) as exc:
            self._report("<keys>", str(exc))
            return iter(())

    # -- writing
    def set(self, key: str, value: dict) -> bool:
        """Store ``value`` (a JSON-able dict); False (and a debug log) if the cache is read-only."""
        if self._cache is None:
            return False
        text = json.dumps({**value, "schema": SCHEMA}, sort_keys=True)
        try:
            self._cache.set(key, text, retry=True)
            return True
        except (OSError, sqlite3.Error) as exc:
            log.debug("cache write of %s failed (%s); continuing without persisting", key, exc)
            return False

    def delete(self, key: str) -> None:
        if self._cache is not None:
            try:
                self._cache.delete(key, retry=True)
            except (OSError, sqlite3.Error) as exc:
                log.debug("cache delete of %s failed: %s", key, exc)

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()


class Caches:
    """The two stores fastrun keeps under one cache root."""

    def __init__(self, root: Optional[os.PathLike] = None):
        self.root = Path(root) if root is not None else default_cache_dir()
        self.timings = Store(self.root / "timings")
        self.plans = Store(self.root / "plans")

    @staticmethod
    def timing_key(fingerprint: str, spec_key: str, impl_id: str) -> str:
        return f"{fingerprint}/{spec_key}/{impl_id}"

    @staticmethod
    def plan_key(fingerprint: str, model_hash: str, shapes: dict[str, tuple[int, ...]]) -> str:
        shape_text = ",".join(f"{k}:{'x'.join(map(str, v))}" for k, v in sorted(shapes.items()))
        return f"{fingerprint}/{model_hash}/{shape_text}"

    def close(self) -> None:
        self.timings.close()
        self.plans.close()
