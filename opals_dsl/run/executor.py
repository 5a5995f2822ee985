"""The engines as the scheduler sees them: an :class:`Executor` runs batches of task requests
on engines that it names and describes (:class:`EngineInfo`).

:class:`opals_dsl.run.cluster.IPyParallelExecutor` is the real one; :class:`LocalExecutor` runs
requests in this process, one after the other: a deterministic, debuggable executor for tests
of the policy and for stepping through a run, and the one used when every task is skipped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol


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
        from . import engine

        self._engine = engine
        self._scratch = list(scratches)
        self._engines = {}
        for i, scratch in enumerate(self._scratch):
            ident = engine.identify(scratch)
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
