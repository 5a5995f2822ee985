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
       no cluster is started or reached (an :class:`EarlyCluster` already starting is
       cancelled).
    4. Opens the run's records (:class:`~opals_dsl.runtime.history.RunRecords`: the folder
       ``runs/<pipeline>/<N>/`` for its trace, step logs and summary).
    5. Starts or reaches the cluster (:func:`~opals_dsl.runtime.connect.open_cluster`; or takes
       the one an :class:`EarlyCluster` started while the pipeline compiled), lets ``guard``
       look at the engines' scratch roots, refuses a plan with a step that needs more threads
       than the largest machine has engines (:func:`refuse_wide_steps`), and schedules the plan
       (:class:`~opals_dsl.runtime.scheduler.Scheduler`; tasks resumed at a later step start
       there); the journal records every task that finishes, the listener shows progress.

Warnings (a damaged journal, a trace that could not be written) go to the listener's
``warning``; errors that stop the run before anything runs are raised as
:class:`~opals_dsl.errors.OpfError` (a state folder in use, a cluster that cannot be started,
a step too wide for every machine).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import gc
import hashlib
import os
import posixpath
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import EXIT_INTERRUPTED, ThreadsError, UsageError
from ..plan import model
from ..plan.model import Task
from .batch import ENDING, RUN_LOCK
from .cluster import ClusterOptions, stop_leftover_cluster
from .connect import open_cluster
from .events import Listeners, RunListener, RunSummary, new_run_id
from .executor import Executor, LocalExecutor
from .fsatomic import remove_abandoned_temporaries
from .history import RunRecords
from .journal import Journal
from .resume import Force, Resume
from .scheduler import Scheduler
from .slots import Slots, too_wide
from .timeline import NoTimeline, Timeline
from .writers import registered

if TYPE_CHECKING:
    import networkx as nx


def engine_count(to_run: int, widest: int = 1) -> int:
    """The engines of an embedded cluster of no given size: one per core, but never more than
    there are tasks to run (an engine more only costs its start) — unless a task's step needs
    ``widest`` threads, which need as many engines."""
    return max(1, min(os.cpu_count() or 1, max(to_run, widest)))


def destination_folders(plan: nx.DiGraph, tasks: Iterable[Task] | None = None) -> list[str]:
    """The folders the copy-backs of ``tasks`` (default: every task) write into, sorted."""
    root = model.info(plan).root
    if tasks is None:
        folders = model.destination_folders(plan)
    else:
        folders = {posixpath.dirname(dest) for t in tasks if t.copyback in plan.nodes
                   for _, dest in model.node(plan, t.copyback).files}
    return sorted({os.path.join(root, folder) if folder else root for folder in folders})


def remove_stale_temporaries(plan: nx.DiGraph, tasks: Iterable[Task] | None = None, *,
                             folders: Iterable[str] | None = None) -> list[str]:
    """Remove the temporaries that killed copy-backs left in the destination folders of
    ``tasks`` (default: of the whole plan; ``folders``: those folders, if known); return their
    paths. Only temporaries whose writer is provably gone are removed
    (:func:`~opals_dsl.runtime.fsatomic.remove_abandoned_temporaries`): those another run is
    still writing stay."""
    removed = []
    for folder in folders if folders is not None else destination_folders(plan, tasks):
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


#: the state folders whose lock this process holds, and how many times over
_held: dict[Path, int] = {}


@contextlib.contextmanager
def lock_state(state: Path, busy: str = "wait for it to finish, or give this run its own "
                                        "folder with --state (and its own destinations, if the "
                                        "two runs write the same ones)") -> Iterator[None]:
    """Hold ``<state>/run.lock`` for the run; another run on the same folder is refused, the
    message ending with ``busy`` (what to do). The lock may be taken again by this process while
    it holds it (a cluster started early holds it from before the run)."""
    key = state.absolute()
    if _held.get(key):
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    path = state / RUN_LOCK
    try:
        state.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise UsageError(f"cannot use the state folder {state}: "
                          f"{exc.strerror or exc}; choose another with --state") from exc

    def refused(holder: str) -> str:
        return (f"another opf run (process {holder.strip() or '?'}) is using the state folder "
                f"{state}; {busy}")

    with _holding(fd, f"{os.getpid()}\n", refused, wait_while=ENDING):
        _held[key] = 1
        try:
            yield
        finally:
            del _held[key]


@contextlib.contextmanager
def lock_results(root: str, folders: Sequence[str], state: Path,
                 pipeline: str | None = None) -> Iterator[None]:
    """Hold the plan's destination ``folders`` for the run, whatever its state folder, so that
    no other run copies back into any of them meanwhile: it would overwrite this one's results.

    Two locks: ``<pipeline folder>/.opf/results-<hash of the folders>.lock`` (``root``: the
    pipeline folder) refuses the same pipeline with the same params started with a state folder
    of its own, also on another machine that shares the pipeline's folder; the registry of
    this user's runs (:mod:`.writers`) refuses any run on this machine whose folders meet
    these, whatever its pipeline, also through a symbolic link. Either names the first run's
    process and state folder. Where a lock cannot be written, the run goes on without it."""
    if not folders:
        yield
        return

    def clash(other: dict[str, Any], common: list[str]) -> str:
        shown = ", ".join(common[:3]) + (", ..." if len(common) > 3 else "")
        return (f"another opf run (process {other.get('pid', '?')} on {other.get('host', '?')}, "
                f"pipeline {other.get('pipeline', '?')}, state folder {other.get('state', '?')})"
                f" is copying back into the same folder{'s' if len(common) != 1 else ''} "
                f"({shown}): the two would overwrite each other's results; wait for it to "
                f"finish, or give this run other destinations")

    about = {"pipeline": str(pipeline or root), "state": str(state.absolute())}
    with _same_pipeline_lock(root, folders, state), registered(folders, about, clash):
        yield


@contextlib.contextmanager
def _same_pipeline_lock(root: str, folders: Sequence[str], state: Path) -> Iterator[None]:
    digest = hashlib.sha256("\0".join(folders).encode()).hexdigest()[:16]
    path = Path(root) / ".opf" / f"results-{digest}.lock"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        yield
        return

    def refused(holder: str) -> str:
        pid, _, other = holder.partition(" ")
        shown = ", ".join(os.path.relpath(f, root) for f in folders[:3])
        shown += ", ..." if len(folders) > 3 else ""
        return (f"another opf run (process {pid.strip() or '?'}, state folder "
                f"{other.strip() or '?'}) is copying back into the same folders ({shown}): the "
                f"two would overwrite each other's results; wait for it to finish, or give this "
                f"run other destinations")

    with _holding(fd, f"{os.getpid()} {state.absolute()}\n", refused):
        yield


#: seconds a run waits for a lifeline that is stopping what a killed run left
#: (:func:`opals_dsl.runtime.batch.lifeline_main`) before it is refused
LIFELINE_WAIT = 120.0


@contextlib.contextmanager
def _holding(fd: int, mark: str, refused: Callable[[str], str],
             wait_while: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock on the open file ``fd``, writing ``mark`` (who holds it) into
    it, until the block ends; the descriptor is closed then, which lets the lock go. When
    another process holds it, raise :class:`UsageError` with ``refused`` of what that one
    wrote; if what it wrote holds ``wait_while``, wait for it first (up to
    :data:`LIFELINE_WAIT` seconds)."""
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace")
            if not (wait_while and wait_while in holder and _waited_for(fd, holder)):
                raise UsageError(refused(holder)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, mark.encode(), 0)
        yield
    finally:
        os.close(fd)


def _waited_for(fd: int, holder: str) -> bool:
    """Wait until the lock on ``fd`` is free, then hold it (True), saying why; False after
    :data:`LIFELINE_WAIT` seconds."""
    print(f"opf: waiting for process {holder.strip()} in this state folder",
          file=sys.stderr, flush=True)
    deadline = time.monotonic() + LIFELINE_WAIT
    while time.monotonic() < deadline:
        time.sleep(0.1)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
    return False


class Interrupts:
    """SIGINT, SIGTERM and SIGHUP, handled alike.

    While the scheduler runs, the first asks it to stop (it interrupts the running steps and
    waits briefly for them), the next raises KeyboardInterrupt at once. While an embedded
    cluster starts (``starting``) a signal is only noted, and the start, which asks
    ``requested``, stops cleanly by itself: raising inside ipyparallel's event loop would leave
    its tasks behind. While the cluster is being stopped (``closing``) signals are ignored, so
    the stop finishes. SIGHUP means the terminal is gone: standard output and error, if they
    are that terminal, are pointed at ``/dev/null`` before anything more is written. Once a
    run was interrupted, a further signal after the clean-up ends the process at once. A
    signal that is ignored when the run starts (``nohup`` ignores SIGHUP) stays ignored.
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
                # one ignored when the run starts stays ignored: SIGHUP under nohup, SIGINT
                # in a job a shell started in the background
                if signal.getsignal(sig) is not signal.SIG_IGN:
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
    plan: nx.DiGraph, *, state_dir: str | Path, cluster: ClusterOptions | None = None,
    executor: Executor | None = None, scratch: str | None = None, resume: bool = True,
    force: Force = False, checksum: bool = False, keep_going: bool = False,
    retries: int | None = None, listener: RunListener | None = None,
    skip: Callable[[Task], bool] | None = None,
    guard: Callable[[Iterable[str]], None] | None = None, signals: bool = True,
    early: EarlyCluster | None = None, timeline: Timeline | None = None,
    end_after_interrupt: bool = True, **policy: Any,
) -> RunSummary:
    """Run ``plan`` (the module docstring says what happens, in order). Engines: ``executor`` (left
    as it is), else an :class:`EarlyCluster` ``early`` or the cluster ``cluster`` describes
    (default: embedded, :func:`engine_count` engines), started and stopped here. ``resume`` keeps
    the journal in ``state_dir``: unchanged tasks are skipped (``force`` runs all, or the tasks it
    says True of; ``checksum`` compares inputs by content); without it every task runs (or those
    ``skip`` lets run) and nothing is recorded. ``retries`` replaces every job's. ``guard`` gets the
    engines' scratch roots first and raises to stop the run. ``signals``: SIGINT, SIGTERM, SIGHUP
    handled (main thread only); after an interrupt a further signal ends the process, unless
    ``end_after_interrupt`` is False (a kernel: its handlers come back). ``timeline`` gets the
    phases; ``policy`` the scheduler's knobs (``depth``, ``batch_seconds``, ``max_batch``,
    ``engine_wait``, ``interrupt_wait``, ``run_id``)."""
    state, folders = Path(state_dir), destination_folders(plan)
    listener, timeline = listener or RunListener(), timeline or NoTimeline()
    interrupts = Interrupts(end_after=end_after_interrupt)
    about = model.info(plan)
    pipeline = os.path.join(about.root, about.source) if about.source else about.root
    with lock_state(state), lock_results(about.root, folders, state, pipeline), \
            interrupts.installed(signals), contextlib.ExitStack() as stack:
        if executor is None and early is None:  # its engines may still be copying back
            stop_leftover_cluster(state)
        remove_stale_temporaries(plan, folders=folders)
        tasks = model.tasks(plan)
        decided = timeline.now()
        with _journal(state, plan, resume, checksum, tasks) as journal:
            decider = None
            to_run = len(tasks)
            records = stack.enter_context(
                RunRecords(state, plan, total=len(tasks), to_run=to_run, scratch=scratch))
            if journal is not None:
                decider = Resume(journal)
                with records.reasons() as why:  # the scheduler asks it: a byte a task
                    to_run = decider.settle(force, why)
                records.decided(to_run)
                timeline.mark("decide", decided, note="the journal: what is to run")
                for warning in journal.warnings():
                    listener.warning(warning)
                listener.resuming(to_run, len(tasks) - to_run)
            given = policy.pop("run_id", None)
            run_id = early.run_id if early else given or new_run_id()
            stack.enter_context(_summary_if_interrupted(len(tasks), to_run, records))

            def schedule(engines: Executor) -> RunSummary:
                refuse_wide_steps(plan, tasks, engines)
                scheduler = Scheduler(
                    plan, engines, state_dir=state, records=records.folder, scratch=scratch,
                    keep_going=keep_going, skip=decider.skip if decider is not None else skip,
                    listener=Listeners([journal, listener, TemporarySweeper(plan), records]),
                    retries=retries, checksum=checksum, tasks=tasks, run_id=run_id,
                    stamp=journal.stamp if journal is not None else None,
                    start=decider.start_of if decider is not None else None,
                    shared=journal.shared_stat if journal is not None else None, **policy,
                )
                interrupts.attach(scheduler)
                with timeline.phase("run"), long_lived_frozen():
                    return scheduler.run()

            summary = _engines(schedule, executor or early, cluster or ClusterOptions(),
                               state, scratch, run_id, interrupts, guard, to_run=to_run,
                               widest=max((t.threads for t in tasks.tasks), default=1),
                               timeline=timeline)
        remove_stale_temporaries(plan, folders=folders)  # of engines lost, or stopped mid-copy
        for problem in (journal.error if journal is not None else None, summary.trace_error):
            if problem:
                listener.warning(problem)
    return summary


@contextlib.contextmanager
def _summary_if_interrupted(total: int, to_run: int, records: RunRecords) -> Iterator[None]:
    """A run interrupted before its scheduler ran (while the engines started) raises a
    ``KeyboardInterrupt`` that carries a summary too, as one interrupted later does: nothing
    ran."""
    try:
        yield
    except KeyboardInterrupt as stopped:
        if getattr(stopped, "summary", None) is None:
            stopped.summary = RunSummary(  # type: ignore[attr-defined]
                total=total, skipped=total - to_run, not_run=to_run,
                started=records.data["started"], finished=time.time(), interrupted=True,
                records=str(records.folder))
        raise


@contextlib.contextmanager
def long_lived_frozen() -> Iterator[None]:
    """Let the cyclic garbage collector skip what lives through the run (the plan, the tasks,
    the journal) while it runs: each batch leaves a few reference cycles behind (ipyparallel's
    futures), and with a large plan the collector's full passes, which wait until a quarter as
    many objects as survived the last one are new, came too rarely — the cycles piled up, some
    700 bytes a task. Frozen (:func:`gc.freeze`), the plan is not counted, so the cycles are
    collected as they come, and a pass no longer walks the plan. Left alone when the collector
    is off or something else froze objects."""
    if not gc.isenabled() or gc.get_freeze_count():
        yield
        return
    gc.freeze()
    gc.collect()  # walks only what is not frozen: the collector counts from here
    try:
        yield
    finally:
        gc.unfreeze()


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


def _engines(schedule: Callable[[Executor], RunSummary],
             executor: Executor | EarlyCluster | None, options: ClusterOptions, state: Path,
             scratch: str | None, run_id: str, interrupts: Interrupts,
             guard: Callable[[Iterable[str]], None] | None, *, to_run: int, widest: int,
             timeline: Timeline) -> RunSummary:
    """Schedule on ``executor`` (or the cluster an :class:`EarlyCluster` starts), or on the
    cluster ``options`` describe, or without engines when no task is to run: then no cluster
    is started, reached or connected to. An embedded cluster of no given size has one engine
    per core, but never more engines than ``to_run`` tasks (or the ``widest`` step's threads)."""
    nothing = not to_run
    if isinstance(executor, EarlyCluster):
        executor.decided(to_run, widest)
        return _early_engines(schedule, executor, interrupts, guard, nothing=nothing)
    if executor is not None:
        if guard is not None:
            guard(info.scratch for info in executor.engines().values())
        return schedule(executor)
    if nothing:
        return schedule(LocalExecutor(()))
    if options.embedded and options.launch is None and options.engines is None:
        options = dataclasses.replace(options, engines=engine_count(to_run, widest))
    # only the embedded start asks `interrupted` between its steps; a launched one (ssh, a batch
    # job) waits in plain Python, where the signal is raised as KeyboardInterrupt and it cleans up
    interrupts.starting = options.embedded and options.launch is None
    with open_cluster(options, state, scratch=scratch, run_id=run_id,
                      interrupted=lambda: interrupts.requested, timeline=timeline,
                      needed=lambda: max(to_run, widest)) as started:
        interrupts.starting = False
        return _schedule_on(started, schedule, guard, interrupts)


def _schedule_on(started: Executor, schedule: Callable[[Executor], RunSummary],
                 guard: Callable[[Iterable[str]], None] | None,
                 interrupts: Interrupts) -> RunSummary:
    """Let ``guard`` see the engines' scratch roots, then schedule on them; signals are
    ignored from then on, while the cluster stops."""
    try:
        if guard is not None:
            guard(info.scratch for info in started.engines().values())
        return schedule(started)
    finally:
        interrupts.closing = True


def _early_engines(schedule: Callable[[Executor], RunSummary], early: EarlyCluster,
                   interrupts: Interrupts, guard: Callable[[Iterable[str]], None] | None, *,
                   nothing: bool) -> RunSummary:
    """Schedule on the cluster ``early`` is starting, or cancel it when ``nothing`` is to run."""
    early.interrupts = interrupts
    if nothing:
        interrupts.closing = True
        early.cancel()
        return schedule(LocalExecutor(()))
    interrupts.starting = True
    started = early.wait()
    interrupts.starting = False
    try:
        return _schedule_on(started, schedule, guard, interrupts)
    finally:
        early.cancel()


class EarlyCluster:
    """An embedded cluster that starts in a thread of its own while the pipeline compiles and
    the journal decides, then is handed to :func:`run` (``early=``). The lifeline and the
    controller are launched at once; the engines too if their number was given, else once
    :func:`run` knows how many tasks are to run (:func:`engine_count`).

    Used as a context manager around compiling and running: entering holds the state folder's
    lock, stops what a killed run left there, and starts the cluster's thread; leaving cancels
    a start still under way (it stops between two of its steps, see
    :class:`~opals_dsl.runtime.cluster.EmbeddedCluster`) and stops what was started. A state
    folder that entering created is removed again if no run used it (a pipeline that did not
    compile leaves nothing behind). Start it only for a run that has work to do: a run with
    nothing to do cancels it, and the time spent starting was lost.
    """

    def __init__(self, options: ClusterOptions, state_dir: str | Path, *,
                 scratch: str | None = None, timeline: Timeline | None = None) -> None:
        self.options = options
        self.state = Path(state_dir)
        self.scratch = scratch
        self.timeline = timeline or NoTimeline()
        self.run_id = new_run_id()
        #: the run's signal handling, once :func:`run` has taken over
        self.interrupts: Interrupts | None = None
        self.cancelled = False
        self.executor: Executor | None = None
        self.error: BaseException | None = None
        self._opened: Any = None
        self._thread: threading.Thread | None = None
        self._stack = contextlib.ExitStack()
        self._created = False
        self._decided = threading.Event()
        self._to_run, self._widest = 0, 1

    def __enter__(self) -> EarlyCluster:
        self._created = not self.state.exists()
        self._stack.enter_context(lock_state(self.state))
        try:
            stop_leftover_cluster(self.state)  # before anything else looks at the folders
            self._thread = threading.Thread(target=self._start, name="opf-cluster-start",
                                            daemon=True)
            self._thread.start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def _interrupted(self) -> bool:
        return self.cancelled or (self.interrupts is not None and self.interrupts.requested)

    def _start(self) -> None:
        try:
            count = self._count if self.options.engines is None else None
            opened = open_cluster(self.options, self.state, scratch=self.scratch,
                                  run_id=self.run_id, interrupted=self._interrupted,
                                  timeline=self.timeline, count=count, needed=self._needed)
            self.executor = opened.__enter__()
            self._opened = opened
        except BaseException as exc:  # noqa: BLE001 - handed to the thread that waits
            self.error = exc

    def decided(self, to_run: int, widest: int = 1) -> None:
        """The journal's decision: ``to_run`` tasks are to run (engines are started for them,
        and for the ``widest`` step's threads)."""
        self._to_run, self._widest = to_run, widest
        self._decided.set()

    def _needed(self) -> int | None:
        """The engines the run needs at most, if the journal has decided by now."""
        return max(self._to_run, self._widest) if self._decided.is_set() else None

    def _count(self) -> int:
        """How many engines to start: asked by the start once the controller is launched."""
        while not self._decided.wait(0.05):
            if self._interrupted():
                raise KeyboardInterrupt
        if self._interrupted():
            raise KeyboardInterrupt
        return engine_count(self._to_run, self._widest)

    def wait(self) -> Executor:
        """The started cluster's executor, once it is up; raises what the start raised."""
        assert self._thread is not None
        while self._thread.is_alive():
            self._thread.join(0.05)  # in short steps: signals reach the main thread between
        if self.error is not None:
            raise self.error
        assert self.executor is not None
        return self.executor

    def cancel(self) -> None:
        """Stop the start if it is under way, and the cluster if it is up."""
        self.cancelled = True
        if self._thread is not None:
            self._thread.join()
        opened, self._opened = self._opened, None
        if opened is not None:
            opened.__exit__(None, None, None)

    def __exit__(self, *exc: object) -> None:
        try:
            self.cancel()
        finally:
            self._stack.close()
            if self._created and not self._decided.is_set():  # no run used the folder
                shutil.rmtree(self.state, ignore_errors=True)
