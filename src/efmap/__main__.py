"""Run the ``efmap`` command line with ``python -m efmap``."""

import sys

from efmap.cli import main

sys.exit(main())
