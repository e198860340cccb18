"""Building onnxruntime sessions the same way everywhere.

Every session fastrun creates - one-node reference and candidate sessions in the profiler,
merged segments in the executor, baselines in benchmarks - goes through :func:`session`, so all
of them share one threading policy: intra-op threads spin while a ``run`` is under way, as
onnxruntime's default does, and stop spinning the moment it returns
(``session.force_spinning_stop``). Without spinning every operator pays a thread wake-up
(DenseNet-121 at batch 1 ran 47 ms instead of 40, ShuffleNet 4.6 instead of 3.2); with the
default's spinning after ``run`` too, several sessions (and BLAS or numba threads) in one process
spin against each other (two interleaved ResNet-50 sessions ran 1.8x slower). Stopping at return
keeps the first without the second: an idle process uses no CPU between calls.

A program that is one onnxruntime session and nothing else has no other threads to collide
with: it keeps spinning after ``run`` as onnxruntime's default does (``spin_after_run``), since a
small model called in a loop pays the wake-up on every call otherwise (BERT-mini 161 against
240 us a call, a 20 us control-flow model 21 against 35).
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from fastrun.system import machine

LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

# Opset used for standalone models fastrun builds from an OpSpec (references, one-node timings).
STANDALONE_OPSET = 17

_NP_TO_ONNX = {
    "float32": onnx.TensorProto.FLOAT,
    "float64": onnx.TensorProto.DOUBLE,
    "float16": onnx.TensorProto.FLOAT16,
    "int64": onnx.TensorProto.INT64,
    "int32": onnx.TensorProto.INT32,
    "int16": onnx.TensorProto.INT16,
    "uint16": onnx.TensorProto.UINT16,
    "uint32": onnx.TensorProto.UINT32,
    "uint64": onnx.TensorProto.UINT64,
    "int8": onnx.TensorProto.INT8,
    "uint8": onnx.TensorProto.UINT8,
    "bool": onnx.TensorProto.BOOL,
}


def onnx_dtype(np_dtype: str) -> int:
    return _NP_TO_ONNX[str(np.dtype(np_dtype))]


def default_threads() -> int:
    """Cores this process may use (:func:`fastrun.system.machine.usable_cores`): what "all cores" means."""
    return machine.usable_cores()


# No machine fastrun runs on has more cores: a larger stored thread count is forged or damaged.
MAX_THREADS = 4096


def bounded_threads(count: object) -> int:
    """A thread count read from a cache, bundle or program, within this machine's cores (0: all).

    Absurd counts (not an int, negative, above MAX_THREADS) raise ValueError; plausible ones
    above the usable cores (a plan of another machine, a quota since lowered) are capped.
    """
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_THREADS:
        raise ValueError(f"thread count {count!r} is not one of 0..{MAX_THREADS}")
    return min(count, default_threads())


def session_options(level: str = "all", threads: Optional[int] = None,
                    spin_after_run: bool = False) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = LEVELS[level]
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "1")
    so.add_session_config_entry("session.force_spinning_stop", "0" if spin_after_run else "1")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


def session(model: "onnx.ModelProto | bytes | str", level: str = "all", threads: Optional[int] = None,
            external: Optional[dict[str, np.ndarray]] = None, spin_after_run: bool = False) -> ort.InferenceSession:
    """An onnxruntime session; ``external`` arrays back the model's external-data stubs in place."""
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    so = session_options(level, threads, spin_after_run)
    keep = []
    if external:
        values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for a in external.values()]
        so.add_external_initializers(list(external), values)
        keep = [values, list(external.values())]
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    # onnxruntime 1.32 copies these buffers into the session; kept alive for versions that read them in place
    sess._fastrun_external = keep
    return sess


def matched_run(session: ort.InferenceSession) -> Callable[[list, dict], list]:
    """``run(output_names, feed)`` of ``session`` for feeds already matched to its inputs (every
    one present, numpy arrays of the declared dtypes) and a list of output names.

    onnxruntime's Python ``run`` checks the feed's names against the model's inputs on every call
    (about a microsecond, 5-10% of the smallest models' run); fastrun checks a feed signature once
    and then calls the binding of the session directly. Where the binding is not where onnxruntime keeps
    it (``_sess``), this is ``session.run``. A session whose providers change makes a new binding:
    take this again after ``set_providers``.
    """
    binding = getattr(getattr(session, "_sess", None), "run", None)
    if binding is None:
        return session.run
    return lambda output_names, feed: binding(output_names, feed, None)


# Constants at least this large reach onnxruntime as in-memory external data rather than being
# serialized into the model: copying VGG-19's 550 MB of weights through protobuf took seconds.
EXTERNAL_MIN_BYTES = 1 << 16
# The location of those stubs: never a file, onnxruntime takes their values from memory.
MEMORY_LOCATION = "fastrun-memory"


def _external_stub(name: str, array: np.ndarray) -> onnx.TensorProto:
    t = onnx.TensorProto()
    t.name = name
    t.data_type = onnx_dtype(str(array.dtype))
    t.dims.extend(array.shape)
    t.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", MEMORY_LOCATION), ("offset", "0"), ("length", str(array.nbytes))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def segment_model(nodes: Sequence[onnx.NodeProto], inputs: Sequence[onnx.ValueInfoProto],
                  outputs: Sequence[onnx.ValueInfoProto], initializers: dict[str, np.ndarray],
                  opsets: Optional[dict[str, int]] = None) -> tuple[bytes, dict[str, np.ndarray]]:
    """A model's bytes with its large constants split off as in-memory external data.

    The pair is what :func:`session` takes; it is also what a compiled program stores on disk.
    """
    inits, external = [], {}
    for name, value in initializers.items():
        arr = np.asarray(value)
        if arr.nbytes >= EXTERNAL_MIN_BYTES and str(arr.dtype) in _NP_TO_ONNX:
            external[name] = arr
            inits.append(_external_stub(name, arr))
        else:
            inits.append(numpy_helper.from_array(arr, name))
    return make_model(nodes, inputs, outputs, inits, opsets).SerializeToString(), external


def build_session(nodes: Sequence[onnx.NodeProto], inputs: Sequence[onnx.ValueInfoProto],
                  outputs: Sequence[onnx.ValueInfoProto], initializers: dict[str, np.ndarray],
                  opsets: Optional[dict[str, int]] = None, level: str = "all",
                  threads: Optional[int] = None) -> ort.InferenceSession:
    """Model + session in one step, large constants handed over without serialization."""
    model, external = segment_model(nodes, inputs, outputs, initializers, opsets)
    return session(model, level=level, threads=threads, external=external)


def value_info(name: str, shape: Sequence[int], dtype: str = "float32") -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, onnx_dtype(dtype), list(shape))


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: dict[str, np.ndarray] | Iterable[onnx.TensorProto] = (),
    opsets: Optional[dict[str, int]] = None,
    ir_version: Optional[int] = None,
) -> onnx.ModelProto:
    if isinstance(initializers, dict):
        inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in initializers.items()]
    else:
        inits = list(initializers)
    opsets = dict(opsets or {})
    opsets.setdefault("", STANDALONE_OPSET)
    for node in nodes:
        if node.domain and node.domain not in opsets:
            opsets[node.domain] = 1
    graph = helper.make_graph(list(nodes), "fastrun", list(inputs), list(outputs), inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
    model.ir_version = ir_version or min(onnx.IR_VERSION, 10)
    return model
