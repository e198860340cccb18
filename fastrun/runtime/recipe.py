"""A compiled plan as plain data: what the program store keeps and :func:`~fastrun.runtime.program.instantiate` runs.

Segment model bytes with their weights, host kernels as implementation + spec + constants: no
graph, no live sessions, so serving a cached plan needs neither the graph nor the builders of its
onnxruntime segments.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fastrun.ops.registry import OpSpec
from fastrun.system.precision import FP32

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
class ModelRecipe:
    """The ORIGINAL model run whole by an engine of :mod:`fastrun.runtime.engines` (no graph of fastrun's)."""

    engine: str                      # e.g. "onnxruntime-original"
    inputs: list[str]
    outputs: list[str]
    threads: int = 0                 # intra-op threads; 0: the engine's default (all cores)
    precision: str = FP32            # what the engine computes in
    engine_version: str = ""         # the version that made ``blob``
    shapes: dict = field(default_factory=dict)  # input -> shape the engine compiles for ({}: the model's)
    blob: "bytes | np.ndarray" = b""  # the engine's compiled form (empty: compile from the original model)


@dataclass
class Recipe:
    """A compiled plan as data: everything :func:`instantiate` needs, no graph, no live sessions."""

    parts: list                      # SegmentRecipe | HostRecipe | ModelRecipe, in execution order
    constants: dict[str, np.ndarray]  # graph outputs that are constants
    outputs: dict[str, str]          # graph output -> name of the NCHW tensor holding it
    reorders: int = 0
