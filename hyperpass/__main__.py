"""``python -m hyperpass run [options] script.py [args...]``: see :mod:`hyperpass.cli`."""

import sys

from hyperpass.cli import main

if __name__ == "__main__":
    sys.exit(main())
