"""Loading: checks, folding, shapes, and clear errors for bad models and shapes."""
import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper

from fastrun.ir import reader
from fastrun.workflows import models
from fastrun.errors import InputError, ModelError
from tests.conftest import tiny_conv_model


@pytest.mark.parametrize("name", models.EXAMPLES)
def test_light_models_load_with_concrete_shapes_and_no_constant_subgraphs(name):
    g = reader.load(models.example_path(name))
    assert not any(n.op_type == "ConstantOfShape" for n in g.nodes)
    for node in g.nodes:
        for t in node.outputs:
            assert all(d > 0 for d in g.tensors[t].shape), (node.name, t)
    convs = [n for n in g.nodes if n.op_type == "Conv"]
    assert convs and all(n.inputs[1] in g.constants for n in convs)
    assert not any(n.op_type == "Dropout" for n in g.nodes)


def test_batchnorm_and_relu_fold_into_conv_and_keep_semantics():
    model = tiny_conv_model(bn=True, batch=2)
    g = reader.load(model, {"x": (2, 8, 12, 12)})
    assert [n.op_type for n in g.nodes] == ["Conv", "Conv", "GlobalAveragePool"]
    assert g.nodes[0].activation == "Relu"
    # run the simplified graph through onnxruntime and compare with the original model
    from fastrun.runtime import compiler
    from fastrun.planning import planner
    from fastrun.system.fingerprint import fingerprint

    program = compiler.compile_plan(g, planner.make_plan(g, fingerprint()))
    x = np.random.default_rng(0).standard_normal((2, 8, 12, 12)).astype(np.float32)
    ref = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(program.run({"x": x})["y"], ref, rtol=1e-5, atol=1e-5)


def test_symbolic_dims_need_a_shape():
    with pytest.raises(InputError, match="--shape x:"):
        reader.load(tiny_conv_model())
    g = reader.load(tiny_conv_model(), {"x": (3, 8, 12, 12)})
    assert g.tensors["y"].shape == (3, 16, 1, 1)


@pytest.mark.parametrize("text,ok", [("x:1x3x224x224", True), ("x:1X3", True), ("x", False), ("x:1xa", False),
                                      (":1x2", False), ("x:0x3", False)])
def test_parse_shape(text, ok):
    if ok:
        assert reader.parse_shape(text)[0] == "x"
    else:
        with pytest.raises(InputError):
            reader.parse_shape(text)


def test_shape_contradicting_a_fixed_dim_is_refused():
    with pytest.raises(InputError, match="fixed"):
        reader.load(tiny_conv_model(batch=1), {"x": (1, 4, 12, 12)})


def test_bad_model_files(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        reader.load(tmp_path / "missing.onnx")
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelError, match="empty"):
        reader.load(empty)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(ModelError):
        reader.load(junk)
    data = tiny_conv_model(batch=1).SerializeToString()
    with pytest.raises(ModelError):
        reader.load(data[: len(data) // 2])
    with pytest.raises(ModelError, match="directory"):
        reader.load(tmp_path)


def test_unknown_domain_and_old_opset_are_refused():
    model = tiny_conv_model(batch=1)
    model.graph.node.append(helper.make_node("Frobnicate", ["y"], ["z"], domain="com.example"))
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(ModelError, match="unknown domain"):
        reader.load(model)
    old = tiny_conv_model(batch=1, opset=13)
    old.opset_import[0].version = 5
    with pytest.raises(ModelError):
        reader.load(old)


def test_conv_weight_contradicting_input_is_refused():
    from onnx import numpy_helper

    model = tiny_conv_model(batch=1)
    # 8 input channels in x, 4 in the weight
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.zeros((16, 4, 3, 3), np.float32), "w1"))
    with pytest.raises((ModelError, InputError)):
        reader.load(model)
