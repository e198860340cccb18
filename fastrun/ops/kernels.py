"""Turning any implementation into a plain callable, for profiling and checking.

The executor does not use this for ``kind="onnx"`` implementations (it merges their fragments
into shared sessions); the profiler and the tests do, to run one candidate on its own.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from fastrun.ops import formats
from fastrun.system import ortutil
from fastrun.ops.registry import Implementation, OnnxFragment, OpSpec, resolve_format
from fastrun.ops.builtin.ort import reference_fragment


def fragment_callable(fragment: OnnxFragment, spec: OpSpec, in_formats: Optional[tuple[str, ...]] = None,
                      out_format: str = formats.NCHW, threads: Optional[int] = None,
                      level: str = "extended") -> Callable[..., np.ndarray]:
    """A one-fragment onnxruntime session called like a host kernel."""
    runtime = spec.runtime_inputs
    in_formats = in_formats or (formats.NCHW,) * len(runtime)
    inputs = [ortutil.value_info(f"in{i}", formats.physical_shape(spec.inputs[i], fmt), spec.dtype)
              for i, fmt in zip(runtime, in_formats)]
    out_shape = formats.physical_shape(spec.output, out_format)
    sess = ortutil.build_session(fragment.nodes, inputs, [ortutil.value_info("out", out_shape, spec.dtype)],
                                 fragment.initializers, fragment.opsets, level=level, threads=threads)
    names = [f"in{i}" for i in runtime]

    def run(*args: np.ndarray) -> np.ndarray:
        return sess.run(None, dict(zip(names, args)))[0]

    return run


def build_callable(impl: Implementation, spec: OpSpec, consts: dict[int, np.ndarray],
                   threads: Optional[int] = None) -> Callable[..., np.ndarray]:
    """Build ``impl`` for ``spec`` and return a callable over the runtime inputs."""
    built = impl.build(spec, consts)
    if impl.is_onnxruntime_kernel:
        return fragment_callable(built, spec, impl.input_formats(spec), resolve_format(impl.out_format),
                                 threads=threads)
    return built


def reference_callable(spec: OpSpec, consts: dict[int, np.ndarray]) -> Callable[..., np.ndarray]:
    """onnxruntime running the plain ONNX semantics of ``spec`` (no fusions, no layout tricks)."""
    return fragment_callable(reference_fragment(spec, consts), spec, level="disable")


def random_inputs(spec: OpSpec, rng: np.random.Generator) -> tuple[dict[int, np.ndarray], list[np.ndarray]]:
    """Random constants (He-scaled weights) and runtime inputs for a spec, logical NCHW."""
    consts, runtime = {}, []
    for i, shape in enumerate(spec.inputs):
        if shape is None:
            continue
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        scale = np.sqrt(2.0 / max(fan_in, 1)) if spec.const[i] and len(shape) > 1 else 1.0
        arr = (rng.standard_normal(shape) * scale).astype(spec.dtype)
        if spec.const[i]:
            consts[i] = arr
        else:
            runtime.append(arr)
    return consts, runtime
