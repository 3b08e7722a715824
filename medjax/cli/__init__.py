"""The `medjax` command: argument parsing and printing; the work is done in the layers below."""

from medjax.cli.main import main

__all__ = ["main"]
