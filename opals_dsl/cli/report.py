"""``opf report [FILE | FOLDER]``: write a run's report page (:mod:`opals_dsl.report`) into the
run's records, and say where it is.

Which run: of a pipeline file, the last run that did work (``--run N`` for another; ``opf runs
FILE`` lists them), in the state folder beside it (or ``--state``). A folder may be a run's
records (``.opf/runs/PIPELINE/N``, or a state folder of an older opf, with ``trace.jsonl`` in
it) or a state folder holding the runs of one pipeline. Without an argument: the one pipeline
file in the current folder, else ``.opf``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ReportError, UsageError
from ..lang.protect import STATE_FOLDER
from ..plan.trace import REPORT_FILE, RUNS_FOLDER, TRACE_FILE
from ..runtime import history
from ..runtime.fsatomic import output_target, write_atomic
from .common import not_written, parse_params, state_dir

if TYPE_CHECKING:
    import networkx as nx


def write_report(state_dir: str | Path, out_path: str | Path | None = None,
                 plan: nx.DiGraph | None = None) -> Path:
    """Write the report of the run whose records are in ``state_dir`` to ``out_path`` (default:
    ``report.html`` among them; only ever complete: a temporary renamed into place); its
    path."""
    from .. import report  # here, not at the top: every `opf` command builds this parser

    out = Path(out_path) if out_path is not None else Path(state_dir) / REPORT_FILE
    target, atomic = output_target(str(out))
    # links relative to a page that is a file; a device or pipe gets absolute ones
    text = report.page(state_dir, plan, _run_of(Path(state_dir)),
                       links_from=os.path.dirname(target) if atomic else None)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if atomic:
            write_atomic(target, text.encode("utf-8"))
        else:  # a device or pipe: written into, never replaced
            with open(target, "wb") as fh:
                fh.write(text.encode("utf-8"))
    except OSError as exc:  # a missing or read-only folder, a full disk, ...
        raise ReportError(not_written(f"the report {out}", out, exc)) from None
    return out


def _run_of(folder: Path) -> dict[str, object] | None:
    """The number and status of the run whose records are ``folder`` (``killed`` when its
    process is gone without ending it), or None for a folder that is not a run's."""
    from ..plan.trace import read_run
    from ..runtime.history import PastRun

    data = read_run(folder)
    if not data:
        return None
    number = data.get("run")
    past = PastRun(number if isinstance(number, int) else 0, folder, data)
    return {"number": number, "status": past.status}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the arguments of ``opf report [FILE | FOLDER] [-o PATH]`` to its subparser."""
    p.add_argument(
        "file", nargs="?", metavar="FILE | FOLDER",
        help="a pipeline file (its runs are recorded in .opf beside it, or --state), a run's "
        "records folder or a state folder (default: the one .opf file here, else .opf)",
    )
    p.add_argument("-o", "--output", metavar="PATH",
                   help=f"where to write the HTML page (default: {REPORT_FILE} in the run's "
                   "records)")
    p.add_argument("--run", type=int, metavar="N",
                   help="report run N (default: the last run that did work; 'opf runs FILE' "
                   "lists them)")
    p.add_argument("--state", metavar="DIR",
                   help="the run's state folder, when FILE was run with --state")
    p.add_argument(
        "--param", "-p", action="append", metavar="NAME=VALUE",
        help="the parameters FILE was run with (for the plan drawing)",
    )


def default_target() -> Path:
    """What ``opf report`` and ``opf runs`` look at without an argument: the one pipeline file
    in the current folder, else the state folder ``.opf``."""
    files = sorted(p for p in Path.cwd().glob("*.opf") if p.is_file())
    return files[0] if len(files) == 1 else Path(STATE_FOLDER)


def pipeline_runs(state: Path, pipeline: str, number: int | None) -> Path:
    """The records folder of run ``number`` of ``pipeline`` (default: the last that did
    work); a :class:`ReportError` that says what is recorded when there is no such run."""
    found = history.runs(state, pipeline)
    chosen = history.pick(found, number)
    if chosen is not None:
        return chosen.folder
    if number is not None and found:
        raise ReportError(f"no run {number} of {pipeline} is recorded in {state} (runs "
                          f"{found[0].number} to {found[-1].number}; 'opf runs' lists them)")
    raise ReportError(f"no run of {pipeline} recorded in {state}; run it with 'opf run' "
                      f"first")


def records_of_folder(folder: Path, number: int | None) -> Path:
    """The records a folder stands for: itself (a run's records) or a run of the one pipeline
    whose runs a state folder holds."""
    if (folder / TRACE_FILE).is_file() and number is None:
        return folder
    runs = folder / RUNS_FOLDER
    names = sorted(p.name for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []
    if len(names) > 1:
        raise UsageError(f"{folder} holds the runs of {len(names)} pipelines "
                         f"({', '.join(names)}); name the pipeline file: opf report FILE")
    if not names:
        raise ReportError(f"no run recorded in {folder}; run a pipeline with 'opf run' first")
    return pipeline_runs(folder, names[0], number)


def main(args: argparse.Namespace) -> int:
    """``opf report``: write the page, print where it is."""
    from ..lang.compile import compile_file
    from ..plan import model

    target = Path(args.file).expanduser() if args.file else default_target()
    number = getattr(args, "run", None)
    plan = None
    if target.is_file():
        plan = compile_file(target, parse_params(getattr(args, "param", None)))
        state = state_dir(target, getattr(args, "state", None))
        records = pipeline_runs(state, model.info(plan).pipeline, number)
    elif getattr(args, "state", None):
        records = records_of_folder(Path(args.state).expanduser(), number)
    elif target.is_dir():
        records = records_of_folder(target, number)
    elif args.file:
        raise UsageError(f"{target} is neither a pipeline file nor a folder of run records")
    else:
        raise ReportError(f"no run recorded in {Path.cwd()} (no {STATE_FOLDER} folder, and no "
                          f"single pipeline file); name the pipeline file: opf report FILE")
    out = write_report(records, args.output, plan)
    print(f"report: {out}")
    return 0
