"""``python -m hyperpass run [options] script.py [args...]``: see
:mod:`hyperpass.integrations.cli`."""

import sys

from hyperpass.integrations.cli import main

if __name__ == "__main__":
    sys.exit(main())
