"""What a person sees while ``opf run`` works: progress, failures, and a summary at the end.

In: the scheduler's events (:class:`Progress` is an :class:`opals_dsl.runtime.events.RunListener`).
Out: text — what happens while the run works (progress, retries, engines, failures) on one
stream, standard error by default, and the summary at the end, the run's result, on another,
standard output by default (``opf``'s rule: results on stdout, progress and diagnostics on
stderr). Given only ``stream``, both go there.

* On a terminal: a live bar with tasks done / on engines / failed / total and the engines busy,
  and a summary table at the end (rich).
* Elsewhere (a log file, CI): plain lines — one per finished task for small runs, and for runs
  of more than ``line_limit`` tasks a status line at most every ``interval`` seconds — and the
  summary as plain lines.
* ``quiet``: only failures and warnings.

A task that fails for good is always reported in full: the task, the step and node, the exit
status, the last lines of the step's log (control characters shown as ``\\xNN``, never sent to
the terminal: :func:`printable`), where the whole log is and the task folder that was kept for
inspection, if one was. Counts agree in number ("1 task", "2 tasks": :func:`count`). When the
stream fails (the terminal went away), the run goes on without output. A retry or a lost
engine gets one line. The summary names, for each failure, the tasks left out because of it
(``--keep-going``).

:func:`decision_lines` renders what a run would do with each task (``opf run --dry-run``).
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

from ..plan.model import Task
from ..plan.wire import TaskResult
from ..units import format_duration
from .events import Counts, RunListener, RunSummary, TaskFailure
from .executor import EngineInfo
from .resume import Decision

#: lines of a failed step's log shown in a failure report
TAIL_SHOWN = 10
#: tasks named in each list of the summary's "not run because ... failed" lines
BLOCKED_SHOWN = 5


def _isatty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (OSError, ValueError):  # a closed stream
        return False


def count(n: int, word: str, plural: str | None = None) -> str:
    """``count(1, "task")`` → ``"1 task"``, ``count(2, "task")`` → ``"2 tasks"``."""
    return f"{n} {word if n == 1 else (plural or word + 's')}"


_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x00, 0x20), *range(0x7f, 0xa0)] if c != 0x09}


def printable(text: str) -> str:
    """``text`` with control characters (terminal escape codes, carriage returns, bells ...)
    shown as ``\\xNN`` instead of acted on; tabs are kept. For what steps wrote."""
    return text.translate(_CONTROL)


def _phase_words(node: str | None) -> str:
    """What a task was doing at ``node`` (not a step), in words: ``stage:dem`` → staging the
    job's shared files, ``stage:dem/a`` → staging its inputs, ``copyback:dem/a`` → copying
    its results back."""
    kind, _, rest = (node or "").partition(":")
    if kind == "stage":
        return "staging its inputs" if "/" in rest else "staging the job's shared files"
    if kind == "copyback":
        return "copying its results back"
    return node or "the task"


def failure_report(task: Task, failure: TaskFailure) -> str:
    """A task's failure, for a person: what failed, how, the log's tail, where to look."""
    where = f"step {failure.step}" if failure.step else _phase_words(failure.node)
    attempts = failure.attempt + 1
    tries = f" after {attempts} attempts" if attempts > 1 else ""
    lines = [f"FAILED {task.name}: {where}{tries}"]
    lines.append(f"  {printable(failure.message)}")  # an exit status is told here
    if failure.engine is not None:
        machine = f" ({failure.machine})" if failure.machine else ""
        lines.append(f"  engine: {failure.engine}{machine}")
    tail = [line for line in failure.tail if line.strip()][-TAIL_SHOWN:]
    if tail:
        lines.append("  last lines of the log:")
        lines.extend(f"    | {printable(line)}" for line in tail)
    if failure.log:
        lines.append(f"  full log: {failure.log}")
    if failure.task_dir:
        lines.append(f"  task folder kept: {failure.task_dir}")
    return "\n".join(lines)


def kept_line(kept: int, source: str | None) -> str:
    """What to do about the task folders kept after failures: their staged inputs fill the
    engines' scratch until removed."""
    clean = (f"'opf clean {shlex.quote(source) if source else 'FILE'} --scratch-folder' "
             f"removes {'it' if kept == 1 else 'them'} on this machine, with the pipeline's job "
             f"folders there and the records of all but its last runs")
    if kept == 1:
        return (f"kept the failed task's folder on its engine's scratch, with the inputs it "
                f"staged, for a look: the task's next run replaces it; {clean}")
    return (f"kept the folders of {kept} failed tasks on the engines' scratch, with the inputs "
            f"they staged, for a look: a task's next run replaces its folder; {clean}")


def blocked_lines(summary: RunSummary) -> list[str]:
    """The tasks that were not run because tasks they need failed, one line for each set of
    failed tasks: ``not run because dem/a and dem/b failed: mosaic/0``."""
    causes: dict[str, list[str]] = {}
    for failed, blocked in summary.blocked_by.items():
        for name in blocked:
            causes.setdefault(name, []).append(failed)
    groups: dict[tuple[str, ...], list[str]] = {}
    for name, failed in causes.items():
        groups.setdefault(tuple(failed), []).append(name)
    return [f"not run because {_some(list(failed), ' and ')} failed: {_some(names, ', ')}"
            for failed, names in groups.items()]


def _some(names: list[str], last: str) -> str:
    """``names`` joined, the last two by ``last`` (``a, b and c``); beyond
    :data:`BLOCKED_SHOWN` of them, how many more (``a, b, c, d, e and 3 more``)."""
    if len(names) > BLOCKED_SHOWN:
        return ", ".join(names[:BLOCKED_SHOWN]) + f" and {len(names) - BLOCKED_SHOWN} more"
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + last + names[-1]


def decision_lines(title: str, decisions: list[Decision]) -> list[str]:
    """What a run would do with each task, in plan order, and a count at the end."""
    width = min(40, max((len(d.task.name) for d in decisions), default=0))
    lines = [f"{'run ' if d.run else 'skip'}  {d.task.name:<{width}}  {d.reason}"
             for d in decisions]
    runs = sum(1 for d in decisions if d.run)
    total = len(decisions)
    lines.append(f"{title}: {runs} of {count(total, 'task')} would run, "
                 f"{total - runs} unchanged")
    return lines


def outcome_line(summary: RunSummary) -> str:
    if summary.no_engines:
        return "stopped: no engine is left"
    if summary.interrupted:
        return "interrupted"
    if summary.failed:
        return f"{count(summary.failed, 'task')} failed"
    if summary.not_run or summary.blocked:
        return "stopped"
    if summary.total and not summary.done:
        return "all tasks unchanged, none run"
    return "all tasks done"


class Progress(RunListener):
    """Shows a run on ``stream``; see the module docstring for the three modes."""

    def __init__(self, *, stream: TextIO | None = None, quiet: bool = False,
                 interactive: bool | None = None, title: str = "opf run",
                 line_limit: int = 100, interval: float = 5.0,
                 result_stream: TextIO | None = None, source: str | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.source = source  # the pipeline file, as the user named it (for hints)
        self._kept = 0  # how many task folders were kept after failures
        if result_stream is None:
            result_stream = stream if stream is not None else sys.stdout
        self.result_stream = result_stream
        self.quiet = quiet
        results_interactive = interactive
        if interactive is None:
            interactive = _isatty(self.stream)
        if result_stream is not self.stream or results_interactive is None:
            results_interactive = _isatty(result_stream)
        self.interactive = interactive and not quiet
        self._table = results_interactive and not quiet
        self.title = title
        self.line_limit = line_limit
        self.interval = interval
        self.total = 0
        self._per_task = True
        self._last_status: float | None = None
        self._counts: Counts | None = None
        self._bar: Any = None
        self._bar_task: Any = None
        self._console: Any = None
        self._nothing_to_run = False
        self._gone = False
        self._result_console: Any = None
        if self.interactive or self._table:
            from rich.console import Console

            if self.interactive:
                self._console = Console(file=self.stream, highlight=False)
            if self._table:
                self._result_console = (self._console if result_stream is self.stream
                                        and self._console is not None
                                        else Console(file=result_stream, highlight=False))

    # -- output ----------------------------------------------------------------------------

    def _say(self, text: str, result: bool = False) -> None:
        if self._gone:
            return
        console = self._result_console if result else self._console
        stream = self.result_stream if result else self.stream
        try:
            if console is not None:
                console.print(text, markup=False, highlight=False, soft_wrap=True)
            else:
                stream.write(text + "\n")
                stream.flush()
        except OSError:  # the terminal went away (a dropped ssh session): the run goes on
            self._gone = True

    # -- events ----------------------------------------------------------------------------

    def warning(self, message: str) -> None:
        self._say(f"opf: warning: {printable(message)}")  # quiet or not

    def resuming(self, to_run: int, unchanged: int) -> None:
        """Before the run: how many tasks the journal found unchanged."""
        self._nothing_to_run = to_run == 0
        if self.quiet or not unchanged:
            return
        total = to_run + unchanged
        if to_run:
            self._say(f"{self.title}: {unchanged} of {count(total, 'task')} unchanged since the "
                      f"last run; {to_run} to run")
        elif total == 1:
            self._say(f"{self.title}: its task is unchanged since the last run; nothing to run "
                      f"(--force runs it again)")
        else:
            self._say(f"{self.title}: all {total} tasks unchanged since the last run; nothing "
                      f"to run (--force runs them again)")

    def run_started(self, total: int, engines: Mapping[int, EngineInfo]) -> None:
        self.total = total
        self._per_task = total <= self.line_limit
        machines = len({e.machine for e in engines.values()})
        if self.quiet or (self._nothing_to_run and not engines):
            return
        self._say(f"{self.title}: {count(total, 'task')} on {count(len(engines), 'engine')} "
                  f"({count(machines, 'machine')})")
        if self.interactive:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(
                TextColumn("{task.description}"), BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                console=self._console, transient=True,
            )
            self._bar_task = self._bar.add_task("tasks", total=total, status="")
            self._bar.start()

    def counts_changed(self, counts: Counts) -> None:
        self._counts = counts
        if self._bar is not None:
            status = (f"on engines {counts.running}, failed {counts.failed}, "
                      f"engines busy {counts.engines_busy}/{counts.engines}")
            self._bar.update(self._bar_task, completed=counts.done + counts.skipped,
                             status=status)
        elif not self.quiet and not self._per_task:
            now = time.monotonic()
            if self._last_status is None or now - self._last_status >= self.interval:
                self._last_status = now
                self._say(f"{counts.done + counts.skipped}/{counts.total} finished, "
                          f"{counts.running} on engines, {counts.failed} failed, engines busy "
                          f"{counts.engines_busy}/{counts.engines}")

    def task_done(self, task: Task, result: TaskResult, engine: int) -> None:
        if self.quiet or self.interactive or not self._per_task:
            return
        span = result.span
        took = f" in {format_duration(span)}" if span is not None else ""
        self._say(f"done {task.name} on engine {engine}{took}")

    def task_skipped(self, task: Task) -> None:
        if self.quiet or self.interactive or not self._per_task or self._nothing_to_run:
            return
        self._say(f"skipped {task.name} (unchanged)")

    def task_retrying(self, task: Task, failure: TaskFailure) -> None:
        if self.quiet:
            return
        self._say(f"retrying {task.name} (attempt {failure.attempt + 2} of "
                  f"{task.retries + 1}): {printable(failure.message)}")

    def task_failed(self, task: Task, failure: TaskFailure) -> None:
        self._say(failure_report(task, failure))
        if failure.task_dir:
            self._kept += 1

    def engine_added(self, engine: EngineInfo) -> None:
        if not self.quiet:
            self._say(f"engine {engine.id} joined ({engine.machine})")

    def engine_lost(self, engine: int, tasks: list[Task]) -> None:
        if self.quiet:
            return
        moved = (f"; {count(len(tasks), 'task')} {'goes' if len(tasks) == 1 else 'go'} to "
                 f"other engines") if tasks else ""
        self._say(f"engine {engine} was lost{moved}")

    def engine_discarded(self, engine: int, note: str) -> None:
        if not self.quiet:
            self._say(f"engine {engine}: {note}")

    def stopping(self, reason: str) -> None:
        if self.quiet:
            return
        if reason == "interrupted":
            self._say("interrupted: stopping the running tasks")
        else:
            self._say(f"stopping: {reason}; no more tasks are handed out; those already on "
                      f"engines finish")

    def run_finished(self, summary: RunSummary) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if not self.quiet:
            self._summary(summary)
        if self._kept:  # with the failures (on the progress stream), when quiet too
            self._say(kept_line(self._kept, self.source))

    def _summary(self, summary: RunSummary) -> None:
        outcome = outcome_line(summary)
        rows = summary.rows()
        if self._result_console is not None:
            from rich.table import Table

            table = Table(title=f"{self.title}: {outcome}", show_header=False,
                          title_justify="left")
            table.add_column(style="bold")
            table.add_column()
            for label, value in rows:
                table.add_row(label, value)
            try:
                self._result_console.print(table)
            except OSError:
                self._gone = True
        else:
            self._say(f"{self.title}: {outcome}", result=True)
            width = max(len(label) for label, _ in rows)
            for label, value in rows:
                self._say(f"  {label:<{width}}  {value}", result=True)
        for line in blocked_lines(summary):
            self._say(line, result=True)
