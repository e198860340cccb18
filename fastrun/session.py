"""``fastrun.InferenceSession``: onnxruntime's call shape, running the cached plan.

Swapping ``onnxruntime.InferenceSession(path)`` for ``fastrun.InferenceSession(path)`` is the
whole migration. What happens when no plan is cached for the fed shapes is the policy:

* ``heuristic`` (default): run the heuristic choice and log one warning;
* ``profile``: profile now and persist (like ``cudnn.benchmark``, but it survives the process);
* ``require``: raise :class:`PlanNotFoundError` (for images that must ship warm).

Plans are looked up per fed shape set, so one session serves every shape that was warmed up
(``fastrun warmup --shape x:1x3x224x224 --shape x:8x3x224x224``); an unseen one follows the
policy. Only ``profile`` ever writes to the cache: the others open it read-only, so a read-only
cache directory (a container layer) serves as is.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np
import onnx

from fastrun.workflows import lookup
from fastrun.runtime import compiler
from fastrun.runtime.program import Program, instantiate
from fastrun.system import fingerprint as fp
from fastrun.ir import graph as graph_mod
from fastrun.ir import reader
from fastrun.planning import planner
from fastrun.store.cache import Caches
from fastrun.errors import InputError, PlanNotFoundError
from fastrun.ir.reader import ModelSource
from fastrun.runtime.plan import Plan

log = logging.getLogger(__name__)

POLICIES = ("heuristic", "profile", "require")
ENV_POLICY = "FASTRUN_POLICY"

_ONNX_TYPE_NAMES = {
    "float32": "tensor(float)", "float64": "tensor(double)", "float16": "tensor(float16)",
    "int64": "tensor(int64)", "int32": "tensor(int32)", "int8": "tensor(int8)", "uint8": "tensor(uint8)",
    "bool": "tensor(bool)",
}


@dataclass(frozen=True)
class NodeArg:
    """Same fields as ``onnxruntime.NodeArg``: name, shape (ints or dim names), type string."""

    name: str
    shape: list
    type: str


def _node_args(described: Sequence[list]) -> list[NodeArg]:
    """NodeArgs of :func:`fastrun.ir.reader.declared_interface`'s ``[name, dims, dtype]`` entries."""
    return [NodeArg(str(name), list(dims), _ONNX_TYPE_NAMES.get(dtype, f"tensor({dtype})"))
            for name, dims, dtype in described]


class InferenceSession:
    """Run a model with its cached fastrun plan; never profiles unless ``policy="profile"``."""

    def __init__(self, path_or_bytes: ModelSource, cache_dir: Optional[str] = None,
                 input_shapes: Optional[Mapping[str, Sequence[int]]] = None, policy: Optional[str] = None,
                 op_limit: Optional[float] = None, **ort_compat):
        if ort_compat:
            log.debug("ignoring onnxruntime-only arguments %s", sorted(ort_compat))
        self._policy = policy or os.environ.get(ENV_POLICY) or "heuristic"
        if self._policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, not {self._policy!r}")
        # The model is parsed only when a plan must be compiled: a stored program (fastrun.store.programs)
        # needs its hash alone, and its declared inputs and outputs are stored with it.
        self._source = path_or_bytes
        self._data: Optional[bytes] = None
        self._model_proto = path_or_bytes if isinstance(path_or_bytes, onnx.ModelProto) else None
        self._hash = reader.source_hash(path_or_bytes)
        self._label = str(path_or_bytes) if isinstance(path_or_bytes, (str, os.PathLike)) else None
        self._op_limit = op_limit  # per-signature profiling time (policy="profile"); None: the default
        self._caches = Caches(cache_dir, writable=self._policy == "profile")
        self._fingerprint = fp.fingerprint()
        self._inputs, self._outputs = self._interface()
        self._programs: dict[tuple, Program] = {}
        self.plans: dict[tuple, Plan] = {}
        self.profiled = 0  # how many times this session had to profile (policy="profile" only)
        self._warned = False
        shapes = dict(input_shapes or {})
        if all(i.name in shapes or all(isinstance(d, int) and d > 0 for d in i.shape) for i in self._inputs):
            self._prepare({i.name: tuple(shapes.get(i.name) or i.shape) for i in self._inputs})

    # -- onnxruntime-compatible surface
    def get_inputs(self) -> list[NodeArg]:
        return list(self._inputs)

    def get_outputs(self) -> list[NodeArg]:
        return list(self._outputs)

    def get_providers(self) -> list[str]:
        return ["CPUExecutionProvider"]

    def run(self, output_names: Optional[Sequence[str]], input_feed: Mapping[str, np.ndarray], run_options=None) -> list:
        feed = self._check_feed(input_feed)
        key = tuple(sorted((k, v.shape) for k, v in feed.items()))
        program = self._programs.get(key) or self._prepare({k: v.shape for k, v in feed.items()})
        names = list(output_names) if output_names else [o.name for o in self._outputs]
        unknown = [n for n in names if n not in program.outputs]
        if unknown:
            raise InputError(f"unknown output name(s) {unknown}; the model's outputs are {list(program.outputs)}")
        results = program.run(feed)
        return [results[n] for n in names]

    # -- plans
    def plan_for(self, input_shapes: Mapping[str, Sequence[int]]) -> Plan:
        key = tuple(sorted((k, tuple(v)) for k, v in input_shapes.items()))
        if key not in self.plans:
            self._prepare(dict(input_shapes))
        return self.plans[key]

    def _model(self) -> onnx.ModelProto:
        if self._model_proto is None:
            self._model_proto = reader.parse_model(self._bytes(), self._label or "the given bytes")
        return self._model_proto

    def _bytes(self) -> bytes:
        if self._data is None:
            self._data = reader.read_bytes(self._source)
        return self._data

    def _interface(self) -> tuple[list[NodeArg], list[NodeArg]]:
        stored = self._caches.programs.interface(self._fingerprint, self._hash)
        if stored is not None:
            try:
                return _node_args(stored["inputs"]), _node_args(stored["outputs"])
            except (TypeError, ValueError) as exc:
                log.warning("ignoring the stored interface of %s: %s", self._label or "the model", exc)
        declared = reader.declared_interface(self._model())
        return _node_args(declared["inputs"]), _node_args(declared["outputs"])

    def _prepare(self, shapes: Mapping[str, Sequence[int]]) -> Program:
        shapes = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
        program, plan = self._stored_program(shapes)
        if program is None:
            program, plan = self._compiled_program(shapes)
        key = tuple(sorted(shapes.items()))
        self._programs[key], self.plans[key] = program, plan
        return program

    def _stored_program(self, shapes: dict) -> tuple[Optional[Program], Optional[Plan]]:
        """The cached plan's stored program: no model parsing, no compiling."""
        plan = lookup.stored_plan(self._caches, self._fingerprint, self._hash, shapes, self._label or "the model")
        recipe = self._caches.programs.load(plan) if plan is not None else None
        if recipe is None:
            return None, None
        try:
            return instantiate(recipe), plan
        except Exception as exc:  # stored data is foreign data: compile from the model instead
            log.warning("ignoring the stored program of %s: %s", self._label or plan.model_name, exc)
            return None, None

    def _compiled_program(self, shapes: dict) -> tuple[Program, Plan]:
        graph = reader.from_proto(self._model(), self._bytes(), shapes)
        plan = lookup.find_plan(self._caches, self._fingerprint, graph)
        if plan is not None:
            try:
                recipe = compiler.build_recipe(graph, plan)
                program = instantiate(recipe)
            except Exception as exc:  # a cached plan is foreign data: never fail serving because of it
                log.warning("ignoring the cached plan for %s: it does not compile (%s)", graph.name, exc)
                plan = None
        if plan is None:
            plan = self._no_plan(graph, shapes)
            recipe = compiler.build_recipe(graph, plan)
            program = instantiate(recipe)
        if plan.policy != "heuristic":  # only policy="profile" opens the cache writable
            self._caches.programs.save(plan, recipe, reader.declared_interface(self._model()))
        return program, plan

    def _no_plan(self, graph: graph_mod.Graph, shapes: dict) -> Plan:
        described = ", ".join(f"{k}:{'x'.join(map(str, v))}" for k, v in shapes.items())
        if self._policy == "require":
            model = f"{self._label} (graph {graph.name!r}" if self._label else f"{graph.name} ("
            raise PlanNotFoundError(
                f"no cached plan for model {model}, sha256 {graph.model_hash[:12]}) with shapes {described} "
                f"on fingerprint {self._fingerprint} in {self._caches.root}; run `fastrun warmup` or "
                f"`fastrun profile` first")
        if self._policy == "profile":
            log.info("no cached plan for %s (%s): profiling now", graph.name, described)
            from fastrun.measure.profiler import Profiler

            limit = {"op_limit_s": self._op_limit} if self._op_limit else {}
            profiler = Profiler(self._caches, self._fingerprint, **limit)
            plan = planner.make_plan(graph, self._fingerprint, profiler)
            lookup.store_plan(self._caches, plan)
            self.profiled += 1
            return plan
        if not self._warned:
            self._warned = True
            log.warning("no cached fastrun plan for %s (%s) on this machine; using the heuristic choice "
                        "(run `fastrun profile` to make one)", graph.name, described)
        return planner.heuristic_plan(graph, self._fingerprint)

    def _check_feed(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not isinstance(feed, Mapping):
            raise InputError("input_feed must be a dict of input name -> array")
        expected = {i.name: i for i in self._inputs}
        unknown = sorted(set(feed) - set(expected))
        missing = sorted(set(expected) - set(feed))
        if unknown or missing:
            parts = []
            if unknown:
                parts.append(f"unknown input(s) {unknown}")
            if missing:
                parts.append(f"missing input(s) {missing}")
            raise InputError(f"{'; '.join(parts)}; the model's inputs are {list(expected)}")
        out = {}
        for name, value in feed.items():
            arg = expected[name]
            arr = np.asarray(value)
            want = {v: k for k, v in _ONNX_TYPE_NAMES.items()}.get(arg.type)
            if want and str(arr.dtype) != want:
                raise InputError(f"input {name}: dtype {arr.dtype}, the model expects {want}")
            if len(arr.shape) != len(arg.shape):
                raise InputError(f"input {name}: rank {arr.ndim} (shape {list(arr.shape)}), the model expects "
                                 f"rank {len(arg.shape)} {arg.shape}")
            for i, (d, want_d) in enumerate(zip(arr.shape, arg.shape)):
                if isinstance(want_d, int) and want_d > 0 and d != want_d and i != 0:
                    raise InputError(f"input {name}: dim {i} is {d}, the model expects {want_d} (shape {arg.shape})")
            out[name] = arr
        return out
