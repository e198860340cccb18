"""Options and conventions shared by the commands.

Every command of a :class:`Group` (``fastrun`` and ``fastrun cache``) takes ``-v``/``-q`` after
its name as well as before it, and turns user errors (and files it cannot read or write) into one
``error:`` line on stderr with exit status 1, never a traceback. ``--json [FILE]`` means the same
everywhere: the command's result as JSON, written to FILE, or printed to stdout instead of the
table when no FILE (or ``-``) is given.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from typing import Iterator, Optional

import click

from fastrun.errors import FastrunError

VERBOSITY = "fastrun.verbosity"


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """User errors become one line on stderr and exit code 1 (130 on Ctrl-C), never a traceback."""
    try:
        yield
    except BrokenPipeError:  # the reader went away (`fastrun impls | head`): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except (FastrunError, OSError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


def fail_cleanly(fn):
    """:func:`user_errors` around one command (every command of a :class:`Group` has it already)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with user_errors():
            return fn(*args, **kwargs)
    return wrapper


def setup_logging(verbosity: int) -> None:
    """Log to stderr: warnings by default, -v info, -vv debug, -q errors only."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(max(logging.DEBUG, min(logging.ERROR, logging.WARNING - 10 * verbosity)))


def verbosity() -> int:
    """The -v count minus the -q count given so far, before and after the command's name."""
    ctx = click.get_current_context(silent=True)
    return ctx.find_root().meta.get(VERBOSITY, 0) if ctx else 0


def _count_verbosity(ctx: click.Context, param: click.Parameter, value: int) -> int:
    if value:
        meta = ctx.find_root().meta
        meta[VERBOSITY] = meta.get(VERBOSITY, 0) + (value if param.name == "verbose" else -value)
        setup_logging(meta[VERBOSITY])
    return value


def verbosity_options() -> list[click.Option]:
    return [click.Option(["-v", "--verbose"], count=True, expose_value=False, callback=_count_verbosity,
                         help="More logging (-v info, -vv debug)."),
            click.Option(["-q", "--quiet"], count=True, expose_value=False, callback=_count_verbosity,
                         help="Less output: errors only, no progress lines.")]


class Command(click.Command):
    """A fastrun command: -v/-q are accepted after its name too."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.params.extend(verbosity_options())


class Group(click.Group):
    """A group of fastrun commands, each with -v/-q and one-line user errors."""

    command_class = Command

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.params.extend(verbosity_options())

    def invoke(self, ctx: click.Context):
        with user_errors():
            return super().invoke(ctx)


Group.group_class = Group


def json_option(what: str):
    """``--json [FILE]``: ``what`` as JSON, to FILE or (no FILE, or ``-``) to stdout instead of the table."""
    return click.option("--json", "json_to", is_flag=False, flag_value="-", default=None, metavar="[FILE]",
                        help=f"{what} as JSON: written to FILE, or printed instead of the table without FILE.")


def interactive() -> bool:
    """Whether a person can answer a question: stdin is a terminal and this is not CI."""
    return sys.stdin.isatty() and not os.environ.get("CI")


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


SHAPES_HELP = ("Input shape NAME:D1xD2x..., e.g. data:1x3x224x224; repeat a name for several shape sets (one plan "
               "each); with several inputs the i-th shapes of each pair up. A dim may be a range "
               "[START:STOP:STEP] (STOP included) or a list [1,4,8]: --shape 'input_ids:1x[8:128:8]' "
               "is 16 shape sets.")
exact_option = click.option("--exact", is_flag=True, help="Exact mode: no approximate algorithm (Winograd, FFT); every "
                            "kernel within direct evaluation's error of onnxruntime, for reproducible numerics "
                            "(a plan of its own).")


shape_option = click.option("--shape", "shapes", multiple=True, metavar="NAME:DxDx..", help=SHAPES_HELP)


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
                     help="A table fitting 100 columns, or a JSON list of plans (the same as --json)."),
        json_option("The plans"),
        cache_option,
    ]):
        fn = option(fn)
    return fn


def precision_options(fn):
    """--precision and --tolerance: the precision policy (fastrun.system.precision)."""
    for option in reversed([
        click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
                     help="Numerics the plan may compute in; bf16/fp16 only on a CPU that has them natively, "
                          "and only where the outputs stay within --tolerance of onnxruntime's."),
        click.option("--tolerance", type=click.FloatRange(min=0, min_open=True), default=None, metavar="REL",
                     help="Error budget of --precision bf16/fp16: max abs error relative to max |output| "
                          "on the check inputs [default: 1e-2]."),
    ]):
        fn = option(fn)
    return fn


engines_option = click.option(
    "--engines", default=None, metavar="LIST",
    help="Whole-model engines the end-to-end race may use, comma-separated (onnxruntime, openvino); "
         "onnxruntime always races [default: $FASTRUN_ENGINES, else every installed engine].")


def load_inputs(path: Optional[str]):
    """The check inputs of ``--inputs FILE.npz``: one array per model input, by name."""
    if path is None:
        return None
    import numpy as np
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError) as exc:
        raise FastrunError(f"cannot read the check inputs {path}: {exc}") from None

