"""Models fastrun's front end cannot take exactly: onnxruntime decides, and runs the original model.

fastrun refuses a model only when onnxruntime's CPU session refuses it, with onnxruntime's reason.
Anything else the front end cannot read (an op, a dtype, a subgraph, a shape it cannot infer)
gets a plan of the ``onnxruntime-original`` engine that records why (``plan.fallback_reason``),
stored like any other plan so that serving with ``policy="require"`` finds it.
"""
from __future__ import annotations

import logging
from typing import Mapping, Optional, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from fastrun.errors import InputError, ModelError
from fastrun.ir import reader
from fastrun.ir.graph import first_line
from fastrun.runtime import compiler
from fastrun.runtime.engines import OriginalModelSource
from fastrun.runtime.plan import ENGINE_ORIGINAL, Plan
from fastrun.runtime.recipe import Recipe
from fastrun.shapes import shapes_text
from fastrun.system import ortutil

log = logging.getLogger(__name__)


def front_end_reason(exc: BaseException) -> str:
    """One line saying why the front end could not take the model."""
    text = first_line(exc) if str(exc).strip() else type(exc).__name__
    return text if isinstance(exc, (ModelError, InputError)) else f"{type(exc).__name__}: {text}"


def onnxruntime_refusal(original: OriginalModelSource) -> Optional[str]:
    """onnxruntime's reason for refusing the model on its CPU session, in one line (None: it loads)."""
    try:
        ortutil.session(original.source, level="all")
    except Exception as exc:
        return first_line(exc) or type(exc).__name__
    return None


def original_model_plan(model: onnx.ModelProto, model_hash: str, original: OriginalModelSource,
                        input_shapes: Optional[Mapping[str, Sequence[int]]], fingerprint: str,
                        reason: str) -> tuple[Plan, Recipe]:
    """The plan (and its recipe) that runs the original model on onnxruntime, for a model the front
    end could not take (``reason``). Raises :class:`ModelError` with onnxruntime's reason when
    onnxruntime refuses the model too, :class:`InputError` when it cannot run these shapes."""
    refusal = onnxruntime_refusal(original)
    if refusal is not None:
        raise ModelError(f"onnxruntime refuses the model: {refusal} (fastrun: {reason})")
    shapes = reader.input_shapes(model, input_shapes)
    _check_runs(original, model, shapes, reason)
    log.warning("fastrun's front end cannot take %s (%s): the original model runs on onnxruntime as is",
                model.graph.name or "the model", reason)
    return original_plan(model, model_hash, shapes, fingerprint, reason)


def original_plan(model: onnx.ModelProto, model_hash: str, shapes: Mapping[str, Sequence[int]], fingerprint: str,
                  reason: str) -> tuple[Plan, Recipe]:
    """The plan (and its recipe) that runs the original model whole on onnxruntime, saying why."""
    plan = Plan(model_hash=model_hash, model_name=model.graph.name or "model", fingerprint=fingerprint,
                input_shapes={k: [int(d) for d in v] for k, v in shapes.items()}, nodes=[], policy="fallback",
                engine=ENGINE_ORIGINAL, fallback_reason=reason)
    interface = reader.declared_interface(model)
    recipe = compiler.model_recipe(plan, [i[0] for i in interface["inputs"]], [o[0] for o in interface["outputs"]])
    return plan, recipe


def _check_runs(original: OriginalModelSource, model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]],
                reason: str) -> None:
    """Run the original once on these shapes, when every input is a plain numeric tensor."""
    interface = reader.declared_interface(model)
    feed = {}
    rng = np.random.default_rng(0)
    for name, _, dtype in interface["inputs"]:
        vi = next(v for v in model.graph.input if v.name == name)
        if not vi.type.HasField("tensor_type") or np.dtype(dtype).kind not in "biuf":
            return  # sequences, maps, strings...: onnxruntime judges the feeds it is given
        kind = np.dtype(dtype).kind
        value = rng.standard_normal(shapes[name]) if kind == "f" else np.ones(shapes[name])
        feed[name] = value.astype(dtype)
    try:
        ortutil.session(original.source, level="all").run(None, feed)
    except Exception as exc:
        raise InputError(f"onnxruntime cannot run the model with shapes {shapes_text(shapes)}: {first_line(exc)} "
                         f"(fastrun: {reason})") from None
