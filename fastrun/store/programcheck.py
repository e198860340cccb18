"""What a stored program must satisfy before it runs: it reads only its own data, its host steps
fit the machine, and its outputs are the model's (see :mod:`fastrun.store.programs`)."""
from __future__ import annotations

import math
from typing import Optional

import google.protobuf.message
import numpy as np
import onnx

from fastrun.ops.registry import OpSpec
from fastrun.runtime.program import ModelCall, Program, Segment
from fastrun.runtime.recipe import Recipe, SegmentRecipe
from fastrun.store import untrusted
from fastrun.system import machine, ortutil


def check_segment(model: bytes, weights: dict[str, np.ndarray]) -> None:
    """Refuse a segment that would read anything but its own weights: every tensor with external
    data must be a top-level initializer stub backed by ``weights`` (same name, type and shape)."""
    proto = onnx.ModelProto.FromString(model)
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data):
            _check_stub(tensor, weights)
    # everything else - node attributes, subgraphs, sparse initializers, functions - holds no external data
    pending: list = [value for descriptor, value in proto.graph.ListFields() if descriptor.name != "initializer"]
    pending += [value for descriptor, value in proto.ListFields() if descriptor.name != "graph"]
    while pending:
        item = pending.pop()
        if not isinstance(item, google.protobuf.message.Message):
            if not isinstance(item, (str, bytes, int, float)):
                pending.extend(item)  # a repeated field
            continue
        if isinstance(item, onnx.TensorProto) and (item.data_location == onnx.TensorProto.EXTERNAL
                                                   or len(item.external_data)):
            raise untrusted.UntrustedDataError(f"tensor {item.name!r} references external data")
        pending.extend(value for descriptor, value in item.ListFields() if descriptor.type == descriptor.TYPE_MESSAGE)


def _check_stub(tensor: onnx.TensorProto, weights: dict[str, np.ndarray]) -> None:
    location = {e.key: e.value for e in tensor.external_data}.get("location")
    weight = weights.get(tensor.name)
    if location != ortutil.MEMORY_LOCATION or weight is None:
        raise untrusted.UntrustedDataError(f"tensor {tensor.name!r} references external data {location!r}")
    if tuple(tensor.dims) != weight.shape or tensor.data_type != ortutil.onnx_dtype(str(weight.dtype)):
        raise untrusted.UntrustedDataError(f"tensor {tensor.name!r} does not match the weights stored for it")


def check_host(spec: OpSpec, consts: dict[int, np.ndarray]) -> None:
    """A host step's constants are those its spec declares, and its tensors fit in memory."""
    shapes = [s for s in (*spec.inputs, spec.output) if s is not None]
    if not all(all(untrusted.is_count(d) for d in s) for s in shapes):
        raise ValueError("a host step's spec has a negative or non-integer dimension")
    if sum(math.prod(s) for s in shapes) * np.dtype(spec.dtype).itemsize > machine.memory_bytes():
        raise untrusted.UntrustedDataError("a host step's tensors would not fit in this machine's memory")
    for i, value in consts.items():
        if not 0 <= i < len(spec.inputs) or spec.inputs[i] is None or tuple(spec.inputs[i]) != value.shape:
            raise ValueError(f"a host step's constant {i} does not match its spec")


def check_outputs(recipe: Recipe, interface: Optional[dict]) -> None:
    """The program's outputs are the model's declared outputs; those a segment declares a type
    for have their declared element type and rank (static dims past the batch agree)."""
    if interface is None:
        return
    declared = _declared_outputs(interface)
    if set(recipe.outputs) != set(declared):
        raise ValueError(f"its outputs {sorted(recipe.outputs)} are not the model's {sorted(declared)}")
    produced = {recipe.outputs[name]: name for name in declared}
    for part in recipe.parts:
        if not isinstance(part, SegmentRecipe):
            continue
        for vi in onnx.ModelProto.FromString(part.model).graph.output:
            tt = vi.type.tensor_type
            if vi.name in produced and tt.elem_type:
                dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
                _check_output(produced[vi.name], declared, _ort_type(tt.elem_type), dims if tt.HasField("shape") else None)


def check_program(program: Program, interface: Optional[dict]) -> None:
    """:func:`check_outputs` on the types onnxruntime inferred for an instantiated program's segments."""
    if interface is None:
        return
    declared = _declared_outputs(interface)
    produced = {program.outputs[name]: name for name in declared if name in program.outputs}
    for part in program.program:
        if isinstance(part, Segment):
            for arg in part.session.get_outputs():
                if arg.name in produced:  # onnxruntime reports [] for a shape it could not infer too
                    dims = [d if isinstance(d, int) and d > 0 else None for d in arg.shape] if arg.shape else None
                    _check_output(produced[arg.name], declared, arg.type, dims)
        elif isinstance(part, ModelCall):
            _check_engine_outputs(part, produced, declared)


def _check_engine_outputs(part: ModelCall, produced: dict[str, str], declared: dict[str, tuple[list, str]]) -> None:
    """An engine's compiled form (a stored OpenVINO blob) returns the outputs it is asked for, typed as declared.
    A runner that describes no outputs (onnxruntime on the original model) is the model itself."""
    described = getattr(part.runner, "output_types", None)
    if not described:
        return
    missing = [name for name in part.outputs if name not in described]
    if missing:
        raise untrusted.UntrustedDataError(f"its compiled model has no output {missing[0]!r}")
    for name in part.outputs:
        if name in produced:
            dtype, dims = described[name]
            _check_output(produced[name], declared, _ort_type(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))),
                          dims)


def _declared_outputs(interface: dict) -> dict[str, tuple[list, str]]:
    return {str(name): (list(dims), str(dtype)) for name, dims, dtype in interface["outputs"]}


def _ort_type(elem_type: int) -> str:
    """onnxruntime's type string of an ONNX element type (``tensor(float)``)."""
    try:
        return f"tensor({onnx.TensorProto.DataType.Name(elem_type).lower()})"
    except ValueError:
        return f"tensor(type {elem_type})"


def _check_output(name: str, declared: dict[str, tuple[list, str]], got_type: str, got_dims: Optional[list]) -> None:
    dims, dtype = declared[name]
    try:
        want_type = _ort_type(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
    except (TypeError, KeyError, ValueError):
        want_type = f"tensor({dtype})"
    mismatch = got_type != want_type
    if got_dims is not None:
        mismatch = mismatch or len(got_dims) != len(dims) or any(
            isinstance(w, int) and w > 0 and g is not None and g != w for w, g in list(zip(dims, got_dims))[1:])
    if mismatch:
        raise untrusted.UntrustedDataError(f"output {name!r} would be {got_type} {got_dims}, the model declares "
                                           f"{want_type} {dims}")
