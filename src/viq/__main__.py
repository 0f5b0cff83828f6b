"""``python -m viq``: the ``viq`` command line (see :mod:`viq.cli.main`)."""

import sys

from viq.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
