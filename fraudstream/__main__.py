"""``python -m fraudstream``: the ``fraudstream`` command."""

from fraudstream.streams.cli.main import main

if __name__ == "__main__":
    main()
