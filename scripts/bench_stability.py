"""Does profiling choose the same kernels twice? Profile one model twice with fresh caches and
report, per heavy node, whether the winners agree - counting only the nodes whose two best
candidates differ by more than their measured spread (elsewhere a coin toss is expected).

    python scripts/bench_stability.py --example squeezenet [--op-limit 0.5] [--json out.json]

Each run also records the load fastrun saw (other processes' use of the cores): runs measured
under load are expected to disagree more.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path

from fastrun.measure.profiler import Timing
from fastrun.store.cache import Caches
from fastrun.system import fingerprint
from fastrun.workflows import models
from fastrun.workflows.profile import profile

log = logging.getLogger("bench_stability")


def one_run(path: str, op_limit: float) -> dict:
    """Winner, runner-up and whether their gap exceeds the spread, per heavy node, of a fresh profile."""
    with tempfile.TemporaryDirectory(prefix="fastrun-stability-") as cache_dir:
        report = profile(path, cache_dir=cache_dir, op_limit=op_limit, measure=False, verify=False)
        caches = Caches(cache_dir, writable=False)
        nodes = {}
        for n in report.plan.nodes:
            if not n.spec or n.runner_up is None or not n.time_ms or not n.runner_up_ms:
                continue
            spread = max(_spread(caches, report.plan.fingerprint, n.spec_key, impl) for impl in (n.impl, n.runner_up))
            gap = abs(n.runner_up_ms - n.time_ms) / n.time_ms
            nodes[n.name] = {"winner": n.impl, "runner_up": n.runner_up, "gap": gap, "spread": spread,
                             "decided": gap > spread}
        caches.close()
    return {"nodes": nodes, "under_load": report.plan.measured_under_load, "load": report.plan.solver.get("load")}


def _spread(caches: Caches, fingerprint: str, spec_key: str, impl: str) -> float:
    value = caches.timings.get(Caches.timing_key(fingerprint, spec_key, impl))
    try:
        return Timing.from_json(value).spread if value else 0.0
    except ValueError:
        return 0.0


def agreement(a: dict, b: dict) -> dict:
    common = sorted(set(a["nodes"]) & set(b["nodes"]))
    decided = [n for n in common if a["nodes"][n]["decided"] and b["nodes"][n]["decided"]]
    same = lambda names: sum(a["nodes"][n]["winner"] == b["nodes"][n]["winner"] for n in names)  # noqa: E731
    return {"nodes": len(common), "same_winner": same(common), "decided": len(decided),
            "decided_same_winner": same(decided),
            "decided_disagreements": [{"node": n, "first": a["nodes"][n], "second": b["nodes"][n]}
                                      for n in decided if a["nodes"][n]["winner"] != b["nodes"][n]["winner"]],
            "per_node": {n: [a["nodes"][n], b["nodes"][n]] for n in common}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="an ONNX model file")
    parser.add_argument("--example", default=None, help="a light example model (squeezenet, resnet50, ...)")
    parser.add_argument("--op-limit", type=float, default=0.5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.example:
        path = str(Path(tempfile.mkdtemp()) / f"{args.example}.onnx")
        Path(path).write_bytes(models.randomized(models.example_path(args.example), seed=1).SerializeToString())
    elif args.model:
        path = args.model
    else:
        parser.error("give a model file or --example")
    described = fingerprint.describe()
    print(f"CPU: {described['cpu']}; flags: {' '.join(described['isa'])}; cores: {described['cores']}; "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    first, second = one_run(path, args.op_limit), one_run(path, args.op_limit)
    result = {"model": args.model or args.example, "op_limit": args.op_limit, "cpu": described,
              "loadavg_end": os.getloadavg(), **agreement(first, second),
              "under_load": [first["under_load"], second["under_load"]]}
    print(f"{result['model']}: {result['same_winner']}/{result['nodes']} nodes chose the same kernel; of the "
          f"{result['decided']} whose two best differ by more than their spread, {result['decided_same_winner']} agree"
          + ("  (measured under load)" if any(result["under_load"]) else ""))
    for d in result["decided_disagreements"]:
        print(f"  {d['node']}: {d['first']['winner']} (gap {d['first']['gap']:.0%}, spread {d['first']['spread']:.0%}) "
              f"vs {d['second']['winner']} (gap {d['second']['gap']:.0%}, spread {d['second']['spread']:.0%})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
