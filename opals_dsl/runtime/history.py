"""A pipeline's runs: each run's records in a folder of its own, and the history of them.

In: the state folder, the plan (its pipeline's name and parameters) and the scheduler's events.
Out: the folder ``runs/<pipeline>/<N>/`` of each run (the layout is in
:mod:`opals_dsl.plan.trace`), its summary ``run.json``, and what ``opf runs`` lists, ``opf
report`` picks and ``opf clean`` removes.

``run.json``
    ``{"run": N, "pipeline": ..., "source": ..., "params": {...}, "pid": ..., "host": ...,
    "started": ..., "finished": ..., "tasks": ..., "to_run": ..., "done": ..., "skipped":
    ..., "failed": ..., "not_run": ..., "status": ..., "scratch": [...]}``, written (whole,
    by a rename) when the run starts, with status ``running``, and again when it ends, with
    its counts and one of ``done``, ``failed``, ``stopped`` (tasks left undone),
    ``interrupted``, ``unchanged`` (nothing to do) or ``error`` (it could not start, e.g. no
    cluster); ``scratch``, once its engines are there, lists the scratch roots its engines on
    this host use. A run still
    ``running`` whose process is gone was killed.

Run numbers are given under the state folder's lock (:func:`opals_dsl.runtime.session.lock_state`)
and never reused while a higher one is kept.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..plan import model
from ..plan.trace import RUN_FILE, TRACE_FILE, WHY_FILE, read_run, run_numbers, runs_folder
from .events import RunListener, RunSummary
from .fsatomic import write_atomic
from .paths import remove_tree

if TYPE_CHECKING:
    import networkx as nx

    from .executor import EngineInfo

#: the status of a run still going on (or killed while it did)
RUNNING = "running"

#: a string as JSON, ASCII only (the json module's own encoder, called without a dumps a line)
_quote = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]


def outcome(summary: RunSummary, to_run: int) -> str:
    """A finished run's status, in one word."""
    if summary.interrupted:
        return "interrupted"
    if summary.failed:
        return "failed"
    if summary.not_run or summary.blocked or summary.no_engines:
        return "stopped"
    return "done" if to_run else "unchanged"


class RunRecords(RunListener):
    """The records of one run: a new numbered folder, its ``run.json`` written when the run
    starts and completed when it ends (a context manager: a run that raises is ``error``, or
    ``interrupted`` on Ctrl-C)."""

    def __init__(self, state: str | Path, plan: nx.DiGraph, *, total: int, to_run: int,
                 scratch: str | None = None) -> None:
        info = model.info(plan)
        base = runs_folder(state, info.pipeline)
        base.mkdir(parents=True, exist_ok=True)
        numbers = run_numbers(state, info.pipeline)
        number = (numbers[-1] if numbers else 0) + 1
        while True:  # a folder that is not a run's (no summary) is skipped, never reused
            try:
                (base / str(number)).mkdir()
                break
            except FileExistsError:
                number += 1
        self.folder = base / str(number)
        self.to_run = to_run
        self.scratch = scratch
        self.data: dict[str, Any] = {
            "run": number, "pipeline": info.pipeline, "source": info.source,
            "params": dict(info.params), "pid": os.getpid(), "host": socket.gethostname(),
            "started": round(time.time(), 3), "finished": None, "tasks": total,
            "to_run": to_run, "done": 0, "skipped": 0, "failed": 0, "not_run": 0,
            "status": RUNNING,
        }
        self._write()

    def decided(self, to_run: int) -> None:
        """Record how many tasks the journal found to run (none decided: all of them)."""
        self.to_run = self.data["to_run"] = to_run
        self._write()

    @contextlib.contextmanager
    def reasons(self) -> Iterator[Callable[[str, str], None]]:
        """A writer of why each task is to run, ``(task, why)``: a line of :data:`WHY_FILE`
        in the run's folder, written as the journal decides (nothing kept in memory). A file
        that cannot be written only leaves the reasons out of the records."""
        try:
            out = open(self.folder / WHY_FILE, "w", encoding="utf-8")  # noqa: SIM115
        except OSError:
            yield lambda task, why: None
            return
        failed: list[OSError] = []

        def write(task: str, why: str) -> None:
            if not failed:
                try:
                    out.write(f'{{"task":{_quote(task)},"why":{_quote(why)}}}\n')
                except OSError as exc:
                    failed.append(exc)

        try:
            yield write
        finally:
            with contextlib.suppress(OSError):
                out.close()

    def _write(self) -> None:
        text = json.dumps(self.data, ensure_ascii=False, indent=1) + "\n"
        with contextlib.suppress(OSError):  # the trace says what ran; the run goes on
            write_atomic(str(self.folder / RUN_FILE), text.encode("utf-8", "surrogateescape"))

    def run_started(self, total: int, engines: Mapping[int, EngineInfo]) -> None:
        """Record the scratch roots that the run's engines on this host work below
        (``scratch``, where ``opf clean`` looks): the run's ``--scratch`` (resolved as they
        resolve it) if it has one, else each engine's own."""
        here = socket.gethostname()
        mine = [info.scratch for info in engines.values() if info.host == here]
        if self.scratch is not None and mine:
            mine = [os.path.realpath(os.path.expanduser(self.scratch))]
        self.data["scratch"] = sorted(set(mine))
        self._write()

    def run_finished(self, summary: RunSummary) -> None:
        self.data.update(
            finished=round(time.time(), 3), done=summary.done, skipped=summary.skipped,
            failed=summary.failed, not_run=summary.not_run + summary.blocked,
            status=outcome(summary, self.to_run))
        self._write()

    def __enter__(self) -> RunRecords:
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        if kind is not None and self.data["status"] == RUNNING:
            self.data["finished"] = round(time.time(), 3)
            self.data["status"] = "interrupted" if issubclass(kind, KeyboardInterrupt) \
                else "error"
            self._write()


@dataclass(frozen=True, slots=True)
class PastRun:
    """A run as its records tell it: ``number``, ``folder`` and its ``run.json`` (``data``)."""

    number: int
    folder: Path
    data: dict[str, Any]

    @property
    def status(self) -> str:
        """The recorded status; ``killed`` for a run that never ended (its process is gone)."""
        status = str(self.data.get("status") or "unknown")
        if status == RUNNING and not _alive(self.data):
            return "killed"
        return status

    @property
    def did_work(self) -> bool:
        """True unless the run had nothing to do or never got to run anything (a cluster that
        could not be started, a step too wide for every machine): it left a trace."""
        if self.data.get("to_run") == 0:
            return False
        try:
            return (self.folder / TRACE_FILE).stat().st_size > 0
        except OSError:
            return False


def runs(state: str | Path, pipeline: str) -> list[PastRun]:
    """The runs of ``pipeline`` recorded in a state folder, oldest first."""
    base = runs_folder(state, pipeline)
    return [PastRun(n, base / str(n), read_run(base / str(n)))
            for n in run_numbers(state, pipeline)]


def pick(found: list[PastRun], number: int | None = None) -> PastRun | None:
    """Run ``number``, or else the last run that did work (the last run if none did)."""
    if number is not None:
        return next((r for r in found if r.number == number), None)
    worked = [r for r in found if r.did_work]
    return (worked or found or [None])[-1]


def prunable(found: list[PastRun], keep: int) -> list[PastRun]:
    """The runs ``opf clean --keep KEEP`` removes: all but the last ``keep`` runs that did work
    (what ``opf report`` shows; a run with nothing to do, or one that never got to run, counts
    for none) and, when ``keep`` > 0, the last run of all; never a run still going on."""
    worked = [r for r in found if r.did_work]
    spared = {r.number for r in worked[-keep:]} if keep > 0 else set()
    if keep > 0 and found:
        spared.add(found[-1].number)
    last = pick(found)
    if last is not None:
        spared.add(last.number)
    return [r for r in found if r.number not in spared and r.status != RUNNING]


def remove(paths: list[Path]) -> None:
    """Remove folders (run records, scratch folders), read-only ones too."""
    for path in paths:
        remove_tree(str(path))


def _alive(data: dict[str, Any]) -> bool:
    """Does the process of a run still run (the same process: not one that got its id)?"""
    import psutil

    pid, started = data.get("pid"), data.get("started")
    if data.get("host") != socket.gethostname() or not isinstance(pid, int):
        return True  # cannot tell from here
    try:
        created = psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True
    return not isinstance(started, int | float) or created <= started + 1.0
