"""Real exported models (``tests/fixtures/``, made by ``scripts/make_fixtures.py``) and the variants
users derive from them with onnxruntime's own tools: static QDQ and QOperator quantization, dynamic
quantization, float16 conversion, external data, onnxruntime's offline optimization.

Derived models take seconds to make: each is made once per process, in a temporary directory that
is removed at exit. ``CASES`` names every model with the feeds to run it on and how its answers are
judged: ``fp32`` and ``fp16`` against a default onnxruntime session, ``quantized`` against the
model's own semantics (:func:`reference_semantics`), since rounding in quantized kernels is allowed
to differ from one runtime to another.
"""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import onnx
import onnxruntime as ort

FIXTURES = Path(__file__).resolve().parent / "fixtures"
VOCAB = 1000  # bert_encoder's vocabulary size


def fixture_path(name: str) -> Path:
    path = FIXTURES / f"{name}.onnx"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run scripts/make_fixtures.py")
    return path


def fixture(name: str) -> onnx.ModelProto:
    return onnx.load(str(fixture_path(name)))


@functools.lru_cache(maxsize=None)
def derived_dir() -> Path:
    """One temporary directory per process for derived models, removed at exit."""
    path = Path(tempfile.mkdtemp(prefix="fastrun-zoo-"))
    atexit.register(shutil.rmtree, path, True)
    return path


# -- feeds

def image_feed(batch: int, size: int = 64, seed: int = 0, name: str = "image") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal((batch, 3, size, size)).astype(np.float32)}


def token_feed(batch: int, sequence: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Token ids in the vocabulary and an attention mask padding the tail of every row but the first."""
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, sequence), np.int64)
    for row in range(1, batch):
        mask[row, max(1, sequence - 2 * row):] = 0
    return {"input_ids": rng.integers(0, VOCAB, (batch, sequence), dtype=np.int64), "attention_mask": mask}


def control_flow_feed(batch: int, steps: int, flag: bool, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((batch, 16)).astype(np.float32), "steps": np.array(steps, np.int64),
            "flag": np.array(flag)}


class _RandomImages:
    """A CalibrationDataReader of a few random images (the fixtures' weights are random too)."""

    def __init__(self, count: int = 8, batch: int = 1):
        self._feeds = iter([image_feed(batch, seed=100 + i) for i in range(count)])

    def get_next(self) -> Optional[dict[str, np.ndarray]]:
        return next(self._feeds, None)


# -- derived variants

@functools.lru_cache(maxsize=None)
def quantized_cnn(quant_format: str = "QDQ", base: str = "resnet") -> Path:
    """``quantize_static`` of a CNN after ``quant_pre_process``, per-channel weights, as ORT's docs do it."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    prepared = derived_dir() / f"{base}_prepared.onnx"
    if not prepared.exists():
        quant_pre_process(str(fixture_path(base)), str(prepared), skip_symbolic_shape=True)
    out = derived_dir() / f"{base}_{quant_format.lower()}.onnx"
    quantize_static(str(prepared), str(out), _RandomImages(), quant_format=QuantFormat[quant_format],
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


@functools.lru_cache(maxsize=None)
def dynamic_quantized(base: str = "bert_encoder") -> Path:
    """``quantize_dynamic`` (int8 weights, activations quantized at run time): MatMulInteger et al."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    out = derived_dir() / f"{base}_dynamic_int8.onnx"
    quantize_dynamic(str(fixture_path(base)), str(out), weight_type=QuantType.QInt8)
    return out


@functools.lru_cache(maxsize=None)
def float16(base: str = "resnet", keep_io_types: bool = False) -> Path:
    """``convert_float_to_float16`` of a CNN whose BatchNormalization nodes are kept."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    model = convert_float_to_float16(fixture(base), keep_io_types=keep_io_types)
    out = derived_dir() / f"{base}_fp16{'_io32' if keep_io_types else ''}.onnx"
    onnx.save(model, str(out))
    return out


@functools.lru_cache(maxsize=None)
def external_data(base: str = "resnet") -> Path:
    """The model with every initializer in one ``weights.bin`` beside it (as large models ship)."""
    folder = derived_dir() / f"{base}_external"
    folder.mkdir(exist_ok=True)
    out = folder / "model.onnx"
    onnx.save_model(fixture(base), str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    return out


@functools.lru_cache(maxsize=None)
def ort_optimized(base: str) -> Path:
    """The model as onnxruntime saves it optimized offline (``optimized_model_filepath``, extended
    level): com.microsoft FusedConv, FusedMatMul, FusedGemm, BiasGelu in place of standard nodes."""
    out = derived_dir() / f"{base}_ort_optimized.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(out)
    ort.InferenceSession(str(fixture_path(base)), options, providers=["CPUExecutionProvider"])
    return out


# -- judging answers

def session(model: Path | str | bytes, level: str = "all") -> ort.InferenceSession:
    """A default onnxruntime session, or with graph optimizations off (``level="none"``)."""
    options = ort.SessionOptions()
    if level == "none":
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def reference_semantics(model: Path | str | bytes, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The model's own semantics: onnxruntime with every graph optimization off, node by node as written.

    Default sessions fuse QDQ pairs into integer kernels whose rounding differs from the unfused
    graph; a runtime's error is judged by its distance from this, not from another runtime's fusions.
    """
    return session(model, level="none").run(None, feed)


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """Max absolute error over max ``|b|`` (``b`` is the reference)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if b.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b))) / max(float(np.max(np.abs(b))), 1e-30)


@dataclass(frozen=True)
class Case:
    """A model to run, the feeds to run it on (several shapes where its axes are dynamic), and how
    its answers are judged: ``fp32``, ``fp16`` or ``quantized``."""
    name: str
    model: Callable[[], Path]
    feeds: Callable[[], list[dict[str, np.ndarray]]]
    kind: str = "fp32"


def _cnn_feeds() -> list[dict[str, np.ndarray]]:
    return [image_feed(1), image_feed(3, seed=1)]


def _fp16_feeds() -> list[dict[str, np.ndarray]]:
    return [{k: v.astype(np.float16) for k, v in f.items()} for f in _cnn_feeds()]


def _bert_feeds() -> list[dict[str, np.ndarray]]:
    return [token_feed(1, 8), token_feed(2, 16, seed=1), token_feed(3, 5, seed=2)]


CASES = {c.name: c for c in [
    Case("bert_encoder", functools.partial(fixture_path, "bert_encoder"), _bert_feeds),
    Case("bert_encoder_dynamo", functools.partial(fixture_path, "bert_encoder_dynamo"), _bert_feeds),
    Case("vit", functools.partial(fixture_path, "vit"), lambda: [image_feed(1, size=32, name="pixel_values")]),
    Case("mobilenet_v3", functools.partial(fixture_path, "mobilenet_v3"), _cnn_feeds),
    Case("resnet", functools.partial(fixture_path, "resnet"), _cnn_feeds),
    Case("control_flow", functools.partial(fixture_path, "control_flow"),
         lambda: [control_flow_feed(2, 3, True), control_flow_feed(5, 1, False, seed=1)]),
    Case("resnet_qdq", functools.partial(quantized_cnn, "QDQ"), _cnn_feeds, "quantized"),
    Case("resnet_qoperator", functools.partial(quantized_cnn, "QOperator"), _cnn_feeds, "quantized"),
    Case("bert_dynamic_int8", dynamic_quantized, _bert_feeds, "quantized"),
    Case("resnet_fp16", functools.partial(float16, "resnet", False), _fp16_feeds, "fp16"),
    Case("resnet_fp16_io32", functools.partial(float16, "resnet", True), _cnn_feeds, "fp16"),
    Case("resnet_external_data", external_data, _cnn_feeds),
    Case("mobilenet_v3_ort_optimized", functools.partial(ort_optimized, "mobilenet_v3"), _cnn_feeds),
    Case("bert_ort_optimized", functools.partial(ort_optimized, "bert_encoder"), _bert_feeds),
]}


def input_shapes(case: Case) -> dict[str, tuple[int, ...]]:
    """The shapes of a case's first feed (what ``fastrun.profile`` is given)."""
    return {k: tuple(v.shape) for k, v in case.feeds()[0].items()}
