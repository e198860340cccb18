#!/usr/bin/env python
"""Start-up of an OpenVINO plan's stored forms against onnxruntime's session creation.

For each light model (random weights, saved as a file as users ship them), round-robin in one
process after a warm-up round (imports and lazy initialisation not counted), medians of:
  ort_session     onnxruntime.InferenceSession(path) (what a user had)
  ov_compile      OpenVINO read_model + compile_model from the ONNX file, no cache (what serving
                  would pay without a stored form)
  ov_import_blob  import_model of the exported compiled blob fastrun stores with the plan
  ov_cache_dir    compile_model(path) with OpenVINO's CACHE_DIR already holding the model
Settings as fastrun compiles them (fastrun.runtime.openvino_engine.OpenVINOEngine.config, fp32).

    python scripts/bench_engine_startup.py --models squeezenet resnet50 densenet121 --rounds 5
"""
from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import onnx
import onnxruntime as ort
import openvino as ov

from fastrun.runtime.openvino_engine import OpenVINOEngine
from fastrun.workflows import models


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["squeezenet", "resnet50", "densenet121"])
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    config = OpenVINOEngine.config("fp32", 0)
    core = ov.Core()
    print(f"onnxruntime {ort.__version__}, openvino {ov.get_version()}; medians of {args.rounds} rounds (s)")
    print(f"{'model':<14} {'ort_session':>12} {'ov_compile':>11} {'ov_import_blob':>15} {'ov_cache_dir':>13}  blob MB")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            path = str(Path(tmp) / f"{name}.onnx")
            onnx.save(models.randomized(models.example_path(name), seed=0), path)
            cache = Path(tmp) / f"ov-cache-{name}"
            stream = io.BytesIO()
            core.compile_model(core.read_model(path), "CPU", config).export_model(stream)
            blob = stream.getvalue()
            core.compile_model(path, "CPU", {**config, "CACHE_DIR": str(cache)})  # fills the cache
            contestants = {
                "ort_session": lambda: ort.InferenceSession(path, providers=["CPUExecutionProvider"]),
                "ov_compile": lambda: ov.Core().compile_model(ov.Core().read_model(path), "CPU", config),
                "ov_import_blob": lambda: ov.Core().import_model(io.BytesIO(blob), "CPU", config),
                "ov_cache_dir": lambda: ov.Core().compile_model(path, "CPU", {**config, "CACHE_DIR": str(cache)}),
            }
            seconds: dict[str, list[float]] = {k: [] for k in contestants}
            for round_ in range(args.rounds + 1):
                for k, make in contestants.items():
                    t0 = time.perf_counter()
                    made = make()
                    if round_:
                        seconds[k].append(time.perf_counter() - t0)
                    del made
            med = {k: statistics.median(v) for k, v in seconds.items()}
            print(f"{name:<14} {med['ort_session']:>12.3f} {med['ov_compile']:>11.3f} {med['ov_import_blob']:>15.3f} "
                  f"{med['ov_cache_dir']:>13.3f}  {len(blob) / 1e6:.1f}")


if __name__ == "__main__":
    main()
