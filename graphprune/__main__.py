"""``python -m graphprune``: the command line (see graphprune.cli)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
