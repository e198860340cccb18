"""Reading and deleting files named by a cache, a bundle or a program: every byte is untrusted.

A cache directory may come from elsewhere (a copied image layer, an imported bundle, a shared
volume). Whatever it says, fastrun must only read and delete regular files inside it, never block
on a FIFO or a device, never read more than a bounded size, and never recurse without bound on
its JSON. Everything here fails with :class:`UntrustedDataError` (a ``ValueError``), which the
stores turn into "ignore this entry and compile from the model".
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import stat
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

# Bounds on what a cache may make fastrun read: far above anything fastrun writes (a ResNet-50
# plan is ~0.3 MB of JSON nested 6 deep), far below what hurts.
MAX_JSON_BYTES = 64 << 20
MAX_JSON_DEPTH = 64

# Never follow a link, never block on a FIFO or device, never leak into a child process.
OPEN_FLAGS = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


class UntrustedDataError(ValueError):
    """A file or value from a cache that fastrun refuses to use."""


def is_count(value: Any) -> bool:
    """A non-negative int that is not a bool: a size, offset or dimension as JSON may hold it."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def relative_name(name: Any) -> str:
    """``name`` if it is a relative path that stays below its directory, else raise.

    Refused: non-strings, empty names, absolute paths, ``..`` components, NUL bytes, backslashes.
    """
    if not isinstance(name, str) or not name or "\0" in name or "\\" in name:
        raise UntrustedDataError(f"invalid stored file name {name!r}")
    if os.path.isabs(name) or any(part in ("..", "") for part in name.split("/")):
        raise UntrustedDataError(f"stored file name {name!r} leaves its directory")
    return name


def component(name: Any) -> str:
    """``name`` if it is one plain path component (a fingerprint, a hash), else raise."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_+\-][A-Za-z0-9_.+\-]{0,127}", name):
        raise UntrustedDataError(f"{name!r} is not a valid stored name")
    return name


def inside(root: Path, name: str) -> Path:
    """``root / name`` after checking that no component below ``root`` is a symbolic link."""
    path = Path(root)
    for part in relative_name(name).split("/"):
        path = path / part
        try:
            if stat.S_ISLNK(os.lstat(path).st_mode):
                raise UntrustedDataError(f"{name!r} goes through a symbolic link")
        except FileNotFoundError:
            break
    return path


def directory_refusal(path: Union[str, os.PathLike]) -> str:
    """Why a store directory must be neither read nor written ("" if it may be, or is absent):
    a symbolic link (reads and writes would land wherever it points) or not a directory."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return ""
    except OSError as exc:
        return f"it cannot be examined ({exc.strerror})"
    return "it is a symbolic link" if stat.S_ISLNK(mode) else "" if stat.S_ISDIR(mode) else "it is not a directory"


def open_regular(path: Union[str, os.PathLike], max_bytes: Optional[int] = None) -> int:
    """A read-only descriptor of ``path`` if it is a regular file (not a link, FIFO or device)
    of at most ``max_bytes``; opening never blocks."""
    try:
        fd = os.open(path, os.O_RDONLY | OPEN_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK):
            raise UntrustedDataError(f"{Path(path).name} is a symbolic link") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UntrustedDataError(f"{Path(path).name} is not a regular file")
        if max_bytes is not None and st.st_size > max_bytes:
            raise UntrustedDataError(f"{Path(path).name} is {st.st_size} bytes, more than the {max_bytes} allowed")
        os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: Union[str, os.PathLike], max_bytes: int = MAX_JSON_BYTES) -> bytes:
    """The contents of a regular file of at most ``max_bytes`` (see :func:`open_regular`)."""
    fd = open_regular(path, max_bytes)
    with os.fdopen(fd, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise UntrustedDataError(f"{Path(path).name} grew past {max_bytes} bytes while being read")
    return data


def json_depth(data: Union[bytes, str]) -> int:
    """How deeply ``data``'s arrays and objects nest, counted without recursion (strings skipped)."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    codes = np.frombuffer(_STRING.sub(b"", raw), np.uint8)
    if not codes.size:
        return 0
    steps = (np.isin(codes, (ord("["), ord("{"))).astype(np.int32)
             - np.isin(codes, (ord("]"), ord("}"))).astype(np.int32))
    return int(np.cumsum(steps).max(initial=0))


def loads(data: Union[bytes, str], max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` bounded in size and nesting (raises :class:`UntrustedDataError`, a ValueError)."""
    if len(data) > max_bytes:
        raise UntrustedDataError(f"JSON of {len(data)} bytes, more than the {max_bytes} allowed")
    depth = json_depth(data)
    if depth > max_depth:
        raise UntrustedDataError(f"JSON nested {depth} deep, more than the {max_depth} allowed")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise UntrustedDataError(f"not JSON ({exc})") from None


def load_json(path: Union[str, os.PathLike], max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """A JSON file read by :func:`read_bytes` and parsed by :func:`loads`."""
    return loads(read_bytes(path, max_bytes), max_bytes, max_depth)


def remove_file(root: Path, name: str, prune_levels: int = 0) -> bool:
    """Delete the regular file (or link itself) ``root / name``, then up to ``prune_levels`` of
    its emptied parent directories, never ``root`` nor anything outside it. False if refused."""
    try:
        path = inside(root, name)
    except UntrustedDataError:
        return False
    with contextlib.suppress(OSError):
        if stat.S_ISDIR(os.lstat(path).st_mode):
            return False
        os.unlink(path)
    parent = path.parent
    for _ in range(prune_levels):
        if parent == Path(root) or Path(root) not in parent.parents:
            break
        try:
            parent.rmdir()
        except OSError:
            break
        parent = parent.parent
    return True
