"""The ``fastrun`` command: parses arguments, calls the library, prints."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from fastrun._version import __version__
from fastrun.cli.cache import cache, show_plans
from fastrun.cli.options import (Group, cache_option, engines_option, exact_option, json_option, load_inputs,
                                 parse_shape_sets, precision_options,
                                 resolve_model, setup_logging, shape_option, show_options, verbosity)
from fastrun.cli.output import emit_json, print_profile, print_warmup, progress_printer, write_report


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fastrun")
def main() -> None:
    """Fast-Run style algorithm selection for ONNX models.

    Profile every implementation of every Conv/MatMul/Gemm on this machine, keep the fastest,
    choose one tensor format per tensor for the whole graph, and serve the cached plan.

    Every command takes -v/-q (more or less output), and --json [FILE] where it has a result:
    JSON written to FILE, or printed instead of the table when no FILE is given.
    """
    setup_logging(verbosity())


@main.command()
@click.argument("model", required=False)
@click.option("--example", metavar="NAME", help="Use a model shipped in the onnx wheel (resnet50, vgg19, ...).")
@shape_option
@cache_option
@click.option("--budget", type=float, default=None, metavar="SECONDS",
              help="Stop profiling new signatures after this long; the rest take the heuristic choice.")
@click.option("--op-limit", type=float, default=2.0, show_default=True, metavar="SECONDS",
              help="Timing budget per op signature.")
@click.option("--op-timeout", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS",
              help="Kill a candidate whose build or single call takes longer; it is recorded as failed [default: 10].")
@json_option("The results")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
              help="Also write a self-contained HTML report (charts of every candidate, formats, reorders).")
@click.option("--no-measure", is_flag=True, help="Skip the end-to-end comparison with onnxruntime.")
@click.option("--repeats", type=int, default=10, show_default=True, help="Rounds of the end-to-end comparison.")
@click.option("--refresh", is_flag=True, help="Measure every signature again, ignoring cached timings "
              "(e.g. after profiling on a busy machine).")
@exact_option
@precision_options
@engines_option
@click.option("--inputs", "inputs_path", type=click.Path(exists=True, dir_okay=False), default=None, metavar="FILE.npz",
              help="Check inputs (np.savez: one array per model input name) the race's outputs are compared on "
                   "[default: random].")
def profile(model, example, shapes, cache_dir, budget, op_limit, op_timeout, json_to, report_path, no_measure, repeats,
            refresh, exact, precision, tolerance, engines, inputs_path) -> None:
    """Profile MODEL, store its plan, print what was chosen and what it gains."""
    from fastrun.workflows import profile as profiling

    path = resolve_model(model, example)
    show, done = progress_printer(enabled=verbosity() >= 0)
    results = []
    for shape_set in parse_shape_sets(shapes) or [None]:  # one plan per shape set
        report = profiling.profile(path, shape_set, cache_dir=cache_dir, budget=budget, op_limit=op_limit,
                                   op_timeout=op_timeout, progress=show, measure=not no_measure, repeats=repeats,
                                   refresh=refresh, exact=exact, precision=precision, tolerance=tolerance,
                                   inputs=load_inputs(inputs_path), engines=engines)
        done()
        results.append(report.to_json())
        if json_to != "-":
            print_profile(results[-1])
    if json_to:
        emit_json(results[0] if len(results) == 1 else results, json_to)
    if report_path:
        for i, data in enumerate(results):
            target = Path(report_path)
            write_report(data, str(target.with_name(f"{target.stem}.{i + 1}{target.suffix}")) if i else report_path)


@main.command("report")
@click.argument("results", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="HTML file to write (default: RESULTS with .html).")
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
        write_report(d, str(target.with_name(f"{target.stem}.{i + 1}{target.suffix}") if i else target))


@main.command()
@click.option("--op", "op_type", default=None, help="Only this op type.")
@json_option("The implementations")
def impls(op_type, json_to) -> None:
    """List registered implementations and where each applies."""
    from fastrun.ops import registry

    items = [i for i in registry.all_implementations() if op_type is None or i.op_type == op_type]
    if json_to:
        emit_json([{"op_type": i.op_type, "name": i.name, "version": i.version, "kind": i.kind,
                    "in_format": i.in_format, "out_format": i.out_format, "rank": i.heuristic_rank,
                    "module": i.module, "description": i.description} for i in items], json_to)
        return
    width = max([len("implementation")] + [len(i.id) for i in items])
    click.echo(f"{'op':<7} {'implementation':<{width}} {'kind':<5} {'formats':<16} {'rank':>4}  applies to")
    for i in items:
        fmts = i.in_format if i.in_format == i.out_format else f"{i.in_format}>{i.out_format}"
        click.echo(f"{i.op_type:<7} {i.id:<{width}} {i.kind:<5} {fmts:<16} {i.heuristic_rank:>4}  {i.description}")


@main.command()
@json_option("The fingerprint and its fields")
def fingerprint(json_to) -> None:
    """Print this machine's hardware/software fingerprint."""
    from fastrun.system import fingerprint as fp

    fields = fp.describe()
    if json_to:
        emit_json({"fingerprint": fp.fingerprint(fields), **fields}, json_to)
        return
    click.echo(fp.fingerprint(fields))
    for k, v in fields.items():
        text = " ".join(v) if isinstance(v, list) else ", ".join(f"{a}: {b}" for a, b in v.items()) \
            if isinstance(v, dict) else v
        click.echo(f"  {k:<12} {text}")


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@shape_option
@cache_option
@click.option("--budget", type=float, default=None, metavar="SECONDS",
              help="Per model and shape set: stop profiling new signatures after this long.")
@click.option("--op-limit", type=float, default=2.0, show_default=True, metavar="SECONDS",
              help="Timing budget per op signature.")
@json_option("The summary")
@exact_option
@precision_options
@engines_option
def warmup(paths, shapes, cache_dir, budget, op_limit, json_to, exact, precision, tolerance, engines) -> None:
    """Profile what is missing for PATHS (model files, directories searched for *.onnx).

    Plans already cached are not touched: a second run times nothing (a plan cut short by
    --budget is resumed, a plan not checked end to end here, e.g. imported, is checked again).
    Failed models are reported after the others finish, with exit status 1. For container builds:

    \b
        RUN fastrun warmup models/ --cache-dir /opt/fastrun
        RUN fastrun warmup models/bert.onnx --shape 'input_ids:1x[8:128:8]' \\
                --shape 'attention_mask:1x[8:128:8]' --cache-dir /opt/fastrun
    """
    from fastrun.workflows.warmup import warmup as run_warmup

    sets = parse_shape_sets(shapes)
    show, done = progress_printer(enabled=verbosity() >= 0)
    results = run_warmup(paths, sets, cache_dir=cache_dir, progress=show, budget=budget, op_limit=op_limit, exact=exact,
                         precision=precision, tolerance=tolerance, engines=engines)
    done()
    if json_to != "-":
        print_warmup(results)
    if json_to:
        emit_json([r.to_json() for r in results], json_to)
    if any(not r.ok for r in results):
        sys.exit(1)


@main.command("show")
@show_options
def show(model, example, shapes, fmt, json_to, cache_dir) -> None:
    """Print the cached plan of MODEL (every cached shape set unless --shape)."""
    show_plans(model, example, shapes, fmt, json_to, cache_dir)


main.add_command(cache)

if __name__ == "__main__":
    main()
