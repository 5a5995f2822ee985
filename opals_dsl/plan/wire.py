"""What travels between the driver and an engine: a task's request and its result, versioned.

The driver sends each engine batches of :class:`TaskRequest` (everything the engine needs to
run one task's chain: the files of its machine stage, task stage and copy-back, and each step's
command) and gets one :class:`TaskResult` per request back (a trace row per node that ran, the
failure if there was one, and what the engine saw of each file). They travel as plain data —
:meth:`TaskRequest.to_wire` and :meth:`TaskResult.to_wire` give dicts of strings, numbers,
tuples, lists and dicts, tagged with :data:`VERSION` — so an engine running another version of opf
answers with a failure that says so, instead of misreading a field.

Files the engine reports on are keyed by the plan's own paths (a staged input by its source, a
copied-back output by its destination), never by position in a list.

This module imports only the standard library: the engine imports it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

#: the version of the request and result format; both sides must speak the same one
VERSION = 4

#: ``[size, mtime_ns]`` of a file as the engine saw it, plus its SHA-256 when asked for
Stat = Sequence[Any]

#: trace statuses of a node that ran
DONE = "done"
CACHED = "cached"
FAILED = "failed"
#: the trace status of a step a resumed task did not run: its outputs were staged from their
#: destinations instead (see :attr:`TaskRequest.start`)
REUSED = "reused"
#: the status of an exec node stopped because it ran past its ``timeout``
TIMEOUT = "timeout"


class WireError(ValueError):
    """A request or result that is not in this version's format."""


def _check_version(data: Mapping[str, Any], what: str) -> None:
    version = data.get("v")
    if version != VERSION:
        raise WireError(f"the {what} is in format version {version!r}, this opf reads version "
                        f"{VERSION}: the driver and the engines run different versions of opf")


def _pairs(files: Any) -> tuple[tuple[str, str], ...]:
    return tuple(map(tuple, files)) if files else ()


# -- the request ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stage:
    """A stage or copy-back node: its id and its ``(from, to)`` file pairs (see
    :mod:`opals_dsl.model` for what each side means for each kind)."""

    node: str
    files: tuple[tuple[str, str], ...] = ()

    def to_wire(self) -> dict[str, Any]:
        return stage_data(self.node, self.files)

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Stage:
        return cls(str(d["node"]), _pairs(d.get("files")))


@dataclass(frozen=True, slots=True)
class Step:
    """An exec node: exactly one of ``argv`` and ``call`` (``function``, ``kwargs``);
    ``threads`` the thread count its process is told, ``timeout`` the seconds it may run."""

    node: str
    step: str
    argv: tuple[str, ...] | None
    function: str | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    temp: tuple[str, ...] = ()
    threads: int = 1
    timeout: float | None = None

    def to_wire(self) -> dict[str, Any]:
        return step_data(self.node, self.step, self.argv, self.function, self.kwargs,
                         self.inputs, self.outputs, self.temp, self.threads, self.timeout)

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Step:
        argv = d.get("argv")
        function = d.get("function")
        return cls(str(d["node"]), str(d["step"]),
                   tuple(argv) if argv is not None else None,
                   str(function) if function is not None else None,
                   dict(d.get("kwargs") or {}), tuple(d.get("inputs") or ()),
                   tuple(d.get("outputs") or ()), tuple(d.get("temp") or ()),
                   int(d.get("threads") or 1), d.get("timeout"))


@dataclass(frozen=True, slots=True)
class Receipt:
    """Where the engine appends a receipt once the task's results landed (``folder``, a file
    per ``run`` and engine), and the ``record`` stub (plain data from the journal) it extends
    with what it saw of the files."""

    folder: str
    run: str
    record: Mapping[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {"folder": self.folder, "run": self.run, "record": dict(self.record)}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Receipt:
        return cls(str(d["folder"]), str(d.get("run") or "run"), dict(d.get("record") or {}))


@dataclass(frozen=True, slots=True)
class TaskRequest:
    """One task for an engine: where (``pipeline``, ``root`` — the pipeline's folder on the
    shared drive —, ``scratch``, ``logs``: the job's log folder, which holds
    ``<step>/<task>.log``), which (``job``, ``task``, ``attempt``) and its
    chain. ``checksum`` asks for the SHA-256 of each staged input; ``run_id`` marks the steps'
    processes (``OPF_RUN_ID``); ``receipt`` asks for a receipt once the results landed;
    ``shared`` holds each shared file's and ``call`` module's ``[size, mtime_ns]`` as the run
    first saw it (by its path in the plan), so that a task never uses another version of it
    than the run's earlier tasks.

    ``start`` > 0 resumes the task at that step: the steps before it do not run; instead the
    task stage also stages, from its destination, each published output of theirs that a later
    step reads (the copy-back pair ``(local, destination)`` read backwards), and the copy-back
    copies only the outputs of the steps that run."""

    pipeline: str
    root: str
    job: str
    task: str
    machine_stage: Stage
    task_stage: Stage
    steps: tuple[Step, ...]
    copyback: Stage
    attempt: int = 0
    scratch: str | None = None
    logs: str | None = None
    checksum: bool = False
    run_id: str | None = None
    receipt: Receipt | None = None
    start: int = 0
    shared: Mapping[str, Stat] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return request_data(
            self.pipeline, self.root, self.job, self.task, self.machine_stage.to_wire(),
            self.task_stage.to_wire(), [s.to_wire() for s in self.steps],
            self.copyback.to_wire(), self.attempt, self.scratch, self.logs, self.checksum,
            self.run_id, self.receipt, self.start, self.shared,
        )

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> TaskRequest:
        """The request in ``d``; raises :class:`WireError` when it is not one."""
        if not isinstance(d, Mapping):
            raise WireError(f"a task request is a mapping, not {type(d).__name__}")
        _check_version(d, "task request")
        try:
            return cls(
                str(d["pipeline"]), str(d["root"]), str(d["job"]), str(d["task"]),
                Stage.from_wire(d["machine_stage"]), Stage.from_wire(d["task_stage"]),
                tuple(Step.from_wire(s) for s in d.get("steps") or ()),
                Stage.from_wire(d["copyback"]), int(d.get("attempt") or 0),
                d.get("scratch"), d.get("logs"), bool(d.get("checksum")),
                d.get("run_id"), Receipt.from_wire(d["receipt"]) if d.get("receipt") else None,
                int(d.get("start") or 0), _stats(d.get("shared")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise WireError(f"the task request is incomplete: {type(exc).__name__}: "
                            f"{exc}") from exc

    def with_scratch(self, scratch: str | None) -> TaskRequest:
        """This request with a scratch root, unless it names one already."""
        if self.scratch is not None or scratch is None:
            return self
        return replace(self, scratch=scratch)


# The request as it travels, built by these three functions only: ``to_wire`` above calls them,
# and so does the scheduler, which builds a request from the plan's typed nodes straight away
# (for every task of a run: without the request's own objects it costs a third as much).


def stage_data(node: str, files: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    """A :class:`Stage` as plain data."""
    return {"node": node, "files": files}


def step_data(node: str, step: str, argv: tuple[str, ...] | None, function: str | None,
              kwargs: Mapping[str, Any], inputs: tuple[str, ...], outputs: tuple[str, ...],
              temp: tuple[str, ...], threads: int = 1,
              timeout: float | None = None) -> dict[str, Any]:
    """A :class:`Step` as plain data."""
    return {"node": node, "step": step, "argv": argv, "function": function,
            "kwargs": dict(kwargs), "inputs": inputs, "outputs": outputs, "temp": temp,
            "threads": threads, "timeout": timeout}


def request_data(pipeline: str, root: str, job: str, task: str, machine_stage: dict[str, Any],
                 task_stage: dict[str, Any], steps: list[dict[str, Any]],
                 copyback: dict[str, Any], attempt: int = 0, scratch: str | None = None,
                 logs: str | None = None, checksum: bool = False, run_id: str | None = None,
                 receipt: Receipt | None = None, start: int = 0,
                 shared: Mapping[str, Stat] | None = None) -> dict[str, Any]:
    """A :class:`TaskRequest` as plain data (its stages and steps already plain data)."""
    return {
        "v": VERSION, "pipeline": pipeline, "root": root, "job": job, "task": task,
        "attempt": attempt, "scratch": scratch, "logs": logs, "checksum": checksum,
        "run_id": run_id, "receipt": receipt.to_wire() if receipt is not None else None,
        "machine_stage": machine_stage, "task_stage": task_stage, "steps": steps,
        "copyback": copyback, "start": start, "shared": dict(shared) if shared else {},
    }


# -- the result -------------------------------------------------------------------------------


@dataclass(slots=True)
class TraceRow:
    """One node as it ran on the engine: ``status`` is ``done``, ``cached`` (a machine stage
    found complete), ``reused`` (a step a resumed task did not run), ``failed`` or ``timeout``
    (an exec node stopped at its time limit); ``bytes`` what it copied (stages, copy-back) or
    wrote (exec); the failed node's row also holds the failure's ``returncode`` and
    ``message``; an exec node whose step uses more than one thread holds ``threads``."""

    node: str
    kind: str
    start: float
    end: float | None = None
    status: str = FAILED
    bytes: int = 0
    returncode: int | None = None
    message: str | None = None
    threads: int = 1

    def to_wire(self) -> dict[str, Any]:
        row = {"node": self.node, "kind": self.kind, "start": self.start, "end": self.end,
               "status": self.status, "bytes": self.bytes}
        if self.message is not None:
            row["returncode"] = self.returncode
            row["message"] = self.message
        if self.threads != 1:
            row["threads"] = self.threads
        return row

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> TraceRow:
        return cls(str(d["node"]), str(d["kind"]), d["start"], d.get("end"),
                   str(d.get("status") or FAILED), int(d.get("bytes") or 0),
                   d.get("returncode"), d.get("message"), int(d.get("threads") or 1))


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a task failed: the node and step, the ``kind`` (``stage``, ``not-found``, ``exit``,
    ``exception``, ``missing-output``, ``copyback``, ``timeout``, or ``engine`` when the engine
    itself could not run it), the return code if any, one sentence, the step's log and its last
    lines, and the task folder kept for inspection."""

    kind: str
    message: str
    node: str | None = None
    step: str | None = None
    returncode: int | None = None
    log: str | None = None
    tail: tuple[str, ...] = ()
    task_dir: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "node": self.node,
                "step": self.step, "returncode": self.returncode, "log": self.log,
                "tail": list(self.tail), "task_dir": self.task_dir}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Failure:
        return cls(str(d.get("kind") or "unknown"), str(d.get("message") or "the task failed"),
                   d.get("node"), d.get("step"), d.get("returncode"), d.get("log"),
                   tuple(d.get("tail") or ()), d.get("task_dir"))


def _stats(d: Any) -> dict[str, Stat]:
    return dict(d) if d else {}


@dataclass(frozen=True, slots=True)
class TaskResult:
    """What an engine did with one request.

    ``shared``, ``staged`` and ``outputs`` map the plan's paths (a shared file's and an input's
    source, an output's destination) to the :data:`Stat` the engine saw: a shared file when
    the machine stage looked at it, an input as it was copied, an output once in place."""

    job: str
    task: str
    attempt: int
    ok: bool
    host: str
    pid: int
    scratch: str
    trace: tuple[TraceRow, ...] = ()
    failure: Failure | None = None
    bytes_staged: int = 0
    bytes_copied: int = 0
    shared: Mapping[str, Stat] = field(default_factory=dict)
    staged: Mapping[str, Stat] = field(default_factory=dict)
    outputs: Mapping[str, Stat] = field(default_factory=dict)

    @property
    def machine(self) -> str:
        """The machine the engine runs on: host name and scratch root."""
        return f"{self.host}:{self.scratch}"

    @property
    def span(self) -> float | None:
        """Seconds from the first node's start to the last node's end, if any ran."""
        starts = [r.start for r in self.trace if r.start is not None]
        ends = [r.end for r in self.trace if r.end is not None]
        return max(ends) - min(starts) if starts and ends else None

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": VERSION, "job": self.job, "task": self.task, "attempt": self.attempt,
            "ok": self.ok, "host": self.host, "pid": self.pid, "scratch": self.scratch,
            "machine": self.machine, "trace": [r.to_wire() for r in self.trace],
            "failure": self.failure.to_wire() if self.failure is not None else None,
            "bytes_staged": self.bytes_staged, "bytes_copied": self.bytes_copied,
            "shared": dict(self.shared), "staged": dict(self.staged),
            "outputs": dict(self.outputs),
        }

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> TaskResult:
        """The result in ``d``; raises :class:`WireError` when it is not one."""
        if not isinstance(d, Mapping):
            raise WireError(f"a task result is a mapping, not {type(d).__name__}")
        _check_version(d, "task result")
        try:
            failure = d.get("failure")
            return cls(
                str(d["job"]), str(d["task"]), int(d.get("attempt") or 0), bool(d["ok"]),
                str(d["host"]), int(d["pid"]), str(d["scratch"]),
                tuple(TraceRow.from_wire(r) for r in d.get("trace") or ()),
                Failure.from_wire(failure) if failure else None,
                int(d.get("bytes_staged") or 0), int(d.get("bytes_copied") or 0),
                _stats(d.get("shared")), _stats(d.get("staged")), _stats(d.get("outputs")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise WireError(f"the task result is incomplete: {type(exc).__name__}: "
                            f"{exc}") from exc
