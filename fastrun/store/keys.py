"""Cache locations and keys: where the stores live and how timings and plans are named in them."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import onnxruntime

from fastrun._version import __version__
from fastrun.shapes import shapes_text as shape_list
from fastrun.system.precision import FP32

ENV_DIR = "FASTRUN_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$FASTRUN_CACHE_DIR``, else ``./cache`` in a fastrun checkout, else ``~/.cache/fastrun``."""
    env = os.environ.get(ENV_DIR)
    if env:
        return Path(env)
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "setup.cfg").exists() and (checkout / "cache").is_dir():
        return checkout / "cache"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastrun"


# How the profiler turns samples into a time; bump it when that changes, so that timings taken
# the old way are never mixed with new ones. 2: lower quartile over >= 0.25 s (1: median).
TIMING_METHOD = 2


def software_tag() -> str:
    """fastrun and onnxruntime versions and the timing method, in every timing key.

    The fingerprint hashes the versions too, but ``FASTRUN_FINGERPRINT`` (a fleet's shared id)
    replaces the fingerprint: an upgrade must still never reuse a timing measured by other software.
    """
    return f"fastrun-{__version__}+ort-{onnxruntime.__version__}+t{TIMING_METHOD}"


def timing_key(fingerprint: str, spec_key: str, impl_id: str) -> str:
    return f"{fingerprint}/{software_tag()}/{spec_key}/{impl_id}"


def plan_key(fingerprint: str, model_hash: str, shapes: dict[str, tuple[int, ...]], exact: bool = False,
             precision: str = FP32) -> str:
    """The key of a plan; exact-mode plans (``plan.exact``) and reduced-precision policies' plans are
    kept apart from the others (a bf16 plan is never found by an fp32 session)."""
    return f"{fingerprint}/{model_hash}/{shapes_part(shapes, exact, precision)}"


def shapes_part(shapes: dict[str, Any], exact: bool = False, precision: str = FP32) -> str:
    """A plan key's last part: the shapes, ``/exact`` for an exact-mode plan, ``@bf16`` (...) for a
    reduced-precision policy's."""
    return shapes_text(shapes) + ("/exact" if exact else "") + precision_suffix(precision)


def precision_suffix(precision: str) -> str:
    return "" if precision == FP32 else f"@{precision}"


def shapes_text(shapes: dict[str, Any]) -> str:
    """``{"x": (1, 3)}`` -> ``"x:1x3"`` (the ``--shape`` syntax, sorted by input name)."""
    return shape_list(dict(sorted(shapes.items())), sep=",")


def fingerprint_of(key: str) -> str:
    return key.split("/", 1)[0]
