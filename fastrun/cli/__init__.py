"""The ``fastrun`` command line (``fastrun.cli:main``)."""
from fastrun.cli.commands import main

__all__ = ["main"]
