"""fastrun: measure every implementation of every heavy operator, keep the fastest, serve the plan."""
__version__ = "0.1.0"

import os as _os

# OpenBLAS worker threads busy-wait ~0.1 s after each BLAS call (2^28 cycles); host kernels
# interleaved with onnxruntime segments then steal the cores onnxruntime's threads need
# (measured: a 3x3 conv after a numpy GEMM ran 19 ms instead of 11.4 ms). 2^4 cycles makes them
# sleep at once. It only takes effect if numpy was not imported before fastrun.
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from .api import load_plan, profile  # noqa: E402
from .errors import FastrunError, InputError, ModelError, PlanNotFoundError  # noqa: E402
from .registry import OnnxFragment, OpSpec, implementation  # noqa: E402
from .session import InferenceSession  # noqa: E402
from .warmup import warmup  # noqa: E402

__all__ = ["InferenceSession", "profile", "load_plan", "warmup", "implementation", "OpSpec", "OnnxFragment",
           "FastrunError", "InputError", "ModelError", "PlanNotFoundError", "__version__"]
