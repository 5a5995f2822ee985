"""What a run tells the world: its events (:class:`RunListener`), the failures it reports
(:class:`TaskFailure`) and its summary (:class:`RunSummary`).

The scheduler and the session send the events; the progress display, the journal and the
clearing of abandoned temporaries listen. Tasks are the plan's (:class:`opals_dsl.plan.model.Task`),
results the engines' (:class:`opals_dsl.plan.wire.TaskResult`).
"""

from __future__ import annotations

import html
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..errors import EXIT_CLUSTER, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK
from ..plan.model import Task
from ..plan.wire import Failure, TaskResult
from ..units import format_bytes, format_duration
from .executor import EngineInfo


def new_run_id() -> str:
    """A fresh id for a run (``OPF_RUN_ID`` of every process the run starts)."""
    return f"{os.getpid()}-{secrets.token_hex(6)}"


@dataclass(slots=True)
class TaskFailure:
    """A task that failed for good (or whose last attempt failed): everything a person needs."""

    job: str
    task: str
    attempt: int
    engine: int | None
    machine: str | None
    node: str | None
    step: str | None
    kind: str
    returncode: int | None
    message: str
    log: str | None
    tail: list[str]
    task_dir: str | None

    @classmethod
    def of(cls, task: Task, attempt: int, engine: int | None, machine: str | None,
           failure: Failure) -> TaskFailure:
        """The failure an engine reported for ``task``, with where it ran."""
        return cls(job=task.job, task=task.task, attempt=attempt, engine=engine,
                   machine=machine, node=failure.node, step=failure.step, kind=failure.kind,
                   returncode=failure.returncode, message=failure.message, log=failure.log,
                   tail=list(failure.tail), task_dir=failure.task_dir)


@dataclass(slots=True)
class RunSummary:
    """What a run did. ``exit_code``: 0 all done or skipped, 1 a task failed or the run was
    stopped, 3 no engine left, 130 interrupted (SIGINT, SIGTERM, SIGHUP)."""

    total: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0
    blocked: int = 0
    not_run: int = 0
    #: of ``not_run``: the tasks an engine held when the run was interrupted (their order in
    #: the plan)
    stopped_tasks: list[int] = field(default_factory=list)
    retried: int = 0
    resubmitted: int = 0  # tasks moved off a lost engine
    #: failed task name -> names of the tasks left out because of it (``keep_going``), with
    #: the nearest of those an earlier failure had left out already
    blocked_by: dict[str, list[str]] = field(default_factory=dict)
    engines_lost: int = 0
    bytes_staged: int = 0
    bytes_copied: int = 0
    started: float = 0.0
    finished: float = 0.0
    interrupted: bool = False
    no_engines: bool = False
    failures: list[TaskFailure] = field(default_factory=list)
    trace: str | None = None
    #: the folder of the run's records (trace, logs, summary, report)
    records: str | None = None
    trace_error: str | None = None  # the trace could not be written

    @property
    def wall(self) -> float:
        return max(0.0, self.finished - self.started)

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        if self.no_engines:
            return EXIT_CLUSTER
        if self.failed or self.blocked or self.not_run:
            return EXIT_FAILED
        return EXIT_OK

    def rows(self) -> list[tuple[str, str]]:
        """The summary as (label, value) pairs, in the order a person reads them."""
        rows = [("tasks", str(self.total)), ("run", str(self.done)),
                ("skipped", str(self.skipped)), ("failed", str(self.failed))]
        if self.blocked:
            rows.append(("not run (upstream failed)", str(self.blocked)))
        if self.not_run:
            held = len(self.stopped_tasks)
            rows.append(("not finished (run stopped)", str(self.not_run) + (
                f" ({held} of them on engines)" if held else "")))
        rows.append(("retried", str(self.retried)))
        if self.engines_lost:
            moved = f"{self.resubmitted} task{'' if self.resubmitted == 1 else 's'} moved"
            rows.append(("engines lost", f"{self.engines_lost} ({moved})"))
        rows += [("wall time", format_duration(self.wall)),
                 ("staged", format_bytes(self.bytes_staged)),
                 ("copied back", format_bytes(self.bytes_copied))]
        if self.trace:
            rows.append(("trace", self.trace))
        return rows

    def __str__(self) -> str:
        width = max(len(label) for label, _ in self.rows())
        return "\n".join(f"{label:<{width}}  {value}" for label, value in self.rows())

    def _repr_html_(self) -> str:
        """The summary as a table, as a notebook shows it."""
        cells = "".join(f"<tr><th style='text-align:left'>{html.escape(label)}</th>"
                        f"<td style='text-align:left'>{html.escape(value)}</td></tr>"
                        for label, value in self.rows())
        return f"<table>{cells}</table>"


@dataclass(frozen=True, slots=True)
class Counts:
    """A snapshot of the run for a progress display."""

    total: int
    done: int
    skipped: int
    failed: int
    running: int  # handed to engines: running there, or queued behind the task that runs
    engines: int
    engines_busy: int


class RunListener:
    """Receives the run's events; every method does nothing by default."""

    def warning(self, message: str) -> None:
        """Something a person should know that does not stop the run."""

    def resuming(self, to_run: int, unchanged: int) -> None:
        """Before the run: how many tasks the journal found unchanged."""

    def run_started(self, total: int, engines: Mapping[int, EngineInfo]) -> None:
        pass

    def counts_changed(self, counts: Counts) -> None:
        pass

    def tasks_submitted(self, tasks: list[Task], engine: int) -> None:
        pass

    def task_done(self, task: Task, result: TaskResult, engine: int) -> None:
        pass

    def task_skipped(self, task: Task) -> None:
        pass

    def task_retrying(self, task: Task, failure: TaskFailure) -> None:
        pass

    def task_failed(self, task: Task, failure: TaskFailure) -> None:
        pass

    def engine_added(self, engine: EngineInfo) -> None:
        pass

    def engine_lost(self, engine: int, tasks: list[Task]) -> None:
        pass

    def engine_discarded(self, engine: int, note: str) -> None:
        """A lost engine was made to stop (``note`` says how)."""

    def stopping(self, reason: str) -> None:
        pass

    def checkpoint(self) -> None:
        pass

    def run_finished(self, summary: RunSummary) -> None:
        pass


class Listeners(RunListener):
    """Passes every event on to several listeners, in order."""

    def __init__(self, listeners: Iterable[RunListener | None]) -> None:
        self.all = [x for x in listeners if x is not None]

    def warning(self, message: str) -> None:
        for x in self.all:
            x.warning(message)

    def resuming(self, to_run: int, unchanged: int) -> None:
        for x in self.all:
            x.resuming(to_run, unchanged)

    def run_started(self, total: int, engines: Mapping[int, EngineInfo]) -> None:
        for x in self.all:
            x.run_started(total, engines)

    def counts_changed(self, counts: Counts) -> None:
        for x in self.all:
            x.counts_changed(counts)

    def tasks_submitted(self, tasks: list[Task], engine: int) -> None:
        for x in self.all:
            x.tasks_submitted(tasks, engine)

    def task_done(self, task: Task, result: TaskResult, engine: int) -> None:
        for x in self.all:
            x.task_done(task, result, engine)

    def task_skipped(self, task: Task) -> None:
        for x in self.all:
            x.task_skipped(task)

    def task_retrying(self, task: Task, failure: TaskFailure) -> None:
        for x in self.all:
            x.task_retrying(task, failure)

    def task_failed(self, task: Task, failure: TaskFailure) -> None:
        for x in self.all:
            x.task_failed(task, failure)

    def engine_added(self, engine: EngineInfo) -> None:
        for x in self.all:
            x.engine_added(engine)

    def engine_lost(self, engine: int, tasks: list[Task]) -> None:
        for x in self.all:
            x.engine_lost(engine, tasks)

    def engine_discarded(self, engine: int, note: str) -> None:
        for x in self.all:
            x.engine_discarded(engine, note)

    def stopping(self, reason: str) -> None:
        for x in self.all:
            x.stopping(reason)

    def checkpoint(self) -> None:
        for x in self.all:
            x.checkpoint()

    def run_finished(self, summary: RunSummary) -> None:
        for x in self.all:
            x.run_finished(summary)
