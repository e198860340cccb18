"""fastrun: measure every implementation of every heavy operator, keep the fastest, serve the plan."""
from fastrun._version import __version__
from fastrun.system.blas import calm_openblas as _calm_openblas

_calm_openblas()  # before any BLAS work: see fastrun.system.blas

from fastrun.errors import FastrunError, InputError, ModelError, PlanNotFoundError  # noqa: E402
from fastrun.ops.registry import OnnxFragment, OpSpec, implementation  # noqa: E402
from fastrun.session import InferenceSession  # noqa: E402
from fastrun.workflows.lookup import load_plan  # noqa: E402
from fastrun.workflows.profile import profile  # noqa: E402
from fastrun.workflows.warmup import warmup  # noqa: E402

__all__ = ["InferenceSession", "profile", "load_plan", "warmup", "implementation", "OpSpec", "OnnxFragment",
           "FastrunError", "InputError", "ModelError", "PlanNotFoundError", "__version__"]
