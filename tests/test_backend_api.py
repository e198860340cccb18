"""fastrun.backend's own surface: what onnxruntime.backend offers, checked against onnxruntime."""
import unittest

import numpy as np
import onnx
import onnxruntime.backend
import pytest
from onnx import helper

import fastrun.backend as backend
from tests.conftest import tiny_conv_model


def test_run_model_matches_onnxruntime_for_proto_bytes_and_path(tiny_model, cache_dir):
    x = np.random.default_rng(0).standard_normal((1, 8, 12, 12)).astype(np.float32)
    (want,) = onnxruntime.backend.run(tiny_model, [x])
    model = onnx.load(tiny_model)
    for source in (model, model.SerializeToString(), tiny_model):
        outputs = backend.run_model(source, [x], cache_dir=cache_dir)
        np.testing.assert_allclose(outputs[0], want, rtol=1e-4, atol=1e-5)
    rep = backend.prepare(model, "CPU", cache_dir=cache_dir, policy="heuristic")
    np.testing.assert_allclose(rep.run(x)[0], want, rtol=1e-4, atol=1e-5)  # one array for a one-input model
    np.testing.assert_allclose(rep.run({"x": x})[0], want, rtol=1e-4, atol=1e-5)
    assert backend.prepare(rep) is rep


def test_run_node_matches_onnxruntime_reference():
    node = helper.make_node("Gemm", ["a", "b", "c"], ["y"], transB=1, alpha=0.5)
    rng = np.random.default_rng(1)
    a, b, c = (rng.standard_normal(s).astype(np.float32) for s in ((3, 4), (5, 4), (5,)))
    (y,) = backend.run_node(node, [a, b, c])
    np.testing.assert_allclose(y, 0.5 * a @ b.T + c, rtol=1e-5, atol=1e-6)


def test_devices_and_compatibility():
    model = tiny_conv_model()
    assert backend.supports_device("CPU") and not backend.supports_device("CUDA")
    assert backend.is_compatible(model) and not backend.is_compatible(model, "CUDA")
    with pytest.raises(RuntimeError, match="CUDA"):
        backend.prepare(model, "CUDA")


def test_unreleased_opset_is_skipped_as_onnxruntime_does():
    model = tiny_conv_model()
    model.opset_import[0].version = 10_000
    model.ir_version = onnx.IR_VERSION
    assert not backend.is_compatible(model)
    with pytest.raises(unittest.SkipTest):
        backend.prepare(model)


def test_wrong_input_count_is_one_clear_error(tiny_model, cache_dir):
    rep = backend.prepare(tiny_model, cache_dir=cache_dir)
    with pytest.raises(RuntimeError, match="expects 1 inputs"):
        rep.run([])
