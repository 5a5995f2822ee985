"""The end of a batch on an engine: the results of its tasks made durable, then vouched for.

A task's copy-back renames each destination into place (:func:`~.fsatomic.atomic_copies`, the
file's data already on disk); the folders it renamed into are flushed here once for the whole
batch (:func:`settle`), and only then does a task count as done. A folder that cannot be flushed
fails the tasks that copied into it: their results say so, and so do their copy-back rows.

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

from ..plan.wire import FAILED, Failure, Receipt, TaskResult
from .fsatomic import fsync_folder
from .paths import os_reason


@dataclasses.dataclass(slots=True)
class Ran:
    """A task of the batch as it ended: its ``result``, the folders its copy-back renamed into
    (``landed``, not yet flushed) and the ``receipt`` its request asked for."""

    result: TaskResult
    landed: set[str] = dataclasses.field(default_factory=set)
    receipt: Receipt | None = None


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
            result = _unflushed(result, bad[0], failed[bad[0]])
        elif result.ok and r.receipt is not None:
            write_receipt(r.receipt, result, host)
        results.append(result)
    return results


def _unflushed(result: TaskResult, folder: str, exc: OSError) -> TaskResult:
    """``result`` failed because ``folder``, which its copy-back renamed into, could not be
    flushed to disk; its copy-back row says so too."""
    message = f"cannot flush the folder {folder} to disk: {os_reason(exc, 'destination')}"
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
