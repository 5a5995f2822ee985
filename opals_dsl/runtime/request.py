"""A plan's task as the request an engine runs (:class:`~opals_dsl.plan.wire.TaskRequest` as
plain data)."""

from __future__ import annotations

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
                  info: model.PlanInfo | None = None, start: int = 0) -> dict[str, Any]:
    """The engine request for one task, as it travels (:class:`~opals_dsl.plan.wire.TaskRequest`
    as plain data); ``checksum`` asks the engine for the SHA-256 of each input it stages,
    ``run_id`` marks the steps' processes (``OPF_RUN_ID``), ``receipt`` asks for a receipt once
    the task's results landed (:meth:`opals_dsl.runtime.journal.Journal.stamp`); ``info`` is the
    plan's :func:`~opals_dsl.plan.model.info`, if it is at hand; ``start`` the step the task
    resumes at (:attr:`~opals_dsl.plan.wire.TaskRequest.start`)."""
    info = info or model.info(plan)
    machine, stage, execs, copyback = model.chain(plan, task)
    steps = [step_data(e.id, e.step, e.argv, e.call.function if e.call is not None else None,
                       e.call.kwargs if e.call is not None else {}, e.inputs, e.outputs, e.temp,
                       e.threads, e.timeout)
             for e in execs]
    return request_data(
        info.pipeline, info.root, task.job, task.task,
        stage_data(task.machine_stage, machine.files if machine is not None else ()),
        stage_data(task.task_stage, stage.files), steps,
        stage_data(task.copyback, copyback.files),
        attempt, scratch, str(logs / task.job), checksum, run_id, receipt, start,
    )
