"""The run's trace file (``trace.jsonl`` in the state folder): one JSON row per plan node and
attempt, fields :data:`opals_dsl.plan.trace.TRACE_FIELDS`, written as results come in."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


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
