"""The run's journal: which tasks finished, and from what, so that ``opf run`` can resume.

In: the plan, the run's state folder and the scheduler's events (a :class:`Journal` is a
:class:`~opals_dsl.runtime.events.RunListener`). Out: the file ``<state>/journal/<pipeline>.jsonl``,
whose records :mod:`.resume` reads to decide, before anything runs, which tasks run again and
why (``opf run --dry-run`` prints the decisions, ``opf compile --dot --status`` colours the plan
with them).

The file
    JSON lines, appended to: a header, then one record per task and destination set that
    finished (or failed for good, or was held by an engine when the run was interrupted). The
    last line of a task and destination set is the one that counts, so a run into other
    folders (``--param results=...``) and back again finds the first folders' records. The
    fields, damaged lines and compaction are described in :mod:`.records`.

Receipts
    Each request carries a *stamp* (:meth:`Journal.stamp`): the sig its record will have, its
    ``cmd``, the sigs of its upstream tasks, its call modules' state and the driver's time of
    sending (``sent``). Once the task's results are in place the engine appends a receipt (the
    stamp plus what the engine saw: ``staged``, ``shared``, ``outputs``) to a file of its own in
    ``<state>/journal/<pipeline>.receipts/``. A run that ends takes in its own receipts (of
    results it never received) and removes them; those left by a killed run (or by engines
    that went on without it) are read when the journal is loaded: a receipt becomes its task's
    record when its ``cmd`` is the plan's and the task's record, if any, is older than the
    receipt's ``sent`` (and not the receipt's own sig). So a result that landed while nobody
    listened is "unchanged" — exactly as it landed; a destination changed since still reads
    "output changed", and the downstream tasks that used the result before it landed again see
    "upstream T ran again since". The next run writes adopted receipts into the journal and
    removes the receipt files.

Durability
    The records of one round of results go to the file in a single ``write`` (the file is opened
    with ``O_APPEND``), and the file is flushed to disk at most every
    :data:`SYNC_INTERVAL` seconds and when the run ends. Records lost to a power cut are tasks
    the next run does again; a record never exists for outputs that are not in place.

Decisions (run a task again or not, and why) are made from the records by :mod:`.resume`.

Checksums
    Without ``--checksum`` an input is unchanged when its size and modification time are those
    recorded. With it, records carry each input's SHA-256 (the engine computes it while copying
    the input; the driver hashes the job's shared files once per run), and an input whose time
    changed but whose content did not is unchanged; its record is then refreshed with the new
    time, so the next run does not hash it again. A file is hashed only when its size and time
    differ from the record.

Cost
    Records read are kept in memory as their text lines (about 300 bytes per task) and parsed
    only when a decision needs one; a record this run writes is kept only as its sig and time
    (17 bytes a task), and receipts are read a line at a time. Writing a record costs one
    ``json.dumps``; a decision for a task with no files, one hash of its command.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..plan import model
from ..plan.model import Task
from ..plan.trace import safe_name
from ..plan.wire import Receipt, Stat, TaskResult
from .events import RunListener, RunSummary, TaskFailure
from .fsatomic import remove_abandoned_temporaries, write_atomic
from .records import (
    ENCODE,
    SIG_MARK,
    Written,
    dests_of,
    name_of,
    receipt_stats,
    receipts_in,
    record_body,
    record_line,
    time_of,
    warning_lines,
)
from .request import FirstSeen, file_stat

if TYPE_CHECKING:
    import networkx as nx

#: format version in the journal's first line
VERSION = 1
#: at most this many seconds between two flushes of the journal to disk
SYNC_INTERVAL = 0.5
#: the ``sig`` of a failure record
FAILED_SIG = "0" * 16

# made once: json.dumps with options builds a new encoder every call
_ENCODE_SORTED = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"),
                                  sort_keys=True).encode


def journal_path(state_dir: str | Path, pipeline: str) -> Path:
    """Where the journal of ``pipeline`` lives in a state folder."""
    return Path(state_dir) / "journal" / f"{safe_name(pipeline)}.jsonl"


class Journal(RunListener):
    """The journal of one pipeline in one state folder; see the module docstring.

    Use :meth:`read` for a look without writing (``--dry-run``) and :meth:`open` for a run; a
    run's journal must be :meth:`close`\\ d (it is a context manager).
    """

    def __init__(self, plan: nx.DiGraph, path: Path, *, checksum: bool = False,
                 tasks: model.Tasks | None = None) -> None:
        self.plan = plan
        self.path = path
        self.info = model.info(plan)
        self.root = self.info.root
        self.checksum = checksum
        found = tasks if tasks is not None else model.tasks(plan)
        self.tasks: list[Task] = list(found.tasks)
        self.deps = found.upstream
        #: task name → the text line of its last record for the destinations the task has in
        #: this plan (or, when there is none, its last record for other destinations), as read;
        #: a record this run writes is kept only as its sig and time (:attr:`written`)
        self.records: dict[str, str] = {}
        self.written = Written(len(self.tasks))
        #: (task name, destination set) → the last record of the task's other destination sets
        self.others: dict[tuple[str, str], str] = {}
        self._dest_keys: dict[int, str] = {}
        self._index: dict[str, int] | None = None
        self.lines_read = 0
        self.bad_lines = 0
        #: what :meth:`warnings` reports: tasks whose record is a line of JSON but not a
        #: record, complete lines that are not JSON records, a file that is no journal
        self.damaged: list[str] = []
        self.unreadable = 0
        self.foreign = False
        #: why the journal stopped recording, if it did
        self.error: str | None = None
        self._header_ok = False
        self._fd: int | None = None
        self._pending: list[str] = []
        self._last_sync = 0.0
        self._unsynced = False
        #: a shared file's (or call module's) ``[size, mtime_ns]``, as the run first saw it
        self.shared_stat = FirstSeen(self.root)
        self._hashes: dict[tuple[str, int, int], str] = {}
        self._job_parts: dict[str, tuple[list[str], str]] = {}
        self._salt = secrets.token_hex(8)  # sigs differ between runs even at one clock reading
        self._serial = 0
        #: where engines leave receipts of tasks whose results landed
        self.receipts = path.with_suffix(".receipts")
        self._run_tag = secrets.token_hex(6)
        self._stubs: dict[int, dict[str, Any]] = {}
        self._cmds: dict[int, str] = {}
        self._adopted: list[str] = []
        self._receipt_files: list[Path] = []

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def read(cls, state_dir: str | Path, plan: nx.DiGraph, *, checksum: bool = False,
                 tasks: model.Tasks | None = None) -> Journal:
        """The journal as it is, for decisions only: nothing is written."""
        journal = cls(plan, journal_path(state_dir, model.info(plan).pipeline),
                      checksum=checksum, tasks=tasks)
        journal._load()
        return journal

    @classmethod
    def open(cls, state_dir: str | Path, plan: nx.DiGraph, *, checksum: bool = False,
             tasks: model.Tasks | None = None) -> Journal:
        """The journal for a run: loaded, compacted if worthwhile, open for appending."""
        journal = cls.read(state_dir, plan, checksum=checksum, tasks=tasks)
        journal._open_for_append()
        if journal._adopted:
            journal._write("".join(journal._adopted))
            journal._sync(force=True)
            journal._adopted = []
        if journal.error is None:  # what they said is in the journal now
            for receipt in journal._receipt_files:
                with contextlib.suppress(OSError):
                    receipt.unlink()
        journal._receipt_files = []
        return journal

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _load(self) -> None:
        try:
            f = open(self.path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            pass
        else:
            with f:
                self._read_lines(f)
        self._select_current()
        self._adopt_receipts()

    def _read_lines(self, lines: Iterable[bytes]) -> None:
        first = True
        for raw in lines:
            if not raw.strip():
                continue
            if first:
                first = False
                with contextlib.suppress(ValueError, RecursionError):
                    head = json.loads(raw)
                    if isinstance(head, dict) and head.get("opf-journal") == VERSION:
                        self._header_ok = True
                        continue
                if not self._header_ok:  # another format: start afresh
                    self.bad_lines += 1
                    self.foreign = True
                    return
            self.lines_read += 1
            # file names that are not UTF-8 were written through surrogateescape: read them so
            text = raw.decode("utf-8", "surrogateescape").rstrip("\r\n")
            name = name_of(text)
            if name is None:
                self.bad_lines += 1
                if raw.endswith(b"\n"):  # not the cut-off end of a write a kill interrupted
                    self.unreadable += 1
                continue
            self._put(name, text + "\n")

    def _put(self, name: str, line: str) -> None:
        """Make ``line`` the record of task ``name`` for its destination set; the task's record
        of another set is kept among :attr:`others`."""
        old = self.records.get(name)
        key = dests_of(line)
        if old is not None:
            was = dests_of(old)
            if was is not None and was != key:
                self.others[(name, was)] = old
        if key is not None and self.others:
            self.others.pop((name, key), None)
        self.records[name] = line

    def _select_current(self) -> None:
        """Where a task's last record is for other destinations than the plan gives it, take
        its record for the plan's destinations, if the journal has one."""
        if not self.others:
            return
        index = self.index()
        for name, _key in list(self.others):
            i = index.get(name)
            line = self.records.get(name)
            if i is None or line is None or dests_of(line) in (None, self.dest_key(i)):
                continue
            wanted = self.others.get((name, self.dest_key(i)))
            if wanted is not None:
                self._put(name, wanted)

    def index(self) -> dict[str, int]:
        """Task name → its place in plan order."""
        if self._index is None:
            self._index = {t.name: t.order for t in self.tasks}
        return self._index

    def dest_key(self, i: int) -> str:
        """The key of task ``i``'s destination set (a record is kept per task and set)."""
        key = self._dest_keys.get(i)
        if key is None:
            dests = sorted(d for _, d in model.node(self.plan, self.tasks[i].copyback).files)
            key = self._dest_keys[i] = hashlib.blake2b(
                ENCODE(dests).encode("utf-8", "surrogateescape"), digest_size=8).hexdigest()
        return key

    def _open_for_append(self) -> None:
        folder = self.path.parent
        folder.mkdir(parents=True, exist_ok=True)
        remove_abandoned_temporaries(str(folder))  # of a compaction that was killed
        stale = self.lines_read - len(self.records) - len(self.others)
        if (not self._header_ok or self.bad_lines or stale > len(self.records)) and (
                self.records or self.path.exists()):
            with contextlib.suppress(OSError):  # no room to compact: append to it as it is
                self._rewrite()
        new = not self.path.exists()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if new:
            self._write(self._header())
            self._sync(force=True)

    def _header(self) -> str:
        return json.dumps({"opf-journal": VERSION, "pipeline": self.info.pipeline},
                          ensure_ascii=False) + "\n"

    def _rewrite(self) -> None:
        """Write the records afresh: to a temporary, flushed, renamed over the journal."""
        data = (self._header() + "".join(self.records.values())
                + "".join(self.others.values())).encode("utf-8", "surrogateescape")
        write_atomic(str(self.path), data)
        self.lines_read = len(self.records) + len(self.others)
        self.bad_lines = 0
        self._header_ok = True

    # -- writing ---------------------------------------------------------------------------

    def _write(self, text: str) -> None:
        if self._fd is None:
            return
        data = text.encode("utf-8", "surrogateescape")
        try:
            while data:  # one write() in practice; a short write continues where it stopped
                done = os.write(self._fd, data)
                data = data[done:]
        except OSError as exc:
            self._failed(exc)
            return
        self._unsynced = True

    def _sync(self, force: bool = False) -> None:
        if self._fd is None or not self._unsynced:
            return
        now = time.monotonic()
        if force or now - self._last_sync >= SYNC_INTERVAL:
            try:
                os.fsync(self._fd)
            except OSError as exc:
                self._failed(exc)
                return
            self._last_sync = now
            self._unsynced = False

    def _failed(self, exc: OSError) -> None:
        """The journal cannot be written (its disk is full ...): the run goes on without it;
        the tasks it could not record run again next time."""
        self.error = (f"cannot write the journal {self.path}: {exc.strerror or exc}; tasks "
                      f"finished since are not recorded and will run again")
        self._pending = []
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def flush(self) -> None:
        """Write the pending records and flush the file to disk."""
        if self._fd is None:
            return
        if self._pending:
            text, self._pending = "".join(self._pending), []
            self._write(text)
        self._sync(force=True)

    @property
    def writable(self) -> bool:
        """True while the journal is open for a run (records are written)."""
        return self._fd is not None

    def close(self) -> None:
        """Flush and close; the journal can still be read afterwards. This run's receipts are
        taken in first (a task whose result this run never received — an engine that finished
        after an interrupt, or after it was taken for lost — but which landed) and then
        removed, once the journal holds what they say."""
        if self._fd is None:
            return
        try:
            self._receipt_files = []
            self._adopt_receipts(prefix=self._run_tag + "-")
            self._pending.extend(self._adopted)
            self._adopted = []
            self.flush()
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        if self.error is None:
            for receipt in self._receipt_files:
                with contextlib.suppress(OSError):
                    receipt.unlink()
        self._receipt_files = []

    # -- RunListener -----------------------------------------------------------------------

    def task_done(self, task: Task, result: TaskResult, engine: int) -> None:
        line = self._record(task.order, result.staged, result.shared, result.outputs,
                            self._stubs.pop(task.order, None))
        self._keep(task, line)

    def task_failed(self, task: Task, failure: TaskFailure) -> None:
        self._stubs.pop(task.order, None)
        self._keep_unfinished(task, {"failed": True, "time": round(time.time(), 3)})

    def _keep_unfinished(self, task: Task, body: dict[str, Any]) -> None:
        self._keep(task, record_line(task.name, FAILED_SIG, ENCODE(body),
                                     self.dest_key(task.order)))

    def task_skipped(self, task: Task) -> None:
        self._cmds.pop(task.order, None)

    def _keep(self, task: Task, line: str) -> None:
        """Record ``line`` for ``task``: to the file, and in memory only its sig and time, so
        that a run holds a few bytes per finished task, not its record."""
        i = task.order
        if self.written.note(i, line):
            self.records.pop(task.name, None)
        else:
            self._put(task.name, line)
        self._cmds.pop(i, None)
        self._dest_keys.pop(i, None)
        if self._fd is not None:
            self._pending.append(line)

    def checkpoint(self) -> None:
        if self._fd is None:
            return
        if self._pending:
            text, self._pending = "".join(self._pending), []
            self._write(text)
        self._sync()

    def run_finished(self, summary: RunSummary) -> None:
        # a task an engine held is recorded so, unless a record of a finished run says more;
        # without a time: a receipt is newer if the result lands after all (_adopt_receipts)
        for i in summary.stopped_tasks:
            if self.sig_of(self.tasks[i].name) in (None, FAILED_SIG):
                self._keep_unfinished(self.tasks[i], {"interrupted": True})
        self.flush()

    def forget_damaged(self, name: str) -> None:
        """Forget the record of task ``name``: it cannot be read as one (the journal was edited,
        or damaged on its disk); the task runs again and gets a new record."""
        del self.records[name]
        self.bad_lines += 1
        self.damaged.append(name)

    def warnings(self) -> list[str]:
        """What the user should hear about the journal: that it is not one, lines that could
        not be read, and records that were skipped because they are damaged (their tasks run
        again). A line cut off at the end of the file (a run killed while writing it) is the
        expected trace of a kill, and not reported."""
        return warning_lines(self.path, self.foreign, self.unreadable, self.damaged)

    # -- the parts of a record ---------------------------------------------------------------

    def sig_of(self, name: str) -> str | None:
        """The ``sig`` of a task's last record, or None."""
        if self.written.count:
            i = self.index().get(name)
            if i is not None and i in self.written:
                return self.written.sig(i)
        line = self.records.get(name)
        if line is None:
            return None
        at = line.find(SIG_MARK)
        return line[at + len(SIG_MARK):at + len(SIG_MARK) + 16] if at >= 0 else None

    def sig_at(self, i: int) -> str | None:
        """The ``sig`` of task ``i``'s last record, or None."""
        if i in self.written:
            return self.written.sig(i)
        return self.sig_of(self.tasks[i].name)

    def _job(self, machine: model.MachineStage | None) -> tuple[list[str], str]:
        """The job's shared files (their sources) and their part of ``cmd``."""
        if machine is None:
            return [], ENCODE([])
        parts = self._job_parts.get(machine.job)
        if parts is None:
            parts = self._job_parts[machine.job] = (
                [src for src, _ in machine.files], ENCODE(machine.files))
        return parts

    def command(self, i: int) -> tuple[str, list[list[Any]]]:
        """The task's ``cmd`` hash and ``steps``."""
        machine, stage, execs, copyback = model.chain(self.plan, self.tasks[i])
        steps: list[list[Any]] = []
        declared = []
        for e in execs:
            steps.append([e.step, list(e.argv) if e.argv is not None else
                          (e.call.to_attrs() if e.call is not None else None)])
            declared.append([e.outputs, e.temp])
        _, shared = self._job(machine)
        what = _ENCODE_SORTED([steps, declared, stage.files, copyback.files])
        digest = hashlib.blake2b((what + "\0" + shared).encode("utf-8", "surrogateescape"),
                                 digest_size=12).hexdigest()
        self._cmds[i] = digest
        return digest, steps

    def base(self, i: int) -> str:
        """The hash of what task ``i`` is told to do, but for its steps' commands (``base``)."""
        machine, stage, execs, copyback = model.chain(self.plan, self.tasks[i])
        _, shared = self._job(machine)
        what = _ENCODE_SORTED([[e.step for e in execs], [[e.outputs, e.temp] for e in execs],
                               stage.files, copyback.files])
        return hashlib.blake2b((what + "\0" + shared).encode("utf-8", "surrogateescape"),
                               digest_size=12).hexdigest()

    def _upstream_files(self, i: int) -> set[str]:
        dests: set[str] = set()
        for u in self.deps[i]:
            upstream = model.node(self.plan, self.tasks[u].copyback)
            dests.update(dest for _, dest in upstream.files)
        return dests

    def inputs(self, i: int) -> tuple[list[str], list[str]]:
        """The files task ``i`` stages that no upstream task publishes; and the files it shares
        with other tasks (the job's shared files, the Python files of its calls)."""
        ref = self.tasks[i]
        stage = model.node(self.plan, ref.task_stage)
        ups = self._upstream_files(i) if self.deps[i] else ()
        own = [src for src, _ in stage.files if src not in ups]
        machine = (model.node(self.plan, ref.machine_stage)
                   if ref.machine_stage in self.plan.nodes else None)
        shared, _ = self._job(machine)
        common = list(shared)
        common.extend(self._code(i))
        return own, common

    def _code(self, i: int) -> list[str]:
        """The pipeline-folder Python files of task ``i``'s ``call`` steps."""
        files = []
        for node in self.tasks[i].execs:
            call = model.node(self.plan, node).call
            if call is None:
                continue
            path = self.shared_stat.module_file(call.function.partition(":")[0])
            if path and path not in files:
                files.append(path)
        return files

    def stat(self, path: str) -> list[int] | None:
        return file_stat(self.root, path)

    def hash_of(self, path: str, st: list[int]) -> str | None:
        key = (path, st[0], st[1])
        digest = self._hashes.get(key)
        if digest is None:
            try:
                with open(os.path.join(self.root, path), "rb") as f:
                    digest = hashlib.file_digest(f, "sha256").hexdigest()
            except OSError:
                return None
            self._hashes[key] = digest
        return digest

    def _code_stats(self, i: int) -> dict[str, list[Any]]:
        """The driver's view of task ``i``'s call modules (``in`` entries)."""
        code = {}
        for src in self._code(i):
            entry = self.shared_stat(src)
            if entry is not None and self.checksum:
                digest = self.hash_of(src, entry)
                if digest is not None:
                    entry = [*entry[:2], digest]
            if entry is not None:
                code[src] = entry
        return code

    def _record(self, i: int, staged: Mapping[str, Stat], seen: Mapping[str, Stat],
                outputs: Mapping[str, Stat], stub: Mapping[str, Any] | None = None) -> str:
        """The record line of task ``i`` from what the engine saw of the files it staged, the
        shared files and the outputs (keyed by the plan's paths); ``stub`` (what :meth:`stamp`
        gave the request) supplies its sig, upstream sigs and call modules as they were when
        the task was sent, and for a receipt its time."""
        ref = self.tasks[i]
        machine, stage, _, copyback = model.chain(self.plan, ref)
        adopting = stub is not None and "landed" in stub
        cmd, steps = self.command(i)
        ins: dict[str, list[Any]] = {}
        ups = self._upstream_files(i) if self.deps[i] else ()
        for src, _ in stage.files:
            if src in ups:
                continue
            entry = staged[src] if src in staged else self.stat(src)
            if entry is not None:
                ins[src] = list(entry)
        shared, _ = self._job(machine)
        for src in shared:
            entry = list(seen[src]) if src in seen else self.shared_stat(src)
            if entry is None:
                continue
            if self.checksum and len(entry) < 3 and not adopting:  # hash the file as it is now
                digest = self.hash_of(src, entry)
                if digest is not None:
                    entry = [*entry[:2], digest]
            ins[src] = entry
        code = stub.get("code") if stub is not None else None
        ins.update(code if isinstance(code, dict) else self._code_stats(i))
        up = stub.get("up") if stub is not None else None
        if not isinstance(up, dict):
            up = {self.tasks[u].name: self.sig_at(u) for u in self.deps[i]}
        out: dict[str, list[Any]] = {}
        for _, dest in copyback.files:
            entry = outputs[dest] if dest in outputs else self.stat(dest)
            if entry is not None:
                out[dest] = list(entry)
        sig = stub.get("sig") if stub is not None else None
        if not isinstance(sig, str) or len(sig) != 16:
            sig = self._new_sig(ref.name, cmd)
        when = stub.get("sent") if adopting and stub is not None else None
        now = float(when) if isinstance(when, (int, float)) else time.time()
        body = ENCODE({"cmd": cmd, "base": self.base(i), "steps": steps,
                       "params": dict(self.info.params), "in": ins, "up": up, "out": out,
                       "time": round(now, 3)})
        return record_line(ref.name, sig, body, self.dest_key(i))

    def _new_sig(self, name: str, cmd: str) -> str:
        self._serial += 1
        text = f"{name}\0{cmd}\0{time.time()!r}\0{self._salt}{self._serial}"
        return hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=8).hexdigest()

    # -- receipts -----------------------------------------------------------------------------

    def stamp(self, task: Task) -> Receipt:
        """What a request carries so that its engine leaves a receipt once the task's results
        landed (:func:`opals_dsl.runtime.landing.write_receipt`): the record's sig (also used
        when the result reaches this run), the sigs of its upstream tasks and the state of its call
        modules now, the time it was sent, and where receipts go."""
        i = task.order
        cmd = self._cmds.get(i) or self.command(i)[0]
        stub = {
            "task": task.name, "order": i, "sig": self._new_sig(task.name, cmd),
            "sent": round(time.time(), 3), "cmd": cmd,
            "up": {self.tasks[u].name: self.sig_at(u) for u in self.deps[i]},
            "code": self._code_stats(i),
        }
        self._stubs[i] = stub
        return Receipt(str(self.receipts), self._run_tag, stub)

    def _adopt_receipts(self, prefix: str = "") -> None:
        """Take the receipts engines left for results that landed without this journal
        hearing of them (``opf run`` killed, or an engine that went on after it lost contact).

        A receipt stands for a record when its task's command is the plan's and it is newer
        than the task's record: the task was sent (``sent``, by the driver's clock, as the
        record's ``time``) after the record was written, and its record is not the receipt's
        own (same sig). It then becomes the task's record, with the outputs' size and time as
        the engine saw them once they were in place — so a result that landed is "unchanged",
        and one changed since is not."""
        try:
            entries = sorted(p for p in self.receipts.iterdir()
                             if p.suffix == ".jsonl" and p.name.startswith(prefix))
        except OSError:
            return
        # one at a time, passing over those of results received (the record has their sig)
        best: dict[int, dict[str, Any]] = {}
        for rec in receipts_in(entries, self._receipt_files):
            i = self._order_of(rec)
            if i is None or rec.get("sig") == self.sig_at(i):
                continue
            old = best.get(i)
            key = (float(rec["sent"]), float(rec["landed"]))
            if old is None or key > (float(old["sent"]), float(old["landed"])):
                best[i] = rec
        for i, rec in sorted(best.items()):
            name = self.tasks[i].name
            if rec.get("cmd") != (self._cmds.get(i) or self.command(i)[0]):
                continue
            if i in self.written:
                recorded: float | None = self.written.time(i)
            else:
                line = self.records.get(name)
                recorded = time_of(line) if line is not None else None
            if recorded is not None and recorded >= float(rec["sent"]):
                continue
            line = self._record(i, receipt_stats(rec.get("staged")),
                                receipt_stats(rec.get("shared")),
                                receipt_stats(rec.get("outputs")), rec)
            self._put(name, line)
            self._adopted.append(line)

    def _order_of(self, rec: dict[str, Any]) -> int | None:
        """The plan order of a receipt's task (None: not a task of this plan)."""
        i = rec.get("order")
        if (isinstance(i, int) and 0 <= i < len(self.tasks)
                and self.tasks[i].name == rec["task"]):
            return i
        return self.index().get(rec["task"])

    def refresh_record(self, i: int, fresh: Mapping[str, list[Any]]) -> None:
        """Write task ``i``'s record again with the inputs in ``fresh`` (unchanged in content,
        with a new time: see ``--checksum``)."""
        name = self.tasks[i].name
        line = self.records[name]
        rec = json.loads(record_body(line))
        rec["in"].update(fresh)
        key = rec.pop("dests", None)
        sig = self.sig_of(name) or FAILED_SIG
        line = record_line(name, sig, ENCODE(rec), key if isinstance(key, str) else None)
        self.records[name] = line
        self._pending.append(line)
