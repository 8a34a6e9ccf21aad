"""The ``fraudstream`` command: ``main`` dispatches, one module per command."""
