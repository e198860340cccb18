"""ONNX's backend API (``onnx.backend.base.Backend``) served by :class:`fastrun.InferenceSession`.

The same contract as ``onnxruntime.backend``: ``prepare`` accepts a ``ModelProto``, serialized
bytes or a file path, checks the model, skips (``unittest.SkipTest``) models importing an opset
ONNX has not released, and returns a rep whose ``run`` takes a list of arrays in the model's input
order (or one array for a one-input model) and returns the outputs as a list in the model's
output order. fastrun's own options (``cache_dir``, ``policy``, ``op_limit``, ``input_shapes``)
pass through as keyword arguments; anything else (onnxruntime session options, the test runner's
``rtol``/``atol``) is ignored, as onnxruntime ignores keys it does not know.
"""
from __future__ import annotations

import os
import unittest
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import onnx
from onnx import helper
from onnx.backend.base import Backend, BackendRep

from fastrun import InferenceSession  # the public name: the backend uses fastrun as users do

SESSION_OPTIONS = ("cache_dir", "policy", "op_limit", "input_shapes")
DEVICES = ("CPU",)


class FastrunBackendRep(BackendRep):
    """A prepared model: runs lists of input arrays through one :class:`fastrun.InferenceSession`."""

    def __init__(self, session: InferenceSession):
        self.session = session

    def run(self, inputs: Any, **kwargs: Any) -> list:
        """The outputs, in the model's output order, for ``inputs`` in the model's input order."""
        declared = [i.name for i in self.session.get_inputs()]
        if isinstance(inputs, Mapping):
            feed = dict(inputs)
        elif isinstance(inputs, (list, tuple)):
            if len(inputs) < len(declared):
                raise RuntimeError(f"the model expects {len(declared)} inputs {declared}, {len(inputs)} given")
            feed = dict(zip(declared, inputs))
        else:
            if len(declared) != 1:
                raise RuntimeError(f"Model expect {len(declared)} inputs")
            feed = {declared[0]: inputs}
        feed = {k: np.asarray(v) if isinstance(v, np.generic) else v for k, v in feed.items()}
        return self.session.run(None, feed)


class FastrunBackend(Backend):
    """``onnx.backend.base.Backend`` on fastrun: drop-in for ``onnxruntime.backend``."""

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return str(device).split(":")[0].upper() in DEVICES

    @classmethod
    def is_opset_supported(cls, model: onnx.ModelProto) -> tuple[bool, str]:
        """Whether every imported opset is a released one (what onnxruntime's backend accepts)."""
        for opset in model.opset_import:
            domain = opset.domain or "ai.onnx"
            if (domain, opset.version) not in helper.OP_SET_ID_VERSION_MAP:
                return False, f"opset {domain} version {opset.version} is not a released ONNX opset"
        return True, ""

    @classmethod
    def is_compatible(cls, model: onnx.ModelProto, device: Optional[str] = None, **kwargs: Any) -> bool:
        return cls.supports_device(device or "CPU") and cls.is_opset_supported(model)[0]

    @classmethod
    def prepare(cls, model: Any, device: Optional[str] = "CPU", **kwargs: Any) -> FastrunBackendRep:
        """A rep for a ModelProto, serialized bytes, a file path, a session or a rep."""
        if device is not None and not cls.supports_device(device):
            raise RuntimeError(f"Incompatible device expected '{device}', fastrun runs on CPU")
        if isinstance(model, FastrunBackendRep):
            return model
        if isinstance(model, InferenceSession):
            return FastrunBackendRep(model)
        if isinstance(model, onnx.ModelProto):
            data = model.SerializeToString()
            onnx.checker.check_model(data)
            supported, message = cls.is_opset_supported(model)
            if not supported:
                raise unittest.SkipTest(message)
            model = data
        elif not isinstance(model, (bytes, bytearray, str, os.PathLike)):
            raise TypeError(f"cannot prepare a {type(model).__name__}: give a ModelProto, bytes or a file path")
        options = {k: v for k, v in kwargs.items() if k in SESSION_OPTIONS}
        return FastrunBackendRep(InferenceSession(model, **options))

    @classmethod
    def run_model(cls, model: Any, inputs: Any, device: Optional[str] = "CPU", **kwargs: Any) -> list:
        return cls.prepare(model, device, **kwargs).run(inputs)

    @classmethod
    def run_node(cls, node: onnx.NodeProto, inputs: Any, device: Optional[str] = "CPU",
                 outputs_info: Optional[Sequence[tuple[np.dtype, tuple[int, ...]]]] = None,
                 **kwargs: Any) -> list:
        """Run one node: wrapped in a one-node model importing ``opset_version`` (default: the newest)."""
        super().run_node(node, inputs, device=device, outputs_info=outputs_info, **kwargs)
        model = node_model(node, inputs, outputs_info, kwargs.pop("opset_version", None))
        return cls.run_model(model, [np.asarray(x) for x in _as_list(inputs, node)], device, **kwargs)


def _as_list(inputs: Any, node: onnx.NodeProto) -> list:
    present = [name for name in node.input if name]
    if isinstance(inputs, Mapping):
        return [inputs[name] for name in present]
    return list(inputs)


def node_model(node: onnx.NodeProto, inputs: Any, outputs_info: Optional[Sequence] = None,
               opset_version: Optional[int] = None) -> onnx.ModelProto:
    """A model holding ``node`` alone, its inputs typed by ``inputs`` and its outputs inferred or given."""
    arrays = [np.asarray(x) for x in _as_list(inputs, node)]
    present = [name for name in node.input if name]
    graph_inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
                    for name, a in zip(present, arrays)]
    outputs = [name for name in node.output if name]
    if outputs_info:
        graph_outputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), shape)
                         for name, (dtype, shape) in zip(outputs, outputs_info)]
    else:
        graph_outputs = [helper.make_empty_tensor_value_info(name) for name in outputs]
    opsets = [helper.make_opsetid("", opset_version or onnx.defs.onnx_opset_version())]
    if node.domain not in ("", "ai.onnx"):
        opsets.append(helper.make_opsetid(node.domain, 1))
    model = helper.make_model(helper.make_graph([node], f"{node.op_type}_node", graph_inputs, graph_outputs),
                              opset_imports=opsets)
    if not outputs_info:
        inferred = onnx.shape_inference.infer_shapes(model)
        known = {vi.name: vi for vi in inferred.graph.value_info}
        for vi in model.graph.output:
            if vi.name in known:
                vi.CopyFrom(known[vi.name])
    return model


is_compatible = FastrunBackend.is_compatible
prepare = FastrunBackend.prepare
run = FastrunBackend.run_model
run_model = FastrunBackend.run_model
run_node = FastrunBackend.run_node
supports_device = FastrunBackend.supports_device
