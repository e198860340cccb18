#!/usr/bin/env python
"""Variable shapes without plans: a dynamic-length encoder fed N sequence lengths, first call of each.

Each variant runs in its own process (so that resident memory is its own): create the session,
then call it once per length, and report how long creating the session took, the total of the first
calls, and the process's resident memory (VmRSS) after the last call, beside onnxruntime's own
session doing the same. Variants: ``onnxruntime`` (plain onnxruntime), ``fastrun`` (the default
policy: shapes without a plan run on the original model), ``heuristic`` (a program compiled per
length, the ``max_programs`` most recent kept). Rounds alternate the variants' order; medians.

The model is :func:`fastrun.workflows.models.dynamic_encoder`, or ``--model`` a text model file
whose inputs are ``[batch, sequence]`` integers: ids drawn below 1000, inputs named ``*mask*`` ones.

    python scripts/bench_shapes.py                           # 30 lengths, 3 rounds
    python scripts/bench_shapes.py --lengths 30 --hidden 256 --layers 4 --rounds 5 --json shapes.json
    python scripts/bench_shapes.py --model tests/fixtures/bert_encoder.onnx --step 4   # lengths 4..120
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = ("onnxruntime", "fastrun", "heuristic")

CHILD = r"""
import json, sys, tempfile, time
import numpy as np
variant, path, lengths = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
import onnxruntime as ort
import fastrun

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
before = rss_mb()
t0 = time.perf_counter()
if variant == "onnxruntime":
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
else:
    policy = "heuristic" if variant == "heuristic" else None
    sess = fastrun.InferenceSession(path, cache_dir=tempfile.mkdtemp(), policy=policy)
t1 = time.perf_counter()
rng = np.random.default_rng(0)
names = [i.name for i in sess.get_inputs()]
for n in lengths:
    sess.run(None, {k: np.ones((1, n), np.int64) if "mask" in k else rng.integers(0, 1000, (1, n)) for k in names})
t2 = time.perf_counter()
print(json.dumps({"create_ms": (t1 - t0) * 1e3, "first_calls_ms": (t2 - t1) * 1e3,
                  "rss_mb": rss_mb(), "rss_growth_mb": rss_mb() - before}))
"""


def run_variant(variant: str, path: str, lengths: list[int]) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, variant, path, json.dumps(lengths)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, default=30, help="how many sequence lengths (STEP, 2*STEP, ... N*STEP)")
    ap.add_argument("--step", type=int, default=8)
    ap.add_argument("--model", help="a text model file instead of the generated encoder")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from fastrun.system import fingerprint
    from fastrun.workflows.models import dynamic_encoder

    import onnx

    path = args.model
    if path is None:
        path = str(Path(tempfile.mkdtemp()) / "encoder.onnx")
        onnx.save(dynamic_encoder(hidden=args.hidden, heads=4, layers=args.layers), path)
    lengths = [args.step * (i + 1) for i in range(args.lengths)]
    samples: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for v in (VARIANTS if r % 2 == 0 else tuple(reversed(VARIANTS))):
            samples[v].append(run_variant(v, path, lengths))
    rows = {v: {k: statistics.median(s[k] for s in samples[v]) for k in samples[v][0]} for v in VARIANTS}
    base = rows["onnxruntime"]
    described = fingerprint.describe()
    print(f"CPU: {described['cpu']}; flags: {' '.join(described['isa'])}; onnxruntime {described['onnxruntime']}")
    model = args.model or f"encoder hidden={args.hidden} layers={args.layers}"
    print(f"{model}, {len(lengths)} lengths {lengths[0]}..{lengths[-1]}, median of {args.rounds} "
          f"rounds, one process per variant and round")
    print(f"{'variant':<12} {'create ms':>10} {'first calls ms':>15} {'total / ort':>12} {'RSS MB':>8} {'growth MB':>10}")
    for v, row in rows.items():
        total = row["create_ms"] + row["first_calls_ms"]
        ratio = total / (base["create_ms"] + base["first_calls_ms"])
        print(f"{v:<12} {row['create_ms']:>10.1f} {row['first_calls_ms']:>15.1f} {ratio:>11.2f}x "
              f"{row['rss_mb']:>8.1f} {row['rss_growth_mb']:>10.1f}")
    if args.json:
        args.json.write_text(json.dumps({"lengths": lengths, "rows": rows, "samples": samples}, indent=1))


if __name__ == "__main__":
    main()
