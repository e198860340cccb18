"""End to end on the real architectures shipped in the onnx wheel (random weights, logits out).

The heuristic plan runs on every model in the default suite; profiled plans on all nine are
marked slow (CI runs them in a separate step).
"""
import onnxruntime as ort
import pytest

import fastrun
from fastrun.workflows import models, verify
from fastrun.runtime import compiler
from fastrun.system import fingerprint
from fastrun.ir import reader
from fastrun.planning import planner


def _model(name):
    return models.randomized(models.example_path(name), seed=2, strip_softmax=True).SerializeToString()


def _check(program, data, graph):
    feed = verify.random_feed(graph, seed=7)
    names = list(program.outputs)
    ours = program.run(feed)
    ref = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(names, feed)
    err = verify.relative_error([ours[n] for n in names], ref)
    assert err < verify.MODEL_TOLERANCE, err


@pytest.mark.parametrize("name", models.EXAMPLES)
def test_heuristic_plan_matches_onnxruntime(name):
    data = _model(name)
    graph = reader.load(data)
    plan = planner.make_plan(graph, fingerprint.fingerprint())
    _check(compiler.compile_plan(graph, plan), data, graph)


def test_heuristic_runs_depthwise_convolutions_blocked():
    """The traffic rule for depthwise convs: ShuffleNet's go to the blocked kernel, reorders and all."""
    from fastrun.ops import formats
    from fastrun.ops.builtin.common import is_depthwise

    graph = reader.load(_model("shufflenet"))
    plan = planner.make_plan(graph, fingerprint.fingerprint())
    depthwise = [n for n in planner.heavy_nodes(graph) if is_depthwise(n.spec)]
    assert depthwise
    if not formats.native_block_size():
        pytest.skip("no blocked kernels on this CPU")
    chosen = {n.name: n.impl for n in plan.nodes}
    assert all(chosen[h.node.name] == "ort_nchwc_depthwise@2" for h in depthwise), chosen
    assert plan.reorders  # paid for: the grouped 1x1 convs around them stay NCHW


@pytest.mark.slow
@pytest.mark.parametrize("name", models.EXAMPLES)
def test_profiled_plan_matches_onnxruntime(name, tmp_path):
    data = _model(name)
    report = fastrun.profile(data, cache_dir=str(tmp_path), op_limit=0.3, repeats=2)
    assert report.max_error < verify.MODEL_TOLERANCE
    assert report.plan.policy == "profiled"
    sess = fastrun.InferenceSession(data, cache_dir=str(tmp_path))
    graph = reader.load(data)
    _check(next(iter(sess._programs.values()))[0], data, graph)
