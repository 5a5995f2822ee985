"""The run's trace file (``trace.jsonl`` in the state folder): one JSON row per plan node and
attempt, fields :data:`opals_dsl.plan.trace.TRACE_FIELDS`, written as results come in."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ..plan import model
from ..plan.model import Task
from ..plan.wire import TaskResult


class TraceWriter:
    """Appends one JSON object per plan node to ``path`` (fields: :data:`TRACE_FIELDS`).

    A trace that cannot be written (the state folder's disk is full) does not stop the run:
    writing stops, and ``error`` says why.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._last_flush = time.monotonic()
        self.error: str | None = None

    def write(self, row: dict[str, Any]) -> None:
        if self.error is None:
            try:
                self._file.write(json.dumps(row, separators=(",", ":")) + "\n")
            except OSError as exc:
                self._failed(exc)

    def flush(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.error is None and (force or now - self._last_flush > 1.0):
            try:
                self._file.flush()
            except OSError as exc:
                self._failed(exc)
            self._last_flush = now

    def _failed(self, exc: OSError) -> None:
        self.error = f"cannot write the trace {self.path}: {exc.strerror or exc}"

    def close(self) -> None:
        try:
            self._file.close()
        except OSError as exc:
            if self.error is None:
                self._failed(exc)

    # the rows of a task

    def task_rows(self, ref: Task, attempt: int, engine: int, result: TaskResult,
                  borrowed: tuple[int, ...] = ()) -> None:
        """The rows of a task's nodes as its engine reported them; ``borrowed``: the engines of
        its machine it held besides its own (a step with ``threads``), named in every row."""
        machine = result.machine
        for row in result.trace:
            node = row.node
            extra: dict[str, Any] = {} if row.message is None else {
                "returncode": row.returncode, "message": row.message}
            if row.threads != 1:
                extra["threads"] = row.threads
            if borrowed:
                extra["borrowed"] = list(borrowed)
            self.write({
                "node": node, "kind": row.kind, "job": ref.job,
                "task": None if node == ref.machine_stage else ref.task,
                "step": model.step_of(node), "engine": engine, "machine": machine,
                "start": row.start, "end": row.end, "status": row.status,
                "bytes": row.bytes, "attempt": attempt, **extra,
            })

    def held_row(self, ref: Task, attempt: int, engine: int, machine: str | None,
                 sent: float, until: float, status: str = "lost") -> None:
        """A task its engine held from ``sent`` until ``until`` without answering: the engine
        was lost (``lost``), or the run was interrupted (``interrupted``). One row, on the task
        stage, for the whole time."""
        self.write({
            "node": ref.task_stage, "kind": "stage", "job": ref.job, "task": ref.task,
            "step": None, "engine": engine, "machine": machine,
            "start": sent, "end": until, "status": status, "bytes": 0, "attempt": attempt,
        })

    def unrun_rows(self, ref: Task, status: str, attempt: int, first: int = 1) -> None:
        """A task that did not run (skipped, blocked, not-run): a row per node of its chain
        from ``first`` on (1: the task stage; 2 after a :meth:`held_row`)."""
        for node, kind in ref.kinds()[first:]:
            self.write({
                "node": node, "kind": kind, "job": ref.job,
                "task": ref.task, "step": model.step_of(node), "engine": None, "machine": None,
                "start": None, "end": None, "status": status, "bytes": 0,
                "attempt": attempt,
            })
