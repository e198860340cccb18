"""What a whole-model engine offers: the interface the end-to-end race and serving use.

An engine turns the original ONNX model into a :class:`CompiledModel` for fixed input shapes, at
one precision and thread count, and can save that compiled form as bytes (stored with the plan)
and load it back without compiling from ONNX again. Engines other than onnxruntime are optional
dependencies: :meth:`Engine.available` says whether this process can use one, and nothing imports
the engine's package until it is used.
"""
from __future__ import annotations

import abc
from typing import Callable, Iterable, Mapping, Sequence, Union

import numpy as np

from fastrun.system import precision as precisions

ModelInput = Union[str, bytes]  # a path (external data resolves beside it) or the serialized model


class CompiledModel:
    """One compiled model: ``run(output_names, feed)`` answers as ``onnxruntime.InferenceSession.run``."""

    def __init__(self, inputs: Sequence[str], outputs: Sequence[str],
                 run: Callable[[Sequence[str], Mapping[str, np.ndarray]], list], native: object,
                 precision: str, threads: int):
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self._run = run
        self.native = native          # the engine's own compiled object (for export)
        self.precision = precision
        self.threads = threads
        self.keep_alive: object = None  # memory the engine's object reads from, kept as long as it is
        # output name -> (numpy dtype name, dims with None where dynamic): what a stored compiled
        # form really returns, checked against the model's declared outputs before it serves
        self.output_types: dict[str, tuple[str, list]] = {}

    def run(self, output_names: Sequence[str] | None, feed: Mapping[str, np.ndarray]) -> list:
        return self._run(list(output_names or self.outputs), feed)

    __call__ = run  # a runner (``run(output_names, feed)``) that also describes its outputs


class Engine(abc.ABC):
    """A whole-model engine; see the module docstring."""

    name: str = ""

    @abc.abstractmethod
    def available(self) -> bool:
        """Whether this process can use the engine (its package imports)."""

    @abc.abstractmethod
    def version(self) -> str:
        """The engine's version: plans and compiled forms are valid for this version only."""

    def precisions(self, flags: Iterable[str]) -> tuple[str, ...]:
        """The precisions worth offering on a CPU with ``flags``: the ones it computes natively."""
        return precisions.native(flags)

    @abc.abstractmethod
    def compile(self, model: ModelInput, shapes: Mapping[str, Sequence[int]], precision: str,
                threads: int) -> CompiledModel:
        """The model compiled for ``shapes`` at ``precision`` on ``threads`` threads (0: all cores)."""

    @abc.abstractmethod
    def export(self, compiled: CompiledModel) -> bytes:
        """The compiled form as bytes, for :meth:`load` in another process."""

    @abc.abstractmethod
    def load(self, blob: bytes, precision: str, threads: int) -> CompiledModel:
        """A compiled model from :meth:`export`'s bytes, with the settings it was compiled with."""
