#!/usr/bin/env python
"""Export the small real models of ``tests/fixtures/`` the way users make them: PyTorch, random weights.

Run by developers when a fixture changes, never by the tests (torch is not a dependency of fastrun):

    python -m venv /tmp/torch && /tmp/torch/bin/pip install torch torchvision onnx onnxscript
    /tmp/torch/bin/python scripts/make_fixtures.py             # writes tests/fixtures/*.onnx

Every model is exported with the TorchScript exporter (``dynamo=False``: ``dynamic_axes`` and
``do_constant_folding`` are what most exported models in the wild went through), opset 17, in
eval mode with constant folding off so that BatchNormalization stays a node of the graph. The
BERT-style encoder is also exported with the torch.export-based exporter, torch's default since
2.9 (``bert_encoder_dynamo``: opset 18, IR 10, sequence length 2-128).
Weights are random with a fixed seed; BatchNorm statistics are randomised too (fresh ones are the
identity). The control-flow model is built with ``onnx.helper``: If and Loop bodies that read
tensors of the outer graph, with a MatMul and a Conv inside them.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"


def _torch():
    import torch  # noqa: PLC0415 - torch is only needed to export, never by fastrun or its tests
    return torch


def _randomise_batchnorm(model, seed: int) -> None:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    torch = _torch()
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            with torch.no_grad():
                module.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
                module.weight.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
                module.bias.copy_(torch.randn(n, generator=gen) * 0.1)


def _export(model, args: tuple, path: Path, input_names: list[str], output_names: list[str],
            dynamic_axes: dict | None = None) -> None:
    torch = _torch()
    model.eval()
    torch.onnx.export(model, args, str(path), input_names=input_names, output_names=output_names,
                      dynamic_axes=dynamic_axes, opset_version=OPSET, do_constant_folding=False,
                      training=torch.onnx.TrainingMode.EVAL, dynamo=False)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def _export_dynamo(model, args: tuple, path: Path, input_names: list[str], output_names: list[str],
                   dynamic_axes: dict) -> None:
    """torch.export-based exporter (torch.onnx.export's default since 2.9): opset 18, IR 10, optimized."""
    torch = _torch()
    model.eval()
    dims: dict[str, object] = {}
    shapes = {name: {axis: dims.setdefault(label, torch.export.Dim(label, min=2, max=128) if label == "sequence"
                                           else torch.export.Dim(label, min=1, max=64))
                     for axis, label in dynamic_axes[name].items()} for name in input_names}
    program = torch.onnx.export(model, args, input_names=input_names, output_names=output_names, dynamo=True,
                                opset_version=18, dynamic_shapes=shapes, optimize=True)
    program.save(str(path))
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def bert_encoder():
    """A BERT-style encoder: embeddings, attention with an additive mask, LayerNorm, GELU, pooler."""
    torch = _torch()
    nn = torch.nn

    class Layer(nn.Module):
        def __init__(self, hidden: int, heads: int, ffn: int):
            super().__init__()
            self.heads, self.head_dim = heads, hidden // heads
            self.qkv = nn.Linear(hidden, 3 * hidden)
            self.out = nn.Linear(hidden, hidden)
            self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
            self.ffn = nn.Sequential(nn.Linear(hidden, ffn), nn.GELU(), nn.Linear(ffn, hidden))

        def forward(self, x, mask_bias):
            b, s, h = x.shape
            q, k, v = self.qkv(x).view(b, s, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim) + mask_bias
            context = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).reshape(b, s, h)
            x = self.ln1(x + self.out(context))
            return self.ln2(x + self.ffn(x))

    class Encoder(nn.Module):
        def __init__(self, vocab=1000, hidden=64, heads=4, ffn=256, layers=2, max_len=128):
            super().__init__()
            self.tokens = nn.Embedding(vocab, hidden)
            self.positions = nn.Embedding(max_len, hidden)
            self.ln = nn.LayerNorm(hidden)
            self.layers = nn.ModuleList(Layer(hidden, heads, ffn) for _ in range(layers))
            self.pooler = nn.Linear(hidden, hidden)

        def forward(self, input_ids, attention_mask):
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
            x = self.ln(self.tokens(input_ids) + self.positions(positions))
            mask_bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
            for layer in self.layers:
                x = layer(x, mask_bias)
            return x, torch.tanh(self.pooler(x[:, 0]))

    model = Encoder()
    ids = torch.randint(0, 1000, (2, 16), dtype=torch.int64)
    mask = torch.ones(2, 16, dtype=torch.int64)
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            "last_hidden_state": {0: "batch", 1: "sequence"}, "pooled": {0: "batch"}}
    return model, (ids, mask), ["input_ids", "attention_mask"], ["last_hidden_state", "pooled"], axes


def vit():
    """torchvision's VisionTransformer, small: 32x32 images, 8x8 patches, 2 layers of width 64."""
    torch = _torch()
    from torchvision.models.vision_transformer import VisionTransformer  # noqa: PLC0415
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64,
                              mlp_dim=128, num_classes=10)
    return model, (torch.randn(1, 3, 32, 32),), ["pixel_values"], ["logits"], None


def mobilenet_v3():
    """torchvision's mobilenet_v3_small at width 0.25: depthwise convolutions, BatchNorm, hardswish, SE."""
    torch = _torch()
    from torchvision.models import mobilenet_v3_small  # noqa: PLC0415
    model = mobilenet_v3_small(width_mult=0.25, num_classes=10)
    axes = {"image": {0: "batch"}, "logits": {0: "batch"}}
    return model, (torch.randn(1, 3, 64, 64),), ["image"], ["logits"], axes


def resnet():
    """A narrow ResNet-18 layout (torchvision BasicBlocks, widths 16-128), BatchNorm kept."""
    torch = _torch()
    from torchvision.models.resnet import BasicBlock, ResNet  # noqa: PLC0415

    class NarrowResNet(ResNet):
        def __init__(self):
            super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=10)
            self.inplanes = 16
            self.conv1 = torch.nn.Conv2d(3, 16, 7, 2, 3, bias=False)
            self.bn1 = torch.nn.BatchNorm2d(16)
            self.layer1 = self._make_layer(BasicBlock, 16, 2)
            self.layer2 = self._make_layer(BasicBlock, 32, 2, stride=2)
            self.layer3 = self._make_layer(BasicBlock, 64, 2, stride=2)
            self.layer4 = self._make_layer(BasicBlock, 128, 2, stride=2)
            self.fc = torch.nn.Linear(128, 10)

    model = NarrowResNet()
    axes = {"image": {0: "batch"}, "logits": {0: "batch"}}
    return model, (torch.randn(1, 3, 64, 64),), ["image"], ["logits"], axes


def control_flow() -> onnx.ModelProto:
    """If and Loop whose bodies read outer-scope tensors (a weight, a bias, a Conv kernel, the input).

    x: [batch, 16] float; steps: int64 scalar (trip count); flag: bool scalar.
    Loop: h <- tanh(h @ W + b) for ``steps`` iterations, W and b from the outer graph; scan output
    of each iteration's total. If on ``flag``: a Conv with an outer kernel on ``x`` reshaped as
    an image, or ``x`` scaled by an outer constant.
    """
    rng = np.random.default_rng(7)
    w = numpy_helper.from_array((rng.standard_normal((16, 16)) * 0.3).astype(np.float32), "W")
    b = numpy_helper.from_array((rng.standard_normal(16) * 0.1).astype(np.float32), "b")
    kernel = numpy_helper.from_array((rng.standard_normal((4, 1, 3, 3)) * 0.3).astype(np.float32), "kernel")
    scale = numpy_helper.from_array(np.array(0.5, np.float32), "scale")
    image_shape = numpy_helper.from_array(np.array([-1, 1, 4, 4], np.int64), "image_shape")
    flat_shape = numpy_helper.from_array(np.array([0, -1], np.int64), "flat_shape")
    loop_body = helper.make_graph(
        [helper.make_node("MatMul", ["h_in", "W"], ["hw"]),
         helper.make_node("Add", ["hw", "b"], ["hwb"]),
         helper.make_node("Tanh", ["hwb"], ["h_out"]),
         helper.make_node("ReduceSum", ["h_out"], ["total"], keepdims=0),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "loop_body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["batch", 16]),
         helper.make_tensor_value_info("total", TensorProto.FLOAT, [])])
    then_branch = helper.make_graph(
        [helper.make_node("Reshape", ["x", "image_shape"], ["image"]),
         helper.make_node("Conv", ["image", "kernel"], ["conv"], pads=[1, 1, 1, 1]),
         helper.make_node("Reshape", ["conv", "flat_shape"], ["branch_out"])],
        "then_branch", [], [helper.make_tensor_value_info("branch_out", TensorProto.FLOAT, ["batch", 64])])
    else_branch = helper.make_graph(
        [helper.make_node("Mul", ["x", "scale"], ["scaled"]),
         helper.make_node("Concat", ["scaled", "scaled", "scaled", "scaled"], ["branch_out"], axis=1)],
        "else_branch", [], [helper.make_tensor_value_info("branch_out", TensorProto.FLOAT, ["batch", 64])])
    nodes = [
        helper.make_node("Constant", [], ["true"], value=numpy_helper.from_array(np.array(True))),
        helper.make_node("Loop", ["steps", "true", "x"], ["h_final", "totals"], body=loop_body),
        helper.make_node("If", ["flag"], ["branch"], then_branch=then_branch, else_branch=else_branch),
    ]
    graph = helper.make_graph(
        nodes, "control_flow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16]),
         helper.make_tensor_value_info("steps", TensorProto.INT64, []),
         helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("h_final", TensorProto.FLOAT, ["batch", 16]),
         helper.make_tensor_value_info("totals", TensorProto.FLOAT, ["steps"]),
         helper.make_tensor_value_info("branch", TensorProto.FLOAT, ["batch", 64])],
        [w, b, kernel, scale, image_shape, flat_shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="make_fixtures")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


TORCH_MODELS = {"bert_encoder": bert_encoder, "vit": vit, "mobilenet_v3": mobilenet_v3, "resnet": resnet}
EXTRA = ["bert_encoder_dynamo", "control_flow"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=FIXTURES)
    parser.add_argument("--only", nargs="*", choices=[*TORCH_MODELS, *EXTRA])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    wanted = args.only or [*TORCH_MODELS, *EXTRA]
    if "control_flow" in wanted:
        onnx.save(control_flow(), str(args.out / "control_flow.onnx"))
    for index, name in enumerate(n for n in TORCH_MODELS if n in wanted):
        torch = _torch()
        torch.manual_seed(index)
        model, inputs, input_names, output_names, axes = TORCH_MODELS[name]()
        _randomise_batchnorm(model, seed=index)
        _export(model, inputs, args.out / f"{name}.onnx", input_names, output_names, axes)
    if "bert_encoder_dynamo" in wanted:
        _torch().manual_seed(0)
        model, inputs, input_names, output_names, axes = bert_encoder()
        _export_dynamo(model, inputs, args.out / "bert_encoder_dynamo.onnx", input_names, output_names, axes)
    for path in sorted(args.out.glob("*.onnx")):
        print(f"{path.name:24s} {path.stat().st_size / 1e6:6.2f} MB")


if __name__ == "__main__":
    main()
