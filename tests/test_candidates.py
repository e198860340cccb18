"""The whole-model race: onnxruntime on the original model, on fastrun's specialised graph, the
selected plan and any registered engine; the fastest eligible one is kept, stored and served."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import fastrun
from fastrun.ir import reader
from fastrun.measure.profiler import Profiler
from fastrun.planning import planner
from fastrun.runtime import compiler, engines
from fastrun.runtime.plan import ENGINE_ORIGINAL
from fastrun.runtime.program import ModelCall
from fastrun.runtime.engines import OriginalModelSource
from fastrun.store.cache import Caches
from fastrun.system import fingerprint
from fastrun.workflows import candidates, eligibility, lookup, verify


def _setup(path: str, cache_dir: str):
    graph = reader.load(path)
    caches = Caches(cache_dir)
    prof = Profiler(caches, fingerprint.fingerprint(), op_limit_s=0.05, isolate=False)
    plan = planner.make_plan(graph, fingerprint.fingerprint(), prof)
    original = OriginalModelSource(path)
    reference = verify.model_reference(graph, original, quantized=False)
    return graph, caches, prof, plan, original, reference


def _fixed_race(monkeypatch, fastest: str, raced: dict):
    def race(graph, programs, repeats):
        raced.update(programs)
        return [{k: (1.0 if k == fastest else 10.0) for k in programs}] * verify.VERIFY_BLOCKS

    monkeypatch.setattr(verify, "_race_blocks", race)


def _serve_stored(path: str, cache_dir: str, graph, caches, plan) -> list:
    """Store the plan and its program as profile does; serve it with policy="require"."""
    assert lookup.store_plan(caches, plan)
    caches.programs.save(plan, compiler.build_recipe(graph, plan),
                         reader.declared_interface(reader.read_model(path)[0]))
    caches.close()
    session = fastrun.InferenceSession(path, cache_dir=cache_dir, policy="require")
    feed = verify.random_feed(graph)
    ours = session.run(None, feed)
    ((program, served),) = session._programs.values()
    assert served.engine == plan.engine
    if plan.engine == ENGINE_ORIGINAL:  # the onnxruntime session of the model that fastrun's session holds runs it
        assert program.program[0].runner == session._original.run_matched
    return ours, ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feed)


def test_the_original_model_on_onnxruntime_wins_and_is_served(tiny_model, cache_dir, monkeypatch):
    graph, caches, prof, plan, original, reference = _setup(tiny_model, cache_dir)
    raced: dict = {}
    _fixed_race(monkeypatch, ENGINE_ORIGINAL, raced)
    chosen = verify.verify_plan(graph, plan, prof, fingerprint.fingerprint(), 2, original, reference)
    assert {"optimal", "onnxruntime", ENGINE_ORIGINAL} <= set(raced)
    assert chosen.engine == ENGINE_ORIGINAL and chosen.winner == ENGINE_ORIGINAL and chosen.runs_original
    assert chosen.solver["verified"]["kept"] == ENGINE_ORIGINAL
    program = compiler.compile_plan(graph, chosen, original=original)
    assert len(program.program) == 1 and isinstance(program.program[0], ModelCall)
    ours, theirs = _serve_stored(tiny_model, cache_dir, graph, caches, chosen)
    np.testing.assert_array_equal(ours[0], theirs[0])


def test_a_candidate_must_beat_the_original_in_every_race(tiny_model, cache_dir, monkeypatch):
    graph, caches, prof, plan, original, reference = _setup(tiny_model, cache_dir)
    blocks = [{"optimal": 9.0, "onnxruntime": 9.0, ENGINE_ORIGINAL: 10.0},
              {"optimal": 9.0, "onnxruntime": 9.0, ENGINE_ORIGINAL: 9.1}]
    monkeypatch.setattr(verify, "_race_blocks", lambda graph, programs, repeats: [
        {k: b[k] for k in programs if k in b} | {k: 20.0 for k in programs if k not in b} for b in blocks])
    chosen = verify.verify_plan(graph, plan, prof, fingerprint.fingerprint(), 2, original, reference)
    assert chosen.winner == ENGINE_ORIGINAL  # 9.0 against 9.1 is within the margin


def test_an_ineligible_candidate_is_never_kept(tiny_model, cache_dir, monkeypatch):
    graph, caches, prof, plan, original, reference = _setup(tiny_model, cache_dir)
    name = list(reference.outputs)[0]
    reference.outputs[name] = reference.outputs[name] + 1.0  # only the baseline counts as matching now
    raced: dict = {}
    _fixed_race(monkeypatch, "optimal", raced)
    chosen = verify.verify_plan(graph, plan, prof, fingerprint.fingerprint(), 2, original, reference)
    assert chosen.winner == ENGINE_ORIGINAL
    assert chosen.solver["verified"]["errors"]["optimal"] > reference.bound


def test_a_registered_engine_races_and_serves_without_changing_the_race(tiny_model, cache_dir, monkeypatch):
    """What an engine adds: a runner builder and a candidate; the race and serving find them by name."""
    built = []

    def basic_level(original, recipe):
        built.append(recipe.engine)
        from fastrun.system import ortutil
        return ortutil.session(original.source, level="basic").run

    monkeypatch.setattr(engines, "_ENGINES", dict(engines._ENGINES))
    monkeypatch.setattr(candidates, "_CANDIDATES", dict(candidates._CANDIDATES))
    engines.register("test-basic", basic_level)
    candidates.register(candidates.WholeModelCandidate(
        "test-basic", lambda graph, plan, original: candidates.engine_plan(plan, "test-basic")))
    graph, caches, prof, plan, original, reference = _setup(tiny_model, cache_dir)
    raced: dict = {}
    _fixed_race(monkeypatch, "test-basic", raced)
    chosen = verify.verify_plan(graph, plan, prof, fingerprint.fingerprint(), 2, original, reference)
    assert chosen.engine == "test-basic" and chosen.winner == "test-basic"
    ours, theirs = _serve_stored(tiny_model, cache_dir, graph, caches, chosen)
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-5, atol=1e-6)
    assert built.count("test-basic") >= 2  # raced, then served


def test_an_unknown_engine_in_a_stored_plan_is_not_served(tiny_model, cache_dir):
    from fastrun.planning import plancheck

    graph, caches, prof, plan, original, reference = _setup(tiny_model, cache_dir)
    assert plancheck.plan_problem(graph, candidates.engine_plan(plan, "no-such-engine")) is not None
    assert plancheck.plan_problem(graph, candidates.engine_plan(plan, ENGINE_ORIGINAL)) is None


def test_quantized_models_are_found_by_their_op_types():
    from onnx import helper
    node = helper.make_node("DequantizeLinear", ["q", "s"], ["y"])
    loop_body = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["c"])], "body", [], [])
    model = helper.make_model(helper.make_graph(
        [helper.make_node("If", ["cond"], ["z"], then_branch=loop_body, else_branch=loop_body)], "g", [], []))
    assert eligibility.quantized_ops(model) == ["MatMulInteger"]
    assert eligibility.is_quantized_op(node.op_type) and eligibility.is_quantized_op("QLinearConv")
    assert not eligibility.is_quantized_op("Conv")


def test_the_quantized_bound_is_onnxruntimes_error_with_slack():
    semantics = [np.linspace(-1, 1, 100)]
    default = [semantics[0] + 0.01]
    ref = eligibility.make_reference({}, ["y"], default, semantics)
    assert ref.quantized
    assert ref.bound == pytest.approx(ref.onnxruntime_error * eligibility.QUANTIZED_SLACK + eligibility.QUANTIZED_ABS_SLACK)
    assert ref.accepts({"y": default[0]}) and ref.accepts({"y": semantics[0]})
    assert not ref.accepts({"y": semantics[0] + 0.02})


def test_a_qdq_model_specialised_stays_within_onnxruntimes_distance_from_its_semantics(tmp_path, cache_dir):
    """The eligibility rule on a QDQ model: fastrun's specialised graph is no further from the
    model's semantics (onnxruntime, optimizations off) than a default onnxruntime session, x slack."""
    from tests.test_frontend_gaps import qdq_conv_model
    import onnx

    path = str(tmp_path / "qdq.onnx")
    onnx.save(qdq_conv_model(), path)
    graph = reader.load(path)
    assert eligibility.quantized_ops(onnx.load(path)) == ["DequantizeLinear", "QuantizeLinear"]
    reference = verify.model_reference(graph, OriginalModelSource(path), quantized=True)
    assert reference.quantized and reference.bound >= eligibility.QUANTIZED_ABS_SLACK
    plan = planner.make_plan(graph, fingerprint.fingerprint())
    for candidate in (plan, planner.whole_model_plan(graph, plan)):
        program = compiler.compile_plan(graph, candidate)
        assert reference.accepts(program.run(dict(reference.feed))), reference.error(program.run(dict(reference.feed)))
