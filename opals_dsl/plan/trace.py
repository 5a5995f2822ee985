"""What a run leaves for later: the trace (one row per plan node and attempt) and the step logs.

The run (:mod:`opals_dsl.runtime.trace`, the engines) writes them into its state folder; the report
(:mod:`opals_dsl.report`) and failure messages read them back. This module is the format both
sides agree on: the trace's fields, where a step's log lies, and how the last lines of a log are
read. Standard library only: engines import it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

#: the fields of a trace row, in the order written; a failed node's row also holds
#: ``returncode`` and ``message``
TRACE_FIELDS = ("node", "kind", "job", "task", "step", "engine", "machine", "start", "end",
                "status", "bytes", "attempt")
#: how many lines of a failed step's log a failure carries
TAIL_LINES = 20
#: the trace's file name in a run's state folder
TRACE_FILE = "trace.jsonl"
#: how much of the end of a log is read for its last lines
_TAIL_BYTES = 64 * 1024


def log_path(logs: str | Path, job: str, task: str, step: str) -> Path:
    """Where the log of ``step`` of task ``job/task`` lies below a run's ``logs`` folder."""
    return Path(logs) / job / task / f"{step}.log"


def read_trace(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """The rows of a trace file, and how many lines could not be read (a killed run's last)."""
    rows: list[dict[str, Any]] = []
    bad = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad += 1
    return rows, bad


def tail(path: str | Path, lines: int) -> list[str]:
    """The last ``lines`` lines of a log (UTF-8, undecodable bytes replaced); [] if it cannot
    be read. Only the end of a long log is read, and its first, probably cut, line dropped."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - _TAIL_BYTES))
            data = f.read()
    except OSError:
        return []
    found = data.decode("utf-8", errors="replace").splitlines()
    if size > _TAIL_BYTES and found:
        found = found[1:]
    return found[-lines:] if lines > 0 else []
