"""The ``partserve`` command line."""

from partserve.cli.main import main

__all__ = ["main"]
