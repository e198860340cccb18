"""Compile a plan: graph + plan -> recipe (plain data) -> program of onnxruntime segments and host kernels.

Every node becomes a step: ONNX nodes (onnxruntime kernels, light ops, reorders) or a host
callable. Steps that are ONNX are merged into as few onnxruntime sessions as the data flow
allows - all ONNX steps that are ready together form one segment - so that per-node Python
dispatch does not eat the gains. Weights are pre-transformed once, here, by the builders.

Compiling has two halves: :func:`build_recipe` turns graph + plan into a
:class:`~fastrun.runtime.recipe.Recipe`, plain data (segment model bytes with their weights, host
kernels as implementation + spec + constants), and :func:`~fastrun.runtime.program.instantiate`
turns a recipe into a runnable :class:`~fastrun.runtime.program.Program`. A recipe is what the
program store (:mod:`fastrun.store.programs`) keeps, so that serving a cached plan needs neither the
graph nor the builders of its onnxruntime segments.

A tensor keeps its original name in the format its producer writes; a reorder of ``t`` to format
``f`` is the tensor ``t@f``.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence

import onnx
from onnx import helper

from fastrun.ir.graph import Graph, Node, const_inputs, outer_scope_reads, spec_for_node, to_proto
from fastrun.ops import builtin  # noqa: F401  (registers the built-in implementations plans name)
from fastrun.ops import formats, layout_ops, registry, reorders
from fastrun.ops.registry import OnnxFragment
from fastrun.runtime.plan import LIGHT_IMPL, Plan
from fastrun.runtime import openvino_engine
from fastrun.runtime.engines import OriginalModelSource
from fastrun.runtime.program import Program, instantiate
from fastrun.runtime.recipe import WHOLE_MODEL_LEVEL, HostRecipe, ModelRecipe, Recipe, SegmentRecipe
from fastrun.system import ortutil

log = logging.getLogger(__name__)


@dataclass(eq=False)  # steps are compared by identity: field equality made scheduling quadratic
class Step:
    name: str
    inputs: list[str]
    outputs: list[str]
    fragment: Optional[OnnxFragment] = None   # ONNX step (names already final)
    host: Optional[HostRecipe] = None         # host step
    is_reorder: bool = False


def tensor_name(tensor: str, fmt: str, produced: dict[str, str]) -> str:
    return tensor if produced.get(tensor, formats.NCHW) == fmt else f"{tensor}@{fmt}"


def compile_plan(graph: Graph, plan: Plan, threads: Optional[int] = None,
                 original: Optional[OriginalModelSource] = None, serving: bool = False) -> Program:
    """The runnable program of a plan, for races (``threads`` overrides its onnxruntime intra-op
    thread count; ``original`` is the model a plan of a whole-model engine runs). ``serving``: a
    program that is one session keeps spinning between calls, as serving runs it (timed in
    blocks, :func:`fastrun.measure.timing.interleaved`); otherwise its sessions stop spinning
    when ``run`` returns, so that candidates timed call by call in turn do not slow each other."""
    return instantiate(build_recipe(graph, plan, threads), original=original, spin_alone=serving)


def model_recipe(plan: Plan, inputs: Sequence[str], outputs: Sequence[str], threads: Optional[int] = None,
                 original: Optional[OriginalModelSource] = None) -> Recipe:
    """The recipe of a plan that runs the original model whole on its engine (no graph needed);
    with ``original``, an engine that has a compiled form (OpenVINO's blob) stores it in the recipe."""
    part = ModelRecipe(plan.engine, list(inputs), list(outputs), threads or plan.threads, plan.precision,
                       plan.engine_version, {k: list(v) for k, v in plan.input_shapes.items()})
    if original is not None and plan.engine == openvino_engine.OpenVINOEngine.name:
        part.blob = openvino_engine.compiled_blob(original.source, part)
    return Recipe(parts=[part], constants={}, outputs={t: t for t in outputs})


def build_recipe(graph: Graph, plan: Plan, threads: Optional[int] = None,
                 original: Optional[OriginalModelSource] = None) -> Recipe:
    """Build every ONNX step (weights transformed once) and merge them into segments (``original``:
    see :func:`model_recipe`)."""
    if plan.runs_original:
        return model_recipe(plan, graph.inputs, graph.outputs, threads, original)
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
    runtime = graph.runtime_inputs(node)
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
        outer = [t for t in node.outer_reads if t not in graph.constants and t not in in_names]
        return Step(node.name, in_names + outer, list(node.outputs), fragment=fragment)
    impl = registry.by_id(node.op_type, choice.impl)
    spec = spec_for_node(node, graph)
    if not impl.is_onnxruntime_kernel:  # a host kernel: built when the program is instantiated
        host = HostRecipe(node.name, impl.id, spec, const_inputs(node, graph), in_names, node.outputs[0],
                          host_threads)
        return Step(node.name, in_names, [node.outputs[0]], host=host)
    built = impl.build(spec, const_inputs(node, graph))
    mapping = {f"in{i}": name for i, name in zip(spec.runtime_inputs, in_names)}
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
    fragment = reorders.reorder_fragment(src_name, out, src, dst, tuple(shape))
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
    reads = [x for n in nodes for x in list(n.input) + outer_scope_reads(n) if x]
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
