"""The journal's line format: one JSON object per line, ``{"task":NAME,"sig":SIG,...}``, written
so that a task's name and sig can be read without parsing the rest (a journal of 100,000 tasks
is loaded as text and parsed only where a decision needs a record).

The file
    JSON lines, appended to. The first line is ``{"opf-journal": 1, "pipeline": NAME}``; then one
    line per task that finished, written only after the engine reported every output of the task
    in place (each one already flushed to disk and renamed into place)::

        {"task": "dem/strip11", "sig": "…", "dests": "…", "cmd": "…", "base": "…",
         "steps": [...], "params": {...}, "in": {...}, "up": {...}, "out": {...},
         "time": 1712000000.5}

    ``task``
        ``JOB/TASK``.
    ``sig``
        16 hex digits naming this run of the task: a task that runs again gets a new one.
    ``dests``
        16 hex digits naming the task's destination set (a hash of its destinations, sorted):
        the journal keeps the last record of each task *and destination set*.
    ``cmd``
        a hash of everything the task is told to do: each step's argv or call (function and
        arguments), its declared outputs, the names its inputs get in the task and job folders,
        and the copy-back pairs.
    ``steps``
        ``[[STEP, ARGV or {"function": ..., "kwargs": ...}], ...]``: the resolved commands and
        call parameters, kept to say *what* changed.
    ``base``
        a hash of everything in ``cmd`` but the steps' commands (the steps' names and declared
        outputs, the staged files, the copy-back pairs, the job's shared files): where only
        commands changed, a task can run again from the first step whose command changed.
    ``params``
        the pipeline's parameters the task ran with, to say which one changed.
    ``in``
        ``{PATH: [size, mtime_ns]}`` (plus the SHA-256 with ``--checksum``) for every file the
        task stages that no upstream task publishes — its inputs and the job's shared files — as
        the engine saw them when it copied them, and for the Python file of each ``call`` that
        lies in the pipeline's folder (``pkg/mod.py`` for ``pkg.mod:fn``), so that changed code
        counts as a changed input. Paths are the plan's (relative to the pipeline's folder, or
        absolute).
    ``up``
        ``{UPSTREAM TASK: its sig}`` for every upstream task whose published outputs the task
        stages: such an input is "unchanged" exactly when its upstream task did not run again.
    ``out``
        ``{DESTINATION: [size, mtime_ns]}`` of each destination once in place.

    A task that failed for good gets ``{"task": ..., "sig": "0000000000000000", "dests": ...,
    "failed": true, "time": ...}``; one that an engine held when the run was interrupted (and
    that had no record of a finished run) gets ``"interrupted": true`` instead. The last line of
    a task and destination set is the one that counts; a line without ``dests`` (written by an
    older opf) stands for the task's destinations now. A line that is cut off or garbled (a run
    killed while writing, a machine that lost power) is ignored, so that task just runs again;
    so is a record whose fields do not have the types written here (the file edited by hand, or
    damaged on its disk). Those, except a line cut off at the end of the file (the usual trace
    of a kill), are reported by :meth:`Journal.warnings`. When the file is opened for a run it
    is compacted if more than half of its lines are stale or any is unreadable:
    written afresh under a temporary name and renamed.
"""

from __future__ import annotations

import contextlib
import json
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..plan.wire import Stat

#: one encoder, made once: json.dumps with options builds a new encoder every call
ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

SIG_MARK = ',"sig":"'
DESTS_MARK = ',"dests":"'
#: the length of a sig and of a destination set's key, in hex digits
KEY_LEN = 16


def record_line(name: str, sig: str, body: str, dests: str | None = None) -> str:
    """``{"task":NAME,"sig":SIG,"dests":KEY,`` + the rest of ``body`` (a JSON object) +
    newline; ``dests`` names the task's destination set (:func:`dests_of`)."""
    head = '{"task":' + ENCODE(name) + SIG_MARK + sig + '"'
    if dests is not None:
        head += DESTS_MARK + dests + '"'
    return head + ("," + body[1:] if body != "{}" else "}") + "\n"


def dests_of(line: str) -> str | None:
    """The destination set's key of a record line; None for a line written without one (by an
    older opf), which stands for whichever set the task has now."""
    at = line.find(SIG_MARK)
    if at < 0:
        return None
    at += len(SIG_MARK) + KEY_LEN + 1
    if not line.startswith(DESTS_MARK, at):
        return None
    at += len(DESTS_MARK)
    return line[at:at + KEY_LEN]


def name_of(text: str) -> str | None:
    """The task name of a complete record line, or None for a line that is not one."""
    text = text.rstrip("\r\n")
    if not (text.startswith('{"task":') and text.endswith("}")):
        return None
    at = text.find(SIG_MARK)
    if at < 0 or len(text) < at + len(SIG_MARK) + 17:
        return None
    quoted = text[8:at]
    if "\\" in quoted:
        try:
            name = json.loads(quoted)
        except (ValueError, RecursionError):
            return None
    else:
        name = quoted[1:-1] if len(quoted) >= 2 and quoted[0] == quoted[-1] == '"' else None
    return name if isinstance(name, str) else None


def well_formed(rec: Any) -> bool:
    """Has a parsed record the fields, of the types, that :meth:`Journal._compare` reads?"""
    if not isinstance(rec, dict):
        return False
    if rec.get("failed") or rec.get("interrupted"):
        return True
    steps = rec.get("steps")
    if not isinstance(rec.get("cmd"), str) or not isinstance(steps, list):
        return False
    if not all(isinstance(s, list) and s and isinstance(s[0], str) for s in steps):
        return False
    for key in ("in", "up", "out"):
        part = rec.get(key, {})
        if not isinstance(part, dict):
            return False
    return all(isinstance(v, list) for key in ("in", "out") for v in rec.get(key, {}).values())


def record_body(line: str) -> str:
    """The record as a JSON object without its task and sig (for ``json.loads``)."""
    at = line.find(SIG_MARK)
    rest = line[at + len(SIG_MARK) + 17:].rstrip("\r\n")
    return "{" + rest[1:] if rest.startswith(",") else "{" + rest


def time_of(line: str) -> float:
    """A record's ``time`` (0 when it has none): the last field a record is written with, so it
    is read from the line's end; a line written otherwise is parsed."""
    at = line.rfind(',"time":')
    rest = line[at + 8:].rstrip("\r\n")
    if at >= 0 and rest.endswith("}") and rest.count("}") == 1:
        with contextlib.suppress(ValueError):
            return float(rest[:-1])
    try:
        value = json.loads(record_body(line)).get("time")
        return float(value or 0)
    except (ValueError, TypeError, AttributeError, RecursionError):
        return 0.0


class Written:
    """The sig and time of the record each task got in this run, by plan order: 17 bytes a task
    however long the run, where the record lines themselves (some 300 bytes each) are only in
    the file. A sig that is not 16 hex digits is not taken (:meth:`note` says False)."""

    def __init__(self, n: int) -> None:
        self._sigs = array("Q", bytes(8 * n))
        self._times = array("d", bytes(8 * n))
        self._has = bytearray(n)
        self.count = 0

    def note(self, i: int, line: str) -> bool:
        at = line.find(SIG_MARK) + len(SIG_MARK)
        try:
            sig = int(line[at:at + KEY_LEN], 16) if at >= len(SIG_MARK) else -1
        except ValueError:
            return False
        if not 0 <= sig < 1 << 64 or line[at + KEY_LEN:at + KEY_LEN + 1] != '"':
            return False
        self._sigs[i], self._times[i] = sig, time_of(line)
        if not self._has[i]:
            self._has[i] = 1
            self.count += 1
        return True

    def __contains__(self, i: int) -> bool:
        return bool(self._has[i])

    def sig(self, i: int) -> str:
        return f"{self._sigs[i]:016x}"

    def time(self, i: int) -> float:
        return self._times[i]


def receipts_in(paths: Iterable[Path], opened: list[Path]) -> Iterator[dict[str, Any]]:
    """The receipts in ``paths`` (JSON lines; a line that is not a receipt is left out), one
    line at a time; each file that could be opened is added to ``opened``."""
    for path in paths:
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed below
        except OSError:
            continue
        opened.append(path)
        with f:
            for raw in f:
                try:
                    rec = json.loads(raw)
                    float(rec["sent"]), float(rec["landed"])
                    if isinstance(rec["task"], str):
                        yield rec
                except (ValueError, KeyError, TypeError, RecursionError):
                    continue


def receipt_stats(found: Any) -> dict[str, Stat]:
    """What a receipt says the engine saw of some files: ``{path: [size, mtime_ns, ...]}``
    (an entry of another shape is left out: that file is looked at anew)."""
    if not isinstance(found, dict):
        return {}
    return {k: tuple(v) for k, v in found.items() if isinstance(v, list) and len(v) >= 2}


def warning_lines(path: Path, foreign: bool, unreadable: int, damaged: list[str]) -> list[str]:
    """What :meth:`~opals_dsl.runtime.journal.Journal.warnings` says."""
    out = []
    if foreign:
        out.append(f"{path} does not begin as an opf journal; it is ignored, so every "
                   "task runs")
    if unreadable:
        count = unreadable
        out.append(f"{count} line{'s' if count != 1 else ''} of the journal {path} "
                   f"{'are' if count != 1 else 'is'} not a record and skipped")
    if damaged:
        shown = ", ".join(damaged[:3]) + (", ..." if len(damaged) > 3 else "")
        count = len(damaged)
        out.append(f"{count} record{'s' if count != 1 else ''} of the journal {path} "
                   f"{'are' if count != 1 else 'is'} damaged and skipped ({shown}); "
                   f"{'those tasks run' if count != 1 else 'that task runs'} again")
    return out
