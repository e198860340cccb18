#!/usr/bin/env python
"""Winograd F(m x m, 3 x 3) in standard ONNX ops (fastrun/ops/builtin/winograd_onnx.py) against
onnxruntime's own Conv, per layer and in a whole model, interleaved in one process (medians).

    python scripts/bench_winograd_onnx.py [--repeats 7] [--batch 8,1] [--only vgg,resnet]
        [--variants 4,4g,6,6g,2] [--whole vgg19:8:4:128:64:56] [--skip-layers] [--no-spin]

Layers: the 3x3 convs of VGG-19 (64@224 .. 512@14) and ResNet-50 (64@56 .. 512@7), C -> C, bias
and ReLU, against a one-node Conv+Relu model (onnxruntime fuses it, in NCHWc); default session
options. ``--variants``: F(m), ``g`` = the product gathered over every image's tiles. ``--whole
model:batch:m:min_channels:gather_below[:max_rows]`` replaces every 3x3 stride-1 Conv (+ its
Relu) with at least ``min_channels`` inputs (and at most ``max_rows`` rows) by the fragment
(gathered when an image has fewer tiles than ``gather_below``) in the light model (opset 13) and
times it against the original.

Formulations tried (2-core AVX-512 VM, loaded by other jobs: load average 2-4):
* input transform as a 3-D Conv over [N, 1, C, H, W] (kept: V comes out [N, alpha^2, C, tiles],
  no transpose) vs a 2-D Conv over [N*C, 1, H, W] (V [N, C, alpha^2, tiles] needs a Transpose,
  and onnxruntime runs that Conv in NCHWc with a ReorderOutput): by onnxruntime's profiler
  28.7 vs 20.8 ms at 128@112 b1 and 16.6 vs 12.7 at 256@56 b1; interleaved at b1 the two were
  within the load's noise of each other (0.63-1.42x vs 0.63-1.41x);
* scatter back by DepthToSpace after the output-transform MatMul (kept) vs one 6-D Transpose:
  1.4 vs 9.3 ms at 128@112 b1 (onnxruntime's profiler);
* product per image vs gathered: per image wins with many tiles per image (256@56), gathered
  with few (512@14, 512@7: per image re-reads the 37 MB transformed filter per image);
* F(6,3) lost to F(4,3) on every layer (e.g. 256@56 b8 1.12x vs 1.27x, 512@14 b8 0.98x vs
  1.32x); F(2,3) only came close on the smallest layers.

Measured with --no-spin (load average 2-3; threads that spin on after a run take the cores from
whichever model is timed after it: 256@56 b1 on onnxruntime is 46 ms interleaved, 29 ms alone),
ratio = onnxruntime ms / fragment ms, F4 per image / F4g gathered, rel. error 6e-6 .. 2e-5:
  batch 8 (--repeats 5): VGG 64@224 0.50/0.41, 128@112 0.77/0.66, 256@56 1.28/1.11,
    512@28 1.43/1.49, 512@14 1.00/1.18; ResNet-50 (--repeats 7) 64@56 0.58/0.51,
    128@28 0.96/0.83, 256@14 0.83/0.82, 512@7 0.45/1.11;
  batch 1 (--repeats 7): VGG 64@224 0.62/0.53, 128@112 0.97/0.76, 256@56 1.03/1.20,
    512@28 1.46/1.45, 512@14 1.04/0.89; ResNet-50 64@56 0.55/0.61, 128@28 0.59/0.66,
    256@14 0.16/0.68, 512@7 0.52/1.68 (sub-ms layers: per-op overhead dominates).
Whole VGG-19 b8: 1.26x (1002 vs 798 ms) with the >= 256-channel convs rewritten (11 convs), 1.26x
with >= 128 channels at <= 56 rows (12 convs); rel. error 1.6e-6 / 1.8e-6 on the logits.
With spinning threads (default options) and load average 2 .. 5 the same rewrite ran 1.56x, 1.21x
and 1.15x: contention hurts the fragment's nine ops more than onnxruntime's one Conv.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnx
import onnx.version_converter
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from fastrun.ops.builtin.winograd_onnx import winograd_fragment
from fastrun.ops.registry import OpSpec
from fastrun.workflows.models import example_path, randomized

OPSET = 13  # the light models are converted to it for the whole-model comparison


def _const(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(arr), name)


def conv_spec(x_shape, k: int, pads, activation, bias: bool = True) -> OpSpec:
    n, c, h, w = x_shape
    p, q = h + pads[0] + pads[2] - 2, w + pads[1] + pads[3] - 2
    attrs = (("dilations", (1, 1)), ("group", 1), ("kernel_shape", (3, 3)), ("pads", tuple(pads)), ("strides", (1, 1)))
    inputs = ((n, c, h, w), (k, c, 3, 3)) + (((k,),) if bias else ())
    return OpSpec("Conv", inputs, (False, True, True)[:len(inputs)], (n, k, p, q), attrs=attrs, activation=activation)


def winograd_nodes(spec: OpSpec, consts: dict, m: int, gathered: bool, prefix: str, x: str, y: str):
    """The module's fragment with its names bound to x -> y and the rest prefixed."""
    frag = winograd_fragment(spec, consts, m, gathered)
    name = lambda t: {"in0": x, "out": y}.get(t, f"{prefix}/{t}")  # noqa: E731
    for node in frag.nodes:
        node.input[:] = [name(t) for t in node.input]
        node.output[:] = [name(t) for t in node.output]
    return frag.nodes, {name(k): v for k, v in frag.initializers.items()}


def _model(nodes, inits, x_shape, y_shape) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(y_shape))],
                              [_const(k, v) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def conv_model(x_shape, w, b, relu):
    N, C, H, W = x_shape
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c" if relu else "y"], kernel_shape=[3, 3], pads=[1] * 4)]
    if relu:
        nodes.append(helper.make_node("Relu", ["c"], ["y"]))
    return _model(nodes, {"w": w, "b": b}, x_shape, (N, w.shape[0], H, W))


SPIN = True


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the rewritten model keeps the replaced weights unused
    if not SPIN:  # threads spinning on after a run take the cores from the model timed after it
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def interleaved(sessions: dict, feed: dict, repeats: int) -> dict[str, float]:
    """Median ms per session, timed round-robin so machine noise hits all alike."""
    for s in sessions.values():
        s.run(None, feed)
    times = {k: [] for k in sessions}
    for _ in range(repeats):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feed)
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


VGG = [(64, 224), (128, 112), (256, 56), (512, 28), (512, 14)]
RESNET = [(64, 56), (128, 28), (256, 14), (512, 7)]


def bench_layers(shapes, batch, variants, repeats, rng):
    rows = []
    for c, hw in shapes:
        x_shape = (batch, c, hw, hw)
        w = (rng.standard_normal((c, c, 3, 3)) * np.sqrt(2.0 / (9 * c))).astype(np.float32)
        b = (rng.standard_normal(c) * 0.1).astype(np.float32)
        x = rng.standard_normal(x_shape).astype(np.float32)
        sessions = {"ort": session(conv_model(x_shape, w, b, True))}
        spec = conv_spec(x_shape, c, (1, 1, 1, 1), "Relu")
        for m, gathered in variants:
            nodes, inits = winograd_nodes(spec, {1: w, 2: b}, m, gathered, "wino", "x", "y")
            sessions[f"F{m}" + ("g" if gathered else "")] = session(_model(nodes, inits, x_shape, spec.output))
        ref = sessions["ort"].run(None, {"x": x})[0]
        errs = {k: float(np.abs(s.run(None, {"x": x})[0] - ref).max() / np.abs(ref).max()) for k, s in sessions.items()}
        ms = interleaved(sessions, {"x": x}, repeats)
        for k in sessions:
            if k != "ort":
                rows.append((f"{c}->{c}@{hw}", batch, ms["ort"], k, ms[k], ms["ort"] / ms[k], errs[k]))
                print(f"| {c}->{c}@{hw} | {batch} | {ms['ort']:.2f} | {k} | {ms[k]:.2f} | {ms['ort'] / ms[k]:.2f} "
                      f"| {errs[k]:.1e} |", flush=True)
    return rows


def rewrite(model: onnx.ModelProto, m: int, min_channels: int, gather_below: int,
            max_size: int = 1 << 30) -> tuple[onnx.ModelProto, int]:
    """The model with every 3x3 stride-1 group-1 Conv of >= min_channels inputs and at most
    max_size rows (and its Relu) replaced by the F(m) fragment; per-image GEMMs when an image has
    >= gather_below tiles."""
    model = onnx.shape_inference.infer_shapes(model)
    shapes = {vi.name: tuple(d.dim_value for d in vi.type.tensor_type.shape.dim)
              for vi in list(model.graph.value_info) + list(model.graph.input)}
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    out_nodes, new_inits, dropped, count = [], [], set(), 0
    for node in model.graph.node:
        if id(node) in dropped:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        w = inits.get(node.input[1]) if node.op_type == "Conv" else None
        ok = (w is not None and w.shape[2:] == (3, 3) and list(attrs.get("strides", [1, 1])) == [1, 1]
              and attrs.get("group", 1) == 1 and list(attrs.get("dilations", [1, 1])) == [1, 1]
              and w.shape[1] >= min_channels and shapes[node.input[0]][2] <= max_size)
        if not ok:
            out_nodes.append(node)
            continue
        x_shape = shapes[node.input[0]]
        consts = {1: w} if len(node.input) < 3 else {1: w, 2: inits[node.input[2]]}
        after = consumers.get(node.output[0], [])
        relu = len(after) == 1 and after[0].op_type == "Relu"
        y = after[0].output[0] if relu else node.output[0]
        if relu:
            dropped.add(id(after[0]))
        spec = conv_spec(x_shape, w.shape[0], tuple(attrs["pads"]), "Relu" if relu else None, len(consts) > 1)
        tiles = -(-spec.output[2] // m) * -(-spec.output[3] // m)
        nodes, frag_inits = winograd_nodes(spec, consts, m, tiles < gather_below, f"wino{count}", node.input[0], y)
        out_nodes.extend(nodes)
        new_inits.extend(_const(k, v) for k, v in frag_inits.items())
        count += 1
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    del rewritten.graph.node[:]
    rewritten.graph.node.extend(out_nodes)
    rewritten.graph.initializer.extend(new_inits)
    del rewritten.opset_import[:]
    rewritten.opset_import.extend([helper.make_opsetid("", OPSET)])
    return rewritten, count


def bench_whole(name: str, batch: int, m: int, min_channels: int, gather_below: int, repeats: int,
                max_size: int = 1 << 30) -> None:
    model = randomized(example_path(name), batch=batch, strip_softmax=True)
    model = onnx.version_converter.convert_version(model, OPSET)
    rewritten, count = rewrite(model, m, min_channels, gather_below, max_size)
    feed_name = model.graph.input[0].name
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(1).standard_normal(dims).astype(np.float32)
    sessions = {"ort": session(model), "wino": session(rewritten)}
    ref = sessions["ort"].run(None, {feed_name: x})[0]
    err = float(np.abs(sessions["wino"].run(None, {feed_name: x})[0] - ref).max() / np.abs(ref).max())
    ms = interleaved(sessions, {feed_name: x}, repeats)
    print(f"whole {name} b{batch}: F{m}, {count} convs rewritten (>= {min_channels} channels, gathered below "
          f"{gather_below} tiles per image, <= {max_size} rows): ort {ms['ort']:.1f} ms, fragments {ms['wino']:.1f} ms, "
          f"ratio {ms['ort'] / ms['wino']:.2f}, rel. err {err:.1e}", flush=True)


def cpu_flags() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                keep = ("avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
                return " ".join(fl for fl in line.split(":")[1].split() if fl in keep)
    return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", default="8,1")
    ap.add_argument("--only", default="vgg,resnet")
    ap.add_argument("--variants", default="4,4g", help="F(m) variants; g: gathered")
    ap.add_argument("--whole", default="",
                    help="e.g. vgg19:8:4:128:64:56 (model:batch:m:min_channels:gather_below[:max_rows])")
    ap.add_argument("--skip-layers", action="store_true")
    ap.add_argument("--no-spin", action="store_true", help="sessions' threads sleep instead of spinning")
    args = ap.parse_args()
    global SPIN
    SPIN = not args.no_spin
    print("CPU flags:", cpu_flags(), "| onnxruntime", ort.__version__)
    variants = [(int(v.rstrip("g")), v.endswith("g")) for v in args.variants.split(",")]
    rng = np.random.default_rng(0)
    print("| layer | batch | ort ms | fragment | fragment ms | ort/fragment | rel. err |")
    print("|---|---|---|---|---|---|---|")
    for spec in filter(None, args.whole.split(",")):
        name, batch, m, min_c, gather, *size = spec.split(":")
        bench_whole(name, int(batch), int(m), int(min_c), int(gather), args.repeats, *map(int, size))
    for batch in [int(b) for b in args.batch.split(",")] if not args.skip_layers else []:
        if "vgg" in args.only:
            bench_layers(VGG, batch, variants, args.repeats, rng)
        if "resnet" in args.only:
            bench_layers(RESNET, batch, variants, args.repeats, rng)


if __name__ == "__main__":
    main()
