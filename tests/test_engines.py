"""Whole-model engines and the precision policy: OpenVINO against onnxruntime on real models."""
import numpy as np
import onnxruntime
import pytest

from fastrun.runtime import openvino_engine
from fastrun.system import precision
from tests.conftest import tiny_conv_model

ENGINE = openvino_engine.OpenVINOEngine()
needs_openvino = pytest.mark.skipif(not ENGINE.available(), reason="OpenVINO is not installed here")
AVX512_BF16 = {"avx2", "avx512f", "avx512_bf16"}
AVX2_ONLY = {"avx2", "fma"}


def test_native_precisions_follow_the_cpu_flags():
    assert precision.native(AVX2_ONLY) == ("fp32",)
    assert precision.native(AVX512_BF16) == ("fp32", "bf16")
    assert precision.native({"amx_bf16", "avx512_fp16"}) == ("fp32", "bf16", "fp16")
    assert ENGINE.precisions({"amx_bf16"}) == ("fp32", "bf16")


def test_reduced_precision_is_refused_where_the_cpu_has_no_native_support():
    with pytest.raises(precision.PrecisionError, match="no native bf16"):
        precision.policy("bf16", 1e-2, flags=AVX2_ONLY)
    allowed = precision.policy("bf16", 5e-3, flags=AVX512_BF16)
    assert (allowed.precision, allowed.tolerance, allowed.key_suffix()) == ("bf16", 5e-3, "@bf16")
    assert precision.policy("bfloat16", flags=AVX512_BF16).tolerance == precision.DEFAULT_TOLERANCE


def test_the_default_policy_is_fp32_with_unchanged_keys():
    default = precision.policy()
    assert (default.precision, default.reduced, default.key_suffix()) == ("fp32", False, "")
    assert precision.policy("F32", flags=AVX2_ONLY).precision == "fp32"


@pytest.mark.parametrize("bad, message", [("int4", "unknown precision"), ("bf16", "positive")])
def test_bad_precision_requests_get_one_line_errors(bad, message):
    with pytest.raises(precision.PrecisionError, match=message):
        precision.policy(bad, tolerance=0.0 if bad == "bf16" else None, flags=AVX512_BF16)


def test_openvino_configuration_is_always_explicit():
    config = ENGINE.config("fp32", 2)
    assert config["INFERENCE_PRECISION_HINT"] == "f32"  # the CPU plugin's default is bf16 where native
    assert (config["NUM_STREAMS"], config["INFERENCE_NUM_THREADS"], config["PERFORMANCE_HINT"]) == (1, 2, "LATENCY")
    with pytest.raises(ValueError, match="no precision"):
        ENGINE.config("int4", 1)


@needs_openvino
def test_openvino_answers_as_onnxruntime_and_its_blob_loads_back(tmp_path):
    path = tmp_path / "tiny.onnx"
    import onnx
    onnx.save(tiny_conv_model(batch="N"), str(path))
    feed = {"x": np.random.default_rng(0).standard_normal((2, 8, 12, 12)).astype(np.float32)}
    expected = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    compiled = ENGINE.compile(str(path), {"x": (2, 8, 12, 12)}, "fp32", 1)
    assert (compiled.inputs, compiled.outputs) == (["x"], ["y"])
    got = compiled.run(["y"], feed)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    loaded = ENGINE.load(ENGINE.export(compiled), "fp32", 1)
    np.testing.assert_allclose(loaded.run(None, feed)[0], expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(KeyError, match="no output 'z'"):
        compiled.run(["z"], feed)


@needs_openvino
def test_openvino_compiles_serialized_models_too(squeezenet_bytes):
    feed = {"data_0": np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    expected = onnxruntime.InferenceSession(squeezenet_bytes, providers=["CPUExecutionProvider"]).run(None, feed)[0]
    got = ENGINE.compile(squeezenet_bytes, {}, "fp32", 0).run(None, feed)[0]
    assert np.max(np.abs(got - expected)) / np.max(np.abs(expected)) < 1e-4


@needs_openvino
def test_a_users_thread_cap_bounds_an_openvino_plan(tmp_path, monkeypatch):
    """intra_op_num_threads caps a whole-model OpenVINO plan as it caps onnxruntime's segments."""
    import onnx

    from fastrun.runtime.engines import OriginalModelSource
    from fastrun.runtime.program import instantiate
    from fastrun.runtime.recipe import ModelRecipe, Recipe

    path = str(tmp_path / "tiny.onnx")
    onnx.save(tiny_conv_model(), path)
    asked = []
    config = openvino_engine.OpenVINOEngine.config
    monkeypatch.setattr(openvino_engine.OpenVINOEngine, "config",
                        staticmethod(lambda precision, threads: asked.append(threads) or config(precision, threads)))
    part = ModelRecipe(ENGINE.name, ["x"], ["y"], 0, "fp32", ENGINE.version(), {"x": [1, 8, 12, 12]})
    program = instantiate(Recipe(parts=[part], constants={}, outputs={"y": "y"}), 1, OriginalModelSource(path))
    assert asked == [1]
    feed = {"x": np.random.default_rng(0).standard_normal((1, 8, 12, 12)).astype(np.float32)}
    expected = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feed)[0]
    np.testing.assert_allclose(program.run(feed)["y"], expected, rtol=1e-4, atol=1e-5)


def test_the_version_is_known_without_importing_openvino():
    assert ENGINE.version() == openvino_engine.installed_version()


@needs_openvino
def test_a_model_that_crashes_the_engine_costs_a_failed_candidate_not_the_process(tmp_path, monkeypatch):
    from fastrun.workflows import engine_candidates
    from fastrun.workflows.engine_candidates import compile_problem
    from tests import zoo
    monkeypatch.setattr(engine_candidates, "_probed", {})
    ENGINE.compile(str(zoo.fixture_path("resnet")), {}, "fp32", 1)  # OpenVINO's threads exist here now
    assert compile_problem("openvino", str(zoo.fixture_path("resnet")), {}, "fp32", 1) == ""
    assert compile_problem("openvino", b"not a model", {}, "fp32", 1).startswith("raised ")
    # onnxruntime's default QDQ SqueezeNet segfaults compile_model (OpenVINO 2026.4): a crash like it
    monkeypatch.setattr(engine_candidates, "PROBE_SCRIPT", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    assert compile_problem("openvino", b"", {}, "fp32", 1) == "its compile crashed with signal SIGSEGV"
