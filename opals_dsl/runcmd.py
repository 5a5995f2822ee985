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
in the destination folders that nobody writes any more — those of another run that is still
copying stay; the same clearing is done as soon as an engine is lost, for the folders of the
tasks it held, and once more when the run ends), then asks the journal which tasks are
unchanged: those are skipped (``--force`` runs everything); if none is left to run, no embedded
cluster is started.
``--dry-run`` only prints each task's decision and its reason, and starts nothing.
``--retries N`` replaces every job's ``retries``. Ctrl-C, SIGTERM or SIGHUP (a terminal or ssh
session that goes away) stops submitting and interrupts the running steps, each of which is
ended with its whole process group; what finished is in the journal; a second one stops at
once. All of these exit with 130. The embedded cluster is stopped however the run ends — if
``opf`` itself is killed (``kill -9``), by the run's lifeline (:mod:`opals_dsl.reaper`) within
seconds. No output may be copied back into the state folder or into the ``opf`` folder of the
scratch root: the plan is checked against ``--state`` and ``--scratch`` when it is made, and
against the scratch roots the engines report before anything is submitted (exit 2, see
:class:`opals_dsl.plan.Protected`).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
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
    TemporarySweeper,
    new_run_id,
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
    """SIGINT, SIGTERM and SIGHUP, handled alike.

    While the scheduler runs, the first asks it to stop (it interrupts the running steps and
    waits briefly for them), the next raises KeyboardInterrupt at once. While an embedded
    cluster starts (``starting``) a signal is only noted, and the start, which asks
    ``requested``, stops cleanly by itself: raising inside ipyparallel's event loop would leave
    its tasks behind. While the cluster is being stopped (``closing``) signals are ignored, so
    the stop finishes. SIGHUP means the terminal is gone: standard output and error, if they
    are that terminal, are pointed at ``/dev/null`` before anything more is written. Once a
    run was interrupted, a further signal after the clean-up ends the process at once.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.scheduler: Scheduler | None = None
        self.starting = False
        self.closing = False
        self.requested = False
        self.count = 0
        self._saved: dict[int, Any] = {}

    def handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGHUP:
            _detach_terminal()
        if self.closing:
            return  # the cluster is being stopped: let that finish
        self.count += 1
        self.requested = True
        if self.starting:
            return
        if self.scheduler is not None and self.count == 1:
            self.scheduler.interrupt()
            return
        raise KeyboardInterrupt

    def attach(self, scheduler: Scheduler) -> None:
        """The scheduler now running; a signal that came before it reaches it at once."""
        self.scheduler = scheduler
        if self.requested:
            scheduler.interrupt()

    @contextlib.contextmanager
    def installed(self) -> Iterator[_Interrupts]:
        try:
            for sig in self.SIGNALS:
                self._saved[sig] = signal.signal(sig, self.handle)
        except ValueError:  # not the main thread: leave signals alone
            pass
        try:
            yield self
        finally:
            for sig, old in self._saved.items():
                signal.signal(sig, _end_now if self.count else old)


def _end_now(signum: int, frame: Any) -> None:
    """After an interrupted run everything is cleaned up: a further Ctrl-C ends the process at
    once, quietly (raising KeyboardInterrupt now would only print a traceback)."""
    os._exit(EXIT_INTERRUPTED)


def _detach_terminal() -> None:
    try:
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            if os.isatty(fd):
                os.dup2(null, fd)
    os.close(null)


def main(args: argparse.Namespace) -> int:
    """Run ``opf run`` with parsed arguments; returns the exit status."""
    from .api import Protected, compile_file
    from .cli import parse_params

    options = cluster_options(args)
    retries = getattr(args, "retries", None)
    if retries is not None and retries < 0:
        raise _UsageError("opf: error: --retries takes a number of retries, 0 or more")
    state = state_dir(args)
    scratch = getattr(args, "scratch", None)
    if scratch:
        scratch = os.path.abspath(os.path.expanduser(scratch))
    params = parse_params(getattr(args, "param", None))
    # no output may be copied back over the pipeline, into this run's state folder, or into
    # the folders the engines work in (see opals_dsl.plan.Protected)
    protected = Protected.for_pipeline(args.file, state=str(state), scratch=(scratch,))
    plan = compile_file(args.file, params, protected=protected)
    quiet = getattr(args, "quiet", False)
    force = getattr(args, "force", False)
    checksum = getattr(args, "checksum", False)
    title = str(plan.graph.get("pipeline", "opf run"))
    tasks = plan_tasks(plan)
    if getattr(args, "dry_run", False):
        journal = Journal.read(state, plan, checksum=checksum, tasks=tasks)
        decisions = journal.decide(force)
        for warning in journal.warnings():
            print(f"opf: warning: {warning}", file=sys.stderr)
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
            for warning in journal.warnings():
                print(f"opf: warning: {warning}", file=sys.stderr)
            to_run = sum(1 for d in decisions if d.run)
            progress.resuming(to_run, len(decisions) - to_run)
            try:
                summary = _run(plan, options, journal, progress, interrupts, to_run=to_run,
                               state=state, scratch=scratch, retries=retries,
                               keep_going=getattr(args, "keep_going", False),
                               guard=lambda roots: _guard_scratch(args.file, params, protected,
                                                                  plan, roots))
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


def _guard_scratch(file: str, params: dict[str, str], protected: Any, plan: Any,
                   roots: Iterable[str]) -> None:
    """Raise the :class:`~opals_dsl.errors.PlanError` of the pipeline if one of its outputs
    would be copied back into the opf folder of a scratch root the engines reported.

    The plan's destinations are looked at first (cheap); only when one is refused is the
    pipeline planned again with those roots, for messages that name its declarations."""
    from .api import Protected, compile_file

    roots = [r for r in dict.fromkeys(roots) if r not in protected.scratch]
    if not roots:
        return
    engines = Protected(scratch=tuple(roots))
    folders: set[str] = set()
    for _, data in plan.nodes(data=True):
        if data.get("kind") == "copyback":
            folders.update(dest.rpartition("/")[0] for _, dest in data.get("files") or ())
    root = str(plan.graph["root"])
    if any(engines.folder_refusal(Protected.forms(os.path.join(root, f))) for f in folders):
        compile_file(file, params, protected=protected.with_scratch(roots))


def _run(plan: Any, options: ClusterOptions, journal: Journal, progress: Progress,
         interrupts: _Interrupts, *, to_run: int, state: Path, scratch: str | None,
         retries: int | None, keep_going: bool,
         guard: Callable[[Iterable[str]], None] | None = None) -> RunSummary:
    """Schedule the plan: on the cluster, or without one when every task is to be skipped.
    ``guard`` is given the engines' scratch roots before anything is submitted; it raises to
    stop the run."""

    run_id = new_run_id()

    def schedule(executor: Any) -> RunSummary:
        scheduler = Scheduler(
            plan, executor, state_dir=state, scratch=scratch, keep_going=keep_going,
            skip=journal.skip, listener=Listeners([journal, progress, TemporarySweeper(plan)]),
            retries=retries,
            checksum=journal.checksum, tasks=(journal.tasks, journal.deps), run_id=run_id,
            stamp=journal.stamp,
        )
        interrupts.attach(scheduler)
        return scheduler.run()

    if not to_run and options.embedded:  # a cluster named by the user is still reached
        return schedule(LocalExecutor(()))
    # only the embedded start asks `interrupted` between its steps; a launched one (ssh, a batch
    # job) waits in plain Python, where the signal is raised as KeyboardInterrupt and it cleans up
    interrupts.starting = options.embedded and options.launch is None
    with open_cluster(options, state, scratch=scratch, run_id=run_id,
                      interrupted=lambda: interrupts.requested) as executor:
        interrupts.starting = False
        try:
            if guard is not None:
                guard(info.scratch for info in executor.engines().values())
            summary = schedule(executor)
        finally:
            interrupts.closing = True
    remove_stale_temporaries(plan)  # of engines lost on the way, or stopped mid-copy
    return summary
