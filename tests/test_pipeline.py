"""Profile -> cache -> serve: counters prove what was (not) profiled; outputs match onnxruntime."""
import json
import logging
import os
import platform
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import fastrun
from fastrun.workflows import candidates, verify
from fastrun.measure import timing
from fastrun.measure import auxiliary, profiler
from fastrun.store.cache import Caches
from fastrun.errors import InputError
from fastrun.runtime import compiler
from fastrun.runtime.program import HostCall, Program, Segment
from fastrun.runtime.recipe import WHOLE_MODEL_LEVEL, HostRecipe
from tests.conftest import tiny_conv_model


def _reference(model_bytes, feed):
    return ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"]).run(None, feed)


def test_profile_stores_plan_and_second_run_profiles_nothing(cache_dir, squeezenet_bytes):
    first = fastrun.profile(squeezenet_bytes, cache_dir=cache_dir, op_limit=0.2, repeats=2)
    assert first.stats.measured > 0 and first.stats.specs_measured == 18
    assert first.max_error < verify.MODEL_TOLERANCE
    assert first.plan.policy == "profiled" and first.plan.solver["status"] == "optimal"
    heavy = [n for n in first.plan.nodes if n.spec]
    assert all(n.source == "profiled" and n.time_ms > 0 for n in heavy)
    raced = ["optimal", "heuristic", verify.UNSPLIT] + [c.name for c in candidates.candidates()]
    assert first.plan.solver["verified"]["kept"] in raced  # any contender, OpenVINO included
    assert first.reorders == len(first.plan.reorders)  # the program realises exactly the planned reorders
    optimum = first.plan.solver["lower_bound"]  # the solver proved it; a kept heuristic may cost more
    assert first.plan.greedy_ms >= optimum - 1e-9
    assert first.plan.nchw_only_ms >= optimum - 1e-9
    second = fastrun.profile(squeezenet_bytes, cache_dir=cache_dir, op_limit=0.2, repeats=2)
    assert second.stats.measured == 0 and second.stats.specs_measured == 0
    assert second.stats.from_cache == first.stats.measured
    # the same timings give the same optimum (which contender then wins end to end is measured anew)
    assert second.plan.solver["lower_bound"] == first.plan.solver["lower_bound"]


def test_shared_signatures_are_not_reprofiled_for_another_model(cache_dir, tmp_path):
    a = tiny_conv_model(batch=1, c=8, k=16)
    fastrun.profile(a.SerializeToString(), cache_dir=cache_dir, op_limit=0.1, measure=False)
    b = tiny_conv_model(batch=1, c=8, k=16, relu=False)  # conv2 has the same signature, conv1 does not
    report = fastrun.profile(b.SerializeToString(), cache_dir=cache_dir, op_limit=0.1, measure=False)
    assert report.stats.specs_cached == 1 and report.stats.specs_measured == 1


def test_session_serves_the_cached_plan_and_never_profiles(cache_dir, squeezenet_bytes, monkeypatch):
    fastrun.profile(squeezenet_bytes, cache_dir=cache_dir, op_limit=0.2, measure=False)

    def boom(*a, **k):
        raise AssertionError("serving must not profile")

    monkeypatch.setattr(profiler.Profiler, "_measure", boom)
    monkeypatch.setattr(auxiliary.AuxiliaryTimer, "_cached_or", boom)
    sess = fastrun.InferenceSession(squeezenet_bytes, cache_dir=cache_dir)
    (plan,) = sess.plans.values()
    assert plan.policy == "profiled"
    feed = {"data_0": np.random.default_rng(3).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    out = sess.run(None, feed)
    ref = _reference(squeezenet_bytes, feed)
    assert verify.relative_error(out, ref) < verify.MODEL_TOLERANCE
    assert sess.profiled == 0


def test_session_without_plan_uses_heuristic_and_warns_once(cache_dir, tiny_model, caplog):
    with caplog.at_level(logging.WARNING, logger="fastrun"):
        sess = fastrun.InferenceSession(tiny_model, cache_dir=cache_dir, policy="heuristic")
        x = np.ones((1, 8, 12, 12), np.float32)
        sess.run(None, {"x": x})
        sess.run(None, {"x": x})
    warnings = [r for r in caplog.records if "heuristic" in r.getMessage()]
    assert len(warnings) == 1
    (plan,) = sess.plans.values()
    assert plan.policy == "heuristic"
    np.testing.assert_allclose(sess.run(["y"], {"x": x})[0], _reference(open(tiny_model, "rb").read(), {"x": x})[0],
                               rtol=1e-4, atol=1e-5)


def test_session_looks_like_onnxruntime(tiny_model, cache_dir):
    sess = fastrun.InferenceSession(tiny_model, cache_dir=cache_dir)
    ref = ort.InferenceSession(tiny_model, providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape, i.type) for i in sess.get_inputs()] == [(i.name, i.shape, i.type) for i in ref.get_inputs()]
    assert [(o.name, o.shape, o.type) for o in sess.get_outputs()] == [(o.name, o.shape, o.type) for o in ref.get_outputs()]


X_OK = np.ones((1, 8, 12, 12), np.float32)
WRONG_CALLS = [
    (None, {"nope": X_OK}), (None, {}), (None, {"x": X_OK, "nope": X_OK}), (["zzz"], {"x": X_OK}),
    (None, {"x": X_OK.astype(np.float64)}), (None, {"x": X_OK.astype(np.int64)}), (None, {"x": X_OK.astype(np.float16)}),
    (None, {"x": np.ones((8, 12, 12), np.float32)}), (None, {"x": np.ones((1, 7, 12, 12), np.float32)}),
    (None, {"x": np.ones((1, 8, 13, 12), np.float32)}), (None, {"x": "text"}),
]


def test_wrong_feeds_raise_onnxruntimes_own_errors_and_what_it_takes_runs(tiny_model, cache_dir):
    """Under every policy, with a plan for the shape or not: onnxruntime's exception and message."""
    fastrun.profile(tiny_model, cache_dir=cache_dir, op_limit=0.05, measure=False)
    ref = ort.InferenceSession(tiny_model, providers=["CPUExecutionProvider"])
    for policy in ("onnxruntime", "heuristic", "require"):
        sess = fastrun.InferenceSession(tiny_model, cache_dir=cache_dir, policy=policy)
        for names, feed in WRONG_CALLS:
            with pytest.raises(Exception) as want:
                ref.run(names, feed)
            with pytest.raises(type(want.value)) as got:
                sess.run(names, feed)
            assert str(got.value) == str(want.value), (policy, names, feed.keys())
        as_lists = {"x": (X_OK * 0.5).tolist()}  # onnxruntime takes nested lists
        np.testing.assert_allclose(sess.run(None, as_lists)[0], ref.run(None, as_lists)[0], rtol=1e-5, atol=1e-6)


def test_corrupt_plan_entries_are_ignored(cache_dir, tiny_model, caplog):
    fastrun.profile(tiny_model, cache_dir=cache_dir, op_limit=0.1, measure=False)
    caches = Caches(cache_dir)
    (key,) = list(caches.plans.keys())
    x = {"x": np.ones((1, 8, 12, 12), np.float32)}
    ref = _reference(open(tiny_model, "rb").read(), x)
    for bad in ("{truncated", json.dumps({"schema": 999}), json.dumps({"schema": 1, "nodes": "x"}), "[1, 2]"):
        caches.plans._cache.set(key, bad)
        with caplog.at_level(logging.WARNING):
            sess = fastrun.InferenceSession(tiny_model, cache_dir=cache_dir, policy="heuristic")
        assert list(sess.plans.values())[0].policy == "heuristic"
        np.testing.assert_allclose(sess.run(None, x)[0], ref[0], rtol=1e-4, atol=1e-5)


def test_pickled_cache_values_are_never_unpickled(cache_dir, tiny_model, tmp_path):
    """A cache copied from elsewhere must not execute code: pickled rows are refused."""
    fastrun.profile(tiny_model, cache_dir=cache_dir, op_limit=0.1, measure=False)
    import diskcache

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    caches = Caches(cache_dir)
    (key,) = list(caches.plans.keys())
    caches.close()
    raw = diskcache.Cache(os.path.join(cache_dir, "plans"))  # default Disk pickles
    raw.set(key, Evil())
    raw.close()
    sess = fastrun.InferenceSession(tiny_model, cache_dir=cache_dir, policy="heuristic")
    assert not marker.exists()
    assert list(sess.plans.values())[0].policy == "heuristic"


def test_stale_plan_after_model_edit_is_not_used(cache_dir, tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(tiny_conv_model(batch=1), str(path))
    fastrun.profile(str(path), cache_dir=cache_dir, op_limit=0.1, measure=False)
    assert fastrun.load_plan(str(path), cache_dir=cache_dir) is not None
    edited = tiny_conv_model(batch=1, k=24)
    onnx.save(edited, str(path))
    assert fastrun.load_plan(str(path), cache_dir=cache_dir) is None


def test_absent_cache_directory_is_created(tmp_path, tiny_model):
    target = tmp_path / "a" / "b" / "cache"
    fastrun.profile(tiny_model, cache_dir=str(target), op_limit=0.1, measure=False)
    assert (target / "plans").is_dir() and (target / "timings").is_dir()


def test_damaged_sqlite_file_does_not_crash_serving(cache_dir, tiny_model):
    fastrun.profile(tiny_model, cache_dir=cache_dir, op_limit=0.1, measure=False)
    db = os.path.join(cache_dir, "plans", "cache.db")
    with open(db, "r+b") as f:
        f.seek(0)
        f.write(b"\0" * 4096)
    sess = fastrun.InferenceSession(tiny_model, cache_dir=cache_dir)
    out = sess.run(None, {"x": np.ones((1, 8, 12, 12), np.float32)})
    assert out[0].shape == (1, 16, 1, 1)


def test_budget_zero_profiles_nothing_and_falls_back(cache_dir, tiny_model):
    report = fastrun.profile(tiny_model, cache_dir=cache_dir, budget=1e-9, measure=False)
    assert report.stats.measured == 0 and report.stats.skipped_budget == 2
    assert report.plan.policy == "partial"
    assert all(n.source == "heuristic" for n in report.plan.nodes if n.spec)


@pytest.mark.parametrize("fastest", ["onnxruntime-original", "optimal"])
def test_a_plan_cut_by_the_budget_is_raced_and_stored_as_the_race_decided(cache_dir, tiny_model, monkeypatch,
                                                                           fastest):
    """A partial plan (its nodes on estimated costs) must not skip the race: it runs only where it wins."""
    raced = []

    def fixed_race(runners, **kw):  # the race's outcome fixed: timing is noise on a shared machine
        raced.append(set(runners))
        return {k: 1.0 if k in (fastest, "2") else 10.0 for k in runners}

    monkeypatch.setattr(timing, "interleaved", fixed_race)
    report = fastrun.profile(tiny_model, cache_dir=cache_dir, budget=1e-9, measure=False, repeats=2)
    assert report.plan.policy == "partial" and report.stats.skipped_budget == 2
    assert any({"optimal", "onnxruntime-original"} <= r for r in raced)
    stored = fastrun.load_plan(tiny_model, cache_dir=cache_dir)
    assert stored.verified and stored.policy == "partial" and stored.solver["verified"]["kept"] == fastest
    assert stored.runs_original == (fastest == "onnxruntime-original")


def test_thread_counts_worth_timing():
    assert verify.thread_counts(4) == [4, 2, 1]
    assert verify.thread_counts(2) == [2, 1]
    assert verify.thread_counts(1) == [1]


def test_profile_measures_the_thread_count_and_the_plan_keeps_it(cache_dir, tiny_model, monkeypatch):
    monkeypatch.setenv("FASTRUN_THREADS", "2")
    real = timing.interleaved

    def one_thread_wins(runners, **kw):  # and onnxruntime on the original model loses the race
        times = real(runners, **kw)
        if set(runners) == {"1", "2"}:
            return {k: (0.5 if k == "1" else 1.0) * v for k, v in times.items()}
        return {k: 100.0 * v if k == "onnxruntime-original" else v for k, v in times.items()}

    monkeypatch.setattr(timing, "interleaved", one_thread_wins)
    report = fastrun.profile(tiny_model, cache_dir=cache_dir, op_limit=0.05, repeats=2)
    assert report.plan.threads == 1
    assert set(report.plan.solver["threads"]["ms"]) == {"1", "2"}
    session = fastrun.InferenceSession(tiny_model, cache_dir=cache_dir, policy="require")
    plan = next(iter(session.plans.values()))
    assert plan.threads == 1
    segments = [p for p in next(iter(session._programs.values()))[0].program if isinstance(p, Segment)]
    assert segments and all(s.session.get_session_options().intra_op_num_threads == 1 for s in segments)


def test_all_threads_are_kept_unless_fewer_win_clearly(cache_dir, tiny_model, monkeypatch):
    monkeypatch.setenv("FASTRUN_THREADS", "2")
    monkeypatch.setattr(timing, "interleaved",  # onnxruntime on the original slower: a plan of fastrun's runs
                        lambda runners, **kw: {k: 5.0 if k == "onnxruntime-original" else 1.0 for k in runners})
    report = fastrun.profile(tiny_model, cache_dir=cache_dir, op_limit=0.05, repeats=2, measure=False)
    assert report.plan.threads == 2 and report.plan.solver["threads"]["chosen"] == 2


def test_segments_get_their_own_thread_count_when_the_mix_wins(monkeypatch):
    """Per-segment counts come from per-part times; the mix is kept only if it wins end to end."""
    from fastrun.system import fingerprint
    from fastrun.ir import reader
    from fastrun.planning import planner
    from fastrun.ops import registry
    from tests.conftest import tiny_conv_model

    monkeypatch.setenv("FASTRUN_THREADS", "2")
    graph = reader.load(tiny_conv_model(batch=1))
    plan = planner.make_plan(graph, fingerprint.fingerprint(), None, allowed_formats={"NCHW"})
    plan.node("conv2").impl = registry.get("Conv", "conv1x1_gemm").id  # segment, host step, segment
    real_run = Program.run

    def first_segment_prefers_one_thread(self, feed, part_seconds=None):
        out = real_run(self, feed, part_seconds)
        if part_seconds is not None:
            threads = self.program[0].session.get_session_options().intra_op_num_threads
            part_seconds[0][-1] = 0.001 if threads == 1 else 0.002   # the first segment likes 1 thread
            part_seconds[-1][-1] = 0.002 if threads == 1 else 0.001  # the last one 2
        return out

    monkeypatch.setattr(Program, "run", first_segment_prefers_one_thread)
    real_interleaved = timing.interleaved
    monkeypatch.setattr(timing, "interleaved",  # all threads win end to end
                        lambda runners, **kw: {k: float(3 - int(k)) for k in real_interleaved(runners, **kw)})
    raced = {"mixed": 1.0, "uniform": 2.0}
    real_race = verify._race
    monkeypatch.setattr(verify, "_race", lambda graph, programs, repeats: (
        dict(raced) if set(programs) == set(raced) else real_race(graph, programs, repeats)))
    chosen = verify.choose_threads(graph, plan, repeats=2)
    assert chosen.threads == 2
    assert chosen.segment_threads == [1, 2] and chosen.solver["threads"]["segments"] == [1, 2]
    program = compiler.compile_plan(graph, chosen)
    segments = [p for p in program.program if isinstance(p, Segment)]
    assert [s.session.get_session_options().intra_op_num_threads for s in segments] == [1, 2]
    raced.update(mixed=1.99)  # within the margin: all segments alike
    plan.segment_threads = []
    assert verify.choose_threads(graph, plan, repeats=2).segment_threads == []


def test_whole_model_on_onnxruntime_is_kept_when_it_runs_faster(cache_dir, squeezenet_bytes, monkeypatch):
    """verify_plan races the assignment against the whole model as one ORT_ENABLE_ALL session;
    the winner's plan compiles to exactly that, survives the program store and matches onnxruntime."""
    import copy

    from fastrun.system import fingerprint
    from fastrun.ir import reader
    from fastrun.planning import plancheck, planner
    from fastrun.measure import profiler as profiler_mod

    graph = reader.load(squeezenet_bytes)
    caches = Caches(cache_dir)
    prof = profiler_mod.Profiler(caches, fingerprint.fingerprint(), op_limit_s=0.05)
    plan = planner.make_plan(graph, fingerprint.fingerprint(), prof)
    raced = {}

    def race(graph, programs, repeats):
        raced.update(programs)
        return [{"optimal": 10.0, "heuristic": 9.95, verify.UNSPLIT: 9.97, "onnxruntime": 9.5}] * verify.VERIFY_BLOCKS

    monkeypatch.setattr(verify, "_race_blocks", race)
    chosen = verify.verify_plan(graph, plan, prof, fingerprint.fingerprint(), repeats=2)
    assert "onnxruntime" in raced and chosen.whole_model and chosen.solver["verified"]["kept"] == "onnxruntime"
    assert chosen.reorders == [] and {n.out_format for n in chosen.nodes} == {"NCHW"}
    assert all(n.impl in ("onnxruntime", "ort@2") for n in chosen.nodes)
    program = compiler.compile_plan(graph, chosen)
    assert program.segments == 1 and program.host_steps == 0
    assert program.program[0].session.get_session_options().graph_optimization_level == \
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    feed = verify.random_feed(graph)
    ref = ort.InferenceSession(squeezenet_bytes, providers=["CPUExecutionProvider"]).run(None, feed)
    out = program.run(feed)
    assert verify.relative_error([out[k] for k in program.outputs], ref) < verify.MODEL_TOLERANCE
    # stored and loaded back, the program still runs at ORT_ENABLE_ALL
    recipe = compiler.build_recipe(graph, chosen)
    caches.programs.save(chosen, recipe, reader.declared_interface(onnx.load_from_string(squeezenet_bytes)))
    loaded = caches.programs.load(chosen)
    assert [p.level for p in loaded.parts] == [WHOLE_MODEL_LEVEL]
    assert plancheck.plan_problem(graph, chosen) is None
    blocked = copy.deepcopy(chosen)  # a whole-model flag over anything but plain NCHW is refused
    blocked.reorders = [[graph.nodes[0].outputs[0], "NCHW", "NCHWc8"]]
    assert "NCHW" in plancheck.plan_problem(graph, blocked)
    # the assignment must beat onnxruntime by the margin to be kept, in every race
    for optimal_ms, whole in (((9.0, 9.0, 9.0), False), ((9.9, 9.0, 9.0), True), ((9.0, 9.0, 10.1), True)):
        blocks = [{"optimal": ms, "heuristic": 10.5, verify.UNSPLIT: 10.5, "onnxruntime": 10.0} for ms in optimal_ms]
        monkeypatch.setattr(verify, "_race_blocks", lambda graph, programs, repeats: blocks)
        assert verify.verify_plan(graph, plan, prof, fingerprint.fingerprint(), repeats=2).whole_model == whole


def test_verify_races_in_consecutive_blocks(squeezenet_bytes, monkeypatch):
    """_race_blocks times every program in VERIFY_BLOCKS separate interleaved races."""
    from fastrun.system import fingerprint
    from fastrun.ir import reader
    from fastrun.planning import planner

    graph = reader.load(squeezenet_bytes)
    whole = planner.whole_model_plan(graph, planner.heuristic_plan(graph, fingerprint.fingerprint()))
    calls = []
    real_interleaved = timing.interleaved
    monkeypatch.setattr(timing, "interleaved",
                        lambda runners, **kw: calls.append(kw) or real_interleaved(runners, **kw))
    blocks = verify._race_blocks(graph, {"a": compiler.compile_plan(graph, whole)}, repeats=2)
    assert len(blocks) == len(calls) == verify.VERIFY_BLOCKS
    assert all(set(b) == {"a"} and b["a"] > 0 for b in blocks)
    assert all(kw["repeats"] >= 5 for kw in calls)


def test_heuristic_plan_leaves_onnxruntime_alone_unless_a_rule_puts_a_host_kernel_somewhere():
    """Without measurements an assignment of onnxruntime's own kernels is not trusted over
    onnxruntime's own layouts; a Winograd-sized 3x3 layer (256 channels at 56x56) gets Winograd."""
    from fastrun.system import fingerprint
    from fastrun.ir import reader
    from fastrun.planning import planner

    small = tiny_conv_model()
    plan = planner.heuristic_plan(reader.from_proto(small, small.SerializeToString(), {"x": (1, 8, 12, 12)}),
                                  fingerprint.fingerprint())
    assert plan.whole_model and plan.policy == "heuristic" and plan.reorders == []
    big = tiny_conv_model(c=256, k=256, hw=56)
    plan = planner.heuristic_plan(reader.from_proto(big, big.SerializeToString(), {"x": (1, 256, 56, 56)}),
                                  fingerprint.fingerprint())
    assert not plan.whole_model and plan.node("conv1").impl.startswith("winograd_f")


def test_heuristic_plan_needs_a_predicted_gain_worth_the_split_sessions(monkeypatch):
    """A host kernel predicted to save less than HEURISTIC_MIN_GAIN of the heavy nodes' time is
    not worth leaving onnxruntime's session for."""
    from fastrun.system import fingerprint
    from fastrun.ir import reader
    from fastrun.planning import planner

    big = tiny_conv_model(c=256, k=256, hw=56)
    graph = reader.from_proto(big, big.SerializeToString(), {"x": (1, 256, 56, 56)})
    gain = planner.host_gain(graph, planner.make_plan(graph, fingerprint.fingerprint()))
    assert 0.05 < gain < 1
    monkeypatch.setattr(planner, "HEURISTIC_MIN_GAIN", gain * 1.01)
    assert planner.heuristic_plan(graph, fingerprint.fingerprint()).whole_model
    monkeypatch.setattr(planner, "HEURISTIC_MIN_GAIN", gain * 0.99)
    assert not planner.heuristic_plan(graph, fingerprint.fingerprint()).whole_model


def test_programs_with_host_kernels_keep_freed_memory_for_their_outputs(monkeypatch):
    """Host kernels return fresh arrays: building a program that has any asks glibc to keep freed
    memory (fastrun.system.allocator); a program of onnxruntime segments alone leaves malloc alone."""
    from fastrun.system import allocator, fingerprint
    from fastrun.ir import reader
    from fastrun.planning import planner

    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    big = tiny_conv_model(c=256, k=256, hw=56)
    graph = reader.from_proto(big, big.SerializeToString(), {"x": (1, 256, 56, 56)})
    plan = planner.make_plan(graph, fingerprint.fingerprint())
    assert compiler.compile_plan(graph, planner.whole_model_plan(graph, plan)).host_steps == 0 and not calls
    assert compiler.compile_plan(graph, plan).host_steps > 0 and calls


def test_keep_freed_memory_respects_the_users_malloc_settings(monkeypatch):
    from fastrun.system import allocator

    monkeypatch.setattr(allocator, "_applied", False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    assert allocator.keep_freed_memory() is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert allocator.keep_freed_memory() is (sys.platform.startswith("linux") and "glibc" in platform.libc_ver()[0])


def _plan_with_host_step(monkeypatch):
    """tiny_conv_model with conv2 on a host kernel (segment, host step, segment), FASTRUN_THREADS=2."""
    from fastrun.system import fingerprint
    from fastrun.ir import reader
    from fastrun.planning import planner
    from fastrun.ops import registry

    monkeypatch.setenv("FASTRUN_THREADS", "2")
    graph = reader.load(tiny_conv_model(batch=1))
    plan = planner.make_plan(graph, fingerprint.fingerprint(), None, allowed_formats={"NCHW"})
    plan.node("conv2").impl = registry.get("Conv", "conv1x1_gemm").id
    return graph, plan


def test_host_steps_run_with_the_plans_host_thread_count(monkeypatch):
    """The executor runs each host step inside hostthreads.limited: compiled kernels split their
    work in that many parts and OpenBLAS is lowered for the step, then restored."""
    from fastrun.system import blas, hostthreads

    graph, plan = _plan_with_host_step(monkeypatch)
    blas_counts = blas.thread_counts
    before = blas_counts()
    for host_threads, expected in ((1, 1), (0, 2)):
        plan.host_threads = host_threads
        program = compiler.compile_plan(graph, plan)
        seen = []
        for part in program.program:
            if isinstance(part, HostCall):
                real = part.kernel
                part.kernel = lambda *a, real=real: seen.append((hostthreads.current(), blas_counts())) or real(*a)
        program.run(verify.random_feed(graph))
        assert seen and all(threads == expected for threads, _ in seen)
        assert all(counts == [min(expected, b) for b in before] for _, counts in seen)
        assert blas_counts() == before and hostthreads.current() == 2


def test_fewer_blas_threads_are_set_and_restored_never_more():
    from fastrun.system import blas

    before = blas.thread_counts()
    if not before:
        pytest.skip("no BLAS threadpoolctl can control here")
    restore = blas.lower_threads(1)
    assert blas.thread_counts() == [1] * len(before)
    restore()
    assert blas.thread_counts() == before
    blas.lower_threads(max(before) + 4)()  # more than OpenBLAS has: nothing changes
    assert blas.thread_counts() == before


def test_compiled_winograd_splits_its_work_in_the_host_steps_thread_count():
    transforms = pytest.importorskip("fastrun.ops.builtin.winograd_transforms")
    from fastrun.system import hostthreads

    with hostthreads.limited(1):
        assert transforms.threads() == 1
    assert transforms.threads() == min(transforms.numba.get_num_threads(), hostthreads.current())


def test_choose_threads_measures_the_host_kernels_thread_count(monkeypatch):
    graph, plan = _plan_with_host_step(monkeypatch)
    real_interleaved = timing.interleaved
    monkeypatch.setattr(timing, "interleaved",  # onnxruntime: all threads win
                        lambda runners, **kw: {k: float(3 - int(k)) for k in real_interleaved(runners, **kw)})
    raced = []
    host_ms = {"1": 1.0, "2": 2.0}

    def race(graph, programs, repeats):
        if set(programs) == {"mixed", "uniform"}:  # per-segment counts (noise here): all alike wins
            return {"mixed": 2.0, "uniform": 1.0}
        raced.append({k: [p.threads for p in prog.program if isinstance(p, HostCall)]
                      for k, prog in programs.items()})
        for prog in programs.values():
            prog.run(verify.random_feed(graph))
        return dict(host_ms)

    monkeypatch.setattr(verify, "_race", race)
    chosen = verify.choose_threads(graph, plan, repeats=2)
    assert raced == [{"2": [2], "1": [1]}]
    assert chosen.threads == 2 and chosen.host_threads == 1
    assert chosen.solver["threads"]["host"] == 1 and set(chosen.solver["threads"]["host_ms"]) == {"1", "2"}
    recipe = compiler.build_recipe(graph, chosen)
    assert [p.threads for p in recipe.parts if isinstance(p, HostRecipe)] == [1]
    host_ms.update({"1": 1.0, "2": 1.02})  # within the margin
    plan.host_threads = 0
    assert verify.choose_threads(graph, plan, repeats=2).host_threads == 2


def test_a_run_drops_each_intermediate_after_its_last_reader(monkeypatch):
    """Program.released: every tensor a part reads is dropped once, after its last reader, except
    the graph outputs; a run still returns the outputs (and the same ones twice)."""

    graph, plan = _plan_with_host_step(monkeypatch)
    program = compiler.compile_plan(graph, plan)
    read = [t for part in program.program for t in part.inputs]
    released = [t for ts in program.released for t in ts]
    assert sorted(released) == sorted(set(read) - set(program.outputs.values()))
    for i, ts in enumerate(program.released):
        assert all(t not in later.inputs for t in ts for later in program.program[i + 1:])
    seen = []
    real = program.program[-1].__class__.__call__

    def spy(part, values):
        seen.append(set(values))
        return real(part, values)

    monkeypatch.setattr(type(program.program[-1]), "__call__", spy)
    feed = verify.random_feed(graph)
    first, second = program.run(feed), program.run(feed)
    assert set(first) == set(graph.outputs) and all(np.array_equal(first[k], second[k]) for k in first)
    dead = {t for i, ts in enumerate(program.released[:-1]) for t in ts}
    assert seen and not (seen[-1] & dead)  # the last part sees no tensor an earlier part released
