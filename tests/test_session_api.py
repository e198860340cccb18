"""fastrun.InferenceSession called as onnxruntime's users call onnxruntime.InferenceSession.

Every call is made on both sessions and the answers compared: with a plan for the fed shape (a
warm cache) and without one (the original model answers).
"""
import json
import logging
import time
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import fastrun
from fastrun import session as session_mod
from fastrun.ir import reader
from fastrun.runtime import program as program_mod
from fastrun.session import MAX_PROGRAMS
from fastrun.workflows import models
from fastrun.workflows.verify import relative_error

CPU = ["CPUExecutionProvider"]
OP_LIMIT = 0.05


def feed(batch=1, seed=0):
    return {"x": np.random.default_rng(seed).standard_normal((batch, 8, 12, 12)).astype(np.float32)}


@pytest.fixture
def warm(tmp_path, cache_dir):
    """The tiny model with a symbolic batch, profiled for batch 1 (batch 2 has no plan)."""
    from tests.conftest import tiny_conv_model

    path = str(tmp_path / "tiny.onnx")
    onnx.save(tiny_conv_model(), path)
    fastrun.profile(path, {"x": (1, 8, 12, 12)}, cache_dir=cache_dir, op_limit=OP_LIMIT, measure=False,
                    verify=False)  # fastrun's program, whatever the race would keep
    return path


def close(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)


def test_constructor_takes_onnxruntimes_positional_arguments_and_keeps_its_options(warm, cache_dir):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.log_severity_level = 3
    sess = fastrun.InferenceSession(warm, so, CPU, None, cache_dir=cache_dir)
    ref = ort.InferenceSession(warm, so, CPU, None)
    got, want = sess.get_session_options(), ref.get_session_options()
    for option in ("intra_op_num_threads", "inter_op_num_threads", "execution_mode", "graph_optimization_level",
                   "log_severity_level"):
        assert getattr(got, option) == getattr(want, option), option
    assert sess.get_providers() == ref.get_providers() == CPU
    assert sess.get_provider_options() == ref.get_provider_options()
    for b in (1, 2):  # planned, then not
        close(sess.run(None, feed(b)), ref.run(None, feed(b)))
    assert [k[0][1][0] for k in sess.plans] == [1]
    with pytest.raises(TypeError, match="cache_dir="):
        fastrun.InferenceSession(warm, cache_dir)  # fastrun's old second positional is onnxruntime's sess_options


def test_metadata_methods_answer_as_onnxruntime(warm, cache_dir):
    sess = fastrun.InferenceSession(warm, cache_dir=cache_dir)
    ref = ort.InferenceSession(warm, providers=CPU)
    got, want = sess.get_modelmeta(), ref.get_modelmeta()
    for field in ("producer_name", "graph_name", "domain", "description", "version", "custom_metadata_map"):
        assert getattr(got, field) == getattr(want, field), field
    for method in ("get_inputs", "get_outputs", "get_overridable_initializers"):
        assert [(a.name, a.shape, a.type) for a in getattr(sess, method)()] == \
            [(a.name, a.shape, a.type) for a in getattr(ref, method)()], method
    assert type(sess.get_inputs()[0]) is type(ref.get_inputs()[0])
    public = {name for name in dir(ref) if not name.startswith("_")}
    assert public <= set(dir(sess))  # every public method exists, and introspection lists it
    for name in public:
        assert callable(getattr(sess, name)) == callable(getattr(ref, name)), name


def test_element_types_of_the_interface_are_onnxruntimes(tmp_path, cache_dir):
    from onnx import TensorProto, helper

    types = [TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.INT8,
             TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16, TensorProto.INT32, TensorProto.INT64,
             TensorProto.UINT32, TensorProto.UINT64, TensorProto.BOOL, TensorProto.STRING]
    vis = [helper.make_tensor_value_info(f"t{i}", t, ["n", 2]) for i, t in enumerate(types)]
    outs = [helper.make_tensor_value_info(f"o{i}", t, ["n", 2]) for i, t in enumerate(types)]
    nodes = [helper.make_node("Identity", [f"t{i}"], [f"o{i}"]) for i in range(len(types))]
    model = helper.make_model(helper.make_graph(nodes, "types", vis, outs), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    data = model.SerializeToString()
    sess, ref = fastrun.InferenceSession(data, cache_dir=cache_dir), ort.InferenceSession(data, providers=CPU)
    assert [(a.name, a.shape, a.type) for a in sess.get_inputs() + sess.get_outputs()] == \
        [(a.name, a.shape, a.type) for a in ref.get_inputs() + ref.get_outputs()]
    ints = {"t9": np.arange(4, dtype=np.int64).reshape(2, 2)}
    one = helper.make_model(helper.make_graph([nodes[9]], "one", [vis[9]], [outs[9]]),
                            opset_imports=[helper.make_opsetid("", 17)])
    one.ir_version = 8
    close(fastrun.InferenceSession(one, cache_dir=cache_dir).run(None, ints), [ints["t9"]])


@pytest.mark.parametrize("batch", [1, 2])
def test_run_with_ort_values_and_io_binding_round_trips(warm, cache_dir, batch):
    sess = fastrun.InferenceSession(warm, cache_dir=cache_dir)
    ref = ort.InferenceSession(warm, providers=CPU)
    x = feed(batch)["x"]
    want = ref.run(None, {"x": x})
    values = sess.run_with_ort_values(None, {"x": ort.OrtValue.ortvalue_from_numpy(x)})
    assert all(isinstance(v, ort.OrtValue) for v in values)
    close([v.numpy() for v in values], want)

    binding = sess.io_binding()
    binding.bind_cpu_input("x", x)
    binding.bind_output("y")
    sess.run_with_iobinding(binding)
    binding.synchronize_outputs()
    close(binding.copy_outputs_to_cpu(), want)
    close([v.numpy() for v in binding.get_outputs()], want)

    out = ort.OrtValue.ortvalue_from_numpy(np.zeros_like(want[0]))  # a caller's output buffer
    binding.clear_binding_inputs()
    binding.clear_binding_outputs()
    binding.bind_ortvalue_input("x", ort.OrtValue.ortvalue_from_numpy(x))
    binding.bind_ortvalue_output("y", out)
    sess.run_with_iobinding(binding)
    close([out.numpy()], want)

    buffer = np.zeros_like(want[0])  # a raw pointer: replayed on onnxruntime's own binding
    binding.bind_output("y", "cpu", 0, np.float32, list(buffer.shape), buffer.ctypes.data)
    sess.run_with_iobinding(binding)
    close([buffer], want)
    with pytest.raises(ValueError, match="session that created it"):
        fastrun.InferenceSession(warm, cache_dir=cache_dir).run_with_iobinding(binding)


def test_run_async_calls_back_with_the_results(warm, cache_dir):
    sess = fastrun.InferenceSession(warm, cache_dir=cache_dir)
    ref = ort.InferenceSession(warm, providers=CPU)
    for batch in (1, 2):
        got = {}

        def callback(results, user_data, err):
            got.update(results=results, user_data=user_data, err=err)

        sess.run_async(None, feed(batch), callback, "token")
        deadline = time.monotonic() + 30
        while "err" not in got and time.monotonic() < deadline:
            time.sleep(0.01)
        assert got["user_data"] == "token" and not got["err"]
        close(got["results"], ref.run(None, feed(batch)))


def test_end_profiling_writes_onnxruntimes_profile(warm, cache_dir, tmp_path):
    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp_path / "prof")
    sess = fastrun.InferenceSession(warm, so, cache_dir=cache_dir)
    sess.run(None, feed(2))
    trace = sess.end_profiling()
    assert trace and json.loads(open(trace).read())


def test_a_device_provider_is_never_silently_the_cpu(warm, cache_dir, caplog):
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING, logger="fastrun"):
        warnings.simplefilter("always")
        sess = fastrun.InferenceSession(warm, providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
                                        cache_dir=cache_dir)
        ref = ort.InferenceSession(warm, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        out = sess.run(None, feed(1))
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert any("CUDAExecutionProvider" in m and "none applies" in m for m in messages)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert any("could not use CUDAExecutionProvider" in m and "CPUExecutionProvider" in m for m in messages)
    assert sess.plans == {}  # the warm plan for batch 1 is a CPU plan: not used
    assert sess.get_providers() == ref.get_providers()
    close(out, ref.run(None, feed(1)))


def test_intra_op_num_threads_caps_the_plans_threads(warm, cache_dir):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = fastrun.InferenceSession(warm, so, cache_dir=cache_dir)
    close(sess.run(None, feed(1)), ort.InferenceSession(warm, providers=CPU).run(None, feed(1)))
    ((program, plan),) = sess._programs.values()
    for part in program.program:
        if isinstance(part, program_mod.Segment):
            assert part.session.get_session_options().intra_op_num_threads == 1
        else:
            assert part.threads == 1
    assert program_mod.capped_threads(0, 1) == 1 and program_mod.capped_threads(2, 0) == 2


def test_thirty_lengths_without_plans_compile_nothing(tmp_path, cache_dir, monkeypatch):
    """A text model fed 30 lengths, none planned: onnxruntime's own session answers each, as fast."""
    path = str(tmp_path / "encoder.onnx")
    onnx.save(models.dynamic_encoder(), path)
    lengths = [8 * (i + 1) for i in range(30)]
    rng = np.random.default_rng(0)
    feeds = [{"input_ids": rng.integers(0, 1000, (1, n))} for n in lengths]

    def first_calls(make):
        start = time.perf_counter()
        sess = make()
        outs = [sess.run(None, f)[0] for f in feeds]
        return time.perf_counter() - start, outs

    def never(*a, **k):
        raise AssertionError("compiled or parsed a graph for a shape without a plan")

    monkeypatch.setattr(reader, "from_proto", never)
    monkeypatch.setattr(session_mod, "instantiate", never)
    ort_s, want = first_calls(lambda: ort.InferenceSession(path, providers=CPU))
    ours_s, got = first_calls(lambda: fastrun.InferenceSession(path, cache_dir=cache_dir))
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert ours_s < 2 * ort_s + 0.5, (ours_s, ort_s)


def test_heuristic_programs_are_bounded_and_share_the_weights(tmp_path, cache_dir):
    path = str(tmp_path / "encoder.onnx")
    onnx.save(models.dynamic_encoder(hidden=32, layers=1), path)
    sess = fastrun.InferenceSession(path, cache_dir=cache_dir, policy="heuristic", max_programs=3)
    ref = ort.InferenceSession(path, providers=CPU)
    for n in (4, 8, 12, 16, 4):
        ids = {"input_ids": np.arange(n, dtype=np.int64).reshape(1, n)}
        close(sess.run(None, ids), ref.run(None, ids))
    assert [k[0][1][1] for k in sess.plans] == [12, 16, 4]  # least recently used first; 8 was dropped
    graphs = [reader.from_proto(sess._model(), sess._bytes(), {"input_ids": (1, n)}, sess._initializers)
              for n in (4, 8)]
    assert graphs[0].constants["embedding"] is graphs[1].constants["embedding"]
    assert MAX_PROGRAMS == 8


def test_lazy_original_session_when_a_stored_program_covers_the_declared_shape(tiny_model, cache_dir):
    fastrun.profile(tiny_model, cache_dir=cache_dir, op_limit=OP_LIMIT, measure=False, verify=False)
    sess = fastrun.InferenceSession(tiny_model, cache_dir=cache_dir, policy="require")
    assert not sess._original.created
    close(sess.run(None, feed(1)), ort.InferenceSession(tiny_model, providers=CPU).run(None, feed(1)))
    assert not sess._original.created
    assert sess.get_inputs()[0].type == "tensor(float)"
    sess.get_modelmeta()  # onnxruntime's own answer: the session is made now
    assert sess._original.created
    assert relative_error(sess.run(None, feed(1)), ort.InferenceSession(tiny_model).run(None, feed(1))) < 1e-4


def test_a_one_session_plan_is_called_directly_with_any_output_names(tmp_path, cache_dir, monkeypatch):
    """A plan that is one onnxruntime session (no host kernels, no splits) is served by calling that
    session: no per-call bookkeeping, the requested outputs in the requested order."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 4]) for n in ("a", "b")]
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Sigmoid", ["x"], ["b"])],
                              "two_outputs", [x], outputs)
    path = str(tmp_path / "two.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    ours = fastrun.InferenceSession(path, cache_dir=cache_dir, policy="heuristic")
    theirs = ort.InferenceSession(path, providers=CPU)
    monkeypatch.setattr(program_mod.Program, "run", lambda *a, **k: pytest.fail("Program.run was called"))
    data = {"x": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)}
    for names in (None, ["b", "a"], ["b"]):
        close(ours.run(names, data), theirs.run(names, data))
    assert ours.plan_for({"x": (3, 4)}) is not None


def test_feeds_seen_before_answer_as_they_did_and_changed_feeds_are_decided_again(warm, cache_dir):
    """Each feed signature (names, types, shapes, dtypes) is routed once and remembered: a second
    round of the same mixed calls gives onnxruntime's answers and onnxruntime's errors again."""
    ours = fastrun.InferenceSession(warm, cache_dir=cache_dir)
    theirs = ort.InferenceSession(warm, providers=CPU)
    planned, unplanned = feed(1), feed(2, seed=1)
    calls = [(None, planned), (None, unplanned), (["y"], planned), (["nope"], planned),
             (None, {"x": planned["x"].astype(np.float64)}), (None, {"x": planned["x"].tolist()}),
             (None, {"x": planned["x"], "extra": planned["x"]}), (None, {"z": planned["x"]})]
    name = theirs.get_outputs()[0].name
    calls = [(names if names != ["y"] else [name], data) for names, data in calls]
    assert ours.plan_for({"x": (1, 8, 12, 12)}) is not None
    for _ in range(2):
        for names, data in calls:
            try:
                want = theirs.run(names, data)
            except Exception as exc:
                with pytest.raises(type(exc)):
                    ours.run(names, data)
            else:
                close(ours.run(names, data), want)


def test_a_matched_feed_skips_onnxruntimes_python_checks_and_answers_the_same(warm, cache_dir, monkeypatch):
    """A feed signature matched to a plan once runs through the binding of the session (ortutil.matched_run):
    onnxruntime's Python ``run`` and its per-call name checks are not called again."""
    from fastrun.system import ortutil

    ours = fastrun.InferenceSession(warm, cache_dir=cache_dir)
    theirs = ort.InferenceSession(warm, providers=CPU)
    data = feed(1)
    want = theirs.run(None, data)
    close(ours.run(None, data), want)
    monkeypatch.setattr(ort.InferenceSession, "run", lambda *a, **k: pytest.fail("onnxruntime's Python run"))
    close(ours.run(None, data), want)

    class Bare:  # a session without the binding where onnxruntime keeps it: its own run answers
        def run(self, names, feed_):
            return ["bare"]
    assert ortutil.matched_run(Bare())(["y"], {}) == ["bare"]
