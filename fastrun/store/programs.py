"""The program store: compiled plans on disk, so that serving a cached plan skips compiling.

Loading a model through the graph (parse, check, fold constants, infer shapes) and compiling
its plan (build every fragment, transform weights, merge segments) cost 2-4x onnxruntime's own
session creation. A stored program is the :class:`~fastrun.runtime.recipe.Recipe` of a plan - segment
models, their weights, host kernels as implementation + spec + constants - so a session whose
plan has one only hashes the model file, reads the recipe and creates onnxruntime sessions.

Layout under the cache root (plain files: no pickle, nothing here can execute code)::

    programs/<fingerprint>/<model sha256>/<shapes>.<digest>/manifest.json
    programs/<fingerprint>/<model sha256>/<shapes>.<digest>/data.bin

Everything in a program is untrusted input (:mod:`fastrun.store.untrusted`): only regular files
inside the store are read, within the sizes the manifest declares; a segment may not reference
external data other than its own weights; thread counts are bounded by this machine; the
program's outputs must be the model's declared outputs, of their declared type. A program that
fails any of these is reported and ignored.

``digest`` hashes the plan, the software versions and fastrun's own source code, so a changed
plan, an upgrade or an edited implementation never serves an old program: it is simply not
found (and ``fastrun cache verify --fix`` removes it). An entry is written to a temporary
directory and renamed into place, so readers never see half of one and concurrent writers of the
same program both succeed; it is never modified in place, so a mapped ``data.bin`` stays valid.
``data.bin`` carries a CRC-32 that is checked on every load (4 GB/s): a damaged entry is
reported and ignored, and the plan is compiled from the model instead.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import mmap
import os
import shutil
import stat
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from fastrun.system import ortutil
from fastrun.store import programcheck, untrusted
from fastrun.store.keys import shapes_part, software_tag
from fastrun.runtime.recipe import HostRecipe, ModelRecipe, Recipe, SegmentRecipe
from fastrun.runtime.plan import Plan
from fastrun.system.precision import FP32
from fastrun.ops.registry import OpSpec

log = logging.getLogger(__name__)

FORMAT = "fastrun-program"
VERSION = 2
MANIFEST, DATA, INTERFACE = "manifest.json", "data.bin", "model.json"
ALIGN = 64  # every array starts on a cache line
TMP_PREFIX = ".tmp-"
MAX_MANIFEST_BYTES = 16 << 20
# A ``.tmp-*`` directory older than this is a write that died (a writer renames it within seconds).
STALE_TMP_SECONDS = 600


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """Hash of fastrun's source files: builders may change without a version bump (editable installs)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def plan_digest(plan: Plan) -> str:
    text = json.dumps(plan.to_json(), sort_keys=True) + software_tag() + code_digest() + str(VERSION)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@dataclass
class StoredProgram:
    """One program directory as ``fastrun cache`` sees it."""

    path: Path
    fingerprint: str
    model_hash: str
    shapes: str                 # "x:1x3x224x224" (plan key syntax), from the manifest
    bytes: int
    problem: str = ""           # "" if readable; else why not


class ProgramStore:
    """Compiled programs under ``<cache root>/programs``; ``writable=False`` never writes."""

    def __init__(self, directory: os.PathLike, writable: bool = True):
        self.directory = Path(directory)
        self.writable = writable

    @property
    def refused(self) -> str:
        """Why the store's directory is neither read nor written ("" if it may be)."""
        return untrusted.directory_refusal(self.directory)

    def discard(self) -> bool:
        """Remove a refused store's directory entry (the link itself, never its target)."""
        try:
            os.unlink(self.directory)
            return True
        except OSError as exc:
            log.debug("cannot remove %s: %s", self.directory, exc)
            return False

    # -- paths
    def _model_dir(self, fingerprint: str, model_hash: str) -> Path:
        return self.directory / untrusted.component(fingerprint) / untrusted.component(model_hash)

    def path_for(self, plan: Plan, digest: Optional[str] = None) -> Path:
        shapes_id = hashlib.sha256(_shapes_key(plan).encode()).hexdigest()[:12]
        return self._model_dir(plan.fingerprint, plan.model_hash) / f"{shapes_id}.{digest or plan_digest(plan)}"

    # -- write
    def save(self, plan: Plan, recipe: Recipe, interface: dict) -> bool:
        """Store the program of ``plan`` (False when the store is read-only or the write failed)."""
        if not self.writable:
            return False
        tmp = None
        try:
            target = self.path_for(plan)
            if self.refused:
                raise untrusted.UntrustedDataError(f"{self.directory}: {self.refused}")
            untrusted.inside(self.directory, "/".join(target.relative_to(self.directory).parts))  # no link on the way
            if (target / MANIFEST).exists():
                return True
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=target.parent))
            manifest = _write(recipe, tmp / DATA)
            manifest.update(format=FORMAT, version=VERSION, fingerprint=plan.fingerprint, model_hash=plan.model_hash,
                            shapes=_shapes_key(plan),
                            digest=plan_digest(plan), software=software_tag(), code=code_digest(),
                            interface={"inputs": interface["inputs"], "outputs": interface["outputs"]})
            (tmp / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
            try:
                os.rename(tmp, target)
            except OSError:  # another process stored the same program meanwhile
                if not (target / MANIFEST).exists():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
            tmp = None
            self._drop_older(target)
            return True
        except (OSError, untrusted.UntrustedDataError) as exc:
            log.debug("program not stored in %s: %s", self.directory, exc)
            return False
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)

    @staticmethod
    def _drop_older(target: Path) -> None:
        """Programs of earlier plans for the same shapes can never be served again."""
        shapes_id = target.name.split(".")[0]
        for other in target.parent.glob(f"{shapes_id}.*"):
            if other != target:
                shutil.rmtree(other, ignore_errors=True)

    # -- read
    def has(self, plan: Plan) -> bool:
        try:
            return (self.path_for(plan) / MANIFEST).exists()
        except ValueError:  # a plan naming no valid directory
            return False

    def load(self, plan: Plan, interface: Optional[dict] = None) -> Optional[Recipe]:
        """The stored program of ``plan``, or None (not stored, stale, damaged or refused: then logged).

        ``interface`` (:func:`fastrun.ir.modelinterface.declared` of the model) is what the program's
        outputs must be; the manifest's own copy must agree with it.
        """
        try:
            digest = plan_digest(plan)
            path = self.path_for(plan, digest)
            manifest = _read_manifest(self.directory, path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring the stored program of %s: %s", plan.model_name, exc)
            return None
        try:
            why = _identity_problem(manifest, plan, digest)
            if why:
                log.warning("ignoring the stored program %s: %s", path, why)
                return None
            return _read(manifest, _load_data(path / DATA, manifest), interface)
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            log.warning("ignoring the stored program %s: %s", path, exc)
            return None

    def entries(self, fingerprint: str = "", check_data: bool = False) -> Iterator[StoredProgram]:
        """Every program directory (of one fingerprint); ``check_data`` reads, checksums and checks it.

        Symbolic links and anything but directories at the three levels are reported, never followed.
        """
        for path, rel in self._walk(fingerprint):
            entry = StoredProgram(path, rel[0], rel[1], "", _size(path))
            if rel[2].startswith(TMP_PREFIX):
                continue
            try:
                if stat.S_ISLNK(os.lstat(path).st_mode) or not path.is_dir():
                    raise untrusted.UntrustedDataError("not a directory (a symbolic link or a file)")
                manifest = _read_manifest(self.directory, path)
                entry.shapes = str(manifest.get("shapes", ""))
                if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
                    entry.problem = f"not a version-{VERSION} fastrun program"
                elif check_data:
                    _read(manifest, _load_data(path / DATA, manifest), None)
            except FileNotFoundError:
                entry.problem = "no manifest"
            except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
                entry.problem = str(exc)
            yield entry

    def leftovers(self, min_age: float = STALE_TMP_SECONDS) -> Iterator[tuple[Path, float]]:
        """(path, age in seconds) of every ``.tmp-*`` left by a write that died, older than ``min_age``."""
        now = time.time()
        for path, rel in self._walk(""):
            if rel[2].startswith(TMP_PREFIX):
                with contextlib.suppress(OSError):
                    age = now - os.lstat(path).st_mtime
                    if age >= min_age:
                        yield path, age

    def _walk(self, fingerprint: str) -> Iterator[tuple[Path, tuple[str, str, str]]]:
        """(path, (fingerprint, model hash, name)) of every entry three levels down, no link followed."""
        def children(directory: Path) -> list[os.DirEntry]:
            try:
                if stat.S_ISLNK(os.lstat(directory).st_mode):
                    return []
                with os.scandir(directory) as it:
                    return sorted(it, key=lambda e: e.name)
            except OSError:
                return []

        for f in children(self.directory):
            if fingerprint and f.name != fingerprint or not f.is_dir(follow_symlinks=False):
                continue
            for m in children(Path(f.path)):
                if not m.is_dir(follow_symlinks=False):
                    continue
                for e in children(Path(m.path)):
                    if e.name != INTERFACE:
                        yield Path(e.path), (f.name, m.name, e.name)

    def stale_reason(self, entry: StoredProgram, plan: Optional[Plan]) -> str:
        """Why a readable program would never be served, given the cached plan of its key ("" if it would be)."""
        if plan is None:
            return "no cached plan for it"
        if self.path_for(plan) != entry.path:
            return "made for an earlier plan or by other software (fastrun, onnxruntime or fastrun's code changed)"
        return ""

    def remove(self, path: Path) -> bool:
        """Delete one entry three levels below the store (a link itself, never its target)."""
        path = Path(path)
        if len(path.relative_to(self.directory).parts) != 3:
            raise ValueError(f"{path} is not a program entry of {self.directory}")
        try:
            if stat.S_ISDIR(os.lstat(path).st_mode):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except OSError as exc:
            log.debug("cannot remove %s: %s", path, exc)
            return False
        for parent in (path.parent, path.parent.parent):  # empty model / fingerprint directories
            try:
                if not any(p.name != INTERFACE for p in parent.iterdir()):
                    shutil.rmtree(parent)
            except OSError:
                break
        return True

    def clear(self, fingerprint: str = "") -> int:
        if not self.writable:
            return 0
        gone = 0
        for entry in list(self.entries(fingerprint)):
            gone += self.remove(entry.path)
        return gone


def _size(path: Path) -> int:
    try:
        if stat.S_ISLNK(os.lstat(path).st_mode) or not path.is_dir():
            return 0
        with os.scandir(path) as it:
            return sum(e.stat(follow_symlinks=False).st_size for e in it if e.is_file(follow_symlinks=False))
    except OSError:
        return 0


def _shapes_key(plan: Plan) -> str:
    """The plan key's last part (shapes, exact mode, precision policy): the manifest's ``shapes``, by
    which ``fastrun cache verify`` finds the plan a program belongs to."""
    return shapes_part(plan.input_shapes, plan.exact, plan.precision_policy)


def _read_manifest(root: Path, path: Path) -> dict:
    """The manifest of the entry ``path`` of the store ``root``, read as untrusted JSON."""
    if stat.S_ISLNK(os.lstat(root).st_mode):
        raise untrusted.UntrustedDataError(f"{root} is a symbolic link")
    rel = "/".join(path.relative_to(root).parts + (MANIFEST,))
    manifest = untrusted.load_json(untrusted.inside(root, rel), MAX_MANIFEST_BYTES)
    if not isinstance(manifest, dict):
        raise untrusted.UntrustedDataError("the manifest is not an object")
    return manifest


def _identity_problem(manifest: dict, plan: Plan, digest: str) -> str:
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        return f"not a version-{VERSION} fastrun program"
    if manifest.get("digest") != digest or manifest.get("model_hash") != plan.model_hash:
        return "it was made for another plan"
    return ""


# ------------------------------------------------------------------------------ serialization

class _Blob:
    """Arrays appended to one file, each 64-byte aligned; refs are JSON."""

    def __init__(self, f):
        self.f, self.offset, self.crc = f, 0, 0

    def add(self, array: Any) -> dict:
        a = np.ascontiguousarray(array)
        pad = -self.offset % ALIGN
        self._put(b"\0" * pad)
        ref = {"offset": self.offset, "dtype": a.dtype.str, "shape": list(a.shape)}
        self._put(memoryview(a.reshape(-1)).cast("B"))
        return ref

    def _put(self, data) -> None:
        self.f.write(data)
        self.crc = zlib.crc32(data, self.crc)
        self.offset += len(data)


def _write(recipe: Recipe, path: Path) -> dict:
    with open(path, "wb") as f:
        blob = _Blob(f)
        parts = []
        for p in recipe.parts:
            if isinstance(p, SegmentRecipe):
                parts.append({"kind": "segment", "inputs": p.inputs, "outputs": p.outputs,
                              "model": blob.add(np.frombuffer(p.model, np.uint8)),
                              "weights": {k: blob.add(v) for k, v in p.weights.items()},
                              "steps": p.steps, "label": p.label, "threads": p.threads, "level": p.level})
            elif isinstance(p, ModelRecipe):
                parts.append({"kind": "model", "engine": p.engine, "inputs": p.inputs, "outputs": p.outputs,
                              "threads": p.threads, "precision": p.precision, "engine_version": p.engine_version,
                              "shapes": p.shapes, "blob": blob.add(np.frombuffer(p.blob, np.uint8))})
            else:
                parts.append({"kind": "host", "name": p.name, "impl": p.impl, "spec": p.spec.to_json(),
                              "consts": {str(i): blob.add(v) for i, v in p.consts.items()},
                              "inputs": p.inputs, "output": p.output, "threads": p.threads})
        constants = {k: blob.add(v) for k, v in recipe.constants.items()}
    return {"parts": parts, "constants": constants, "outputs": recipe.outputs, "reorders": recipe.reorders,
            "bytes": blob.offset, "crc32": blob.crc}


def _load_data(path: Path, manifest: dict) -> np.ndarray:
    """The data file, mapped rather than read: its pages stay in the page cache, shared by every
    process serving the program, and onnxruntime takes the weights from there without a copy.
    The mapping is private (copy-on-write): nothing written through it reaches the file.
    Only a regular file of exactly the declared size is mapped (never a FIFO, device or link)."""
    size = manifest["bytes"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise untrusted.UntrustedDataError(f"the manifest declares {size!r} bytes of data")
    fd = untrusted.open_regular(path, size)
    with os.fdopen(fd, "rb") as f:
        if os.fstat(f.fileno()).st_size != size:
            raise ValueError(f"{path.name} has the wrong size (damaged or truncated)")
        if size == 0:
            return np.empty(0, np.uint8)
        view = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    if zlib.crc32(view) != manifest["crc32"]:
        raise ValueError(f"{path.name} fails its checksum (damaged)")
    return np.frombuffer(view, np.uint8)


def _level(level) -> str:
    if level not in ortutil.LEVELS:
        raise ValueError(f"unknown onnxruntime optimization level {level!r}")
    return str(level)


def _names(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("a tensor name list is not a list of strings")
    return list(value)


class _Arrays:
    """Array references of a manifest resolved inside its data: numeric dtypes, exact bounds."""

    def __init__(self, data: np.ndarray):
        self.data = data

    def __call__(self, ref: dict) -> np.ndarray:
        dtype = np.dtype(str(ref["dtype"]))
        shape = tuple(ref["shape"])
        start = ref["offset"]
        if dtype.kind not in "biufc" or dtype.hasobject or not all(untrusted.is_count(d) for d in (start, *shape)):
            raise ValueError("an array reference is not a numeric array inside the data")
        end = start + dtype.itemsize * math.prod(shape)
        if end > len(self.data):
            raise ValueError("an array reference points outside the data")
        return self.data[start:end].view(dtype).reshape(shape)


def _read(manifest: dict, data: np.ndarray, interface: Optional[dict]) -> Recipe:
    """The recipe a manifest describes, every reference and number checked (ValueError if not)."""
    array = _Arrays(data)
    parts: list = []
    for p in manifest["parts"]:
        if p["kind"] == "segment":
            weights = {str(k): array(v) for k, v in p["weights"].items()}
            model = array(p["model"]).tobytes()
            programcheck.check_segment(model, weights)
            parts.append(SegmentRecipe(_names(p["inputs"]), _names(p["outputs"]), model, weights, int(p["steps"]),
                                       str(p["label"]), ortutil.bounded_threads(p["threads"]), _level(p["level"])))
        elif p["kind"] == "host":
            spec = OpSpec.from_json(p["spec"])
            consts = {int(i): array(v) for i, v in p["consts"].items()}
            programcheck.check_host(spec, consts)
            parts.append(HostRecipe(str(p["name"]), str(p["impl"]), spec, consts, _names(p["inputs"]),
                                    str(p["output"]), ortutil.bounded_threads(p["threads"])))
        elif p["kind"] == "model":
            parts.append(ModelRecipe(str(p["engine"]), _names(p["inputs"]), _names(p["outputs"]),
                                     ortutil.bounded_threads(p["threads"]),
                                     str(p.get("precision", FP32)), str(p.get("engine_version", "")),
                                     {k: list(v) for k, v in p.get("shapes", {}).items()},
                                     array(p["blob"]) if "blob" in p else b""))
        else:
            raise ValueError(f"unknown part kind {p['kind']!r}")
    recipe = Recipe(parts, {str(k): array(v) for k, v in manifest["constants"].items()},
                    {str(k): str(v) for k, v in manifest["outputs"].items()}, int(manifest["reorders"]))
    stored = manifest.get("interface")
    if interface is not None and _plain(stored) != _plain(interface):
        raise ValueError("it was made for a model declaring other inputs or outputs")
    programcheck.check_outputs(recipe, interface if interface is not None else stored)
    return recipe


def _plain(interface: Any) -> Any:
    """An interface as JSON would give it back (tuples as lists), for comparison."""
    return json.loads(json.dumps(interface)) if interface is not None else None
