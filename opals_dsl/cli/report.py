"""``opf report [FILE | STATE_DIR]``: write a run's report page (:mod:`opals_dsl.report`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UsageError
from ..lang.protect import STATE_FOLDER
from ..runtime.fsatomic import output_target, write_atomic
from .common import parse_params, state_dir

if TYPE_CHECKING:
    import networkx as nx

DEFAULT_OUTPUT = "report.html"


def write_report(state_dir: str | Path, out_path: str | Path,
                 plan: nx.DiGraph | None = None) -> Path:
    """Write the report of the run whose state is in ``state_dir`` to ``out_path`` (only ever
    complete: a temporary renamed into place); its path."""
    from .. import report  # here, not at the top: every `opf` command builds this parser

    text = report.page(state_dir, plan)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    target, atomic = output_target(str(out))
    if atomic:
        write_atomic(target, text.encode("utf-8"))
    else:  # a device or pipe: written into, never replaced
        with open(target, "wb") as fh:
            fh.write(text.encode("utf-8"))
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the arguments of ``opf report [FILE | STATE_DIR] [-o PATH]`` to its subparser."""
    p.add_argument(
        "file", nargs="?", default=STATE_FOLDER, metavar="FILE | STATE_DIR",
        help="a pipeline file (its run's state is .opf beside it, or --state) or a run's "
        "state folder (default: .opf)",
    )
    p.add_argument("-o", "--output", metavar="PATH", default=DEFAULT_OUTPUT,
                   help=f"where to write the HTML page (default: {DEFAULT_OUTPUT})")
    p.add_argument("--state", metavar="DIR",
                   help="the run's state folder, when FILE was run with --state")
    p.add_argument(
        "--param", "-p", action="append", metavar="NAME=VALUE",
        help="the parameters FILE was run with (for the plan drawing)",
    )


def main(args: argparse.Namespace) -> int:
    """``opf report``: write the page, print where it is."""
    from ..lang.compile import compile_file

    target = Path(args.file).expanduser()
    plan = None
    if target.is_dir():
        state = target
    elif target.is_file():
        plan = compile_file(target, parse_params(getattr(args, "param", None)))
        state = state_dir(target)
    else:
        raise UsageError(f"{target} is neither a pipeline file nor a run's state folder")
    if getattr(args, "state", None):
        state = Path(args.state).expanduser()
    out = write_report(state, args.output, plan)
    print(f"opf: report written to {out}")
    return 0
