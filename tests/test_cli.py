"""The command line: output, JSON, and one clear line plus a non-zero exit for user errors."""
import json

import pytest
from click.testing import CliRunner

from fastrun.cli import main
from fastrun.ops import registry


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_profile_prints_table_and_writes_json(tmp_path, tiny_model):
    out = tmp_path / "r.json"
    res = run("profile", tiny_model, "--cache-dir", str(tmp_path / "c"), "--op-limit", "0.1", "--repeats", "2",
              "--json", str(out))
    assert res.exit_code == 0, res.output
    assert "winner" in res.output and "speed-up" in res.output
    data = json.loads(out.read_text())
    for key in ("model", "fingerprint", "nodes", "predicted_ms", "measured_ms", "onnxruntime_ms", "reorders",
                "solver", "greedy_ms", "nchw_only_ms"):
        assert key in data
    conv = [n for n in data["nodes"] if n["op_type"] == "Conv"]
    assert len(conv) == 2 and all(n["impl"] and n["time_ms"] > 0 for n in conv)
    # the kernel ceiling: per node the fastest candidate against onnxruntime's fastest kernel, summed
    best = sum(min(v for v in n["candidates"].values() if isinstance(v, float)) for n in conv)
    ort = sum(min(v for k, v in n["candidates"].items() if registry.is_onnxruntime_kernel("Conv", k) and isinstance(v, float))
              for n in conv)
    assert data["kernel_ceiling_ms"] == pytest.approx([best, ort]) and best <= ort
    assert f"sums to {best:.2f} ms, onnxruntime's fastest kernel to {ort:.2f} ms" in res.output
    assert all("in_formats" in n and "out_format" in n for n in data["nodes"])
    again = run("profile", tiny_model, "--cache-dir", str(tmp_path / "c"), "--no-measure")
    assert "0 profiled now, 2 from cache" in again.output
    fresh = run("profile", tiny_model, "--cache-dir", str(tmp_path / "c"), "--no-measure", "--op-limit", "0.05", "--refresh")
    assert "2 profiled now, 0 from cache" in fresh.output  # and verification re-used this run's timings


@pytest.mark.parametrize("onnxruntime_ms,whole", [(5.0, True), (50.0, False)])
def test_profile_says_when_the_plan_is_onnxruntimes_own_session(tmp_path, tiny_model, monkeypatch,
                                                               onnxruntime_ms, whole):
    """A whole-model plan timed against onnxruntime is one session against itself: its ratio is noise."""
    from fastrun.workflows import verify

    monkeypatch.setattr(verify, "_race_blocks", lambda graph, programs, repeats: [
        {"optimal": 10.0, "heuristic": 10.0, "onnxruntime": onnxruntime_ms, "onnxruntime-original": 60.0}]
        * verify.VERIFY_BLOCKS)
    out = tmp_path / "r.json"
    res = run("profile", tiny_model, "--cache-dir", str(tmp_path / "c"), "--op-limit", "0.05", "--repeats", "2",
              "--json", str(out))
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["whole_model"] is whole
    assert ("the difference is the machine's noise" in res.output) is whole


@pytest.mark.parametrize("args,needle", [
    (["profile", "/no/such/model.onnx"], "not found"),
    (["profile"], "no model given"),
    (["profile", "--example", "nonet"], "unknown example"),
    (["profile", "--example", "squeezenet", "--shape", "bad"], "bad shape"),
    (["profile", "--example", "squeezenet", "--shape", "other:1x3"], "unknown input"),
])
def test_user_errors_are_one_line_and_nonzero(args, needle, tmp_path):
    res = CliRunner().invoke(main, args + ["--cache-dir", str(tmp_path)])
    assert res.exit_code == 1
    assert needle in res.output
    assert "Traceback" not in res.output


def test_not_onnx_file(tmp_path):
    bad = tmp_path / "x.onnx"
    bad.write_text("hello")
    res = CliRunner().invoke(main, ["profile", str(bad), "--cache-dir", str(tmp_path)])
    assert res.exit_code == 1 and "not an ONNX model" in res.output


def test_impls_and_fingerprint():
    res = run("impls")
    assert res.exit_code == 0
    for name in ("ort@2", "im2col_gemm", "winograd_f4", "fft_conv", "conv1x1_gemm", "ort_nchwc"):
        assert name in res.output
    data = json.loads(run("impls", "--json").output)
    assert {"Conv", "MatMul", "Gemm"} <= {d["op_type"] for d in data}
    fp = json.loads(run("fingerprint", "--json").output)
    assert fp["fingerprint"] and fp["cores"] >= 1 and "onnxruntime" in fp
