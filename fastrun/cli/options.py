"""Options and argument handling shared by the commands; user errors become one line on stderr."""
from __future__ import annotations

import functools
import logging
import sys
from typing import Optional

import click

from fastrun.errors import FastrunError


def fail_cleanly(fn):
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


def setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def resolve_model(model: Optional[str], example: Optional[str]) -> str:
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


cache_option = click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
                            help="Cache directory (default: $FASTRUN_CACHE_DIR or ./cache in a checkout).")


shape_option = click.option("--shape", "shapes", multiple=True, metavar="NAME:DxDx..",
                            help="Concrete input shape, e.g. data:1x3x224x224 (repeatable).")


def parse_shape_sets(shapes: tuple[str, ...]) -> list[dict[str, tuple[int, ...]]]:
    from fastrun.workflows.warmup import shape_sets

    return shape_sets(shapes)


def show_options(fn):
    for option in reversed([
        click.argument("model", required=False),
        click.option("--example", metavar="NAME", help="A model shipped in the onnx wheel (resnet50, ...)."),
        click.option("--shape", "shapes", multiple=True, metavar="NAME:DxDx..",
                     help="Only the plan(s) for these shapes (default: every cached shape set)."),
        click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
                     help="A table fitting 100 columns, or a JSON list of plans."),
        cache_option,
        fail_cleanly,
    ]):
        fn = option(fn)
    return fn
