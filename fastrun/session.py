"""``fastrun.InferenceSession``: onnxruntime's session, running a cached plan where one exists.

``InferenceSession(path_or_bytes, sess_options=None, providers=None, provider_options=None)``
takes onnxruntime's arguments in onnxruntime's order and keeps one onnxruntime session of the
original model made with them (:mod:`fastrun.runtime.original`). Each fed shape set runs one *program*:
a cached plan's compiled program, or that original session. Which one, for a shape set without
a plan, is the policy (keyword ``policy=`` or ``$FASTRUN_POLICY``):

* ``onnxruntime`` (default): run it on the original session, as onnxruntime would; no compiling,
  no graph parsing; one warning says how to make a plan;
* ``heuristic``: compile the heuristic choice of implementations (one warning);
* ``profile``: make the plan now, as ``fastrun profile`` does, and persist it (like
  ``cudnn.benchmark``, but it survives the process);
* ``require``: raise :class:`PlanNotFoundError` (for images that must ship warm).

Compiled programs are kept per shape set, the ``max_programs`` most recently used (LRU). Only
``profile`` ever writes to the cache: the others open it read-only, so a read-only cache
directory (a container layer) serves as is. Non-CPU execution providers run everything on
onnxruntime with them: plans are CPU plans.
"""
from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np
import onnx
import onnxruntime as ort

from fastrun.errors import FastrunError, PlanNotFoundError
from fastrun.ir import graph as graph_mod, modelinterface, reader
from fastrun.ir.reader import ModelSource
from fastrun.planning import planner
from fastrun.runtime import compiler
from fastrun.runtime.iobinding import IOBinding
from fastrun.runtime.original import OriginalModel, cpu_tensor, numpy_dtype, ort_type
from fastrun.runtime.plan import Plan
from fastrun.runtime import engines
from fastrun.runtime.engines import OriginalModelSource
from fastrun.runtime.program import Program, instantiate
from fastrun.runtime.recipe import Recipe
from fastrun.shapes import as_shape, shapes_text
from fastrun.store import programcheck
from fastrun.store.cache import Caches
from fastrun.system import fingerprint as fp
from fastrun.system import precision as precisions
from fastrun.workflows import fallback, lookup
from fastrun.workflows import profile as profiling

log = logging.getLogger(__name__)

POLICIES = ("onnxruntime", "heuristic", "profile", "require")
DEFAULT_POLICY = "onnxruntime"
ENV_POLICY = "FASTRUN_POLICY"
MAX_PROGRAMS = 8      # compiled programs a session keeps (least recently used dropped first)
MAX_UNPLANNED = 4096  # shape sets remembered as running on the original model (no cache look-up again)

ShapeKey = tuple  # ((input name, shape), ...) sorted by name


@dataclass(frozen=True)
class NodeArg:
    """Same fields as ``onnxruntime.NodeArg``, for the declared interface (no onnxruntime session yet)."""

    name: str
    shape: list
    type: str


def _node_args(described: Sequence[list]) -> list[NodeArg]:
    """NodeArgs of :func:`fastrun.ir.reader.declared_interface`'s ``[name, dims, dtype]`` entries."""
    return [NodeArg(str(name), list(dims), ort_type(dtype)) for name, dims, dtype in described]


class InferenceSession:
    """onnxruntime's ``InferenceSession``; a shape set with a cached fastrun plan runs the plan.

    ``exact=True`` runs exact-mode plans: no approximate algorithm (Winograd, FFT), every kernel
    within direct evaluation's error of onnxruntime (for reproducible numerics).
    """

    def __init__(self, path_or_bytes: ModelSource, sess_options: Optional[ort.SessionOptions] = None,
                 providers: Optional[Sequence[Any]] = None, provider_options: Optional[Sequence[dict]] = None,
                 *, cache_dir: Optional[str] = None, policy: Optional[str] = None,
                 input_shapes: Optional[Mapping[str, Sequence[int]]] = None, op_limit: Optional[float] = None,
                 max_programs: int = MAX_PROGRAMS, exact: bool = False, precision: Optional[str] = None,
                 **kwargs: Any):
        self._policy = policy or os.environ.get(ENV_POLICY) or DEFAULT_POLICY
        # the precision policy whose plans this session serves (fastrun.system.precision; fp32 by default)
        self._precision = precisions.policy(precision).precision
        if self._policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, not {self._policy!r}")
        self._original = OriginalModel(path_or_bytes, sess_options, providers, provider_options, kwargs)
        self._source = path_or_bytes
        self._label = str(path_or_bytes) if isinstance(path_or_bytes, (str, os.PathLike)) else None
        self._op_limit = op_limit  # per-signature profiling time (policy="profile"); None: the default
        self._exact = exact  # exact-mode plans only (fastrun.planning.planner.exact_limit)
        self._declared: Optional[dict] = None  # the model's declared interface (fastrun.ir.modelinterface)
        self._max_programs = max(1, int(max_programs))
        self._programs: OrderedDict[ShapeKey, tuple[Program, Plan]] = OrderedDict()
        self._unplanned: OrderedDict[ShapeKey, None] = OrderedDict()
        self._lock = threading.RLock()
        self._warned = False
        self.profiled = 0  # how many times this session had to profile (policy="profile" only)
        self._stored_interface: Optional[tuple[list[NodeArg], list[NodeArg]]] = None
        self._feed_spec: Optional[list[tuple[str, Optional[np.dtype], list]]] = None
        self._output_names: list[str] = []
        # What each feed signature (:func:`_signature`) runs, decided once: the checks and the shape
        # key cost more per call than the smallest models run.
        self._routes: dict[tuple, _Route] = {}
        if self._original.device:
            log.warning("providers %s: fastrun's plans are CPU plans, so none applies; the model runs on "
                        "onnxruntime with these providers", self._original.device)
            self._original.session()
            return
        # The model is parsed only when a plan must be compiled: a stored program needs the model's
        # hash and its declared inputs and outputs (read from the model without parsing its weights).
        self._data: Optional[bytes] = None
        self._model_proto = path_or_bytes if isinstance(path_or_bytes, onnx.ModelProto) else None
        self._initializers: dict[str, np.ndarray] = {}  # the weights read once for every compiled shape
        self._hash = reader.source_hash(path_or_bytes)
        self._caches = Caches(cache_dir, writable=self._policy == "profile")
        self._fingerprint = fp.fingerprint()
        self._stored_interface = self._read_declared_interface()
        if self._stored_interface is None:
            self._original.session()
        declared = self._declared_shapes(input_shapes or {})
        if declared is None or self._program(declared) is None:
            self._original.session()  # the shapes users will feed may have no plan: ready now, as onnxruntime is

    # -- onnxruntime's interface
    def get_inputs(self) -> list:
        return self._interface()[0]

    def get_outputs(self) -> list:
        return self._interface()[1]

    def run(self, output_names: Optional[Sequence[str]], input_feed: Mapping[str, Any], run_options: Any = None) -> list:
        route = _known_route(self._routes, input_feed) if run_options is None else None
        if route is not None:  # a feed signature seen before: straight to what runs it
            if route.outputs is None:
                return route.call(output_names, input_feed)
            names = output_names or self._output_names
            if route.outputs.issuperset(names):
                return route.call(names, input_feed)
        outputs = self._run_planned(output_names, input_feed) if not self._original.device else None
        return outputs if outputs is not None else self._original.run(output_names, input_feed, run_options)

    def run_with_ort_values(self, output_names: Optional[Sequence[str]], input_dict_ort_values: Mapping[str, Any],
                            run_options: Any = None) -> list:
        feed = {k: v.numpy() for k, v in input_dict_ort_values.items() if cpu_tensor(v)} \
            if isinstance(input_dict_ort_values, Mapping) else {}
        outputs = self._run_planned(output_names, feed) if len(feed) == len(input_dict_ort_values) else None
        if outputs is None:
            return self._original.session().run_with_ort_values(output_names, input_dict_ort_values, run_options)
        return [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(o)) for o in outputs]

    def run_async(self, output_names: Optional[Sequence[str]], input_feed: Mapping[str, Any], callback: Any,
                  user_data: Any, run_options: Any = None) -> None:
        if self._program_for(input_feed) is None:
            return self._original.session().run_async(output_names, input_feed, callback, user_data, run_options)

        def work() -> None:
            try:
                results = self.run(output_names, input_feed, run_options)
            except Exception as exc:  # onnxruntime reports errors through the callback too
                callback(None, user_data, str(exc))
            else:
                callback(results, user_data, "")

        threading.Thread(target=work, daemon=True).start()

    def io_binding(self) -> IOBinding:
        return IOBinding(self)

    def run_with_iobinding(self, iobinding: IOBinding, run_options: Any = None) -> None:
        if not isinstance(iobinding, IOBinding) or iobinding._session is not self:
            raise ValueError("IOBinding must be used with the session that created it.")
        call = iobinding.planned_call()
        outputs = self._run_planned(call[1], call[0]) if call is not None else None
        if outputs is not None:
            iobinding.fill(outputs)
        else:
            session = self._original.session()
            iobinding.replay(session, run_options, session.run_with_iobinding)

    def set_providers(self, providers: Optional[Sequence[Any]] = None,
                      provider_options: Optional[Sequence[dict]] = None) -> None:
        self._original.set_providers(providers, provider_options)
        self._routes.clear()  # device providers turn plans off

    def __getattr__(self, name: str) -> Any:
        """Every other method of ``onnxruntime.InferenceSession`` (get_modelmeta, get_session_options,
        get_providers, end_profiling...): the original model's session answers."""
        original = self.__dict__.get("_original")
        if original is None or name.startswith("_") or not hasattr(ort.InferenceSession, name):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(original.session(), name)

    def __dir__(self) -> list[str]:
        """fastrun's attributes and onnxruntime's public methods answered through :meth:`__getattr__`."""
        return sorted(set(super().__dir__()) | {n for n in dir(ort.InferenceSession) if not n.startswith("_")})

    # -- plans
    @property
    def plans(self) -> dict[ShapeKey, Plan]:
        """The plans of the programs held now, by shape set."""
        with self._lock:
            return {k: plan for k, (_, plan) in self._programs.items()}

    def plan_for(self, input_shapes: Mapping[str, Sequence[int]]) -> Optional[Plan]:
        """The plan serving these shapes (None: they run on the original model)."""
        found = self._program(input_shapes)
        return found[1] if found else None

    def _run_planned(self, output_names: Optional[Sequence[str]], feed: Any) -> Optional[list]:
        """The outputs from the plan of the feed's shapes; None when the original model must run it."""
        found = self._program_for(feed)
        if found is None:
            return None
        route = _known_route(self._routes, feed) or self._route(found, len(feed))
        names = list(output_names) if output_names else self._output_names
        if not route.outputs.issuperset(names):
            return None  # onnxruntime's error for an unknown output name
        return route.call(names, feed)

    def _program_for(self, feed: Any) -> Optional[tuple[Program, Plan]]:
        """The program of a feed that a plan may take as is: every declared input, each an array of
        the declared dtype, rank and fixed dims. Anything else is onnxruntime's to accept or refuse."""
        if self._original.device or not isinstance(feed, Mapping):
            return None
        route = _known_route(self._routes, feed)
        if route is not None:
            return route.found
        spec = self._feed_spec or self._make_feed_spec()
        found = self._checked_program(feed, spec) if len(feed) == len(spec) else None
        try:
            signature = _signature(feed)
            hash(signature)
        except (AttributeError, TypeError):  # not arrays: decided again on every call
            return found
        route = self._route(found, len(feed))
        with self._lock:
            if len(self._routes) >= MAX_UNPLANNED:
                self._routes.clear()
            self._routes[signature] = route
        return found

    def _route(self, found: Optional[tuple[Program, Plan]], inputs: int) -> _Route:
        """How :meth:`run` calls what runs a feed signature: the original session, the one session
        or engine run of a whole-model program, or the program."""
        if found is None:
            return _Route(None, self._original.session().run, None)
        program = found[0]
        self._output_names = self._output_names or [o.name for o in self.get_outputs()]
        single = program.single
        if single is not None and len(single.inputs) == inputs:  # the feed holds exactly its inputs
            return _Route(found, single.call, frozenset(program.outputs))
        return _Route(found, lambda names, feed: _pick(program.run(dict(feed)), names), frozenset(program.outputs))

    def _checked_program(self, feed: Mapping[str, Any], spec: list) -> Optional[tuple[Program, Plan]]:
        for name, dtype, declared in spec:
            value = feed.get(name)
            if not isinstance(value, np.ndarray) or value.dtype != dtype or not _fits(value.shape, declared):
                return None
        return self._program({name: feed[name].shape for name, _, _ in spec})

    def _make_feed_spec(self) -> list[tuple[str, Optional[np.dtype], list]]:
        """Each declared input's name, numpy dtype and dims, read once: onnxruntime's get_inputs()
        and the type-string parsing cost tens of microseconds per call, more than small models run."""
        self._feed_spec = [(arg.name, numpy_dtype(arg.type), list(arg.shape)) for arg in self.get_inputs()]
        return self._feed_spec

    def _program(self, shapes: Mapping[str, Sequence[int]]) -> Optional[tuple[Program, Plan]]:
        key = tuple(sorted((k, as_shape(v)) for k, v in shapes.items()))
        with self._lock:
            if key in self._programs:
                self._programs.move_to_end(key)
                return self._programs[key]
            if key in self._unplanned:
                return None
            found = self._load(dict(key))
            table: OrderedDict = self._programs if found is not None else self._unplanned
            table[key] = found
            if len(table) > (self._max_programs if found is not None else MAX_UNPLANNED):
                table.popitem(last=False)
                self._routes.clear()  # they may hold the evicted program
            return found

    def _load(self, shapes: dict) -> Optional[tuple[Program, Plan]]:
        """A program for these shapes, by policy; None: the original model runs them."""
        plan = lookup.stored_plan(self._caches, self._fingerprint, self._hash, shapes, self._label or "the model",
                                  self._exact, self._precision)
        stored = self._stored_program(plan) if plan is not None else None
        if stored is not None:
            return stored
        if plan is None and self._policy == "require":
            raise self._not_found(shapes)
        if plan is None and self._policy == "onnxruntime":
            self._warn_once("no fastrun plan for %s with shapes %s on this machine: running it on onnxruntime as "
                            "is (make plans with `fastrun warmup MODEL --shape ...`, or policy=\"profile\")",
                            self._label or "the model", shapes_text(shapes))
            return None
        try:
            return self._compiled_program(shapes)
        except FastrunError as exc:  # fastrun cannot run these shapes; onnxruntime answers (or refuses)
            if self._policy == "require":
                raise
            log.warning("%s (%s): %s; running it on onnxruntime", self._label or "the model", shapes_text(shapes), exc)
            return None

    def _not_found(self, shapes: dict) -> PlanNotFoundError:
        return PlanNotFoundError(
            f"no cached plan for model {self._label or 'given as bytes'} (sha256 {self._hash[:12]}) with shapes "
            f"{shapes_text(shapes)} on fingerprint {self._fingerprint} in {self._caches.root}; run `fastrun warmup` "
            f"or `fastrun profile` first")

    def _warn_once(self, message: str, *args: Any) -> None:
        if not self._warned:
            self._warned = True
            log.warning(message, *args)

    def _stored_program(self, plan: Plan) -> Optional[tuple[Program, Plan]]:
        """The cached plan's stored program: no model parsing, no compiling."""
        recipe = self._caches.programs.load(plan, self._declared)
        if recipe is None:
            return None
        try:
            program = instantiate(recipe, self._original.thread_cap(), self._original_source())
            programcheck.check_program(program, self._declared)
            return program, plan
        except Exception as exc:  # stored data is foreign data: compile from the model instead
            log.warning("ignoring the stored program of %s: %s", self._label or plan.model_name, exc)
            return None

    def _compiled_program(self, shapes: dict) -> tuple[Program, Plan]:
        try:
            graph = reader.from_proto(self._model(), self._bytes(), shapes, self._initializers)
        except Exception as exc:  # the front end cannot take it: the original model runs, as a plan
            return self._original_program(shapes, exc)
        plan = lookup.find_plan(self._caches, self._fingerprint, graph, self._exact, self._precision)
        if plan is not None:
            try:
                recipe = compiler.build_recipe(graph, plan)
                program = instantiate(recipe, self._original.thread_cap(), self._original_source())
            except Exception as exc:  # a cached plan is foreign data: never fail serving because of it
                log.warning("ignoring the cached plan for %s: it does not compile (%s)", graph.name, exc)
                plan = None
            else:  # its program was missing (e.g. an imported plan): stored if the cache is writable
                self._caches.programs.save(plan, recipe, reader.declared_interface(self._model()))
        if plan is None:
            plan, recipe = self._new_plan(graph, shapes)
            program = instantiate(recipe, self._original.thread_cap(), self._original_source())
        return program, plan

    def _original_program(self, shapes: dict, exc: Exception) -> tuple[Program, Plan]:
        """The plan that runs the original model on the onnxruntime session this one holds, for shapes
        fastrun's front end cannot take (stored under policy="profile", so that require serves it)."""
        if self._policy in ("require", "onnxruntime"):
            raise self._not_found(shapes)
        reason = fallback.front_end_reason(exc)
        self._warn_once("%s (%s): fastrun's front end cannot take it (%s); the original model runs on "
                        "onnxruntime as is", self._label or "the model", shapes_text(shapes), reason)
        plan, recipe = fallback.original_plan(self._model(), self._hash, shapes, self._fingerprint, reason)
        if self._policy == "profile":
            lookup.store_plan(self._caches, plan)
            self._caches.programs.save(plan, recipe, reader.declared_interface(self._model()))
        return instantiate(recipe, self._original.thread_cap(), self._original_source()), plan

    def _original_source(self) -> OriginalModelSource:
        """The original model for plans that run it whole; onnxruntime's engine runs it on the one this session holds."""
        return OriginalModelSource(engines.model_source(self._original.source), shared=self._original.run_matched)

    def _new_plan(self, graph: graph_mod.Graph, shapes: dict) -> tuple[Plan, Recipe]:
        """A plan for shapes the cache has none for (policy heuristic or profile; the others raise)."""
        described = shapes_text(shapes)
        if self._policy in ("require", "onnxruntime"):  # a stored plan that does not fit the graph
            raise self._not_found(shapes)
        if self._policy == "profile":
            log.info("no cached plan for %s (%s): profiling now", graph.name, described)
            with self._caches.profiling_lock():  # one profiling writer per cache at a time
                plan = lookup.find_plan(self._caches, self._fingerprint, graph, self._exact,
                                        self._precision)  # made meanwhile by another process?
                if plan is not None:
                    return plan, compiler.build_recipe(graph, plan)
                limit = {"op_limit": self._op_limit} if self._op_limit else {}
                made = profiling.make_and_store_plan(graph, self._model(), self._caches, self._fingerprint,
                                                     self._original_source(), exact=self._exact,
                                                     allowed=precisions.policy(self._precision), **limit)
                self.profiled += 1
                return made.plan, made.recipe
        self._warn_once("no cached fastrun plan for %s (%s) on this machine; using the heuristic choice "
                        "(run `fastrun profile` to make one)", graph.name, described)
        plan = planner.heuristic_plan(graph, self._fingerprint, self._exact)
        return plan, compiler.build_recipe(graph, plan)

    # -- the model
    def _interface(self) -> tuple[list, list]:
        if self._original.created or self._stored_interface is None:
            session = self._original.session()
            return list(session.get_inputs()), list(session.get_outputs())
        return self._stored_interface

    def _read_declared_interface(self) -> Optional[tuple[list[NodeArg], list[NodeArg]]]:
        """The model's declared inputs and outputs, read from the model itself (never from the cache);
        None where the walk cannot read them (onnxruntime's session answers then)."""
        try:
            self._declared = modelinterface.declared(self._model_proto if self._model_proto is not None
                                                     else self._source)
        except FastrunError as exc:
            log.debug("declared interface of %s unreadable without onnxruntime: %s", self._label or "the model", exc)
            return None
        return _node_args(self._declared["inputs"]), _node_args(self._declared["outputs"])

    def _declared_shapes(self, given: Mapping[str, Sequence[int]]) -> Optional[dict]:
        """The input shapes known before any feed: ``input_shapes`` or fixed declared dims (None: not all)."""
        shapes = {}
        for arg in self.get_inputs():
            dims = given.get(arg.name) or arg.shape
            if not all(isinstance(d, int) and d > 0 for d in dims):
                return None
            shapes[arg.name] = tuple(dims)
        return shapes

    def _model(self) -> onnx.ModelProto:
        if self._model_proto is None:
            self._model_proto = reader.parse_model(self._bytes(), self._label or "the given bytes")
            if self._label is not None:  # external data beside the model file, wherever the process runs
                reader.resolve_external_data(self._model_proto, self._label)
        return self._model_proto

    def _bytes(self) -> bytes:
        if self._data is None:
            self._data = reader.read_bytes(self._source)
        return self._data


class _Route(NamedTuple):
    """What runs one feed signature, and how :meth:`InferenceSession.run` calls it."""
    found: Optional[tuple[Program, Plan]]  # the program and its plan; None: the original session
    call: Callable[[Any, Mapping[str, Any]], list]  # (output names, feed) -> outputs
    outputs: Optional[frozenset]  # the output names it can give (None: onnxruntime checks them)


def _signature(feed: Mapping[str, Any]) -> tuple:
    """Each fed value's name, type, shape and dtype, in the feed's order: what decides the route
    (AttributeError for values without a shape or dtype)."""
    return tuple([(name, type(value), value.shape, value.dtype) for name, value in feed.items()])


def _known_route(routes: dict, feed: Any) -> Optional[_Route]:
    try:
        return routes.get(_signature(feed))
    except (AttributeError, TypeError):
        return None


def _pick(results: Mapping[str, Any], names: Sequence[str]) -> list:
    return [results[n] for n in names]


def _fits(shape: Sequence[int], declared: Sequence[Union[int, str, None]]) -> bool:
    """Whether a shape has the declared rank and every fixed (positive int) dim."""
    return len(shape) == len(declared) and all(not isinstance(d, int) or d <= 0 or d == s
                                               for s, d in zip(shape, declared))
