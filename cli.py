"""deploykit's command line, run from a checkout as ``python cli.py <command> ...``.

The typer app and every command live in :mod:`deploykit.cli`, which the installed
``deploykit`` command runs; this file only hands over to it, so the two never differ.
"""

from deploykit.cli import app, main

__all__ = ["app", "main"]

if __name__ == "__main__":
    main()
