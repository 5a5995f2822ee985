"""The one place a run is wired: a plan, a state folder and a cluster (or an executor) in, a
:class:`~opals_dsl.runtime.events.RunSummary` out. ``opf run``, the Python API, the tests and the
benchmarks all run plans through :func:`run`.

What a run does, in order
    1. Holds ``<state>/run.lock`` (another run on the same state folder is refused) and handles
       SIGINT, SIGTERM and SIGHUP (:class:`Interrupts`) for as long as it runs.
    2. Stops what an earlier, killed run left behind: its embedded cluster and the temporaries
       in the destination folders that nobody writes any more (those of another run that is
       still copying stay). The same clearing is done as soon as an engine is lost, for the
       folders of the tasks it held, and once more when the run ends.
    3. Opens the journal (:mod:`.journal`) and decides which tasks are unchanged
       (:mod:`.resume`): those are skipped (``force`` runs everything); if none is left to run,
       no embedded cluster is started.
    4. Opens the run's records (:class:`~opals_dsl.runtime.history.RunRecords`: the folder
       ``runs/<pipeline>/<N>/`` for its trace, step logs and summary).
    5. Starts or reaches the cluster (:func:`~opals_dsl.runtime.connect.open_cluster`), lets
       ``guard`` look at the engines' scratch roots, refuses a plan with a step that needs more
       threads than the largest machine has engines (:func:`refuse_wide_steps`), and schedules
       the plan (:class:`~opals_dsl.runtime.scheduler.Scheduler`; tasks resumed at a later step
       start there); the journal records every task that finishes, the listener shows progress.

Warnings (a damaged journal, a trace that could not be written) go to the listener's
``warning``; errors that stop the run before anything runs are raised as
:class:`~opals_dsl.errors.OpfError` (a state folder in use, a cluster that cannot be started,
a step too wide for every machine).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import EXIT_INTERRUPTED, ThreadsError, UsageError
from ..plan import model
from ..plan.model import Task
from .cluster import ClusterOptions, stop_leftover_cluster
from .connect import open_cluster
from .events import Listeners, RunListener, RunSummary, new_run_id
from .executor import Executor, LocalExecutor
from .fsatomic import remove_abandoned_temporaries
from .history import RunRecords
from .journal import Journal
from .resume import Resume
from .scheduler import Scheduler
from .slots import Slots, too_wide

if TYPE_CHECKING:
    import networkx as nx


def destination_folders(plan: nx.DiGraph, tasks: Iterable[Task] | None = None) -> list[str]:
    """The folders the copy-backs of ``tasks`` (default: every task) write into, sorted."""
    root = model.info(plan).root
    if tasks is None:
        dests: Iterable[str] = model.destinations(plan)
    else:
        dests = (dest for t in tasks if t.copyback in plan.nodes
                 for _, dest in model.node(plan, t.copyback).files)
    return sorted({os.path.dirname(os.path.join(root, dest)) for dest in dests})


def remove_stale_temporaries(plan: nx.DiGraph, tasks: Iterable[Task] | None = None
                             ) -> list[str]:
    """Remove the temporaries that killed copy-backs left in the destination folders of
    ``tasks`` (default: of the whole plan); return their paths. Only temporaries whose writer
    is provably gone are removed (:func:`~opals_dsl.runtime.fsatomic.remove_abandoned_temporaries`):
    those another run is still writing stay."""
    removed = []
    for folder in destination_folders(plan, tasks):
        removed += remove_abandoned_temporaries(folder)
    return removed


class TemporarySweeper(RunListener):
    """Removes what a copy-back left behind as soon as its engine is lost: the abandoned
    temporaries in the destination folders of the tasks that engine held."""

    def __init__(self, plan: nx.DiGraph) -> None:
        self.plan = plan

    def engine_lost(self, engine: int, tasks: list[Task]) -> None:
        with contextlib.suppress(OSError):
            remove_stale_temporaries(self.plan, tasks)


@contextlib.contextmanager
def lock_state(state: Path) -> Iterator[None]:
    """Hold ``<state>/run.lock`` for the run; another run on the same folder is refused."""
    path = state / "run.lock"
    try:
        state.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise UsageError(f"cannot use the state folder {state}: "
                          f"{exc.strerror or exc}; choose another with --state") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise UsageError(
                f"another opf run (process {other}) is using the state folder "
                f"{state}; wait for it to finish, or give this run its own folder with --state"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


class Interrupts:
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

    def __init__(self, *, end_after: bool = True) -> None:
        self.end_after = end_after
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
    def installed(self, signals: bool = True) -> Iterator[Interrupts]:
        try:
            for sig in self.SIGNALS if signals else ():
                self._saved[sig] = signal.signal(sig, self.handle)
        except ValueError:  # not the main thread: leave signals alone
            pass
        try:
            yield self
        finally:
            for sig, old in self._saved.items():
                signal.signal(sig, _end_now if self.count and self.end_after else old)


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


def run(
    plan: nx.DiGraph,
    *,
    state_dir: str | Path,
    cluster: ClusterOptions | None = None,
    executor: Executor | None = None,
    scratch: str | None = None,
    resume: bool = True,
    force: bool = False,
    checksum: bool = False,
    keep_going: bool = False,
    retries: int | None = None,
    listener: RunListener | None = None,
    skip: Callable[[Task], bool] | None = None,
    guard: Callable[[Iterable[str]], None] | None = None,
    signals: bool = True,
    end_after_interrupt: bool = True,
    **policy: Any,
) -> RunSummary:
    """Run ``plan``: see the module docstring for what happens, in order.

    The engines are ``executor`` if given (it is left as it is), else the cluster ``cluster``
    describes (default: an embedded one with one engine per core), started and stopped here.
    ``resume`` keeps the run's journal in ``state_dir`` (tasks unchanged since they last ran
    are skipped, all run with ``force``; ``checksum`` compares inputs by content); without it
    every task runs (or those ``skip`` does not skip) and nothing is recorded. ``retries``
    replaces every job's ``retries``. ``guard`` is given the engines' scratch roots before
    anything is submitted; it raises to stop the run. ``signals`` handles SIGINT, SIGTERM and
    SIGHUP (only in the main thread); after an interrupted run a further signal ends the process
    at once, unless ``end_after_interrupt`` is False (a notebook's kernel): then the handlers
    the run found are put back. ``policy`` passes the scheduler's knobs (``depth``,
    ``batch_seconds``, ``max_batch``, ``engine_wait``, ``interrupt_wait``, ``run_id``).
    """
    state = Path(state_dir)
    listener = listener or RunListener()
    interrupts = Interrupts(end_after=end_after_interrupt)
    with lock_state(state), interrupts.installed(signals), contextlib.ExitStack() as stack:
        if executor is None:  # its engines may still be copying back: first stop them
            stop_leftover_cluster(state)
        remove_stale_temporaries(plan)
        tasks = model.tasks(plan)
        with _journal(state, plan, resume, checksum, tasks) as journal:
            decider = None
            to_run = len(tasks)
            if journal is not None:
                decider = Resume(journal)
                decisions = decider.decide(force)
                for warning in journal.warnings():
                    listener.warning(warning)
                to_run = sum(1 for d in decisions if d.run)
                listener.resuming(to_run, len(decisions) - to_run)
            run_id = policy.pop("run_id", None) or new_run_id()
            records = stack.enter_context(
                RunRecords(state, plan, total=len(tasks), to_run=to_run))

            def schedule(engines: Executor) -> RunSummary:
                refuse_wide_steps(plan, tasks, engines)
                scheduler = Scheduler(
                    plan, engines, state_dir=state, records=records.folder, scratch=scratch,
                    keep_going=keep_going, skip=decider.skip if decider is not None else skip,
                    listener=Listeners([journal, listener, TemporarySweeper(plan), records]),
                    retries=retries, checksum=checksum, tasks=tasks, run_id=run_id,
                    stamp=journal.stamp if journal is not None else None,
                    start=decider.start_of if decider is not None else None, **policy,
                )
                interrupts.attach(scheduler)
                return scheduler.run()

            summary = _engines(schedule, executor, cluster or ClusterOptions(), state,
                               scratch, run_id, interrupts, guard, nothing=not to_run)
        remove_stale_temporaries(plan)  # of engines lost on the way, or stopped mid-copy
        for problem in (journal.error if journal is not None else None, summary.trace_error):
            if problem:
                listener.warning(problem)
    return summary


def refuse_wide_steps(plan: nx.DiGraph, tasks: model.Tasks, engines: Executor) -> None:
    """Raise :class:`ThreadsError` when a step needs more threads than the largest machine of
    ``engines`` has engines (:mod:`.slots`); with no engines at all nothing runs anyway."""
    sizes = Slots({e: info.machine for e, info in engines.engines().items()}).sizes()
    largest = max(sizes.values(), default=0)
    needs = []
    for task in tasks.tasks:
        if task.threads > largest:
            for nid in task.execs:
                ex = model.node(plan, nid)
                assert isinstance(ex, model.Exec)
                needs.append((f"{ex.job}/{ex.step}", ex.threads))
    reason = too_wide(needs, sizes)
    if reason is not None:
        raise ThreadsError(reason)


@contextlib.contextmanager
def _journal(state: Path, plan: nx.DiGraph, resume: bool, checksum: bool,
             tasks: model.Tasks) -> Iterator[Journal | None]:
    if not resume:
        yield None
        return
    try:
        journal = Journal.open(state, plan, checksum=checksum, tasks=tasks)
    except OSError as exc:
        raise UsageError(f"cannot open the journal in {state}: {exc.strerror or exc}; choose "
                         f"another state folder with --state") from exc
    with journal:
        yield journal


def _engines(schedule: Callable[[Executor], RunSummary], executor: Executor | None,
             options: ClusterOptions, state: Path, scratch: str | None, run_id: str,
             interrupts: Interrupts, guard: Callable[[Iterable[str]], None] | None, *,
             nothing: bool) -> RunSummary:
    """Schedule on ``executor``, or on the cluster ``options`` describe, or without engines
    when ``nothing`` is to run and the cluster would be started only for this run."""
    if executor is not None:
        if guard is not None:
            guard(info.scratch for info in executor.engines().values())
        return schedule(executor)
    if nothing and options.embedded:  # a cluster named by the user is still reached
        return schedule(LocalExecutor(()))
    # only the embedded start asks `interrupted` between its steps; a launched one (ssh, a batch
    # job) waits in plain Python, where the signal is raised as KeyboardInterrupt and it cleans up
    interrupts.starting = options.embedded and options.launch is None
    with open_cluster(options, state, scratch=scratch, run_id=run_id,
                      interrupted=lambda: interrupts.requested) as started:
        interrupts.starting = False
        try:
            if guard is not None:
                guard(info.scratch for info in started.engines().values())
            return schedule(started)
        finally:
            interrupts.closing = True
