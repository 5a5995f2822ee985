"""``opf runs FILE`` lists a pipeline's recorded runs; ``opf clean FILE`` removes old ones, and
the pipeline's scratch folder on this machine (job folders, task folders kept after failures).

Both find the runs by the pipeline's name (read from FILE without checking the rest of it) in
the state folder beside it, or ``--state``. The records' layout: :mod:`opals_dsl.plan.trace`.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

from ..lang.protect import default_scratch
from ..runtime import history
from ..units import format_duration
from .common import state_dir


def add_arguments(p: argparse.ArgumentParser, *, clean: bool) -> None:
    """Add the arguments of ``opf runs`` or (``clean``) ``opf clean`` to its subparser."""
    p.add_argument("file", help="the pipeline file (.opf)")
    p.add_argument("--state", metavar="DIR",
                   help="the runs' state folder, when FILE was run with --state")
    if not clean:
        return
    p.add_argument("--keep", type=int, default=5, metavar="K",
                   help="keep the records of the last K runs that did work (default: 5) and "
                   "of the last run; runs that had nothing to do or never started count for "
                   "none. With 0, only the last run that did work (the one opf report shows) "
                   "is kept")
    p.add_argument("--scratch-folder", action="store_true",
                   help="also remove the pipeline's scratch folder on this machine (job "
                   "folders, task folders kept after failures): every checkout that runs a "
                   "pipeline of this name on this machine shares it")
    p.add_argument("--scratch", metavar="DIR",
                   help="the scratch root to look in (default: the roots the last run's "
                   "engines on this machine used, as its records say; else $OPF_SCRATCH, "
                   "else the system temp folder)")
    p.add_argument("--dry-run", action="store_true",
                   help="remove nothing; list what would be removed")


def _found(args: argparse.Namespace) -> tuple[str, Path, list[history.PastRun]]:
    from ..lang.compile import pipeline_name

    name = pipeline_name(args.file)
    state = state_dir(args.file, getattr(args, "state", None))
    return name, state, history.runs(state, name)


def _when(stamp: object) -> str:
    if not isinstance(stamp, int | float):
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))


def runs_main(args: argparse.Namespace) -> int:
    """``opf runs``: one line per recorded run, and which one ``opf report`` shows."""
    name, state, found = _found(args)
    if not found:
        print(f"no run of {name} recorded in {state}")
        return 0
    print(f"{'run':>4}  {'started':<19}  {'took':>10}  {'tasks':>5}  {'done':>5}  "
          f"{'skipped':>7}  {'failed':>6}  status")
    for r in found:
        d = r.data
        start, end = d.get("started"), d.get("finished")
        took = (format_duration(end - start) if isinstance(start, int | float)
                and isinstance(end, int | float) else "-")
        print(f"{r.number:>4}  {_when(start):<19}  {took:>10}  {d.get('tasks', '?'):>5}  "
              f"{d.get('done', '?'):>5}  {d.get('skipped', '?'):>7}  {d.get('failed', '?'):>6}"
              f"  {r.status}")
    shown = history.pick(found)
    if shown is not None:
        print(f"opf report shows run {shown.number} (--run N for another); its records: "
              f"{shown.folder}")
    return 0


def clean_main(args: argparse.Namespace) -> int:
    """``opf clean``: remove old runs' records and this pipeline's scratch folder."""
    from ..errors import UsageError
    from ..runtime.jobfolders import remove_job_folders
    from ..runtime.session import lock_state

    if args.keep < 0:
        raise UsageError("--keep takes a number of runs, 0 or more")
    name, state, found = _found(args)
    roots = ([os.path.abspath(os.path.expanduser(args.scratch))] if args.scratch
             else _recorded_scratch(found) or [default_scratch()])
    old = history.prunable(found, args.keep)
    records = [f"records of run {r.number} ({r.status}): {r.folder}" for r in old]
    folders = [Path(root) / "opf" / name for root in roots]  # as the engines name it
    removing = {f: f"scratch folder of {name} (job folders, kept task folders): {f}"
                for f in folders if f.is_dir() and args.scratch_folder}
    kept: list[str] = []
    for folder in folders:
        if folder.is_dir() and folder not in removing:
            kept.append(f"kept the scratch folder {folder}: other checkouts with a pipeline "
                        f"named {name} share it (--scratch-folder removes it)")
        elif not folder.is_dir() and args.scratch_folder:
            kept.append(f"no scratch folder {folder}: runs given --scratch DIR keep it there; "
                        f"give opf clean the same --scratch")
    verb = "would remove" if args.dry_run else "removed"
    in_use: dict[Path, list[str]] = {}
    if not args.dry_run and (records or removing):
        # never under a run that uses this state folder; job folders that other runs use stay
        with lock_state(state, "nothing was removed; clean again once it has finished"):
            history.remove([r.folder for r in old])
            in_use = {folder: remove_job_folders(str(folder)) for folder in removing}
    # a scratch folder an engine still holds a job folder of was emptied, not removed
    for line in records + [line for f, line in removing.items() if not in_use.get(f)]:
        print(f"{verb} {line}")
    for folder, held in in_use.items():
        if held:
            kept.append(f"kept {len(held)} job folder{'s' if len(held) != 1 else ''} in "
                        f"{folder}: an engine holds {'them' if len(held) != 1 else 'it'} (a run "
                        f"going on, or a cluster's engine keeping it for its next run); the "
                        f"rest was removed")
    if not records and not removing:
        print(f"nothing to clean for {name}")
    for line in kept:
        print(line, file=sys.stderr)
    return 0


def _recorded_scratch(found: list[history.PastRun]) -> list[str]:
    """The scratch roots the last run that recorded them used on this host (``opf clean``
    looks there unless given ``--scratch``)."""
    for r in reversed(found):
        roots = r.data.get("scratch")
        if isinstance(roots, list) and roots and r.data.get("host") == socket.gethostname():
            return [str(root) for root in roots]
    return []
