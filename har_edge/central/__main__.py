"""``python -m har_edge.central``: see :mod:`har_edge.central.cli`."""

import sys

from har_edge.central.cli import main

sys.exit(main())
