"""The end of a batch on an engine: the results of its tasks put in place, made durable, then
vouched for.

A task's copy-back writes each result to a temporary beside its destination
(:func:`~.fsatomic.write_temporaries`) and goes on. :class:`Landing` starts flushing a task's
temporaries to disk as soon as the task has ended, in the background while the next task runs
(:func:`~.fsatomic.flush_soon`); at the end of the batch it waits for every flush, then renames each
temporary into place (:func:`~.fsatomic.place`): the disk writes the results while the engine works
on, and still no destination is renamed before its data is on disk. It lands what is waiting early
once :data:`~.fsatomic.BATCH` temporaries are open. The folders renamed into are then flushed, each
once for the whole batch (:func:`settle`), and only then does a task count as done. A copy that
cannot be flushed or renamed, or a folder that cannot be flushed, fails the tasks it belongs to:
their results say so, and so do their copy-back rows. A batch that is interrupted puts none of its
waiting temporaries in place.

Each task that is done then gets its receipt (:func:`write_receipt`): a line of JSON appended to
the run's receipt file, which lets the next run recognise results that landed while no driver
listened (:meth:`opals_dsl.runtime.journal.Journal.stamp`). A receipt is written only for a
result that is on disk, so it never vouches for a rename that a crash could still undo.

Standard library only: engines import it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Sequence
from concurrent.futures import Future, wait

from ..plan.wire import FAILED, Failure, Receipt, TaskResult
from .fsatomic import BATCH, CopyError, Temporary, discard, flush_soon, fsync_folder, place
from .paths import file_in_the_way, os_reason


@dataclasses.dataclass(slots=True)
class Ran:
    """A task of the batch as it ended: its ``result``, its copy-back's temporaries not yet in
    place (``copies``: the local name, the destination as the plan writes it, the temporary),
    the folders they were renamed into (``landed``, by :class:`Landing`; not yet flushed) and
    the ``receipt`` its request asked for."""

    result: TaskResult
    landed: set[str] = dataclasses.field(default_factory=set)
    receipt: Receipt | None = None
    copies: list[tuple[str, str, Temporary]] = dataclasses.field(default_factory=list)


class Landing:
    """The tasks of a batch as they end (:meth:`add`), their copies put in place together
    (:meth:`land`), or dropped if the batch is interrupted (:meth:`abandon`)."""

    def __init__(self) -> None:
        self.ran: list[Ran] = []
        self._waiting = 0  # the first task whose copies are not in place yet
        # the flushes of the waiting tasks' temporaries, one per temporary, in order
        self._flushes: list[Future[OSError | None]] = []

    def add(self, ran: Ran) -> None:
        self.ran.append(ran)
        self._flushes += flush_soon([t.fd for _, _, t in ran.copies])
        if sum(len(r.copies) for r in self.ran[self._waiting:]) >= BATCH:
            self.land()  # not too many descriptors open at once

    def land(self) -> None:
        """Wait until the waiting tasks' temporaries are flushed, then put each task's in
        place; a task whose copy cannot be flushed or renamed fails, none of its temporaries
        placed after the failure."""
        group, self._waiting = self.ran[self._waiting:], len(self.ran)
        outcomes = iter([flush.result() for flush in self._flushes])
        self._flushes = []
        for r in group:
            copies, r.copies = r.copies, []
            errors = [next(outcomes) for _ in copies]
            try:
                failed = next((i for i, e in enumerate(errors) if e is not None), None)
                if failed is not None:
                    raise CopyError(failed, errors[failed])  # type: ignore[arg-type]
                for i, (_, dest, temp) in enumerate(copies):
                    try:
                        st = os.fstat(temp.fd)  # as on disk, once flushed
                    except OSError as exc:
                        raise CopyError(i, exc) from exc
                    r.result.outputs[dest] = [st.st_size, st.st_mtime_ns]
            except CopyError as exc:
                discard([t for _, _, t in copies])
                self._failed(r, copies, exc)
                continue
            try:
                place([t for _, _, t in copies])  # removes what it could not place
            except CopyError as exc:
                self._failed(r, copies, exc)
                continue
            r.landed.update(os.path.dirname(t.dst) for _, _, t in copies)

    @staticmethod
    def _failed(r: Ran, copies: list[tuple[str, str, Temporary]], exc: CopyError) -> None:
        local, _, temp = copies[exc.index]
        r.result = _copy_failed(r.result, copy_back_failed(local, temp.dst, exc.error))

    def abandon(self) -> None:
        """Remove the temporaries not in place yet: the batch was interrupted."""
        for flush in self._flushes:  # none may flush a descriptor number closed meanwhile
            flush.cancel()
        wait(self._flushes)
        self._flushes = []
        for r in self.ran:
            discard([t for _, _, t in r.copies])
            r.copies = []


def settle(ran: Sequence[Ran], host: str) -> list[TaskResult]:
    """The batch's results once its landings are on disk: each folder renamed into flushed
    once (a task whose folder cannot be flushed fails, kind ``copyback``), then a receipt for
    every task that is done."""
    failed: dict[str, OSError] = {}
    for folder in sorted(set().union(*(r.landed for r in ran))):
        try:
            fsync_folder(folder)
        except OSError as exc:
            failed[folder] = exc
    results = []
    for r in ran:
        result = r.result
        bad = sorted(r.landed & failed.keys())
        if bad and result.ok:
            folder = bad[0]
            result = _copy_failed(result, f"cannot flush the folder {folder} to disk: "
                                          f"{os_reason(failed[folder], 'destination')}")
        elif result.ok and r.receipt is not None:
            write_receipt(r.receipt, result, host)
        results.append(result)
    return results


def copy_back_failed(local: str, dst: str, error: OSError) -> str:
    """Why the copy-back of the task's file ``local`` to ``dst`` failed, naming what stands
    where one of ``dst``'s folders should be."""
    reason = os_reason(error, "destination")
    blocker = file_in_the_way(os.path.dirname(dst))
    if blocker is not None:
        reason += f" ({blocker})"
    return f"cannot copy {local} back to {dst}: {reason}"


def _copy_failed(result: TaskResult, message: str) -> TaskResult:
    """``result`` failed in its copy-back's landing, for ``message``; its copy-back row says so
    too."""
    node = f"copyback:{result.job}/{result.task}"
    for row in result.trace:
        if row.kind == "copyback":
            node, row.status, row.message = row.node, FAILED, message
    return dataclasses.replace(result, ok=False, failure=Failure("copyback", message, node=node))


def write_receipt(spec: Receipt, result: TaskResult, host: str) -> None:
    """Append the receipt of ``result`` (what the journal would record: the request's record
    plus the files as the engine saw them, and when the results landed) to this engine's
    receipt file of the run. Best effort: a receipt that cannot be written only means that the
    task runs again next time."""
    if not spec.folder:
        return
    record = dict(spec.record)
    record.update(staged=result.staged, shared=result.shared, outputs=result.outputs,
                  landed=time.time())
    line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
    name = f"{spec.run}-{host}-{os.getpid()}.jsonl"
    with contextlib.suppress(OSError):
        os.makedirs(spec.folder, exist_ok=True)
        fd = os.open(os.path.join(spec.folder, name), os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                     0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
