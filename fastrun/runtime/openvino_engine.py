"""OpenVINO's CPU plugin as a whole-model engine (:class:`~fastrun.runtime.engine_api.Engine`).

Measured against a default onnxruntime session on the same files, OpenVINO runs light CNNs
0.8-2.3x as fast in fp32 and 1.6-6x in bf16 (with 3e-3 to 1e-2 relative error), but costs
1-10 ms per call on sub-millisecond models: it is a candidate of the end-to-end race, kept only
where it wins. Settings that matter:

* ``INFERENCE_PRECISION_HINT`` is always explicit: without it the CPU plugin computes in bf16 on
  CPUs with native bf16, which would change the numerics of an fp32 plan;
* an exported blob does not carry its precision: :meth:`OpenVINOEngine.load` passes the same
  configuration it was compiled with;
* ``import openvino`` takes ~0.7 s: it happens on first use, never when fastrun is imported.
"""
from __future__ import annotations

import functools
import importlib
import io
import logging
import threading
from typing import Mapping, Sequence

import numpy as np

from fastrun.runtime.engine_api import CompiledModel, Engine, ModelInput
from fastrun.system import fingerprint, ortutil

log = logging.getLogger(__name__)

# fastrun's precision names -> OpenVINO's inference precision hints
HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}


@functools.lru_cache(maxsize=1)
def _core():
    ov = importlib.import_module("openvino")
    return ov, ov.Core()


def installed_version() -> str:
    """OpenVINO's installed version without importing it ("" when it is not installed)."""
    return fingerprint.installed_version("openvino")


class OpenVINOEngine(Engine):
    name = "openvino"

    def available(self) -> bool:
        try:
            _core()
        except Exception as exc:  # ImportError, or a broken install that fails on load
            log.debug("OpenVINO is not usable here: %s", exc)
            return False
        return True

    def version(self) -> str:
        return installed_version()

    @staticmethod
    def config(precision: str, threads: int) -> dict:
        """The compile configuration: latency-oriented, one stream, explicit precision and threads."""
        if precision not in HINTS:
            raise ValueError(f"OpenVINO has no precision {precision!r}; choose one of {', '.join(HINTS)}")
        return {"INFERENCE_PRECISION_HINT": HINTS[precision], "PERFORMANCE_HINT": "LATENCY",
                "NUM_STREAMS": 1, "INFERENCE_NUM_THREADS": int(threads or ortutil.default_threads()),
                "ENABLE_CPU_PINNING": False}

    def compile(self, model: ModelInput, shapes: Mapping[str, Sequence[int]], precision: str,
                threads: int) -> CompiledModel:
        _, core = _core()
        ov_model = core.read_model(model)  # a path: external data resolves beside it
        if shapes:
            ov_model.reshape({_input_index(ov_model, n): list(s) for n, s in shapes.items()})
        compiled = core.compile_model(ov_model, "CPU", self.config(precision, threads))
        return _compiled(compiled, precision, threads)

    def export(self, compiled: CompiledModel) -> bytes:
        stream = io.BytesIO()
        compiled.native.export_model(stream)
        return stream.getvalue()

    def load(self, blob: "bytes | np.ndarray", precision: str, threads: int) -> CompiledModel:
        """The blob is read in place (an OpenVINO tensor over its memory, e.g. the program store's
        mapped file): ResNet-50's 102 MB imported in 0.58 s this way, 1.56 s through a byte stream."""
        ov, core = _core()
        memory = blob if isinstance(blob, np.ndarray) and blob.flags.writeable else np.frombuffer(bytearray(blob), np.uint8)
        compiled = core.import_model(ov.Tensor(memory, shared_memory=True), "CPU", self.config(precision, threads))
        loaded = _compiled(compiled, precision, threads)
        loaded.keep_alive = memory  # the compiled model may read its constants from this memory
        return loaded


def _input_index(ov_model, name: str) -> int:
    for i, port in enumerate(ov_model.inputs):
        if name in port.get_names():
            return i
    raise KeyError(f"the model has no input {name!r}")


def _compiled(compiled, precision: str, threads: int) -> CompiledModel:
    """A :class:`CompiledModel` over one infer request (requests are not thread-safe: one at a time)."""
    request = compiled.create_infer_request()
    inputs = [p.get_any_name() for p in compiled.inputs]
    ports = {}
    for i, port in enumerate(compiled.outputs):
        for name in port.get_names():
            ports.setdefault(name, i)
    outputs = [p.get_any_name() for p in compiled.outputs]
    lock = threading.Lock()

    def run(output_names: Sequence[str], feed: Mapping[str, np.ndarray]) -> list:
        try:
            wanted = [ports[n] for n in output_names]
        except KeyError as exc:
            raise KeyError(f"the model has no output {exc.args[0]!r}") from None
        arrays = {i: np.ascontiguousarray(feed[n]) for i, n in enumerate(inputs)}
        with lock:
            request.infer(arrays)
            return [np.array(request.get_output_tensor(i).data) for i in wanted]

    model = CompiledModel(inputs, outputs, run, compiled, precision, threads)
    for port in compiled.outputs:
        described = (np.dtype(port.get_element_type().to_dtype()).name,
                     [d.get_length() if d.is_static else None for d in port.get_partial_shape()])
        model.output_types.update(dict.fromkeys(port.get_names(), described))
    return model


# -- serving: a plan's ModelRecipe on OpenVINO (registered in fastrun.runtime.engines)

_warned: set[str] = set()


def serving_problem(version: str) -> str:
    """Why a plan made with OpenVINO ``version`` cannot run on it here ("" when it can)."""
    if not OpenVINOEngine().available():
        return "OpenVINO is not installed here"
    if version and version != installed_version():
        return f"the plan was made with OpenVINO {version} and this machine has {installed_version()}"
    return ""


def build_runner(original, recipe, fallback):
    """The runner of an OpenVINO plan's recipe: its stored compiled form when it has one (no compile
    from ONNX), else the original model compiled now. Where OpenVINO is missing or another version,
    ``fallback(original, recipe)`` (onnxruntime on the original model), with one warning per reason."""
    problem = serving_problem(recipe.engine_version)
    if problem:
        if problem not in _warned:
            _warned.add(problem)
            log.warning("%s: running the model on onnxruntime instead", problem)
        return fallback(original, recipe)
    engine = OpenVINOEngine()
    if len(recipe.blob):
        return engine.load(recipe.blob, recipe.precision, recipe.threads)
    return engine.compile(original.source, recipe.shapes, recipe.precision, recipe.threads)


def compiled_blob(source: ModelInput, recipe) -> bytes:
    """The compiled form a program stores for ``recipe`` (compiled from the original model now)."""
    engine = OpenVINOEngine()
    return engine.export(engine.compile(source, recipe.shapes, recipe.precision, recipe.threads))
