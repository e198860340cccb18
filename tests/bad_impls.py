"""Misbehaving Conv implementations for the isolation tests, and a CLI entry that registers them.

Each applies only to Convs with ``C_IN`` input channels (no shipped model or test spec has 5), so
registering them changes nothing else; :func:`registered` removes them again. Every builder
first builds onnxruntime's own kernel (a correct answer) and then misbehaves around it.

``python -m tests.bad_impls NAMES -- fastrun-args...`` registers the named ones (comma-separated,
or ``none``) in this process and runs the ``fastrun`` command line: the way subprocess tests put
user-registered implementations into a real ``fastrun profile`` run.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import time

import numpy as np

from fastrun.ops import kernels, registry
from fastrun.ops.registry import OpSpec, implementation

C_IN = 5
ENV_LOG = "FASTRUN_TEST_LOG"      # file each build appends "name spec pid" to
SLOW_SECONDS = 0.05


def applies(spec: OpSpec) -> bool:
    return spec.op_type == "Conv" and len(spec.inputs[0]) == 4 and spec.inputs[0][1] == C_IN and spec.attr("group") == 1


def _log(name: str, spec: OpSpec) -> None:
    path = os.environ.get(ENV_LOG)
    if path:
        with open(path, "a") as f:
            f.write(f"{name} {spec.key()} {os.getpid()}\n")


def _correct(spec: OpSpec, consts):
    return kernels.build_callable(registry.get("Conv", "ort"), spec, consts)


def build_segv(spec, consts):
    """Dereferences NULL when called."""
    def run(x):
        ctypes.string_at(0)
    return run


def build_abort(spec, consts):
    """Aborts (SIGABRT) while building."""
    os.abort()


def build_hang(spec, consts):
    """Never returns from its first call (writes its pid to $FASTRUN_TEST_LOG first)."""
    _log("hang", spec)

    def run(x):
        while True:
            time.sleep(0.01)
    return run


def build_wrong(spec, consts):
    """Off by 1% everywhere."""
    fn = _correct(spec, consts)
    return lambda x: fn(x) * np.float32(1.01)


def build_slow(spec, consts):
    """Correct, but sleeps 50 ms per call."""
    fn = _correct(spec, consts)

    def run(x):
        time.sleep(SLOW_SECONDS)
        return fn(x)
    return run


def build_oom(spec, consts):
    """Allocates 64 GiB when called."""
    def run(x):
        return np.ones((64 << 30) // 4, np.float32)
    return run


def build_raises(spec, consts):
    """Raises a Python exception when called."""
    def run(x):
        raise RuntimeError("deliberate failure")
    return run


def build_hides_nan(spec, consts):
    """Correct on finite inputs, replaces NaN/Inf outputs by numbers."""
    fn = _correct(spec, consts)
    return lambda x: np.nan_to_num(fn(x))


def build_inplace(spec, consts):
    """Correct output, but scribbles over its input."""
    fn = _correct(spec, consts)

    def run(x):
        y = fn(x)
        x[...] = 0
        return y
    return run


def build_exits(spec, consts):
    """Calls os._exit(0) from candidate code."""
    os._exit(0)


def build_counted(spec, consts):
    """Correct; logs every build (to count which signatures a run measured)."""
    _log("counted", spec)
    return _correct(spec, consts)


BUILDERS = {"segv": build_segv, "abort": build_abort, "hang": build_hang, "wrong": build_wrong, "slow": build_slow,
            "oom": build_oom, "raises": build_raises, "hides_nan": build_hides_nan, "inplace": build_inplace,
            "exits": build_exits, "counted": build_counted}


def impl_id(name: str) -> str:
    return f"test_{name}@1"


def register(names) -> list[str]:
    ids = []
    for name in names:
        builder = BUILDERS[name]
        implementation("Conv", f"test_{name}", applies=applies, heuristic_rank=1, replace=True)(builder)
        ids.append(impl_id(name))
    return ids


def unregister(names) -> None:
    for name in names:
        registry.unregister("Conv", f"test_{name}")


@contextlib.contextmanager
def registered(*names):
    register(names)
    try:
        yield [impl_id(n) for n in names]
    finally:
        unregister(names)


if __name__ == "__main__":
    names = [] if sys.argv[1] == "none" else sys.argv[1].split(",")
    register(names)
    from fastrun.cli import main

    main(args=sys.argv[2:], prog_name="fastrun")
