"""``python -m fastrun``: the command line."""
from fastrun.cli import main

if __name__ == "__main__":
    main()
