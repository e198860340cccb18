"""Models onnxruntime runs that fastrun's front end once refused or changed: each runs through the
specialised graph (heuristic plan) and answers as onnxruntime does."""
from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T, helper, numpy_helper

import fastrun
from fastrun.ir import reader
from tests.conftest import tiny_conv_model


def _answers(model, feed, cache_dir, source=None) -> fastrun.InferenceSession:
    source = source or model.SerializeToString()
    want = ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feed)
    session = fastrun.InferenceSession(source, cache_dir=cache_dir, policy="heuristic")
    got = session.run(None, feed)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64), rtol=1e-4, atol=1e-5)
    return session


def _if_reading_outer_scope() -> onnx.ModelProto:
    """If whose branches read an initializer (W) and a tensor (h) of the enclosing graph only."""
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3) / 10, "W")
    then = helper.make_graph([helper.make_node("MatMul", ["h", "W"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", T.FLOAT, [2, 3])])
    other = helper.make_graph([helper.make_node("Slice", ["h", "s0", "s1", "ax"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", T.FLOAT, [2, 3])],
                              [numpy_helper.from_array(np.array(v, np.int64), n)
                               for v, n in (([0], "s0"), ([3], "s1"), ([1], "ax"))])
    nodes = [helper.make_node("Relu", ["x"], ["h"]),
             helper.make_node("If", ["flag"], ["y"], then_branch=then, else_branch=other)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [2, 4]),
                                           helper.make_tensor_value_info("flag", T.BOOL, [])],
                              [helper.make_tensor_value_info("y", T.FLOAT, [2, 3])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("flag", [True, False])
def test_subgraphs_reading_the_outer_scope_keep_what_they_read(cache_dir, flag):
    model = _if_reading_outer_scope()
    graph = reader.load(model, {})
    assert "W" in graph.constants and graph.nodes[-1].outer_reads == ["h", "W"]
    feed = {"x": np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4), "flag": np.array(flag)}
    _answers(model, feed, cache_dir)


def test_float16_batchnorm_folds_into_float16_weights(cache_dir):
    from onnxruntime.transformers.float16 import convert_float_to_float16
    model = convert_float_to_float16(tiny_conv_model(batch=1, bn=True), keep_io_types=False)
    graph = reader.load(model, {})
    assert not any(n.op_type == "BatchNormalization" for n in graph.nodes)
    assert {str(v.dtype) for v in graph.constants.values() if v.ndim >= 1} == {"float16"}
    feed = {"x": np.random.default_rng(0).standard_normal((1, 8, 12, 12)).astype(np.float16)}
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    got = fastrun.InferenceSession(model.SerializeToString(), cache_dir=cache_dir, policy="heuristic").run(None, feed)[0]
    assert got.dtype == np.float16
    scale = float(np.abs(want.astype(np.float32)).max())
    assert float(np.abs(got.astype(np.float32) - want.astype(np.float32)).max()) <= 1e-2 * scale


def test_nodes_out_of_order_are_sorted_as_onnxruntime_sorts_them(cache_dir):
    model = tiny_conv_model(batch=1)
    nodes = list(model.graph.node)[::-1]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)
    _answers(model, {"x": np.ones((1, 8, 12, 12), np.float32)}, cache_dir)


def test_external_data_is_read_beside_the_model_not_in_the_working_directory(cache_dir, tmp_path, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    path = str(models / "m.onnx")
    onnx.save(tiny_conv_model(batch=1), path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    _answers(onnx.load(path), {"x": np.ones((1, 8, 12, 12), np.float32)}, cache_dir, source=path)
    assert reader.load(path, {}).constants


def qdq_conv_model() -> onnx.ModelProto:
    """Conv between QuantizeLinear/DequantizeLinear pairs, its int8 weights dequantized in the graph."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.integers(-100, 100, (16, 8, 3, 3)).astype(np.int8), "wq"),
             numpy_helper.from_array(np.array(0.02, np.float32), "ws"),
             numpy_helper.from_array(np.array(0, np.int8), "wz"),
             numpy_helper.from_array(np.array(0.05, np.float32), "xs"),
             numpy_helper.from_array(np.array(0, np.uint8), "xz"),
             numpy_helper.from_array(np.array(0.2, np.float32), "ys")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"]),
             helper.make_node("Conv", ["xd", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["c", "ys", "xz"], ["cq"]),
             helper.make_node("DequantizeLinear", ["cq", "ys", "xz"], ["y"])]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", T.FLOAT, [1, 8, 10, 10])],
                              [helper.make_tensor_value_info("y", T.FLOAT, [1, 16, 10, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_weight_dequantization_is_left_to_onnxruntime(cache_dir):
    """DequantizeLinear of constant int8 weights stays a node: onnxruntime's QDQ fusions must see it."""
    model = qdq_conv_model()
    ir = reader.load(model, {})
    assert [n.op_type for n in ir.nodes].count("DequantizeLinear") == 3 and "wq" in ir.constants
    _answers(model, {"x": np.random.default_rng(1).standard_normal((1, 8, 10, 10)).astype(np.float32)}, cache_dir)


def test_gemm_with_a_scalar_runtime_c(cache_dir):
    graph = helper.make_graph([helper.make_node("Gemm", ["a", "b", "c"], ["y"])], "g",
                              [helper.make_tensor_value_info("a", T.FLOAT, [3, 4]),
                               helper.make_tensor_value_info("b", T.FLOAT, [4, 5]),
                               helper.make_tensor_value_info("c", T.FLOAT, [])],
                              [helper.make_tensor_value_info("y", T.FLOAT, [3, 5])])
    rng = np.random.default_rng(0)
    feed = {"a": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal((4, 5)).astype(np.float32),
            "c": np.array(2.0, np.float32)}
    _answers(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), feed, cache_dir)


@pytest.mark.slow
def test_a_model_over_2_gb_is_profiled_and_served(cache_dir, tmp_path, monkeypatch):
    """Weights past protobuf's 2 GB limit (external data, as such models must be saved): the
    front end checks what it can, the plan is made and served, answers as onnxruntime's."""
    rows, width = (1 << 19) + 1024, 1024  # a 2.15 GB fp32 embedding table, written straight to its file
    folder = tmp_path / "model"
    folder.mkdir()
    table = np.empty((rows, width), dtype=np.float32)
    table[:] = np.linspace(-1, 1, width, dtype=np.float32)
    table[:, 0] = np.arange(rows, dtype=np.float32) / rows
    table.tofile(folder / "table.bin")
    del table
    stub = onnx.TensorProto(name="table", data_type=T.FLOAT, dims=[rows, width], data_location=T.EXTERNAL)
    stub.external_data.add(key="location", value="table.bin")
    project = np.random.default_rng(0).standard_normal((width, 32)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["rows"]),
             helper.make_node("MatMul", ["rows", "project"], ["y"])]
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("ids", T.INT64, ["N"])],
                              [helper.make_tensor_value_info("y", T.FLOAT, ["N", 32])],
                              [stub, numpy_helper.from_array(project, "project")])
    path = str(folder / "big.onnx")
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    monkeypatch.chdir(tmp_path)
    feed = {"ids": np.array([0, 7, rows - 1, 12345], dtype=np.int64)}
    report = fastrun.profile(path, {"ids": (4,)}, cache_dir=cache_dir, op_limit=0.05, repeats=3)
    assert not report.plan.fallback_reason  # fastrun's front end took it
    got = fastrun.InferenceSession(path, cache_dir=cache_dir, policy="require").run(None, feed)
    want = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feed)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-5)
