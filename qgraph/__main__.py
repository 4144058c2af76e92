"""``python -m qgraph``: the ``qgraph`` command line (see :mod:`qgraph.cli`)."""

import sys

from qgraph.cli import main

sys.exit(main())
