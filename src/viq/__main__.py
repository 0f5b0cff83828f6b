"""``python -m viq``: the ``viq`` command line (see :mod:`viq.cli`)."""

import sys

from viq.cli import main

if __name__ == "__main__":
    sys.exit(main())
