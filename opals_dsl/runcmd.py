"""``opf run FILE``: compile the pipeline, find a cluster, run the plan, report, exit.

In: the parsed command line (``opals_dsl.cli`` adds ``FILE`` and ``--param`` and calls
:func:`add_arguments` for the rest). Out: the exit status — 0 every task done (or skipped), 1 a
task failed or the run was stopped, 2 the pipeline or the command line is invalid, 3 the cluster
could not be started or reached (or every engine was lost), 130 interrupted.

The run's state folder (``--state``, default ``.opf`` beside the pipeline file) holds the
journal (``journal/<pipeline>.jsonl``, :mod:`opals_dsl.journal`), the trace (``trace.jsonl``),
the step logs (``logs/<job>/<task>/<step>.log``), the embedded cluster's ipyparallel files and
its record (``launched.json`` for engines started elsewhere with ``--engines ssh:...``,
``slurm``, ``pbs``, ``mpi``: :mod:`opals_dsl.launchers`), and ``run.lock``, which keeps two runs
from sharing one state folder.

A run first stops what an earlier, killed run left behind (its embedded cluster, the temporaries
in the destination folders), then asks the journal which tasks are unchanged: those are skipped
(``--force`` runs everything); if none is left to run, no embedded cluster is started.
``--dry-run`` only prints each task's decision and its reason, and starts nothing.
``--retries N`` replaces every job's ``retries``. Ctrl-C or SIGTERM stops submitting and
interrupts the running steps; what finished is in the journal; a second one stops at once. The
embedded cluster is stopped however the run ends.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import launchers
from .cluster import ClusterOptions, open_cluster, stop_leftover_cluster
from .errors import ClusterError, OpfError
from .journal import Journal
from .progress import Progress, decision_lines
from .runtime import (
    Listeners,
    LocalExecutor,
    RunSummary,
    Scheduler,
    plan_tasks,
    remove_stale_temporaries,
)

EXIT_INTERRUPTED = 130


class _UsageError(OpfError):
    """A bad combination of ``opf run`` options (exit 2)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the options of ``opf run`` (beyond FILE and --param) to its subparser."""
    where = p.add_argument_group("cluster (default: start one on this machine for the run)")
    where.add_argument(
        "-n", type=int, metavar="N", dest="n",
        help="number of engines: of the embedded cluster (default: one per core), or to "
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
        help="run every task, also those unchanged since they last ran",
    )
    again.add_argument(
        "--checksum", action="store_true",
        help="tell changed inputs by their content (SHA-256), not by size and time alone",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="report only failures")
    p.add_argument(
        "--report", nargs="?", const="report.html", metavar="PATH",
        help="at the end, write an HTML report of the run (timeline, summary, plan) to PATH "
        "(default: report.html)",
    )


def cluster_options(args: argparse.Namespace) -> ClusterOptions:
    engines, launch = launchers.launch_options(args)
    profile = getattr(args, "profile", None)
    cluster_file = getattr(args, "cluster_file", None)
    if engines is not None:
        if engines < 1:
            raise _UsageError("opf: error: -n takes a number of engines, 1 or more")
        if profile is not None or cluster_file is not None:
            raise _UsageError("opf: error: -n starts a cluster of its own; it cannot be "
                              "combined with --profile or --cluster-file")
    timeout = getattr(args, "timeout", None)
    if timeout is None:
        timeout = 30.0 if launch is None else launchers.DEFAULT_TIMEOUT
    if timeout <= 0:
        raise _UsageError("opf: error: --timeout takes a number of seconds above 0")
    return ClusterOptions(engines=engines, profile=profile, cluster_file=cluster_file,
                          timeout=timeout, launch=launch)


def state_dir(args: argparse.Namespace) -> Path:
    if getattr(args, "state", None):
        return Path(args.state).expanduser().resolve()
    return Path(args.file).resolve().parent / ".opf"


@contextlib.contextmanager
def lock_state(state: Path) -> Iterator[None]:
    """Hold ``<state>/run.lock`` for the run; another run on the same folder is refused."""
    path = state / "run.lock"
    try:
        state.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise _UsageError(f"opf: error: cannot use the state folder {state}: "
                          f"{exc.strerror or exc}; choose another with --state") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise _UsageError(
                f"opf: error: another opf run (process {other}) is using the state folder "
                f"{state}; wait for it to finish, or give this run its own folder with --state"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


class _Interrupts:
    """SIGINT/SIGTERM: the first asks the scheduler to stop, the next one raises at once."""

    def __init__(self) -> None:
        self.scheduler: Scheduler | None = None
        self.closing = False
        self.count = 0
        self._saved: dict[int, Any] = {}

    def handle(self, signum: int, frame: Any) -> None:
        if self.closing:
            return  # the cluster is being stopped: let that finish
        self.count += 1
        if self.scheduler is not None and self.count == 1:
            self.scheduler.interrupt()
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self) -> Iterator[_Interrupts]:
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._saved[sig] = signal.signal(sig, self.handle)
        except ValueError:  # not the main thread: leave signals alone
            pass
        try:
            yield self
        finally:
            for sig, old in self._saved.items():
                signal.signal(sig, old)


def main(args: argparse.Namespace) -> int:
    """Run ``opf run`` with parsed arguments; returns the exit status."""
    from .api import compile_file
    from .cli import parse_params

    options = cluster_options(args)
    retries = getattr(args, "retries", None)
    if retries is not None and retries < 0:
        raise _UsageError("opf: error: --retries takes a number of retries, 0 or more")
    plan = compile_file(args.file, parse_params(getattr(args, "param", None)))
    state = state_dir(args)
    scratch = getattr(args, "scratch", None)
    if scratch:
        scratch = os.path.abspath(os.path.expanduser(scratch))
    quiet = getattr(args, "quiet", False)
    force = getattr(args, "force", False)
    checksum = getattr(args, "checksum", False)
    title = str(plan.graph.get("pipeline", "opf run"))
    tasks = plan_tasks(plan)
    if getattr(args, "dry_run", False):
        decisions = Journal.read(state, plan, checksum=checksum, tasks=tasks).decide(force)
        lines = decision_lines(title, decisions)
        print("\n".join(lines[-1:] if quiet else lines))
        return 0
    progress = Progress(quiet=quiet, title=title)
    interrupts = _Interrupts()
    with lock_state(state), interrupts.installed():
        stop_leftover_cluster(state)  # its engines may still be copying back: first stop them
        remove_stale_temporaries(plan)
        try:
            journal = Journal.open(state, plan, checksum=checksum, tasks=tasks)
        except OSError as exc:
            raise _UsageError(f"opf: error: cannot open the journal in {state}: "
                              f"{exc.strerror or exc}; choose another state folder with "
                              f"--state") from exc
        with journal:
            decisions = journal.decide(force)
            to_run = sum(1 for d in decisions if d.run)
            progress.resuming(to_run, len(decisions) - to_run)
            try:
                summary = _run(plan, options, journal, progress, interrupts, to_run=to_run,
                               state=state, scratch=scratch, retries=retries,
                               keep_going=getattr(args, "keep_going", False))
            except ClusterError as exc:
                print(f"opf: error: {exc}", file=sys.stderr)
                return exc.exit_code
        for problem in (journal.error, summary.trace_error):
            if problem:
                print(f"opf: warning: {problem}", file=sys.stderr)
    if getattr(args, "report", None):
        from .report import write_report

        path = write_report(state, Path(args.report), plan)
        if not getattr(args, "quiet", False):
            print(f"report: {path}")
    if summary.interrupted:
        return EXIT_INTERRUPTED
    if summary.no_engines:
        print(f"opf: error: every engine of the cluster was lost; {summary.not_run} "
              f"task{'s' if summary.not_run != 1 else ''} did not run (the journal keeps what "
              f"finished: run again to do the rest)", file=sys.stderr)
    return summary.exit_code


def _run(plan: Any, options: ClusterOptions, journal: Journal, progress: Progress,
         interrupts: _Interrupts, *, to_run: int, state: Path, scratch: str | None,
         retries: int | None, keep_going: bool) -> RunSummary:
    """Schedule the plan: on the cluster, or without one when every task is to be skipped."""

    def schedule(executor: Any) -> RunSummary:
        scheduler = Scheduler(
            plan, executor, state_dir=state, scratch=scratch, keep_going=keep_going,
            skip=journal.skip, listener=Listeners([journal, progress]), retries=retries,
            checksum=journal.checksum, tasks=(journal.tasks, journal.deps),
        )
        interrupts.scheduler = scheduler
        return scheduler.run()

    if not to_run and options.embedded:  # a cluster named by the user is still reached
        return schedule(LocalExecutor(()))
    with open_cluster(options, state, scratch=scratch) as executor:
        summary = schedule(executor)
        interrupts.closing = True
    return summary
