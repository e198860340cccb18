"""One way to make a plan: `fastrun profile`, `fastrun warmup` and policy="profile" give the same
verified plans; a plan not checked here (unchecked, imported, older JSON) is checked again by warmup."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import fastrun
from fastrun.cli import main
from fastrun.errors import InputError
from fastrun.store.cache import Caches
from fastrun.workflows.warmup import expand_shape, shape_sets, warmup
from tests.conftest import tiny_conv_model

OP_LIMIT = 0.05
X1 = {"x": np.random.default_rng(1).standard_normal((1, 8, 12, 12)).astype(np.float32)}


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def model_n(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_conv_model(), str(path))
    return str(path)


def stored(model, cache_dir, batch=1):
    return fastrun.load_plan(model, {"x": (batch, 8, 12, 12)}, cache_dir=cache_dir)


def test_profile_warmup_and_the_profile_policy_make_plans_one_way(model_n, tmp_path, monkeypatch):
    from fastrun.workflows import profile as profiling

    made_by = []
    make = profiling.make_and_store_plan
    monkeypatch.setattr(profiling, "make_and_store_plan", lambda *a, **k: made_by.append(k) or make(*a, **k))
    by_cli, by_session = str(tmp_path / "cli"), str(tmp_path / "session")
    res = cli("profile", model_n, "--shape", "x:1x8x12x12", "--cache-dir", by_cli, "--op-limit", OP_LIMIT,
              "--no-measure", "--json", tmp_path / "p.json")
    assert res.exit_code == 0, res.output
    sess = fastrun.InferenceSession(model_n, cache_dir=by_session, policy="profile", op_limit=OP_LIMIT)
    np.testing.assert_allclose(sess.run(None, X1)[0], ort.InferenceSession(model_n).run(None, X1)[0],
                               rtol=1e-4, atol=1e-5)
    assert sess.profiled == 1
    by_warmup = str(tmp_path / "warmup")
    (warmed,) = warmup([model_n], [{"x": (1, 8, 12, 12)}], cache_dir=by_warmup, op_limit=OP_LIMIT)
    assert warmed.status == "profiled"
    assert len(made_by) == 3 and all(k.get("verify", True) for k in made_by)  # one function, checking every plan
    made = [stored(model_n, d) for d in (by_cli, by_session, by_warmup)]
    for plan in made:  # raced end to end, threads measured unless the original model won
        assert plan.verified and plan.policy == "profiled" and "verified" in plan.solver
        assert plan.runs_original or "threads" in plan.solver
    assert json.loads((tmp_path / "p.json").read_text())["verified"] is True


def test_warmup_checks_an_unverified_plan_again_reusing_its_timings(model_n, cache_dir):
    report = fastrun.profile(model_n, {"x": (1, 8, 12, 12)}, cache_dir=cache_dir, op_limit=OP_LIMIT,
                             measure=False, verify=False)
    assert report.plan.policy == "profiled" and not report.plan.verified
    (result,) = warmup([model_n], [{"x": (1, 8, 12, 12)}], cache_dir=cache_dir, op_limit=OP_LIMIT)
    assert result.status == "rechecked" and result.verified and result.measured == 0 and result.reused > 0
    plan = stored(model_n, cache_dir)
    assert plan.verified and "verified" in plan.solver
    (again,) = warmup([model_n], [{"x": (1, 8, 12, 12)}], cache_dir=cache_dir, op_limit=OP_LIMIT)
    assert again.status == "cached"


def test_plans_from_older_json_or_a_bundle_are_unverified(model_n, tmp_path, cache_dir):
    fastrun.profile(model_n, {"x": (1, 8, 12, 12)}, cache_dir=cache_dir, op_limit=OP_LIMIT, measure=False)
    assert stored(model_n, cache_dir).verified
    caches = Caches(cache_dir)
    (key,) = list(caches.plans.keys())
    older = dict(caches.plans.get(key))
    del older["verified"]  # JSON written before plans carried the flag
    caches.plans.set(key, older)
    caches.close()
    assert not stored(model_n, cache_dir).verified
    bundle = tmp_path / "b.json"
    fastrun.profile(model_n, {"x": (1, 8, 12, 12)}, cache_dir=cache_dir, op_limit=OP_LIMIT, measure=False)
    assert cli("cache", "export", bundle, "--cache-dir", cache_dir).exit_code == 0
    target = str(tmp_path / "imported")
    assert cli("cache", "import", bundle, "--cache-dir", target).exit_code == 0
    assert stored(model_n, target) is not None and not stored(model_n, target).verified
    res = cli("warmup", model_n, "--shape", "x:1x8x12x12", "--cache-dir", target, "--op-limit", OP_LIMIT)
    assert res.exit_code == 0 and "1 of them unverified plans checked again" in res.output, res.output
    assert stored(model_n, target).verified


def test_shape_ranges_and_lists():
    assert expand_shape("ids:1x[8:32:8]") == ["ids:1x8", "ids:1x16", "ids:1x24", "ids:1x32"]
    assert expand_shape("x:[1,4]x[3:4]") == ["x:1x3", "x:1x4", "x:4x3", "x:4x4"]
    assert expand_shape("x:1x3") == ["x:1x3"]
    sets = shape_sets(["input_ids:1x[8:128:8]", "attention_mask:1x[8:128:8]"])
    assert len(sets) == 16 and sets[1] == {"input_ids": (1, 16), "attention_mask": (1, 16)}
    for bad in ("x:1x[8:4]", "x:1x[a]", "x:[1:2:3:4]", "x:[1:8:0]", "x:1x[]"):
        with pytest.raises(InputError, match="bracket"):
            expand_shape(bad)


def test_warmup_a_range_of_lengths_then_serve_them_with_require(tmp_path, cache_dir):
    from fastrun.workflows.models import dynamic_encoder

    path = str(tmp_path / "encoder.onnx")
    onnx.save(dynamic_encoder(hidden=16, heads=2, layers=1), path)
    res = cli("warmup", path, "--shape", "input_ids:1x[4:12:4]", "--cache-dir", cache_dir, "--op-limit", OP_LIMIT)
    assert res.exit_code == 0 and "3 profiled now" in res.output, res.output
    sess = fastrun.InferenceSession(path, cache_dir=cache_dir, policy="require")
    ref = ort.InferenceSession(path)
    for n in (4, 8, 12):
        ids = {"input_ids": np.arange(n, dtype=np.int64).reshape(1, n)}
        np.testing.assert_allclose(sess.run(None, ids)[0], ref.run(None, ids)[0], rtol=1e-4, atol=1e-5)
    assert sorted(k[0][1][1] for k in sess.plans) == [4, 8, 12]
    assert all(p.verified for p in sess.plans.values())
