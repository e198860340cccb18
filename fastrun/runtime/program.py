"""A runnable program: onnxruntime segments and host kernels, made from a :class:`~fastrun.runtime.recipe.Recipe`."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import numpy as np

from fastrun.ops import builtin  # noqa: F401  (registers the built-in implementations recipes name)
from fastrun.ops import registry
from fastrun.runtime import engines
from fastrun.runtime.engines import OriginalModelSource
from fastrun.runtime.recipe import HostRecipe, ModelRecipe, Recipe
from fastrun.system import allocator, hostthreads, ortutil


@dataclass
class Segment:
    """One onnxruntime session running a run of ONNX steps. Its feeds are always exactly its
    inputs, as arrays: it runs them through :func:`~fastrun.system.ortutil.matched_run`."""

    inputs: list[str]
    outputs: list[str]
    session: object
    steps: int
    call: Callable[[list, dict], list] = field(init=False, repr=False)  # (output names, feed) -> outputs

    def __post_init__(self) -> None:
        self.call = ortutil.matched_run(self.session)

    def __call__(self, values: dict[str, np.ndarray]) -> None:
        results = self.call(self.outputs, {k: values[k] for k in self.inputs})
        values.update(zip(self.outputs, results))


@dataclass
class HostCall:
    inputs: list[str]
    output: str
    kernel: Callable[..., np.ndarray]
    threads: int = 0  # see fastrun.system.hostthreads; 0: all cores
    node: str = ""    # the graph node it runs (for reports)

    def __call__(self, values: dict[str, np.ndarray]) -> None:
        with hostthreads.limited(self.threads):
            values[self.output] = self.kernel(*[values[t] for t in self.inputs])


@dataclass
class ModelCall:
    """The original model run whole by an engine (:mod:`fastrun.runtime.engines`)."""

    inputs: list[str]
    outputs: list[str]
    runner: Callable[[list, dict], list]
    engine: str = ""

    def __call__(self, values: dict[str, np.ndarray]) -> None:
        results = self.runner(self.outputs, {k: values[k] for k in self.inputs})
        values.update(zip(self.outputs, results))

    def call(self, output_names: list, feed: dict) -> list:
        return self.runner(output_names, feed)


@dataclass
class Program:
    program: list  # Segment | HostCall | ModelCall, in execution order
    constants: dict[str, np.ndarray]
    outputs: dict[str, str]  # graph output -> name of the NCHW tensor holding it
    reorders: int = 0
    host_steps: int = 0
    segments: int = 0
    released: list[list[str]] = field(init=False, default_factory=list)  # per part: tensors dropped after it
    # The program's one part, when it is one session or engine run whose outputs are the graph's:
    # serving calls it directly, with none of run()'s bookkeeping (small models run in microseconds).
    single: "Segment | ModelCall | None" = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.single = self._whole_part()
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

    def _whole_part(self) -> "Segment | ModelCall | None":
        if len(self.program) != 1 or self.constants or not isinstance(self.program[0], (Segment, ModelCall)):
            return None
        part = self.program[0]
        same = len(self.outputs) == len(part.outputs) and all(self.outputs.get(n) == n for n in part.outputs)
        return part if same else None

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


def with_host_threads(program: Program, threads: int) -> Program:
    """The same program (same sessions and kernels) with its host steps on ``threads`` threads."""
    parts = [replace(p, threads=threads) if isinstance(p, HostCall) else p for p in program.program]
    return replace(program, program=parts)


def capped_threads(threads: int, cap: int) -> int:
    """A part's thread count (0: all cores) under a cap (0: none): never more than the cap."""
    if not cap:
        return threads
    return min(threads or ortutil.default_threads(), cap)


def instantiate(recipe: Recipe, max_threads: int = 0, original: Optional[OriginalModelSource] = None,
                spin_alone: bool = True) -> Program:
    """Create the recipe's onnxruntime sessions and build its host kernels.

    ``max_threads`` (0: no cap) caps every part's threads: a user's ``intra_op_num_threads``
    bounds what a plan uses, whatever thread counts it measured best. ``original`` is the
    original model, which a whole-model part (:class:`ModelRecipe`) runs. ``spin_alone``: a
    program that is one session keeps spinning between calls (:mod:`fastrun.system.ortutil`).
    """
    alone = spin_alone and len(recipe.parts) == 1

    def make(part):
        threads = capped_threads(part.threads, max_threads)
        if isinstance(part, ModelRecipe):
            if original is None:
                raise RuntimeError(f"the plan runs the original model on {part.engine}, and it was not given")
            # capped too: an engine other than onnxruntime (OpenVINO) would otherwise take every core
            return ModelCall(part.inputs, part.outputs, engines.build(original, replace(part, threads=threads)),
                             part.engine)
        if isinstance(part, HostRecipe):
            kernel = registry.by_id(part.spec.op_type, part.impl).build(part.spec, part.consts)
            return HostCall(part.inputs, part.output, kernel, threads, part.name)
        try:
            sess = ortutil.session(part.model, level=part.level, threads=threads or None,
                                   external=part.weights, spin_after_run=alone)
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
        allocator.keep_freed_memory()  # their outputs are fresh arrays: see fastrun.system.allocator
    return Program(program=program, constants=recipe.constants, outputs=recipe.outputs,
                   reorders=recipe.reorders, host_steps=host_steps,
                   segments=sum(isinstance(p, Segment) for p in program))
