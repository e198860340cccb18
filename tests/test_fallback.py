"""What fastrun's front end cannot take runs as onnxruntime runs the original model: refused only
when onnxruntime refuses it, with onnxruntime's reason; otherwise a stored plan says why."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto as T, helper

import fastrun
from fastrun.cli import main
from fastrun.errors import InputError, ModelError
from fastrun.runtime.plan import ENGINE_ORIGINAL


def _old_opset_not(path) -> str:
    """A model onnxruntime runs and fastrun's front end does not read (Not from opset 1)."""
    graph = helper.make_graph([helper.make_node("Not", ["x"], ["y"])], "old_not",
                              [helper.make_tensor_value_info("x", T.BOOL, ["n", 3])],
                              [helper.make_tensor_value_info("y", T.BOOL, ["n", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 1)])
    model.ir_version = 3
    onnx.save(model, str(path))
    return str(path)


def _unknown_op(path) -> str:
    graph = helper.make_graph([helper.make_node("Foo", ["x"], ["y"], domain="custom.x")], "custom",
                              [helper.make_tensor_value_info("x", T.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", T.FLOAT, [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14), helper.make_opsetid("custom.x", 1)])
    onnx.save(model, str(path))
    return str(path)


def test_profile_stores_a_plan_of_the_original_model_that_require_serves(tmp_path, cache_dir):
    model = _old_opset_not(tmp_path / "m.onnx")
    report = fastrun.profile(model, input_shapes={"x": (4, 3)}, cache_dir=cache_dir)
    plan = report.plan
    assert plan.engine == ENGINE_ORIGINAL and plan.policy == "fallback" and "too old" in plan.fallback_reason
    session = fastrun.InferenceSession(model, cache_dir=cache_dir, policy="require")
    x = np.arange(12).reshape(4, 3) % 3 == 0
    (y,) = session.run(None, {"x": x})
    assert y.dtype == bool and (y == ~x).all()
    assert session.plan_for({"x": (4, 3)}).engine == ENGINE_ORIGINAL


def test_profile_says_what_it_left_to_onnxruntime_and_why(tmp_path, cache_dir):
    model = _old_opset_not(tmp_path / "m.onnx")
    out = tmp_path / "r.json"
    res = CliRunner().invoke(main, ["profile", model, "--shape", "x:2x3", "--cache-dir", cache_dir, "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "left to onnxruntime" in res.output and "too old" in res.output
    report = json.loads(out.read_text())
    assert report["winner"] == ENGINE_ORIGINAL and "too old" in report["fallback_reason"]


def test_warmup_stores_the_fallback_and_says_so(tmp_path, cache_dir):
    model = _old_opset_not(tmp_path / "m.onnx")
    res = CliRunner().invoke(main, ["warmup", model, "--shape", "x:2x3", "--cache-dir", cache_dir])
    assert res.exit_code == 0, res.output
    assert "fallback" in res.output and "left to onnxruntime" in res.output
    session = fastrun.InferenceSession(model, cache_dir=cache_dir, policy="require")
    assert session.run(None, {"x": np.ones((2, 3), bool)})[0].tolist() == [[False] * 3] * 2


def test_a_model_onnxruntime_refuses_is_refused_with_onnxruntimes_reason(tmp_path, cache_dir):
    model = _unknown_op(tmp_path / "bad.onnx")
    with pytest.raises(ModelError, match="onnxruntime refuses the model: .*Foo"):
        fastrun.profile(model, cache_dir=cache_dir)
    res = CliRunner().invoke(main, ["profile", model, "--cache-dir", cache_dir])
    assert res.exit_code == 1 and "onnxruntime refuses the model" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_shapes_the_model_cannot_take_stay_the_callers_error(tmp_path, cache_dir):
    model = _old_opset_not(tmp_path / "m.onnx")
    with pytest.raises(InputError, match="symbolic dims"):
        fastrun.profile(model, cache_dir=cache_dir)
    with pytest.raises(InputError, match="rank"):
        fastrun.profile(model, input_shapes={"x": (2, 3, 4)}, cache_dir=cache_dir)
