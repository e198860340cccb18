"""A self-contained HTML report of one ``fastrun profile`` run (``--report FILE``).

``render_html`` is a pure function of the JSON that ``ProfileReport.to_json()`` returns (or that
``fastrun profile --json`` saved), so a report can be rendered again later from a saved file
(the registry only says which candidates are onnxruntime's kernels).
The page needs no network: charts are inline SVG drawn here, styles are inline, there is no
script, and a Content-Security-Policy forbids loading anything.

Sections: summary (model, fingerprint, fastrun vs onnxruntime, predicted vs measured), where the
time goes (by op type and by implementation), the format of each node's output along the graph
with the reorders marked, every candidate's time per op signature (winner marked, failures
shown), and tables with the details.
"""
from __future__ import annotations

import html
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from fastrun.ops import registry
from fastrun.shapes import shapes_text

WIDTH = 1200          # drawing width of a full-width chart, px (the page is laid out for 1280)
FONT = "system-ui, 'Segoe UI', 'Liberation Sans', 'DejaVu Sans', Arial, sans-serif"
CHAR_W = 6.6          # average glyph width at 11px, for truncating labels

WINNER = "#2f9e44"    # the chosen implementation
ORT = "#f08c00"       # onnxruntime's own kernel (when it is not the winner)
OTHER = "#a5b4c8"     # other candidates
FAILED = "#e03131"    # failed candidates and reorders
NEUTRAL = "#7048e8"   # single-series charts
FORMAT_COLORS = {"NCHW": "#4c6ef5", "NHWC": "#f59f00", "NCHWc8": "#63e6be", "NCHWc16": "#0ca678"}
SPARE_COLORS = ["#ae3ec9", "#f783ac", "#868e96", "#74c0fc", "#d9480f"]


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def fmt_ms(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:.2f}" if v < 100 else f"{v:.1f}"


def _clip(text: str, px: float, char_w: float = CHAR_W) -> str:
    n = max(1, int(px / char_w))
    return text if len(text) <= n else text[: n - 1] + "\u2026"


# ------------------------------------------------------------------------------ bar charts

@dataclass
class Bar:
    label: str
    value: Optional[float]        # ms; None draws a "failed" marker instead of a bar
    color: str = OTHER
    note: str = ""                # after the value label
    tooltip: str = ""
    strong: bool = False          # bold label and value (the winner)
    failed: str = ""              # the reason a candidate failed


def _ticks(lo: float, hi: float, log: bool) -> list[tuple[float, bool]]:
    """(value, major) grid lines for the axis."""
    if log:
        steps = [(m * 10.0 ** e, m == 1) for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
                 for m in (1, 2, 5)]
        return [(v, major) for v, major in steps if lo * 0.999 <= v <= hi * 1.001]
    raw = hi / 6
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return [(i * step, True) for i in range(int(hi / step + 1e-9) + 1)]


def _domain(values: Iterable[float], log: bool) -> tuple[float, float]:
    vals = [v for v in values if v is not None and v > 0] or [1.0]
    if log:   # the 1-2-5 steps around the values
        e_lo, e_hi = math.floor(math.log10(min(vals))), math.floor(math.log10(max(vals)))
        lo = max(m * 10.0 ** e for e in (e_lo - 1, e_lo) for m in (1, 2, 5) if m * 10.0 ** e <= min(vals) * 0.8)
        hi = min(m * 10.0 ** e for e in (e_hi, e_hi + 1) for m in (1, 2, 5) if m * 10.0 ** e >= max(vals) * 0.9999)
        return lo, hi if hi > lo else lo * 2
    top = max(vals)
    ticks = _ticks(0, top, False)
    step = ticks[1][0] - ticks[0][0] if len(ticks) > 1 else top
    return 0.0, ticks[-1][0] if ticks[-1][0] >= top else ticks[-1][0] + step


def _tick_label(v: float) -> str:
    return f"{v:g} ms"


def hbar_chart(groups: Sequence[tuple[str, Sequence[Bar]]], *, log: bool = False, width: int = WIDTH,
               label_w: int = 250, right_w: int = 230, row_h: int = 17, title: str = "") -> str:
    """Horizontal bars on one common ms axis; ``groups`` are (header or "", bars).

    Failed bars are a red cross at the axis start, labelled "failed", with the reason as a tooltip.
    """
    values = [b.value for _, bars in groups for b in bars if b.value is not None]
    lo, hi = _domain(values, log)
    x0, plot_w = label_w, width - label_w - right_w
    axis_h, head_h, gap = 22, 20, 6

    def x(v: float) -> float:
        if log:
            v = min(max(v, lo), hi)
            return x0 + plot_w * (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))
        return x0 + plot_w * min(v, hi) / hi

    body, y = [], axis_h
    for header, bars in groups:
        if header:
            y += gap
            body.append(f'<text x="4" y="{y + 14}" class="gh">{esc(_clip(header, width - 8, 6.9))}'
                        f'<title>{esc(header)}</title></text>')
            y += head_h
        for b in bars:
            cy = y + row_h / 2
            tip = f"<title>{esc(b.tooltip or b.label)}</title>"
            weight = ' font-weight="bold"' if b.strong else ""
            body.append(f'<text x="{x0 - 6}" y="{cy + 4}" text-anchor="end" class="lb"{weight}>'
                        f'{esc(_clip(b.label, label_w - 14))}{tip}</text>')
            if b.value is None and b.failed:
                body.append(f'<g class="failed"><path d="M{x0 + 3},{cy - 4} l8,8 m0,-8 l-8,8" stroke="{FAILED}" '
                            f'stroke-width="2.2"/><text x="{x0 + 17}" y="{cy + 4}" class="fl">'
                            f'{esc(_clip("failed: " + b.failed, plot_w + right_w - 24))}</text>'
                            f'<title>{esc(b.label)} failed: {esc(b.failed)}</title></g>')
            elif b.value is None:
                body.append(f'<text x="{x0 + 4}" y="{cy + 4}" class="val"{weight}>not timed'
                            f'{" " + esc(b.note) if b.note else ""}{tip}</text>')
            else:
                end = max(x(b.value), x0 + 1.5)
                body.append(f'<rect x="{x0}" y="{y + 2.5:.1f}" width="{end - x0:.1f}" height="{row_h - 5}" '
                            f'fill="{b.color}" rx="1.5">{tip}</rect>')
                body.append(f'<text x="{end + 5:.1f}" y="{cy + 4}" class="val"{weight}>{esc(fmt_ms(b.value))} ms'
                            f'{" " + esc(b.note) if b.note else ""}</text>')
            y += row_h
    height = y + 6
    grid = []
    for v, major in _ticks(lo, hi, log):
        gx = x(v)
        grid.append(f'<line x1="{gx:.1f}" y1="{axis_h - 4}" x2="{gx:.1f}" y2="{height - 4}" '
                    f'class="{"gmaj" if major else "gmin"}"/>')
        if major or (log and hi / lo <= 1000):
            grid.append(f'<text x="{gx:.1f}" y="{axis_h - 8}" text-anchor="middle" class="tick">{_tick_label(v)}</text>')
    label = f' aria-label="{esc(title)}"' if title else ""
    return (f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img"{label}>'
            + "".join(grid) + "".join(body) + "</svg>")


# ------------------------------------------------------------------------------ format strip

def format_colors(formats: Iterable[str]) -> dict[str, str]:
    colors, spare = {}, iter(SPARE_COLORS * 4)
    for f in sorted(set(formats), key=lambda f: (f not in FORMAT_COLORS, f)):
        colors[f] = FORMAT_COLORS.get(f) or next(spare)
    return colors


def format_strip(nodes: Sequence[dict], reorders: Sequence[Sequence[str]], width: int = WIDTH) -> str:
    """Nodes in graph order, each a cell coloured by its output format (a left band in its input
    format when the node itself converts); heavy nodes are tall cells. A red mark after a node is
    a reorder of its output (before the first node: of a graph input), with details as tooltip."""
    if not nodes:
        return ""
    colors = format_colors([n["out_format"] for n in nodes] + [f for n in nodes for f in n.get("in_formats") or []]
                           + [f for r in reorders for f in r[1:]])
    producer = {t: i for i, n in enumerate(nodes) for t in n.get("outputs") or []}
    readers = defaultdict(list)
    for n in nodes:
        for t, f in zip(n.get("inputs") or [], n.get("in_formats") or []):
            readers[(t, f)].append(n["name"])
    after = defaultdict(list)   # node index (-1: before the first node) -> reorder descriptions
    unplaced = []
    for t, src, dst in reorders:
        who = readers.get((t, dst)) or ["graph output"]
        text = f"reorder {t}: {src} \u2192 {dst} (read by {', '.join(who)})"
        if t in producer:
            after[producer[t]].append(text)
        elif any(t in (n.get("inputs") or []) for n in nodes):
            after[-1].append(text)
        else:
            unplaced.append(text)

    legend_h, pad = 24, 12
    usable = width - 2 * pad
    cell = max(14.0, min(44.0, usable / len(nodes)))
    per_row = max(1, int(usable // cell))
    label_h = 10 + 5.6 * min(16, max(len(n["name"]) for n in nodes))
    row_h = 34 + label_h
    rows = math.ceil(len(nodes) / per_row)
    height = legend_h + rows * row_h + 8
    out = []
    # legend
    lx = pad
    for f, c in colors.items():
        out.append(f'<rect x="{lx}" y="4" width="14" height="14" fill="{c}" rx="2"/>'
                   f'<text x="{lx + 19}" y="15" class="lb">{esc(f)}</text>')
        lx += 36 + 7.2 * len(f)
    out.append(f'<path d="M{lx + 6},5 l8,0 l-4,7 z" fill="{FAILED}"/><line x1="{lx + 10}" y1="5" x2="{lx + 10}" y2="19" '
               f'stroke="{FAILED}" stroke-width="2"/><text x="{lx + 19}" y="15" class="lb">reorder</text>')
    lx += 90
    out.append(f'<text x="{lx}" y="15" class="lb muted">tall cell: Conv/MatMul/Gemm \u00b7 left band: input format, '
               f'when the node converts \u00b7 hover for details</text>')

    def marker(mx: float, top: float, texts: list[str]) -> str:
        tip = esc("\n".join(texts))
        label = f'<text x="{mx}" y="{top - 9}" text-anchor="middle" class="rc">{len(texts)}</text>' if len(texts) > 1 else ""
        return (f'<g class="reorder"><line x1="{mx}" y1="{top - 4}" x2="{mx}" y2="{top + 30}" stroke="{FAILED}" '
                f'stroke-width="2.5"/><path d="M{mx - 5},{top - 6} l10,0 l-5,7 z" fill="{FAILED}"/>{label}'
                f'<title>{tip}</title></g>')

    markers = []
    for i, n in enumerate(nodes):
        r, c = divmod(i, per_row)
        cx, top = pad + c * cell, legend_h + 14 + r * row_h
        heavy = bool(n.get("spec"))
        h = 28 if heavy else 16
        cy = top + 28 - h
        fin = (n.get("in_formats") or [n["out_format"]])[0]
        tip = esc(f"{n['name']} ({n['op_type']}{': ' + n['spec'] if n.get('spec') else ''})\n"
                  f"{n['impl']}  {'/'.join(n.get('in_formats') or []) or '-'} \u2192 {n['out_format']}"
                  + (f"  {fmt_ms(n['time_ms'])} ms" if n.get("time_ms") is not None else ""))
        out.append(f'<g><rect x="{cx + 1:.1f}" y="{cy}" width="{cell - 2:.1f}" height="{h}" fill="{colors[n["out_format"]]}" rx="2"/>')
        if fin != n["out_format"]:
            out.append(f'<rect x="{cx + 1:.1f}" y="{cy}" width="{(cell - 2) / 3:.1f}" height="{h}" fill="{colors[fin]}" rx="2"/>')
        out.append(f"<title>{tip}</title></g>")
        lx_, ly = cx + cell / 2 + 3, top + 34
        out.append(f'<text transform="translate({lx_:.1f},{ly}) rotate(-90)" text-anchor="end" class="nl">'
                   f'{esc(_clip(n["name"], label_h - 6, 5.6))}</text>')
        if i in after:
            markers.append(marker(round(cx + cell, 1), top, after[i]))
        if i == 0 and -1 in after:
            markers.append(marker(round(cx + 1, 1), top, after[-1]))
    svg = (f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
           f'aria-label="format assignment">' + "".join(out) + "".join(markers) + "</svg>")
    if unplaced:
        svg += '<p class="muted">' + "<br>".join(esc(u) for u in unplaced) + "</p>"
    return svg


# ------------------------------------------------------------------------------ sections

def candidate_groups(nodes: Sequence[dict]) -> list[tuple[str, list[Bar]]]:
    """One group per distinct op signature (nodes sharing it are listed), every candidate a bar."""
    by_sig: dict[tuple, list[dict]] = {}
    for n in nodes:
        if n.get("spec"):
            by_sig.setdefault((n["op_type"], n["spec"]), []).append(n)
    groups = []
    for (op, spec), members in by_sig.items():
        chosen = defaultdict(list)
        for n in members:
            chosen[n["impl"]].append(n["name"])
        names = [n["name"] for n in members]
        who = names[0] if len(names) == 1 else f"{len(names)}\u00d7 {', '.join(names)}"
        first = members[0]
        gain = ""
        if first.get("ort_ms") and first.get("time_ms") and len(chosen) == 1:
            gain = f"  \u00b7  {first['ort_ms'] / first['time_ms']:.2f}\u00d7 vs onnxruntime's kernel"
        header = f"{op} {spec}  \u00b7  {who}{gain}"
        cands = first.get("candidates") or {}
        errors = first.get("errors") or {}
        ok = sorted((v, k) for k, v in cands.items() if isinstance(v, (int, float)))
        bad = [(k, v) for k, v in cands.items() if not isinstance(v, (int, float))]
        bars = []
        for ms, impl in ok:
            win = impl in chosen
            tag = " (onnxruntime)" if registry.is_onnxruntime_kernel(op, impl) else ""
            note = ""
            if win:
                note = "\u25c0 chosen" + (f" for {', '.join(chosen[impl])}" if len(chosen) > 1 else "")
            error = f", error {errors[impl]:.1e}" if impl in errors else ""
            note = f"{note} (error {errors[impl]:.0e})".strip() if impl in errors else note
            bars.append(Bar(label=impl + tag, value=float(ms), color=WINNER if win else ORT if tag else OTHER,
                            note=note, strong=win, tooltip=f"{impl}{tag}: {fmt_ms(ms)} ms on {spec}{error}"))
        for impl, why in bad:
            reason = str(why)
            reason = reason[len("failed: "):] if reason.startswith("failed: ") else reason
            bars.append(Bar(label=impl, value=None, failed=reason))
        for impl in chosen:   # a choice without a timing of its own (heuristic plan, budget ran out)
            if impl not in cands:
                t = next((n.get("time_ms") for n in members if n["impl"] == impl), None)
                bars.append(Bar(label=impl, value=t, color=WINNER, strong=True, note="\u25c0 chosen without profiling"))
        groups.append((header, bars))
    return groups


def time_breakdown(nodes: Sequence[dict]) -> tuple[list[Bar], list[Bar]]:
    """Summed operator time (profiled, standalone) by op type and by chosen implementation."""
    by_op, by_impl = defaultdict(float), defaultdict(float)
    count_op, count_impl = defaultdict(int), defaultdict(int)
    for n in nodes:
        t = n.get("time_ms")
        if t is None:
            continue
        impl = n["impl"] if n.get("spec") else "onnxruntime (light ops)"
        by_op[n["op_type"]] += t
        by_impl[impl] += t
        count_op[n["op_type"]] += 1
        count_impl[impl] += 1
    total = sum(by_op.values()) or 1.0

    def bars(sums, counts, color_of):
        return [Bar(label=f"{k} ({counts[k]})", value=v, color=color_of(k), note=f"{100 * v / total:.0f}%")
                for k, v in sorted(sums.items(), key=lambda kv: -kv[1])]

    return (bars(by_op, count_op, lambda k: NEUTRAL),
            bars(by_impl, count_impl, lambda k: OTHER if "light" in k else NEUTRAL))


def end_to_end(d: dict) -> list[Bar]:
    rows = [("fastrun, measured", d.get("measured_ms"), WINNER, True),
            ("onnxruntime ORT_ENABLE_ALL, measured", d.get("onnxruntime_ms"), ORT, False),
            ("fastrun plan, predicted", d.get("predicted_ms"), "#8ce99a", False),
            ("greedy per-node choice, predicted", d.get("greedy_ms"), OTHER, False),
            ("NCHW only, predicted", d.get("nchw_only_ms"), OTHER, False)]
    return [Bar(label=l, value=v, color=c, strong=s) for l, v, c, s in rows if v is not None]


def _card(title: str, value: str, sub: str = "", cls: str = "") -> str:
    return (f'<div class="card {cls}"><div class="ct">{esc(title)}</div><div class="cv">{esc(value)}</div>'
            f'<div class="cs">{esc(sub)}</div></div>')


def _cards(d: dict) -> str:
    speedup, meas, ort = d.get("speedup"), d.get("measured_ms"), d.get("onnxruntime_ms")
    solver = d.get("solver") or {}
    cards = []
    if speedup:
        verdict = "on par" if abs(speedup - 1) < 0.01 else "faster" if speedup > 1 else "slower"
        split = (f" \u00b7 {d['speedup_selection']:.2f}\u00d7 kernels/formats \u00d7 {d['speedup_threads']:.2f}\u00d7 threads"
                 if d.get("speedup_selection") else "")
        cards.append(_card("vs onnxruntime", f"{speedup:.2f}\u00d7 {verdict}",
                           f"fastrun {fmt_ms(meas)} ms \u00b7 onnxruntime {fmt_ms(ort)} ms{split}",
                           "good" if speedup >= 1 else "bad"))
    else:
        cards.append(_card("vs onnxruntime", "not measured", "profiled with --no-measure"))
    busy = {k: v for k, v in (d.get("load") or {}).items() if v.get("busy")}
    if busy:
        cards.append(_card("measured under load", "machine busy",
                           ", ".join(f"{v['other_cores']:.2f} other cores {k}" for k, v in busy.items()), "bad"))
    pred = d.get("predicted_ms")
    cards.append(_card("predicted vs measured", f"{fmt_ms(pred)} / {fmt_ms(meas)} ms",
                       f"measured is {meas / pred:.2f}\u00d7 the prediction" if pred and meas else "sum of profiled costs"))
    greedy_r = solver.get("greedy_reorders")
    cards.append(_card("reorders", str(d.get("reorders", 0)),
                       f"greedy choice would need {greedy_r}" if greedy_r is not None else ""))
    search = f"{solver.get('seconds', 0) * 1e3:.0f} ms, gap {solver.get('gap', 0) or 0:.1e}" if solver else ""
    verified = solver.get("verified") or {}
    if verified.get("optimal_ms") is not None:   # the optimum was timed end to end against the alternatives
        timed = ", ".join(f"{fmt_ms(verified[k + '_ms'])} ms {k}" for k in ("optimal", "heuristic", "unsplit", "onnxruntime")
                          if verified.get(k + "_ms") is not None)
        kept = verified.get("kept")
        search += (f"; end to end kept {'the whole model on onnxruntime' if kept == 'onnxruntime' else f'the {kept} assignment'}"
                   f" ({timed})")
    cards.append(_card("format search", f"{solver.get('method', '-')} {solver.get('status', '')}".strip(), search))
    cards.append(_card("op signatures", str(d.get("specs_measured", 0) + d.get("specs_cached", 0)),
                       f"{d.get('specs_measured', 0)} profiled now ({d.get('profiled_now', 0)} timings), "
                       f"{d.get('specs_cached', 0)} from cache"
                       + (f", {d['skipped_budget']} skipped (budget)" if d.get("skipped_budget") else "")))
    failed = d.get("failed") or []
    cards.append(_card("failed candidates", str(len(failed)), "checked against onnxruntime, never chosen",
                       "bad" if failed else ""))
    return '<div class="cards">' + "".join(cards) + "</div>"


def _table(head: Sequence[str], rows: Iterable[Sequence[object]], cls: str = "") -> str:
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _node_rows(nodes: Sequence[dict]):
    for n in nodes:
        gain = f"{n['ort_ms'] / n['time_ms']:.2f}\u00d7" if n.get("ort_ms") and n.get("time_ms") else ""
        yield (n["name"], n["op_type"], n.get("spec") or "", n["impl"], fmt_ms(n.get("time_ms")),
               n.get("runner_up") or "", fmt_ms(n.get("runner_up_ms")), gain,
               "/".join(n.get("in_formats") or []) + " \u2192 " + n["out_format"], n.get("source", ""))


CSS = f"""
body {{ margin: 0; background: #f4f5f7; color: #212529; font: 13px/1.45 {FONT}; }}
main {{ max-width: 1240px; margin: 0 auto; padding: 16px 20px 40px; }}
h1 {{ font-size: 22px; margin: 4px 0 2px; }}
h2 {{ font-size: 15px; margin: 0 0 8px; }}
.meta {{ color: #495057; margin-bottom: 12px; }}
.meta code {{ background: #e9ecef; padding: 1px 5px; border-radius: 3px; word-break: break-all; }}
section {{ background: #fff; border: 1px solid #dee2e6; border-radius: 6px; padding: 12px 14px; margin: 12px 0; }}
.cards {{ display: grid; grid-template-columns: repeat(6, 1fr); gap: 10px; }}
.card {{ background: #fff; border: 1px solid #dee2e6; border-radius: 6px; padding: 10px 12px; }}
.card.good {{ border-left: 5px solid {WINNER}; }} .card.bad {{ border-left: 5px solid {FAILED}; }}
.ct {{ color: #6c757d; font-size: 11px; text-transform: uppercase; letter-spacing: .04em; }}
.cv {{ font-size: 18px; font-weight: 600; margin: 2px 0; }}
.cs {{ color: #495057; font-size: 12px; }}
.two {{ display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }}
.two section {{ margin: 0; }}
.muted {{ color: #6c757d; }}
.legend span {{ display: inline-block; margin-right: 14px; }}
.legend i {{ display: inline-block; width: 12px; height: 12px; border-radius: 2px; vertical-align: -1px; margin-right: 5px; }}
svg.chart {{ display: block; max-width: 100%; height: auto; font-family: {FONT}; }}
svg .lb {{ font-size: 11px; fill: #343a40; }} svg .muted {{ fill: #6c757d; }} svg .fl {{ font-size: 11px; fill: {FAILED}; }}
svg .val {{ font-size: 11px; fill: #212529; }}
svg .gh {{ font-size: 12px; font-weight: 600; fill: #1c2d4a; }}
svg .tick {{ font-size: 10px; fill: #868e96; }}
svg .nl {{ font-size: 9.5px; fill: #495057; }}
svg .rc {{ font-size: 10px; font-weight: bold; fill: {FAILED}; }}
svg .gmaj {{ stroke: #dee2e6; stroke-width: 1; }} svg .gmin {{ stroke: #f1f3f5; stroke-width: 1; }}
table {{ border-collapse: collapse; width: 100%; font-size: 12px; }}
th, td {{ text-align: left; padding: 3px 8px; border-bottom: 1px solid #e9ecef; white-space: nowrap; }}
th {{ background: #f8f9fa; }}
details {{ margin: 8px 0; }} summary {{ cursor: pointer; font-weight: 600; }}
"""


def _legend(items: Sequence[tuple[str, str]]) -> str:
    return '<div class="legend">' + "".join(f'<span><i style="background:{c}"></i>{esc(t)}</span>' for t, c in items) + "</div>"


def render_html(d: dict) -> str:
    """The whole report page for one profile result (``ProfileReport.to_json()``)."""
    nodes = d.get("nodes") or []
    model = str(d.get("model", "model"))
    name = os.path.basename(model) or model
    shapes = shapes_text(d.get("input_shapes") or {})
    fields = d.get("fingerprint_fields") or {}
    versions = " \u00b7 ".join(f"{k} {fields[k]}" for k in ("fastrun", "onnxruntime", "numpy") if k in fields)
    machine = " \u00b7 ".join(str(fields[k]) for k in ("cpu", "cores") if k in fields)

    by_op, by_impl = time_breakdown(nodes)
    op_sum = sum(b.value for b in by_op)
    groups = candidate_groups(nodes)
    reorders = d.get("reorder_list") or []
    heavy = [n for n in nodes if n.get("spec")]

    meta = [f"<code>{esc(model)}</code>", f"inputs {esc(shapes or '-')}",
            f"fingerprint <code>{esc(d.get('fingerprint', '-'))}</code>" + (f" ({esc(machine)} cores)" if machine else ""),
            esc(versions), f"plan: {esc(d.get('policy', '-'))}, {len(nodes)} nodes, {len(heavy)} Conv/MatMul/Gemm "
            f"in {len(groups)} signatures"]
    parts = [f"<h1>fastrun profile \u2014 {esc(name)}</h1>",
             '<div class="meta">' + " \u00b7 ".join(m for m in meta if m) + "</div>", _cards(d)]
    e2e = end_to_end(d)
    if e2e:
        parts.append("<section><h2>End to end: measured (lower quartile of round-robin runs) and predicted</h2>"
                     + hbar_chart([("", e2e)], label_w=260, right_w=120, title="end to end") + "</section>")
    parts.append('<div class="two">'
                 f'<section><h2>Where the time goes: by op type</h2>{hbar_chart([("", by_op)], width=590, label_w=170, right_w=110, title="time by op type")}</section>'
                 f'<section><h2>Where the time goes: by implementation</h2>{hbar_chart([("", by_impl)], width=590, label_w=210, right_w=110, title="time by implementation")}</section>'
                 "</div>"
                 f'<p class="muted">Summed standalone operator times ({fmt_ms(op_sum)} ms); reorders and dispatch are not '
                 f'included. The plan\'s predicted total is {fmt_ms(d.get("predicted_ms"))} ms.</p>')
    parts.append(f"<section><h2>Formats along the graph ({len(reorders)} reorder{'' if len(reorders) == 1 else 's'})</h2>"
                 + format_strip(nodes, reorders) + "</section>")
    parts.append("<section><h2>Every candidate per op signature</h2>"
                 + _legend([("chosen", WINNER), ("onnxruntime's kernel", ORT), ("other candidate", OTHER),
                            ("failed (reason on hover)", FAILED)])
                 + '<p class="muted">Standalone time (lower quartile of samples over >= 0.25 s) of each implementation on the signature\'s real shapes, '
                   "log scale. The chosen one is not always the fastest alone: the format search also prices the "
                   "reorders around it.</p>"
                 + (hbar_chart(groups, log=True, title="candidates per signature") if groups else "<p>No Conv/MatMul/Gemm nodes.</p>")
                 + "</section>")
    details = [f"<details><summary>All nodes ({len(nodes)})</summary>"
               + _table(["node", "op", "signature", "chosen", "ms", "runner-up", "ms", "vs ort", "formats", "source"],
                        _node_rows(nodes)) + "</details>"]
    if reorders:
        details.append(f"<details><summary>Reorders ({len(reorders)})</summary>"
                       + _table(["tensor", "from", "to"], reorders) + "</details>")
    failed = d.get("failed") or []
    if failed:
        details.append(f"<details open><summary>Failed candidates ({len(failed)})</summary>"
                       + _table(["signature", "implementation", "reason"], failed) + "</details>")
    if fields:
        details.append("<details><summary>Fingerprint fields</summary>"
                       + _table(["field", "value"], [(k, " ".join(v) if isinstance(v, list) else v)
                                                     for k, v in fields.items()]) + "</details>")
    parts.append("<section><h2>Details</h2>" + "".join(details) + "</section>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>fastrun profile \u2014 {esc(name)}</title><style>{CSS}</style></head>"
            "<body><main>" + "\n".join(parts) + "</main></body></html>\n")
