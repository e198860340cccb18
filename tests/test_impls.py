"""Every registered implementation against onnxruntime's plain ONNX semantics.

(a) randomized specs covering strides, pads (asymmetric too), dilations, groups, depthwise with
    multiplier, batches, non-square images, 1x1..7x7 kernels, MatMul broadcasting and Gemm flags:
    every implementation that accepts a spec is compared with kernels.reference_callable, and
    every registered implementation must accept at least one spec (none silently untested);
(b) the PyTorch-converted layer tests shipped in the onnx wheel (real inputs, real weights,
    shipped outputs).
"""
from __future__ import annotations

import glob
import json
import math
import os
import zlib

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from fastrun.ops import formats, kernels, registry
from fastrun.ops.registry import OpSpec, resolve_format

# --------------------------------------------------------------------------------- spec builders


def _attrs(d: dict) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in d.items()))


def conv_spec(n, c, h, w, k, r, s, stride=1, pads=0, dil=1, group=1, bias=True, act=None, act_params=()):
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    dh, dw = (dil, dil) if isinstance(dil, int) else dil
    pads = (pads,) * 4 if isinstance(pads, int) else tuple(pads)
    p = (h + pads[0] + pads[2] - ((r - 1) * dh + 1)) // sh + 1
    q = (w + pads[1] + pads[3] - ((s - 1) * dw + 1)) // sw + 1
    inputs = ((n, c, h, w), (k, c // group, r, s)) + (((k,),) if bias else ())
    return OpSpec("Conv", inputs, (False, True) + ((True,) if bias else ()), (n, k, p, q),
                  attrs=_attrs({"kernel_shape": (r, s), "strides": (sh, sw), "pads": pads,
                                "dilations": (dh, dw), "group": group}),
                  activation=act, activation_params=tuple(act_params))


def matmul_spec(a, b, b_const=True):
    out = np.broadcast_shapes(a[:-2], b[:-2]) + (a[-2], b[-1]) if len(a) > 1 and len(b) > 1 else \
        np.matmul(np.zeros(a), np.zeros(b)).shape
    return OpSpec("MatMul", (tuple(a), tuple(b)), (False, b_const), tuple(out))


def gemm_spec(m, k, n, ta=0, tb=0, alpha=1.0, beta=1.0, c=(), b_const=True, c_const=True):
    a_shape = (k, m) if ta else (m, k)
    b_shape = (n, k) if tb else (k, n)
    inputs = (a_shape, b_shape) + ((tuple(c),) if c is not None and c != () else ())
    const = (False, b_const) + ((c_const,) if len(inputs) > 2 else ())
    return OpSpec("Gemm", inputs, const, (m, n),
                  attrs=_attrs({"alpha": float(alpha), "beta": float(beta), "transA": ta, "transB": tb}))


SPECS = {
    # 3x3 family
    "c3x3_s1_p1": conv_spec(1, 8, 12, 12, 16, 3, 3, pads=1),
    "c3x3_s1_p0_nonsq_b2": conv_spec(2, 6, 9, 14, 5, 3, 3, pads=0),
    "c3x3_s1_asym_pad_relu": conv_spec(1, 7, 10, 13, 9, 3, 3, pads=(0, 1, 2, 1), act="Relu"),
    "c3x3_s1_odd_tiles_clip": conv_spec(2, 5, 11, 7, 6, 3, 3, pads=(1, 0, 1, 2), act="Clip", act_params=(-0.5, 0.5)),
    "c3x3_s1_p1_nobias_c32": conv_spec(1, 32, 16, 16, 32, 3, 3, pads=1, bias=False),
    "c3x3_s1_p2_big_pad": conv_spec(1, 4, 5, 6, 3, 3, 3, pads=2),
    "c3x3_s1_leaky": conv_spec(1, 4, 8, 8, 4, 3, 3, pads=1, act="LeakyRelu", act_params=(0.1,)),
    "c3x3_s2_p1": conv_spec(1, 8, 15, 12, 8, 3, 3, stride=2, pads=1),
    "c3x3_s2x1_asym": conv_spec(2, 4, 10, 9, 6, 3, 3, stride=(2, 1), pads=(1, 0, 0, 1)),
    "c3x3_dil2_p2": conv_spec(1, 6, 13, 11, 7, 3, 3, pads=2, dil=2),
    "c3x3_dil2x1": conv_spec(1, 3, 12, 12, 4, 3, 3, pads=(2, 1, 2, 1), dil=(2, 1)),
    "c3x2_nonsq_kernel": conv_spec(2, 3, 7, 5, 4, 3, 2),
    # groups
    "c3x3_g2": conv_spec(1, 8, 10, 10, 12, 3, 3, pads=1, group=2),
    "c3x3_g4_s2": conv_spec(2, 8, 9, 11, 8, 3, 3, stride=2, pads=1, group=4),
    "dw3x3_s1_p1": conv_spec(1, 16, 14, 14, 16, 3, 3, pads=1, group=16, act="Relu"),
    "dw3x3_s2_b2": conv_spec(2, 8, 13, 10, 8, 3, 3, stride=2, pads=(1, 1, 0, 0), group=8),
    "dw3x3_mult2": conv_spec(1, 4, 8, 8, 8, 3, 3, group=4),
    "dw5x5_dil2": conv_spec(1, 6, 16, 16, 6, 5, 5, pads=4, dil=2, group=6),
    "dw7x7_s1_p3": conv_spec(1, 6, 12, 12, 6, 7, 7, pads=3, group=6),
    # 1x1
    "c1x1_s1": conv_spec(1, 16, 7, 9, 24, 1, 1),
    "c1x1_s1_b2_relu": conv_spec(2, 12, 6, 6, 8, 1, 1, act="Relu"),
    "c1x1_s2": conv_spec(1, 16, 9, 8, 12, 1, 1, stride=2),
    "c1x1_s2x1_b2": conv_spec(2, 8, 7, 6, 4, 1, 1, stride=(2, 1), bias=False),
    "c1x1_g3": conv_spec(1, 12, 6, 5, 9, 1, 1, group=3),
    "c1x1_g2_s2": conv_spec(2, 8, 6, 6, 4, 1, 1, stride=2, group=2),
    "c1x1_pad1": conv_spec(1, 4, 5, 5, 6, 1, 1, pads=1),
    # large kernels
    "c5x5_s1_p2": conv_spec(1, 6, 16, 16, 8, 5, 5, pads=2),
    "c5x5_s1_asym_b2": conv_spec(2, 3, 12, 15, 4, 5, 5, pads=(2, 1, 0, 3)),
    "c7x7_s2_p3_stem": conv_spec(1, 3, 32, 32, 8, 7, 7, stride=2, pads=3, act="Relu"),
    "c7x7_s1_p3": conv_spec(1, 4, 13, 17, 5, 7, 7, pads=3),
    "c1x7_s1": conv_spec(1, 4, 9, 13, 4, 1, 7, pads=(0, 3, 0, 3)),
    # MatMul
    "mm_2d_const": matmul_spec((7, 12), (12, 5)),
    "mm_2d_runtime": matmul_spec((7, 12), (12, 5), b_const=False),
    "mm_batched_const": matmul_spec((2, 3, 7, 12), (12, 5)),
    "mm_batched_bcast": matmul_spec((2, 1, 7, 12), (3, 12, 5), b_const=False),
    "mm_batched_const3d": matmul_spec((4, 6, 8), (4, 8, 3)),
    "mm_vec_lhs": matmul_spec((12,), (12, 5)),
    # Gemm
    "gemm_plain_bias_row": gemm_spec(6, 10, 8, c=(8,)),
    "gemm_transB_linear": gemm_spec(4, 10, 8, tb=1, c=(8,)),
    "gemm_transA_alpha_beta_full_c": gemm_spec(5, 7, 6, ta=1, alpha=0.5, beta=2.0, c=(5, 6)),
    "gemm_both_trans_col_bias": gemm_spec(5, 7, 6, ta=1, tb=1, alpha=1.5, beta=-0.5, c=(5, 1)),
    "gemm_scalar_bias": gemm_spec(3, 4, 5, c=(1,)),
    "gemm_no_bias_alpha": gemm_spec(3, 4, 5, alpha=2.0, c=None),
    "gemm_runtime_b": gemm_spec(4, 6, 3, tb=1, c=(3,), b_const=False),
    "gemm_runtime_c": gemm_spec(4, 6, 3, beta=0.5, c=(4, 3), c_const=False),
    "gemm_beta0": gemm_spec(4, 6, 3, beta=0.0, c=(3,)),
}

# Allowed error relative to max|reference|, per unit sqrt(reduction length). Winograd's
# transforms amplify fp32 rounding by their coefficients' range; F(6,3) most.
BASE_TOL = 3e-6
# by name prefix: every Winograd F(4,3) / F(6,3) variant shares its transforms' precision
TOL_FACTOR = {"winograd_f4": 10.0, "winograd_f6": 100.0, "winograd_onnx_f4": 10.0, "fft_conv": 5.0}


def reduction_length(spec: OpSpec) -> int:
    if spec.op_type == "Conv":
        return int(np.prod(spec.inputs[1][1:]))
    if spec.op_type == "MatMul":
        return spec.inputs[0][-1]
    return spec.inputs[0][0 if spec.attr("transA") else 1]


def _seed(name: str) -> int:
    return zlib.crc32(name.encode())


def _accepts(impl, spec) -> bool:
    try:
        return impl.accepts(spec)
    except Exception:  # format resolution may need modules other engineers are still writing
        return False


def run_impl(impl, spec: OpSpec, consts: dict, runtime: list) -> np.ndarray:
    """Build and run ``impl`` with logical-NCHW inputs, returning a logical-NCHW output."""
    fmt_in, fmt_out = resolve_format(impl.in_format), resolve_format(impl.out_format)
    fn = kernels.build_callable(impl, spec, consts)
    args = list(runtime)
    if args:
        args[0] = formats.to_format(args[0], fmt_in)
    y = fn(*args)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32, f"{impl.id} returned {type(y)} {getattr(y, 'dtype', '')}"
    assert y.shape == formats.physical_shape(spec.output, fmt_out), (y.shape, spec.output, fmt_out)
    if len(spec.output) == 4:
        y = formats.from_format(y, fmt_out, spec.output[1])
    return y


def relative_error(y: np.ndarray, ref: np.ndarray) -> float:
    scale = max(float(np.abs(ref).max()), 1e-6)
    return float(np.abs(y.astype(np.float64) - ref).max()) / scale


def tolerance(impl_name: str, spec: OpSpec) -> float:
    factor = next((f for prefix, f in TOL_FACTOR.items() if impl_name.startswith(prefix)), 1.0)
    return BASE_TOL * factor * math.sqrt(reduction_length(spec))


IMPLS = registry.all_implementations()
CASES = [(sname, impl) for sname, spec in SPECS.items() for impl in IMPLS if _accepts(impl, spec)]


def compute_case(spec_name: str, impl) -> tuple[float, float]:
    spec = SPECS[spec_name]
    consts, runtime = kernels.random_inputs(spec, np.random.default_rng(_seed(spec_name)))
    ref = kernels.reference_callable(spec, consts)(*runtime)
    y = run_impl(impl, spec, consts, runtime)
    assert y.shape == ref.shape
    return relative_error(y, ref), tolerance(impl.name, spec)


@pytest.mark.parametrize("spec_name,impl", CASES, ids=[f"{s}-{i.name}" for s, i in CASES])
def test_impl_matches_reference(spec_name, impl):
    err, tol = compute_case(spec_name, impl)
    assert err <= tol, f"{impl.id} on {spec_name}: relative error {err:.2e} > {tol:.2e}"


def test_every_implementation_is_exercised():
    exercised = {impl.id for _, impl in CASES}
    missing = [impl.id for impl in IMPLS if impl.id not in exercised]
    assert not missing, f"implementations no test spec exercises: {missing}"


def test_host_impls_declare_docstrings_and_ranks():
    for impl in IMPLS:
        if not impl.is_onnxruntime_kernel:
            assert impl.description, f"{impl.id} has no docstring"
            assert impl.heuristic_rank > 10, f"{impl.id} would outrank onnxruntime by default"


# ------------------------------------------------------------------------------- Winograd / FFT

WINO_SPECS = [s for s in SPECS if registry.get("Conv", "winograd_f2").accepts(SPECS[s])]


# (CHUNK_BYTES, MIN_TILE_COLUMNS): one channel per input chunk, and product chunks of 1 to 4 rows of
# tiles (some of which end inside an image of the batch); or everything in one chunk.
WINO_CHUNKINGS = [(1, 1), (1, 5), (1, 7), (1, 13), (1 << 30, 128)]


@pytest.mark.parametrize("chunk_bytes,min_columns", WINO_CHUNKINGS, ids=[f"chunk{b}-cols{c}" for b, c in WINO_CHUNKINGS])
@pytest.mark.parametrize("m", [2, 4, 6])
@pytest.mark.parametrize("spec_name", ["c3x3_s1_odd_tiles_clip", "c3x3_s1_p1_nobias_c32", "c3x3_s1_asym_pad_relu"])
@pytest.mark.parametrize("fmt", ["NCHW", "NHWC", "NCHWc4", "NCHWc8"])
def test_winograd_chunking(fmt, spec_name, m, chunk_bytes, min_columns, monkeypatch):
    """Both transform engines (numpy: NCHW; compiled: NHWC and NCHWc), every chunking of the
    transforms and of the product (compiled: chunks of 1 to 13 tiles, some ending inside an
    image, or all tiles at once): one answer."""
    from fastrun.ops.builtin import winograd

    if fmt != formats.NCHW and winograd.compiled is None:
        pytest.skip("numba is not installed")
    if fmt != formats.NCHW and m not in winograd.COMPILED_TILE_SIZES:
        with pytest.raises(ValueError, match="F\\(2x2"):
            winograd.build_winograd(SPECS[spec_name], {1: np.zeros(SPECS[spec_name].inputs[1], np.float32)}, m, fmt=fmt)
        return
    monkeypatch.setattr(winograd, "CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(winograd, "COMPILED_CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(winograd, "MIN_TILE_COLUMNS", min_columns)
    monkeypatch.setattr(winograd, "MIN_CHUNK_TILES", min_columns)
    spec = SPECS[spec_name]
    consts, runtime = kernels.random_inputs(spec, np.random.default_rng(_seed(spec_name)))
    ref = kernels.reference_callable(spec, consts)(*runtime)
    run = winograd.build_winograd(spec, consts, m, fmt=fmt)
    y = formats.from_format(run(formats.to_format(runtime[0], fmt)), fmt, spec.output[1])
    assert relative_error(y, ref) <= tolerance(f"winograd_f{m}", spec)


@pytest.mark.parametrize("chunk_tiles", [1, 7, 64])
@pytest.mark.parametrize("m", [4, 6])
@pytest.mark.parametrize("spec_name", ["c3x3_s1_odd_tiles_clip", "c3x3_s1_p1_nobias_c32", "c3x3_s1_asym_pad_relu"])
@pytest.mark.parametrize("fmt", ["NHWC", "NCHWc4", "NCHWc8"])
def test_fused_winograd_chunking(fmt, spec_name, m, chunk_tiles, monkeypatch):
    """The fused engine (each thread: transform, product, transform back, chunk by chunk): chunks
    of 1, 7 or 64 tiles, split between the threads, some ending inside an image: one answer, and
    BLAS back at its thread count afterwards."""
    from fastrun.system import blas
    from fastrun.ops.builtin import winograd

    if winograd.compiled is None:
        pytest.skip("numba is not installed")
    monkeypatch.setattr(winograd, "FUSED_CHUNK_TILES", chunk_tiles)
    spec = SPECS[spec_name]
    consts, runtime = kernels.random_inputs(spec, np.random.default_rng(_seed(spec_name)))
    ref = kernels.reference_callable(spec, consts)(*runtime)
    run = winograd.build_winograd(spec, consts, m, fmt=fmt, fused=True)
    before = blas.thread_counts()
    y = formats.from_format(run(formats.to_format(runtime[0], fmt)), fmt, spec.output[1])
    assert relative_error(y, ref) <= tolerance(f"winograd_f{m}", spec)
    assert blas.thread_counts() == before


def test_fused_winograd_chunks_are_balanced_between_threads():
    """Every thread gets as many chunks, none over FUSED_CHUNK_TILES, together covering the tiles."""
    from fastrun.ops.builtin import winograd

    for tiles in (1, 7, 100, 196, 257, 3136):
        for parts in (1, 2, 3):
            chunk = winograd.fused_chunk_tiles(tiles, parts)
            chunks = -(-tiles // chunk)
            assert 1 <= chunk <= winograd.FUSED_CHUNK_TILES
            assert chunks % parts == 0 or chunks < parts, (tiles, parts, chunk)
            assert (chunks - 1) * chunk < tiles  # no empty chunk
    assert winograd.fused_chunk_tiles(100, 2) == 50


def test_fused_winograd_is_a_candidate_for_small_filters_only():
    from fastrun.ops.builtin import winograd

    if winograd.compiled is None:
        pytest.skip("numba is not installed")
    small, big = conv_spec(1, 64, 56, 56, 64, 3, 3, pads=1), conv_spec(1, 256, 56, 56, 256, 3, 3, pads=1)
    for name in ("winograd_f4_fused_nhwc", "winograd_f6_fused_nhwc"):
        impl = registry.get("Conv", name)
        assert impl.accepts(small) and not impl.accepts(big)


@pytest.mark.parametrize("m", [4, 6])
def test_written_out_winograd_transforms_match_the_matrices(m):
    """winograd_transforms writes out B^T and A^T of F(4,3) and F(6,3): the same as
    winograd_matrices (which the filter transform uses), for every row."""
    transforms = pytest.importorskip("fastrun.ops.builtin.winograd_transforms")
    from fastrun.ops.builtin.winograd import winograd_matrices

    at, _, bt = winograd_matrices(m)
    bt_pass, at_pass = (transforms._bt4, transforms._at4) if m == 4 else (transforms._bt6, transforms._at6)
    s = np.random.default_rng(m).standard_normal((m + 2, 19)).astype(np.float32)
    for matrix, one_d in ((bt, bt_pass), (at, at_pass)):
        out = np.zeros((matrix.shape[0], s.shape[1]), np.float32)
        one_d(*s, *out, s.shape[1])
        np.testing.assert_allclose(out, matrix @ s, rtol=1e-5, atol=1e-5)


def test_winograd_matrices_exact():
    from fastrun.ops.builtin.winograd import winograd_matrices

    for m in (2, 4, 6):
        at, g, bt = winograd_matrices(m)
        d = np.random.default_rng(m).standard_normal(m + 2)
        w = np.random.default_rng(m + 1).standard_normal(3)
        y = at @ ((g @ w) * (bt @ d))
        assert np.allclose(y, np.correlate(d, w, "valid"), atol=1e-12)


def test_fft_good_size():
    from fastrun.ops.builtin.fft import good_size

    for n in range(1, 300):
        v = good_size(n)
        assert v >= n
        x = v
        for p in (2, 3, 5):
            while x % p == 0:
                x //= p
        assert x == 1
        assert all(not _smooth(u) for u in range(n, v))


def _smooth(u: int) -> bool:
    for p in (2, 3, 5):
        while u % p == 0:
            u //= p
    return u == 1


# ---------------------------------------------------------------- PyTorch-converted layer tests

PT_DIR = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "pytorch-converted")
PT_CASES = sorted(os.path.basename(d) for d in glob.glob(os.path.join(PT_DIR, "test_Conv2d*")) +
                  glob.glob(os.path.join(PT_DIR, "test_Linear*")))


def _normalize(op_type: str, attrs: dict, x_shape, w_shape) -> dict:
    """ONNX defaults filled in, auto_pad resolved (local stand-in for graph.normalize_attrs)."""
    if op_type == "Conv":
        sp = len(x_shape) - 2
        kernel = tuple(attrs.get("kernel_shape") or w_shape[2:])
        strides = tuple(attrs.get("strides") or (1,) * sp)
        dil = tuple(attrs.get("dilations") or (1,) * sp)
        pads = tuple(attrs.get("pads") or (0,) * (2 * sp))
        auto_pad = attrs.get("auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            begins, ends = [], []
            for size, k, s, d in zip(x_shape[2:], kernel, strides, dil):
                total = max(0, (-(-size // s) - 1) * s + (k - 1) * d + 1 - size)
                small, big = total // 2, total - total // 2
                begins.append(small if auto_pad == "SAME_UPPER" else big)
                ends.append(big if auto_pad == "SAME_UPPER" else small)
            pads = tuple(begins + ends)
        elif auto_pad == "VALID":
            pads = (0,) * (2 * sp)
        return {"kernel_shape": kernel, "strides": strides, "pads": pads, "dilations": dil,
                "group": int(attrs.get("group", 1))}
    if op_type == "Gemm":
        return {"alpha": float(attrs.get("alpha", 1.0)), "beta": float(attrs.get("beta", 1.0)),
                "transA": int(attrs.get("transA", 0)), "transB": int(attrs.get("transB", 0))}
    return {}


def _load_layer(case: str):
    """(spec, consts, runtime inputs, expected output) of a one-heavy-node pytorch test model."""
    d = os.path.join(PT_DIR, case)
    x = numpy_helper.to_array(onnx.load_tensor(os.path.join(d, "test_data_set_0", "input_0.pb")))
    expected = numpy_helper.to_array(onnx.load_tensor(os.path.join(d, "test_data_set_0", "output_0.pb")))
    try:  # the graph module (when it handles this model) is the source of truth for specs
        from fastrun.ir import graph as fgraph
        from fastrun.ir import reader

        g = reader.load(os.path.join(d, "model.onnx"))
        heavy = [n for n in g.nodes if n.op_type in ("Conv", "Gemm", "MatMul")]
        if len(g.nodes) == 1 and len(heavy) == 1:
            return fgraph.spec_for_node(heavy[0], g), fgraph.const_inputs(heavy[0], g), [x], expected
    except Exception:
        pass
    model = onnx.load(os.path.join(d, "model.onnx"))
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = list(model.graph.node)
    # fold the constant-only prefix (pytorch's Linear without bias exports Transpose(W) + MatMul)
    while nodes and nodes[0].op_type == "Transpose" and nodes[0].input[0] in values:
        n = nodes.pop(0)
        perm = [a.ints for a in n.attribute if a.name == "perm"]
        values[n.output[0]] = np.transpose(values[n.input[0]], list(perm[0]) if perm else None)
    assert len(nodes) == 1 and nodes[0].op_type in ("Conv", "Gemm", "MatMul"), [n.op_type for n in nodes]
    node = nodes[0]
    names = list(node.input)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    attrs = _normalize(node.op_type, attrs, x.shape, values[names[1]].shape)
    shapes = tuple(tuple(x.shape) if i == 0 else tuple(values[n].shape) for i, n in enumerate(names))
    spec = OpSpec(node.op_type, shapes, tuple(i > 0 for i in range(len(names))), tuple(expected.shape),
                  attrs=_attrs(attrs))
    consts = {i: values[n].astype(np.float32) for i, n in enumerate(names) if i > 0}
    return spec, consts, [x.astype(np.float32)], expected


PT_IMPL_CASES = []
for _case in PT_CASES:
    _spec = _load_layer(_case)[0]
    PT_IMPL_CASES += [(_case, impl) for impl in IMPLS if _accepts(impl, _spec)]


def test_pytorch_layers_found():
    assert len(PT_CASES) >= 10, PT_DIR


@pytest.mark.parametrize("case,impl", PT_IMPL_CASES, ids=[f"{c[5:]}-{i.name}" for c, i in PT_IMPL_CASES])
def test_pytorch_converted_layer(case, impl):
    spec, consts, runtime, expected = _load_layer(case)
    y = run_impl(impl, spec, consts, runtime)
    assert y.shape == expected.shape
    err = relative_error(y, expected)
    assert err <= 10 * tolerance(impl.name, spec), f"{impl.id} on {case}: relative error {err:.2e}"


# ------------------------------------------------------------------ fused residual (Conv + Add)

@pytest.mark.parametrize("act", [None, "Relu"])
@pytest.mark.parametrize("shape", [(1, 32, 14, 14, 64, 1), (2, 16, 9, 7, 24, 3)], ids=["1x1", "3x3"])
def test_residual_sum_implementations(act, shape):
    """Implementations declaring sum_input add input 3 (in the output's format) before the activation."""
    from fastrun.ops import formats, registry
    from fastrun.ops.kernels import build_callable, random_inputs, reference_callable
    from fastrun.ops.registry import OpSpec

    n, c, h, w, k, r = shape
    p = r // 2
    spec = OpSpec("Conv", ((n, c, h, w), (k, c, r, r), (k,), (n, k, h, w)), (False, True, True, False), (n, k, h, w),
                  attrs=(("dilations", (1, 1)), ("group", 1), ("kernel_shape", (r, r)), ("pads", (p, p, p, p)),
                         ("strides", (1, 1))), activation=act)
    consts, args = random_inputs(spec, np.random.default_rng(0))
    ref = reference_callable(spec, consts)(*args)
    impls = registry.candidates(spec)
    assert {i.name for i in impls} >= {"ort", "ort_nchwc"} and all(i.sum_input for i in impls)
    for impl in impls:
        fmts = impl.input_formats(spec)
        out = build_callable(impl, spec, consts)(*[formats.to_format(a, f) for a, f in zip(args, fmts)])
        out = formats.from_format(out, registry.resolve_format(impl.out_format), k)
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max(), err_msg=impl.id)


@pytest.mark.parametrize("shape", [(7, 3), (300, 4000), (4000, 300), (1100, 1100)])
def test_tiled_transpose_matches_numpy(shape):
    from fastrun.ops.builtin.common import transposed

    x = np.random.default_rng(0).standard_normal(shape)
    y = transposed(x)
    assert y.flags.c_contiguous and y.dtype == np.float32
    assert np.array_equal(y, x.T.astype(np.float32))


_PIN_PROBE = """
import os, numpy as np
from fastrun.ops.builtin import winograd_transforms as w
x = np.zeros(1, np.float32); v = np.empty((1, 36, 1), np.float32)
with w.LOCK:
    parts = w.threads()  # what each compiled kernel calls first
    w.input_transform(x, (0, 0, 0, 1), 1, 1, 1, 1, 1, 4, 0, 0, 1, 1, 0, v, parts)
    workers = w._worker_thread_ids(w.numba.config.NUMBA_NUM_THREADS)
for tid in sorted(set(int(t) for t in workers)):
    print(tid, sorted(os.sched_getaffinity(tid)))
print("main", sorted(os.sched_getaffinity(0)))
"""


@pytest.mark.parametrize("pin", ["1", "0"])
def test_numba_workers_are_pinned_one_per_core(pin):
    """The compiled kernels pin numba's workers to distinct cores (FASTRUN_PIN_THREADS=0: left
    alone); the calling thread keeps every core."""
    pytest.importorskip("fastrun.ops.builtin.winograd_transforms")
    import subprocess
    import sys

    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cores) < 2:
        pytest.skip("needs two cores")
    env = dict(os.environ, FASTRUN_PIN_THREADS=pin)
    out = subprocess.run([sys.executable, "-c", _PIN_PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    masks = {tid: json.loads(mask) for tid, mask in (line.split(" ", 1) for line in out.stdout.splitlines())}
    assert masks.pop("main") == cores
    workers = masks
    assert len(workers) >= 2
    if pin == "1":
        assert all(len(mask) == 1 for mask in workers.values())
        assert len({mask[0] for mask in workers.values()}) == len(workers)
    else:
        assert all(mask == cores for mask in workers.values())
