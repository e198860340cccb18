"""Stored compiled programs: serving a cached plan without parsing the model or compiling it."""
from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import fastrun
from fastrun.runtime import compiler
from fastrun.runtime.program import instantiate
from fastrun.runtime.recipe import HostRecipe
from fastrun.system import fingerprint as fp
from fastrun.ir import reader
from fastrun.planning import planner
from fastrun.store import programs
from fastrun.ops import registry
from fastrun.store.cache import Caches
from fastrun.cli import main
from tests.conftest import tiny_conv_model

OP_LIMIT = 0.02


@pytest.fixture
def profiled(tmp_path, cache_dir):
    """A model file profiled into ``cache_dir`` (which stores its program)."""
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_conv_model(batch=1), str(path))
    fastrun.profile(str(path), cache_dir=cache_dir, op_limit=OP_LIMIT, measure=False, verify=False)  # fastrun's program
    return str(path)


def feed():
    return {"x": np.random.default_rng(3).standard_normal((1, 8, 12, 12)).astype(np.float32)}


def reference(path):
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feed())[0]


def no_compiling(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the model was parsed or compiled although its program is stored")

    for name in ("from_proto", "parse_model", "declared_interface"):
        monkeypatch.setattr(reader, name, boom)
    monkeypatch.setattr(compiler, "build_recipe", boom)


def program_dirs(cache_dir) -> list[Path]:
    return sorted(p.parent for p in Path(cache_dir, "programs").glob("*/*/*/manifest.json"))


def test_a_stored_program_serves_without_parsing_or_compiling(profiled, cache_dir, monkeypatch):
    assert len(program_dirs(cache_dir)) == 1
    want = reference(profiled)
    no_compiling(monkeypatch)
    sess = fastrun.InferenceSession(profiled, cache_dir=cache_dir, policy="require")
    assert [(i.name, i.shape, i.type) for i in sess.get_inputs()] == [("x", [1, 8, 12, 12], "tensor(float)")]
    assert [o.name for o in sess.get_outputs()] == ["y"]
    np.testing.assert_allclose(sess.run(None, feed())[0], want, rtol=1e-4, atol=1e-5)
    assert list(sess.plans.values())[0].policy == "profiled"


def test_host_kernels_round_trip_through_the_store(tmp_path, cache_dir):
    """A plan running conv1 as a host Winograd kernel: stored as implementation + spec + weights."""
    graph = reader.load(tiny_conv_model(batch=1))
    plan = planner.make_plan(graph, fp.fingerprint(), None, allowed_formats={"NCHW"})
    plan.node("conv1").impl = registry.get("Conv", "winograd_f4").id
    plan.host_threads = 1
    recipe = compiler.build_recipe(graph, plan)
    assert any(isinstance(p, HostRecipe) for p in recipe.parts)
    store = programs.ProgramStore(tmp_path / "programs")
    assert store.save(plan, recipe, reader.declared_interface(tiny_conv_model(batch=1)))
    loaded = store.load(plan)
    host = [p for p in loaded.parts if isinstance(p, HostRecipe)]
    assert [(h.impl, h.spec, h.inputs, h.output, h.threads) for h in host] == \
        [(h.impl, h.spec, h.inputs, h.output, 1) for h in recipe.parts if isinstance(h, HostRecipe)]
    want = instantiate(recipe).run(feed())["y"]
    got = instantiate(loaded).run(feed())["y"]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "manifest", "foreign manifest"])
def test_a_damaged_program_is_reported_and_the_plan_compiled_instead(profiled, cache_dir, caplog, damage):
    (entry,) = program_dirs(cache_dir)
    data, manifest = entry / programs.DATA, entry / programs.MANIFEST
    if damage == "flip a byte":
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
    elif damage == "truncate":
        data.write_bytes(data.read_bytes()[:-10])
    elif damage == "manifest":
        manifest.write_text("{not json")
    else:
        manifest.write_text('{"format": "something-else", "version": 1}')
    with caplog.at_level(logging.WARNING, logger="fastrun"):
        sess = fastrun.InferenceSession(profiled, cache_dir=cache_dir, policy="require")
        out = sess.run(None, feed())[0]
    assert any("ignoring the stored program" in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(out, reference(profiled), rtol=1e-4, atol=1e-5)
    assert list(sess.plans.values())[0].policy == "profiled"  # the plan itself is fine


def test_verify_finds_damaged_and_stale_programs_and_fix_removes_them(profiled, cache_dir):
    runner = CliRunner()
    res = runner.invoke(main, ["cache", "verify", "--cache-dir", cache_dir])
    assert res.exit_code == 0 and "1 program(s): 0 problem(s)" in res.output
    (entry,) = program_dirs(cache_dir)
    stale = entry.with_name(entry.name.split(".")[0] + "." + "0" * 24)  # a program of an older plan
    shutil.copytree(entry, stale)
    raw = bytearray((entry / programs.DATA).read_bytes())
    raw[0] ^= 0xFF
    (entry / programs.DATA).write_bytes(bytes(raw))
    res = runner.invoke(main, ["cache", "verify", "--cache-dir", cache_dir])
    assert res.exit_code == 1
    assert "corrupt programs" in res.output and "checksum" in res.output
    assert "stale   programs" in res.output and "earlier plan" in res.output
    assert runner.invoke(main, ["cache", "verify", "--cache-dir", cache_dir, "--fix"]).exit_code == 0
    assert program_dirs(cache_dir) == []
    assert fastrun.load_plan(profiled, cache_dir=cache_dir) is not None  # plans are kept


def test_verify_finds_the_plan_of_a_reduced_precision_program(profiled, cache_dir):
    """A bf16 policy's plan is stored beside the fp32 one for the same shapes: its program is its
    own, neither stale nor removed by ``--fix``."""
    from fastrun.workflows import lookup

    plan = fastrun.load_plan(profiled, cache_dir=cache_dir)
    plan.precision_policy, plan.tolerance = "bf16", 1e-2
    caches = Caches(cache_dir)
    model = onnx.load(profiled)
    assert lookup.store_plan(caches, plan)
    assert caches.programs.save(plan, compiler.build_recipe(reader.load(model), plan), reader.declared_interface(model))
    caches.close()
    assert len(program_dirs(cache_dir)) == 2
    res = CliRunner().invoke(main, ["cache", "verify", "--cache-dir", cache_dir, "--fix"])
    assert res.exit_code == 0 and "2 program(s): 0 problem(s)" in res.output, res.output
    assert len(program_dirs(cache_dir)) == 2


def test_warmup_stores_the_program_of_a_plan_that_has_none(profiled, cache_dir):
    shutil.rmtree(Path(cache_dir, "programs"))
    caches = Caches(cache_dir)
    (key,) = list(caches.plans.keys())
    caches.plans.set(key, dict(caches.plans.get(key), verified=True))  # a checked plan: warmup only adds its program
    caches.close()
    runner = CliRunner()
    res = runner.invoke(main, ["warmup", profiled, "--cache-dir", cache_dir])
    assert res.exit_code == 0, res.output
    assert "1 program(s) compiled and stored" in res.output and "0 timings measured" in res.output
    assert len(program_dirs(cache_dir)) == 1
    res = runner.invoke(main, ["warmup", profiled, "--cache-dir", cache_dir])
    assert res.exit_code == 0 and "compiled and stored" not in res.output and " cached " in res.output


def test_ls_counts_programs_and_clear_removes_them(profiled, cache_dir):
    runner = CliRunner()
    res = runner.invoke(main, ["cache", "ls", "--cache-dir", cache_dir])
    assert "1 compiled program(s)" in res.output and "no compiled program" not in res.output
    res = runner.invoke(main, ["cache", "clear", "--yes", "--cache-dir", cache_dir])
    assert res.exit_code == 0 and "and 1 program(s)" in res.output
    assert program_dirs(cache_dir) == []


def test_a_new_plan_replaces_its_shapes_older_program(profiled, cache_dir):
    (old,) = program_dirs(cache_dir)
    fastrun.profile(profiled, cache_dir=cache_dir, op_limit=OP_LIMIT, measure=False, refresh=True)
    (new,) = program_dirs(cache_dir)
    caches = Caches(cache_dir, writable=False)
    plan = fastrun.load_plan(profiled, cache_dir=cache_dir)
    assert caches.programs.path_for(plan) == new
    if new != old:  # re-profiling may reach the same plan; then nothing changed
        assert not old.exists()


def test_read_only_store_never_writes(tmp_path, cache_dir):
    graph = reader.load(tiny_conv_model(batch=1))
    plan = planner.make_plan(graph, fp.fingerprint(), None)
    store = programs.ProgramStore(tmp_path / "programs", writable=False)
    assert not store.save(plan, compiler.build_recipe(graph, plan), reader.declared_interface(tiny_conv_model(batch=1)))
    assert not (tmp_path / "programs").exists()


def test_concurrent_writers_of_one_program_both_succeed(tmp_path):
    graph = reader.load(tiny_conv_model(batch=1))
    plan = planner.make_plan(graph, fp.fingerprint(), None)
    recipe = compiler.build_recipe(graph, plan)
    stores = [programs.ProgramStore(tmp_path / "programs") for _ in range(4)]
    results = []
    threads = [threading.Thread(target=lambda s=s: results.append(s.save(plan, recipe, reader.declared_interface(tiny_conv_model(batch=1)))))
               for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 4
    assert len(list((tmp_path / "programs").glob("*/*/*/manifest.json"))) == 1
    assert not list((tmp_path / "programs").glob("**/.tmp-*"))
    assert stores[0].load(plan) is not None
