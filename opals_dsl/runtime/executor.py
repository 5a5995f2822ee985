"""The engines as the scheduler sees them: an :class:`Executor` runs batches of task requests
on engines that it names and describes (:class:`EngineInfo`).

:class:`IPyParallelExecutor` is the real one; :class:`LocalExecutor` runs
requests in this process, one after the other: a deterministic, debuggable executor for tests
of the policy and for stepping through a run, and the one used when every task is skipped.

Engines import this module to unpickle an :class:`EngineCall`, so at the top it imports only
the standard library and opf modules that do the same (ipyparallel is imported where needed).
"""

from __future__ import annotations

import contextlib
import importlib
import socket
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import ClusterError
from . import engine as engine_side
from .steps import adopt_orphans, mark_engine


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """One engine: its id in the cluster and where it runs (``machine`` = host + scratch root)."""

    id: int
    host: str
    pid: int
    scratch: str
    machine: str


class Executor(Protocol):
    """What the scheduler needs from a cluster."""

    def engines(self) -> Mapping[int, EngineInfo]:
        """The engines usable now."""
        ...

    def submit(self, engine: int, batch: list[dict[str, Any]]) -> Future:
        """Start ``run_tasks(batch)`` on ``engine``; the future's result is the list of results."""
        ...

    def is_engine_loss(self, error: BaseException) -> bool:
        """True if a failed future means its engine is gone (not a failure of the tasks)."""
        ...

    def release(self, future: Future) -> None:
        """Forget a consumed future (results, metadata, history), so memory stays flat."""
        ...

    def refresh(self) -> tuple[list[EngineInfo], list[int]]:
        """Engines that joined and engine ids that left since the last call."""
        ...

    def withdraw(self, futures: list[Future]) -> None:
        """Best effort: drop batches that have not started yet (their futures then fail)."""
        ...

    def interrupt(self, engines: Iterable[int]) -> None:
        """Best effort: interrupt what these engines are running (Ctrl-C)."""
        ...

    def discard(self, engine: int) -> str | None:
        """Best effort: make sure a lost engine does no more work (an engine process of this
        machine that is still there is killed); say what was done, or None."""
        ...


class LocalExecutor:
    """Runs batches synchronously in this process; ``scratches`` gives one engine per entry.

    Each entry is a scratch root (or None for the default), so several local engines can play
    separate machines. Submitting runs the batch at once and returns a finished future.
    """

    def __init__(self, scratches: Iterable[str | None] = (None,)) -> None:
        self._engine = engine_side
        self._scratch = list(scratches)
        self._engines = {}
        for i, scratch in enumerate(self._scratch):
            ident = engine_side.identify(scratch)
            self._engines[i] = EngineInfo(i, ident["host"], ident["pid"], ident["scratch"],
                                          ident["machine"])

    def engines(self) -> Mapping[int, EngineInfo]:
        return self._engines

    def submit(self, engine: int, batch: list[dict[str, Any]]) -> Future:
        scratch = self._scratch[engine]
        if scratch is not None:
            batch = [dict(req, scratch=req.get("scratch") or scratch) for req in batch]
        future: Future = Future()
        try:
            future.set_result(self._engine.run_tasks(batch))
        except Exception as exc:
            future.set_exception(exc)
        return future

    def is_engine_loss(self, error: BaseException) -> bool:
        return False

    def release(self, future: Future) -> None:
        pass

    def refresh(self) -> tuple[list[EngineInfo], list[int]]:
        return [], []

    def withdraw(self, futures: list[Future]) -> None:
        pass

    def interrupt(self, engines: Iterable[int]) -> None:
        pass

    def discard(self, engine: int) -> str | None:
        return None


def describe_error(exc: BaseException) -> str:
    """An exception in a few words, also one an engine raised (ipyparallel's ``RemoteError``
    carries the engine's exception name and value)."""
    ename = getattr(exc, "ename", None)
    if ename:
        return f"{ename}: {getattr(exc, 'evalue', '')}".strip()
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


#: consumed messages between two clean-ups of ipyparallel's histories
PURGE_EVERY = 512


#: seconds between two questions to the controller whether it is still there
CONTROLLER_PING_EVERY = 2.0


class EngineCall:
    """A callable that names an engine-side function as ``"package.module:function"``.

    It pickles as that string, so an engine imports and runs its own copy of the function.
    """

    __slots__ = ("target",)

    def __init__(self, target: str) -> None:
        self.target = target

    def __getstate__(self) -> str:
        return self.target

    def __setstate__(self, state: str) -> None:
        self.target = state

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    def __repr__(self) -> str:
        return f"EngineCall({self.target!r})"

    @property
    def __name__(self) -> str:  # ipyparallel labels a task with its function's name
        return self.target.rpartition(":")[2]


RUN_TASKS = EngineCall("opals_dsl.runtime.engine:run_tasks")


PREPARE = EngineCall("opals_dsl.runtime.executor:prepare_engine")


def prepare_engine(scratch: str | None) -> dict[str, Any]:
    """Runs on an engine: plain tracebacks, import the engine module, adopt the orphans of the
    steps' processes (:func:`~opals_dsl.runtime.steps.adopt_orphans`) and mark them
    (:func:`~opals_dsl.runtime.steps.mark_engine`), say who and where it is."""
    adopt_orphans()
    mark_engine()
    with contextlib.suppress(Exception):
        from IPython import get_ipython

        shell = get_ipython()
        if shell is not None:
            shell.run_line_magic("colors", "nocolor")
    return engine_side.identify(scratch)


class IPyParallelExecutor:
    """Submits batches of task requests to chosen engines of an ipyparallel client."""

    def __init__(self, client: Any, *, scratch: str | None = None, timeout: float = 30.0) -> None:
        self.client = client
        self.scratch = scratch
        self.timeout = timeout
        #: the run id its engines carry in their environment (an embedded cluster), if any
        self.run_id: str | None = None
        self._views: dict[int, Any] = {}
        self._engines: dict[int, EngineInfo] = {}
        self._consumed: list[str] = []
        self._purge_next: list[str] = []
        self._ping: tuple[Any, float] | None = None
        self._last_ping = time.monotonic()
        self._unreachable = False
        # engine id -> (pid, creation time) of the engines that run on this machine
        self._local: dict[int, tuple[int, float]] = {}
        _quiet_late_replies(client)
        infos, errors = self._identify(client.ids)
        if errors:
            engine, message = errors[0]
            raise ClusterError(
                f"engine {engine} cannot run opf tasks: {message}\n"
                f"Every engine needs opf installed (the Python package opals_dsl) in the "
                f"Python it runs."
            )
        if not infos:
            raise ClusterError("the cluster has no engines")
        for info in infos:
            self._add(info)

    def _identify(self, ids: Iterable[int]) -> tuple[list[EngineInfo], list[tuple[int, str]]]:
        pending = {}
        errors: list[tuple[int, str]] = []
        for i in ids:
            try:
                pending[i] = self.client[i].apply_async(PREPARE, self.scratch)
            except Exception as exc:  # the engine left meanwhile
                errors.append((i, describe_error(exc)))
        infos = []
        deadline = time.monotonic() + self.timeout
        for i, ar in pending.items():
            try:
                ident = ar.get(timeout=max(0.1, deadline - time.monotonic()))
            except Exception as exc:
                errors.append((i, describe_error(exc)))
                continue
            infos.append(EngineInfo(i, ident["host"], ident["pid"], ident["scratch"],
                                    ident["machine"]))
        return infos, errors

    def _add(self, info: EngineInfo) -> None:
        self._engines[info.id] = info
        view = self.client[info.id]
        view.block = False
        self._views[info.id] = view
        if info.host == socket.gethostname():
            import psutil

            with contextlib.suppress(psutil.Error):
                self._local[info.id] = (info.pid, psutil.Process(info.pid).create_time())

    # the Executor interface

    def engines(self) -> Mapping[int, EngineInfo]:
        return dict(self._engines)

    def submit(self, engine: int, batch: list[dict[str, Any]]) -> Future:
        view = self._views.get(engine)
        if view is None:
            raise LookupError(f"engine {engine} is gone")
        return view.apply_async(RUN_TASKS, batch)

    def is_engine_loss(self, error: BaseException) -> bool:
        if isinstance(error, LookupError):  # rc[id] of an engine that left: IndexError
            return True
        return getattr(error, "ename", None) == "EngineError"

    def release(self, future: Future) -> None:
        client = self.client
        for msg_id in getattr(future, "msg_ids", None) or ():
            client.results.pop(msg_id, None)
            client.metadata.pop(msg_id, None)
            client._futures.pop(msg_id, None)
            client._output_futures.pop(msg_id, None)
            self._consumed.append(msg_id)
        if len(self._consumed) >= PURGE_EVERY:
            self._purge()

    def _purge(self) -> None:
        client = self.client
        consumed, self._consumed = self._consumed, []
        for msg_id in consumed:  # late output messages may have re-created an entry
            client.metadata.pop(msg_id, None)
        outstanding = client.outstanding
        if not outstanding:
            client.history.clear()
            for view in self._views.values():
                view.history.clear()
        else:
            client.history[:] = [m for m in client.history if m in outstanding]
            for view in self._views.values():
                view.history[:] = [m for m in view.history if m in outstanding]
        # the hub learns of a result a moment after we do: forget the previous window's
        old, self._purge_next = self._purge_next, consumed
        if old:
            with contextlib.suppress(Exception):
                client.purge_hub_results(jobs=old)

    def _controller_answers(self) -> bool:
        """Whether the controller still answers: a dead controller tells nobody, the client's
        engine list stays as it was and results never come, so it is asked now and then (a
        queue-status request) and given ``timeout`` seconds to reply."""
        now = time.monotonic()
        if self._ping is not None:
            reply, sent = self._ping
            if not reply.done():
                return now - sent <= self.timeout
            self._ping = None
        if now - self._last_ping >= CONTROLLER_PING_EVERY:
            self._last_ping = now
            try:
                reply = self.client._send(
                    self.client._query_stream, "queue_request",
                    content={"targets": "all", "verbose": False},
                )
            except Exception:
                return False
            self._ping = (reply, now)
        return True

    def refresh(self) -> tuple[list[EngineInfo], list[int]]:
        if not self._controller_answers():
            self._unreachable = True  # the engines are not to blame: leave them be
            gone = sorted(self._engines)  # every engine is out of reach with its controller
            self._engines.clear()
            self._views.clear()
            return [], gone
        try:
            current = set(self.client.ids)
        except Exception:
            return [], []
        gone = sorted(set(self._engines) - current)
        for eid in gone:
            self._engines.pop(eid, None)
            self._views.pop(eid, None)
        new = sorted(current - set(self._engines))
        added: list[EngineInfo] = []
        if new:
            infos, _ = self._identify(new)  # an engine that cannot run tasks is left out
            for info in infos:
                self._add(info)
                added.append(info)
        return added, gone

    def withdraw(self, futures: list[Future]) -> None:
        self.client.abort(jobs=list(futures), block=False)

    def interrupt(self, engines: Iterable[int]) -> None:
        targets = [e for e in engines if e in self._views]
        if targets:
            self.client.send_signal("SIGINT", targets=targets, block=False)

    def discard(self, engine: int) -> str | None:
        """Kill a lost engine's process if it runs on this machine: an engine taken for lost
        (frozen with ``kill -STOP``, swapping, hung) would otherwise hold its task's folder,
        and the task could not run elsewhere on this machine. Its steps die with it (their
        groups are ended by the engine's lifeline)."""
        self._views.pop(engine, None)
        self._engines.pop(engine, None)
        local = self._local.pop(engine, None)
        if local is None or self._unreachable:
            return None
        import psutil

        pid, created = local
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - created) > 0.01:
                return None
            status = proc.status()
            if status in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                return None
            proc.kill()
        except psutil.Error:
            return None
        how = "was stopped" if status == psutil.STATUS_STOPPED else "did not answer"
        return f"its process {pid} on this machine {how}; it was killed, with its steps"

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close(linger=0)


def _quiet_late_replies(client: Any) -> None:
    """Drop replies to requests the client no longer waits for. An engine that was taken for
    lost and comes back (``kill -CONT``) still answers; ipyparallel would print each such
    "stale result" — the whole message — on standard output."""
    handlers = getattr(client, "_queue_handlers", None)
    if not isinstance(handlers, dict):
        return
    for kind, handler in list(handlers.items()):
        def only_awaited(msg: Any, handler: Any = handler) -> None:
            with contextlib.suppress(Exception):
                md = msg.get("metadata") or {}
                if md.get("is_broadcast") and md.get("is_coalescing"):
                    msg_id = md.get("original_msg_id")
                else:
                    msg_id = (msg.get("parent_header") or {}).get("msg_id")
                if msg_id not in client.outstanding:
                    return
            handler(msg)

        handlers[kind] = only_awaited
