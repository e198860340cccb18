"""Isolation: candidates that crash, hang, run out of memory, or are wrong or slow never take a
profile run down and are never chosen; killed and interrupted runs leave no workers behind and
resume without re-timing what was already measured."""
from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import fastrun
from fastrun.measure import isolation, profiler
from fastrun.store.cache import Caches
from fastrun.cli import main
from tests import bad_impls
from tests.bad_impls import impl_id
from tests.conftest import tiny_conv_model

REPO = Path(__file__).resolve().parent.parent


def bad_model(hw: int = 10) -> bytes:
    """tiny_conv_model with 5 input channels: the bad implementations apply to its first Conv."""
    return tiny_conv_model(batch=1, c=bad_impls.C_IN, k=8, hw=hw).SerializeToString()


def _children(pid: int) -> list[int]:
    """Live (non-zombie) processes whose parent is ``pid``."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# ------------------------------------------------------------------------------ the worker machinery

def _toy_job(keys, channel):
    for k in keys:
        try:
            with channel.running(k):
                if k == "segv":
                    ctypes.string_at(0)
                elif k == "hang":
                    time.sleep(60)
                elif k == "oom":
                    np.ones((8 << 30) // 8)
                elif k == "exit":
                    os._exit(3)
                elif k == "sysexit":
                    sys.exit(4)
                elif k == "raise":
                    raise ValueError("nope")
            channel.send(k, {"ok": True, "pid": os.getpid()})
        except Exception as exc:
            channel.send(k, {"ok": False, "why": isolation.describe_exception(exc)})


def test_run_isolated_records_the_culprit_of_every_death_and_goes_on():
    keys = ["a", "segv", "b", "hang", "oom", "exit", "sysexit", "raise", "c"]
    start = time.monotonic()
    out = isolation.run_isolated(_toy_job, keys, timeout=0.5, memory_limit=1 << 30)
    assert time.monotonic() - start < 20
    assert out.failures == {"segv": "crashed with signal SIGSEGV", "hang": "timed out after 0.5 s",
                            "exit": "exited with status 3", "sysexit": "raised SystemExit: 4"}
    assert out.timed_out == {"hang"}
    assert {k for k, v in out.results.items() if v["ok"]} == {"a", "b", "c"}
    assert out.results["oom"]["why"].startswith("out of memory")
    assert out.results["raise"]["why"] == "raised ValueError: nope"
    assert out.workers == 5 and not out.error
    assert all(v["pid"] != os.getpid() for v in out.results.values() if v["ok"])
    assert not isolation.live_workers() and not _children(os.getpid())


def test_worker_death_outside_candidate_code_is_nobodys_fault():
    def job(keys, channel):
        ctypes.string_at(0)

    out = isolation.run_isolated(job, ["x", "y"], timeout=5)
    assert out.workers == 2 and not out.failures and not out.results
    assert "SIGSEGV" in out.error and "outside candidate code" in out.error

    def buggy(keys, channel):
        raise KeyError("profiler bug")

    out = isolation.run_isolated(buggy, ["x"], timeout=5)
    assert out.workers == 1 and "KeyError" in out.error and "not a candidate" in out.error
    assert not isolation.live_workers()


def test_stalled_worker_is_killed():
    def job(keys, channel):
        time.sleep(60)

    start = time.monotonic()
    out = isolation.run_isolated(job, ["x"], timeout=0.2, stall_timeout=0.3)
    assert time.monotonic() - start < 10
    assert "no progress" in out.error and not out.failures


def test_keyboard_interrupt_kills_the_worker():
    seen = []

    def on_result(key, value):
        seen.append(value["pid"])
        raise KeyboardInterrupt

    def job(keys, channel):
        channel.send(keys[0], {"pid": os.getpid()})
        time.sleep(60)

    with pytest.raises(KeyboardInterrupt):
        isolation.run_isolated(job, ["x"], timeout=5, on_result=on_result)
    assert seen and not _alive(seen[0]) and not isolation.live_workers()


# ------------------------------------------------------------------------------ the profiler

ALL_BAD = ("segv", "abort", "hang", "wrong", "slow", "oom", "raises", "hides_nan", "inplace", "exits")
EXPECTED = {
    "segv": "crashed with signal SIGSEGV",
    "abort": "crashed with signal SIGABRT",
    "hang": "timed out after 1 s",
    "oom": "out of memory",
    "raises": "raised RuntimeError: deliberate failure",
    "wrong": "wrong result on random input: relative error 1.00e-02",
    "hides_nan": "wrong result on input with NaN/Inf: hides NaN/Inf",
    "inplace": "modified its input in place",
    "exits": "exited with status 0",
}


def test_profile_survives_bad_candidates_chooses_none_and_records_why(cache_dir):
    with bad_impls.registered(*ALL_BAD):
        report = fastrun.profile(bad_model(), cache_dir=cache_dir, op_limit=0.2, op_timeout=1.0, repeats=2)
        assert report.max_error < fastrun.workflows.verify.MODEL_TOLERANCE
        conv1 = report.plan.node("conv1")
        assert not conv1.impl.startswith("test_")
        for name, why in EXPECTED.items():
            assert conv1.candidates[impl_id(name)].startswith("failed: "), name
            assert why in conv1.candidates[impl_id(name)], (name, conv1.candidates[impl_id(name)])
        slow = conv1.candidates[impl_id("slow")]  # correct and timed, so it just loses
        assert isinstance(slow, float) and slow >= 1e3 * bad_impls.SLOW_SECONDS
        assert conv1.runner_up != impl_id("slow")
        failed = {(impl, why) for _, impl, why in report.stats.failed}
        assert {impl for impl, _ in failed} == {impl_id(n) for n in EXPECTED}
        assert report.stats.workers >= 5 and report.stats.worker_peak_rss > 0
        assert not isolation.live_workers() and not _children(os.getpid())

        # all of it was persisted: a second run measures nothing and kills nothing
        again = fastrun.profile(bad_model(), cache_dir=cache_dir, op_limit=0.2, op_timeout=1.0, measure=False)
        assert again.stats.measured == 0 and again.stats.workers == 0
        assert not again.plan.node("conv1").impl.startswith("test_")
        assert {impl for _, impl, _ in again.stats.failed} == {impl_id(n) for n in EXPECTED}


def test_isolated_and_in_process_measure_the_same_data():
    """Seeded per signature: a worker, a restarted worker and this process see the same inputs."""
    from fastrun.ops import registry

    spec = fastrun.ir.graph.spec_for_node(*_first_conv(bad_model()))
    with bad_impls.registered("wrong", "hides_nan", "segv"):
        impls = registry.candidates(spec)
        safe = [i for i in impls if i.id != impl_id("segv")]
        here = profiler.Profiler(None, "fp", op_limit_s=0.05, isolate=False)._measure(spec, safe)
        there = profiler.Profiler(None, "fp", op_limit_s=0.05, isolate=True, op_timeout=5)._measure(spec, impls)
    assert there[impl_id("segv")].reason == "crashed with signal SIGSEGV"
    for impl in safe:
        assert here[impl.id].status == there[impl.id].status, impl.id
        assert here[impl.id].reason == there[impl.id].reason, impl.id
        assert here[impl.id].error == pytest.approx(there[impl.id].error, rel=1e-6, abs=1e-12), impl.id


def _first_conv(model_bytes):
    g = fastrun.ir.reader.load(model_bytes)
    return next(n for n in g.nodes if n.op_type == "Conv"), g


def test_cached_timeout_is_retried_only_with_a_longer_op_timeout(cache_dir):
    from fastrun.ops import registry

    node, g = _first_conv(bad_model())
    spec = fastrun.ir.graph.spec_for_node(node, g)
    with bad_impls.registered("hang"):
        impl = registry.get("Conv", "test_hang")
        caches = Caches(cache_dir)
        p = profiler.Profiler(caches, "fp", op_timeout=1.0)
        p._persist(spec, profiler.Timing(impl=impl.id, status="failed", reason="timed out after 1 s", limit_s=1.0))
        assert impl.id in p.cached(spec, [impl])
        assert impl.id in profiler.Profiler(caches, "fp", op_timeout=0.5).cached(spec, [impl])
        assert impl.id not in profiler.Profiler(caches, "fp", op_timeout=5.0).cached(spec, [impl])
        caches.close()


def test_cli_shows_rejected_candidates_and_why(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(bad_model())
    with bad_impls.registered("segv", "wrong"):
        res = CliRunnerInvoke(["profile", str(model), "--cache-dir", str(tmp_path / "c"), "--op-limit", "0.1",
                               "--op-timeout", "5", "--no-measure"])
        assert res.exit_code == 0, res.output
        assert f"rejected: {impl_id('segv')} on 1x5x10x10 -> 8ch k3x3 s1: crashed with signal SIGSEGV" in res.output
        assert f"rejected: {impl_id('wrong')}" in res.output and "relative error" in res.output
        again = CliRunnerInvoke(["profile", str(model), "--cache-dir", str(tmp_path / "c"), "--no-measure"])
        assert "0 profiled now" in again.output and "SIGSEGV" in again.output  # cached failures still shown


def CliRunnerInvoke(args):
    from click.testing import CliRunner

    return CliRunner().invoke(main, args, catch_exceptions=False)


# ------------------------------------------------------------------------------ real processes

def _cli(names: str, args: list[str], env: dict, **kw) -> subprocess.Popen:
    full_env = dict(os.environ, PYTHONPATH=str(REPO), **env)
    return subprocess.Popen([sys.executable, "-m", "tests.bad_impls", names] + args, cwd=kw.pop("cwd", REPO),
                            env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kw)


def _wait_for(predicate, timeout: float, proc: subprocess.Popen = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


def test_ctrl_c_during_a_hanging_candidate_exits_cleanly_and_kills_the_worker(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(bad_model())
    log = tmp_path / "builds.log"
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    proc = _cli("hang", ["profile", str(model), "--cache-dir", str(tmp_path / "c"), "--op-timeout", "60",
                         "--no-measure"], {bad_impls.ENV_LOG: str(log), "TMPDIR": str(tmpdir)}, cwd=tmp_path)
    try:
        _wait_for(lambda: log.exists() and log.read_text().strip(), 60, proc)
        worker = int(log.read_text().split()[-1])
        time.sleep(0.3)  # inside the hanging call by now
        assert _alive(worker)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not _alive(worker)
    # no temporary files of ours and no core dump (onnxruntime's import itself writes $TMPDIR/.ses)
    assert set(os.listdir(tmpdir)) <= {".ses"} and not list(tmp_path.glob("core*"))


def _chain_model(channels=(5, 6, 7, 9, 10, 11, 12), hw=12) -> onnx.ModelProto:
    """A chain of 3x3 Convs with distinct channel counts: one signature per Conv."""
    rng = np.random.default_rng(0)
    nodes, inits, last = [], [], "x"
    for i, (c, k) in enumerate(zip(channels, channels[1:])):
        w = numpy_helper.from_array((rng.standard_normal((k, c, 3, 3)) * 0.2).astype(np.float32), f"w{i}")
        inits.append(w)
        nodes.append(helper.make_node("Conv", [last, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1], name=f"conv{i}"))
        last = f"c{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, channels[0], hw, hw])],
                              [helper.make_tensor_value_info(last, onnx.TensorProto.FLOAT, [1, channels[-1], hw, hw])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_killed_profile_run_resumes_without_retiming_finished_signatures(tmp_path):
    """SIGKILL the whole `fastrun profile` process half way; the next run re-times nothing finished."""
    model = tmp_path / "chain.onnx"
    onnx.save(_chain_model(), str(model))
    log = tmp_path / "builds.log"
    cache = str(tmp_path / "c")
    args = ["profile", str(model), "--cache-dir", cache, "--op-limit", "0.3", "--no-measure"]
    env = {bad_impls.ENV_LOG: str(log)}
    # "counted" applies to the first Conv only (5 input channels) and logs its builds; every
    # signature is also observable through the progress lines "[i/6] Conv ...".
    proc = _cli("counted", args, env)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("[4/6]"):
                break
        assert lines and lines[-1].startswith("[4/6]"), "".join(lines)
        workers_before = _children(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: parent and worker, no cleanup
        proc.wait(10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    time.sleep(0.2)
    assert not any(_alive(w) for w in workers_before)
    first_builds = log.read_text().splitlines()
    assert len(first_builds) == 1 and int(first_builds[0].split()[-1]) != proc.pid  # built once, by a worker

    out = tmp_path / "r.json"
    proc2 = _cli("counted", args + ["--json", str(out)], env)
    _, err = proc2.communicate(timeout=120)
    assert proc2.returncode == 0, err
    data = json.loads(out.read_text())
    assert data["specs_cached"] >= 3 and data["specs_measured"] <= 3
    assert data["specs_cached"] + data["specs_measured"] == 6
    # conv0's signature was not measured again: no worker built "counted" (the executor, in the
    # CLI process itself, builds the chosen implementations to run the plan)
    again = log.read_text().splitlines()[len(first_builds):]
    assert all(int(line.split()[-1]) == proc2.pid for line in again), again
    assert not data["failed"]


def test_parent_killed_by_sigkill_takes_its_worker_along(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(bad_model())
    log = tmp_path / "builds.log"
    proc = subprocess.Popen([sys.executable, "-m", "tests.bad_impls", "hang", "profile", str(model), "--cache-dir",
                             str(tmp_path / "c"), "--op-timeout", "60", "--no-measure"], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO), **{bad_impls.ENV_LOG: str(log)}),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: log.exists() and log.read_text().strip(), 60, proc)
        worker = int(log.read_text().split()[-1])
        proc.kill()  # only the parent: the worker must follow (PR_SET_PDEATHSIG)
        proc.wait(10)
        _wait_for(lambda: not _alive(worker), 10)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_no_worker_can_start_so_profiling_falls_back_to_this_process(monkeypatch, cache_dir, caplog):
    def refuse(*args, **kwargs):
        raise OSError("fork refused")

    monkeypatch.setattr(isolation._Worker, "__init__", refuse)
    with caplog.at_level("WARNING"):
        report = fastrun.profile(bad_model(), cache_dir=cache_dir, op_limit=0.05, measure=False, verify=False)
    assert report.stats.workers == 0 and report.stats.measured > 0 and not report.stats.failed
    assert sum("without isolation" in r.getMessage() for r in caplog.records) == 1
