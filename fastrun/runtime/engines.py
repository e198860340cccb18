"""Whole-model engines: what runs the ORIGINAL model, unchanged, in place of fastrun's program.

A plan whose ``engine`` is not ``fastrun`` compiles to one :class:`~fastrun.runtime.recipe.ModelRecipe`
naming its engine here. Registering an engine is one :func:`register` call: a name and a builder
that turns the original model (:class:`OriginalModelSource`) into a runner
``run(output_names, feed) -> list of arrays``. The race of whole-model candidates
(:mod:`fastrun.workflows.candidates`) and serving both find engines here by name.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from fastrun.runtime.plan import ENGINE_ORIGINAL
from fastrun.runtime import openvino_engine
from fastrun.system import ortutil

Runner = Callable[[list, dict], list]
OPENVINO = openvino_engine.OpenVINOEngine.name


@dataclass
class OriginalModelSource:
    """The original model as the user gave it, and a runner already made of it, if any.

    ``source`` is a path (external data resolves from the model's own directory, and models over
    2 GB load without serializing a proto) or the serialized bytes. ``shared`` is an
    ``run`` of an onnxruntime session of that model the caller already holds (in serving, the caller's own):
    the onnxruntime engine uses it rather than loading the model a second time.
    """

    source: Union[str, bytes]
    shared: Optional[Runner] = None


Builder = Callable[[OriginalModelSource, Any], Runner]
_ENGINES: dict[str, Builder] = {}


def register(name: str, build: Builder) -> None:
    """Make ``name`` an engine: ``build(original, recipe) -> run(output_names, feed)``."""
    _ENGINES[name] = build


def names() -> list[str]:
    return list(_ENGINES)


def build(original: OriginalModelSource, recipe: Any) -> Runner:
    """The runner of ``recipe`` (a :class:`~fastrun.runtime.recipe.ModelRecipe`) on its engine."""
    try:
        make = _ENGINES[recipe.engine]
    except KeyError:
        raise RuntimeError(f"unknown whole-model engine {recipe.engine!r} (known: {', '.join(_ENGINES)})") from None
    return make(original, recipe)


def model_source(source: Any) -> Union[str, bytes]:
    """A path (as text) or bytes: what an onnxruntime session of the original model is made from."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, bytearray):
        return bytes(source)
    if isinstance(source, bytes):
        return source
    return source.SerializeToString()  # an onnx.ModelProto


def _onnxruntime_original(original: OriginalModelSource, recipe: Any) -> Runner:
    """onnxruntime on the original model with its default optimizations: the caller's session
    (serving), else one that stops spinning at return, as every raced candidate does."""
    if original.shared is not None:
        return original.shared
    return ortutil.session(original.source, level="all", threads=recipe.threads or None).run


register(ENGINE_ORIGINAL, _onnxruntime_original)
register(OPENVINO, functools.partial(openvino_engine.build_runner, fallback=_onnxruntime_original))
