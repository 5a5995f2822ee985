"""A plan's task as the request an engine runs (:class:`~opals_dsl.plan.wire.TaskRequest` as
plain data)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..plan import model
from ..plan.model import Task
from ..plan.wire import Receipt, request_data, stage_data, step_data

if TYPE_CHECKING:
    import networkx as nx


def build_request(plan: nx.DiGraph, task: Task, attempt: int, *, scratch: str | None,
                  logs: Path, checksum: bool = False, run_id: str | None = None,
                  receipt: Receipt | None = None,
                  info: model.PlanInfo | None = None, start: int = 0,
                  shared: FirstSeen | None = None) -> dict[str, Any]:
    """The engine request for one task, as it travels (:class:`~opals_dsl.plan.wire.TaskRequest`
    as plain data); ``checksum`` asks the engine for the SHA-256 of each input it stages,
    ``run_id`` marks the steps' processes (``OPF_RUN_ID``), ``receipt`` asks for a receipt once
    the task's results landed (:meth:`opals_dsl.runtime.journal.Journal.stamp`); ``info`` is the
    plan's :func:`~opals_dsl.plan.model.info`, if it is at hand; ``start`` the step the task
    resumes at (:attr:`~opals_dsl.plan.wire.TaskRequest.start`); ``shared`` gives the shared
    files and ``call`` modules as the run first saw them (:class:`FirstSeen`), which the engine
    holds them to."""
    info = info or model.info(plan)
    machine, stage, execs, copyback = model.chain(plan, task)
    seen = {}
    if shared is not None:
        files = [src for src, _ in machine.files] if machine is not None else []
        files += [shared.module_file(e.call.function.partition(":")[0])
                  for e in execs if e.call is not None]
        for src in files:
            st = shared(src) if src else None
            if st is not None:
                seen[src] = st
    steps = [step_data(e.id, e.step, e.argv, e.call.function if e.call is not None else None,
                       e.call.kwargs if e.call is not None else {}, e.inputs, e.outputs, e.temp,
                       e.threads, e.timeout)
             for e in execs]
    return request_data(
        info.pipeline, info.root, task.job, task.task,
        stage_data(task.machine_stage, machine.files if machine is not None else ()),
        stage_data(task.task_stage, stage.files), steps,
        stage_data(task.copyback, copyback.files),
        attempt, scratch, str(logs / task.job), checksum, run_id, receipt, start, seen,
    )


def file_stat(root: str, path: str) -> list[int] | None:
    """``[size, mtime_ns]`` of the pipeline's file ``path`` (relative to ``root``, or absolute);
    None if it cannot be read."""
    try:
        st = os.stat(os.path.join(root, path))
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


class FirstSeen:
    """Files as a run first saw them: the :func:`file_stat` of each, taken once."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._seen: dict[str, list[int] | None] = {}
        self._modules: dict[str, str] = {}

    def module_file(self, module: str) -> str:
        """The file of a ``call``'s module in the pipeline folder (:func:`.model.module_file`),
        "" if it lies elsewhere; looked for once."""
        path = self._modules.get(module)
        if path is None:
            path = self._modules[module] = model.module_file(self.root, module) or ""
        return path

    def __call__(self, path: str) -> list[int] | None:
        if path not in self._seen:
            self._seen[path] = file_stat(self.root, path)
        return self._seen[path]
