"""Run the ``efmap`` command line with ``python -m efmap``."""

import sys

from efmap.cli import main

if __name__ == "__main__":
    sys.exit(main())
