"""The command line: output, JSON, and one clear line plus a non-zero exit for user errors."""
import json
import logging

import click
import pytest
from click.testing import CliRunner

from fastrun.cli import cache as cli_cache
from fastrun.cli import main, options
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

    times = {"optimal": 10.0, "heuristic": 10.0, "onnxruntime": onnxruntime_ms}
    monkeypatch.setattr(verify, "_race_blocks", lambda graph, programs, repeats: [
        {k: times.get(k, 60.0) for k in programs}] * verify.VERIFY_BLOCKS)
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
    (["profile", "--example", "squeezenet", "--engines", "onnxruntime,tensorrt"], "unknown engine 'tensorrt'"),
    (["warmup", "/no/such/dir", "--engines", "tensorrt"], "unknown engine 'tensorrt'"),
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


# ------------------------------------------------------------------------------- conventions

def _commands(group, prefix=()):
    for name, cmd in group.commands.items():
        yield prefix + (name,), cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, prefix + (name,))


def test_every_command_takes_verbosity_after_its_name_and_fails_in_one_line():
    """-v/-q are options of every command (not only of ``fastrun``), and every command runs inside
    the group that turns user errors into one ``error:`` line."""
    for path, cmd in _commands(main):
        assert isinstance(cmd, (options.Command, options.Group)), path
        names = {opt for p in cmd.params for opt in p.opts}
        assert {"-v", "-q"} <= names, path


@pytest.mark.parametrize("args,level", [(["impls", "-vv"], logging.DEBUG), (["-v", "impls"], logging.INFO),
                                        (["impls", "-q"], logging.ERROR), (["-v", "impls", "-q"], logging.WARNING)])
def test_verbosity_counts_before_and_after_the_command(args, level):
    root = logging.getLogger()
    before = root.level
    try:
        assert run(*args).exit_code == 0
        assert root.level == level
    finally:
        root.setLevel(before)


@pytest.mark.parametrize("args,needle", [
    (["report", "{tmp}/bad.json"], "is not a `fastrun profile --json` file"),
    (["warmup", "{tmp}/none.onnx"], "none.onnx"),
    (["cache", "import", "{tmp}/none.json", "--cache-dir", "{tmp}/c"], "none.json"),
    (["fingerprint", "--json", "{tmp}/no/such/dir/fp.json"], "No such file or directory"),
    (["impls", "--json", "{tmp}"], "Is a directory"),
])
def test_user_errors_of_other_commands_are_one_line_too(args, needle, tmp_path):
    (tmp_path / "bad.json").write_text("[1, 2]")
    res = CliRunner().invoke(main, [a.replace("{tmp}", str(tmp_path)) for a in args])
    assert res.exit_code == 1, res.output
    assert res.output.startswith("error: ") or "\nerror: " in res.output, res.output
    assert needle in res.output and "Traceback" not in res.output


def test_json_means_stdout_without_a_file_and_the_file_with_one(tmp_path):
    """``--json`` prints the result alone on stdout; ``--json FILE`` writes FILE (saying so on stderr)."""
    cache = str(tmp_path / "c")
    for args in (["impls"], ["fingerprint"], ["cache", "ls", "--cache-dir", cache]):
        res = run(*args, "--json")
        assert res.exit_code == 0 and json.loads(res.stdout), args
        target = tmp_path / f"{args[0]}.json"
        res = run(*args, "--json", str(target))
        assert res.exit_code == 0 and res.stdout == "" and f"wrote {target}" in res.stderr, args
        assert json.loads(target.read_text()) == json.loads(run(*args, "--json", "-").stdout)


def test_profile_and_show_print_json_alone_on_stdout(tmp_path, tiny_model):
    cache = str(tmp_path / "c")
    res = run("profile", tiny_model, "--cache-dir", cache, "--op-limit", "0.05", "--no-measure", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["nodes"]  # stdout is the JSON alone: no table around it
    plans = json.loads(run("show", tiny_model, "--cache-dir", cache, "--json").stdout)
    assert plans == json.loads(run("cache", "show", tiny_model, "--cache-dir", cache, "--format", "json").stdout)
    assert len(plans) == 1 and plans[0]["nodes"]
    res = run("warmup", tiny_model, "--cache-dir", cache, "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)[0]["measured"] == 0


def _profiled_cache(tmp_path, tiny_model) -> str:
    cache = str(tmp_path / "c")
    assert run("warmup", tiny_model, "--cache-dir", cache, "--op-limit", "0.05").exit_code == 0
    return cache


def _plans(cache: str) -> int:
    return sum(len(f["plans"]) for f in json.loads(run("cache", "ls", "--cache-dir", cache, "--json").stdout)["fingerprints"])


def test_cache_clear_refuses_without_a_terminal_unless_told_yes(tmp_path, tiny_model):
    cache = _profiled_cache(tmp_path, tiny_model)
    res = CliRunner().invoke(main, ["cache", "clear", "--cache-dir", cache], input="y\n")
    assert res.exit_code == 1 and "pass --yes" in res.output and "Traceback" not in res.output
    assert _plans(cache) == 1
    res = run("cache", "clear", "--cache-dir", cache, "--yes")
    assert res.exit_code == 0 and "removed 1 plan(s)" in res.output
    assert _plans(cache) == 0


@pytest.mark.parametrize("answer,kept", [("n\n", 1), ("\n", 1), ("y\n", 0)])
def test_cache_clear_asks_a_person_first(tmp_path, tiny_model, monkeypatch, answer, kept):
    cache = _profiled_cache(tmp_path, tiny_model)
    monkeypatch.setattr(cli_cache, "interactive", lambda: True)
    res = CliRunner().invoke(main, ["cache", "clear", "--cache-dir", cache], input=answer)
    assert res.exit_code == 0 and "delete every plan" in res.output
    assert _plans(cache) == kept


def test_cache_clear_of_one_fingerprint_does_not_ask(tmp_path, tiny_model):
    cache = _profiled_cache(tmp_path, tiny_model)
    fingerprint = json.loads(run("fingerprint", "--json").stdout)["fingerprint"]
    res = CliRunner().invoke(main, ["cache", "clear", "--fingerprint", fingerprint, "--cache-dir", cache])
    assert res.exit_code == 0 and "removed 1 plan(s)" in res.output
