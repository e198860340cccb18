"""Whole-model engines other than onnxruntime as candidates of the end-to-end race.

An engine's first compile of a model runs in a fresh Python process: OpenVINO's
``compile_model`` crashes the process on some models onnxruntime runs (onnxruntime's default
S8S8 QDQ quantization of SqueezeNet segfaults it), and such a model must cost a failed
candidate, never the profile run. Not a forked worker (:mod:`fastrun.measure.isolation`): a fork
of a process that already ran OpenVINO inherits its thread pool's locks and hangs in its first
compile.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

from fastrun.measure import isolation
from fastrun.runtime.engine_api import ModelInput
from fastrun.runtime.openvino_engine import OpenVINOEngine

log = logging.getLogger(__name__)

COMPILE_TIMEOUT = 300.0  # seconds a first compile may take (VGG-19 on a loaded machine: ~20)
ENGINES = {OpenVINOEngine.name: OpenVINOEngine}
PROBE_MODULE = __name__  # the module whose probe_main() the fresh process runs


def compile_problem(engine: str, model: ModelInput, shapes: Mapping[str, Sequence[int]], precision: str,
                    threads: int, timeout: float = COMPILE_TIMEOUT) -> str:
    """Why ``engine`` cannot compile ``model`` ("" when it can), found in a fresh process so that a
    crash or a hang of the engine ends that process, not this one."""
    with tempfile.TemporaryDirectory(prefix="fastrun-probe-") as tmp:
        if isinstance(model, bytes):
            path = Path(tmp) / "model.onnx"
            path.write_bytes(model)
            model = str(path)
        args = json.dumps({"engine": engine, "model": str(model), "precision": precision, "threads": threads,
                           "shapes": {k: list(v) for k, v in shapes.items()}})
        code = f"from {PROBE_MODULE} import probe_main; probe_main()"
        try:
            done = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return f"its compile timed out after {timeout:g} s"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [""])[-1]
        return f"its compile {isolation.exit_reason(done.returncode)}" + (f": {last}" if done.returncode > 0 and last else "")
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


def probe_main() -> None:
    """The fresh process of :func:`compile_problem`: prints "" or why the compile failed."""
    args = json.loads(sys.argv[-1])
    engine = ENGINES[args["engine"]]()
    try:
        engine.compile(args["model"], args["shapes"], args["precision"], args["threads"])
    except Exception as exc:
        print(isolation.describe_exception(exc))
        return
    print("")
