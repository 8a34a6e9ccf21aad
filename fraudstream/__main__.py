"""``python -m fraudstream``: the ``fraudstream`` command."""

import sys

from fraudstream.streams.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
