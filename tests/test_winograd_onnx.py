"""Winograd in ONNX ops: right at every opset a model may have, and merged into segments, not split.

Its numerics on the shared 3x3 specs are checked with every implementation in test_impls.py.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from fastrun.ir import reader
from fastrun.ops import kernels, registry
from fastrun.ops.builtin import winograd_onnx
from fastrun.planning import planner
from fastrun.runtime import compiler
from fastrun.runtime.program import instantiate
from fastrun.runtime.recipe import HostRecipe
from fastrun.system import fingerprint as fp
from fastrun.system import ortutil
from tests.conftest import tiny_conv_model
from tests.test_impls import conv_spec, relative_error

VARIANTS = ("winograd_onnx_f4", "winograd_onnx_f4_gathered")


def _with_residual(spec):
    """The spec with a fused residual (input 3, the output's shape)."""
    from dataclasses import replace

    return replace(spec, inputs=spec.inputs + (spec.output,), const=spec.const + (False,))


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("opset", [7, 17])
def test_fragment_matches_onnxruntime_at_old_and_new_opsets(name, opset):
    """Cropped tiles (11x7 -> 13x9 output: not multiples of 4), a residual and LeakyRelu at batch 2."""
    spec = _with_residual(conv_spec(2, 6, 11, 7, 5, 3, 3, pads=(2, 1, 0, 3), act="LeakyRelu", act_params=(0.2,)))
    impl = registry.get("Conv", name)
    assert impl.accepts(spec)
    consts, runtime = kernels.random_inputs(spec, np.random.default_rng(0))
    ref = kernels.reference_callable(spec, consts)(*runtime)
    frag = impl.build(spec, consts)
    inputs = [ortutil.value_info(f"in{i}", spec.inputs[i]) for i in spec.runtime_inputs]
    sess = ortutil.build_session(frag.nodes, inputs, [ortutil.value_info("out", spec.output)],
                                 frag.initializers, {"": opset})
    y = sess.run(None, {f"in{i}": x for i, x in zip(spec.runtime_inputs, runtime)})[0]
    assert relative_error(y, ref) < 1e-5


def test_only_3x3_stride_1_ungrouped_convs_with_stable_activations():
    accepts = registry.get("Conv", "winograd_onnx_f4").accepts
    assert accepts(conv_spec(1, 8, 12, 12, 8, 3, 3, pads=1, act="Relu"))
    assert not accepts(conv_spec(1, 8, 12, 12, 8, 3, 3, stride=2, pads=1))
    assert not accepts(conv_spec(1, 8, 12, 12, 8, 3, 3, pads=1, group=2))
    assert not accepts(conv_spec(1, 8, 12, 12, 8, 3, 3, pads=2, dil=2))
    assert not accepts(conv_spec(1, 8, 12, 12, 8, 5, 5, pads=2))
    assert not accepts(conv_spec(1, 8, 12, 12, 8, 3, 3, pads=1, act="Clip", act_params=(0.0, 6.0)))


@pytest.mark.parametrize("name", VARIANTS)
def test_the_fragment_runs_inside_one_segment_with_its_neighbours(name):
    """conv1 (3x3, opset-9 model) as the fragment: the program is one onnxruntime session, no host step."""
    model = tiny_conv_model(batch=2, opset=9)
    graph = reader.load(model)
    plan = planner.make_plan(graph, fp.fingerprint(), None, allowed_formats={"NCHW"})
    plan.node("conv1").impl = registry.get("Conv", name).id
    recipe = compiler.build_recipe(graph, plan)
    assert len(recipe.parts) == 1 and not isinstance(recipe.parts[0], HostRecipe)
    x = np.random.default_rng(1).standard_normal((2, 8, 12, 12)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(instantiate(recipe).run({"x": x})["y"], want, rtol=1e-4, atol=1e-4)


def test_filter_transform_is_g_w_gt_per_position():
    w = np.random.default_rng(2).standard_normal((3, 2, 3, 3))
    _, g, _ = winograd_onnx.winograd_matrices(4)
    u = winograd_onnx.transformed_filter(w, 4)
    assert u.shape == (36, 3, 2)
    np.testing.assert_allclose(u[:, 1, 0].reshape(6, 6), g @ w[1, 0] @ g.T, rtol=1e-5, atol=1e-6)


def test_the_race_keeps_the_unsplit_assignment_when_it_runs_fastest(tmp_path, monkeypatch):
    """The optimum among onnxruntime's kernels alone races too: kept, it compiles to one session."""
    from fastrun.measure.profiler import Profiler
    from fastrun.store.cache import Caches
    from fastrun.workflows import verify

    graph = reader.load(tiny_conv_model(batch=1))
    prof = Profiler(Caches(str(tmp_path / "cache")), fp.fingerprint(), op_limit_s=0.05, isolate=False)
    plan = planner.make_plan(graph, fp.fingerprint(), prof)
    plan.node("conv1").impl = registry.get("Conv", "im2col_gemm").id  # a host step in the optimum
    plan.node("conv1").in_formats, plan.node("conv1").out_format = ["NCHW"], "NCHW"
    raced = {}

    def race(graph, programs, repeats):
        raced.update(programs)
        return [{k: (1.0 if k == verify.UNSPLIT else 10.0) for k in programs}] * verify.VERIFY_BLOCKS

    monkeypatch.setattr(verify, "_race_blocks", race)
    chosen = verify.verify_plan(graph, plan, prof, fp.fingerprint(), repeats=2)
    assert verify.UNSPLIT in raced and chosen.solver["verified"]["kept"] == verify.UNSPLIT
    heavy = [n for n in chosen.nodes if n.spec]
    assert heavy and all(registry.by_id(n.op_type, n.impl).is_onnxruntime_kernel for n in heavy)
    # its nodes still record every candidate's timing (the report's kernel ceiling reads them)
    assert any(not registry.is_onnxruntime_kernel(n.op_type, k) for n in heavy for k in n.candidates)
    program = compiler.compile_plan(graph, chosen)
    assert program.host_steps == 0 and program.segments == 1
