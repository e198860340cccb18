#!/usr/bin/env python
"""Start serving sessions for every model under the given paths, from a warm read-only cache.

With ``FASTRUN_POLICY=require`` (set in the Dockerfile) a model without a cached plan stops the
start-up with one clear line instead of serving the slow heuristic choice; each session then
runs once on zeros as a smoke test. Replace the loop at the end with your server.
"""
import sys
import time
from pathlib import Path

import numpy as np

import fastrun


def main(paths: list[str]) -> int:
    files = [f for p in map(Path, paths) for f in (sorted(p.rglob("*.onnx")) if p.is_dir() else [p])]
    try:
        for f in files:
            t0 = time.perf_counter()
            sess = fastrun.InferenceSession(str(f))
            feed = {i.name: np.zeros([d if isinstance(d, int) and d > 0 else 1 for d in i.shape], np.float32)
                    for i in sess.get_inputs()}
            outs = sess.run(None, feed)  # symbolic dims: the plan is looked up at the first run
            print(f"{f}: ready in {(time.perf_counter() - t0) * 1e3:.0f} ms, outputs {[o.shape for o in outs]}")
    except fastrun.FastrunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["models/"]))
