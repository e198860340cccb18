"""A model's declared inputs and outputs, read from its file without parsing its weights.

Serving a stored program must answer ``get_inputs()`` and check feeds against what the model
declares. Parsing the whole ModelProto costs as much as a model's weights are large; the
declared interface sits in a few small fields of its graph. This walks the protobuf wire format
of ``ModelProto.graph`` (field 7) and reads only its ``input`` (11), ``output`` (12) and the names
of its initializers (5, ``TensorProto.name`` = 8), skipping everything else by length: the answer
comes from the model itself, never from a file in the cache.
"""
from __future__ import annotations

import mmap
import os
from typing import Union

import google.protobuf.message
import onnx

from fastrun.errors import ModelError
from fastrun.ir.graph import dtype_name

GRAPH, INITIALIZER, INPUT, OUTPUT, TENSOR_NAME = 7, 5, 11, 12, 8


class WireError(ValueError):
    """Bytes that are not a well-formed protobuf message."""


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise WireError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, start, end) of every length-delimited field in ``buf[start:end]``; others skipped."""
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            _, pos = _varint(buf, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise WireError("a field runs past its message")
            yield number, pos, pos + length
            pos += length
        else:
            raise WireError(f"unsupported wire type {wire}")
        if pos > end:
            raise WireError("a field runs past its message")


def skeleton(buf) -> onnx.ModelProto:
    """A ModelProto holding only the graph's inputs, outputs and initializer names of ``buf``."""
    model = onnx.ModelProto()
    for number, start, end in _fields(buf, 0, len(buf)):
        if number != GRAPH:
            continue
        for field, s, e in _fields(buf, start, end):
            if field in (INPUT, OUTPUT):
                (model.graph.input if field == INPUT else model.graph.output).add().ParseFromString(bytes(buf[s:e]))
            elif field == INITIALIZER:
                for f, a, b in _fields(buf, s, e):
                    if f == TENSOR_NAME:
                        model.graph.initializer.add().name = bytes(buf[a:b]).decode("utf-8", "replace")
    return model


def declared(source: Union[str, os.PathLike, bytes, bytearray, onnx.ModelProto]) -> dict[str, list]:
    """The declared interface of a model given as a path, bytes or ModelProto (ModelError if unreadable)."""
    if isinstance(source, onnx.ModelProto):
        return of_model(source)
    try:
        if isinstance(source, (bytes, bytearray)):
            model = skeleton(memoryview(source))
        else:
            with open(os.fspath(source), "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
                model = skeleton(view)
    except (WireError, OSError, ValueError, google.protobuf.message.DecodeError) as exc:
        where = "the given bytes" if isinstance(source, (bytes, bytearray)) else os.fspath(source)
        raise ModelError(f"{where}: cannot read the model's inputs and outputs ({exc})") from None
    return of_model(model)


def of_model(model: onnx.ModelProto) -> dict[str, list]:
    """The model's runtime inputs and its outputs as ``[name, dims, dtype]`` (a dim: int, name or None)."""
    init_names = {t.name for t in model.graph.initializer}

    def describe(values) -> list:
        out = []
        for vi in values:
            tt = vi.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
            out.append([vi.name, dims, dtype_name(tt.elem_type)])
        return out

    return {"inputs": describe(vi for vi in model.graph.input if vi.name not in init_names),
            "outputs": describe(model.graph.output)}
