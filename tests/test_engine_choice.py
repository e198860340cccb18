"""FASTRUN_ENGINES / --engines: which whole-model engines the race may use, what a plan records of
them, and when warmup races a stored plan again."""
from __future__ import annotations

import pytest

import fastrun
from fastrun.errors import InputError
from fastrun.measure import timing
from fastrun.runtime import openvino_engine
from fastrun.runtime.plan import ENGINE_FASTRUN, ENGINE_ORIGINAL, Plan
from fastrun.workflows import engine_candidates, engine_choice
from fastrun.workflows.warmup import warmup

needs_openvino = pytest.mark.skipif(not openvino_engine.OpenVINOEngine().available(),
                                    reason="OpenVINO is not installed here")


def test_the_allowed_engines_come_from_the_argument_else_the_environment_else_all(monkeypatch):
    monkeypatch.delenv(engine_choice.ENV_ENGINES, raising=False)
    assert engine_choice.allowed() == ("onnxruntime", "openvino")
    monkeypatch.setenv(engine_choice.ENV_ENGINES, " OnnxRuntime ")
    assert engine_choice.allowed() == ("onnxruntime",)
    assert engine_choice.allowed("openvino") == ("onnxruntime", "openvino")  # the baseline always races
    assert engine_choice.allowed(["openvino", "onnxruntime"]) == ("onnxruntime", "openvino")
    monkeypatch.setenv(engine_choice.ENV_ENGINES, "")
    assert engine_choice.allowed() == ("onnxruntime", "openvino")
    with pytest.raises(InputError, match="unknown engine 'tensorrt': choose from onnxruntime, openvino"):
        engine_choice.allowed("onnxruntime,tensorrt")


def _plan(engine: str, engines: list[str]) -> Plan:
    return Plan(model_hash="h", model_name="m", fingerprint="f", input_shapes={}, nodes=[], engine=engine,
                engines=engines, verified=True)


def test_a_plan_is_raced_again_when_an_allowed_engine_missed_its_race_or_its_winner_is_excluded(monkeypatch):
    monkeypatch.setattr(engine_choice, "usable", lambda name: True)
    both, ort_only = ("onnxruntime", "openvino"), ("onnxruntime",)
    assert engine_choice.race_again_reason(_plan(ENGINE_ORIGINAL, ["onnxruntime"]), both) == \
        "openvino did not race it"
    assert engine_choice.race_again_reason(_plan(ENGINE_FASTRUN, ["onnxruntime"]), ort_only) is None
    assert engine_choice.race_again_reason(_plan(ENGINE_FASTRUN, list(both)), ort_only) is None  # fewer: it stands
    assert engine_choice.race_again_reason(_plan("openvino", list(both)), ort_only) == \
        "it runs on openvino, which is not allowed now"
    assert engine_choice.race_again_reason(_plan(ENGINE_ORIGINAL, []), both) is None  # made before the record
    monkeypatch.setattr(engine_choice, "usable", lambda name: name == "onnxruntime")
    assert engine_choice.race_again_reason(_plan(ENGINE_ORIGINAL, ["onnxruntime"]), both) is None  # not here


def test_plans_record_their_engines_in_json():
    plan = _plan(ENGINE_ORIGINAL, ["onnxruntime"])
    assert Plan.from_json(plan.to_json()).engines == ["onnxruntime"]
    older = {k: v for k, v in plan.to_json().items() if k != "engines"}
    assert Plan.from_json(older).engines == []
    with pytest.raises(ValueError, match="engines"):
        Plan.from_json(dict(plan.to_json(), engines="openvino"))


@needs_openvino
def test_an_excluded_engine_is_not_probed_and_warmup_races_the_plan_again_when_it_is_allowed(
        tiny_model, cache_dir, monkeypatch):
    monkeypatch.delenv(engine_choice.ENV_ENGINES, raising=False)
    monkeypatch.setattr(timing, "interleaved",  # OpenVINO wins every race it runs (timing is noise here)
                        lambda runners, **kw: {k: 1.0 if k == "openvino" else 10.0 for k in runners})
    probed = []
    real_probe = engine_candidates.compile_problem
    monkeypatch.setattr(engine_candidates, "compile_problem", lambda *a, **k: probed.append(a[0]) or real_probe(*a, **k))
    monkeypatch.setenv(engine_choice.ENV_ENGINES, "onnxruntime")
    report = fastrun.profile(tiny_model, cache_dir=cache_dir, op_limit=0.05, repeats=2, measure=False)
    assert probed == [] and "openvino" not in report.plan.solver["verified"]["errors"]
    assert report.plan.engines == ["onnxruntime"] and report.plan.winner != "openvino"

    monkeypatch.delenv(engine_choice.ENV_ENGINES)  # every engine allowed: OpenVINO must race the stored plan
    (result,) = warmup([tiny_model], cache_dir=cache_dir, op_limit=0.05)
    assert result.status == "profiled" and result.note == "raced again: openvino did not race it"
    assert result.measured == 0 and probed == ["openvino"]
    stored = fastrun.load_plan(tiny_model, cache_dir=cache_dir)
    assert stored.engines == ["onnxruntime", "openvino"] and stored.winner == "openvino"
    (again,) = warmup([tiny_model], cache_dir=cache_dir, op_limit=0.05)
    assert again.status == "cached"

    (excluded,) = warmup([tiny_model], cache_dir=cache_dir, op_limit=0.05, engines="onnxruntime")
    assert excluded.note == "raced again: it runs on openvino, which is not allowed now"
    stored = fastrun.load_plan(tiny_model, cache_dir=cache_dir)
    assert stored.engines == ["onnxruntime"] and stored.winner != "openvino"
