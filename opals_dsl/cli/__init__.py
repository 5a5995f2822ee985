"""The ``opf`` command: argument parsing and dispatch; the one place errors are rendered and
exit statuses chosen."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
