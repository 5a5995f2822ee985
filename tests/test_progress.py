"""Tests of opals_dsl.progress: what a person reads — failure reports that never pass a step's
terminal control codes on, and counts in good English ("1 task", "2 tasks")."""

from __future__ import annotations

import io

from opals_dsl.plan.model import Task
from opals_dsl.runtime.events import Counts, RunSummary, TaskFailure
from opals_dsl.runtime.executor import EngineInfo
from opals_dsl.runtime.progress import (
    Progress,
    blocked_lines,
    count,
    failure_report,
    printable,
)

TASK = Task(order=0, job="dem", task="s1", index=0, retries=0, steps=("grid",))


def failure(**changes) -> TaskFailure:
    fields = dict(job="dem", task="s1", attempt=0, engine=0, machine="vm:/tmp",
                  node="exec:dem/s1/grid", step="grid", kind="exit", returncode=1,
                  message="step grid exited with status 1", log="/state/logs/dem/grid/s1.log",
                  tail=[], task_dir=None)
    fields.update(changes)
    return TaskFailure(**fields)


def test_printable_shows_control_characters_and_keeps_tabs():
    """Invariant: no character of the result is a control character, other than tab."""
    text = "a\x1b[31mred\x1b[0m\tb\rc\x07\x08\x9b2J\x7f é"
    shown = printable(text)
    assert shown == "a\\x1b[31mred\\x1b[0m\tb\\x0dc\\x07\\x08\\x9b2J\\x7f é"
    assert all(c == "\t" or (ord(c) >= 0x20 and not 0x7f <= ord(c) < 0xa0) for c in shown)


def test_a_failure_report_never_passes_escape_codes_to_the_terminal():
    report = failure_report(TASK, failure(
        tail=["normal line", "\x1b[2J\x1b[Hcleared your screen", "bell\x07", "tab\there"],
        message="step grid raised ValueError: \x1b]0;title\x07"))
    assert "\x1b" not in report and "\x07" not in report
    assert "    | \\x1b[2J\\x1b[Hcleared your screen" in report
    assert "    | tab\there" in report
    assert "step grid raised ValueError: \\x1b]0;title\\x07" in report


def test_the_task_folder_is_named_only_when_it_was_kept():
    assert "task folder kept" not in failure_report(TASK, failure(task_dir=None))
    assert "  task folder kept: /scratch/opf/p/dem/s1" in failure_report(
        TASK, failure(task_dir="/scratch/opf/p/dem/s1"))


def test_a_failure_outside_a_step_says_what_the_task_was_doing():
    """The heading names the phase in words, not the plan's node id."""
    def heading(node: str) -> str:
        return failure_report(TASK, failure(node=node, step=None)).splitlines()[0]

    assert heading("stage:dem") == "FAILED dem/s1: staging the job's shared files"
    assert heading("stage:dem/s1") == "FAILED dem/s1: staging its inputs"
    assert heading("copyback:dem/s1") == "FAILED dem/s1: copying its results back"
    assert heading("exec:dem/s1/grid").startswith("FAILED dem/s1: exec:dem/s1/grid")


def test_tasks_left_out_by_several_failures_name_them_all():
    """A task that needs several failed tasks names each of them; tasks left out by the same
    failures share a line."""
    summary = RunSummary(blocked_by={
        "dem/a": ["mosaic/0", "report/0", "hill/a"],
        "dem/b": ["mosaic/0", "report/0"],
        "dem/c": [f"x/{i}" for i in range(7)],
    })
    assert blocked_lines(summary) == [
        "not run because dem/a and dem/b failed: mosaic/0, report/0",
        "not run because dem/a failed: hill/a",
        "not run because dem/c failed: x/0, x/1, x/2, x/3, x/4 and 2 more",
    ]
    many = RunSummary(blocked_by={f"dem/{i}": ["mosaic/0"] for i in range(7)})
    assert blocked_lines(many) == [
        "not run because dem/0, dem/1, dem/2, dem/3, dem/4 and 2 more failed: mosaic/0"]


def test_counts_are_singular_and_plural():
    assert (count(0, "task"), count(1, "task"), count(2, "task")) == ("0 tasks", "1 task",
                                                                      "2 tasks")
    one = dict(RunSummary(total=1, engines_lost=1, resubmitted=1).rows())
    assert one["engines lost"] == "1 (1 task moved)"
    two = dict(RunSummary(total=3, engines_lost=2, resubmitted=3).rows())
    assert two["engines lost"] == "2 (3 tasks moved)"


def progress_lines(events) -> list[str]:
    stream = io.StringIO()
    progress = Progress(stream=stream, interactive=False, title="p")
    events(progress)
    return stream.getvalue().splitlines()


def test_progress_lines_agree_in_number():
    engine = EngineInfo(0, "vm", 1, "/tmp", "vm:/tmp")
    lines = progress_lines(lambda p: (
        p.run_started(1, {0: engine}),
        p.engine_lost(0, [TASK]),
        p.engine_lost(1, [TASK, TASK]),
        p.engine_discarded(2, "its process 7 on this machine was stopped; it was killed"),
    ))
    assert lines == [
        "p: 1 task on 1 engine (1 machine)",
        "engine 0 was lost; 1 task goes to other engines",
        "engine 1 was lost; 2 tasks go to other engines",
        "engine 2: its process 7 on this machine was stopped; it was killed",
    ]
    assert progress_lines(lambda p: p.resuming(0, 1)) == [
        "p: its task is unchanged since the last run; nothing to run (--force runs it again)"]
    assert progress_lines(lambda p: p.resuming(1, 1)) == [
        "p: 1 of 2 tasks unchanged since the last run; 1 to run"]


def test_the_status_line_says_tasks_on_engines_not_running():
    """With more tasks handed to engines than engines, the count is of tasks on engines
    (running or queued there), and the line says so."""
    engines = {i: EngineInfo(i, "vm", i, "/tmp", "vm:/tmp") for i in range(2)}
    counts = Counts(total=300, done=10, skipped=0, failed=1, running=12, engines=2,
                    engines_busy=2)

    def events(p: Progress) -> None:
        p.run_started(300, engines)
        p.counts_changed(counts)

    assert progress_lines(events)[-1] == (
        "10/300 finished, 12 on engines, 1 failed, engines busy 2/2")
