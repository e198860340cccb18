"""What the commands print: tables of profile results, warmups and plans, progress lines."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import click

from fastrun.shapes import shapes_text


def ms(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.3f}"


def progress_printer(enabled: bool = True):
    """Progress lines on stderr (rewritten in place on a terminal); none when not ``enabled``."""
    interactive = sys.stderr.isatty()

    def show(message: str) -> None:
        if not enabled:
            return
        if interactive:
            click.echo(f"\r\033[K{message}", err=True, nl=False)
        else:
            click.echo(message, err=True)

    def done() -> None:
        if interactive and enabled:
            click.echo("\r\033[K", err=True, nl=False)

    return show, done


def wrote(path: str) -> None:
    """Say that a file was written (on stderr: stdout may be carrying JSON)."""
    click.echo(f"wrote {path}", err=True)


def emit_json(data: Any, target: str) -> None:
    """``--json [FILE]``: ``data`` to stdout when ``target`` is ``-``, else to the file ``target``."""
    text = json.dumps(data, indent=1)
    if target == "-":
        click.echo(text)
        return
    Path(target).write_text(text + "\n")
    wrote(target)


def write_report(data: dict, path: str) -> None:
    from fastrun.workflows.report import render_html

    Path(path).write_text(render_html(data), encoding="utf-8")
    wrote(path)


def print_profile(d: dict) -> None:
    rows = [n for n in d["nodes"] if n["spec"]]
    click.echo(f"model: {d['model']}   fingerprint: {d['fingerprint']}   shapes: "
               + shapes_cell(d["input_shapes"]) + ("   exact mode" if d.get("exact") else ""))
    header = (f"{'node':<22} {'op':<5} {'signature':<30} {'winner':<18} {'ms':>8} {'error':>7} {'runner-up':<18} {'ms':>8} "
              f"{'vs ort':>7} fmt")
    click.echo(header)
    click.echo("-" * len(header))
    for n in rows:
        gain = f"{n['ort_ms'] / n['time_ms']:.2f}x" if n["ort_ms"] and n["time_ms"] else "-"
        fmt = n["in_formats"][0] if n["in_formats"] else "-"
        fmt = fmt if fmt == n["out_format"] else f"{fmt}>{n['out_format']}"
        winner = n["impl"][:17] + ("*" if n["source"] == "heuristic" else "")
        error = (n.get("errors") or {}).get(n["impl"])
        click.echo(f"{n['name'][-22:]:<22} {n['op_type'][:5]:<5} {n['spec'][:30]:<30} {winner:<18} "
                   f"{ms(n['time_ms']):>8} {'-' if error is None else f'{error:.0e}':>7} "
                   f"{(n['runner_up'] or '-')[:18]:<18} {ms(n['runner_up_ms']):>8} {gain:>7} {fmt}")
    click.echo("")
    click.echo(f"signatures: {d['specs_measured']} profiled now, {d['specs_cached']} from cache "
               f"({d['profiled_now']} candidate timings measured, {d['from_cache']} reused)")
    if d.get("kernel_ceiling_ms"):
        best, ort = d["kernel_ceiling_ms"]
        click.echo(f"kernel ceiling: the fastest candidate of every node sums to {best:.2f} ms, onnxruntime's "
                   f"fastest kernel to {ort:.2f} ms ({ort / best:.2f}x at most from choosing kernels, before "
                   f"reorders and split sessions)")
    if d["skipped_budget"]:
        click.echo(f"budget ran out: {d['skipped_budget']} signatures unprofiled, their nodes (marked *) use the heuristic choice")
    for spec, impl, why in d["failed"]:
        click.echo(f"rejected: {impl} on {spec}: {why}")
    solver = d["solver"]
    verified = (solver or {}).get("verified") or {}
    if verified.get("kept") == "heuristic":
        click.echo(f"end-to-end check: the heuristic assignment ran faster ({verified['heuristic_ms']:.2f} vs "
                   f"{verified['optimal_ms']:.2f} ms for the predicted optimum): kept it")
    elif verified.get("kept") == "unsplit":
        click.echo(f"end-to-end check: the assignment among onnxruntime's kernels alone (no host step splits its "
                   f"session) ran faster ({verified['unsplit_ms']:.2f} vs {verified['optimal_ms']:.2f} ms for the "
                   f"predicted optimum): kept it")
    elif verified.get("kept") == "onnxruntime":
        from fastrun.workflows.verify import VERIFY_BLOCKS, WHOLE_MODEL_MARGIN

        click.echo(f"end-to-end check: no assignment beat the whole model on onnxruntime (ORT_ENABLE_ALL, "
                   f"{verified['onnxruntime_ms']:.2f} ms; the predicted optimum ran {verified['optimal_ms']:.2f} ms) by "
                   f"{WHOLE_MODEL_MARGIN:.0%} in each of {VERIFY_BLOCKS} races: the plan runs it that way")
    threads = (solver or {}).get("threads")
    if threads:
        timed = ", ".join(f"{n}: {ms:.2f} ms" for n, ms in threads["ms"].items())
        click.echo(f"intra-op threads: {threads['chosen']} (measured end to end: {timed})")
        if d.get("segment_threads"):
            click.echo(f"  per segment: {','.join(map(str, d['segment_threads']))} "
                       f"({threads['mixed_ms']:.2f} ms vs {threads['uniform_ms']:.2f} ms all alike)")
        if "host_ms" in threads:
            timed = ", ".join(f"{n}: {ms:.2f} ms" for n, ms in threads["host_ms"].items())
            click.echo(f"host-kernel threads: {threads['host']} (measured end to end: {timed})")
    if solver:
        click.echo(f"format search: {solver['method']} {solver['status']} (gap {solver['gap']:.1e}) in {solver['seconds'] * 1e3:.0f} ms; "
                   f"reorders {d['reorders']} (greedy: {solver.get('greedy_reorders', '-')})")
    click.echo(f"predicted: {ms(d['predicted_ms'])} ms   greedy: {ms(d['greedy_ms'])} ms   "
               f"NCHW-only: {ms(d['nchw_only_ms'])} ms")
    _print_winner(d)
    if d["measured_ms"] is not None:
        click.echo(f"measured:  fastrun {d['measured_ms']:.3f} ms   onnxruntime (ORT_ENABLE_ALL) {d['onnxruntime_ms']:.3f} ms   "
                   f"speed-up {d['speedup']:.2f}x = {d['speedup_selection']:.2f}x (kernels/formats) x "
                   f"{d['speedup_threads']:.2f}x (threads)   max rel. error {d['max_error']:.1e}")
        engine = d.get("engine", "fastrun")
        if engine.startswith("onnxruntime") or (d.get("whole_model") and engine == "fastrun"):
            click.echo("  (the plan is that onnxruntime session: the difference is the machine's noise)")
        elif engine != "fastrun":
            click.echo(f"  (the plan runs the original model on {engine}: the speed-up is that engine's)")
    print_load(d)
    click.echo(f"done in {d['seconds']:.1f} s")


def _print_winner(d: dict) -> None:
    """What runs the model when it is not fastrun's program, and why."""
    verified = (d.get("solver") or {}).get("verified") or {}
    if d.get("fallback_reason"):
        click.echo(f"left to onnxruntime: the original model runs as onnxruntime runs it "
                   f"({d['fallback_reason']})")
    elif d.get("winner", "fastrun") != "fastrun":
        what = ("onnxruntime on the original model" if d["winner"] == "onnxruntime-original" else
                "onnxruntime on fastrun's specialised graph" if d["winner"] == "onnxruntime" else d["winner"])
        click.echo(f"runs: {what} (fastest eligible in the end-to-end race)")
    if verified.get("errors"):
        click.echo(f"race: {verified.get('rule', '')}: bound {verified.get('bound', 0):.1e}"
                   + (f" ({d['precision_policy']} budget {d['tolerance']:.1e})" if d.get("tolerance") else "")
                   + (f"; engines: {', '.join(d['engines'])}" if d.get("engines") else ""))
        for name, error in verified["errors"].items():
            timed = verified.get(f"{name}_ms")
            click.echo(f"  {name:<22} {ms(timed) + ' ms' if timed is not None else 'not timed':>12}   error {error:.1e}"
                       + ("   <- kept" if name == verified.get("kept") else ""))
    for name, why in ((d.get("solver") or {}).get("failed_candidates") or {}).items():
        click.echo(f"  {name:<22} failed: {why}")
    if d.get("precision", "fp32") != "fp32":
        click.echo(f"PRECISION: the plan computes in {d['precision'].upper()}, not fp32 (allowed by --precision "
                   f"{d['precision_policy']}, error budget {d['tolerance']:.1e})")


def print_load(d: dict) -> None:
    """Say loudly when other processes used the cores while profiling or measuring."""
    busy = {k: v for k, v in (d.get("load") or {}).items() if v.get("busy")}
    if not busy:
        return
    seen = ", ".join(f"{v['other_cores']:.2f} cores {k}" for k, v in busy.items())
    click.echo(f"WARNING: the machine was busy (other processes used {seen})"
               + (": the plan is marked 'measured under load' and keeps all cores; `fastrun warmup` measures it "
                  "again" if d.get("measured_under_load") else ": the end-to-end times above are suspect"))


def shapes_cell(shapes: dict) -> str:
    """Input shapes in a table cell (``-`` for none)."""
    return shapes_text(shapes) or "-"


def cut(text: str, width: int) -> str:
    """``text`` in at most ``width`` characters, keeping its end (paths and node names end usefully)."""
    return text if len(text) <= width else "…" + text[-(width - 1):]


def print_warmup(results) -> None:
    click.echo(f"{'model':<34} {'shapes':<24} {'plan':<9} {'timed':>6} {'reused':>6} {'pred. ms':>9} {'x ort':>6} "
               f"{'program':<8}")
    for r in results:
        plan = r.status if r.status != "profiled" or r.plan_policy not in ("partial", "fallback") else r.plan_policy
        plan = "loaded" if r.measured_under_load else plan
        gain = f"{r.speedup:.2f}x" if r.speedup else "-"
        click.echo(f"{cut(r.model, 34):<34} {cut(shapes_cell(r.shapes), 24):<24} {plan:<9} {r.measured:>6} "
                   f"{r.reused:>6} {ms(r.predicted_ms):>9} {gain:>6} {r.program or '-':<8}")
    profiled = [r for r in results if r.status in ("profiled", "rechecked")]
    rechecked = sum(r.status == "rechecked" for r in results)
    cached = sum(r.status == "cached" for r in results)
    failed = [r for r in results if not r.ok]
    measured = sum(r.measured for r in results)
    compiled = sum(r.program == "compiled" for r in results)
    if any(r.measured_under_load for r in results):
        click.echo("WARNING: plans marked 'loaded' were measured while other processes used the cores; "
                   "run `fastrun warmup` again on a quiet machine to measure them again")
    if not profiled and not failed:
        click.echo(f"nothing profiled: all {cached} plan(s) were already cached, 0 timings measured"
                   + (f"; {compiled} program(s) compiled and stored" if compiled else ""))
    else:
        click.echo(f"{len(results)} plan(s): {len(profiled)} profiled now ({measured} timings measured, "
                   f"{sum(r.reused for r in results)} reused"
                   + (f"; {rechecked} of them unverified plans checked again" if rechecked else "")
                   + f"), {cached} already cached, {len(failed)} failed")
    for r in results:
        if r.note:
            click.echo(f"{r.model}: {r.note}")
    for r in failed:
        click.echo(f"error: {r.model}{' (' + shapes_cell(r.shapes) + ')' if r.shapes else ''}: {r.error}", err=True)


def print_plan(plan, problem: str = "") -> None:
    """A cached plan as a table no wider than 100 columns."""
    from collections import Counter

    click.echo(f"model: {cut(plan.model_name, 30)}   sha256 {plan.model_hash[:12]}   shapes: "
               f"{cut(shapes_cell(plan.input_shapes), 40)}")
    click.echo(f"fingerprint: {plan.fingerprint}   plan: {plan.policy}   fastrun {plan.fastrun_version}   "
               f"onnxruntime {plan.onnxruntime_version}")
    if plan.exact or plan.measured_under_load:
        click.echo(", ".join(["exact mode"] * plan.exact + ["measured under load (`fastrun warmup` measures it again)"]
                             * plan.measured_under_load))
    if problem:
        click.echo(f"not served here: {problem}")
    if plan.runs_original:
        version = f" {plan.engine_version}" if plan.engine_version else ""
        click.echo(f"runs: the original model on {plan.engine}{version} ({plan.threads or 'all'} threads)")
    if plan.precision != "fp32" or plan.precision_policy != "fp32":
        click.echo(f"PRECISION: computes in {plan.precision.upper()} (policy --precision {plan.precision_policy}, "
                   f"error budget {plan.tolerance:.1e}); served only to sessions asking for {plan.precision_policy}")
    if plan.whole_model:
        from fastrun.workflows.verify import WHOLE_MODEL_MARGIN

        click.echo(f"runs as one onnxruntime ORT_ENABLE_ALL session: no assignment beat it end to end by "
                   f"{WHOLE_MODEL_MARGIN:.0%}" if plan.policy != "heuristic" else
                   "runs as one onnxruntime ORT_ENABLE_ALL session: no rule predicts a host kernel wins enough")
    header = f"{'node':<17} {'op':<5} {'signature':<25} {'implementation':<20} {'ms':>7} {'x ort':>6} {'error':>6} formats"
    click.echo(header)
    click.echo("-" * 100)
    heavy = [n for n in plan.nodes if n.spec]
    for n in heavy:
        gain = f"{n.ort_ms / n.time_ms:.2f}x" if n.ort_ms and n.time_ms else "-"
        fmt = n.in_formats[0] if n.in_formats else "-"
        fmt = fmt if fmt == n.out_format else f"{fmt}>{n.out_format}"
        error = n.errors.get(n.impl)
        click.echo(f"{cut(n.name, 17):<17} {n.op_type[:5]:<5} {n.spec[:25]:<25} {n.impl[:20]:<20} "
                   f"{ms(n.time_ms):>7} {gain:>6} {'-' if error is None else f'{error:.0e}':>6} {fmt[:6]}")
    light = Counter(n.out_format for n in plan.nodes if not n.spec)
    if light:
        click.echo(f"{sum(light.values())} other nodes run by onnxruntime, output formats: "
                   + ", ".join(f"{f} {c}" for f, c in sorted(light.items())))
    click.echo(f"predicted: {ms(plan.predicted_ms)} ms   greedy: {ms(plan.greedy_ms)} ms   "
               f"NCHW-only: {ms(plan.nchw_only_ms)} ms   reorders: {len(plan.reorders)}")
    line = "reorders:"
    for tensor, src, dst in plan.reorders:
        item = f" {cut(tensor, 24)} {src}>{dst};"
        if len(line) + len(item) > 100:
            click.echo(line)
            line = "         "
        line += item
    if plan.reorders:
        click.echo(line.rstrip(";"))
