"""Targets: the part of a plan that ``--only JOB[/TASK]`` names.

A target is a job (every task of it) or one task of a job. The selection is those tasks and
every task they wait for, directly or through others, with the machine stages of their jobs —
nothing else. It is a plan of its own, the same shape as the whole one, so everything that reads
a plan (the run, the journal, the drawings, ``--json``) takes it unchanged.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Sequence

import networkx as nx

from ..errors import UsageError
from . import model


def select(graph: nx.DiGraph, targets: Sequence[str]) -> nx.DiGraph:
    """The plan of ``targets`` (``JOB`` or ``JOB/TASK``) and what they need; raises
    :class:`UsageError` for a target that names no job or no task of its job."""
    if isinstance(targets, str):  # one target, not its letters
        targets = [targets]
    every = model.tasks(graph)
    by_job: dict[str, dict[str, model.Task]] = {}
    for task in every.tasks:
        by_job.setdefault(task.job, {})[task.task] = task
    wanted: set[int] = set()
    for target in targets:
        wanted.update(t.order for t in _named(target, by_job, model.info(graph).jobs))
    todo = list(wanted)
    while todo:  # what the targets wait for, directly or through others
        for up in every.upstream[todo.pop()]:
            if up not in wanted:
                wanted.add(up)
                todo.append(up)
    keep: set[str] = set()
    for order in wanted:
        keep.update(every.tasks[order].nodes)
    part = graph.subgraph(keep).copy()
    jobs = {every.tasks[order].job for order in wanted}
    part.graph["jobs"] = [job for job in graph.graph.get("jobs") or [] if job in jobs]
    return part


def targets_of(targets: Sequence[str]) -> Callable[[model.Task], bool]:
    """Whether a task is one of ``targets`` (``JOB``: every task of the job, ``JOB/TASK``)."""
    if isinstance(targets, str):
        targets = [targets]
    jobs = {t for t in targets if "/" not in t}
    tasks = {t for t in targets if "/" in t}
    return lambda task: task.job in jobs or task.name in tasks


def _named(target: str, by_job: dict[str, dict[str, model.Task]],
           jobs: Iterable[str]) -> list[model.Task]:
    job, slash, task = target.partition("/")
    if job not in by_job:
        known = [j for j in jobs if j in by_job]
        raise UsageError(f"--only {target}: the pipeline has no job {job!r}"
                         + _suggest(job, known, "jobs"))
    if not slash:
        return list(by_job[job].values())
    tasks = by_job[job]
    if task not in tasks:
        raise UsageError(f"--only {target}: job {job} has no task {task!r}"
                         + _suggest(task, list(tasks), "tasks"))
    return [tasks[task]]


def _suggest(name: str, known: list[str], what: str) -> str:
    close = difflib.get_close_matches(name, known, n=3)
    if close:
        return "; did you mean " + " or ".join(repr(c) for c in close) + "?"
    shown = ", ".join(known[:8]) + (", ..." if len(known) > 8 else "")
    return f"; its {what}: {shown}" if known else ""


__all__ = ["select"]
