"""``python -m fastrun.cli``: the command line."""
from fastrun.cli.commands import main

main()
