"""The HTML report: a pure function of the profile JSON, self-contained, and checked in a real browser.

The browser test opens a report of a real profile in headless Chromium (Debian's ``chromium``
package; ``.ci/run`` installs it), requires no console messages (errors, CSP violations: the page
forbids loading anything), and decodes the screenshot to check the charts were drawn.
"""
import json
import re
import shutil
import struct
import subprocess
import zlib

import numpy as np
import pytest
from click.testing import CliRunner

from fastrun.workflows import profile as profiling
from fastrun.cli import main
from fastrun.workflows.report import FAILED, FORMAT_COLORS, NEUTRAL, WINNER, render_html


def fake_report() -> dict:
    """A small profile result, as ``ProfileReport.to_json()`` gives it, with a failed candidate and a reorder."""
    def node(name, op, impl, ms, fin, fout, spec="", cands=None, inputs=(), outputs=()):
        return {"name": name, "op_type": op, "impl": impl, "time_ms": ms, "in_formats": list(fin), "out_format": fout,
                "spec": spec, "source": "profiled", "ort_ms": (cands or {}).get("ort@2"), "runner_up": None,
                "runner_up_ms": None, "candidates": cands or {}, "inputs": list(inputs), "outputs": list(outputs)}

    return {
        "model": "/models/<tiny>.onnx", "fingerprint": "0123abcd", "fingerprint_fields": {"cpu": "Test CPU", "cores": 2},
        "input_shapes": {"x": [1, 8, 12, 12]}, "policy": "profiled",
        "nodes": [
            node("conv_a", "Conv", "winograd_f4@1", 0.5, ["NCHW"], "NCHW", "1x8x12x12 -> 16ch k3x3 s1",
                 {"ort@2": 0.8, "winograd_f4@1": 0.5, "fft_conv@1": "failed: wrong result (err 3e-2)"}, ["x"], ["a"]),
            node("relu", "Relu", "onnxruntime", 0.01, ["NCHW"], "NCHW", inputs=["a"], outputs=["r"]),
            node("conv_b", "Conv", "ort_nchwc@2", 0.2, ["NCHWc16"], "NCHWc16", "1x16x12x12 -> 16ch k1x1 s1",
                 {"ort@2": 0.3, "ort_nchwc@2": 0.2}, ["r"], ["b"]),
            node("conv_c", "Conv", "ort_nchwc@2", 0.2, ["NCHWc16"], "NCHWc16", "1x16x12x12 -> 16ch k1x1 s1",
                 {"ort@2": 0.3, "ort_nchwc@2": 0.2}, ["b"], ["y"]),
        ],
        "predicted_ms": 1.0, "measured_ms": 0.9, "onnxruntime_ms": 1.2, "speedup": 1.2 / 0.9, "greedy_ms": 1.1,
        "nchw_only_ms": 1.3, "reorders": 2, "reorder_list": [["r", "NCHW", "NCHWc16"], ["y", "NCHWc16", "NCHW"]],
        "solver": {"method": "milp", "status": "optimal", "gap": 0.0, "seconds": 0.01, "greedy_reorders": 3},
        "failed": [["1x8x12x12 -> 16ch k3x3 s1", "fft_conv@1", "wrong result (err 3e-2)"]],
        "specs_measured": 2, "specs_cached": 0, "profiled_now": 5, "from_cache": 0, "skipped_budget": 0, "seconds": 1.0,
    }


def test_render_html_is_self_contained_and_complete():
    d = fake_report()
    page = render_html(d)
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") >= 4
    assert "&lt;tiny&gt;.onnx" in page and "<tiny>" not in page          # the model name, escaped
    assert "0123abcd" in page and "1.33\u00d7 faster" in page
    for n in d["nodes"]:
        assert n["name"] in page and n["impl"] in page                     # every node and its winner
    assert "wrong result (err 3e-2)" in page and "fft_conv@1" in page      # the failed candidate, with its reason
    assert "reorder r: NCHW \u2192 NCHWc16 (read by conv_b)" in page       # reorders placed on the format strip
    assert "reorder y: NCHWc16 \u2192 NCHW (read by graph output)" in page
    assert "2\u00d7 conv_b, conv_c" in page                               # repeated signature drawn once
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "default-src 'none'" in page                                    # nothing may be loaded


def test_render_html_tolerates_sparse_results():
    """A --no-measure, heuristic or old saved result still renders."""
    d = fake_report()
    for k in ("measured_ms", "onnxruntime_ms", "speedup", "fingerprint_fields", "solver", "reorder_list"):
        d.pop(k)
    for n in d["nodes"]:
        n.pop("inputs"), n.pop("outputs")
        n["candidates"] = {}
    d["nodes"][0]["time_ms"] = None
    page = render_html(d)
    assert "not measured" in page and "winograd_f4@1" in page
    assert "<svg" in render_html({"model": "empty", "nodes": []})


def test_report_command_renders_saved_json(tmp_path):
    src = tmp_path / "r.json"
    src.write_text(json.dumps(fake_report()))
    res = CliRunner().invoke(main, ["report", str(src)])
    assert res.exit_code == 0, res.output
    assert "conv_b" in (tmp_path / "r.html").read_text()
    several = tmp_path / "s.json"                # --json with several --shape sets holds a list
    several.write_text(json.dumps([fake_report(), fake_report()]))
    res = CliRunner().invoke(main, ["report", str(several), "-o", str(tmp_path / "s.html")])
    assert res.exit_code == 0 and (tmp_path / "s.html").exists() and (tmp_path / "s.2.html").exists()
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    res = CliRunner().invoke(main, ["report", str(bad), "-o", str(tmp_path / "x.html")])
    assert res.exit_code == 1 and "not a `fastrun profile --json` file" in res.output


# ---------------------------------------------------------------------------------------- browser

def find_chromium():
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


needs_chromium = pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed (apt-get install "
                                    "chromium); .ci/run installs it so CI runs the browser check")


def screenshot(html_path, png_path, tmp_path, height=2000) -> str:
    """Open a page in headless Chromium, save a screenshot, return what Chromium logged."""
    cmd = [find_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={tmp_path / 'chromium-profile'}", f"--window-size=1280,{height}",
           f"--screenshot={png_path}", "--enable-logging=stderr", "--v=0", html_path.as_uri()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert png_path.exists(), f"chromium wrote no screenshot (exit {res.returncode}):\n{res.stderr[-2000:]}"
    return res.stderr


def console_lines(log: str) -> list[str]:
    """Chromium logs every console message (errors, CSP violations, uncaught exceptions) as CONSOLE lines."""
    return [line for line in log.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def read_png(path) -> np.ndarray:
    """Decode an 8-bit non-interlaced RGB/RGBA PNG (what Chromium writes) into an HxWxC uint8 array."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, [], None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and color in (2, 6) and interlace == 0, header
    bpp = 3 if color == 2 else 4
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(height, width * bpp + 1)
    out = np.zeros((height, width * bpp), np.uint8)
    prev = np.zeros(width * bpp, np.uint8)
    for y in range(height):
        kind, line = raw[y, 0], raw[y, 1:]
        if kind == 0:
            cur = line.copy()
        elif kind == 1:    # Sub: running sum per channel
            cur = np.cumsum(line.reshape(width, bpp), axis=0, dtype=np.uint8).reshape(-1)
        elif kind == 2:    # Up
            cur = line + prev
        else:              # Average, Paeth: sequential along the row
            cur, up, f = bytearray(width * bpp), prev.tolist(), line.tolist()
            for i in range(width * bpp):
                a = cur[i - bpp] if i >= bpp else 0
                if kind == 3:
                    cur[i] = (f[i] + ((a + up[i]) >> 1)) & 255
                else:
                    b, c = up[i], up[i - bpp] if i >= bpp else 0
                    pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                    cur[i] = (f[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
            cur = np.frombuffer(bytes(cur), np.uint8)
        out[y], prev = cur, cur
    return out.reshape(height, width, bpp)[:, :, :3]


def pixels_of(img: np.ndarray, hex_color: str, tol: int = 6) -> np.ndarray:
    rgb = np.array([int(hex_color[i:i + 2], 16) for i in (1, 3, 5)])
    return np.all(np.abs(img.astype(int) - rgb) <= tol, axis=2)


@needs_chromium
def test_report_renders_in_chromium(tmp_path, squeezenet_bytes):
    report = profiling.profile(squeezenet_bytes, cache_dir=str(tmp_path / "cache"), op_limit=0.05, repeats=2)
    data = report.to_json()
    page = tmp_path / "report.html"
    page.write_text(render_html(data), encoding="utf-8")
    png = tmp_path / "report.png"
    log = screenshot(page, png, tmp_path)
    assert not console_lines(log), "console messages while rendering the report:\n" + "\n".join(console_lines(log))

    img = read_png(png)
    assert img.shape[1] == 1280 and img.shape[0] >= 1000
    assert (img.min(axis=2) < 235).mean() > 0.05, "the page is almost blank"
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 200, "too few colours for a page of charts"
    # Chart areas: bars and cells are solid fills of known colours, so count their pixels.
    winners = pixels_of(img, WINNER)       # end-to-end bar, a chosen bar per signature, by-implementation bars
    assert winners.sum() > 5000, winners.sum()
    rows = np.flatnonzero(winners.any(axis=1))
    assert rows.max() - rows.min() > 500, "the chosen bars should span the summary and the per-signature chart"
    assert pixels_of(img, NEUTRAL).sum() > 500                       # where the time goes, by op type
    strip = pixels_of(img, FORMAT_COLORS.get(data["nodes"][0]["out_format"], "#000000"))
    assert strip.sum() > 300                                         # format strip cells
    if data["reorders"]:
        assert pixels_of(img, FAILED, tol=10).sum() > 20             # reorder markers on the strip


@needs_chromium
def test_browser_check_catches_console_errors(tmp_path):
    """The check above is not vacuous: a page that errors or loads from the network is caught."""
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><head><meta http-equiv="Content-Security-Policy" content="default-src '
                    "'none'\"></head><body><img src=\"https://example.com/x.png\"><script>undefinedFn()</script>"
                    "</body></html>")
    log = screenshot(page, tmp_path / "bad.png", tmp_path, height=300)
    assert console_lines(log)


def test_profile_writes_report(tmp_path, tiny_model):
    out = tmp_path / "r.html"
    res = CliRunner().invoke(main, ["profile", tiny_model, "--cache-dir", str(tmp_path / "c"), "--op-limit", "0.05",
                                    "--no-measure", "--report", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    page = out.read_text()
    assert f"wrote {out}" in res.output and "conv1" in page and "conv2" in page and "<svg" in page
