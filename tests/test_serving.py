"""Serving from a warm cache: policies, shape sets, warm-up, read-only and shared caches.

Counters and cache contents prove what was (not) profiled; real processes play the container
build, the serving container and concurrent warm-ups.
"""
import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import fastrun
from fastrun.workflows import cachetool
from fastrun.system import fingerprint as fp
from fastrun.measure import profiler
from fastrun.ops import registry
from fastrun.store.cache import Caches
from fastrun.errors import InputError, PlanNotFoundError
from fastrun.workflows.warmup import shape_sets, warmup
from tests.conftest import cli, save, tiny_conv_model

OP_LIMIT = 0.05
X1 = {"x": np.ones((1, 8, 12, 12), np.float32)}
REPO = Path(__file__).resolve().parent.parent


def reference(path, feed):
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feed)


def two_input_model() -> onnx.ModelProto:
    """x -> Conv 3x3 -> y, z -> Conv 1x1 -> w: varying x's shape leaves z's signature shared."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((16, 8, 3, 3)) * 0.2).astype(np.float32), "wx"),
             numpy_helper.from_array((rng.standard_normal((8, 4, 1, 1)) * 0.2).astype(np.float32), "wz")]
    nodes = [helper.make_node("Conv", ["x", "wx"], ["y"], pads=[1, 1, 1, 1], name="convx"),
             helper.make_node("Conv", ["z", "wz"], ["w"], name="convz")]
    f = onnx.TensorProto.FLOAT
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", f, ["N", 8, 12, 12]),
                                             helper.make_tensor_value_info("z", f, [1, 4, 10, 10])],
                              [helper.make_tensor_value_info("y", f, ["N", 16, 12, 12]),
                               helper.make_tensor_value_info("w", f, [1, 8, 10, 10])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def tree_digest(root) -> dict:
    """Every file under ``root`` with its size, content hash and modification time."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = (p.stat().st_size, p.stat().st_mtime_ns,
                                             hashlib.sha256(p.read_bytes()).hexdigest())
    return out


@contextlib.contextmanager
def read_only(root):
    """Make ``root`` really unwritable, root user included (immutable flag), then restore it."""
    root = str(root)
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "-R", "+i", root], capture_output=True).returncode != 0:
            pytest.skip("cannot make a directory read-only for root here (chattr +i failed)")
        undo = ["chattr", "-R", "-i", root]
    else:
        subprocess.run(["chmod", "-R", "a-w", root], check=True)
        undo = ["chmod", "-R", "u+w", root]
    try:
        with pytest.raises(OSError):
            Path(root, "probe").write_text("x")
        yield
    finally:
        subprocess.run(undo, check=True)


# ------------------------------------------------------------------------------------ policies

def test_heuristic_policy_warns_once_across_unseen_shapes(model_n, cache_dir, caplog):
    sess = fastrun.InferenceSession(model_n, cache_dir=cache_dir, policy="heuristic")
    with caplog.at_level(logging.WARNING, logger="fastrun"):
        for batch in (1, 2, 3):
            (y,) = sess.run(None, {"x": np.ones((batch, 8, 12, 12), np.float32)})
            assert y.shape == (batch, 16, 1, 1)
    assert len([r for r in caplog.records if "heuristic" in r.getMessage()]) == 1
    assert {p.policy for p in sess.plans.values()} == {"heuristic"} and len(sess.plans) == 3
    assert not Path(cache_dir).exists()  # serving without a plan writes nothing, not even the directory


def test_require_policy_names_model_shapes_and_fingerprint(tiny_model, cache_dir, monkeypatch):
    monkeypatch.setenv("FASTRUN_FINGERPRINT", "fp-require-test")
    with pytest.raises(PlanNotFoundError) as err:
        fastrun.InferenceSession(tiny_model, cache_dir=cache_dir, policy="require")
    message = str(err.value)
    for needle in (tiny_model, "x:1x8x12x12", "fp-require-test", "fastrun warmup"):
        assert needle in message


def test_require_policy_serves_a_warm_cache_without_profiling(tiny_model, cache_dir, monkeypatch):
    fastrun.profile(tiny_model, cache_dir=cache_dir, op_limit=OP_LIMIT, measure=False)
    monkeypatch.setattr(profiler.Profiler, "__init__", lambda *a, **k: pytest.fail("profiled"))
    sess = fastrun.InferenceSession(tiny_model, cache_dir=cache_dir, policy="require")
    assert [p.policy for p in sess.plans.values()] == ["profiled"]
    np.testing.assert_allclose(sess.run(None, X1)[0], reference(tiny_model, X1)[0], rtol=1e-4, atol=1e-5)
    assert sess.profiled == 0


def test_profile_policy_profiles_once_and_persists(model_n, cache_dir):
    sess = fastrun.InferenceSession(model_n, cache_dir=cache_dir, policy="profile", op_limit=OP_LIMIT)
    sess.run(None, X1)
    sess.run(None, X1)
    assert sess.profiled == 1
    again = fastrun.InferenceSession(model_n, cache_dir=cache_dir, policy="require")
    np.testing.assert_allclose(again.run(None, X1)[0], reference(model_n, X1)[0], rtol=1e-4, atol=1e-5)
    assert again.profiled == 0


def test_policy_from_environment(tiny_model, cache_dir, monkeypatch):
    monkeypatch.setenv("FASTRUN_POLICY", "require")
    with pytest.raises(PlanNotFoundError):
        fastrun.InferenceSession(tiny_model, cache_dir=cache_dir)
    fastrun.InferenceSession(tiny_model, cache_dir=cache_dir, policy="heuristic")  # the argument wins
    monkeypatch.setenv("FASTRUN_POLICY", "fastest")
    with pytest.raises(ValueError, match="policy must be one of"):
        fastrun.InferenceSession(tiny_model, cache_dir=cache_dir)


# ---------------------------------------------------------------------------------- shape sets

def test_shape_sets_repeat_names_and_zip_inputs():
    assert shape_sets(["x:1x3", "x:8x3"]) == [{"x": (1, 3)}, {"x": (8, 3)}]
    assert shape_sets(["x:1x3", "z:2", "x:8x3", "z:4"]) == [{"x": (1, 3), "z": (2,)}, {"x": (8, 3), "z": (4,)}]
    assert shape_sets(["x:1x3", "x:1x3"]) == [{"x": (1, 3)}]
    assert shape_sets([]) == []
    with pytest.raises(InputError, match="same number of shapes"):
        shape_sets(["x:1x3", "x:8x3", "z:2"])


def test_session_picks_the_plan_of_each_fed_shape(model_n, cache_dir):
    results = warmup([model_n], shape_sets(["x:1x8x12x12", "x:2x8x12x12"]), cache_dir=cache_dir, op_limit=OP_LIMIT)
    assert [r.status for r in results] == ["profiled", "profiled"]
    sess = fastrun.InferenceSession(model_n, cache_dir=cache_dir, policy="require")
    for batch in (1, 2):
        feed = {"x": np.random.default_rng(batch).standard_normal((batch, 8, 12, 12)).astype(np.float32)}
        np.testing.assert_allclose(sess.run(None, feed)[0], reference(model_n, feed)[0], rtol=1e-4, atol=1e-5)
        assert sess.plan_for({"x": (batch, 8, 12, 12)}).input_shapes == {"x": [batch, 8, 12, 12]}
    assert {p.policy for p in sess.plans.values()} == {"profiled"}
    with pytest.raises(PlanNotFoundError, match="x:3x8x12x12"):  # unseen shape: the policy decides
        sess.run(None, {"x": np.ones((3, 8, 12, 12), np.float32)})
    lenient = fastrun.InferenceSession(model_n, cache_dir=cache_dir, policy="heuristic")
    lenient.run(None, {"x": np.ones((3, 8, 12, 12), np.float32)})
    lenient.run(None, X1)
    policies = {k[0][1][0]: p.policy for k, p in lenient.plans.items()}
    assert policies == {3: "heuristic", 1: "profiled"}


def test_timings_shared_across_shape_sets_are_not_remeasured(tmp_path, cache_dir):
    path = save(two_input_model(), tmp_path / "two.onnx")
    sets = shape_sets(["x:1x8x12x12", "z:1x4x10x10", "x:2x8x12x12", "z:1x4x10x10"])
    first, second = warmup([path], sets, cache_dir=cache_dir, op_limit=OP_LIMIT)
    assert first.status == second.status == "profiled"
    assert first.reused == 0 and first.measured > 0
    convz = fastrun.load_plan(path, sets[0], cache_dir=cache_dir).node("convz")
    assert second.reused == len(convz.candidates) > 0  # convz has the same signature in both sets
    assert second.measured == first.measured - len(convz.candidates)


def test_profile_command_stores_a_plan_per_shape_set(tmp_path, model_n, cache_dir):
    out = tmp_path / "p.json"
    res = cli("profile", model_n, "--shape", "x:1x8x12x12", "--shape", "x:2x8x12x12", "--cache-dir", cache_dir,
              "--op-limit", OP_LIMIT, "--no-measure", "--json", out)
    assert res.exit_code == 0, res.output
    assert [d["input_shapes"]["x"][0] for d in json.loads(out.read_text())] == [1, 2]
    for batch in (1, 2):
        assert fastrun.load_plan(model_n, {"x": (batch, 8, 12, 12)}, cache_dir=cache_dir).policy == "profiled"


# -------------------------------------------------------------------------------------- warmup

def test_warmup_twice_times_nothing_the_second_time(tmp_path, model_n, cache_dir):
    save(tiny_conv_model(k=24), tmp_path / "models" / "sub" / "other.onnx")
    args = ["warmup", tmp_path / "models", "--shape", "x:1x8x12x12", "--shape", "x:2x8x12x12",
            "--cache-dir", cache_dir, "--op-limit", OP_LIMIT, "--json", tmp_path / "w.json"]
    first = cli(*args)
    assert first.exit_code == 0, first.output
    rows = json.loads((tmp_path / "w.json").read_text())
    assert len(rows) == 4 and {r["status"] for r in rows} == {"profiled"}
    assert all(r["measured"] > 0 and r["predicted_ms"] > 0 and r["shapes"]["x"][0] in (1, 2) for r in rows)
    assert "4 profiled now" in first.output and "other.onnx" in first.output
    second = cli(*args)
    assert second.exit_code == 0
    assert "nothing profiled: all 4 plan(s) were already cached, 0 timings measured" in second.output
    rows = json.loads((tmp_path / "w.json").read_text())
    assert {r["status"] for r in rows} == {"cached"} and sum(r["measured"] for r in rows) == 0


def test_warmup_reports_failures_after_finishing_the_others(tmp_path, model_n, cache_dir):
    (tmp_path / "models" / "broken.onnx").write_text("not a model")
    res = cli("warmup", tmp_path / "models", tmp_path / "missing.onnx", tmp_path / "empty_dir_missing",
              "--cache-dir", cache_dir, "--op-limit", OP_LIMIT, "--shape", "x:1x8x12x12")
    assert res.exit_code == 1
    assert "Traceback" not in res.output
    assert "not an ONNX model" in res.output and "model file not found" in res.output
    assert "1 profiled now" in res.output and "3 failed" in res.output
    assert fastrun.load_plan(model_n, {"x": (1, 8, 12, 12)}, cache_dir=cache_dir) is not None
    res = cli("warmup", tmp_path / "models", "--cache-dir", cache_dir, "--shape", "x:1x8", "--shape", "x:2x8",
              "--shape", "z:1")
    assert res.exit_code == 1 and "error: --shape" in res.output  # unequal counts are not paired


def test_container_flow_warm_copy_read_only_serve(tmp_path):
    """Build stage: warm a cache; the image: a read-only copy; serving: policy="require", no profiling."""
    models = tmp_path / "models"
    model = save(tiny_conv_model(), models / "tiny.onnx")
    build = subprocess.run([sys.executable, "-m", "fastrun.cli", "warmup", str(models), "--cache-dir",
                            str(tmp_path / "build-cache"), "--shape", "x:1x8x12x12", "--shape", "x:4x8x12x12",
                            "--op-limit", str(OP_LIMIT)], capture_output=True, text=True, cwd=REPO)
    assert build.returncode == 0, build.stderr
    image = tmp_path / "opt-fastrun"
    shutil.copytree(tmp_path / "build-cache", image)
    serve = """
import json, sys
import numpy as np
import fastrun
from fastrun.ir import reader
from fastrun.measure import profiler
def boom(*a, **k):
    raise SystemExit("profiling while serving")
def compiling(*a, **k):
    raise SystemExit("compiling while serving: warmup stores every plan's program")
profiler.Profiler.__init__ = boom
reader.from_proto = compiling
sess = fastrun.InferenceSession(sys.argv[1], cache_dir=sys.argv[2], policy="require")
outs = {}
for batch in (1, 4):
    x = np.random.default_rng(batch).standard_normal((batch, 8, 12, 12)).astype(np.float32)
    outs[batch] = sess.run(None, {"x": x})[0].tolist()
print(json.dumps({"profiled": sess.profiled, "policies": sorted(p.policy for p in sess.plans.values()),
                  "outs": outs}))
"""
    before = tree_digest(image)
    with read_only(image):
        run = subprocess.run([sys.executable, "-c", serve, model, str(image)], capture_output=True, text=True,
                             cwd=REPO, env={**os.environ, "FASTRUN_POLICY": "heuristic"})
    assert run.returncode == 0, run.stderr
    assert tree_digest(image) == before
    result = json.loads(run.stdout)
    assert result["profiled"] == 0 and result["policies"] == ["profiled", "profiled"]
    for batch in (1, 4):
        x = np.random.default_rng(batch).standard_normal((batch, 8, 12, 12)).astype(np.float32)
        np.testing.assert_allclose(np.array(result["outs"][str(batch)], np.float32), reference(model, {"x": x})[0],
                                   rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ read-only caches

def test_read_only_cache_never_raises_and_never_writes(tiny_model, tmp_path, caplog):
    cache = tmp_path / "ro"
    fastrun.profile(tiny_model, cache_dir=str(cache), op_limit=OP_LIMIT, measure=False)
    other = save(tiny_conv_model(batch=1, k=24), tmp_path / "other.onnx")  # no plan for this one
    before = tree_digest(cache)
    with read_only(cache), caplog.at_level(logging.DEBUG, logger="fastrun"):
        for policy in ("heuristic", "require", "profile"):
            sess = fastrun.InferenceSession(tiny_model, cache_dir=str(cache), policy=policy, op_limit=OP_LIMIT)
            assert [p.policy for p in sess.plans.values()] == ["profiled"]
        sess = fastrun.InferenceSession(other, cache_dir=str(cache), policy="profile", op_limit=OP_LIMIT)
        assert sess.profiled == 1  # profiled, could not persist, served anyway
        assert fastrun.load_plan(tiny_model, cache_dir=str(cache)) is not None
        assert cli("cache", "ls", "--cache-dir", cache).exit_code == 0
        res = cli("cache", "clear", "--yes", "--cache-dir", cache)
        assert res.exit_code == 1 and "read-only" in res.output and "Traceback" not in res.output
    assert tree_digest(cache) == before
    assert any("not persisted" in r.getMessage() and r.levelno == logging.DEBUG for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("keep_shm", [True, False])
def test_rows_left_in_the_write_ahead_log_are_served_read_only(tiny_model, tmp_path, keep_shm):
    """A writer that exits without closing leaves plans in cache.db-wal: a read-only copy still has them."""
    cache = tmp_path / "c"
    script = ("import os, sys, fastrun\n"
              "from fastrun.workflows import lookup\n"
              "from fastrun.store.cache import Caches\n"
              "r = fastrun.profile(sys.argv[1], cache_dir=sys.argv[2], op_limit=0.05, measure=False)\n"
              "c = Caches(sys.argv[2] + '-unclean')\n"
              "lookup.store_plan(c, r.plan)\n"
              "os._exit(0)\n")
    subprocess.run([sys.executable, "-c", script, tiny_model, str(cache)], check=True, cwd=REPO)
    unclean = Path(str(cache) + "-unclean")
    assert (unclean / "plans" / "cache.db-wal").stat().st_size > 0
    if not keep_shm:  # copied without SQLite's shared-memory index: read from a private copy
        (unclean / "plans" / "cache.db-shm").unlink()
    with read_only(unclean):
        sess = fastrun.InferenceSession(tiny_model, cache_dir=str(unclean), policy="require")
        assert [p.policy for p in sess.plans.values()] == ["profiled"]


# --------------------------------------------------------------------------------- concurrency

def test_two_warmup_processes_on_one_cache(tmp_path):
    models = tmp_path / "models"
    for k in (16, 24, 32):
        save(tiny_conv_model(k=k), models / f"m{k}.onnx")
    cache = tmp_path / "shared"
    procs = [subprocess.Popen([sys.executable, "-m", "fastrun.cli", "warmup", str(models), "--cache-dir", str(cache),
                               "--shape", "x:1x8x12x12", "--shape", "x:2x8x12x12", "--op-limit", str(OP_LIMIT),
                               "--json", str(tmp_path / f"w{i}.json")], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    rows = [r for i in range(2) for r in json.loads((tmp_path / f"w{i}.json").read_text())]
    assert all(r["ok"] for r in rows)
    assert sum(r["status"] == "profiled" for r in rows) == 6  # each plan made once, by one of them
    report = cachetool.verify(Caches(cache, writable=False), [models])
    assert report.plans == 6 and report.problems == []
    for k in (16, 24, 32):
        for b in (1, 2):
            assert fastrun.load_plan(str(models / f"m{k}.onnx"), {"x": (b, 8, 12, 12)}, cache_dir=str(cache))


def plan_using(graph, wanted: dict[str, str], monkeypatch):
    """A heuristic plan whose nodes ``wanted`` names run the named implementations: the search
    prices those at zero and their rivals prohibitively, and places the reorders they need."""
    from fastrun.planning import costmodel, planner

    by_spec = {h.spec.key(): wanted[h.node.name] for h in planner.heavy_nodes(graph) if h.node.name in wanted}
    real = costmodel.impl_ms

    def forced(impl, spec):
        want = by_spec.get(spec.key())
        return real(impl, spec) if want is None else 0.0 if impl.name == want else 1e6

    monkeypatch.setattr(costmodel, "impl_ms", forced)
    plan = planner.make_plan(graph, fp.fingerprint())
    monkeypatch.setattr(costmodel, "impl_ms", real)
    assert all(plan.node(name).impl.split("@")[0] == impl for name, impl in wanted.items())
    return plan


@pytest.mark.parametrize("winograd", ["winograd_f4", "winograd_f4_nhwc"])
def test_concurrent_runs_of_host_kernels_give_each_caller_its_answer(winograd, monkeypatch):
    """Host kernels keep per-thread scratch; the compiled Winograd enters numba's workqueue layer,
    which aborts the process when entered twice, so its calls queue: each caller gets its own
    answer."""
    import threading

    from fastrun.runtime import compiler
    from fastrun.ir import reader
    from fastrun.planning import planner

    impl = registry.get("Conv", winograd)
    model = tiny_conv_model(c=8, k=16, hw=12)
    graph = reader.from_proto(model, model.SerializeToString(), {"x": (2, 8, 12, 12)})
    if not impl.accepts(planner.heavy_nodes(graph)[0].spec):
        pytest.skip(f"{winograd} does not apply here (numba not installed?)")
    plan = plan_using(graph, {"conv1": winograd, "conv2": "conv1x1_gemm"}, monkeypatch)
    program = compiler.compile_plan(graph, plan)
    assert program.host_steps == 2
    feeds = [{"x": np.random.default_rng(i).standard_normal((2, 8, 12, 12)).astype(np.float32)} for i in range(4)]
    expected = [program.run(f)["y"] for f in feeds]
    wrong = []

    def caller(i: int) -> None:
        for _ in range(25):
            if not np.array_equal(program.run(feeds[i])["y"], expected[i]):
                wrong.append(i)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong


def test_a_plan_with_compiled_kernels_served_without_numba_falls_back_with_a_warning(tmp_path, monkeypatch, caplog):
    """The stored program names winograd_f4_nhwc; here numba is "missing": the session says so
    and serves the heuristic plan, with onnxruntime's answer."""
    from fastrun.runtime import compiler
    from fastrun.ir import reader
    from fastrun.ops.builtin import winograd

    if winograd.compiled is None:
        pytest.skip("numba is not installed")
    model = tiny_conv_model(c=8, k=16, hw=12, batch=1)
    data = model.SerializeToString()
    graph = reader.from_proto(model, data)
    plan = plan_using(graph, {"conv1": "winograd_f4_nhwc"}, monkeypatch)
    plan.policy = "profiled"
    caches = Caches(str(tmp_path / "cache"))
    fastrun.workflows.lookup.store_plan(caches, plan)
    caches.programs.save(plan, compiler.build_recipe(graph, plan), reader.declared_interface(model))
    caches.close()
    monkeypatch.setattr(winograd, "compiled", None)
    x = {"x": np.random.default_rng(0).standard_normal((1, 8, 12, 12)).astype(np.float32)}
    with caplog.at_level(logging.WARNING):
        sess = fastrun.InferenceSession(data, cache_dir=str(tmp_path / "cache"), policy="heuristic")
        out = sess.run(None, x)
    assert any("numba" in r.getMessage() for r in caplog.records)
    assert list(sess.plans.values())[0].policy == "heuristic"
    ref = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, x)
    assert fastrun.workflows.verify.relative_error(out, ref) < fastrun.workflows.verify.MODEL_TOLERANCE
