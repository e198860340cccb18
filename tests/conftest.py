import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from fastrun.cli import main
from fastrun.workflows import models


@pytest.fixture
def cache_dir(tmp_path):
    return str(tmp_path / "cache")


@pytest.fixture(autouse=True)
def quiet_machine(monkeypatch):
    """Treat the machine as free of other processes (fastrun.measure.load), in this process and the
    ones it starts: what profiling keeps must not depend on what else the test machine runs.
    tests/test_load.py turns the check back on."""
    monkeypatch.setenv("FASTRUN_BUSY_CORES", "inf")


@pytest.fixture(scope="session")
def squeezenet_bytes():
    """SqueezeNet with random weights and its softmax stripped: small, real, every layer type."""
    return models.randomized(models.example_path("squeezenet"), seed=1, strip_softmax=True).SerializeToString()


def tiny_conv_model(c=8, k=16, hw=12, relu=True, opset=13, batch="N", bn=False) -> onnx.ModelProto:
    """Conv(3x3) [-> BN] [-> Relu] -> Conv(1x1) -> GlobalAveragePool: small enough for fast tests."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((k, c, 3, 3)) * 0.2).astype(np.float32)
    b1 = rng.standard_normal(k).astype(np.float32)
    w2 = (rng.standard_normal((k, k, 1, 1)) * 0.2).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1")]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"), numpy_helper.from_array(w2, "w2")]
    last = "c1"
    if bn:
        for n, v in (("s", 1.5), ("bb", 0.1), ("m", 0.2), ("v", 0.8)):
            inits.append(numpy_helper.from_array(np.full(k, v, np.float32) + rng.uniform(0, 0.1, k).astype(np.float32), n))
        nodes.append(helper.make_node("BatchNormalization", [last, "s", "bb", "m", "v"], ["bn"], name="bn1"))
        last = "bn"
    if relu:
        nodes.append(helper.make_node("Relu", [last], ["r1"], name="relu1"))
        last = "r1"
    nodes.append(helper.make_node("Conv", [last, "w2"], ["c2"], name="conv2"))
    nodes.append(helper.make_node("GlobalAveragePool", ["c2"], ["y"], name="gap"))
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [batch, c, hw, hw])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [batch, k, 1, 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


@pytest.fixture
def tiny_model(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_conv_model(batch=1), str(path))
    return str(path)


@pytest.fixture
def model_n(tmp_path):
    """The tiny model with a symbolic batch: every batch size is its own shape set."""
    return save(tiny_conv_model(), tmp_path / "models" / "tiny.onnx")


def save(model, path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return str(path)


def cli(*args, env=None):
    """The ``fastrun`` command in this process."""
    return CliRunner().invoke(main, [str(a) for a in args], env=env)
