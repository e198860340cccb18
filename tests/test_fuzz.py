"""Fuzzing the model loader: 270 mutated versions of a real model (SqueezeNet from the onnx wheel).

Every mutant must either be refused with a clean :class:`ModelError`/:class:`InputError` (one line
for the user, no other exception type) or load and run - through fastrun's own plan and
executor - to the same outputs as onnxruntime running the mutant itself.
"""
from __future__ import annotations

import collections
import random

import onnx
import onnxruntime as ort
from onnx import numpy_helper

from fastrun.workflows import models, verify
from fastrun.runtime import compiler
from fastrun.ir import reader
from fastrun.planning import planner
from fastrun.errors import InputError, ModelError
from fastrun.system.fingerprint import fingerprint

PER_KIND = 15


def base_model(hw: int = 64) -> onnx.ModelProto:
    """The light SqueezeNet (structure only: its weights are ConstantOfShape) at hw x hw input."""
    m = onnx.load(str(models.example_path("squeezenet")))
    for vi in m.graph.input:
        if vi.name == "data_0":
            vi.type.tensor_type.shape.dim[2].dim_value = hw
            vi.type.tensor_type.shape.dim[3].dim_value = hw
    return m


def _data_input(m: onnx.ModelProto, rng: random.Random) -> onnx.ValueInfoProto:
    if rng.random() < 0.3:
        return m.graph.input[rng.randrange(len(m.graph.input))]
    return next(v for v in m.graph.input if v.name == "data_0")


def mutate(data: bytes, m: onnx.ModelProto, rng: random.Random, kind: str) -> bytes:
    if kind == "bitflip":
        b = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        return bytes(b)
    if kind == "truncate":
        return data[: rng.randrange(len(data))]
    if kind == "bytes":
        b = bytearray(data)
        i, n = rng.randrange(len(b)), rng.randint(1, 16)
        b[i:i + n] = bytes(rng.randrange(256) for _ in range(n))
        return bytes(b)
    mm = onnx.ModelProto()
    mm.CopyFrom(m)
    nodes = list(mm.graph.node)
    if kind == "shuffle":
        rng.shuffle(nodes)
    elif kind == "drop":
        del nodes[rng.randrange(len(nodes))]
    elif kind == "dup":
        i = rng.randrange(len(nodes))
        nodes.insert(i, nodes[i])
    elif kind == "rewire":
        n = nodes[rng.randrange(len(nodes))]
        if n.input:
            names = [o for x in nodes for o in x.output] + [vi.name for vi in mm.graph.input]
            n.input[rng.randrange(len(n.input))] = rng.choice(names + ["nope", ""])
    elif kind == "cycle":
        i = rng.randrange(1, len(nodes))
        j = rng.randrange(i, len(nodes))
        if nodes[i - 1].input and nodes[j].output:
            nodes[i - 1].input[0] = nodes[j].output[0]
    elif kind == "attr":
        n = nodes[rng.randrange(len(nodes))]
        if n.attribute:
            a = n.attribute[rng.randrange(len(n.attribute))]
            if a.ints:
                a.ints[rng.randrange(len(a.ints))] = rng.choice([-1, 0, 1, 2, 3, 7, 100, 2 ** 31 - 1])
            elif a.type == onnx.AttributeProto.INT:
                a.i = rng.choice([-1, 0, 2, 3, 1000])
            elif a.type == onnx.AttributeProto.FLOAT:
                a.f = rng.choice([float("nan"), -1.0, 1e30])
    elif kind == "dims":
        vi = _data_input(mm, rng)
        dims = vi.type.tensor_type.shape.dim
        if dims:
            dims[rng.randrange(len(dims))].dim_value = rng.choice([0, 1, 2, 5, 96])
    elif kind == "dtype":
        _data_input(mm, rng).type.tensor_type.elem_type = rng.choice([2, 6, 10, 11, 16, 0, 99])
    elif kind == "init":
        t = mm.graph.initializer[rng.randrange(len(mm.graph.initializer))]
        arr = numpy_helper.to_array(t).copy()
        if arr.size:
            arr.flat[rng.randrange(arr.size)] = rng.choice([-1, 0, 1, 3, 10 ** 6])
        t.CopyFrom(numpy_helper.from_array(arr, t.name))
    elif kind == "convw":
        conv = rng.choice([n for n in nodes if n.op_type == "Conv"])
        shape = [t for t in mm.graph.initializer if t.name == conv.input[1] + "__SHAPE"]
        if shape:
            arr = numpy_helper.to_array(shape[0]).copy()
            arr[rng.randrange(arr.size)] += rng.choice([-1, 1, 2])
            shape[0].CopyFrom(numpy_helper.from_array(arr, shape[0].name))
    elif kind == "inputs":
        keep = [v for v in mm.graph.input if rng.random() < 0.9]
        del mm.graph.input[:]
        mm.graph.input.extend(keep)
    elif kind == "opset":
        mm.opset_import[0].version = rng.choice([1, 5, 6, 7, 8, 30, 1000])
    elif kind == "optype":
        nodes[rng.randrange(len(nodes))].op_type = rng.choice(["Relu", "Conv", "Add", "Frob", "MaxPool", "Identity", "Concat"])
    elif kind == "domain":
        nodes[rng.randrange(len(nodes))].domain = rng.choice(["com.microsoft", "ai.onnx.ml", "x.y", "com.microsoft.nchwc"])
    elif kind == "output":
        mm.graph.output[0].name = rng.choice(["r60", "nope", "data_0", "r64"])
    else:
        raise ValueError(kind)
    del mm.graph.node[:]
    mm.graph.node.extend(nodes)
    return mm.SerializeToString()


KINDS = ("bitflip", "truncate", "bytes", "shuffle", "drop", "dup", "rewire", "cycle", "attr", "dims", "dtype", "init",
         "convw", "inputs", "opset", "optype", "domain", "output")


def check(data: bytes, fp: str) -> tuple[str, str]:
    """("refused", message) or ("ran", "") - anything else raises (or returns "wrong")."""
    try:
        graph = reader.load(data)
    except (ModelError, InputError) as exc:
        message = str(exc)
        assert message and "\n" not in message and "Traceback" not in message
        return "refused", message
    program = compiler.compile_plan(graph, planner.make_plan(graph, fp, None))
    feed = verify.random_feed(graph)
    ours = program.run(feed)
    names = list(program.outputs)
    ref = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(names, feed)
    err = verify.relative_error([ours[n] for n in names], ref)
    return ("ran", "") if err < verify.MODEL_TOLERANCE else ("wrong", f"relative error {err:.1e}")


def test_fuzzed_models_give_clean_errors_or_correct_runs():
    m = base_model()
    data = m.SerializeToString()
    fp = fingerprint()
    rng = random.Random(20261123)
    outcomes: collections.Counter = collections.Counter()
    problems = []
    for i in range(PER_KIND * len(KINDS)):
        kind = KINDS[i % len(KINDS)]
        mutant = mutate(data, m, rng, kind)
        try:
            status, info = check(mutant, fp)
        except Exception as exc:  # noqa: BLE001 - exactly what must not happen
            status, info = "unclean", f"{type(exc).__name__}: {exc}"
        outcomes[status] += 1
        if status not in ("refused", "ran"):
            problems.append((i, kind, status, info[:200]))
    assert sum(outcomes.values()) >= 200
    assert not problems, problems
    assert outcomes["refused"] > 100 and outcomes["ran"] > 20  # both paths really exercised


def test_the_unmutated_model_runs():
    assert check(base_model().SerializeToString(), fingerprint()) == ("ran", "")
