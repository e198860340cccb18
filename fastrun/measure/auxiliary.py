"""Timings beside the candidates': light ops in each format, reorders, per-call dispatch.

The planner prices them from these, cached in the timing store under their own keys.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Optional, Sequence

import numpy as np

from fastrun.measure import timing
from fastrun.ops import formats
from fastrun.store.cache import Caches
from fastrun.ir.graph import quiet_run_options, to_proto
from fastrun.ops import layout_ops, reorders
from fastrun.system import ortutil
from fastrun.measure.checking import is_number
from fastrun.measure.profiler import Profiler, time_callable
from fastrun.shapes import dims_text

log = logging.getLogger(__name__)


def light_key(node, graph, fmt: str) -> str:
    """Signature of a light (non-selected) node: op, attributes, shapes, small constants, opset."""
    import hashlib
    import json

    consts = {}
    for i, t in enumerate(node.inputs):
        if t in graph.constants:
            consts[i] = hashlib.sha256(np.ascontiguousarray(graph.constants[t]).tobytes()).hexdigest()[:16]
    shapes = [(list(graph.tensors[t].shape), graph.tensors[t].dtype) if t in graph.tensors else None for t in node.inputs]
    text = json.dumps({"op": node.op_type, "domain": node.domain, "attrs": repr(sorted(node.attrs.items())),
                       "inputs": shapes, "consts": consts, "opset": graph.opsets.get("", 0), "fmt": fmt,
                       "out": [list(graph.tensors[t].shape) for t in node.outputs if t in graph.tensors]},
                      sort_keys=True)
    return "light:" + hashlib.sha256(text.encode()).hexdigest()[:32]


# Light nodes, reorders and the dispatch cost are all timed in onnxruntime sessions: bump this
# when those sessions change (2: their threads spin during ``run``), so old timings are not reused.
AUXILIARY_TIMING_VERSION = 2


class AuxiliaryTimer:
    """Times light nodes and reorders (the rest of the cost model), cached like operators."""

    def __init__(self, profiler: Profiler):
        self.p = profiler

    def _cached_or(self, key: str, measure: Callable[[], float]) -> Optional[float]:
        caches = self.p.caches
        full = Caches.timing_key(self.p.fingerprint, f"{key}@aux{AUXILIARY_TIMING_VERSION}", "ms")
        if caches is not None and not (self.p.refresh and full not in self.p._fresh):
            hit = caches.timings.get(full)
            if hit is not None:
                ms = hit.get("ms")
                if is_number(ms) and math.isfinite(ms) and ms >= 0:
                    return float(ms)
                if full not in self.p._reported:
                    self.p._reported.add(full)
                    log.warning("ignoring a corrupt timing cache entry %s (ms is %r); measuring again", full, ms)
        if not self.p.budget_left():
            return None
        try:
            ms = measure()
        except Exception as exc:
            log.debug("could not time %s: %s", key, exc)
            ms = None
        if caches is not None and ms is not None:
            caches.timings.set(full, {"ms": ms})
            self.p._fresh.add(full)
        return ms

    def dispatch(self) -> float:
        """Fixed cost of one onnxruntime ``run`` call (feeds, fetches, thread wake-up).

        Standalone one-node timings include it, yet nodes merged into a segment do not pay it
        per node, while every host kernel splits a segment and pays it once more: the planner
        corrects candidate costs by this amount.
        """
        return self._cached_or("dispatch@2", self._time_dispatch) or 0.0

    def _time_dispatch(self) -> float:
        """One node alone minus one node of a chain of ``CHAIN`` identical nodes, measured side by
        side: what a standalone session pays per call (feeds, fetches, waking the thread pool from
        sleep) that a node inside a merged segment does not."""
        from onnx import helper

        chain, shape = 16, [1, 64, 28, 28]

        def sess(n: int):
            nodes = [helper.make_node("Relu", ["x" if i == 0 else f"t{i}"], ["y" if i == n - 1 else f"t{i + 1}"])
                     for i in range(n)]
            model = ortutil.make_model(nodes, [ortutil.value_info("x", shape)], [ortutil.value_info("y", shape)])
            return ortutil.session(model, level="disable")

        one, many = sess(1), sess(chain)
        feed = {"x": self.p.rng.standard_normal(shape).astype(np.float32)}
        t = timing.interleaved({"one": lambda: one.run(None, feed), "many": lambda: many.run(None, feed)},
                               repeats=30, max_seconds=2)
        return max(0.0, t["one"] - t["many"] / chain)

    def light(self, node, graph, fmt: str) -> Optional[float]:
        return self._cached_or(light_key(node, graph, fmt), lambda: self._time_light(node, graph, fmt))

    def reorder(self, shape: Sequence[int], src: str, dst: str, dtype: str = "float32") -> Optional[float]:
        key = f"reorder:{dims_text(shape)}:{dtype}:{src}>{dst}"
        return self._cached_or(key, lambda: self._time_reorder(tuple(shape), src, dst, dtype))

    def _time_light(self, node, graph, fmt: str) -> float:
        runtime = list(dict.fromkeys(graph.runtime_inputs(node)))
        if fmt == formats.NCHW:
            frag_nodes, inits = [to_proto(node)], {}
        else:
            frag = layout_ops.emit_light(node, graph, fmt)
            frag_nodes, inits = frag.nodes, dict(frag.initializers)
        inits.update({t: graph.constants[t] for t in node.inputs if t in graph.constants})
        feed, vis = {}, []
        for t in runtime:
            info = graph.tensors[t]
            shape = formats.physical_shape(info.shape, fmt) if fmt != formats.NCHW else info.shape
            arr = self.p.rng.standard_normal(shape).astype(info.dtype) if info.dtype.startswith("float") \
                else np.zeros(shape, dtype=info.dtype)
            feed[t] = arr
            vis.append(ortutil.value_info(t, shape, info.dtype))
        from onnx import helper

        outs = [helper.make_empty_tensor_value_info(t) for t in node.outputs if t]
        model = ortutil.make_model(frag_nodes, vis, outs, inits, graph.opsets)
        sess = ortutil.session(model, level="extended")
        quiet = quiet_run_options()  # made-up values (a Reshape's zero target) may fail: timed as unknown, not logged
        return time_callable(lambda: sess.run(None, feed, quiet), limit_s=0.2)

    def _time_reorder(self, shape: tuple[int, ...], src: str, dst: str, dtype: str) -> float:
        fn = reorders.reorder_callable(src, dst, shape)
        x = formats.to_format(self.p.rng.standard_normal(shape).astype(dtype), src)
        return time_callable(lambda: fn(x), limit_s=0.2)
