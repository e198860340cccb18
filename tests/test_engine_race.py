"""OpenVINO in the whole-model race: its candidates, the precision policy's budget, its stored
compiled form served without compiling from ONNX, and onnxruntime where OpenVINO is missing."""
from __future__ import annotations

import logging
import sys

import numpy as np
import onnxruntime as ort
import pytest

import fastrun
from fastrun.ir import reader
from fastrun.measure.profiler import Profiler
from fastrun.planning import planner
from fastrun.runtime import compiler, openvino_engine
from fastrun.runtime.engines import OriginalModelSource
from fastrun.store.cache import Caches
from fastrun.system import fingerprint, precision
from fastrun.workflows import lookup, profile, verify

pytestmark = pytest.mark.skipif(not openvino_engine.OpenVINOEngine().available(), reason="OpenVINO is not installed")


def _race(tiny_model, cache_dir, monkeypatch, fastest, policy="fp32", tolerance=None):
    """verify_plan with a fixed race (timing would be flaky on a shared machine): ``fastest`` wins it."""
    graph = reader.load(tiny_model)
    caches = Caches(cache_dir)
    prof = Profiler(caches, fingerprint.fingerprint(), op_limit_s=0.05, isolate=False)
    plan = planner.make_plan(graph, fingerprint.fingerprint(), prof)
    plan.precision_policy, plan.tolerance = policy, tolerance
    original = OriginalModelSource(tiny_model)
    reference = verify.model_reference(graph, original, quantized=False)
    raced: dict = {}

    def race(graph, programs, repeats):
        raced.update(programs)
        return [{k: (1.0 if k == fastest else 10.0) for k in programs}] * verify.VERIFY_BLOCKS

    monkeypatch.setattr(verify, "_race_blocks", race)
    chosen = verify.verify_plan(graph, plan, prof, fingerprint.fingerprint(), 2, original, reference)
    return graph, caches, original, chosen, raced


def _store(graph, caches, original, plan, path):
    """Store the plan and its program as profile does (OpenVINO's compiled blob included)."""
    assert lookup.store_plan(caches, plan)
    assert caches.programs.save(plan, compiler.build_recipe(graph, plan, original=original),
                                reader.declared_interface(reader.read_model(path)[0]))
    caches.close()


def _ort(path, feed):
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feed)


def test_openvino_wins_is_stored_and_served_from_its_blob(tiny_model, cache_dir, monkeypatch):
    graph, caches, original, chosen, raced = _race(tiny_model, cache_dir, monkeypatch, "openvino")
    assert "openvino" in raced and "openvino-bf16" not in raced  # fp32 policy: no reduced precision
    assert (chosen.engine, chosen.precision, chosen.engine_version) == \
        ("openvino", "fp32", openvino_engine.installed_version())
    assert chosen.solver["verified"]["errors"]["openvino"] < verify.MODEL_TOLERANCE
    _store(graph, caches, original, chosen, tiny_model)

    def no_compile(*args, **kwargs):
        raise AssertionError("served by compiling from ONNX")

    monkeypatch.setattr(openvino_engine.OpenVINOEngine, "compile", no_compile)
    session = fastrun.InferenceSession(tiny_model, cache_dir=cache_dir, policy="require")
    feed = verify.random_feed(graph, seed=3)
    np.testing.assert_allclose(session.run(None, feed)[0], _ort(tiny_model, feed)[0], rtol=1e-4, atol=1e-5)


def test_a_stored_openvino_plan_runs_on_onnxruntime_where_openvino_is_missing(tiny_model, cache_dir, monkeypatch,
                                                                             caplog):
    graph, caches, original, chosen, _ = _race(tiny_model, cache_dir, monkeypatch, "openvino")
    _store(graph, caches, original, chosen, tiny_model)
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    monkeypatch.setattr(openvino_engine, "_warned", set())
    openvino_engine._core.cache_clear()
    try:
        feed = verify.random_feed(graph, seed=4)
        with caplog.at_level(logging.WARNING):
            for _ in range(2):
                session = fastrun.InferenceSession(tiny_model, cache_dir=cache_dir, policy="require")
                np.testing.assert_array_equal(session.run(None, feed)[0], _ort(tiny_model, feed)[0])
        warned = [r for r in caplog.records if "OpenVINO is not installed" in r.getMessage()]
        assert len(warned) == 1
    finally:
        openvino_engine._core.cache_clear()


def test_reduced_precision_races_only_under_its_policy_and_within_its_budget(tiny_model, cache_dir, monkeypatch):
    *_, chosen, raced = _race(tiny_model, cache_dir, monkeypatch, "openvino-bf16", "bf16", 0.5)
    assert "openvino-bf16" in raced and chosen.winner == "openvino" and chosen.precision == "bf16"
    assert 0 < chosen.solver["verified"]["errors"]["openvino-bf16"] <= 0.5
    *_, strict, _ = _race(tiny_model, cache_dir + "2", monkeypatch, "openvino-bf16", "bf16", 1e-9)
    assert strict.precision == "fp32"  # bf16 moved the outputs further than the budget: not eligible


def test_reduced_precision_plans_are_stored_under_their_policy(tiny_model, cache_dir, monkeypatch):
    graph, caches, original, chosen, _ = _race(tiny_model, cache_dir, monkeypatch, "openvino-bf16", "bf16", 0.5)
    assert lookup.find_plan(caches, chosen.fingerprint, graph) is None
    _store(graph, caches, original, chosen, tiny_model)
    caches = Caches(cache_dir, writable=False)
    found = lookup.find_plan(caches, chosen.fingerprint, graph, precision="bf16")
    assert found is not None and found.precision == "bf16"
    assert lookup.find_plan(caches, chosen.fingerprint, graph) is None  # an fp32 session never gets it
    caches.close()
    feed = verify.random_feed(graph, seed=5)
    served = fastrun.InferenceSession(tiny_model, cache_dir=cache_dir, policy="require", precision="bf16")
    assert verify.relative_error(served.run(None, feed), _ort(tiny_model, feed)) <= 0.5
    with pytest.raises(fastrun.PlanNotFoundError):
        fastrun.InferenceSession(tiny_model, cache_dir=cache_dir, policy="require").run(None, feed)


def test_bf16_is_refused_on_a_cpu_without_native_bf16(tiny_model, cache_dir, monkeypatch):
    from click.testing import CliRunner
    from fastrun.cli import main
    monkeypatch.setattr(fingerprint, "cpu_flags", lambda: {"avx2", "fma", "avx512f"})
    with pytest.raises(precision.PrecisionError, match="no native bf16"):
        profile.profile(tiny_model, cache_dir=cache_dir, precision="bf16", tolerance=1e-2)
    result = CliRunner().invoke(main, ["profile", tiny_model, "--cache-dir", cache_dir, "--precision", "bf16"])
    assert result.exit_code == 1 and "no native bf16" in result.output and "Traceback" not in result.output


def test_user_check_inputs_must_fit_the_plan(tiny_model):
    graph = reader.load(tiny_model)
    feed = verify.random_feed(graph)
    assert verify.check_feed(graph, feed)["x"].shape == feed["x"].shape
    with pytest.raises(fastrun.InputError, match="has shape"):
        verify.check_feed(graph, {"x": feed["x"][:, :4]})
    with pytest.raises(fastrun.InputError, match="no 'x'"):
        verify.check_feed(graph, {})
