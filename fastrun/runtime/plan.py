"""The plan: plain JSON-able data saying how to run one model with given input shapes.

It records, per node, the chosen implementation and formats (with the timings that justified
the choice), the format of every tensor, the reorders the executor must insert, the predicted
cost and its baselines, and what it is valid for (fingerprint, model hash, versions). Nothing in
a plan is code: loading one can only select among registered implementations.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

import onnxruntime

from fastrun._version import SCHEMA, __version__
from fastrun.system import ortutil
from fastrun.system.precision import FP32

LIGHT_IMPL = "onnxruntime"  # the impl name of nodes that run as their own ONNX node

# What runs a plan (``Plan.engine``): fastrun's program of segments and host kernels (an
# assignment, or with ``whole_model`` its specialised graph as one onnxruntime session), or the
# ORIGINAL model on a whole-model engine (:mod:`fastrun.runtime.engines`).
ENGINE_FASTRUN = "fastrun"
ENGINE_ORIGINAL = "onnxruntime-original"


@dataclass
class NodeChoice:
    name: str
    op_type: str
    impl: str                       # implementation id ("winograd_f4@1") or LIGHT_IMPL
    in_formats: list[str]           # per runtime input, in the node's input order
    out_format: str
    time_ms: Optional[float] = None  # predicted (profiled) time of this choice
    source: str = "heuristic"       # "profiled" | "heuristic"
    spec: str = ""                  # short readable description of the op signature
    spec_key: str = ""
    ort_ms: Optional[float] = None   # onnxruntime's own kernel on the same signature
    runner_up: Optional[str] = None
    runner_up_ms: Optional[float] = None
    candidates: dict[str, Any] = field(default_factory=dict)  # impl -> ms, or "failed: reason"
    errors: dict[str, float] = field(default_factory=dict)    # impl -> measured relative error vs onnxruntime


@dataclass
class Plan:
    model_hash: str
    model_name: str
    fingerprint: str
    input_shapes: dict[str, list[int]]
    nodes: list[NodeChoice]
    tensor_formats: dict[str, str] = field(default_factory=dict)
    reorders: list[list[str]] = field(default_factory=list)  # [tensor, src, dst]
    predicted_ms: Optional[float] = None
    greedy_ms: Optional[float] = None
    nchw_only_ms: Optional[float] = None
    solver: dict[str, Any] = field(default_factory=dict)
    threads: int = 0                # onnxruntime intra-op threads (0: all cores)
    segment_threads: list[int] = field(default_factory=list)  # per segment in program order ([]: ``threads``)
    host_threads: int = 0           # threads of host kernels (0: all cores; fastrun.system.hostthreads)
    # Run the graph as one onnxruntime ORT_ENABLE_ALL session (every node on onnxruntime, its own
    # layouts and fusions): when no assignment beat that end to end (workflows.verify.verify_plan),
    # or, without profiling, when no host kernel is predicted to save enough (planner.heuristic_plan).
    whole_model: bool = False
    policy: str = "profiled"        # "profiled" | "heuristic" | "partial" (budget ran out) | "fallback"
    # ENGINE_FASTRUN, or a whole-model engine of the original model (ENGINE_ORIGINAL, ...): see runtime.engines
    engine: str = ENGINE_FASTRUN
    # Why the original model runs as is, when fastrun's front end could not take it ("" otherwise)
    fallback_reason: str = ""
    # Other processes used fastrun's cores while it profiled (fastrun.measure.load): the timings are
    # suspect, the thread counts were not kept (all cores), and warmup measures it again.
    measured_under_load: bool = False
    # Exact mode: only implementations that compute the direct result up to summation order, and
    # whose measured error stays at that level (planner.exact_limit); part of the plan's key.
    exact: bool = False
    engine_version: str = ""        # the whole-model engine's version (its stored form is valid for it only)
    precision: str = FP32           # what the plan computes in (fastrun.system.precision)
    precision_policy: str = FP32    # what the user allowed: plans are stored and found under it
    tolerance: Optional[float] = None  # the error budget of a reduced precision policy
    # Checked end to end on this machine by the one function that makes plans
    # (fastrun.workflows.profile.make_and_store_plan: races against onnxruntime, threads chosen).
    # False for any other plan (heuristic, imported from a bundle, unchecked, older JSON without
    # the field): `fastrun warmup` checks it again rather than taking it as complete.
    verified: bool = False
    # The whole-model engines its race ran (fastrun.workflows.engine_choice; [] when it was not
    # raced, or was made before plans recorded them)
    engines: list[str] = field(default_factory=list)
    fastrun_version: str = __version__
    onnxruntime_version: str = onnxruntime.__version__
    schema: int = SCHEMA

    def segment_thread_count(self, index: int) -> int:
        """Intra-op threads of the ``index``-th onnxruntime segment of the compiled plan (0: all cores)."""
        return self.segment_threads[index] if index < len(self.segment_threads) else self.threads

    def assignment(self) -> tuple:
        """What the plan runs, knobs aside: the whole model on onnxruntime, or each node's
        implementation and formats. Plans with equal assignments run the same operators."""
        if self.engine != ENGINE_FASTRUN:
            return ("original model", self.engine)
        if self.whole_model:
            return ("whole model",)
        return tuple((n.name, n.impl, tuple(n.in_formats), n.out_format) for n in self.nodes)

    @property
    def runs_original(self) -> bool:
        """Whether the plan runs the original model on a whole-model engine (no graph of fastrun's)."""
        return self.engine != ENGINE_FASTRUN

    @property
    def winner(self) -> str:
        """What the plan runs, by name: "fastrun", "onnxruntime" (the specialised graph) or an engine."""
        if self.runs_original:
            return self.engine
        return "onnxruntime" if self.whole_model else ENGINE_FASTRUN

    def node(self, name: str) -> NodeChoice:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def to_json(self) -> dict:
        """Plain data sharing its nested containers with the plan: serialize it, don't edit it.

        (``dataclasses.asdict`` deep-copied every candidate table: 13 ms on ShuffleNet's plan, paid
        at every session start to find the plan's stored program.)
        """
        d = {name: getattr(self, name) for name in self.__dataclass_fields__}
        d["nodes"] = [{name: getattr(n, name) for name in NodeChoice.__dataclass_fields__} for n in self.nodes]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Plan":
        if d.get("schema") != SCHEMA:
            raise ValueError(f"plan schema {d.get('schema')} is not {SCHEMA}")
        d = dict(d)
        d["nodes"] = [NodeChoice(**n) for n in d["nodes"]]
        # Thread counts come from a cache or a bundle: bounded by this machine's cores.
        for name in ("threads", "host_threads"):
            d[name] = ortutil.bounded_threads(d.get(name, 0))
        segment_threads = d.get("segment_threads", [])
        if not isinstance(segment_threads, list):
            raise ValueError("segment_threads is not a list")
        d["segment_threads"] = [ortutil.bounded_threads(n) for n in segment_threads]
        engines = d.get("engines", [])
        if not isinstance(engines, list) or not all(isinstance(e, str) for e in engines):
            raise ValueError("engines is not a list of names")
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in known})

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1, sort_keys=True)

    def stale_reason(self, model_hash: str, fingerprint: str) -> Optional[str]:
        """Why this plan must not be used for the given model and machine (None: it may)."""
        if self.model_hash != model_hash:
            return "the model changed since the plan was made"
        if self.fingerprint != fingerprint:
            return "the plan was made on a different machine or software stack"
        if self.fastrun_version != __version__ or self.onnxruntime_version != onnxruntime.__version__:
            return "fastrun or onnxruntime changed version since the plan was made"
        return None
