"""The ``passbridge`` command line (typer): thin commands that delegate to the library."""

from passbridge.cli.main import app, main

__all__ = ["app", "main"]
