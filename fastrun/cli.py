"""The ``fastrun`` command: parses arguments, calls the library, prints. No logic of its own."""
from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from typing import Optional

import click

from fastrun._version import __version__
from fastrun.errors import FastrunError

log = logging.getLogger("fastrun")


def _fail_cleanly(fn):
    """User errors become one line on stderr and exit code 1, never a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FastrunError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
    return wrapper


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _resolve_model(model: Optional[str], example: Optional[str]) -> str:
    from fastrun.errors import ModelError
    from fastrun.workflows.models import example_path

    if model and example:
        raise ModelError("give a MODEL path or --example, not both")
    if example:
        try:
            return str(example_path(example))
        except (KeyError, FileNotFoundError) as exc:
            raise ModelError(str(exc).strip("'\"")) from None
    if not model:
        raise ModelError("no model given: pass a MODEL path or --example resnet50")
    return model


def _ms(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.3f}"


def _progress_printer():
    interactive = sys.stderr.isatty()

    def show(message: str) -> None:
        if interactive:
            click.echo(f"\r\033[K{message}", err=True, nl=False)
        else:
            click.echo(message, err=True)

    def done() -> None:
        if interactive:
            click.echo("\r\033[K", err=True, nl=False)

    return show, done


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fastrun")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Fast-Run style algorithm selection for ONNX models.

    Profile every implementation of every Conv/MatMul/Gemm on this machine, keep the fastest,
    choose one tensor format per tensor for the whole graph, and serve the cached plan.
    """
    _setup_logging(verbose)


_cache_option = click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
                             help="Cache directory (default: $FASTRUN_CACHE_DIR or ./cache in a checkout).")
_shape_option = click.option("--shape", "shapes", multiple=True, metavar="NAME:DxDx..",
                             help="Concrete input shape, e.g. data:1x3x224x224 (repeatable).")


@main.command()
@click.argument("model", required=False)
@click.option("--example", metavar="NAME", help="Use a model shipped in the onnx wheel (resnet50, vgg19, ...).")
@_shape_option
@_cache_option
@click.option("--budget", type=float, default=None, metavar="SECONDS",
              help="Stop profiling new signatures after this long; the rest take the heuristic choice.")
@click.option("--op-limit", type=float, default=2.0, show_default=True, metavar="SECONDS",
              help="Timing budget per op signature.")
@click.option("--op-timeout", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS",
              help="Kill a candidate whose build or single call takes longer; it is recorded as failed [default: 10].")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write the results as JSON.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
              help="Also write a self-contained HTML report (charts of every candidate, formats, reorders).")
@click.option("--no-measure", is_flag=True, help="Skip the end-to-end comparison with onnxruntime.")
@click.option("--repeats", type=int, default=10, show_default=True, help="Rounds of the end-to-end comparison.")
@click.option("--refresh", is_flag=True, help="Measure every signature again, ignoring cached timings "
              "(e.g. after profiling on a busy machine).")
@_fail_cleanly
def profile(model, example, shapes, cache_dir, budget, op_limit, op_timeout, json_path, report_path, no_measure, repeats,
            refresh) -> None:
    """Profile MODEL, store its plan, print what was chosen and what it gains."""
    from fastrun.workflows import profile as profiling

    path = _resolve_model(model, example)
    show, done = _progress_printer()
    results = []
    for shape_set in _shape_sets(shapes) or [None]:  # one plan per shape set
        report = profiling.profile(path, shape_set, cache_dir=cache_dir, budget=budget, op_limit=op_limit,
                             op_timeout=op_timeout, progress=show, measure=not no_measure, repeats=repeats,
                             refresh=refresh)
        done()
        results.append(report.to_json())
        _print_profile(results[-1])
    if json_path:
        Path(json_path).write_text(json.dumps(results[0] if len(results) == 1 else results, indent=1))
        click.echo(f"wrote {json_path}")
    if report_path:
        for i, data in enumerate(results):
            target = Path(report_path)
            _write_report(data, str(target.with_name(f"{target.stem}.{i + 1}{target.suffix}")) if i else report_path)


def _write_report(data: dict, path: str) -> None:
    from fastrun.workflows.report import render_html

    Path(path).write_text(render_html(data), encoding="utf-8")
    click.echo(f"wrote {path}")


@main.command("report")
@click.argument("results", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="HTML file to write (default: RESULTS with .html).")
@_fail_cleanly
def report_cmd(results, output) -> None:
    """Render the HTML report of a saved `fastrun profile --json` file (one per shape set it holds)."""
    from fastrun.errors import FastrunError

    try:
        data = json.loads(Path(results).read_text())
    except (ValueError, UnicodeDecodeError):
        data = None
    items = data if isinstance(data, list) else [data]
    if not items or not all(isinstance(d, dict) and isinstance(d.get("nodes"), list) for d in items):
        raise FastrunError(f"{results} is not a `fastrun profile --json` file")
    target = Path(output or Path(results).with_suffix(".html"))
    for i, d in enumerate(items):
        _write_report(d, str(target.with_name(f"{target.stem}.{i + 1}{target.suffix}") if i else target))


def _print_profile(d: dict) -> None:
    rows = [n for n in d["nodes"] if n["spec"]]
    click.echo(f"model: {d['model']}   fingerprint: {d['fingerprint']}   shapes: "
               + ", ".join(f"{k}:{'x'.join(map(str, v))}" for k, v in d["input_shapes"].items()))
    header = f"{'node':<22} {'op':<5} {'signature':<30} {'winner':<18} {'ms':>8} {'runner-up':<18} {'ms':>8} {'vs ort':>7} fmt"
    click.echo(header)
    click.echo("-" * len(header))
    for n in rows:
        gain = f"{n['ort_ms'] / n['time_ms']:.2f}x" if n["ort_ms"] and n["time_ms"] else "-"
        fmt = n["in_formats"][0] if n["in_formats"] else "-"
        fmt = fmt if fmt == n["out_format"] else f"{fmt}>{n['out_format']}"
        winner = n["impl"][:17] + ("*" if n["source"] == "heuristic" else "")
        click.echo(f"{n['name'][-22:]:<22} {n['op_type'][:5]:<5} {n['spec'][:30]:<30} {winner:<18} "
                   f"{_ms(n['time_ms']):>8} {(n['runner_up'] or '-')[:18]:<18} {_ms(n['runner_up_ms']):>8} {gain:>7} {fmt}")
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
    click.echo(f"predicted: {_ms(d['predicted_ms'])} ms   greedy: {_ms(d['greedy_ms'])} ms   "
               f"NCHW-only: {_ms(d['nchw_only_ms'])} ms")
    if d["measured_ms"] is not None:
        click.echo(f"measured:  fastrun {d['measured_ms']:.3f} ms   onnxruntime (ORT_ENABLE_ALL) {d['onnxruntime_ms']:.3f} ms   "
                   f"speed-up {d['speedup']:.2f}x   max rel. error {d['max_error']:.1e}")
        if d.get("whole_model"):
            click.echo("  (the plan is that onnxruntime session: the difference is the machine's noise)")
    click.echo(f"done in {d['seconds']:.1f} s")


@main.command()
@click.option("--op", "op_type", default=None, help="Only this op type.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def impls(op_type, as_json) -> None:
    """List registered implementations and where each applies."""
    from fastrun.ops import registry

    items = [i for i in registry.all_implementations() if op_type is None or i.op_type == op_type]
    if as_json:
        click.echo(json.dumps([{"op_type": i.op_type, "name": i.name, "version": i.version, "kind": i.kind,
                                "in_format": i.in_format, "out_format": i.out_format, "rank": i.heuristic_rank,
                                "module": i.module, "description": i.description} for i in items], indent=1))
        return
    width = max([len("implementation")] + [len(i.id) for i in items])
    click.echo(f"{'op':<7} {'implementation':<{width}} {'kind':<5} {'formats':<16} {'rank':>4}  applies to")
    for i in items:
        fmts = i.in_format if i.in_format == i.out_format else f"{i.in_format}>{i.out_format}"
        click.echo(f"{i.op_type:<7} {i.id:<{width}} {i.kind:<5} {fmts:<16} {i.heuristic_rank:>4}  {i.description}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the fields as JSON.")
def fingerprint(as_json) -> None:
    """Print this machine's hardware/software fingerprint."""
    from fastrun.system import fingerprint as fp

    fields = fp.describe()
    if as_json:
        click.echo(json.dumps({"fingerprint": fp.fingerprint(fields), **fields}, indent=1))
        return
    click.echo(fp.fingerprint(fields))
    for k, v in fields.items():
        click.echo(f"  {k:<12} {' '.join(v) if isinstance(v, list) else v}")


# ------------------------------------------------------------------ serving: warm-up, plans, cache

def _shape_sets(shapes: tuple[str, ...]) -> list[dict[str, tuple[int, ...]]]:
    from fastrun.workflows.warmup import shape_sets

    return shape_sets(shapes)


def _shapes_text(shapes: dict) -> str:
    return ", ".join(f"{k}:{'x'.join(map(str, v))}" for k, v in shapes.items()) or "-"


def _cut(text: str, width: int) -> str:
    """``text`` in at most ``width`` characters, keeping its end (paths and node names end usefully)."""
    return text if len(text) <= width else "…" + text[-(width - 1):]


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--shape", "shapes", multiple=True, metavar="NAME:DxDx..",
              help="Input shape; repeat a name for several shape sets (one plan each), e.g. "
                   "--shape x:1x3x224x224 --shape x:8x3x224x224.")
@_cache_option
@click.option("--budget", type=float, default=None, metavar="SECONDS",
              help="Per model and shape set: stop profiling new signatures after this long.")
@click.option("--op-limit", type=float, default=2.0, show_default=True, metavar="SECONDS",
              help="Timing budget per op signature.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write the summary as JSON.")
@_fail_cleanly
def warmup(paths, shapes, cache_dir, budget, op_limit, json_path) -> None:
    """Profile what is missing for PATHS (model files, directories searched for *.onnx).

    Plans already cached are not touched: a second run times nothing (a plan cut short by
    --budget is resumed). Failed models are reported after the others finish, with exit status 1.
    For container builds:

    \b
        RUN fastrun warmup models/ --cache-dir /opt/fastrun
    """
    from fastrun.workflows.warmup import warmup as run_warmup

    sets = _shape_sets(shapes)
    show, done = _progress_printer()
    results = run_warmup(paths, sets, cache_dir=cache_dir, progress=show, budget=budget, op_limit=op_limit)
    done()
    _print_warmup(results)
    if json_path:
        Path(json_path).write_text(json.dumps([r.to_json() for r in results], indent=1))
        click.echo(f"wrote {json_path}")
    if any(not r.ok for r in results):
        sys.exit(1)


def _print_warmup(results) -> None:
    click.echo(f"{'model':<34} {'shapes':<24} {'plan':<9} {'timed':>6} {'reused':>6} {'pred. ms':>9} {'x ort':>6} "
               f"{'program':<8}")
    for r in results:
        plan = r.status if r.status != "profiled" or r.plan_policy != "partial" else "partial"
        gain = f"{r.speedup:.2f}x" if r.speedup else "-"
        click.echo(f"{_cut(r.model, 34):<34} {_cut(_shapes_text(r.shapes), 24):<24} {plan:<9} {r.measured:>6} "
                   f"{r.reused:>6} {_ms(r.predicted_ms):>9} {gain:>6} {r.program or '-':<8}")
    profiled = [r for r in results if r.status == "profiled"]
    cached = sum(r.status == "cached" for r in results)
    failed = [r for r in results if not r.ok]
    measured = sum(r.measured for r in results)
    compiled = sum(r.program == "compiled" for r in results)
    if not profiled and not failed:
        click.echo(f"nothing profiled: all {cached} plan(s) were already cached, 0 timings measured"
                   + (f"; {compiled} program(s) compiled and stored" if compiled else ""))
    else:
        click.echo(f"{len(results)} plan(s): {len(profiled)} profiled now ({measured} timings measured, "
                   f"{sum(r.reused for r in results)} reused), {cached} already cached, {len(failed)} failed")
    for r in failed:
        click.echo(f"error: {r.model}{' (' + _shapes_text(r.shapes) + ')' if r.shapes else ''}: {r.error}", err=True)


def _show_options(fn):
    for option in reversed([
        click.argument("model", required=False),
        click.option("--example", metavar="NAME", help="A model shipped in the onnx wheel (resnet50, ...)."),
        click.option("--shape", "shapes", multiple=True, metavar="NAME:DxDx..",
                     help="Only the plan(s) for these shapes (default: every cached shape set)."),
        click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
                     help="A table fitting 100 columns, or a JSON list of plans."),
        _cache_option,
        _fail_cleanly,
    ]):
        fn = option(fn)
    return fn


def _show(model, example, shapes, fmt, cache_dir) -> None:
    from fastrun.workflows import cachetool
    from fastrun.system import fingerprint as fp
    from fastrun.store.cache import Caches
    from fastrun.errors import FastrunError

    path = _resolve_model(model, example)
    caches = Caches(cache_dir, writable=False)
    try:
        everything = cachetool.model_plans(caches, path)
        sets = _shape_sets(shapes)
        plans = [p for p in everything if not sets or any(
            all(list(p.input_shapes.get(k, ())) == list(v) for k, v in s.items()) for s in sets)]
    finally:
        caches.close()
    if not plans:
        where = f"on fingerprint {fp.fingerprint()} in {caches.root}"
        if everything:
            cached = "; ".join(_shapes_text(p.input_shapes) for p in everything)
            raise FastrunError(f"no cached plan for {path} with shapes {', '.join(shapes)} {where} (cached: {cached})")
        raise FastrunError(f"no cached plan for {path} {where}; run `fastrun warmup {path}`")
    if fmt == "json":
        click.echo(json.dumps([p.to_json() for p in plans], indent=1))
        return
    for i, plan in enumerate(plans):
        if i:
            click.echo("")
        _print_plan(plan, cachetool.plan_problem(plan, fp.fingerprint()))


def _print_plan(plan, problem: str = "") -> None:
    """A cached plan as a table no wider than 100 columns."""
    from collections import Counter

    click.echo(f"model: {_cut(plan.model_name, 30)}   sha256 {plan.model_hash[:12]}   shapes: "
               f"{_cut(_shapes_text(plan.input_shapes), 40)}")
    click.echo(f"fingerprint: {plan.fingerprint}   plan: {plan.policy}   fastrun {plan.fastrun_version}   "
               f"onnxruntime {plan.onnxruntime_version}")
    if problem:
        click.echo(f"not served here: {problem}")
    if plan.whole_model:
        from fastrun.workflows.verify import WHOLE_MODEL_MARGIN

        click.echo(f"runs as one onnxruntime ORT_ENABLE_ALL session: no assignment beat it end to end by "
                   f"{WHOLE_MODEL_MARGIN:.0%}" if plan.policy != "heuristic" else
                   "runs as one onnxruntime ORT_ENABLE_ALL session: no rule predicts a host kernel wins enough")
    header = f"{'node':<17} {'op':<5} {'signature':<27} {'implementation':<20} {'ms':>7} {'x ort':>6} formats"
    click.echo(header)
    click.echo("-" * 100)
    heavy = [n for n in plan.nodes if n.spec]
    for n in heavy:
        gain = f"{n.ort_ms / n.time_ms:.2f}x" if n.ort_ms and n.time_ms else "-"
        fmt = n.in_formats[0] if n.in_formats else "-"
        fmt = fmt if fmt == n.out_format else f"{fmt}>{n.out_format}"
        click.echo(f"{_cut(n.name, 17):<17} {n.op_type[:5]:<5} {n.spec[:27]:<27} {n.impl[:20]:<20} "
                   f"{_ms(n.time_ms):>7} {gain:>6} {fmt[:12]}")
    light = Counter(n.out_format for n in plan.nodes if not n.spec)
    if light:
        click.echo(f"{sum(light.values())} other nodes run by onnxruntime, output formats: "
                   + ", ".join(f"{f} {c}" for f, c in sorted(light.items())))
    click.echo(f"predicted: {_ms(plan.predicted_ms)} ms   greedy: {_ms(plan.greedy_ms)} ms   "
               f"NCHW-only: {_ms(plan.nchw_only_ms)} ms   reorders: {len(plan.reorders)}")
    line = "reorders:"
    for tensor, src, dst in plan.reorders:
        item = f" {_cut(tensor, 24)} {src}>{dst};"
        if len(line) + len(item) > 100:
            click.echo(line)
            line = "         "
        line += item
    if plan.reorders:
        click.echo(line.rstrip(";"))


@main.command("show")
@_show_options
def show(model, example, shapes, fmt, cache_dir) -> None:
    """Print the cached plan of MODEL (every cached shape set unless --shape)."""
    _show(model, example, shapes, fmt, cache_dir)


@main.group()
def cache() -> None:
    """Inspect and manage the plan and timing cache."""


@cache.command("ls")
@_cache_option
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@_fail_cleanly
def cache_ls(cache_dir, as_json) -> None:
    """Plans and timing counts per fingerprint."""
    from dataclasses import asdict

    from fastrun.workflows import cachetool
    from fastrun.store.cache import Caches

    caches = Caches(cache_dir, writable=False)
    try:
        infos = cachetool.listing(caches)
    finally:
        caches.close()
    if as_json:
        click.echo(json.dumps({"cache": str(caches.root), "fingerprints": [asdict(i) for i in infos]}, indent=1))
        return
    if not infos:
        click.echo(f"cache {caches.root} is empty")
        return
    click.echo(f"cache {caches.root}")
    for info in infos:
        here = " (this machine)" if info.this_machine else ""
        click.echo(f"fingerprint {info.fingerprint}{here}: {len(info.plans)} plan(s), {info.timings} timing(s), "
                   f"{info.programs} compiled program(s) ({info.program_bytes / 1e6:.1f} MB)")
        for p in info.plans:
            note = f"  not served: {p.problem}" if p.problem else ("" if p.program else "  (no compiled program)")
            click.echo(f"  {_cut(p.model_name, 20):<20} {p.model_hash[:12]:<12} {_cut(p.shapes, 28):<28} "
                       f"{p.policy:<9} {_ms(p.predicted_ms):>8} ms{note}"[:100])


@cache.command("show")
@_show_options
def cache_show(model, example, shapes, fmt, cache_dir) -> None:
    """Print the cached plan of MODEL (every cached shape set unless --shape)."""
    _show(model, example, shapes, fmt, cache_dir)


@cache.command("export")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--fingerprint", "fingerprint_id", default=None, help="Export this fingerprint (default: this machine's).")
@_cache_option
@_fail_cleanly
def cache_export(file, fingerprint_id, cache_dir) -> None:
    """Write the plans and timings of one fingerprint to a portable JSON bundle.

    Compiled programs stay out (binary, derived): run `fastrun warmup` where it is imported."""
    from fastrun.workflows import cachetool
    from fastrun.store.cache import Caches

    caches = Caches(cache_dir, writable=False)
    try:
        s = cachetool.export_bundle(caches, file, fingerprint_id)
    finally:
        caches.close()
    click.echo(f"wrote {s.path}: {s.plans} plan(s), {s.timings} timing(s) of fingerprint {s.fingerprint}"
               + (f", {s.skipped} unreadable entries left out" if s.skipped else ""))


@cache.command("import")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Import a bundle of another fingerprint (kept under its own).")
@_cache_option
@_fail_cleanly
def cache_import(file, force, cache_dir) -> None:
    """Store the entries of a bundle written by `fastrun cache export`."""
    from fastrun.workflows import cachetool
    from fastrun.system import fingerprint as fp
    from fastrun.store.cache import Caches

    caches = Caches(cache_dir)
    try:
        s = cachetool.import_bundle(caches, file, force=force)
    finally:
        caches.close()
    click.echo(f"imported {s.plans} plan(s), {s.timings} timing(s) of fingerprint {s.fingerprint}"
               + (f"; {s.skipped} invalid entries skipped" if s.skipped else ""))
    if s.fingerprint != fp.fingerprint():
        click.echo(f"note: this machine is {fp.fingerprint()}; they serve only where the fingerprint is {s.fingerprint}")


@cache.command("verify")
@click.argument("models", nargs=-1, type=click.Path())
@click.option("--fix", is_flag=True, help="Delete the stale and corrupt entries.")
@_cache_option
@_fail_cleanly
def cache_verify(models, fix, cache_dir) -> None:
    """Check every entry (schema, plan keys, versions, implementations); with MODELS (files or
    directories), plans of any other model count as stale. Exit status 1 if problems remain."""
    from fastrun.workflows import cachetool
    from fastrun.store.cache import Caches

    caches = Caches(cache_dir, writable=fix)
    try:
        report = cachetool.verify(caches, models, fix=fix)
    finally:
        caches.close()
    for p in report.problems:
        click.echo(f"{p.kind:<7} {p.store:<7} {_cut(p.key, 48):<48} {p.reason}{'  (removed)' if p.fixed else ''}")
    remaining = [p for p in report.problems if not p.fixed]
    click.echo(f"checked {report.plans} plan(s), {report.timings} timing(s) and {report.programs} program(s): "
               f"{len(report.problems)} problem(s)"
               + (f", {len(report.problems) - len(remaining)} removed" if fix else ""))
    if remaining:
        sys.exit(1)


@cache.command("clear")
@click.option("--fingerprint", "fingerprint_id", default=None, help="Only the entries of this fingerprint.")
@_cache_option
@_fail_cleanly
def cache_clear(fingerprint_id, cache_dir) -> None:
    """Delete cached plans, timings and compiled programs (all of them, or one fingerprint's)."""
    from fastrun.workflows import cachetool
    from fastrun.store.cache import Caches

    caches = Caches(cache_dir)
    try:
        counts = cachetool.clear(caches, fingerprint_id)
    finally:
        caches.close()
    click.echo(f"removed {counts['plans']} plan(s), {counts['timings']} timing(s) and {counts['programs']} program(s)"
               + (f" of fingerprint {fingerprint_id}" if fingerprint_id else "") + f" from {caches.root}")


if __name__ == "__main__":
    main()
