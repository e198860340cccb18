"""Cache management (what ``fastrun cache`` runs): list, show, export and import, verify, clear.

A bundle is one JSON file holding every plan and timing of one fingerprint, keyed relative to
it: it moves a warm cache between machines of the same kind (or into a container image) without
copying diskcache's SQLite files. Compiled programs are not in it (binary, and derived from the
plans and models): ``fastrun warmup`` on the receiving side compiles and stores them. Importing it where the fingerprint differs is refused unless
forced, and then its entries keep their own fingerprint, so they serve only where it matches.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from fastrun.workflows import lookup
from fastrun.system import fingerprint as fp
from fastrun.ir import reader
from fastrun.ops import registry
from fastrun._version import SCHEMA
from fastrun.store import untrusted
from fastrun.store import cache as cache_store
from fastrun.store.cache import Caches, Store
from fastrun.store.keys import software_tag
from fastrun.errors import FastrunError
from fastrun.ir.reader import ModelSource
from fastrun.runtime.plan import Plan
from fastrun.workflows.warmup import find_models
from fastrun.ops import builtin  # noqa: F401  (registers the built-in implementations this module queries)

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "fastrun-cache-bundle"
BUNDLE_VERSION = 1
MAX_BUNDLE_BYTES = 1 << 30
STORES = ("plans", "timings")


@dataclass
class PlanInfo:
    """One cached plan as ``fastrun cache ls`` lists it."""

    key: str
    model_name: str = "?"
    model_hash: str = ""
    shapes: str = ""
    policy: str = ""
    runs: str = ""                  # what runs it: "fastrun", "onnxruntime", "openvino bf16"...
    predicted_ms: Optional[float] = None
    program: bool = False           # its compiled program is stored (serving skips compiling)
    measured_under_load: bool = False  # other processes used the cores while it was profiled
    problem: str = ""               # why it would not be served ("" if it would)


@dataclass
class FingerprintInfo:
    """What the cache holds for one fingerprint."""

    fingerprint: str
    this_machine: bool
    plans: list[PlanInfo] = field(default_factory=list)
    timings: int = 0
    programs: int = 0
    program_bytes: int = 0


@dataclass
class BundleSummary:
    """What an export wrote or an import stored."""

    path: str
    fingerprint: str
    plans: int = 0
    timings: int = 0
    skipped: int = 0                # entries left out: unreadable, inconsistent or not fastrun's


@dataclass
class Problem:
    """A cache entry ``fastrun cache verify`` objects to."""

    store: str                      # "plans" | "timings" | "programs"
    key: str                        # its key, or "row N" when the key itself is unreadable
    kind: str                       # "corrupt" | "stale"
    reason: str
    fixed: bool = False


@dataclass
class VerifyReport:
    plans: int = 0
    timings: int = 0
    programs: int = 0
    problems: list[Problem] = field(default_factory=list)


def _stores(caches: Caches) -> dict[str, Store]:
    return {"plans": caches.plans, "timings": caches.timings}


def _require_writable(caches: Caches) -> None:
    if caches.read_only:
        raise FastrunError(f"cache {caches.root} is read-only")


def plan_problem(plan: Plan, fingerprint: Optional[str] = None) -> str:
    """Why a cached plan would not be served here ("" if it would); the model is not checked."""
    why = plan.stale_reason(plan.model_hash, fingerprint or plan.fingerprint) or lookup.implementation_change(plan)
    return why or ""


def listing(caches: Caches) -> list[FingerprintInfo]:
    """Plans and timing counts per fingerprint, this machine's first."""
    here = fp.fingerprint()
    infos: dict[str, FingerprintInfo] = {}

    def info(f: str) -> FingerprintInfo:
        return infos.setdefault(f, FingerprintInfo(f, f == here))

    for key in caches.timings.keys():
        info(Caches.fingerprint_of(key)).timings += 1
    for program in caches.programs.entries():
        info(program.fingerprint).programs += 1
        info(program.fingerprint).program_bytes += program.bytes
    for e in caches.plans.entries():
        if e.key is None:
            continue
        f, model_hash, shapes = (e.key.split("/", 2) + ["", ""])[:3]
        item = PlanInfo(key=e.key, model_hash=model_hash, shapes=shapes, problem=e.problem)
        plan = _parse_plan(e.value) if e.value is not None else None
        if plan is not None:
            item.model_name, item.policy, item.predicted_ms = plan.model_name, plan.policy, plan.predicted_ms
            item.measured_under_load = plan.measured_under_load
            item.runs = plan.winner + ("" if plan.precision == "fp32" else f" {plan.precision.upper()}")
            item.problem = plan_problem(plan)
            item.program = caches.programs.has(plan)
        elif not item.problem:
            item.problem = "not a plan"
        info(f).plans.append(item)
    for i in infos.values():
        i.plans.sort(key=lambda p: (p.model_name, p.shapes))
    return sorted(infos.values(), key=lambda i: (not i.this_machine, i.fingerprint))


def model_plans(caches: Caches, model: ModelSource, shapes: Optional[dict[str, Sequence[int]]] = None,
                fingerprint: Optional[str] = None) -> list[Plan]:
    """The cached plans of ``model`` on this fingerprint: every shape set, or those matching ``shapes``.

    Found by the model file's hash alone (no graph loading), so it is instant on any model.
    """
    _, data = reader.read_model(model)
    prefix = f"{fingerprint or fp.fingerprint()}/{reader.model_hash(data)}/"
    plans = []
    for e in caches.plans.entries(prefix):
        plan = _parse_plan(e.value) if e.value is not None else None
        if plan is None:
            continue
        if shapes and any(list(plan.input_shapes.get(k, ())) != list(v) for k, v in shapes.items()):
            continue
        plans.append(plan)
    return sorted(plans, key=lambda p: Caches.shapes_text(p.input_shapes))


def _parse_plan(value: Optional[dict]) -> Optional[Plan]:
    try:
        return Plan.from_json(value)
    except (TypeError, ValueError, KeyError, AttributeError):
        return None


# ------------------------------------------------------------------------------------- bundles

def export_bundle(caches: Caches, path: os.PathLike, fingerprint: Optional[str] = None) -> BundleSummary:
    """Write every readable plan and timing of ``fingerprint`` (default: this machine's) to ``path``."""
    here = fp.fingerprint()
    fingerprint = fingerprint or here
    summary = BundleSummary(str(path), fingerprint)
    bundle: dict[str, Any] = {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "schema": SCHEMA,
                              "fingerprint": fingerprint, "software": software_tag(),
                              "fingerprint_fields": fp.describe() if fingerprint == here else None}
    prefix = fingerprint + "/"
    for name, store in _stores(caches).items():
        entries = {}
        for e in store.entries(prefix):
            if e.value is None:
                summary.skipped += 1
            else:
                entries[e.key[len(prefix):]] = e.value
        bundle[name] = entries
    summary.plans, summary.timings = len(bundle["plans"]), len(bundle["timings"])
    if not summary.plans and not summary.timings:
        raise FastrunError(f"nothing cached for fingerprint {fingerprint} in {caches.root}")
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    try:
        tmp.write_text(json.dumps(bundle, sort_keys=True), encoding="utf-8")
        tmp.replace(target)
    except OSError as exc:
        raise FastrunError(f"cannot write {path}: {exc.strerror}") from None
    return summary


def read_bundle(path: os.PathLike) -> dict[str, Any]:
    """A bundle file, checked for its shape (never code: JSON only)."""
    try:
        data = untrusted.load_json(path, MAX_BUNDLE_BYTES)
    except OSError as exc:
        raise FastrunError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise FastrunError(f"{path} is not a readable bundle: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != BUNDLE_FORMAT:
        raise FastrunError(f"{path} is not a fastrun cache bundle")
    if data.get("version") != BUNDLE_VERSION or data.get("schema") != SCHEMA:
        raise FastrunError(f"{path}: bundle version {data.get('version')} schema {data.get('schema')}, this "
                           f"fastrun reads version {BUNDLE_VERSION} schema {SCHEMA}")
    try:
        untrusted.component(data.get("fingerprint"))
    except ValueError:
        raise FastrunError(f"{path}: the bundle has no valid fingerprint") from None
    if not all(isinstance(data.get(name), dict) for name in STORES):
        raise FastrunError(f"{path}: the bundle has no plans/timings tables")
    return data


def import_bundle(caches: Caches, path: os.PathLike, force: bool = False,
                  fingerprint: Optional[str] = None) -> BundleSummary:
    """Store a bundle's entries under its own fingerprint; refused if that is not this machine's
    (``fingerprint``, default :func:`fastrun.system.fingerprint.fingerprint`) unless ``force``."""
    data = read_bundle(path)
    theirs, here = data["fingerprint"], fingerprint or fp.fingerprint()
    if theirs != here and not force:
        raise FastrunError(f"{path} was made on fingerprint {theirs}, this machine is {here}: its timings do not "
                           f"apply here (--force imports it anyway, kept under {theirs})")
    _require_writable(caches)
    summary = BundleSummary(str(path), theirs)
    for name, store in _stores(caches).items():
        for rel, value in data[name].items():
            key = f"{theirs}/{rel}"
            if name == "plans" and isinstance(value, dict):
                value = dict(value, verified=False)  # checked where it was made, not here: warmup checks it
            if not _importable(name, key, value) or not store.set(key, value):
                summary.skipped += 1
                continue
            setattr(summary, name, getattr(summary, name) + 1)
    return summary


def _importable(store: str, key: str, value: Any) -> bool:
    if not isinstance(value, dict) or value.get("schema") != SCHEMA:
        return False
    if store == "timings":
        return True
    plan = _parse_plan(value)
    return plan is not None and _plan_key(plan) == key


def _plan_key(plan: Plan) -> str:
    return Caches.plan_key(plan.fingerprint, plan.model_hash, {k: tuple(v) for k, v in plan.input_shapes.items()},
                           plan.exact, plan.precision_policy)


# ------------------------------------------------------------------------------ verify, clear

def verify(caches: Caches, models: Sequence[os.PathLike] = (), fix: bool = False) -> VerifyReport:
    """Check every entry: readable JSON of this schema, plans consistent with their keys and made
    by this software with implementations still registered, timings of current implementations.

    ``models`` (files or directories): plans of any other model are stale too (its file was
    edited or removed). ``fix`` deletes every entry found wrong.
    """
    report = VerifyReport()
    _verify_stores(caches, fix, report)
    if fix:
        _require_writable(caches)
    hashes = _model_hashes(models) if models else None
    for name, store in _stores(caches).items():
        check = _check_plan if name == "plans" else _check_timing
        for e in store.entries():
            setattr(report, name, getattr(report, name) + 1)
            kind, reason = ("corrupt", e.problem) if e.problem else check(e.key, e.value, hashes)
            if kind:
                problem = Problem(name, e.key or f"row {e.rowid}", kind, reason)
                if fix:
                    problem.fixed = store.delete_entry(e)
                report.problems.append(problem)
    _verify_programs(caches, hashes, fix, report)
    for path, age in caches.programs.leftovers():
        problem = Problem("programs", str(path.relative_to(caches.programs.directory)), "stale",
                          f"left by a program write that did not finish ({age / 60:.0f} min old)")
        if fix:
            problem.fixed = caches.programs.remove(path)
        report.problems.append(problem)
    return report


def _verify_stores(caches: Caches, fix: bool, report: Optional[VerifyReport] = None) -> None:
    """Store directories fastrun refuses to open (a link out of the cache, a FIFO for a database,
    foreign diskcache settings): reported, and with ``fix`` removed (never what a link points to)."""
    stores: dict[str, Any] = {**_stores(caches), "programs": caches.programs}
    for name, store in stores.items():
        reason = store.refused or (cache_store.refusal(store.directory) if name in STORES else "")
        if not reason:
            continue
        problem = Problem(name, f"{name}/", "corrupt", f"the store is refused: {reason}")
        if fix:
            problem.fixed = store.discard()
        if report is not None:
            report.problems.append(problem)


def _verify_programs(caches: Caches, hashes: Optional[set[str]], fix: bool, report: VerifyReport) -> None:
    """Programs: readable with intact data, and made for the plan now cached under their key."""
    for entry in caches.programs.entries(check_data=True):
        report.programs += 1
        kind, reason = ("corrupt", entry.problem) if entry.problem else ("", "")
        if not kind:
            key = f"{entry.fingerprint}/{entry.model_hash}/{entry.shapes}"
            plan = _parse_plan(caches.plans.get(key))
            reason = caches.programs.stale_reason(entry, plan) or (plan_problem(plan) if plan else "")
            if not reason and hashes is not None and entry.model_hash not in hashes:
                reason = "its model is not among the given files (edited or removed)"
            kind = "stale" if reason else ""
        if kind:
            problem = Problem("programs", str(entry.path.relative_to(caches.programs.directory)), kind, reason)
            if fix:
                problem.fixed = caches.programs.remove(entry.path)
            report.problems.append(problem)


def _model_hashes(models: Sequence[os.PathLike]) -> set[str]:
    hashes = set()
    for path, problem in find_models(models):
        if problem:
            raise FastrunError(problem)
        hashes.add(reader.model_hash(reader.read_model(path)[1]))
    return hashes


def _check_plan(key: str, value: dict, hashes: Optional[set[str]]) -> tuple[str, str]:
    plan = _parse_plan(value)
    if plan is None:
        return "corrupt", "not a plan"
    if _plan_key(plan) != key:
        return "corrupt", "its content does not match its key"
    why = plan_problem(plan)
    if why:
        return "stale", why
    if hashes is not None and plan.model_hash not in hashes:
        return "stale", f"model {plan.model_name} is not among the given files (edited or removed)"
    return "", ""


def _check_timing(key: str, value: dict, hashes: Optional[set[str]]) -> tuple[str, str]:
    parts = key.split("/")
    if len(parts) != 4:
        return "stale", "key without software versions (made by an older fastrun)"
    if parts[1] != software_tag():
        return "stale", f"measured with {parts[1]}, this is {software_tag()}"
    impl_id = parts[3]
    if impl_id == "ms":
        return ("", "") if isinstance(value.get("ms"), (int, float)) else ("corrupt", "no time in it")
    if "status" not in value:
        return "corrupt", "not a timing"
    name = impl_id.split("@")[0]
    ids = {i.id for i in registry.all_implementations() if i.name == name}
    if not ids:
        return "stale", f"implementation {name} is not registered"
    if impl_id not in ids:
        return "stale", f"implementation {impl_id} changed version (now {', '.join(sorted(ids))})"
    return "", ""


def clear(caches: Caches, fingerprint: Optional[str] = None) -> dict[str, int]:
    """Delete everything, or every entry of one fingerprint; how many entries went, per store.

    A store fastrun refuses to open (:func:`_verify_stores`) is removed whole."""
    _verify_stores(caches, fix=True)
    _require_writable(caches)
    prefix = f"{fingerprint}/" if fingerprint else ""
    counts = {name: store.clear(prefix) for name, store in _stores(caches).items()}
    counts["programs"] = caches.programs.clear(fingerprint or "")
    return counts
