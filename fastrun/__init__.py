"""fastrun: measure every implementation of every heavy operator, keep the fastest, serve the plan."""
__version__ = "0.1.0"

from .blas import calm_openblas as _calm_openblas

_calm_openblas()  # before any BLAS work: see fastrun.blas

from .api import load_plan, profile  # noqa: E402
from .errors import FastrunError, InputError, ModelError, PlanNotFoundError  # noqa: E402
from .registry import OnnxFragment, OpSpec, implementation  # noqa: E402
from .session import InferenceSession  # noqa: E402
from .warmup import warmup  # noqa: E402

__all__ = ["InferenceSession", "profile", "load_plan", "warmup", "implementation", "OpSpec", "OnnxFragment",
           "FastrunError", "InputError", "ModelError", "PlanNotFoundError", "__version__"]
