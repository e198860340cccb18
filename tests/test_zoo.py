"""fastrun against onnxruntime on real exported models and the variants users derive from them (tests/zoo.py).

Answers must match onnxruntime's: same output names, dtypes and shapes, values within 1e-4
relative (fp32) or 1e-2 or onnxruntime's own distance from the unoptimized graph (fp16); quantized
models are judged against their own semantics (``zoo.reference_semantics``), and fastrun may be at
most 1.5x + 1e-3 further from it than a default onnxruntime session is.
"""
from __future__ import annotations

import numpy as np
import pytest

import fastrun

from . import zoo

OP_LIMIT = 0.05  # seconds of profiling per signature: enough to choose, small enough for tests
FP32_TOLERANCE = 1e-4
FP16_TOLERANCE = 1e-2

# Cases on which fastrun does not yet answer as onnxruntime does, with the reason it fails today.
KNOWN_FAILURES: dict[str, str] = {}
PROFILE_KNOWN_FAILURES: dict[str, str] = dict(KNOWN_FAILURES)
HEURISTIC_KNOWN_FAILURES: dict[str, str] = dict(KNOWN_FAILURES)


# Profiling these takes under ~6 s each here; the CNNs take 10-130 s (every Conv signature is timed).
QUICK_TO_PROFILE = {"bert_encoder", "bert_encoder_dynamo", "bert_ort_optimized", "bert_dynamic_int8", "vit",
                    "resnet_qoperator", "control_flow"}


def _params(failures: dict[str, str], slow: frozenset[str] = frozenset()) -> list:
    return [pytest.param(name, marks=([pytest.mark.xfail(reason=failures[name], strict=True)] if name in failures
                                      else []) + ([pytest.mark.slow] if name in slow else []))
            for name in zoo.CASES]


def _model_path(case: zoo.Case) -> str:
    try:
        return str(case.model())
    except FileNotFoundError as err:
        pytest.fail(str(err))


def check_outputs(case: zoo.Case, model: str, got: list, feed: dict) -> None:
    """``got`` (fastrun's outputs on ``feed``) against those of a default onnxruntime session, as ``case.kind`` says."""
    want = zoo.session(model).run(None, feed)
    assert len(got) == len(want)
    for index, (g, w) in enumerate(zip(got, want)):
        assert isinstance(g, np.ndarray), f"output {index} is a {type(g).__name__}"
        assert (g.dtype, g.shape) == (w.dtype, w.shape), f"output {index}"
    if case.kind == "fp32":
        for index, (g, w) in enumerate(zip(got, want)):
            assert zoo.relative_error(g, w) <= FP32_TOLERANCE, f"output {index}"
    elif case.kind == "fp16":
        reference = [r.astype(np.float32) for r in zoo.reference_semantics(model, feed)]
        for index, (g, w, r) in enumerate(zip(got, want, reference)):
            allowed = max(FP16_TOLERANCE, zoo.relative_error(w, r))
            assert zoo.relative_error(g, w) <= allowed, f"output {index}"
    else:
        reference = zoo.reference_semantics(model, feed)
        for index, (g, w, r) in enumerate(zip(got, want, reference)):
            ours, theirs = zoo.relative_error(g, r), zoo.relative_error(w, r)
            assert ours <= 1.5 * theirs + 1e-3, f"output {index}: fastrun {ours:.3g} vs onnxruntime {theirs:.3g}"


@pytest.mark.parametrize("name", _params({}))
def test_session_answers_as_onnxruntime(name, cache_dir):
    """A default ``fastrun.InferenceSession`` (no plan cached) on every feed of the case."""
    check_session(zoo.CASES[name], cache_dir, policy="onnxruntime")


@pytest.mark.parametrize("name", _params(HEURISTIC_KNOWN_FAILURES))
def test_heuristic_session_answers_as_onnxruntime(name, cache_dir):
    """A session compiling the heuristic plan for every fed shape (no plan cached): fastrun's
    specialised graph, not the original model left to onnxruntime."""
    sess = check_session(zoo.CASES[name], cache_dir, policy="heuristic")
    assert sess.plans and all(plan.engine == "fastrun" for plan in sess.plans.values())


def check_session(case: zoo.Case, cache_dir: str, policy: str) -> fastrun.InferenceSession:
    model = _model_path(case)
    sess = fastrun.InferenceSession(model, cache_dir=cache_dir, policy=policy)
    ref = zoo.session(model)
    assert [i.name for i in sess.get_inputs()] == [i.name for i in ref.get_inputs()]
    assert [o.name for o in sess.get_outputs()] == [o.name for o in ref.get_outputs()]
    for feed in case.feeds():
        check_outputs(case, model, sess.run(None, feed), feed)
    return sess


@pytest.mark.parametrize("name", _params(PROFILE_KNOWN_FAILURES, frozenset(zoo.CASES) - QUICK_TO_PROFILE))
def test_profiled_plan_serves(name, cache_dir):
    """``fastrun.profile`` on the first feed's shapes, then a session that must serve the stored plan."""
    case = zoo.CASES[name]
    model = _model_path(case)
    shapes = zoo.input_shapes(case)
    fastrun.profile(model, input_shapes=shapes, cache_dir=cache_dir, op_limit=OP_LIMIT, repeats=3)
    sess = fastrun.InferenceSession(model, cache_dir=cache_dir, policy="require")
    feed = case.feeds()[0]
    check_outputs(case, model, sess.run(None, feed), feed)


def test_external_data_loads_from_another_directory(cache_dir, tmp_path, monkeypatch):
    """A model whose weights live in ``weights.bin`` beside it, opened by path from elsewhere."""
    model = str(zoo.external_data())
    monkeypatch.chdir(tmp_path)
    feed = zoo.image_feed(2)
    check_outputs(zoo.CASES["resnet_external_data"], model,
                  fastrun.InferenceSession(model, cache_dir=cache_dir).run(None, feed), feed)


@pytest.mark.parametrize("name", sorted(QUICK_TO_PROFILE))
def test_specialised_program_passes_the_stored_program_check(name):
    """What serving checks a stored program against before running it (fastrun.store.programcheck)
    accepts the program of fastrun's specialised graph: an output onnxruntime cannot infer a shape
    for (a Loop's) is reported as [] and is not taken for a scalar."""
    from fastrun.ir import modelinterface, reader
    from fastrun.planning import planner
    from fastrun.runtime import compiler
    from fastrun.runtime.program import instantiate
    from fastrun.store import programcheck

    case = zoo.CASES[name]
    model = _model_path(case)
    graph = reader.load(model, zoo.input_shapes(case))
    recipe = compiler.build_recipe(graph, planner.heuristic_plan(graph, "test"))
    interface = modelinterface.declared(model)
    programcheck.check_outputs(recipe, interface)
    programcheck.check_program(instantiate(recipe), interface)
