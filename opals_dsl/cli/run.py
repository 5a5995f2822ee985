"""``opf run FILE``: compile the pipeline, find a cluster, run the plan, report, exit.

In: the parsed command line (``opals_dsl.cli`` adds ``FILE`` and ``--param`` and calls
:func:`add_arguments` for the rest). Out: the exit status — 0 every task done (or skipped), 1 a
task failed or the run was stopped, 2 the pipeline or the command line is invalid, 3 the cluster
could not be started or reached (or every engine was lost), 130 interrupted.

The run's state folder (``--state``, default ``.opf`` beside the pipeline file) holds the
journal (``journal/<pipeline>.jsonl``, :mod:`opals_dsl.runtime.journal`), each run's records
(``runs/<pipeline>/<N>/``: its summary, trace, step logs and report, :mod:`opals_dsl.plan.trace`),
the embedded cluster's ipyparallel files and its record (``launched.json`` for engines started
elsewhere with ``--engines ssh:...``, ``slurm``, ``pbs``, ``mpi``:
:mod:`opals_dsl.runtime.launchers`), and ``run.lock``, which keeps two runs from sharing one
state folder.

A run first stops what an earlier, killed run left behind (its embedded cluster, the temporaries
in the destination folders that nobody writes any more — those of another run that is still
copying stay; the same clearing is done as soon as an engine is lost, for the folders of the
tasks it held, and once more when the run ends), then asks the journal which tasks are
unchanged: those are skipped (``--force`` runs everything); if none is left to run, the run
exits 0 without touching a cluster (none is started, none is connected to). A run that surely
has work (a first run in its state folder, or ``--force``) starts the embedded cluster while
the pipeline compiles (:class:`opals_dsl.runtime.session.EarlyCluster`). ``-v`` prints on standard
error where the run's fixed time went (:mod:`opals_dsl.runtime.timeline`).
``--dry-run`` only prints each task's decision and its reason, and starts nothing.
``--retries N`` replaces every job's ``retries``. Ctrl-C, SIGTERM or SIGHUP (a terminal or ssh
session that goes away) stops submitting and interrupts the running steps, each of which is
ended with its whole process group; what finished is in the journal; a second one stops at
once. All of these exit with 130. The embedded cluster is stopped however the run ends — if
``opf`` itself is killed (``kill -9``), by the run's lifeline (:mod:`opals_dsl.runtime.reaper`)
within seconds. No output may be copied back into the state folder or into the ``opf`` folder of the
scratch root: the plan is checked against ``--state`` and ``--scratch`` when it is made, and
against the scratch roots the engines report before anything is submitted (exit 2, see
:class:`opals_dsl.lang.protect.Protected`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from ..errors import ReportError, UsageError
from ..plan import model
from ..plan.select import targets_of
from ..runtime import launch_options as launchers
from ..runtime import session
from ..runtime.cluster import ClusterOptions
from ..runtime.journal import Journal
from ..runtime.progress import Progress, decision_lines
from ..runtime.resume import Resume
from ..runtime.timeline import NoTimeline, Timeline
from .common import (
    add_strict,
    error_line,
    only,
    parse_params,
    show_warnings,
    state_of,
    warning_line,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the options of ``opf run`` (beyond FILE and --param) to its subparser."""
    where = p.add_argument_group("cluster (default: start one on this machine for the run)")
    where.add_argument(
        "-n", type=int, metavar="N", dest="n",
        help="number of engines: of the embedded cluster (default: one per core, but no more "
        "than tasks to run), or to "
        "submit with --engines slurm, pbs or mpi",
    )
    where.add_argument(
        "--engines", metavar="SPEC",
        help="N: N engines here (as -n N); ssh:HOST[:N][,HOST[:N]...]: N engines on each host "
        "over SSH (default: one per core); slurm, pbs, mpi: -n N engines through the batch "
        "system or mpiexec. opf starts them, and stops them at the end",
    )
    ext = where.add_mutually_exclusive_group()
    ext.add_argument(
        "--profile", metavar="NAME",
        help="use the running ipyparallel cluster of this profile; it is left running",
    )
    ext.add_argument(
        "--cluster-file", metavar="PATH",
        help="use the running ipyparallel cluster of this client connection file "
        "(ipcontroller-client.json); it is left running",
    )
    where.add_argument(
        "--timeout", type=float, metavar="SECONDS",
        help="how long to wait for the cluster and its engines (default: 30; 120 for "
        "engines started elsewhere)",
    )
    launchers.add_arguments(p)
    p.add_argument(
        "--state", metavar="DIR",
        help="folder for the run's trace, logs and state (default: .opf beside FILE)",
    )
    p.add_argument(
        "--scratch", metavar="DIR",
        help="scratch root on every engine (default: $OPF_SCRATCH there, else its temp folder)",
    )
    p.add_argument(
        "--keep-going", action="store_true",
        help="after a task fails for good, still run every task that does not depend on it",
    )
    p.add_argument(
        "--retries", type=int, metavar="N",
        help="try a failed task up to N more times (replaces every job's 'retries')",
    )
    again = p.add_argument_group("running again (the journal in the state folder)")
    again.add_argument(
        "--dry-run", action="store_true",
        help="run nothing and start no cluster; print for each task whether it would run, "
        "and why",
    )
    again.add_argument(
        "--force", action="store_true",
        help="run every task, also those unchanged since they last ran; with --only, the "
        "targets (what they need runs if it is not done)",
    )
    again.add_argument(
        "--checksum", action="store_true",
        help="tell changed inputs by their content (SHA-256), not by size and time alone",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="report only failures")
    add_strict(p)
    p.add_argument(
        "-v", "--verbose", action="store_true",
        help="at the end, say on standard error where the run's fixed time went (imports, "
        "compile, cluster start, engines ready, run, stop)",
    )
    p.add_argument(
        "--report", nargs="?", const="", metavar="PATH",
        help="at the end, write an HTML report of the run (timeline, summary, plan) to PATH "
        "(default: report.html in the run's records, .opf/runs/PIPELINE/N/)",
    )


def cluster_options(args: argparse.Namespace) -> ClusterOptions:
    engines, launch = launchers.launch_options(args)
    profile = getattr(args, "profile", None)
    cluster_file = getattr(args, "cluster_file", None)
    if engines is not None:
        if engines < 1:
            raise UsageError("-n takes a number of engines, 1 or more")
        if profile is not None or cluster_file is not None:
            raise UsageError("-n starts a cluster of its own; it cannot be "
                              "combined with --profile or --cluster-file")
    timeout = getattr(args, "timeout", None)
    if timeout is None:
        timeout = 30.0 if launch is None else launchers.DEFAULT_TIMEOUT
    if timeout <= 0:
        raise UsageError("--timeout takes a number of seconds above 0")
    return ClusterOptions(engines=engines, profile=profile, cluster_file=cluster_file,
                          timeout=timeout, launch=launch)


def main(args: argparse.Namespace) -> int:
    """Run ``opf run`` with parsed arguments; returns the exit status."""
    timeline = Timeline() if getattr(args, "verbose", False) else NoTimeline()
    timeline.mark("imports", 0.0, note="Python starting, opf's modules")
    try:
        return _main(args, timeline)
    finally:
        if getattr(args, "verbose", False):
            print("\n".join(timeline.lines()), file=sys.stderr)


def _early(args: argparse.Namespace, options: ClusterOptions, state: Path) -> bool:
    """Start the embedded cluster while the pipeline compiles? Only when the run surely has
    work: ``--force``, or a state folder that does not exist yet (no task ever ran here). A
    run that may find nothing to do waits for the journal's decision, so that it starts no
    cluster at all when nothing is to run."""
    if getattr(args, "dry_run", False) or not options.embedded or options.launch is not None:
        return False
    if not os.path.isfile(args.file):
        return False
    return bool(getattr(args, "force", False)) or not state.exists()


def _main(args: argparse.Namespace, timeline: Timeline) -> int:
    options = cluster_options(args)
    retries = getattr(args, "retries", None)
    if retries is not None and retries < 0:
        raise UsageError("--retries takes a number of retries, 0 or more")
    state = state_of(args)
    scratch = getattr(args, "scratch", None)
    if scratch:
        scratch = os.path.abspath(os.path.expanduser(scratch))
    params = parse_params(getattr(args, "param", None))
    # the cluster starts before the compiler is even imported (lark, networkx)
    early = (session.EarlyCluster(options, state, scratch=scratch, timeline=timeline)
             if _early(args, options, state) else None)
    with early or contextlib.nullcontext():
        return _compile_and_run(args, timeline, early, options, state, scratch, params,
                                retries)


def _compile_and_run(args: argparse.Namespace, timeline: Timeline,
                     early: session.EarlyCluster | None, options: ClusterOptions, state: Path,
                     scratch: str | None, params: dict[str, str], retries: int | None) -> int:
    with timeline.phase("compile"):
        from ..lang.compile import Protected, check_scratch, load, plan_table
        from ..lang.compile import plan as make_plan

        # no output may be copied back over the pipeline, into this run's state folder, or
        # into the folders the engines work in (see opals_dsl.lang.protect.Protected)
        protected = Protected.for_pipeline(args.file, state=str(state), scratch=(scratch,))
        loaded = load(args.file, params, protected=protected,
                      strict=getattr(args, "strict", False))
        # the whole plan is run from a table (a sixth of the graph's memory); a part of it is
        # cut out of the graph
        plan = only(make_plan(loaded), args) if getattr(args, "only", None) else \
            plan_table(loaded)
    show_warnings(loaded.warnings)
    quiet = getattr(args, "quiet", False)
    force = getattr(args, "force", False)
    if force and getattr(args, "only", None):  # as make -B or snakemake -f: the targets
        force = targets_of(args.only)
    checksum = getattr(args, "checksum", False)
    title = model.info(plan).pipeline
    if getattr(args, "dry_run", False):
        journal = Journal.read(state, plan, checksum=checksum)
        decisions = Resume(journal).decide(force)
        for warning in journal.warnings():
            print(warning_line(warning), file=sys.stderr)
        lines = decision_lines(title, decisions)
        print("\n".join(lines[-1:] if quiet else lines))
        return 0
    summary = session.run(
        plan, state_dir=state, cluster=options, scratch=scratch, force=force,
        checksum=checksum, keep_going=getattr(args, "keep_going", False), retries=retries,
        listener=Progress(quiet=quiet, title=title, source=args.file),
        guard=lambda roots: check_scratch(loaded, plan, roots),
        early=early, timeline=timeline,
    )
    if getattr(args, "report", None) is not None and summary.records:
        from .report import write_report

        try:
            path = write_report(summary.records, Path(args.report) if args.report else None,
                                plan)
            if not quiet:
                print(f"report: {path}")
        except ReportError as exc:  # the run's results stand; the report can be made later
            print(error_line(f"{exc} (the run's records are kept: opf report writes it "
                             f"later)"), file=sys.stderr)
    if summary.no_engines and not summary.interrupted:
        print(error_line(
            f"every engine of the cluster was lost; {summary.not_run} "
            f"task{'s' if summary.not_run != 1 else ''} did not run (the journal keeps what "
            f"finished: run again to do the rest)"), file=sys.stderr)
    return summary.exit_code
