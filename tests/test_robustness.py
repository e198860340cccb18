"""Numerical safety of the candidate check, corrupt or foreign cache entries, and one clear error
for every kind of bad model or input."""
from __future__ import annotations

import json
import logging
import math
import os
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

import fastrun
from fastrun.workflows import verify
from fastrun.measure import checking, profiler
from fastrun.ops import registry
from fastrun.store.cache import Caches
from fastrun.cli import main
from fastrun.errors import InputError
from fastrun.system.fingerprint import fingerprint
from fastrun.ops.registry import implementation
from tests import bad_impls
from tests.conftest import tiny_conv_model
from tests.test_impls import SPECS, conv_spec

# ------------------------------------------------------------------------------ numerical safety


def _measure_here(spec, impls=None) -> dict:
    impls = registry.candidates(spec) if impls is None else impls
    return profiler.Profiler(None, "fp", op_limit_s=0.01, isolate=False)._measure(spec, impls)


NUMERIC_SPECS = ["c3x3_s1_asym_pad_relu", "c3x3_s1_odd_tiles_clip", "c3x3_s1_leaky", "c3x3_s1_p1_nobias_c32",
                 "c5x5_s1_p2", "c7x7_s2_p3_stem", "dw3x3_s1_p1", "c1x1_s2", "c1x1_s1_b2_relu", "mm_batched_bcast",
                 "mm_batched_const", "gemm_transA_alpha_beta_full_c", "gemm_runtime_c"]


@pytest.mark.parametrize("name", NUMERIC_SPECS)
def test_every_builtin_candidate_passes_zeros_large_and_nonfinite_inputs(name):
    """No false rejections: fast algorithms that spread NaN/Inf over a tile are accepted."""
    timings = _measure_here(SPECS[name])
    bad = {k: t.reason for k, t in timings.items() if not t.ok}
    assert not bad


def test_winograd_and_fft_spread_nonfinite_values_and_are_still_accepted():
    spec = conv_spec(1, 6, 16, 16, 8, 5, 5, pads=2)  # FFT applies
    spec3 = conv_spec(1, 8, 12, 12, 8, 3, 3, pads=1, act="Sigmoid")
    for s, names in ((spec, ("fft_conv",)), (spec3, ("winograd_f4", "winograd_f6"))):
        rng = np.random.default_rng(checking.spec_seed(s))
        from fastrun.ops import kernels

        consts, args = kernels.random_inputs(s, rng)
        case = checking.check_inputs(s, args, rng)["nonfinite"]
        ref = kernels.reference_callable(s, consts)(*case)
        for n in names:
            impl = registry.get("Conv", n)
            with np.errstate(all="ignore"):
                out = checking.run_candidate(kernels.build_callable(impl, s, consts), impl, s, case)
            assert np.count_nonzero(~np.isfinite(out)) > np.count_nonzero(~np.isfinite(ref)), n  # it does spread
            assert checking.compare_nonfinite(out, ref)[1] == "", n
        timings = _measure_here(s, [registry.get("Conv", n) for n in names])
        assert all(t.ok for t in timings.values()), {k: t.reason for k, t in timings.items()}


def test_compare_policies():
    ref = np.array([1.0, np.nan, np.inf, -np.inf, 2.0], np.float32)
    same = ref.copy()
    assert checking.compare(same, ref) == (0.0, "")
    assert "NaNs differ" in checking.compare(np.array([1, 0, np.inf, -np.inf, 2], np.float32), ref)[1]
    assert "sign" in checking.compare(np.array([1, np.nan, -np.inf, -np.inf, 2], np.float32), ref)[1]
    assert checking.compare(ref.astype(np.float64), ref)[1].startswith("output dtype")
    assert checking.compare(ref[:3], ref)[1].startswith("output shape")
    assert checking.compare([1.0], ref)[1].startswith("returned list")
    # NaN/Inf inputs: non-finite may spread (and NaN stands for Inf), but never be hidden
    spread = np.array([np.nan, np.inf, np.nan, np.nan, 2.0], np.float32)
    assert checking.compare_nonfinite(spread, ref) == (0.0, "")
    hidden = np.array([1.0, 0.0, np.inf, -np.inf, 2.0], np.float32)
    assert "hides NaN/Inf: 1 outputs" in checking.compare_nonfinite(hidden, ref)[1]
    off = np.array([1.5, np.nan, np.inf, -np.inf, 2.0], np.float32)
    err, why = checking.compare_nonfinite(off, ref)
    assert not why and err == pytest.approx(0.25)


def test_tolerance_scales_with_reduction_length_and_dtype():
    small, big = conv_spec(1, 4, 8, 8, 4, 1, 1), conv_spec(1, 256, 8, 8, 4, 3, 3)
    assert checking.tolerance(small) == pytest.approx(1e-4)
    assert checking.tolerance(big) == pytest.approx(1e-4 * math.sqrt(256 * 9 / 64))
    import dataclasses

    assert checking.tolerance(dataclasses.replace(small, dtype="float16")) == pytest.approx(1e-2)
    assert checking.tolerance(dataclasses.replace(small, dtype="float64")) < 1e-10


def _bad_builders():
    def correct(spec, consts):
        return bad_impls._correct(spec, consts)

    def wrong_on_zeros(spec, consts):
        fn = correct(spec, consts)
        return lambda x: fn(x) + np.float32(0.0 if x.any() else 1.0)

    def overflows(spec, consts):
        fn = correct(spec, consts)
        scale = np.float32(2.0 ** 40)  # exact on ordinary inputs (no bias), overflows on 1e30
        return lambda x: fn(x * scale) / scale

    def float64_out(spec, consts):
        fn = correct(spec, consts)
        return lambda x: fn(x).astype(np.float64)

    def wrong_shape(spec, consts):
        fn = correct(spec, consts)
        return lambda x: fn(x)[:, :-1]

    def returns_none(spec, consts):
        return lambda x: None

    def build_raises(spec, consts):
        raise ValueError("cannot build this")

    def fails_when_timed(spec, consts):
        fn, calls = correct(spec, consts), []

        def run(x):
            calls.append(1)
            if len(calls) > 5:  # 4 checks and the warm-up pass
                raise RuntimeError("gave up on call 6")
            return fn(x)
        return run

    def scribbles_on_weights(spec, consts):
        consts[1] *= 2  # would corrupt the weights every other candidate is built from
        return correct(spec, consts)

    return {"wrong_on_zeros": (wrong_on_zeros, "wrong result on all-zero input: relative error"),
            "overflows": (overflows, "wrong result on large-magnitude (1e30) input: NaNs differ"),
            "float64_out": (float64_out, "output dtype float64 != reference float32"),
            "wrong_shape": (wrong_shape, "output shape (1, 7, 10, 10) != reference (1, 8, 10, 10)"),
            "returns_none": (returns_none, "returned NoneType, not an array"),
            "build_raises": (build_raises, "build raised ValueError: cannot build this"),
            "scribbles_on_weights": (scribbles_on_weights, "build raised ValueError: output array is read-only"),
            "fails_when_timed": (fails_when_timed, "raised RuntimeError: gave up on call 6 while being timed")}


def test_each_failed_check_is_recorded_with_its_reason():
    builders = _bad_builders()
    for name, (builder, _) in builders.items():
        implementation("Conv", f"test_{name}", applies=bad_impls.applies, replace=True)(builder)
    try:
        spec = conv_spec(1, bad_impls.C_IN, 10, 10, 8, 3, 3, pads=1, bias=False)
        impls = [registry.get("Conv", f"test_{n}") for n in builders] + [registry.get("Conv", "ort")]
        timings = _measure_here(spec, impls)
    finally:
        for name in builders:
            registry.unregister("Conv", f"test_{name}")
    assert timings["ort@2"].ok
    for name, (_, why) in builders.items():
        t = timings[f"test_{name}@1"]
        assert t.status == "failed" and t.time_ms is None and why in t.reason, (name, t.reason)


# ------------------------------------------------------------------------------ corrupt caches

def _profile(model, cache_dir, **kw):
    return fastrun.profile(model, cache_dir=cache_dir, op_limit=0.05, measure=False, verify=False, isolate=False, **kw)


def _conv_keys(model_bytes):
    g = fastrun.ir.reader.load(model_bytes)
    conv = next(n for n in g.nodes if n.op_type == "Conv")
    spec = fastrun.ir.graph.spec_for_node(conv, g)
    return spec, {impl.id: Caches.timing_key(fingerprint(), spec.key(), impl.id) for impl in registry.candidates(spec)}


CORRUPT_TIMINGS = {
    "truncated JSON": '{"schema": 1, "impl": "ort@2", "stat',
    "wrong schema": json.dumps({"schema": 99, "impl": "ort@2", "status": "ok", "time_ms": 0.001}),
    "not JSON": "\x00\x01 not json at all",
    "not an object": "[1, 2, 3]",
    "time is text": json.dumps({"schema": 1, "impl": "ort@2", "status": "ok", "time_ms": "fast"}),
    "negative time": json.dumps({"schema": 1, "impl": "ort@2", "status": "ok", "time_ms": -5.0}),
    "infinite time": '{"schema": 1, "impl": "ort@2", "status": "ok", "time_ms": Infinity}',
    "unknown status": json.dumps({"schema": 1, "impl": "ort@2", "status": "great", "time_ms": 0.001}),
    "ok without time": json.dumps({"schema": 1, "impl": "ort@2", "status": "ok"}),
    "another impl's timing": json.dumps({"schema": 1, "impl": "im2col_gemm@1", "status": "ok", "time_ms": 1e-6}),
    "bogus format": json.dumps({"schema": 1, "impl": "ort@2", "status": "ok", "time_ms": 0.001,
                                "in_format": "NCHW7x"}),
}


def test_corrupt_timing_entries_are_reported_once_and_measured_again(cache_dir, caplog):
    model = tiny_conv_model(batch=1).SerializeToString()
    _profile(model, cache_dir)
    spec, keys = _conv_keys(model)
    caches = Caches(cache_dir)
    good = caches.timings.get(keys["ort@2"])
    assert good and good["status"] == "ok"
    for label, raw in CORRUPT_TIMINGS.items():
        caches.timings._cache.set(keys["ort@2"], raw)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            report = _profile(model, cache_dir)
        assert report.stats.measured == 1 and report.stats.specs_measured == 1, label  # only that entry
        warned = [r for r in caplog.records if keys["ort@2"] in r.getMessage()]
        assert len(warned) == 1, (label, [r.getMessage() for r in caplog.records])
        assert report.plan.node("conv1").candidates["ort@2"] != 1e-6
        rebuilt = caches.timings.get(keys["ort@2"])
        assert rebuilt["status"] == "ok" and rebuilt["time_ms"] > 0, label  # rebuilt
    caches.close()


def test_pickled_timing_entry_is_never_unpickled(cache_dir, tmp_path):
    import diskcache

    model = tiny_conv_model(batch=1).SerializeToString()
    _profile(model, cache_dir)
    _, keys = _conv_keys(model)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    raw = diskcache.Cache(os.path.join(cache_dir, "timings"))
    raw.set(keys["ort@2"], Evil())
    raw.close()
    report = _profile(model, cache_dir)
    assert not marker.exists()
    assert report.stats.measured == 1


def test_corrupt_light_op_and_reorder_timings_are_measured_again(cache_dir, caplog):
    model = tiny_conv_model(batch=1).SerializeToString()
    _profile(model, cache_dir)
    caches = Caches(cache_dir)
    aux = [k for k in caches.timings.keys() if k.endswith("/ms")]
    assert aux
    for k in aux:
        caches.timings._cache.set(k, json.dumps({"schema": 1, "ms": "NaN-ish"}))
    with caplog.at_level(logging.WARNING):
        report = _profile(model, cache_dir)
    assert report.plan.predicted_ms > 0
    assert all(isinstance(caches.timings.get(k)["ms"], float) for k in aux)
    assert sum("corrupt timing cache entry" in r.getMessage() for r in caplog.records) == len(aux)
    caches.close()


def test_damaged_timings_database_does_not_stop_profiling_or_serving(cache_dir):
    model = tiny_conv_model(batch=1).SerializeToString()
    _profile(model, cache_dir)
    db = os.path.join(cache_dir, "timings", "cache.db")
    with open(db, "r+b") as f:
        f.write(os.urandom(8192))
    report = _profile(model, cache_dir)
    assert report.plan.policy in ("profiled", "partial") and report.stats.specs_measured + report.stats.specs_cached == 2
    x = {"x": np.random.default_rng(0).standard_normal((1, 8, 12, 12)).astype(np.float32)}
    out = fastrun.InferenceSession(model, cache_dir=cache_dir).run(None, x)
    ref = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, x)
    assert verify.relative_error(out, ref) < verify.MODEL_TOLERANCE


def _forge(v: dict, how: str) -> None:
    nodes = v["nodes"]
    if how == "another model's plan":
        v["model_hash"] = "0" * 64
    elif how == "unknown format":
        v["tensor_formats"] = {k: "NCHW99c" for k in v["tensor_formats"]} or {"c1": "NCHW99c"}
    elif how == "formats that never meet":
        v["tensor_formats"] = {k: "NHWC" for k in v["tensor_formats"]} or {"c1": "NHWC"}
    elif how == "implementation in the wrong formats":
        nodes[0].update(impl="ort_nchwc@2", in_formats=["NCHW"], out_format="NCHW")
    elif how == "implementation that does not apply":
        nodes[0].update(impl="conv1x1_gemm@1", in_formats=["NCHW"], out_format="NCHW")
        v["tensor_formats"] = {}
        v["reorders"] = []
        for n in nodes:
            n.update(in_formats=["NCHW"] * len(n["in_formats"]), out_format="NCHW")
            if n["impl"] not in ("onnxruntime", "conv1x1_gemm@1"):
                n["impl"] = "ort@2"
    elif how == "missing formats":
        nodes[0]["in_formats"] = None
    elif how == "reorder to nowhere":
        v["reorders"] = [["x", "NCHW", "bogus"]]
    elif how == "light op for a heavy node":
        nodes[0]["impl"] = "onnxruntime"
    elif how == "heavy implementation for a light node":
        nodes[-1]["impl"] = "ort@2"
    elif how == "impl is a number":
        nodes[0]["impl"] = 5
    elif how == "a node missing":
        del nodes[1]
    elif how == "whole_model is text":
        v["whole_model"] = "yes"
    else:
        raise AssertionError(how)


FORGERIES = ["another model's plan", "unknown format", "formats that never meet", "implementation in the wrong formats",
             "implementation that does not apply", "missing formats", "reorder to nowhere", "light op for a heavy node",
             "heavy implementation for a light node", "impl is a number", "a node missing", "whole_model is text"]


def test_forged_or_damaged_plans_are_never_used_and_never_raise(cache_dir, caplog):
    """Schema, model hash and fingerprint all match, the content does not: serve the heuristic plan."""
    model = tiny_conv_model(batch=1).SerializeToString()
    _profile(model, cache_dir)
    caches = Caches(cache_dir)
    (key,) = list(caches.plans.keys())
    good = caches.plans.get(key)
    x = {"x": np.random.default_rng(0).standard_normal((1, 8, 12, 12)).astype(np.float32)}
    ref = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, x)
    assert list(fastrun.InferenceSession(model, cache_dir=cache_dir).plans.values())[0].policy == "profiled"
    for how in FORGERIES:
        v = json.loads(json.dumps(good))
        _forge(v, how)
        caches.plans._cache.set(key, json.dumps(v))
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            sess = fastrun.InferenceSession(model, cache_dir=cache_dir, policy="heuristic")
            out = sess.run(None, x)
        assert list(sess.plans.values())[0].policy == "heuristic", how
        assert any("ignoring the cached plan" in r.getMessage() for r in caplog.records), how
        assert verify.relative_error(out, ref) < verify.MODEL_TOLERANCE, how
        assert fastrun.load_plan(model, cache_dir=cache_dir) is None, how
    caches.close()


# ------------------------------------------------------------------------------ bad models and inputs

def _model(nodes, inputs, outputs, inits=(), opset=13, domains=()):
    m = helper.make_model(helper.make_graph(nodes, "bad", inputs, outputs, list(inits)),
                          opset_imports=[helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains])
    m.ir_version = 8
    return m.SerializeToString()


def _vi(name, shape):
    return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape)


def _w(name, shape):
    return numpy_helper.from_array(np.zeros(shape, np.float32), name)


def _cycle():
    m = tiny_conv_model(batch=1)
    m.graph.node[0].input[0] = "y"  # conv1 reads the output of the last node
    return m.SerializeToString()


def _truncated():
    data = tiny_conv_model(batch=1).SerializeToString()
    return data[: len(data) * 2 // 3]


BAD_MODELS = {
    "empty file": (lambda: b"", [], "empty file"),
    "random bytes": (lambda: np.random.default_rng(0).bytes(3000), [], "not an ONNX model"),
    "truncated protobuf": (_truncated, [], "not an ONNX model"),
    "cycle": (_cycle, [], "invalid ONNX model"),
    "dangling input": (lambda: _model([helper.make_node("Relu", ["nowhere"], ["y"])], [_vi("x", [1, 2])], [_vi("y", [1, 2])]),
                       [], "nowhere"),
    "unknown domain": (lambda: _model([helper.make_node("Frob", ["x"], ["y"], domain="com.example")], [_vi("x", [1, 2])],
                                      [_vi("y", [1, 2])], domains=["com.example"]), [], "unknown domain 'com.example'"),
    "opset too old": (lambda: _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", [1, 2])], [_vi("y", [1, 2])], opset=5),
                      [], "opset 5 is too old"),
    "conv weight contradicts kernel_shape": (
        lambda: _model([helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[5, 5])], [_vi("x", [1, 4, 8, 8])],
                       [_vi("y", [1, 2, 6, 6])], [_w("w", (2, 4, 3, 3))]), [], "kernel_shape [5, 5] contradicts weight shape"),
    "conv weight contradicts group": (
        lambda: _model([helper.make_node("Conv", ["x", "w"], ["y"], group=2)], [_vi("x", [1, 4, 8, 8])],
                       [_vi("y", [1, 2, 6, 6])], [_w("w", (2, 4, 3, 3))]), [], "contradicts input shape [1, 4, 8, 8] with group=2"),
    "input declared with an unsupported type": (
        lambda: _model([helper.make_node("Relu", ["x"], ["y"])],
                       [helper.make_tensor_value_info("x", onnx.TensorProto.BFLOAT16, [1, 2])], [_vi("y", [1, 2])]),
        [], "unsupported element type BFLOAT16"),
    "--shape contradicts a fixed dim": (lambda: tiny_conv_model(batch=1).SerializeToString(), ["--shape", "x:1x4x12x12"],
                                        "dim 1 is fixed to 8 by the model, --shape gives 4"),
    "--shape has the wrong rank": (lambda: tiny_conv_model(batch=1).SerializeToString(), ["--shape", "x:1x8x12"],
                                   "has rank 3, the model declares rank 4"),
    "--shape too small for the kernel": (lambda: tiny_conv_model(hw="H").SerializeToString() if False else
                                         _model([helper.make_node("Conv", ["x", "w"], ["y"])], [_vi("x", [1, 4, "H", "W"])],
                                                [_vi("y", [1, 2, None, None])], [_w("w", (2, 4, 3, 3))]),
                                         ["--shape", "x:1x4x2x2"], "shapes do not fit the model"),
}


@pytest.mark.parametrize("case", list(BAD_MODELS))
def test_bad_models_get_one_clear_error_line_and_exit_1(case, tmp_path):
    build, extra, needle = BAD_MODELS[case]
    path = tmp_path / "bad.onnx"
    path.write_bytes(build())
    res = CliRunner().invoke(main, ["profile", str(path), "--cache-dir", str(tmp_path / "c"), "--no-measure",
                                    "--op-limit", "0.05"] + extra)
    assert res.exit_code == 1, (case, res.output)
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), (case, res.output)
    assert needle in lines[0], (case, lines[0])
    assert "Traceback" not in res.output and res.exception is None or isinstance(res.exception, SystemExit)


def test_symbolic_model_fed_a_size_its_conv_cannot_take(cache_dir):
    model = _model([helper.make_node("Conv", ["x", "w"], ["y"])], [_vi("x", [1, 4, "H", "W"])],
                   [_vi("y", [1, 2, None, None])], [_w("w", (2, 4, 3, 3))])
    """The heuristic plan cannot take 2x2 (fastrun's shape check says so); onnxruntime's error is raised."""
    sess = fastrun.InferenceSession(model, cache_dir=cache_dir, policy="heuristic")
    ref = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    assert sess.run(None, {"x": np.ones((1, 4, 5, 5), np.float32)})[0].shape == (1, 2, 3, 3)
    for bad in (np.ones((1, 4, 2, 2), np.float32), np.ones((1, 3, 5, 5), np.float32)):
        with pytest.raises(Exception) as want:
            ref.run(None, {"x": bad})
        with pytest.raises(type(want.value), match="onnxruntime|ONNXRuntimeError"):
            sess.run(None, {"x": bad})


# ------------------------------------------------------------------------------ prepare hooks

_PREPARED_IN: list[int] = []


def _slow_prepare() -> None:
    """Stands in for a JIT compilation: longer than the per-call time limit below."""
    time.sleep(1.5)
    _PREPARED_IN.append(os.getpid())


def _needs_prepare(spec, consts):
    if not _PREPARED_IN:  # a forked worker sees what the parent prepared
        raise RuntimeError("built before prepare")
    return bad_impls._correct(spec, consts)


def test_prepare_runs_once_in_the_parent_before_workers_and_outside_the_time_limit(tmp_path):
    implementation("Conv", "test_needs_prepare", applies=bad_impls.applies, prepare=_slow_prepare,
                   replace=True)(_needs_prepare)
    _PREPARED_IN.clear()
    try:
        impl = registry.get("Conv", "test_needs_prepare")
        for c_out in (8, 6):  # two signatures: two isolated measurements, one prepare
            spec = conv_spec(1, bad_impls.C_IN, 10, 10, c_out, 3, 3, pads=1, bias=False)
            prof = profiler.Profiler(Caches(str(tmp_path / "cache")), fingerprint(), op_limit_s=0.05, op_timeout=1.0)
            t = prof.profile(spec, [impl])[impl.id]
            assert t.ok, t.reason
    finally:
        registry.unregister("Conv", "test_needs_prepare")
    assert _PREPARED_IN == [os.getpid()]
