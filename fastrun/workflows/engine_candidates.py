"""Whole-model engines other than onnxruntime as candidates of the end-to-end race.

An engine's first compile of a model runs in a fresh Python process: OpenVINO's
``compile_model`` crashes the process on some models onnxruntime runs (onnxruntime's default
S8S8 QDQ quantization of SqueezeNet segfaults it), and such a model must cost a failed
candidate, never the profile run. Not a forked worker (:mod:`fastrun.measure.isolation`): a fork
of a process that already ran OpenVINO inherits its thread pool's locks and hangs in its first
compile.
"""
from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

from fastrun.ir.graph import Graph
from fastrun.measure import isolation
from fastrun.runtime.engine_api import ModelInput
from fastrun.runtime.engines import OriginalModelSource
from fastrun.runtime.openvino_engine import OpenVINOEngine
from fastrun.runtime.plan import Plan
from fastrun.system.precision import FP32, PRECISIONS
from fastrun.workflows import candidates

log = logging.getLogger(__name__)

COMPILE_TIMEOUT = 300.0  # seconds a first compile may take (VGG-19 on a loaded machine: ~20)
ENGINES = {OpenVINOEngine.name: OpenVINOEngine}

# The fresh process imports OpenVINO only (importing fastrun too took 12 s on a loaded machine)
# and compiles as :meth:`OpenVINOEngine.compile` does, with the same configuration.
PROBE_SCRIPT = """
import json, sys
args = json.loads(sys.argv[1])
import openvino
core = openvino.Core()
try:
    model = core.read_model(args["model"])
    ports = {name: i for i, port in enumerate(model.inputs) for name in port.get_names()}
    if args["shapes"]:
        model.reshape({ports[name]: shape for name, shape in args["shapes"].items()})
    core.compile_model(model, "CPU", args["config"])
except Exception as exc:
    print(f"raised {type(exc).__name__}: " + (str(exc).strip().splitlines() or [""])[0])
"""

_probed: dict[tuple, str] = {}


def compile_problem(engine: str, model: ModelInput, shapes: Mapping[str, Sequence[int]], precision: str,
                    threads: int, timeout: float = COMPILE_TIMEOUT) -> str:
    """Why OpenVINO (``engine``) cannot compile ``model`` ("" when it can), found once per process
    in a fresh one, so that a crash or a hang of the engine ends that process, not this one."""
    identity = model if isinstance(model, str) else hashlib.sha256(model).hexdigest()
    key = (engine, identity, tuple(sorted((k, tuple(v)) for k, v in shapes.items())), precision, threads)
    if key not in _probed:
        _probed[key] = _probe(model, shapes, ENGINES[engine].config(precision, threads), timeout)
    return _probed[key]


def _probe(model: ModelInput, shapes: Mapping[str, Sequence[int]], config: dict, timeout: float) -> str:
    with tempfile.TemporaryDirectory(prefix="fastrun-probe-") as tmp:
        if isinstance(model, bytes):
            path = Path(tmp) / "model.onnx"
            path.write_bytes(model)
            model = str(path)
        args = json.dumps({"model": model, "config": config, "shapes": {k: list(v) for k, v in shapes.items()}})
        try:
            done = subprocess.run([sys.executable, "-c", PROBE_SCRIPT, args], capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return f"its compile timed out after {timeout:g} s"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [""])[-1]
        return f"its compile {isolation.exit_reason(done.returncode)}" + (f": {last}" if done.returncode > 0 and last else "")
    return done.stdout.strip()


# -- OpenVINO's candidates in the race

def openvino_plan(precision: str) -> Callable[[Graph, Plan, Optional[OriginalModelSource]], Optional[Plan]]:
    """The candidate plan maker of OpenVINO at ``precision``: fp32 wherever OpenVINO is installed;
    a reduced precision only when the plan's precision policy allows it (checked native when the
    policy was made). A model whose first compile fails is a failed candidate, recorded in the
    selected plan's ``solver["failed_candidates"]``."""
    def make(graph: Graph, plan: Plan, original: Optional[OriginalModelSource]) -> Optional[Plan]:
        engine = OpenVINOEngine()
        if original is None or precision not in (FP32, plan.precision_policy) or not engine.available():
            return None
        name = candidate_name(precision)
        problem = compile_problem(engine.name, original.source, plan.input_shapes, precision, plan.threads)
        if problem:
            log.info("%s is not a candidate for %s: %s", name, graph.name, problem)
            plan.solver.setdefault("failed_candidates", {})[name] = problem
            return None
        made = candidates.engine_plan(plan, engine.name)
        made.engine_version = engine.version()
        made.precision = precision
        return made
    return make


def candidate_name(precision: str) -> str:
    return OpenVINOEngine.name if precision == FP32 else f"{OpenVINOEngine.name}-{precision}"


for _precision in PRECISIONS:
    candidates.register(candidates.WholeModelCandidate(candidate_name(_precision), openvino_plan(_precision),
                                                       engine=OpenVINOEngine.name))
