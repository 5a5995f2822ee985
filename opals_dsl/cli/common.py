"""What the commands share: ``--param`` values, ``--only`` targets, the run's state folder, and
the words of an error or warning line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import MAX_SHOWN, Diagnostic, UsageError, error_line, plural
from ..lang.protect import default_state_dir

if TYPE_CHECKING:  # imported when a pipeline is compiled (`opf run` starts its cluster meanwhile)
    import networkx as nx

__all__ = ["add_only", "add_strict", "error_line", "not_written", "only", "parse_params",
           "show_warnings", "state_dir", "state_of", "warning_line"]


def add_strict(p: argparse.ArgumentParser) -> None:
    """The ``--strict`` option of the commands that check a pipeline."""
    p.add_argument(
        "--strict", action="store_true",
        help="treat warnings (likely mistakes, such as a file the steps name but nothing "
        "stages) as errors: exit 2 and run nothing",
    )


def show_warnings(warnings: Sequence[Diagnostic]) -> None:
    """A checked pipeline's warnings, on standard error, each with its place and a caret,
    then their count (they change no exit status; ``--strict`` makes them errors)."""
    if not warnings:
        return
    for w in warnings[:MAX_SHOWN]:
        print(w.render(), file=sys.stderr)
    if len(warnings) > MAX_SHOWN:
        print(f"... and {len(warnings) - MAX_SHOWN} more", file=sys.stderr)
    print(f"{plural(len(warnings), 'warning')} found (--strict makes them errors).",
          file=sys.stderr)

def warning_line(message: str) -> str:
    """A message as the command line shows a warning."""
    return f"opf: warning: {message}"


def not_written(what: str, path: str | Path, exc: OSError) -> str:
    """Why ``what`` (``-o``'s path, "the report ...") could not be written, and whether
    ``path`` is left as it was or was not written at all."""
    before = "is left as it was" if os.path.exists(path) else "was not written"
    return f"cannot write {what}: {exc.strerror or exc}; it {before}"


def parse_params(items: list[str] | None) -> dict[str, str]:
    """``--param NAME=VALUE`` options as a mapping (the values are converted when checked)."""
    params: dict[str, str] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--param takes NAME=VALUE, not '{item}'")
        params[name.strip()] = value
    return params


def state_dir(file: str | Path, state: str | Path | None = None) -> Path:
    """The run's state folder: ``state`` if given, else the default beside ``file``
    (:func:`~opals_dsl.lang.protect.default_state_dir`)."""
    if state:
        return Path(state).expanduser().resolve()
    return Path(default_state_dir(Path(file).resolve()))


def state_of(args: argparse.Namespace) -> Path:
    """The state folder that the parsed arguments of a command name."""
    return state_dir(args.file, getattr(args, "state", None))


def add_only(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--only", action="append", metavar="JOB[/TASK]",
        help="only these tasks (a job: all its tasks) and the tasks they need (repeatable)",
    )


def only(graph: nx.DiGraph, args: argparse.Namespace) -> nx.DiGraph:
    """The part of ``graph`` that ``--only`` names: the whole plan without it."""
    targets = getattr(args, "only", None)
    if not targets:
        return graph
    from ..plan.select import select

    return select(graph, targets)
