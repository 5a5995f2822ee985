"""``opf run FILE``: compile the pipeline, find a cluster, run the plan, report, exit.

In: the parsed command line (``opals_dsl.cli`` adds ``FILE`` and ``--param`` and calls
:func:`add_arguments` for the rest). Out: the exit status — 0 every task done (or skipped), 1 a
task failed or the run was stopped, 2 the pipeline or the command line is invalid, 3 the cluster
could not be started or reached (or every engine was lost), 130 interrupted.

The run's state folder (``--state``, default ``.opf`` beside the pipeline file) holds the trace
(``trace.jsonl``), the step logs (``logs/<job>/<task>/<step>.log``), the embedded cluster's
ipyparallel files and its record, and ``run.lock``, which keeps two runs from sharing one state
folder. Ctrl-C or SIGTERM stops submitting and interrupts the running steps; a second one stops
at once. The embedded cluster is stopped however the run ends.
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

from .cluster import ClusterOptions, open_cluster
from .errors import ClusterError, OpfError
from .progress import Progress
from .runtime import Scheduler, remove_stale_temporaries

EXIT_INTERRUPTED = 130


class _UsageError(OpfError):
    """A bad combination of ``opf run`` options (exit 2)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the options of ``opf run`` (beyond FILE and --param) to its subparser."""
    where = p.add_argument_group("cluster (default: start one on this machine for the run)")
    where.add_argument(
        "-n", "--engines", type=int, metavar="N",
        help="engines of the embedded cluster (default: one per core)",
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
        "--timeout", type=float, default=30.0, metavar="SECONDS",
        help="how long to wait for the cluster and its engines (default: 30)",
    )
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
    p.add_argument("-q", "--quiet", action="store_true", help="report only failures")
    p.add_argument(
        "--report", nargs="?", const="report.html", metavar="PATH",
        help="at the end, write an HTML report of the run (timeline, summary, plan) to PATH "
        "(default: report.html)",
    )


def cluster_options(args: argparse.Namespace) -> ClusterOptions:
    engines = getattr(args, "engines", None)
    profile = getattr(args, "profile", None)
    cluster_file = getattr(args, "cluster_file", None)
    if engines is not None:
        if engines < 1:
            raise _UsageError("opf: error: -n takes a number of engines, 1 or more")
        if profile is not None or cluster_file is not None:
            raise _UsageError("opf: error: -n starts a cluster of its own; it cannot be "
                              "combined with --profile or --cluster-file")
    timeout = getattr(args, "timeout", 30.0)
    if timeout is None or timeout <= 0:
        raise _UsageError("opf: error: --timeout takes a number of seconds above 0")
    return ClusterOptions(engines=engines, profile=profile, cluster_file=cluster_file,
                          timeout=timeout)


def state_dir(args: argparse.Namespace) -> Path:
    if getattr(args, "state", None):
        return Path(args.state).expanduser().resolve()
    return Path(args.file).resolve().parent / ".opf"


@contextlib.contextmanager
def lock_state(state: Path) -> Iterator[None]:
    """Hold ``<state>/run.lock`` for the run; another run on the same folder is refused."""
    state.mkdir(parents=True, exist_ok=True)
    path = state / "run.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
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
    plan = compile_file(args.file, parse_params(getattr(args, "param", None)))
    state = state_dir(args)
    scratch = getattr(args, "scratch", None)
    if scratch:
        scratch = os.path.abspath(os.path.expanduser(scratch))
    progress = Progress(quiet=getattr(args, "quiet", False),
                        title=str(plan.graph.get("pipeline", "opf run")))
    interrupts = _Interrupts()
    with lock_state(state), interrupts.installed():
        try:
            with open_cluster(options, state, scratch=scratch) as executor:
                remove_stale_temporaries(plan)
                scheduler = Scheduler(
                    plan, executor, state_dir=state, scratch=scratch,
                    keep_going=getattr(args, "keep_going", False), listener=progress,
                )
                interrupts.scheduler = scheduler
                summary = scheduler.run()
                interrupts.closing = True
        except ClusterError as exc:
            print(f"opf: error: {exc}", file=sys.stderr)
            return exc.exit_code
    if getattr(args, "report", None):
        from .report import write_report

        path = write_report(state, Path(args.report), plan)
        if not getattr(args, "quiet", False):
            print(f"report: {path}")
    if summary.interrupted:
        return EXIT_INTERRUPTED
    if summary.no_engines:
        print(f"opf: error: every engine of the cluster was lost; {summary.not_run} "
              f"task{'s' if summary.not_run != 1 else ''} did not run", file=sys.stderr)
    return summary.exit_code
