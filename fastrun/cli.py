"""The ``fastrun`` command: parses arguments, calls the library, prints. No logic of its own."""
from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from typing import Optional

import click

from . import __version__
from .errors import FastrunError

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


def _parse_shapes(shapes: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    from .graph import parse_shape

    return dict(parse_shape(s) for s in shapes)


def _resolve_model(model: Optional[str], example: Optional[str]) -> str:
    from .errors import ModelError
    from .models import example_path

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
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write the results as JSON.")
@click.option("--no-measure", is_flag=True, help="Skip the end-to-end comparison with onnxruntime.")
@click.option("--repeats", type=int, default=10, show_default=True, help="Rounds of the end-to-end comparison.")
@_fail_cleanly
def profile(model, example, shapes, cache_dir, budget, op_limit, json_path, no_measure, repeats) -> None:
    """Profile MODEL, store its plan, print what was chosen and what it gains."""
    from . import api

    path = _resolve_model(model, example)
    show, done = _progress_printer()
    report = api.profile(path, _parse_shapes(shapes), cache_dir=cache_dir, budget=budget, op_limit=op_limit,
                         progress=show, measure=not no_measure, repeats=repeats)
    done()
    data = report.to_json()
    _print_profile(data)
    if json_path:
        Path(json_path).write_text(json.dumps(data, indent=1))
        click.echo(f"wrote {json_path}")


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
        click.echo(f"{n['name'][-22:]:<22} {n['op_type'][:5]:<5} {n['spec'][:30]:<30} {n['impl'][:18]:<18} "
                   f"{_ms(n['time_ms']):>8} {(n['runner_up'] or '-')[:18]:<18} {_ms(n['runner_up_ms']):>8} {gain:>7} {fmt}")
    click.echo("")
    click.echo(f"signatures: {d['specs_measured']} profiled now, {d['specs_cached']} from cache "
               f"({d['profiled_now']} candidate timings measured, {d['from_cache']} reused)")
    if d["skipped_budget"]:
        click.echo(f"budget ran out: {d['skipped_budget']} signatures unprofiled, their nodes use the heuristic choice")
    for spec, impl, why in d["failed"]:
        click.echo(f"rejected: {impl} on {spec}: {why}")
    solver = d["solver"]
    if solver:
        click.echo(f"format search: {solver['method']} {solver['status']} (gap {solver['gap']:.1e}) in {solver['seconds'] * 1e3:.0f} ms; "
                   f"reorders {d['reorders']} (greedy: {solver.get('greedy_reorders', '-')})")
    click.echo(f"predicted: {_ms(d['predicted_ms'])} ms   greedy: {_ms(d['greedy_ms'])} ms   "
               f"NCHW-only: {_ms(d['nchw_only_ms'])} ms")
    if d["measured_ms"] is not None:
        click.echo(f"measured:  fastrun {d['measured_ms']:.3f} ms   onnxruntime (ORT_ENABLE_ALL) {d['onnxruntime_ms']:.3f} ms   "
                   f"speed-up {d['speedup']:.2f}x   max rel. error {d['max_error']:.1e}")
    click.echo(f"done in {d['seconds']:.1f} s")


@main.command()
@click.option("--op", "op_type", default=None, help="Only this op type.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def impls(op_type, as_json) -> None:
    """List registered implementations and where each applies."""
    from . import registry

    items = [i for i in registry.all_implementations() if op_type is None or i.op_type == op_type]
    if as_json:
        click.echo(json.dumps([{"op_type": i.op_type, "name": i.name, "version": i.version, "kind": i.kind,
                                "in_format": i.in_format, "out_format": i.out_format, "rank": i.heuristic_rank,
                                "module": i.module, "description": i.description} for i in items], indent=1))
        return
    click.echo(f"{'op':<7} {'implementation':<24} {'kind':<5} {'formats':<16} {'rank':>4}  applies to")
    for i in items:
        fmts = i.in_format if i.in_format == i.out_format else f"{i.in_format}>{i.out_format}"
        click.echo(f"{i.op_type:<7} {i.id:<24} {i.kind:<5} {fmts:<16} {i.heuristic_rank:>4}  {i.description}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the fields as JSON.")
def fingerprint(as_json) -> None:
    """Print this machine's hardware/software fingerprint."""
    from . import fingerprint as fp

    fields = fp.describe()
    if as_json:
        click.echo(json.dumps({"fingerprint": fp.fingerprint(fields), **fields}, indent=1))
        return
    click.echo(fp.fingerprint(fields))
    for k, v in fields.items():
        click.echo(f"  {k:<12} {' '.join(v) if isinstance(v, list) else v}")


if __name__ == "__main__":
    main()
