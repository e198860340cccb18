"""onnxruntime's NCHWc convolutions, the light ops' formats and the reorders between formats.

Every check uses random weights and data: constant weights hide layout bugs.
"""
from __future__ import annotations

import itertools
import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from fastrun.ops import formats, kernels, layout_ops, registry, reorders
from fastrun.system import ortutil
from fastrun.ir.graph import Graph, Node, TensorInfo
from fastrun.ops.builtin import nchwc
from fastrun.ops.registry import OpSpec, resolve_format

B = formats.native_block_size()
BLOCKED = formats.blocked(B) if B else None
pytestmark = pytest.mark.skipif(B < 4, reason="no NCHWc kernels on this CPU")


# ----------------------------------------------------------------------------------- conv helpers

def conv_spec(n, c, h, w, k, r, s=None, stride=1, pads=None, dil=1, group=1, bias=True, act=None, params=()):
    s = s or r
    pads = tuple(pads) if pads is not None else (dil * (r // 2), dil * (s // 2), dil * (r // 2), dil * (s // 2))
    p = (h + pads[0] + pads[2] - dil * (r - 1) - 1) // stride + 1
    q = (w + pads[1] + pads[3] - dil * (s - 1) - 1) // stride + 1
    attrs = {"kernel_shape": (r, s), "strides": (stride, stride), "pads": pads, "dilations": (dil, dil), "group": group}
    inputs = [(n, c, h, w), (k, c // group, r, s)] + ([(k,)] if bias else [])
    return OpSpec("Conv", tuple(inputs), (False, True) + ((True,) if bias else ()), (n, k, p, q),
                  attrs=tuple(sorted(attrs.items())), activation=act, activation_params=tuple(params))


def check_impl(name, spec, seed=0, garbage_padding=False):
    impl = registry.get("Conv", name)
    assert impl.accepts(spec), f"{name} should accept {spec.describe()}"
    rng = np.random.default_rng(seed)
    consts, runtime = kernels.random_inputs(spec, rng)
    if 2 in consts:
        consts[2] = rng.standard_normal(consts[2].shape).astype(np.float32)  # non-trivial bias
    ref = kernels.reference_callable(spec, consts)(*runtime)
    fin, fout = resolve_format(impl.in_format), resolve_format(impl.out_format)
    x = formats.to_format(runtime[0], fin)
    c = spec.inputs[0][1]
    if garbage_padding and formats.block_size(fin) and c % B:
        x[:, -1, :, :, c % B:] = rng.standard_normal(x[:, -1, :, :, c % B:].shape) * 100
    y = kernels.build_callable(impl, spec, consts)(x)
    assert y.shape == formats.physical_shape(spec.output, fout)
    got = formats.from_format(y, fout, spec.output[1])
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(ref).max())))


BLOCKED_CASES = [
    # (n, c, h, w, k, r, kwargs)
    (2, B, 9, 9, B, 3, {}),
    (2, 2 * B, 8, 10, 3 * B, 3, {"stride": 2}),
    (1, B + 4, 9, 9, B + 3, 3, {"act": "Relu"}),           # C, K not multiples of the block
    (2, 3, 12, 12, 2 * B, 7, {"stride": 2, "pads": (3, 3, 3, 3)}),  # C < block, blocked input
    (1, 17, 7, 7, 20, 3, {"act": "Clip", "params": (0.0, 6.0)}),    # C % 4 != 0
    (2, 2 * B, 7, 9, 4 * B, 1, {"pads": (0, 0, 0, 0)}),      # pointwise
    (1, 2 * B, 9, 9, B, 1, {"pads": (0, 0, 0, 0), "stride": 2, "bias": False}),
    (1, B, 11, 11, B, 3, {"dil": 2}),
    (1, B, 10, 9, 2 * B, 3, {"pads": (0, 1, 2, 1)}),          # asymmetric pads
    (1, B, 8, 8, B, 3, {"s": 5, "pads": (1, 2, 1, 2), "act": "LeakyRelu", "params": (0.1,)}),
    (1, B, 8, 8, B, 3, {"act": "Sigmoid"}),
    (1, B, 8, 8, B, 3, {"act": "Tanh"}),
    (1, B, 8, 8, B, 1, {"pads": (0, 0, 0, 0), "act": "HardSigmoid", "params": (0.2, 0.5)}),
    (1, 4 * B, 8, 8, 4 * B, 3, {"group": 2}),                # grouped, C/g and K/g multiples of the block
    (2, 3 * B, 6, 6, 6 * B, 1, {"group": 3, "pads": (0, 0, 0, 0)}),
]


@pytest.mark.parametrize("case", BLOCKED_CASES, ids=lambda c: f"{c[:6]}{c[6]}")
def test_ort_nchwc(case):
    n, c, h, w, k, r, kw = case
    check_impl("ort_nchwc", conv_spec(n, c, h, w, k, r, **kw), garbage_padding=True)


@pytest.mark.parametrize("c", [1, 3, B // 2, B - 1])
@pytest.mark.parametrize("k, r, stride, act", [(B, 3, 1, None), (B + 5, 7, 2, "Relu"), (2 * B, 3, 2, "Clip")])
def test_ort_nchwc_nchw_in(c, k, r, stride, act):
    params = (0.0, 6.0) if act == "Clip" else ()
    check_impl("ort_nchwc_nchw_in", conv_spec(2, c, 13, 13, k, r, stride=stride, act=act, params=params))


@pytest.mark.parametrize("c", [4, B, B + 4, 2 * B, 7, 18])
@pytest.mark.parametrize("r, stride, act", [(3, 1, "Clip"), (5, 2, None), (3, 2, "Relu")])
def test_ort_nchwc_depthwise(c, r, stride, act):
    params = (0.0, 6.0) if act == "Clip" else ()
    check_impl("ort_nchwc_depthwise", conv_spec(2, c, 11, 11, c, r, stride=stride, group=c, act=act, params=params),
               garbage_padding=True)


def test_applicability():
    assert not registry.get("Conv", "ort_nchwc_nchw_in").accepts(conv_spec(1, B, 8, 8, B, 3))
    assert registry.get("Conv", "ort_nchwc_nchw_in").accepts(conv_spec(1, 3, 8, 8, B, 3))
    dw = conv_spec(1, 2 * B, 8, 8, 2 * B, 3, group=2 * B)
    assert not registry.get("Conv", "ort_nchwc").accepts(dw)
    assert registry.get("Conv", "ort_nchwc_depthwise").accepts(dw)
    # grouped with groups not aligned to blocks, depthwise with a channel multiplier: not supported
    assert not registry.get("Conv", "ort_nchwc").accepts(conv_spec(1, 2 * B, 8, 8, 2 * B, 3, group=4))
    assert not registry.get("Conv", "ort_nchwc_depthwise").accepts(conv_spec(1, B, 8, 8, 2 * B, 3, group=B))
    # activations MLAS cannot fuse
    assert not registry.get("Conv", "ort_nchwc").accepts(conv_spec(1, B, 8, 8, B, 3, act="Elu", params=(1.0,)))
    # 1-D convolution
    spec1d = OpSpec("Conv", ((1, B, 10), (B, B, 3)), (False, True), (1, B, 8),
                    attrs=tuple(sorted({"kernel_shape": (3,), "strides": (1,), "pads": (0, 0), "dilations": (1,),
                                        "group": 1}.items())))
    assert not any(registry.get("Conv", n).accepts(spec1d) for n in ("ort_nchwc", "ort_nchwc_depthwise"))


def _transformer_filter(w: np.ndarray, group: int, c: int, h: int = 6) -> np.ndarray:
    """The filter onnxruntime's own NchwcTransformer stores for a Conv with weights ``w``."""
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], kernel_shape=list(w.shape[2:]), group=group)]
    k = w.shape[0]
    model = ortutil.make_model(nodes, [ortutil.value_info("x", [1, c, h, h])],
                               [ortutil.value_info("y", [1, k, h - w.shape[2] + 1, h - w.shape[3] + 1])], {"W": w})
    with tempfile.TemporaryDirectory() as d:
        so = ortutil.session_options("all")
        so.optimized_model_filepath = os.path.join(d, "opt.onnx")
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        opt = onnx.load(so.optimized_model_filepath)
    convs = [n for n in opt.graph.node if n.domain == nchwc.NCHWC_DOMAIN and n.op_type == "Conv"]
    assert convs, "onnxruntime did not transform the Conv"
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in opt.graph.initializer}
    return inits[convs[0].input[1]]


@pytest.mark.parametrize("c, k, group, reorder", [
    (2 * B, 3 * B, 1, "bibo"), (B + 4, B + 3, 1, "bibo"), (3, B + 3, 1, "bo"), (2 * B, 2 * B, 2 * B, "bo"),
    (4 * B, 4 * B, 2, "bibo_nopad")])
def test_filter_layout_matches_ort_transformer(c, k, group, reorder):
    w = np.random.default_rng(3).standard_normal((k, c // group, 3, 3)).astype(np.float32)
    ours = {"bibo": lambda: nchwc.reorder_filter_oihwbibo(w, B),
            "bibo_nopad": lambda: nchwc.reorder_filter_oihwbibo(w, B, pad_input=False),
            "bo": lambda: nchwc.reorder_filter_oihwbo(w, B)}[reorder]()
    theirs = _transformer_filter(w, group, c)
    assert ours.shape == theirs.shape
    np.testing.assert_array_equal(ours, theirs)


# ------------------------------------------------------------------------------------- light ops

def make_graph(nodes, tensors, constants=None, opset=13):
    inputs = [t for t in tensors if not any(t in n.outputs for n in nodes)]
    outputs = [n.outputs[0] for n in nodes]
    return Graph(nodes=nodes, tensors={k: TensorInfo(tuple(v), "float32") for k, v in tensors.items()},
                 constants=dict(constants or {}), inputs=inputs, outputs=outputs, opsets={"": opset})


def run_light(node, graph, fmt, feeds):
    """Run ``emit_light(node, graph, fmt)`` on logical NCHW ``feeds``; return the logical output."""
    frag = layout_ops.emit_light(node, graph, fmt)
    runtime = graph.runtime_inputs(node)
    out = node.outputs[0]
    out_shape = graph.tensors[out].shape
    inputs = [ortutil.value_info(t, formats.physical_shape(graph.tensors[t].shape, fmt)) for t in runtime]
    opsets = {"": graph.opsets[""], **frag.opsets}
    model = ortutil.make_model(frag.nodes, inputs, [ortutil.value_info(out, formats.physical_shape(out_shape, fmt))],
                               frag.initializers, opsets)
    sess = ortutil.session(model, level="extended")
    y = sess.run(None, {t: formats.to_format(feeds[t], fmt) for t in runtime})[0]
    assert y.shape == formats.physical_shape(out_shape, fmt)
    return formats.from_format(y, fmt, out_shape[1])


def check_light(node, graph, expect_formats, seed=0):
    rng = np.random.default_rng(seed)
    offered = layout_ops.light_formats(node, graph)
    assert sorted(offered) == sorted(expect_formats), (node.op_type, offered)
    feeds = {t: rng.standard_normal(graph.tensors[t].shape).astype(np.float32)
             for t in graph.runtime_inputs(node)}
    ref = run_light(node, graph, formats.NCHW, feeds)
    for fmt in offered:
        got = run_light(node, graph, fmt, feeds)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5, err_msg=f"{node.op_type} in {fmt}")


SHAPES = [(2, B, 6, 7), (1, B + 4, 5, 5), (1, 3, 4, 6)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("op, attrs, opset", [
    ("Relu", {}, 13), ("Sigmoid", {}, 13), ("Tanh", {}, 13), ("LeakyRelu", {"alpha": 0.2}, 13),
    ("Clip", {"min": -0.5, "max": 0.5}, 9), ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}, 13),
    ("Identity", {}, 13), ("Dropout", {}, 9), ("Exp", {}, 13)])
def test_unary(shape, op, attrs, opset):
    node = Node("n", op, "", ["x"], ["y"], dict(attrs))
    graph = make_graph([node], {"x": shape, "y": shape}, opset=opset)
    padded = shape[1] % B != 0
    expect = ["NHWC"] + ([] if (op == "Exp" and padded) else [BLOCKED])
    check_light(node, graph, expect)


def test_clip_opset11_constant_bounds():
    shape = (1, B + 4, 5, 5)
    node = Node("clip", "Clip", "", ["x", "lo", "hi"], ["y"], {})
    graph = make_graph([node], {"x": shape, "y": shape},
                       {"lo": np.array(-0.3, np.float32), "hi": np.array(0.7, np.float32)}, opset=13)
    check_light(node, graph, ["NHWC", BLOCKED])


@pytest.mark.parametrize("act, params, numpy_act", [
    ("Clip", (-0.3, 0.7), lambda y: np.clip(y, -0.3, 0.7)),
    ("LeakyRelu", (0.2,), lambda y: np.where(y >= 0, y, 0.2 * y)),
    ("HardSigmoid", (0.3, 0.4), lambda y: np.clip(0.3 * y + 0.4, 0, 1))])
def test_fused_activation_of_a_light_node(act, params, numpy_act):
    """A light node carrying a fused activation computes it in every format, at an opset (9) where
    Clip's bounds are attributes."""
    shape = (1, B + 4, 5, 5)
    node = Node("add", "Add", "", ["a", "b"], ["y"], {}, activation=act, activation_params=params)
    graph = make_graph([node], {"a": shape, "b": shape, "y": shape}, opset=9)
    rng = np.random.default_rng(0)
    feeds = {t: rng.standard_normal(shape).astype(np.float32) for t in ("a", "b")}
    want = numpy_act(feeds["a"] + feeds["b"])
    for fmt in ["NCHW"] + layout_ops.light_formats(node, graph):
        np.testing.assert_allclose(run_light(node, graph, fmt, feeds), want, rtol=1e-6, atol=1e-6, err_msg=fmt)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Max", "Min", "Div", "Sum"])
def test_binary_same_shape(shape, op):
    inputs = ["a", "b", "c"] if op == "Sum" else ["a", "b"]
    node = Node("n", op, "", inputs, ["y"], {})
    graph = make_graph([node], {**{t: shape for t in inputs}, "y": shape})
    padded = shape[1] % B != 0
    expect = ["NHWC"] + ([] if (op == "Div" and padded) else [BLOCKED])
    check_light(node, graph, expect)


@pytest.mark.parametrize("cshape", [(None, "C", 1, 1), ("C", 1, 1), (), (1,), (None, 1, "H", "W"), (None, "C", "H", "W")])
@pytest.mark.parametrize("op", ["Add", "Mul", "Div", "Sub"])
def test_binary_constant_broadcast(cshape, op):
    shape = (2, B + 4, 5, 6)
    rng = np.random.default_rng(1)
    dims = {"C": shape[1], "H": shape[2], "W": shape[3], None: 1}
    value = (rng.standard_normal(tuple(dims[d] if not isinstance(d, int) else d for d in cshape)) + 3).astype(np.float32)
    node = Node("n", op, "", ["x", "k"] if op != "Sub" else ["k", "x"], ["y"], {})
    graph = make_graph([node], {"x": shape, "y": shape}, {"k": value})
    expect = ["NHWC"] + ([] if op == "Div" else [BLOCKED])
    check_light(node, graph, expect)


def test_binary_runtime_broadcast_squeeze_excite():
    x, s = (2, 2 * B, 5, 5), (2, 2 * B, 1, 1)
    node = Node("se", "Mul", "", ["x", "s"], ["y"], {})
    graph = make_graph([node], {"x": x, "s": s, "y": x})
    check_light(node, graph, ["NHWC", BLOCKED])
    # a one-channel runtime operand broadcasts in NHWC but not across the lanes of a block
    node = Node("att", "Mul", "", ["x", "m"], ["y"], {})
    graph = make_graph([node], {"x": x, "m": (2, 1, 5, 5), "y": x})
    check_light(node, graph, ["NHWC"])


@pytest.mark.parametrize("op, attrs, shape", [
    ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}, (2, B, 11, 11)),
    ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2]}, (1, B + 4, 8, 9)),
    ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}, (1, B, 10, 10)),
    ("MaxPool", {"kernel_shape": [3, 3], "dilations": [2, 2]}, (1, B, 10, 10)),
    ("MaxPool", {"kernel_shape": [3, 2], "strides": [1, 2], "pads": [0, 1, 2, 0], "storage_order": 1}, (1, B, 9, 9)),
    ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"}, (1, B, 10, 10)),
    ("AveragePool", {"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1]}, (2, B, 7, 7)),
    ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "count_include_pad": 1},
     (1, B + 4, 9, 9)),
    ("AveragePool", {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}, (1, B, 9, 9)),
    ("AveragePool", {"kernel_shape": [7, 7]}, (1, 2 * B, 7, 7)),
    ("GlobalAveragePool", {}, (2, B + 4, 7, 5)),
    ("GlobalMaxPool", {}, (2, B, 7, 5)),
])
def test_pools(op, attrs, shape):
    node = Node("pool", op, "", ["x"], ["y"], dict(attrs))
    # output shape from onnxruntime itself
    probe = ortutil.make_model([helper.make_node(op, ["x"], ["y"], **attrs)], [ortutil.value_info("x", shape)],
                               [helper.make_empty_tensor_value_info("y")])
    out = ortutil.session(probe, level="disable").run(None, {"x": np.zeros(shape, np.float32)})[0].shape
    graph = make_graph([node], {"x": shape, "y": out})
    check_light(node, graph, [BLOCKED])


def test_maxpool_with_indices_is_nchw_only():
    node = Node("pool", "MaxPool", "", ["x"], ["y", "idx"], {"kernel_shape": [2, 2]})
    graph = make_graph([node], {"x": (1, B, 4, 4), "y": (1, B, 3, 3), "idx": (1, B, 3, 3)})
    assert layout_ops.light_formats(node, graph) == []


@pytest.mark.parametrize("channels, axis", [((B, 2 * B), 1), ((B, B + 4), 1), ((B, B), 2), ((B + 4, B + 4), 3),
                                            ((B, B), -3), ((B, B, 2 * B), 1)])
def test_concat(channels, axis):
    n, h, w = 2, 4, 5
    names = [f"x{i}" for i in range(len(channels))]
    ax = axis % 4
    shapes = {}
    for t, c in zip(names, channels):
        shapes[t] = (n, c, h, w)
    out = list(shapes[names[0]])
    out[ax] = sum(s[ax] for s in shapes.values())
    node = Node("cat", "Concat", "", names, ["y"], {"axis": axis})
    graph = make_graph([node], {**shapes, "y": tuple(out)})
    aligned = ax != 1 or all(c % B == 0 for c in channels)
    check_light(node, graph, ["NHWC"] + ([BLOCKED] if aligned else []))


@pytest.mark.parametrize("op, attrs, shape", [
    ("Softmax", {"axis": 1}, (1, B, 4, 4)), ("LRN", {"size": 3}, (1, B, 4, 4)),
    ("Flatten", {}, (1, B, 4, 4)), ("Relu", {}, (2, B)), ("Transpose", {"perm": [0, 2, 3, 1]}, (1, B, 4, 4))])
def test_nchw_only(op, attrs, shape):
    node = Node("n", op, "", ["x"], ["y"], dict(attrs))
    graph = make_graph([node], {"x": shape, "y": shape})
    assert layout_ops.light_formats(node, graph) == []
    frag = layout_ops.emit_light(node, graph, "NCHW")
    assert [n.op_type for n in frag.nodes] == [op]


def test_emit_nchw_keeps_opset9_clip_and_constants():
    node = Node("clip9", "Clip", "", ["x"], ["y"], {"min": 0.0, "max": 6.0})
    graph = make_graph([node], {"x": (1, 4, 3, 3), "y": (1, 4, 3, 3)}, opset=9)
    frag = layout_ops.emit_light(node, graph, "NCHW")
    assert len(frag.nodes) == 1 and {a.name for a in frag.nodes[0].attribute} == {"min", "max"}
    node = Node("add", "Add", "", ["x", "k"], ["y"], {})
    graph = make_graph([node], {"x": (1, 4, 3, 3), "y": (1, 4, 3, 3)}, {"k": np.ones((4, 1, 1), np.float32)})
    assert set(layout_ops.emit_light(node, graph, "NCHW").initializers) == {"k"}
    assert all(k.startswith("add/") for k in layout_ops.emit_light(node, graph, "NHWC").initializers)


# --------------------------------------------------------------------------------------- reorders

def all_formats():
    return [formats.NCHW, formats.NHWC, BLOCKED]


@pytest.mark.parametrize("c", [3, 4, B, B + 4, 2 * B + 1, 3 * B])
def test_reorder_fragment_all_pairs(c):
    shape = (2, c, 5, 7)
    x = np.random.default_rng(c).standard_normal(shape).astype(np.float32)
    for src, dst in itertools.product(all_formats(), repeat=2):
        run = reorders.reorder_callable(src, dst, shape)
        xs = formats.to_format(x, src)
        y = run(xs)
        expected = formats.reorder(xs, src, dst, c)
        assert y.shape == expected.shape, (src, dst)
        # exact, padding lanes included (ReorderInput and the Concat pad write zeros there)
        np.testing.assert_array_equal(y, expected, err_msg=f"{src}->{dst}")


def test_reorder_foreign_block():
    other = 8 if B != 8 else 16
    shape = (1, 2 * other, 3, 4)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    fmt = formats.blocked(other)
    for src, dst in [(formats.NCHW, fmt), (fmt, formats.NCHW), (formats.NHWC, fmt), (fmt, formats.NHWC)]:
        xs = formats.to_format(x, src)
        np.testing.assert_array_equal(reorders.reorder_callable(src, dst, shape)(xs),
                                      formats.reorder(xs, src, dst, shape[1]))


def test_reorder_fragment_names_are_prefixed():
    frag = reorders.reorder_fragment("a", "b", formats.NCHW, BLOCKED, (1, 3, 4, 4))
    produced = {o for n in frag.nodes for o in n.output}
    assert "b" in produced
    assert all(t == "b" or t.startswith("b/") for t in produced | set(frag.initializers))


def test_conv_chain_through_fragments():
    """nchw_in conv -> blocked conv -> maxpool -> reorder to NCHW, merged into one session."""
    rng = np.random.default_rng(5)
    s1 = conv_spec(1, 3, 16, 16, B + 4, 3, stride=2, act="Relu")
    s2 = conv_spec(1, B + 4, 8, 8, 2 * B, 3, act="Relu")
    c1, _ = kernels.random_inputs(s1, rng)
    c2, _ = kernels.random_inputs(s2, rng)
    x = rng.standard_normal((1, 3, 16, 16)).astype(np.float32)
    ref = kernels.reference_callable(s2, c2)(kernels.reference_callable(s1, c1)(x))

    def rename(frag, mapping, prefix):
        nodes = []
        for n in frag.nodes:
            n2 = onnx.NodeProto()
            n2.CopyFrom(n)
            n2.input[:] = [mapping.get(t, prefix + t) for t in n.input]
            n2.output[:] = [mapping.get(t, prefix + t) for t in n.output]
            nodes.append(n2)
        return nodes, {prefix + k: v for k, v in frag.initializers.items()}

    f1 = registry.get("Conv", "ort_nchwc_nchw_in").build(s1, c1)
    f2 = registry.get("Conv", "ort_nchwc").build(s2, c2)
    n1, i1 = rename(f1, {"in0": "x", "out": "t1"}, "a/")
    n2, i2 = rename(f2, {"in0": "t1", "out": "t2"}, "b/")
    back = reorders.reorder_fragment("t2", "y", BLOCKED, formats.NCHW, s2.output)
    model = ortutil.make_model(n1 + n2 + back.nodes, [ortutil.value_info("x", x.shape)],
                               [ortutil.value_info("y", s2.output)], {**i1, **i2, **back.initializers},
                               nchwc.NCHWC_OPSETS)
    y = ortutil.session(model, level="extended").run(None, {"x": x})[0]
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(2, B, 5, 6), (1, B + 4, 4, 4), (1, 3, 4, 4)])
@pytest.mark.parametrize("opset", [9, 15])
def test_batchnorm(shape, opset):
    rng = np.random.default_rng(2)
    c = shape[1]
    consts = {"s": rng.standard_normal(c).astype(np.float32), "b": rng.standard_normal(c).astype(np.float32),
              "m": rng.standard_normal(c).astype(np.float32), "v": (rng.random(c) + 0.5).astype(np.float32)}
    node = Node("bn", "BatchNormalization", "", ["x", "s", "b", "m", "v"], ["y"], {"epsilon": 1e-3})
    graph = make_graph([node], {"x": shape, "y": shape}, consts, opset=opset)
    check_light(node, graph, ["NHWC", BLOCKED])
