"""A cache, bundle or program from elsewhere is untrusted input: crafted ones must never make
fastrun hang, crash, return wrong or outside bytes, or touch a file outside the cache.

Every case runs under a time limit (``signal.alarm`` in-process, a timeout and a memory limit
in a subprocess where a regression could exhaust the machine).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import helper

import fastrun
from fastrun.cli import main
from fastrun.ir import reader
from fastrun.planning import planner
from fastrun.runtime import compiler, openvino_engine
from fastrun.runtime.recipe import ModelRecipe, Recipe, SegmentRecipe
from fastrun.store import programs, untrusted
from fastrun.store.cache import Caches
from fastrun.system import fingerprint as fp, ortutil
from fastrun.workflows import cachetool, lookup
from tests.conftest import tiny_conv_model

SECRET = b"API_KEY=hunter2\nx=1\n"  # 19 bytes, as the probe's secrets.env


@pytest.fixture(autouse=True)
def time_limit():
    """Fail (not hang) a case that blocks: an alarm interrupts a blocking open or read."""
    def expired(signum, frame):
        raise TimeoutError("the case did not finish within its time limit")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(300)  # generous: the first profile of a process compiles numba kernels on a shared machine
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def model_path(tmp_path) -> str:
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_conv_model(batch=1), str(path))
    return str(path)


@pytest.fixture
def victim(tmp_path) -> Path:
    """A file outside the cache that nothing may read, return or delete."""
    path = tmp_path / "victim" / "secret.txt"
    path.parent.mkdir()
    path.write_bytes(SECRET)
    return path


def feed() -> dict:
    return {"x": np.random.default_rng(3).standard_normal((1, 8, 12, 12)).astype(np.float32)}


def reference(model_path: str) -> np.ndarray:
    return ort.InferenceSession(model_path, providers=["CPUExecutionProvider"]).run(None, feed())[0]


def plan_and_recipe(model_path: str):
    graph = reader.load(model_path)
    plan = planner.heuristic_plan(graph, fp.fingerprint())
    plan.policy = "profiled"
    return graph, plan, compiler.build_recipe(graph, plan)


def store(cache_dir: str, model_path: str, recipe=None) -> Path:
    """A cache holding the model's plan and a program (``recipe``: a crafted one); the program's directory."""
    graph, plan, genuine = plan_and_recipe(model_path)
    caches = Caches(cache_dir)
    assert lookup.store_plan(caches, plan)
    assert caches.programs.save(plan, recipe or genuine, reader.declared_interface(onnx.load(model_path)))
    caches.close()
    return caches.programs.path_for(plan)


def serve(model_path: str, cache_dir: str, policy: str = "require") -> tuple[np.ndarray, fastrun.InferenceSession]:
    sess = fastrun.InferenceSession(model_path, cache_dir=cache_dir, policy=policy)
    out = sess.run(None, feed())[0]
    np.testing.assert_allclose(out, reference(model_path), rtol=1e-4, atol=1e-5)
    return out, sess


def verify(cache_dir: str, *extra: str):
    return CliRunner().invoke(main, ["cache", "verify", "--cache-dir", cache_dir, *extra])


# ------------------------------------------------------------------ rows naming files outside

def _point_row_at(store_dir: Path, target: str) -> None:
    """Make every row of a store a text value kept in the file ``target`` (relative to the store)."""
    con = sqlite3.connect(str(store_dir / "cache.db"))
    with con:
        con.execute("UPDATE Cache SET mode = 3, filename = ?, value = NULL", (target,))
    con.close()


@pytest.mark.parametrize("store_name", ["timings", "plans"])
@pytest.mark.parametrize("command", [["verify", "--fix"], ["clear", "--yes"]])
def test_a_row_naming_a_file_outside_never_deletes_it(tmp_path, model_path, victim, store_name, command):
    cache_dir = str(tmp_path / "cache")
    fastrun.profile(model_path, cache_dir=cache_dir, op_limit=0.02, measure=False, verify=False)
    _point_row_at(Path(cache_dir, store_name), "../../victim/secret.txt")
    if command[0] == "verify":
        res = verify(cache_dir)
        assert res.exit_code == 1 and "leaves its directory" in res.output
    res = CliRunner().invoke(main, ["cache", *command, "--cache-dir", cache_dir])
    assert res.exit_code == 0, res.output
    assert victim.read_bytes() == SECRET and victim.parent.is_dir()


def test_a_row_naming_a_file_outside_is_never_read(tmp_path, model_path, victim):
    cache_dir = str(tmp_path / "cache")
    store(cache_dir, model_path)
    victim.write_text(json.dumps({"schema": 1, "secret": SECRET.decode()}))
    _point_row_at(Path(cache_dir, "plans"), "../../victim/secret.txt")
    for writable in (False, True):
        caches = Caches(cache_dir, writable=writable)
        assert [e.value for e in caches.plans.entries()] == [None]
        caches.close()
    serve(model_path, cache_dir, policy="heuristic")


# ----------------------------------------------------------- programs reading outside data

def _segment(nodes, outputs, inits) -> bytes:
    graph = helper.make_graph(nodes, "crafted", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8, 12, 12])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _external_secret(location: str) -> onnx.TensorProto:
    t = onnx.TensorProto(name="secret", data_type=onnx.TensorProto.UINT8, dims=[len(SECRET)])
    t.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(SECRET)))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def _crafted(kind: str) -> Recipe:
    if kind == "external initializer":
        model = _segment([helper.make_node("Identity", ["secret"], ["y"])], [helper.make_empty_tensor_value_info("y")],
                         [_external_secret("secrets.env")])
    elif kind == "external Constant":
        const = helper.make_node("Constant", [], ["y"], value=_external_secret("secrets.env"))
        model = _segment([const], [helper.make_empty_tensor_value_info("y")], [])
    else:  # an output of another type than the model declares
        model = _segment([helper.make_node("Cast", ["x"], ["y"], to=onnx.TensorProto.UINT8)],
                         [helper.make_empty_tensor_value_info("y")], [])
    return Recipe([SegmentRecipe(["x"], ["y"], model, {}, 1, "crafted")], {}, {"y": "y"})


@pytest.mark.parametrize("kind", ["external initializer", "external Constant", "output of another type"])
def test_a_program_reading_outside_data_or_returning_another_type_is_refused(tmp_path, model_path, monkeypatch,
                                                                            caplog, kind):
    cache_dir = str(tmp_path / "cache")
    (tmp_path / "secrets.env").write_bytes(SECRET)
    monkeypatch.chdir(tmp_path)  # where onnxruntime would resolve the external file
    store(cache_dir, model_path, _crafted(kind))
    with caplog.at_level(logging.WARNING, logger="fastrun"):
        out, _ = serve(model_path, cache_dir)
    assert out.dtype == np.float32 and out.shape == (1, 16, 1, 1)
    assert any("ignoring the stored program" in r.getMessage() for r in caplog.records)
    if kind != "output of another type":  # seen by verify without the model (the type needs onnxruntime)
        res = verify(cache_dir)
        assert res.exit_code == 1 and "corrupt programs" in res.output and "external data" in res.output


# ------------------------------------------------------ thread counts past the machine

RUN_ONE = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
import numpy as np, fastrun
sess = fastrun.InferenceSession(sys.argv[1], cache_dir=sys.argv[2], policy=sys.argv[3])
out = sess.run(None, {"x": np.ones((1, 8, 12, 12), np.float32)})[0]
plan = next(iter(sess.plans.values()))
print(json.dumps({"shape": list(out.shape), "threads": [plan.threads, plan.host_threads, *plan.segment_threads]}))
"""


def _serve_in_subprocess(model_path: str, cache_dir: str, policy: str = "require") -> dict:
    res = subprocess.run([sys.executable, "-c", RUN_ONE, model_path, cache_dir, policy], capture_output=True,
                         text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_a_program_with_100000_threads_serves_on_the_machine_s_cores(tmp_path, model_path):
    cache_dir = str(tmp_path / "cache")
    _, _, recipe = plan_and_recipe(model_path)
    for part in recipe.parts:
        part.threads = 100000
    store(cache_dir, model_path, recipe)
    res = verify(cache_dir)
    assert res.exit_code == 1 and "thread count 100000" in res.output
    assert _serve_in_subprocess(model_path, cache_dir)["shape"] == [1, 16, 1, 1]


@pytest.mark.parametrize("threads", [100000, 64])
def test_a_bundle_plan_with_too_many_threads_is_refused_or_bounded(tmp_path, model_path, threads):
    """Absurd counts (past ortutil.MAX_THREADS) make the plan refused; plausible ones are capped."""
    made = str(tmp_path / "made")
    store(made, model_path)
    bundle = tmp_path / "bundle.json"
    cachetool.export_bundle(Caches(made), bundle)
    data = json.loads(bundle.read_text())
    for plan in data["plans"].values():
        plan.update(threads=threads, host_threads=threads, segment_threads=[threads, threads])
    bundle.write_text(json.dumps(data))
    cache_dir = str(tmp_path / "cache")
    res = CliRunner().invoke(main, ["cache", "import", str(bundle), "--cache-dir", cache_dir])
    assert res.exit_code == 0 and ("imported 1 plan" in res.output) == (threads == 64), res.output
    got = _serve_in_subprocess(model_path, cache_dir, "require" if threads == 64 else "heuristic")
    assert got["shape"] == [1, 16, 1, 1]
    assert all(0 <= n <= ortutil.default_threads() for n in got["threads"])


# --------------------------------------------------- FIFOs, devices, links, deep JSON

def _replace(path: Path, kind: str) -> None:
    path.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "urandom":
        path.symlink_to("/dev/urandom")
    else:  # nested 200 000 levels
        path.write_text("[" * 200_000 + "]" * 200_000)


@pytest.mark.parametrize("kind", ["fifo", "urandom", "deep"])
@pytest.mark.parametrize("target", [programs.DATA, programs.MANIFEST, programs.INTERFACE])
def test_a_program_file_that_is_a_fifo_a_device_or_deep_json_is_ignored(tmp_path, model_path, target, kind):
    cache_dir = str(tmp_path / "cache")
    entry = store(cache_dir, model_path)
    _replace((entry.parent if target == programs.INTERFACE else entry) / target, kind)
    serve(model_path, cache_dir)
    res = verify(cache_dir)
    if target != programs.INTERFACE:  # model.json is not read: the model declares its interface
        assert res.exit_code == 1 and "corrupt programs" in res.output


@pytest.mark.parametrize("kind", ["fifo", "urandom", "deep"])
def test_a_row_file_that_is_a_fifo_a_device_or_deep_json_is_ignored(tmp_path, model_path, kind):
    cache_dir = str(tmp_path / "cache")
    store(cache_dir, model_path)
    row_file = Path(cache_dir, "plans", "ab", "cd", "x.val")
    row_file.parent.mkdir(parents=True)
    _replace(row_file, kind)
    _point_row_at(Path(cache_dir, "plans"), "ab/cd/x.val")
    assert verify(cache_dir).exit_code == 1
    for policy in ("heuristic", "profile"):
        serve(model_path, cache_dir, policy)


def test_deep_json_is_refused_without_recursion():
    assert untrusted.json_depth('{"a": "[[[[", "b": [[1], {"c": []}]}') == 4
    with pytest.raises(untrusted.UntrustedDataError, match="nested 200000 deep"):
        untrusted.loads("[" * 200_000 + "]" * 200_000)


def test_a_model_json_declaring_another_input_changes_nothing(tmp_path, model_path):
    cache_dir = str(tmp_path / "cache")
    entry = store(cache_dir, model_path)
    (entry.parent / programs.INTERFACE).write_text(json.dumps(
        {"format": programs.FORMAT, "version": 1, "inputs": [["other", [1, 3], "int64"]], "outputs": [["z", [1], "int8"]]}))
    for policy in ("heuristic", "require", "profile"):
        _, sess = serve(model_path, cache_dir, policy)
        assert [(i.name, i.type) for i in sess.get_inputs()] == [("x", "tensor(float)")]


# -------------------------------------------------- links out of the cache, leftovers

def test_a_program_directory_linking_outside_is_never_followed_or_emptied(tmp_path, model_path, victim):
    cache_dir = str(tmp_path / "cache")
    entry = store(cache_dir, model_path)
    (entry.parent / "0000.link").symlink_to(victim.parent, target_is_directory=True)
    res = verify(cache_dir)
    assert res.exit_code == 1 and "symbolic link" in res.output
    assert verify(cache_dir, "--fix").exit_code == 0
    assert victim.read_bytes() == SECRET
    assert CliRunner().invoke(main, ["cache", "clear", "--yes", "--cache-dir", cache_dir]).exit_code == 0
    assert victim.read_bytes() == SECRET


def test_an_interrupted_program_write_is_reported_and_removed(tmp_path, model_path):
    cache_dir = str(tmp_path / "cache")
    entry = store(cache_dir, model_path)
    leftover = entry.parent / ".tmp-crashed"
    leftover.mkdir()
    (leftover / programs.DATA).write_bytes(b"\0" * 100)
    assert verify(cache_dir).exit_code == 0  # young: a writer may still be at work
    old = time.time() - 2 * programs.STALE_TMP_SECONDS
    os.utime(leftover, (old, old))
    res = verify(cache_dir)
    assert res.exit_code == 1 and "did not finish" in res.output
    assert verify(cache_dir, "--fix").exit_code == 0
    assert not leftover.exists() and entry.is_dir()


def test_a_program_write_that_fails_leaves_nothing(tmp_path, model_path, monkeypatch):
    _, plan, recipe = plan_and_recipe(model_path)
    store_ = programs.ProgramStore(tmp_path / "programs")

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(programs, "_write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store_.save(plan, recipe, reader.declared_interface(onnx.load(model_path)))
    assert not list((tmp_path / "programs").rglob(".tmp-*"))


# ------------------------------------------- store directories, databases and the lock file

def _outside(victim: Path) -> dict:
    return {p.name: p.read_bytes() for p in victim.parent.iterdir()}


def _craft_store(cache_dir: str, victim: Path, kind: str) -> None:
    root = Path(cache_dir)
    if kind in ("plans", "programs"):  # the store directory a link to a directory outside
        shutil.rmtree(root / kind)
        (root / kind).symlink_to(victim.parent, target_is_directory=True)
    elif kind == "fifo database":
        (root / "plans" / "cache.db").unlink()
        os.mkfifo(root / "plans" / "cache.db")
    elif kind == "database settings":  # diskcache would pass it to its Disk, or set it on the cache
        con = sqlite3.connect(str(root / "timings" / "cache.db"))
        with con:
            con.execute("INSERT INTO Settings VALUES ('disk_directory', ?)", (str(victim.parent),))
        con.close()
    else:  # the lock file a link to a file outside that does not exist yet
        (root / "profile.lock").unlink(missing_ok=True)
        (root / "profile.lock").symlink_to(victim.parent / "made.lock")


@pytest.mark.parametrize("kind", ["plans", "programs", "fifo database", "database settings", "lock"])
def test_a_store_or_lock_leading_outside_is_refused_and_removed(tmp_path, model_path, victim, kind):
    cache_dir = str(tmp_path / "cache")
    fastrun.profile(model_path, cache_dir=cache_dir, op_limit=0.02, measure=False, verify=False)
    _craft_store(cache_dir, victim, kind)
    before = _outside(victim)
    for policy in ("heuristic", "profile"):
        serve(model_path, cache_dir, policy)
    fastrun.profile(model_path, cache_dir=cache_dir, op_limit=0.02, measure=False, verify=False)
    res = verify(cache_dir)
    if kind != "lock":  # a lock file that is not taken is no entry of the cache
        assert res.exit_code == 1 and "the store is refused" in res.output, res.output
    assert _outside(victim) == before
    assert verify(cache_dir, "--fix").exit_code == 0 and verify(cache_dir).exit_code == 0
    fastrun.profile(model_path, cache_dir=cache_dir, op_limit=0.02, measure=False, verify=False)
    assert fastrun.load_plan(model_path, cache_dir=cache_dir) is not None
    assert CliRunner().invoke(main, ["cache", "clear", "--yes", "--cache-dir", cache_dir]).exit_code == 0
    assert _outside(victim) == before


# ------------------------------------------------- an engine's stored compiled form

def _openvino_recipe(model: onnx.ModelProto, damaged: bool = False) -> Recipe:
    """A program running ``model`` whole on OpenVINO, from its stored compiled form (cut in half if ``damaged``)."""
    engine = openvino_engine.OpenVINOEngine()
    blob = engine.export(engine.compile(model.SerializeToString(), {"x": (1, 8, 12, 12)}, "fp32", 1))
    blob = blob[: len(blob) // 2] if damaged else blob
    part = ModelRecipe(engine.name, ["x"], ["y"], 0, "fp32", engine.version(), {"x": [1, 8, 12, 12]}, blob)
    return Recipe([part], {}, {"y": "y"})


def _another_model(kind: str) -> onnx.ModelProto:
    model = tiny_conv_model(batch=1)
    out = model.graph.output[0]
    if kind == "output of another type":
        model.graph.node[-1].output[0] = "y_float"
        model.graph.node.append(helper.make_node("Cast", ["y_float"], ["y"], to=onnx.TensorProto.INT32))
        out.type.tensor_type.elem_type = onnx.TensorProto.INT32
    elif kind == "output of another shape":
        model.graph.node.append(helper.make_node("Identity", ["x"], ["x_copy"]))
        model.graph.output.append(helper.make_tensor_value_info("x_copy", onnx.TensorProto.FLOAT, [1, 8, 12, 12]))
        model.graph.output.remove(out)
        model.graph.node[-1].output[0] = "y"
        model.graph.output[0].name = "y"
    else:  # no output named y
        model.graph.node[-1].output[0] = out.name = "z"
    return model


@pytest.mark.skipif(not openvino_engine.OpenVINOEngine().available(), reason="OpenVINO is not installed here")
@pytest.mark.parametrize("kind", ["genuine", "damaged", "output of another type", "output of another shape",
                                  "no such output"])
def test_a_stored_compiled_model_damaged_or_of_another_model_is_refused(tmp_path, model_path, caplog, kind):
    cache_dir = str(tmp_path / "cache")
    model = onnx.load(model_path) if kind in ("genuine", "damaged") else _another_model(kind)
    store(cache_dir, model_path, _openvino_recipe(model, damaged=kind == "damaged"))
    with caplog.at_level(logging.WARNING, logger="fastrun"):
        out, _ = serve(model_path, cache_dir)
    assert out.dtype == np.float32 and out.shape == (1, 16, 1, 1)
    refused = [r.getMessage() for r in caplog.records if "ignoring the stored program" in r.getMessage()]
    assert bool(refused) == (kind != "genuine"), refused
