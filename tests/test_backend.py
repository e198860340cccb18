"""ONNX's backend node suite through :mod:`fastrun.backend`: every case onnxruntime passes must pass.

The promise is onnxruntime's answers on any model onnxruntime runs, so a case onnxruntime itself
fails (``tests/data/onnxruntime_node_failures.txt``, written by ``scripts/node_suite_baseline.py``)
is skipped; with other onnx or onnxruntime versions than the file's, onnxruntime's result is computed
per case instead. The default policy runs a shape without a plan on onnxruntime, so every case must
pass. ``policy="heuristic"`` compiles fastrun's own plan, and what fastrun refuses then runs on
onnxruntime with a warning: the heuristic cases also fail on that warning, so cases fastrun's graph
layer still refuses are listed in ``KNOWN_GAPS`` by cause and run there as strict expected failures:
fixing a cause makes its cases pass, and the test then says to remove them.

The default run covers every case with fastrun's default policy, and every eighth case with
``policy="heuristic"`` and from a model file; ``-m slow`` runs every case in those two ways too.
"""
from __future__ import annotations

import functools
import logging
import tempfile
import unittest
import warnings
from pathlib import Path
from typing import Any

import onnx
import onnx.backend.test
import onnxruntime
import onnxruntime.backend
import pytest

from fastrun.backend import FastrunBackend

BASELINE = Path(__file__).parent / "data" / "onnxruntime_node_failures.txt"
NODE_CASES = "OnnxBackendNodeModelTest"
SUBSET_EVERY = 8

# Cases fastrun's front end leaves to onnxruntime, by cause (names without the "_cpu" suffix): under
# policy="heuristic" they run as a plan of the original model on onnxruntime (they must, and the
# others must not). Each cause is a work item: the specialised graph is where the wins are; fix it,
# then delete its entry. The goal is an empty dict.
KNOWN_GAPS: dict[str, set[str]] = {
    # ir.reader._check_declarations refuses string inputs (no numeric dtype; the executor and feed check assume
    # arrays of numbers)
    'string dtype': {
        'test_equal_string', 'test_equal_string_broadcast', 'test_regex_full_match_basic',
        'test_regex_full_match_email_domain', 'test_string_concat', 'test_string_concat_broadcasting',
        'test_string_concat_empty_string', 'test_string_concat_utf8', 'test_string_concat_zero_dimensional',
        'test_string_split_basic', 'test_string_split_consecutive_delimiters',
        'test_string_split_empty_string_delimiter', 'test_string_split_maxsplit', 'test_string_split_no_delimiter',
        'test_strnormalizer_export_monday_casesensintive_nochangecase',
        'test_strnormalizer_nostopwords_nochangecase',
    },
    # shapes that depend on input values (sizes, scales, steps, depths, Reshape/Expand targets fed as inputs):
    # no specialisation by input shapes is exact; ir.reader._infer_shapes' all-zero probe fails on them
    'shape-valued input (zeros probe)': {
        'test_affine_grid_2d_align_corners', 'test_affine_grid_2d', 'test_affine_grid_3d_align_corners',
        'test_affine_grid_3d', 'test_col2im_5d', 'test_col2im', 'test_col2im_dilations', 'test_col2im_pads',
        'test_col2im_strides', 'test_expand_dim_changed', 'test_expand_dim_unchanged', 'test_melweightmatrix',
        'test_onehot_negative_indices', 'test_onehot_out_of_range_indices', 'test_onehot_with_axis',
        'test_onehot_with_negative_axis', 'test_onehot_without_axis', 'test_range_float_type_positive_delta',
        'test_range_int32_type_negative_delta', 'test_reshape_extended_dims', 'test_reshape_negative_extended_dims',
        'test_reshape_one_dim', 'test_reshape_reduced_dims', 'test_reshape_zero_and_negative_dim',
        'test_reshape_zero_dim', 'test_resize_downsample_scales_cubic_A_n0p5_exclude_outside',
        'test_resize_downsample_scales_cubic_antialias', 'test_resize_downsample_scales_cubic',
        'test_resize_downsample_scales_linear_antialias', 'test_resize_downsample_scales_linear',
        'test_resize_downsample_scales_linear_half_pixel_symmetric', 'test_resize_downsample_scales_nearest',
        'test_resize_downsample_sizes_cubic_antialias', 'test_resize_downsample_sizes_cubic',
        'test_resize_downsample_sizes_linear_antialias', 'test_resize_downsample_sizes_linear_pytorch_half_pixel',
        'test_resize_downsample_sizes_nearest', 'test_resize_downsample_sizes_nearest_not_larger',
        'test_resize_downsample_sizes_nearest_not_smaller', 'test_resize_tf_crop_and_resize_axes_2_3',
        'test_resize_tf_crop_and_resize_axes_3_2', 'test_resize_tf_crop_and_resize',
        'test_resize_tf_crop_and_resize_extrapolation_value',
        'test_resize_upsample_scales_cubic_A_n0p5_exclude_outside',
        'test_resize_upsample_scales_cubic_align_corners', 'test_resize_upsample_scales_cubic_asymmetric',
        'test_resize_upsample_scales_cubic', 'test_resize_upsample_scales_linear_align_corners',
        'test_resize_upsample_scales_linear', 'test_resize_upsample_scales_linear_half_pixel_symmetric',
        'test_resize_upsample_scales_nearest_axes_2_3', 'test_resize_upsample_scales_nearest_axes_3_2',
        'test_resize_upsample_scales_nearest', 'test_resize_upsample_sizes_cubic',
        'test_resize_upsample_sizes_nearest_axes_2_3', 'test_resize_upsample_sizes_nearest_axes_3_2',
        'test_resize_upsample_sizes_nearest_ceil_half_pixel', 'test_resize_upsample_sizes_nearest',
        'test_resize_upsample_sizes_nearest_floor_align_corners', 'test_resize_upsample_sizes_nearest_not_larger',
        'test_resize_upsample_sizes_nearest_not_smaller',
        'test_resize_upsample_sizes_nearest_round_prefer_ceil_asymmetric', 'test_slice', 'test_slice_default_steps',
        'test_slice_end_out_of_bounds', 'test_slice_neg', 'test_slice_neg_steps', 'test_slice_negative_axes',
        'test_slice_start_out_of_bounds', 'test_split_to_sequence_1', 'test_split_to_sequence_2',
        'test_split_variable_parts_1d_opset13', 'test_split_variable_parts_1d_opset18',
        'test_split_variable_parts_2d_opset13', 'test_split_variable_parts_2d_opset18',
        'test_split_variable_parts_default_axis_opset13', 'test_split_variable_parts_default_axis_opset18',
        'test_unsqueeze_three_axes', 'test_unsqueeze_two_axes', 'test_unsqueeze_unsorted_axes',
        'test_upsample_nearest',
    },
    # ir.reader._infer_shapes: onnx shape inference fails, strict or not, on AffineGrid's expanded function
    # (its size is an input: shape-valued too)
    'strict shape inference': {
        'test_affine_grid_2d_align_corners_expanded', 'test_affine_grid_2d_expanded',
        'test_affine_grid_3d_align_corners_expanded', 'test_affine_grid_3d_expanded',
    },
    # ir.reader._check refuses models importing only ai.onnx.ml
    'ml-only model': {
        'test_ai_onnx_ml_array_feature_extractor', 'test_ai_onnx_ml_binarizer',
        'test_ai_onnx_ml_label_encoder_string_int', 'test_ai_onnx_ml_label_encoder_string_int_no_default',
        'test_ai_onnx_ml_label_encoder_tensor_mapping', 'test_ai_onnx_ml_label_encoder_tensor_value_only_mapping',
        'test_ai_onnx_ml_tree_ensemble_set_membership', 'test_ai_onnx_ml_tree_ensemble_single_tree',
    },
    # ir.reader._check_declarations refuses sequence and optional inputs
    'non-tensor input': {
        'test_identity_opt', 'test_identity_sequence', 'test_loop13_seq', 'test_sequence_insert_at_back',
        'test_sequence_insert_at_front', 'test_sequence_map_add_2_sequences',
        'test_sequence_map_add_2_sequences_expanded', 'test_sequence_map_extract_shapes',
        'test_sequence_map_extract_shapes_expanded', 'test_sequence_map_identity_1_sequence',
        'test_sequence_map_identity_1_sequence_expanded', 'test_sequence_map_identity_2_sequences',
        'test_sequence_map_identity_2_sequences_expanded',
    },
    # ir.reader._infer_shapes takes the probe's sequence outputs for arrays
    'sequence output': {
        'test_if_opt', 'test_if_seq', 'test_split_to_sequence_nokeepdims',
    },
    # ir.reader._check refuses default-domain opsets older than ir.reader.MIN_OPSET
    'old opset': {
        'test_not_2d', 'test_not_3d', 'test_not_4d',
    },
}


class _Backend(FastrunBackend):
    """fastrun's backend, preparing from bytes or from a model file; or onnxruntime's, for reference."""

    @classmethod
    def prepare(cls, model: Any, device: str = "CPU", runtime: str = "fastrun", model_dir: str = "",
                **kwargs: Any):
        if runtime == "onnxruntime":
            return onnxruntime.backend.prepare(model, device)
        if model_dir and isinstance(model, onnx.ModelProto):
            path = Path(tempfile.mkdtemp(dir=model_dir)) / "model.onnx"
            onnx.save(model, str(path))
            return super().prepare(str(path), device, **kwargs)
        return super().prepare(model, device, **kwargs)


@functools.lru_cache(maxsize=None)
def _cases() -> type[unittest.TestCase]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the case generators overflow on purpose (casts)
        return onnx.backend.test.BackendTest(_Backend, __name__).test_cases[NODE_CASES]


def _case_names() -> list[str]:
    return sorted(n for n in unittest.TestLoader().getTestCaseNames(_cases()) if n.endswith("_cpu"))


def _run_case(name: str, **kwargs: Any) -> None:
    """Run one node case: prepare its model with ``kwargs`` and compare every output to ONNX's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        getattr(_cases()(name), name)(**kwargs)


@functools.lru_cache(maxsize=1)
def _baseline() -> frozenset[str] | None:
    """onnxruntime's failing cases from the committed file, or None when it was made with other versions."""
    lines = BASELINE.read_text().splitlines()
    versions = {tuple(line[2:].split()[:2]) for line in lines if line.startswith("# onnx")}
    if versions != {("onnx", onnx.__version__), ("onnxruntime", onnxruntime.__version__)}:
        return None
    return frozenset(line for line in lines if line and not line.startswith("#"))


@functools.lru_cache(maxsize=None)
def _onnxruntime_fails(name: str) -> bool:
    failing = _baseline()
    if failing is not None:
        return name in failing
    try:
        _run_case(name, runtime="onnxruntime")
    except Exception:  # unittest.SkipTest included: onnxruntime's backend skips what it cannot load
        return True
    return False


def _gap(name: str) -> str | None:
    short = name[: -len("_cpu")]
    return next((cause for cause, names in KNOWN_GAPS.items() if short in names), None)


def _params(names: list[str]) -> list:
    return [pytest.param(name, id=name) for name in names]


ALL_CASES = _case_names()
SUBSET = ALL_CASES[::SUBSET_EVERY]


def _check(name: str, tmp_path_factory: pytest.TempPathFactory, **kwargs: Any) -> None:
    if _onnxruntime_fails(name):
        pytest.skip("onnxruntime fails this case too")
    cache_dir = str(tmp_path_factory.mktemp("cache"))
    _run_case(name, cache_dir=cache_dir, **kwargs)


LEFT_TO_ONNXRUNTIME = "the original model runs on onnxruntime as is"  # the warning fastrun's session logs


def _check_compiled(name: str, tmp_path_factory: pytest.TempPathFactory, caplog: pytest.LogCaptureFixture) -> None:
    """The case under ``policy="heuristic"``: never refused; fastrun's own plan unless KNOWN_GAPS
    says its front end leaves the case to onnxruntime (then a plan of the original model)."""
    with caplog.at_level(logging.WARNING, logger="fastrun"):
        _check(name, tmp_path_factory, policy="heuristic")
    messages = [r.getMessage() for r in caplog.records]
    refused = [m for m in messages if m.endswith("running it on onnxruntime")]
    assert not refused, refused[0]
    left = [m for m in messages if LEFT_TO_ONNXRUNTIME in m]
    cause = _gap(name)
    if cause:
        assert left, f"fastrun's front end now takes this case: remove it from KNOWN_GAPS[{cause!r}]"
    else:
        assert not left, left[0]


@pytest.mark.parametrize("name", _params(ALL_CASES))
def test_node_case_default_policy(name, tmp_path_factory):
    _check(name, tmp_path_factory)


@pytest.mark.parametrize("name", _params(SUBSET))
def test_node_case_heuristic(name, tmp_path_factory, caplog):
    _check_compiled(name, tmp_path_factory, caplog)


@pytest.mark.parametrize("name", _params(SUBSET))
def test_node_case_from_file(name, tmp_path_factory):
    _check(name, tmp_path_factory, model_dir=str(tmp_path_factory.mktemp("models")))


@pytest.mark.slow
@pytest.mark.parametrize("name", _params(ALL_CASES))
def test_node_case_heuristic_all(name, tmp_path_factory, caplog):
    _check_compiled(name, tmp_path_factory, caplog)


@pytest.mark.slow
@pytest.mark.parametrize("name", _params(ALL_CASES))
def test_node_case_from_file_all(name, tmp_path_factory):
    _check(name, tmp_path_factory, model_dir=str(tmp_path_factory.mktemp("models")))


def test_known_gaps_name_real_cases():
    """A misspelt or vanished name in KNOWN_GAPS would silently mark nothing."""
    known = {name[: -len("_cpu")] for name in ALL_CASES}
    assert not {n for names in KNOWN_GAPS.values() for n in names} - known


def test_baseline_names_real_cases():
    assert _baseline() is None or not _baseline() - set(ALL_CASES)
