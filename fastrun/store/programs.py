"""The program store: compiled plans on disk, so that serving a cached plan skips compiling.

Loading a model through the graph (parse, check, fold constants, infer shapes) and compiling
its plan (build every fragment, transform weights, merge segments) cost 2-4x onnxruntime's own
session creation. A stored program is the :class:`~fastrun.runtime.recipe.Recipe` of a plan - segment
models, their weights, host kernels as implementation + spec + constants - so a session whose
plan has one only hashes the model file, reads the recipe and creates onnxruntime sessions.

Layout under the cache root (plain files: no pickle, nothing here can execute code)::

    programs/<fingerprint>/<model sha256>/model.json             declared inputs and outputs
    programs/<fingerprint>/<model sha256>/<shapes>.<digest>/manifest.json
    programs/<fingerprint>/<model sha256>/<shapes>.<digest>/data.bin

``digest`` hashes the plan, the software versions and fastrun's own source code, so a changed
plan, an upgrade or an edited implementation never serves an old program: it is simply not
found (and ``fastrun cache verify --fix`` removes it). An entry is written to a temporary
directory and renamed into place, so readers never see half of one and concurrent writers of the
same program both succeed; it is never modified in place, so a mapped ``data.bin`` stays valid.
``data.bin`` carries a CRC-32 that is checked on every load (4 GB/s): a damaged entry is
reported and ignored, and the plan is compiled from the model instead.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import mmap
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from fastrun.system import ortutil
from fastrun.store.keys import shapes_text, software_tag
from fastrun.runtime.recipe import HostRecipe, ModelRecipe, Recipe, SegmentRecipe
from fastrun.runtime.plan import Plan
from fastrun.ops.registry import OpSpec
from fastrun.shapes import as_shape

log = logging.getLogger(__name__)

FORMAT = "fastrun-program"
VERSION = 1
MANIFEST, DATA, INTERFACE = "manifest.json", "data.bin", "model.json"
ALIGN = 64  # every array starts on a cache line


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

    # -- paths
    def _model_dir(self, fingerprint: str, model_hash: str) -> Path:
        return self.directory / fingerprint / model_hash

    def path_for(self, plan: Plan, digest: Optional[str] = None) -> Path:
        shapes = shapes_text(plan.input_shapes)
        shapes_id = hashlib.sha256(shapes.encode()).hexdigest()[:12]
        return self._model_dir(plan.fingerprint, plan.model_hash) / f"{shapes_id}.{digest or plan_digest(plan)}"

    # -- interface
    def interface(self, fingerprint: str, model_hash: str) -> Optional[dict]:
        """The declared inputs/outputs stored with a model's programs (None: none stored)."""
        path = self._model_dir(fingerprint, model_hash) / INTERFACE
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
            if value.get("format") == FORMAT and value.get("version") == VERSION and \
                    isinstance(value.get("inputs"), list) and isinstance(value.get("outputs"), list):
                return value
            log.warning("ignoring %s: not a model interface of this fastrun", path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("ignoring %s: %s", path, exc)
        return None

    # -- write
    def save(self, plan: Plan, recipe: Recipe, interface: dict) -> bool:
        """Store the program of ``plan`` (False when the store is read-only or the write failed)."""
        if not self.writable:
            return False
        target = self.path_for(plan)
        if (target / MANIFEST).exists():
            return True
        tmp = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
            manifest = _write(recipe, tmp / DATA)
            manifest.update(format=FORMAT, version=VERSION, fingerprint=plan.fingerprint, model_hash=plan.model_hash,
                            shapes=shapes_text(plan.input_shapes),
                            digest=plan_digest(plan), software=software_tag(), code=code_digest())
            (tmp / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
            try:
                os.rename(tmp, target)
            except OSError:  # another process stored the same program meanwhile
                if not (target / MANIFEST).exists():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
            tmp = None
            self._write_interface(target.parent, interface)
            self._drop_older(target)
            return True
        except OSError as exc:
            log.debug("program not stored in %s: %s", self.directory, exc)
            return False
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)

    @staticmethod
    def _write_interface(model_dir: Path, interface: dict) -> None:
        path = model_dir / INTERFACE
        if path.exists():
            return
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=model_dir)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(dict(interface, format=FORMAT, version=VERSION), f)
        os.replace(tmp, path)

    @staticmethod
    def _drop_older(target: Path) -> None:
        """Programs of earlier plans for the same shapes can never be served again."""
        shapes_id = target.name.split(".")[0]
        for other in target.parent.glob(f"{shapes_id}.*"):
            if other != target:
                shutil.rmtree(other, ignore_errors=True)

    # -- read
    def has(self, plan: Plan) -> bool:
        return (self.path_for(plan) / MANIFEST).exists()

    def load(self, plan: Plan) -> Optional[Recipe]:
        """The stored program of ``plan``, or None (not stored, stale or damaged: then logged)."""
        digest = plan_digest(plan)
        path = self.path_for(plan, digest)
        try:
            manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring the stored program %s: unreadable manifest (%s)", path, exc)
            return None
        try:
            why = _identity_problem(manifest, plan, digest)
            if why:
                log.warning("ignoring the stored program %s: %s", path, why)
                return None
            return _read(manifest, _load_data(path / DATA, manifest))
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            log.warning("ignoring the stored program %s: %s", path, exc)
            return None

    def entries(self, fingerprint: str = "", check_data: bool = False) -> Iterator[StoredProgram]:
        """Every program directory (of one fingerprint); ``check_data`` reads and checksums its data."""
        base = self.directory / fingerprint if fingerprint else self.directory
        for manifest_path in sorted(base.glob("**/" + MANIFEST)):
            path = manifest_path.parent
            rel = path.relative_to(self.directory).parts
            if len(rel) != 3 or rel[2].startswith(".tmp-"):
                continue
            entry = StoredProgram(path, rel[0], rel[1], "", _size(path))
            try:
                manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
                entry.shapes = str(manifest.get("shapes", ""))
                if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
                    entry.problem = f"not a version-{VERSION} fastrun program"
                elif check_data:
                    _load_data(path / DATA, manifest)
            except (OSError, ValueError, AttributeError) as exc:
                entry.problem = str(exc)
            yield entry

    def stale_reason(self, entry: StoredProgram, plan: Optional[Plan]) -> str:
        """Why a readable program would never be served, given the cached plan of its key ("" if it would be)."""
        if plan is None:
            return "no cached plan for it"
        if self.path_for(plan) != entry.path:
            return "made for an earlier plan or by other software (fastrun, onnxruntime or fastrun's code changed)"
        return ""

    def remove(self, path: Path) -> bool:
        try:
            shutil.rmtree(path)
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
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


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
                              "threads": p.threads})
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
    The mapping is private (copy-on-write): nothing written through it reaches the file."""
    size = int(manifest["bytes"])
    with open(path, "rb") as f:
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


def _read(manifest: dict, data: np.ndarray) -> Recipe:
    def array(ref: dict) -> np.ndarray:
        dtype = np.dtype(ref["dtype"])
        shape = as_shape(ref["shape"])
        start = int(ref["offset"])
        end = start + dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        if not 0 <= start <= end <= len(data) or dtype.hasobject:
            raise ValueError("an array reference points outside the data")
        return data[start:end].view(dtype).reshape(shape)

    parts: list = []
    for p in manifest["parts"]:
        if p["kind"] == "segment":
            parts.append(SegmentRecipe(list(p["inputs"]), list(p["outputs"]), array(p["model"]).tobytes(),
                                       {k: array(v) for k, v in p["weights"].items()}, int(p["steps"]),
                                       str(p["label"]), int(p["threads"]), _level(p["level"])))
        elif p["kind"] == "host":
            parts.append(HostRecipe(str(p["name"]), str(p["impl"]), OpSpec.from_json(p["spec"]),
                                    {int(i): array(v) for i, v in p["consts"].items()},
                                    list(p["inputs"]), str(p["output"]), int(p["threads"])))
        elif p["kind"] == "model":
            parts.append(ModelRecipe(str(p["engine"]), list(p["inputs"]), list(p["outputs"]), int(p["threads"])))
        else:
            raise ValueError(f"unknown part kind {p['kind']!r}")
    return Recipe(parts, {k: array(v) for k, v in manifest["constants"].items()}, dict(manifest["outputs"]),
                  int(manifest["reorders"]))
