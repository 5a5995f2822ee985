"""The ``opf`` command: argument parsing and dispatch; the one place errors are rendered and
exit statuses chosen.

:func:`main` imports the command's modules itself, so that Ctrl-C while they load (a few
tenths of a second on a cold start) ends ``opf`` quietly with status 130, as later."""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    """``opf ARGS``: run the command; its exit status. A Ctrl-C before the command runs (while
    its modules load, while its arguments are read) is said here; one while it runs, by
    :func:`opals_dsl.cli.command.main`."""
    try:
        from .command import main as command

        return command(argv)
    except KeyboardInterrupt:
        print("opf: interrupted", file=sys.stderr)
        return 130  # errors.EXIT_INTERRUPTED, which is not loaded yet


def __getattr__(name: str) -> Any:
    if name == "build_parser":
        from .command import build_parser

        return build_parser
    raise AttributeError(name)
