"""What a run leaves for later: its records — the trace (one row per plan node and attempt),
the step logs, a summary and the report — one folder per run.

The run (:mod:`opals_dsl.runtime.trace`, :mod:`opals_dsl.runtime.history`, the engines) writes
them into the state folder; the report (:mod:`opals_dsl.report`), ``opf runs`` and failure
messages read them back. This module is the format both sides agree on: where a run's records
lie, the trace's fields, where a step's log lies, and how the last lines of a log are read.
Standard library only: engines import it.

Layout (in the state folder, ``.opf`` beside the pipeline file by default)::

    runs/<pipeline>/<N>/           the records of run N of a pipeline (1, 2, 3, ...)
        run.json                   when it started and ended, its tasks done/skipped/failed,
                                   its status and parameters
        why.jsonl                  why each task it ran was to run, as the journal decided
                                   before the run: {"task": "JOB/TASK", "why": "new input: P"}
        trace.jsonl                one row per plan node and attempt (TRACE_FIELDS)
        logs/<job>/<step>/<task>.log   each step's output, starting with its command line
                                   (a retry's: logs/<job>/<step>/attempt2/<task>.log, ...)
        report.html                its report, once written (opf report, opf run --report)

Pipelines are told apart by their name (``pipeline NAME``, or the file's stem), so two pipelines
sharing one folder never mix their records, and a run that had nothing to do is a run of its own
that leaves the one before as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

#: the fields of a trace row, in the order written; a failed node's row also holds
#: ``returncode`` and ``message``, an exec node's row of a step with more than one thread
#: ``threads``, and every row of a task that held engines of its machine besides its own (for
#: such a step) ``borrowed``, their ids
TRACE_FIELDS = ("node", "kind", "job", "task", "step", "engine", "machine", "start", "end",
                "status", "bytes", "attempt")
#: how many lines of a failed step's log a failure carries
TAIL_LINES = 20
#: the trace's file name in a run's records
TRACE_FILE = "trace.jsonl"
#: the summary's file name in a run's records
RUN_FILE = "run.json"
#: the report's file name in a run's records
REPORT_FILE = "report.html"
#: the file of why each task ran, in a run's records
WHY_FILE = "why.jsonl"
#: the folder of the runs' records in a state folder
RUNS_FOLDER = "runs"
#: how much of the end of a log is read for its last lines
_TAIL_BYTES = 64 * 1024
#: at most this many bytes are read back from a log's end for its last lines
_TAIL_MAX = 4 * 1024 * 1024
#: a log line in a failure report is cut after this many characters
_LINE_CHARS = 500


def safe_name(pipeline: str) -> str:
    """A pipeline's name as one folder or file name."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in pipeline) or "pipeline"


def runs_folder(state: str | Path, pipeline: str) -> Path:
    """The folder of ``pipeline``'s runs in a state folder (``runs/<pipeline>``)."""
    return Path(state) / RUNS_FOLDER / safe_name(pipeline)


def run_numbers(state: str | Path, pipeline: str) -> list[int]:
    """The numbers of the runs of ``pipeline`` recorded in a state folder, in order."""
    try:
        names = os.listdir(runs_folder(state, pipeline))
    except OSError:
        return []
    return sorted(int(n) for n in names if n.isdigit() and n == str(int(n)))


def read_run(folder: str | Path) -> dict[str, Any]:
    """The summary (``run.json``) of the run whose records are in ``folder``; {} if none."""
    try:
        with open(Path(folder) / RUN_FILE, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def log_path(logs: str | Path, job: str, task: str, step: str, attempt: int = 0) -> Path:
    """Where the log of ``step`` of task ``job/task`` lies below a run's ``logs`` folder
    (:func:`step_log` in the job's folder ``logs/<job>``)."""
    return Path(step_log(os.path.join(logs, job), task, step, attempt))


def step_log(job_logs: str, task: str, step: str, attempt: int = 0) -> str:
    """Where the log of ``step`` of ``task`` lies in its job's log folder ``job_logs``: one
    folder per step, one file per task (no folder per task: a run of many small tasks creates
    as few files and folders as it can). A retry (``attempt`` 1 and on) writes to a folder of
    its own in it, ``attempt2/`` and so on, so the failed attempt's log stays."""
    if attempt:
        return os.path.join(job_logs, step, f"attempt{attempt + 1}", f"{task}.log")
    return os.path.join(job_logs, step, f"{task}.log")


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


def read_why(folder: str | Path) -> dict[str, str]:
    """``{task: why it ran}`` from a run's records (:data:`WHY_FILE`); {} for a run without it
    (one that ran without the journal, or by an older opf). Unreadable lines are skipped."""
    why: dict[str, str] = {}
    with contextlib.suppress(OSError):
        with open(Path(folder) / WHY_FILE, encoding="utf-8", errors="replace") as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    row = json.loads(line)
                    if isinstance(row, dict) and isinstance(row.get("task"), str):
                        why[row["task"]] = str(row.get("why"))
    return why


def tail(path: str | Path, lines: int) -> list[str]:
    """The last ``lines`` lines of a log (UTF-8, undecodable bytes replaced); [] if it cannot
    be read. Only the end of a long log is read, back to the start of the first of those lines
    (or :data:`_TAIL_MAX` bytes back, that line then marked as cut). A line longer than
    :data:`_LINE_CHARS` characters is shortened to its start, saying how much was left out."""
    if lines <= 0:
        return []
    try:
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            span = _TAIL_BYTES
            while True:  # twice as far back each time
                start = max(0, end - span)
                f.seek(start)
                data = f.read(end - start)
                if start == 0 or span >= _TAIL_MAX or data.count(b"\n", 0, -1) >= lines:
                    break
                span *= 2
    except OSError:
        return []
    found = data.decode("utf-8", errors="replace").splitlines()
    if start > 0 and found:  # the first line began before what was read
        found[0] = "…" + found[0]
        if len(found) > lines:
            found = found[1:]
    return [_shortened(line) for line in found[-lines:]]


def _shortened(line: str) -> str:
    if len(line) <= _LINE_CHARS:
        return line
    return f"{line[:_LINE_CHARS]} … ({len(line) - _LINE_CHARS:,} more characters)"
