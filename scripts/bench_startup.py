#!/usr/bin/env python
"""Start-up cost: ``fastrun.InferenceSession`` with a cached plan next to ``onnxruntime.InferenceSession``.

For each light model (the architectures shipped in the ``onnx`` wheel) it makes sure a plan and
its compiled program are cached (``fastrun.workflows.warmup.warmup``, small per-op limit and a per-model
budget: a partial plan is a real plan), then creates the sessions round-robin from the model file
and reports medians and ratios. ``fastrun`` is what serving does (the stored program);
``eager`` also makes the onnxruntime session of the original model, which a session makes only
when a shape without a plan (or an onnxruntime-only method) needs it. ``compiled`` ignores the
stored program and loads the graph and compiles the plan, as serving does when a plan has no
program (e.g. imported from a bundle and not warmed here). fastrun's
time is split into its stages: reading and hashing the model, looking up the plan and reading
its program (with its checksum), creating the sessions. The first round of each is a warm-up
(imports, lazy initialisation) and is not counted.

    python scripts/bench_startup.py                       # every light model
    python scripts/bench_startup.py --models resnet50 squeezenet --rounds 7 --json startup.json
    python scripts/bench_startup.py --real-weights        # weights as initializers, as real models ship
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import onnx
import onnxruntime as ort

import fastrun
from fastrun.workflows import lookup, models
from fastrun.runtime.program import instantiate
from fastrun.system import fingerprint
from fastrun.ir import modelinterface, reader
from fastrun.store.cache import Caches
from fastrun.store.programs import ProgramStore
from fastrun.workflows.warmup import warmup

log = logging.getLogger("bench_startup")


def stages(path: Path, cache_dir: str) -> dict[str, float]:
    """fastrun's start-up split as ``InferenceSession`` does it with a stored program (ms)."""
    t0 = time.perf_counter()
    model_hash = reader.model_hash(reader.read_bytes(path))
    t1 = time.perf_counter()
    caches = Caches(cache_dir, writable=False)
    here = fingerprint.fingerprint()
    interface = modelinterface.declared(path)
    shapes = {name: dims for name, dims, _ in interface["inputs"]}
    plan = lookup.stored_plan(caches, here, model_hash, shapes)
    recipe = caches.programs.load(plan, interface)
    t2 = time.perf_counter()
    instantiate(recipe)
    t3 = time.perf_counter()
    caches.close()
    return {"hash_ms": (t1 - t0) * 1e3, "lookup_ms": (t2 - t1) * 1e3, "sessions_ms": (t3 - t2) * 1e3}


def compiled_session(path: Path, cache_dir: str) -> fastrun.InferenceSession:
    """A session that ignores the stored program: graph loading and compiling, as before programs."""
    with mock.patch.object(ProgramStore, "load", return_value=None):
        return fastrun.InferenceSession(str(path), cache_dir=cache_dir, policy="require")


def eager_session(path: Path, cache_dir: str) -> fastrun.InferenceSession:
    """A session that also makes its onnxruntime session of the original model (which serving a
    planned fixed shape leaves for later): what start-up would cost if it were made eagerly."""
    sess = fastrun.InferenceSession(str(path), cache_dir=cache_dir, policy="require")
    sess.get_modelmeta()  # answered by the original model's session: makes it
    return sess


def bench_model(name: str, path: Path, cache_dir: str, rounds: int) -> dict:
    quiet = ort.SessionOptions()
    quiet.log_severity_level = 3  # onnxruntime's defaults otherwise; only its warnings about unused initializers go
    creators = {
        "onnxruntime": lambda: ort.InferenceSession(str(path), quiet, providers=["CPUExecutionProvider"]),
        "fastrun": lambda: fastrun.InferenceSession(str(path), cache_dir=cache_dir, policy="require"),
        "compiled": lambda: compiled_session(path, cache_dir),
        "eager": lambda: eager_session(path, cache_dir),
    }
    samples: dict[str, list[float]] = {k: [] for k in creators}
    for r in range(rounds + 1):
        for k in (list(creators) if r % 2 else list(reversed(creators))):  # alternate the order
            t0 = time.perf_counter()
            sess = creators[k]()
            elapsed = (time.perf_counter() - t0) * 1e3
            del sess
            if r:
                samples[k].append(elapsed)
    split = [stages(path, cache_dir) for _ in range(max(2, rounds // 2))]
    plan = fastrun.load_plan(str(path), cache_dir=cache_dir)
    row = {"model": name, "plan": plan.policy if plan else None}
    row.update({f"{k}_ms": statistics.median(v) for k, v in samples.items()})
    row["ratio"] = row["fastrun_ms"] / row["onnxruntime_ms"]
    row["compiled_ratio"] = row["compiled_ms"] / row["onnxruntime_ms"]
    row["eager_ratio"] = row["eager_ms"] / row["onnxruntime_ms"]
    row.update({k: statistics.median(s[k] for s in split) for k in split[0]})
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(models.EXAMPLES))
    ap.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "fastrun-bench-startup"))
    ap.add_argument("--rounds", type=int, default=5, help="Counted session creations per model and runtime.")
    ap.add_argument("--op-limit", type=float, default=0.1, help="Per-signature profiling limit when warming.")
    ap.add_argument("--budget", type=float, default=30.0, help="Profiling budget per model when warming (s).")
    ap.add_argument("--real-weights", action="store_true",
                    help="Use the models with random weights stored as initializers, as real models ship them "
                         "(the light models build theirs with ConstantOfShape at load).")
    ap.add_argument("--json", dest="json_path", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    if args.real_weights:  # the light models store weights as ConstantOfShape; real ones ship initializers
        real_dir = Path(tempfile.mkdtemp(prefix="fastrun-startup-"))
        paths = []
        for m in args.models:
            paths.append(real_dir / f"{m}.onnx")
            onnx.save(models.randomized(models.example_path(m), seed=0), str(paths[-1]))
    else:
        paths = [models.example_path(m) for m in args.models]
    for r in warmup(paths, cache_dir=args.cache_dir, op_limit=args.op_limit, budget=args.budget):
        print(f"warm-up {Path(r.model).name}: {r.status}, program {r.program}"
              f"{' (' + r.error + ')' if r.error else ''} in {r.seconds:.1f} s", flush=True)

    header = (f"{'model':<14} {'onnxruntime ms':>14} {'fastrun ms':>11} {'ratio':>6} {'hash ms':>8} {'lookup ms':>9} "
              f"{'sessions ms':>11} {'compiled ms':>11} {'ratio':>6} {'eager ms':>9} {'ratio':>6}  plan")
    rows = []
    print(header)
    for name, path in zip(args.models, paths):
        row = bench_model(name, path, args.cache_dir, args.rounds)
        rows.append(row)
        print(f"{name:<14} {row['onnxruntime_ms']:>14.1f} {row['fastrun_ms']:>11.1f} {row['ratio']:>6.2f} "
              f"{row['hash_ms']:>8.1f} {row['lookup_ms']:>9.1f} {row['sessions_ms']:>11.1f} {row['compiled_ms']:>11.1f} "
              f"{row['compiled_ratio']:>6.2f} {row['eager_ms']:>9.1f} {row['eager_ratio']:>6.2f}  {row['plan']}", flush=True)
    for key, label in (("ratio", "stored program"), ("compiled_ratio", "compiling the plan"),
                       ("eager_ratio", "stored program and the original model's session")):
        ratios = [r[key] for r in rows]
        print(f"median ratio fastrun / onnxruntime, {label}: {statistics.median(ratios):.2f} "
              f"(range {min(ratios):.2f}-{max(ratios):.2f})")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"fingerprint": fingerprint.fingerprint(), "rows": rows}, indent=1))
        print(f"wrote {args.json_path}")


if __name__ == "__main__":
    main()
