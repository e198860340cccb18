"""Compile a plan into a program of onnxruntime segments and host kernels, and run it.

Every node becomes a step: ONNX nodes (onnxruntime kernels, light ops, reorders) or a host
callable. Steps that are ONNX are merged into as few onnxruntime sessions as the data flow
allows - all ONNX steps that are ready together form one segment - so that per-node Python
dispatch does not eat the gains. Weights are pre-transformed once, here, by the builders.

Compiling has two halves: :func:`build_recipe` turns graph + plan into a :class:`Recipe`, plain
data (segment model bytes with their weights, host kernels as implementation + spec + constants),
and :func:`instantiate` turns a recipe into a runnable :class:`Program`. A recipe is what the
program store (:mod:`fastrun.programs`) keeps, so that serving a cached plan needs neither the
graph nor the builders of its onnxruntime segments.

A tensor keeps its original name in the format its producer writes; a reorder of ``t`` to format
``f`` is the tensor ``t@f``.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence

import numpy as np
import onnx
from onnx import helper

from . import allocator, formats, hostthreads, layout_ops, ortutil, registry
from .graph import Graph, Node, const_inputs, spec_for_node, to_proto
from .plan import LIGHT_IMPL, Plan
from .registry import OnnxFragment, OpSpec

log = logging.getLogger(__name__)

SEGMENT_LEVEL = "extended"  # the plan makes the layout decisions; ORT must not redo them
WHOLE_MODEL_LEVEL = "all"   # a whole-model plan leaves them to onnxruntime


@dataclass
class SegmentRecipe:
    """One onnxruntime session to create: a model whose large constants travel beside it."""

    inputs: list[str]
    outputs: list[str]
    model: bytes                     # ONNX model; constants >= ortutil.EXTERNAL_MIN_BYTES are stubs
    weights: dict[str, np.ndarray]   # the stubs' values
    steps: int
    label: str = ""                  # first .. last step, for error messages
    threads: int = 0                 # intra-op threads; 0: all cores
    level: str = SEGMENT_LEVEL       # onnxruntime graph optimization level


@dataclass
class HostRecipe:
    """One host kernel to build: the implementation, the spec it was chosen for, its constants."""

    name: str
    impl: str                        # registry id, e.g. "winograd_f4@1"
    spec: OpSpec
    consts: dict[int, np.ndarray]
    inputs: list[str]
    output: str
    threads: int = 0                 # threads the kernel may use; 0: all cores


@dataclass
class Recipe:
    """A compiled plan as data: everything :func:`instantiate` needs, no graph, no live sessions."""

    parts: list                      # SegmentRecipe | HostRecipe, in execution order
    constants: dict[str, np.ndarray]  # graph outputs that are constants
    outputs: dict[str, str]          # graph output -> name of the NCHW tensor holding it
    reorders: int = 0


@dataclass(eq=False)  # steps are compared by identity: field equality made scheduling quadratic
class Step:
    name: str
    inputs: list[str]
    outputs: list[str]
    fragment: Optional[OnnxFragment] = None   # ONNX step (names already final)
    host: Optional[HostRecipe] = None         # host step
    is_reorder: bool = False


@dataclass
class Segment:
    """One onnxruntime session running a run of ONNX steps."""

    inputs: list[str]
    outputs: list[str]
    session: object
    steps: int

    def __call__(self, values: dict[str, np.ndarray]) -> None:
        results = self.session.run(self.outputs, {k: values[k] for k in self.inputs})
        values.update(zip(self.outputs, results))


@dataclass
class HostCall:
    inputs: list[str]
    output: str
    kernel: Callable[..., np.ndarray]
    threads: int = 0  # see fastrun.hostthreads; 0: all cores
    node: str = ""    # the graph node it runs (for reports)

    def __call__(self, values: dict[str, np.ndarray]) -> None:
        with hostthreads.limited(self.threads):
            values[self.output] = self.kernel(*[values[t] for t in self.inputs])


@dataclass
class Program:
    program: list  # Segment | HostCall, in execution order
    constants: dict[str, np.ndarray]
    outputs: dict[str, str]  # graph output -> name of the NCHW tensor holding it
    reorders: int = 0
    host_steps: int = 0
    segments: int = 0
    released: list[list[str]] = field(init=False, default_factory=list)  # per part: tensors dropped after it

    def __post_init__(self) -> None:
        # Per part, the tensors no later part reads: dropped as soon as it ran, so that a run
        # holds the live activations only, not every intermediate until it returns (as
        # onnxruntime's arena does inside a segment). Measured on VGG-19 b1: same speed.
        last_use: dict[str, int] = {}
        for i, part in enumerate(self.program):
            for t in part.inputs:
                last_use[t] = i
        kept = set(self.outputs.values())
        self.released = [[] for _ in self.program]
        for t, i in last_use.items():
            if t not in kept:
                self.released[i].append(t)

    def run(self, feed: dict[str, np.ndarray], part_seconds: Optional[list[list[float]]] = None) -> dict[str, np.ndarray]:
        """The graph outputs; ``part_seconds`` (one list per part) collects each part's time."""
        values = dict(feed)
        for i, part in enumerate(self.program):
            if part_seconds is None:
                part(values)
            else:
                t0 = time.perf_counter()
                part(values)
                part_seconds[i].append(time.perf_counter() - t0)
            for t in self.released[i]:
                del values[t]
        out = {}
        for name, source in self.outputs.items():
            out[name] = values[source] if source in values else self.constants[source]
        return out


def tensor_name(tensor: str, fmt: str, produced: dict[str, str]) -> str:
    return tensor if produced.get(tensor, formats.NCHW) == fmt else f"{tensor}@{fmt}"


def compile_plan(graph: Graph, plan: Plan, threads: Optional[int] = None) -> Program:
    """The runnable program of a plan (``threads`` overrides its onnxruntime intra-op thread count)."""
    return instantiate(build_recipe(graph, plan, threads))


def with_host_threads(program: Program, threads: int) -> Program:
    """The same program (same sessions and kernels) with its host steps on ``threads`` threads."""
    parts = [replace(p, threads=threads) if isinstance(p, HostCall) else p for p in program.program]
    return replace(program, program=parts)


def instantiate(recipe: Recipe) -> Program:
    """Create the recipe's onnxruntime sessions and build its host kernels."""
    def make(part):
        if isinstance(part, HostRecipe):
            kernel = registry.by_id(part.spec.op_type, part.impl).build(part.spec, part.consts)
            return HostCall(part.inputs, part.output, kernel, part.threads, part.name)
        try:
            sess = ortutil.session(part.model, level=part.level, threads=part.threads or None,
                                   external=part.weights)
        except Exception as exc:
            raise RuntimeError(f"onnxruntime rejected a segment of {part.steps} steps ({part.label}): "
                               f"{str(exc).strip().splitlines()[-1]}") from None
        return Segment(part.inputs, part.outputs, sess, part.steps)

    # Host builders transform weights with numpy and onnxruntime builds sessions in C++: both
    # release the GIL, so the parts are made on every core.
    with ThreadPoolExecutor(ortutil.default_threads()) as pool:
        program = list(pool.map(make, recipe.parts))
    host_steps = sum(isinstance(p, HostCall) for p in program)
    if host_steps:
        allocator.keep_freed_memory()  # their outputs are fresh arrays: see fastrun.allocator
    return Program(program=program, constants=recipe.constants, outputs=recipe.outputs,
                   reorders=recipe.reorders, host_steps=host_steps,
                   segments=sum(isinstance(p, Segment) for p in program))


def build_recipe(graph: Graph, plan: Plan, threads: Optional[int] = None) -> Recipe:
    """Build every ONNX step (weights transformed once) and merge them into segments."""
    produced = {t: formats.NCHW for t in graph.inputs}
    produced.update({t: f for t, f in plan.tensor_formats.items()})
    choices = {c.name: c for c in plan.nodes}
    steps: list[Step] = []
    for t, src, dst in plan.reorders:
        steps.append(_reorder_step(t, src, dst, graph.tensors[t].shape, produced))
    # Builders transform weights with numpy, which releases the GIL: building on every core cut
    # compile 150 -> 134 ms on ResNet-50, 69 -> 57 ms on Inception v1. Builders are pure functions of (spec, constants).
    with ThreadPoolExecutor(ortutil.default_threads()) as pool:
        steps.extend(pool.map(lambda node: _node_step(node, graph, choices[node.name], produced, plan.host_threads),
                              graph.nodes))
    outputs = {t: t if t in graph.constants else tensor_name(t, formats.NCHW, produced) for t in graph.outputs}
    parts = _schedule(steps, graph, plan, set(graph.inputs), set(outputs.values()), produced, threads)
    if plan.whole_model:  # every step is an NCHW onnxruntime node: one segment, onnxruntime's layouts
        for part in parts:
            part.level = WHOLE_MODEL_LEVEL
    constants = {t: graph.constants[t] for t in graph.outputs if t in graph.constants}
    return Recipe(parts=parts, constants=constants, outputs=outputs, reorders=sum(s.is_reorder for s in steps))


def _node_step(node: Node, graph: Graph, choice, produced: dict[str, str], host_threads: int) -> Step:
    runtime = [t for t in node.inputs if t and t not in graph.constants]
    in_names = [tensor_name(t, f, produced) for t, f in zip(runtime, choice.in_formats)]
    if choice.impl == LIGHT_IMPL:
        fmt = choice.out_format
        if fmt == formats.NCHW:
            fragment = OnnxFragment([to_proto(node)])
        else:
            fragment = layout_ops.emit_light(node, graph, fmt)
        rename = dict(zip(runtime, in_names))
        for n in fragment.nodes:
            n.input[:] = [rename.get(x, x) for x in n.input]
        return Step(node.name, in_names, list(node.outputs), fragment=fragment)
    impl = registry.by_id(node.op_type, choice.impl)
    spec = spec_for_node(node, graph)
    if impl.kind == "host":  # built when the program is instantiated
        host = HostRecipe(node.name, impl.id, spec, const_inputs(node, graph), in_names, node.outputs[0],
                          host_threads)
        return Step(node.name, in_names, [node.outputs[0]], host=host)
    built = impl.build(spec, const_inputs(node, graph))
    runtime_idx = [i for i, t in enumerate(node.inputs) if t and t not in graph.constants]
    mapping = {f"in{i}": name for i, name in zip(runtime_idx, in_names)}
    mapping["out"] = node.outputs[0]
    return Step(node.name, in_names, [node.outputs[0]], fragment=_rename(built, mapping, node.name))


def _rename(fragment: OnnxFragment, mapping: dict[str, str], prefix: str) -> OnnxFragment:
    """Give a fragment's local names a unique prefix and bind its in/out names."""
    def name(x: str) -> str:
        return x if not x else mapping.get(x, f"{prefix}::{x}")

    nodes = []
    for k, n in enumerate(fragment.nodes):
        new = onnx.NodeProto()
        new.CopyFrom(n)
        new.input[:] = [name(x) for x in n.input]
        new.output[:] = [name(x) for x in n.output]
        new.name = f"{prefix}::{k}"
        nodes.append(new)
    inits = {name(k): v for k, v in fragment.initializers.items()}
    return OnnxFragment(nodes, inits, dict(fragment.opsets))


def _reorder_step(tensor: str, src: str, dst: str, shape: Sequence[int], produced: dict[str, str]) -> Step:
    out = tensor_name(tensor, dst, produced)
    src_name = tensor_name(tensor, src, produced)
    fragment = layout_ops.reorder_fragment(src_name, out, src, dst, tuple(shape))
    return Step(f"reorder:{out}", [src_name], [out], fragment=fragment, is_reorder=True)


def _schedule(steps: list[Step], graph: Graph, plan: Plan, available: set[str], wanted: set[str],
              produced: dict[str, str], threads: Optional[int]) -> list:
    """Order steps into recipe parts; every maximal set of ONNX steps ready together becomes one segment."""
    available = set(available) | set(graph.constants)
    pending = list(steps)
    program = []
    segments = 0
    while pending:
        batch, inside, taken = [], set(), set()  # taken: ids of the batch's steps (set lookups, not list scans)
        progress = True
        while progress:  # steps are nearly in topological order: a few passes
            progress = False
            for s in pending:
                if s.fragment is not None and id(s) not in taken and all(t in available or t in inside for t in s.inputs):
                    batch.append(s)
                    taken.add(id(s))
                    inside.update(s.outputs)
                    progress = True
        if batch:
            pending = [s for s in pending if id(s) not in taken]
            outside_needs = {t for s in pending for t in s.inputs} | wanted
            seg_threads = threads or plan.segment_thread_count(segments)
            program.append(_segment(batch, graph, available, outside_needs, produced, seg_threads))
            segments += 1
            available |= inside
        ready_host = [s for s in pending if s.host is not None and all(t in available for t in s.inputs)]
        for s in ready_host:
            program.append(s.host)
            available.update(s.outputs)
        hosted = {id(s) for s in ready_host}
        pending = [s for s in pending if id(s) not in hosted]
        if not batch and not ready_host and pending:
            missing = sorted({t for s in pending for t in s.inputs if t not in available})[:5]
            raise RuntimeError(f"plan cannot be scheduled; tensors never produced: {missing}")
    return program


def _segment(batch: list[Step], graph: Graph, available: set[str], needed: set[str],
             produced: dict[str, str], threads: int) -> SegmentRecipe:
    nodes, inits = [], {}
    opsets = dict(graph.opsets)
    inside = {t for s in batch for t in s.outputs}
    inside.update(x for s in batch for n in s.fragment.nodes for x in n.output)
    for s in batch:
        nodes.extend(s.fragment.nodes)
        inits.update(s.fragment.initializers)
        for d, v in s.fragment.opsets.items():
            opsets[d] = max(opsets.get(d, 0), v)
    reads = [x for n in nodes for x in n.input if x]
    seg_inputs = []
    for x in dict.fromkeys(reads):
        if x in inside or x in inits:
            continue
        if x in graph.constants:
            inits[x] = graph.constants[x]
        else:
            seg_inputs.append(x)
    seg_outputs = [t for t in dict.fromkeys(t for s in batch for t in s.outputs) if t in needed]
    in_vis = [ortutil.value_info(x, _physical(x, graph, produced), _dtype(x, graph)) for x in seg_inputs]
    out_vis = [helper.make_empty_tensor_value_info(t) for t in seg_outputs]
    model, weights = ortutil.segment_model(nodes, in_vis, out_vis, inits, opsets)
    return SegmentRecipe(seg_inputs, seg_outputs, model, weights, len(batch),
                         f"{batch[0].name} .. {batch[-1].name}", threads)


def _base(name: str) -> tuple[str, Optional[str]]:
    base, sep, fmt = name.rpartition("@")
    return (base, fmt) if sep and formats.is_valid(fmt) else (name, None)


def _physical(name: str, graph: Graph, produced: dict[str, str]) -> tuple[int, ...]:
    base, fmt = _base(name)
    return formats.physical_shape(graph.tensors[base].shape, fmt or produced.get(base, formats.NCHW))


def _dtype(name: str, graph: Graph) -> str:
    return graph.tensors[_base(name)[0]].dtype
