"""The cache commands on real caches: ls and show, bundles between machines, verify and its fixes,
and what invalidates a plan (a model edit, an implementation's version, a software upgrade)."""
import dataclasses
import json
import os
from pathlib import Path

import diskcache
import onnxruntime as ort
import pytest

import fastrun
from fastrun.workflows import cachetool
from fastrun.system import fingerprint as fp
from fastrun.ops import registry
from fastrun.store.cache import Caches
from fastrun.store.keys import software_tag
from fastrun.errors import PlanNotFoundError
from fastrun.workflows.warmup import shape_sets, warmup
from tests.conftest import cli, save, tiny_conv_model

OP_LIMIT = 0.05


# ------------------------------------------------------------------------------- cache commands

def test_cache_ls_and_show(tmp_path, model_n, cache_dir):
    warmup([model_n], shape_sets(["x:1x8x12x12", "x:2x8x12x12"]), cache_dir=cache_dir, op_limit=OP_LIMIT)
    res = cli("cache", "ls", "--cache-dir", cache_dir)
    assert res.exit_code == 0
    assert "(this machine): 2 plan(s)" in res.output and "x:2x8x12x12" in res.output
    data = json.loads(cli("cache", "ls", "--cache-dir", cache_dir, "--json").output)
    (fp_info,) = data["fingerprints"]
    assert fp_info["this_machine"] and fp_info["timings"] > 0 and len(fp_info["plans"]) == 2
    for command in (["show"], ["cache", "show"]):
        res = cli(*command, model_n, "--cache-dir", cache_dir, "--shape", "x:2x8x12x12")
        assert res.exit_code == 0, res.output
        lines = res.output.splitlines()
        assert all(len(line) <= 100 for line in lines)
        assert "shapes: x:2x8x12x12" in res.output and "x:1x8x12x12" not in res.output
        assert "conv1" in res.output and "conv2" in res.output and "predicted:" in res.output
    plans = json.loads(cli("show", model_n, "--cache-dir", cache_dir, "--format", "json").output)
    assert [p["input_shapes"]["x"][0] for p in plans] == [1, 2]
    res = cli("show", model_n, "--cache-dir", cache_dir, "--shape", "x:5x8x12x12")
    assert res.exit_code == 1 and "cached: x:1x8x12x12; x:2x8x12x12" in res.output
    res = cli("show", model_n, "--cache-dir", str(tmp_path / "empty"))
    assert res.exit_code == 1 and "fastrun warmup" in res.output and "Traceback" not in res.output


def test_show_says_when_a_plan_runs_the_whole_model_on_onnxruntime(model_n, cache_dir):
    from fastrun.workflows import lookup
    from fastrun.ir import reader
    from fastrun.planning import planner

    graph = reader.load(model_n, {"x": (1, 8, 12, 12)})
    plan = planner.heuristic_plan(graph, fp.fingerprint())  # no host kernel is predicted to win here
    assert plan.whole_model
    caches = Caches(cache_dir)
    lookup.store_plan(caches, plan)
    caches.close()
    res = cli("show", model_n, "--cache-dir", cache_dir)
    assert res.exit_code == 0 and "no rule predicts a host kernel wins" in res.output, res.output
    plan.policy = "profiled"
    caches = Caches(cache_dir)
    lookup.store_plan(caches, plan)
    caches.close()
    res = cli("show", model_n, "--cache-dir", cache_dir)
    assert "runs as one onnxruntime ORT_ENABLE_ALL session: no assignment beat it end to end by 2%" in res.output


def test_bundle_moves_a_warm_cache_to_a_machine_of_the_same_kind(tmp_path, tiny_model, cache_dir):
    fastrun.profile(tiny_model, cache_dir=cache_dir, op_limit=OP_LIMIT, measure=False)
    bundle = tmp_path / "bundle.json"
    res = cli("cache", "export", bundle, "--cache-dir", cache_dir)
    assert res.exit_code == 0 and "1 plan(s)" in res.output
    data = json.loads(bundle.read_text())
    assert data["fingerprint"] == fp.fingerprint() and data["fingerprint_fields"]["cpu"]
    fresh = str(tmp_path / "fresh")
    res = cli("cache", "import", bundle, "--cache-dir", fresh)
    assert res.exit_code == 0 and "imported 1 plan(s)" in res.output
    sess = fastrun.InferenceSession(tiny_model, cache_dir=fresh, policy="require")
    assert [p.policy for p in sess.plans.values()] == ["profiled"]
    report = fastrun.profile(tiny_model, cache_dir=fresh, op_limit=OP_LIMIT, measure=False)
    assert report.stats.measured == 0  # the timings came along


def test_bundle_from_another_machine_is_refused_unless_forced(tmp_path, tiny_model, cache_dir, monkeypatch):
    monkeypatch.setenv("FASTRUN_FINGERPRINT", "machine-a")
    fastrun.profile(tiny_model, cache_dir=cache_dir, op_limit=OP_LIMIT, measure=False)
    bundle = tmp_path / "a.json"
    assert cli("cache", "export", bundle, "--cache-dir", cache_dir).exit_code == 0
    monkeypatch.setenv("FASTRUN_FINGERPRINT", "machine-b")
    target = str(tmp_path / "b-cache")
    res = cli("cache", "import", bundle, "--cache-dir", target)
    assert res.exit_code == 1 and "machine-a" in res.output and "--force" in res.output
    assert "Traceback" not in res.output
    res = cli("cache", "import", bundle, "--cache-dir", target, "--force")
    assert res.exit_code == 0 and "imported 1 plan(s)" in res.output
    with pytest.raises(PlanNotFoundError, match="machine-b"):  # kept under machine-a: not served on b
        fastrun.InferenceSession(tiny_model, cache_dir=target, policy="require")
    listing = json.loads(cli("cache", "ls", "--cache-dir", target, "--json").output)
    assert [(f["fingerprint"], f["this_machine"], len(f["plans"])) for f in listing["fingerprints"]] == \
        [("machine-a", False, 1)]
    monkeypatch.setenv("FASTRUN_FINGERPRINT", "machine-a")
    fastrun.InferenceSession(tiny_model, cache_dir=target, policy="require")
    res = cli("cache", "clear", "--fingerprint", "machine-a", "--cache-dir", target)
    assert res.exit_code == 0 and "removed 1 plan(s)" in res.output
    assert json.loads(cli("cache", "ls", "--cache-dir", target, "--json").output)["fingerprints"] == []


@pytest.mark.parametrize("content,needle", [("{", "not JSON"), ('{"format": "x"}', "not a fastrun cache bundle"),
                                            (None, "cannot read")])
def test_bad_bundles_are_one_line_errors(tmp_path, content, needle):
    path = tmp_path / "b.json"
    if content is not None:
        path.write_text(content)
    res = cli("cache", "import", path, "--cache-dir", tmp_path / "c")
    assert res.exit_code == 1 and needle in res.output and "Traceback" not in res.output


def test_verify_reports_corrupt_and_stale_entries_and_fix_removes_them(tmp_path, cache_dir):
    path = Path(save(tiny_conv_model(batch=1), tmp_path / "m.onnx"))
    keep = save(tiny_conv_model(batch=1, k=24), tmp_path / "keep.onnx")
    for model in (str(path), keep):
        fastrun.profile(model, cache_dir=cache_dir, op_limit=OP_LIMIT, measure=False)
    res = cli("cache", "verify", "--cache-dir", cache_dir)
    assert res.exit_code == 0 and "0 problem(s)" in res.output
    save(tiny_conv_model(batch=1, k=20), path)  # edit the model: its plan is stale
    caches = Caches(cache_dir)
    caches.plans._cache.set("fp/deadbeef/x:1", "{truncated")
    caches.timings.set(f"{fp.fingerprint()}/oldspec/ort@1", {"status": "ok"})  # pre-version key
    caches.timings.set(Caches.timing_key("fp", "spec", "no_such_impl@1"), {"status": "ok"})
    caches.close()
    raw = diskcache.Cache(os.path.join(cache_dir, "plans"))  # pickling: a value and a key
    raw.set("fp/pickled/x:1", {"evil": True})
    raw.set(("tuple", "key"), "x")
    raw.close()
    res = cli("cache", "verify", path.parent, "--cache-dir", cache_dir)
    assert res.exit_code == 1
    out = res.output
    assert "7 problem(s)" in out, out  # the edited model's plan and its compiled program are both stale
    assert "not among the given files" in out and "not JSON" in out and "pickled" in out
    assert "stale   programs" in out
    assert "older fastrun" in out and "no_such_impl is not registered" in out
    assert cli("cache", "verify", path.parent, "--cache-dir", cache_dir, "--fix").exit_code == 0
    res = cli("cache", "verify", path.parent, "--cache-dir", cache_dir)
    assert res.exit_code == 0 and "0 problem(s)" in res.output and "and 1 program(s)" in res.output
    assert fastrun.load_plan(keep, cache_dir=cache_dir) is not None


# --------------------------------------------------------------------------------- invalidation

def test_model_edit_never_reuses_the_stale_plan(tmp_path, cache_dir):
    path = save(tiny_conv_model(batch=1), tmp_path / "m.onnx")
    fastrun.profile(path, cache_dir=cache_dir, op_limit=OP_LIMIT, measure=False)
    fastrun.InferenceSession(path, cache_dir=cache_dir, policy="require")
    save(tiny_conv_model(batch=1, k=24), tmp_path / "m.onnx")
    with pytest.raises(PlanNotFoundError):
        fastrun.InferenceSession(path, cache_dir=cache_dir, policy="require")
    report = fastrun.profile(path, cache_dir=cache_dir, op_limit=OP_LIMIT, measure=False)
    assert report.stats.specs_measured == 2  # both convolutions changed signature


def test_implementation_version_change_invalidates_plans_and_timings(tiny_model, cache_dir, monkeypatch):
    first = fastrun.profile(tiny_model, cache_dir=cache_dir, op_limit=OP_LIMIT, measure=False)
    chosen = next(n for n in first.plan.nodes if n.spec and n.impl != "onnxruntime")
    impl = registry.get(chosen.op_type, chosen.impl.split("@")[0])
    monkeypatch.setitem(registry._REGISTRY, f"{impl.op_type}/{impl.name}",
                        dataclasses.replace(impl, version=impl.version + 1))
    assert fastrun.load_plan(tiny_model, cache_dir=cache_dir) is None
    again = fastrun.profile(tiny_model, cache_dir=cache_dir, op_limit=OP_LIMIT, measure=False)
    assert again.stats.measured >= 1  # the new version is timed, the others are reused
    assert again.stats.from_cache == first.stats.measured - again.stats.measured


@pytest.mark.parametrize("which", ["onnxruntime", "fastrun"])
def test_software_upgrade_never_reuses_plans_or_timings(tiny_model, cache_dir, monkeypatch, which):
    monkeypatch.setenv("FASTRUN_FINGERPRINT", "fleet-x")  # even a fixed fleet id does not carry them over
    first = fastrun.profile(tiny_model, cache_dir=cache_dir, op_limit=OP_LIMIT, measure=False)
    tag = software_tag()
    if which == "onnxruntime":
        monkeypatch.setattr(ort, "__version__", ort.__version__ + ".post1")
    else:
        for module in (fastrun, fastrun._version, fastrun.runtime.plan, fastrun.store.keys,
                       fastrun.system.fingerprint):
            monkeypatch.setattr(module, "__version__", fastrun.__version__ + ".post1")
    assert software_tag() != tag
    assert fastrun.load_plan(tiny_model, cache_dir=cache_dir) is None
    again = fastrun.profile(tiny_model, cache_dir=cache_dir, op_limit=OP_LIMIT, measure=False)
    assert again.stats.from_cache == 0 and again.stats.measured == first.stats.measured
    problems = cachetool.verify(Caches(cache_dir, writable=False)).problems
    assert {p.kind for p in problems} == {"stale"} and len(problems) > first.stats.measured
