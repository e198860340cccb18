#!/usr/bin/env python
"""fastrun after ``fastrun.profile`` next to a default ``onnxruntime.InferenceSession`` on zoo cases and model files.

For each case of ``tests/zoo.py`` (real exported models and their quantized, float16 and
external-data variants; every case unless ``--cases`` or ``--models`` is given) and each model
file of ``--models`` (fed random values of its inputs' declared types, symbolic dimensions sized
by ``--dim NAME=N``, a symbolic first one else 1; judged fp16 where an input or weight is float16,
else fp32) it profiles the first feed's shapes into a private cache, opens a
``fastrun.InferenceSession(policy="require")`` and a default onnxruntime session, and times
them with a second default onnxruntime session (the control) round-robin on the same feed:
every round runs each session for about 10 ms (after untimed calls, so that none pays for
another's spinning threads or cached data), in shuffled order, and gives one ratio (onnxruntime's time
over fastrun's: above 1, fastrun is faster). It prints the median ratio with the 10th-90th
percentile spread over rounds, the control's median ratio ("A/A": what two identical sessions
measure, the noise floor of that row), and the medians of three consecutive blocks of rounds
(how stable the ratio is on a busy machine).
Cases fastrun cannot serve print the reason.

    python scripts/bench_zoo.py                          # every case
    python scripts/bench_zoo.py --cases resnet vit --rounds 60 --json zoo.json
    python scripts/bench_zoo.py --cases resnet --models exported/*.onnx --dim batch=4
"""
from __future__ import annotations

import argparse
import functools
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

import fastrun
from fastrun.measure import timing
from bench_engines import FLAGS_OF_INTEREST, cpu_flags, make_feed, parse_dims

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests import zoo  # noqa: E402

SLOW_BELOW = 0.97


def _timed(run, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        run()
    return time.perf_counter() - start


def _settled(run, untimed: int, calls: int) -> float:
    """``calls`` timed calls after ``untimed`` ones: the threads of another session spin on after
    ``run`` returns and its data fills the caches, and the first calls after its block pay for
    them (fastrun.measure.timing.block_calls, as fastrun's own races)."""
    _timed(run, untimed)
    return _timed(run, calls)


def race(runners: dict, rounds: int, calls: tuple[int, int]) -> dict[str, list[float]]:
    """Per-round ratios onnxruntime's time / each other runner's time, the order shuffled every round."""
    names = list(runners)
    for run in runners.values():
        run()
    shuffle = random.Random(0).shuffle
    ratios: dict[str, list[float]] = {n: [] for n in names if n != "onnxruntime"}
    for _ in range(rounds):
        shuffle(names)
        seconds = {n: _settled(runners[n], *calls) for n in names}
        for n in ratios:
            ratios[n].append(seconds["onnxruntime"] / seconds[n])
    return ratios


def zoo_case(name: str) -> tuple[str, dict[str, np.ndarray], str]:
    case = zoo.CASES[name]
    return str(case.model()), case.feeds()[0], case.kind


def model_file(path: str, dims: dict[str, int]) -> tuple[str, dict[str, np.ndarray], str]:
    """The file with a random feed of its declared inputs, fp16 where an input or weight is float16."""
    graph = onnx.load(path, load_external_data=False).graph
    types = [vi.type.tensor_type.elem_type for vi in graph.input] + [t.data_type for t in graph.initializer]
    return path, make_feed(zoo.session(path), 1, dims), "fp16" if onnx.TensorProto.FLOAT16 in types else "fp32"


def measure(name: str, model: str, feed: dict[str, np.ndarray], kind: str, rounds: int, op_limit: float) -> dict:
    row: dict = {"case": name, "kind": kind, "size_mb": round(Path(model).stat().st_size / 1e6, 2)}
    with tempfile.TemporaryDirectory() as cache_dir:
        start = time.perf_counter()
        try:
            input_shapes = {k: tuple(v.shape) for k, v in feed.items()}
            report = fastrun.profile(model, input_shapes=input_shapes, cache_dir=cache_dir,
                                     op_limit=op_limit, measure=False)
            row["plan"] = report.plan.winner  # fastrun | onnxruntime (specialised graph) | onnxruntime-original
            row["policy"] = report.plan.policy
            verified = report.plan.solver.get("verified", {})
            row["race_ms"] = {k[:-3]: v for k, v in verified.items() if k.endswith("_ms")}  # what the race measured
            ours = fastrun.InferenceSession(model, cache_dir=cache_dir, policy="require")
            ours.run(None, feed)
        except Exception as exc:  # a case fastrun cannot serve yet: report why and go on
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            return row
        row["profile_s"] = round(time.perf_counter() - start, 1)
        theirs = zoo.session(model)
        _timed(lambda: theirs.run(None, feed), 3)  # warm-up: the first calls allocate
        one = min(_timed(lambda: theirs.run(None, feed), 1) for _ in range(5))
        calls = timing.block_calls(one, 0.01)  # untimed calls, then about 10 ms of work per sample
        control = zoo.session(model)  # a second default session: the ratio two identical sessions measure
        raced = race({"fastrun": lambda: ours.run(None, feed), "onnxruntime": lambda: theirs.run(None, feed),
                      "control": lambda: control.run(None, feed)}, rounds, calls)
    ratios = raced["fastrun"]
    third = len(ratios) // 3
    row.update(ort_ms=round(one * 1e3, 3), median=statistics.median(ratios),
               p10=float(np.percentile(ratios, 10)), p90=float(np.percentile(ratios, 90)),
               blocks=[statistics.median(ratios[i * third:(i + 1) * third]) for i in range(3)],
               control=statistics.median(raced["control"]))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", choices=list(zoo.CASES),
                        help="zoo cases (default: every case, or none when --models is given)")
    parser.add_argument("--models", nargs="+", default=[], metavar="PATH", help="ONNX model files")
    parser.add_argument("--dim", nargs="*", default=[], metavar="NAME=N",
                        help="sizes of symbolic input dimensions in --models (a symbolic first one is else 1)")
    parser.add_argument("--rounds", type=int, default=45)
    parser.add_argument("--op-limit", type=float, default=0.5, help="profiling seconds per signature")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    dims = parse_dims(args.dim)
    cases = args.cases if args.cases is not None else [] if args.models else list(zoo.CASES)
    benches = [(name, functools.partial(zoo_case, name)) for name in cases]
    benches += [(Path(path).stem, functools.partial(model_file, path, dims)) for path in args.models]
    flags = cpu_flags()
    print("CPU flags:", " ".join(f for f in FLAGS_OF_INTEREST if f in flags) or "(none of interest)")
    rows = []
    print(f"{'case':22s} {'runs':20s} {'ort ms':>8s} {'ratio':>6s} {'p10-p90':>12s} {'A/A':>6s}  blocks")
    for name, load in benches:
        row = measure(name, *load(), args.rounds, args.op_limit)
        rows.append(row)
        if "error" in row:
            print(f"{name:22s} fails: {row['error']}")
            continue
        mark = "  slower" if row["median"] < SLOW_BELOW else ""
        print(f"{name:22s} {row['plan']:20s} {row['ort_ms']:8.3f} {row['median']:6.3f} "
              f"{row['p10']:5.3f}-{row['p90']:5.3f} {row['control']:6.3f}  {' '.join(f'{b:.3f}' for b in row['blocks'])}{mark}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
