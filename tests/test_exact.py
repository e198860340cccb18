"""Exact mode: only implementations declared exact, within direct evaluation's error of
onnxruntime; every candidate's measured error is stored and shown."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import fastrun
from fastrun.cli import main
from fastrun.ir import reader
from fastrun.measure.profiler import Timing
from fastrun.ops import registry
from fastrun.planning import planner
from fastrun.workflows.report import render_html

APPROXIMATE = ("winograd", "fft")


def test_winograd_and_fft_are_declared_inexact_and_the_rest_exact():
    for impl in registry.all_implementations():
        assert impl.exact == (not impl.name.startswith(APPROXIMATE)), impl.id


@pytest.fixture
def both_plans(tiny_model, cache_dir):
    """The tiny model profiled twice into one cache: the usual plan, then the exact one."""
    usual = fastrun.profile(tiny_model, cache_dir=cache_dir, op_limit=0.02, measure=False, verify=False)
    res = CliRunner().invoke(main, ["profile", tiny_model, "--cache-dir", cache_dir, "--op-limit", "0.02",
                                    "--no-measure", "--exact", "--json", cache_dir + ".json"])
    assert res.exit_code == 0, res.output
    return usual.plan, json.loads(open(cache_dir + ".json").read()), res.output


def test_exact_mode_excludes_winograd_and_fft_and_reports_errors(both_plans):
    usual, exact, output = both_plans
    conv1 = usual.node("conv1")
    assert any(k.startswith("winograd") for k in conv1.candidates)        # the usual plan measured them
    assert set(conv1.errors) == {k for k, v in conv1.candidates.items() if isinstance(v, float)}
    assert max(v for k, v in conv1.errors.items() if k.startswith("winograd_f6")) > 0
    lines = output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model:"))
    assert exact["exact"] and "exact mode" in lines[header] and " error " in lines[header + 1]
    for node in exact["nodes"]:
        if node["spec"]:
            assert not any(k.startswith(APPROXIMATE) for k in node["candidates"])
            assert not node["impl"].startswith(APPROXIMATE)
            assert node["errors"] and all(e <= 1e-5 for e in node["errors"].values())


def test_exact_and_usual_plans_are_kept_apart_and_served_by_keyword(both_plans, tiny_model, cache_dir):
    assert not fastrun.load_plan(tiny_model, cache_dir=cache_dir).exact
    assert fastrun.load_plan(tiny_model, cache_dir=cache_dir, exact=True).exact
    feed = {"x": np.random.default_rng(0).standard_normal((1, 8, 12, 12)).astype(np.float32)}
    want = ort.InferenceSession(tiny_model, providers=["CPUExecutionProvider"]).run(None, feed)[0]
    sess = fastrun.InferenceSession(tiny_model, cache_dir=cache_dir, policy="require", exact=True)
    np.testing.assert_allclose(sess.run(None, feed)[0], want, rtol=1e-5, atol=1e-6)
    assert all(p.exact for p in sess.plans.values())
    show = CliRunner().invoke(main, ["show", tiny_model, "--cache-dir", cache_dir])
    assert show.exit_code == 0 and "error" in show.output


def test_an_exact_implementation_measured_beyond_the_limit_is_not_chosen(tiny_model):
    graph = reader.load(tiny_model)
    (h,) = [h for h in planner.heavy_nodes(graph, exact=True) if h.node.name == "conv1"]
    limit = planner.exact_limit(h.spec)
    timings = {i.id: Timing(i.id, "ok", time_ms=1.0 if i.name == "ort" else 0.1,
                            error=0.0 if i.name == "ort" else 10 * limit) for i in h.impls}
    chosen = {c.impl for c in planner._heavy_choices(h, timings, {"NCHW", "NHWC"}, exact=True)}
    assert chosen == {i.id for i in h.impls if i.name == "ort"}
    assert len({c.impl for c in planner._heavy_choices(h, timings, {"NCHW", "NHWC"})}) > 1


def test_the_report_shows_each_candidate_s_error(both_plans):
    _, exact, _ = both_plans
    page = render_html(exact)
    shown = [f"error {e:.1e}" for node in exact["nodes"] if node["spec"] for e in node["errors"].values()]
    assert shown and all(text in page for text in shown)


def test_warmup_makes_the_exact_plan_under_its_own_key(tiny_model, cache_dir):
    (result,) = fastrun.warmup([tiny_model], cache_dir=cache_dir, op_limit=0.02, verify=False, exact=True)
    assert result.ok, result.error
    assert fastrun.load_plan(tiny_model, cache_dir=cache_dir, exact=True).exact
    assert fastrun.load_plan(tiny_model, cache_dir=cache_dir) is None
