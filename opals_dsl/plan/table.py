"""A plan held compactly, for running it: :class:`PlanTable`.

Running a plan does not need it as a ``networkx`` graph. The runtime reads a task's chain when
it sends the task to an engine and when the journal records it; the rest of the time it needs
only the list of tasks, what each waits for, and the folders the copy-backs write into. As a
graph a task costs some 2 KB (three nodes, their attribute dicts, their neighbour tables); a
million tasks then take 2 GB before the first one runs.

:class:`PlanTable` is a plan sink (:class:`~opals_dsl.plan.graph.PlanSink`): the planner hands
it each chain instead of adding the chain to a graph. Per task it keeps:

* the task's :class:`~opals_dsl.plan.model.Task` (the same objects :func:`model.tasks` gives
  for a graph; its step names are one tuple shared by the tasks of a job);
* the orders of the tasks it waits for;
* its chain's attribute dicts, pickled and compressed with the first chain of its job as the
  preset dictionary (``zlib``'s ``zdict``). The tasks of a job differ in a few names and
  numbers, so this is a few dozen bytes a task (20-70 for the examples and the benchmarks).

A few of the chains read last are kept decoded. Besides, the table keeps the machine stages,
the destination folders and which steps are ``call`` steps, as the planner passes them.

It answers what :mod:`~opals_dsl.plan.model` reads of a graph — ``graph`` (the attributes),
``nodes`` (``in``, ``[id]``, iteration, ``nodes(data=True)``), ``predecessors`` and ``edges`` —
so every reader works on it unchanged, and it offers :class:`~opals_dsl.plan.model.CompactPlan`'s
short ways for the readers of a run (tasks, a task's chain, destination folders, call steps).
"""

from __future__ import annotations

import pickle
import posixpath
import threading
import zlib
from collections.abc import Container, Iterator, Sequence
from typing import Any

from . import model
from .model import COPYBACK, EXEC, STAGE, PlanFormatError, Task, Tasks

#: compression level: the fastest; the preset dictionary does the work
_LEVEL = 1
#: a raw deflate stream (no header or checksum: the bytes never leave this process)
_WBITS = -15
#: how many decoded chains are kept (the scheduler and the journal read a task's chain in turn)
_KEEP = 64


class PlanTable(model.CompactPlan):
    """A plan for running, filled by the planner as a plan sink (see the module's text)."""

    def __init__(self) -> None:
        self.graph: dict[str, Any] = {}
        self._machines: dict[str, dict[str, Any]] = {}
        self._tasks: list[Task] = []
        self._upstream: list[tuple[int, ...]] = []
        self._blobs: list[bytes] = []
        self._zdicts: dict[str, bytes] = {}
        self._order: dict[str, dict[str, int]] = {}  # job -> task -> order
        self._folders: dict[str, None] = {}  # destination folders (plan form), first seen first
        self._calls: set[tuple[str, str]] = set()  # (job, step) of the call steps
        self._steps: dict[tuple[str, ...], tuple[str, ...]] = {}
        self._decoded: dict[int, list[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._found: Tasks | None = None
        self._ranks: dict[str, int] = {}  # job -> its place among the written jobs
        self._last: tuple[int, str, int, str] | None = None  # the rank of the last task added
        self._in_order = True

    # -- filled by the planner ------------------------------------------------------------

    def start(self, attrs: dict[str, Any]) -> None:
        self.graph = dict(attrs)
        self._ranks = {job: i for i, job in enumerate(self.graph.get("jobs") or ())}

    def _rank(self, t: Task) -> tuple[int, str, int, str]:
        """A task's key in plan order: jobs as written, then its index in its job."""
        return self._ranks.get(t.job, len(self._ranks)), t.job, t.index, t.task

    def add_chain(self, chain: Sequence[tuple[str, dict[str, Any]]],
                  after: Sequence[str] = ()) -> None:
        first_id, first = chain[0]
        if first["task"] is None:
            if len(chain) != 1 or first["kind"] != STAGE:
                raise PlanFormatError(f"plan node {first_id} has no task")
            self._machines[first_id] = first
            return
        job, task = first["job"], first["task"]
        if len(chain) < 2 or first["kind"] != STAGE or chain[-1][1]["kind"] != COPYBACK:
            raise PlanFormatError(f"task {job}/{task} of the plan lacks its task stage or "
                                  "copy-back")
        order = len(self._tasks)
        ups = {self._order_of(u) for u in after if u not in self._machines}
        steps: list[str] = []
        threads = 1
        for _, a in chain[1:-1]:
            steps.append(a["step"])
            threads = max(threads, int(a.get("threads") or 1))
            if a.get("call"):
                self._calls.add((job, a["step"]))
        for _, dest in chain[-1][1].get("files") or ():
            self._folders[posixpath.dirname(dest)] = None
        named = tuple(steps)
        named = self._steps.setdefault(named, named)
        added = Task(order, job, task, int(first.get("index") or 0),
                     int(first.get("retries") or 0), named, threads)
        self._tasks.append(added)
        rank = self._rank(added)
        if self._last is not None and rank < self._last:
            self._in_order = False  # a job planned before one written earlier: sorted at close
        self._last = rank
        self._order.setdefault(job, {})[task] = order
        self._upstream.append(tuple(sorted(ups)) if ups else ())
        raw = pickle.dumps([a for _, a in chain], pickle.HIGHEST_PROTOCOL)
        zdict = self._zdicts.setdefault(job, raw)
        pack = zlib.compressobj(_LEVEL, zlib.DEFLATED, _WBITS, 8, zlib.Z_DEFAULT_STRATEGY, zdict)
        self._blobs.append(pack.compress(raw) + pack.flush())

    def close(self) -> None:
        """Put the tasks in plan order (jobs as written, then each task's index in its job),
        as :func:`model.tasks` has them for a graph. The planner plans jobs in the order
        their inputs allow, mostly the written one: only then is there anything to do."""
        if self._in_order:
            return
        old = sorted(range(len(self._tasks)), key=lambda o: self._rank(self._tasks[o]))
        new = [0] * len(old)
        for i, o in enumerate(old):
            new[o] = i
        self._tasks = [_moved(self._tasks[o], i) for i, o in enumerate(old)]
        self._blobs = [self._blobs[o] for o in old]
        self._upstream = [tuple(sorted(new[u] for u in self._upstream[o])) for o in old]
        for t in self._tasks:
            self._order[t.job][t.task] = t.order
        self._decoded.clear()
        self._in_order = True

    def _order_of(self, nid: str) -> int:
        kind, _, rest = nid.partition(":")
        job, _, task = rest.partition("/")
        order = self._order.get(job, {}).get(task)
        if kind != COPYBACK or order is None:
            raise PlanFormatError(f"a task of the plan waits for {nid}, which is neither a "
                                  "machine stage nor the copy-back of an earlier task")
        return order

    # -- read by plan.model ---------------------------------------------------------------

    def tasks(self) -> Tasks:
        if self._found is None:
            self._found = Tasks(tuple(self._tasks), tuple(self._upstream))
        return self._found

    def chain(self, task: Task) -> tuple[model.MachineStage | None, model.TaskStage,
                                         list[model.Exec], model.Copyback]:
        attrs = self._chain(self._order[task.job][task.task])
        machine = self._machines.get(task.machine_stage)
        return (model.MachineStage.from_attrs(machine) if machine is not None else None,
                model.TaskStage.from_attrs(attrs[0]),
                [model.Exec.from_attrs(a) for a in attrs[1:-1]],
                model.Copyback.from_attrs(attrs[-1]))

    def destination_folders(self) -> set[str]:
        return set(self._folders)

    def call_steps(self) -> Container[str]:
        return _CallSteps(self._calls)

    def _chain(self, order: int) -> list[dict[str, Any]]:
        attrs = self._decoded.get(order)
        if attrs is None:
            unpack = zlib.decompressobj(_WBITS, self._zdicts[self._tasks[order].job])
            attrs = pickle.loads(unpack.decompress(self._blobs[order]))
            with self._lock:  # a listener may read the plan from another thread
                if len(self._decoded) >= _KEEP:
                    del self._decoded[next(iter(self._decoded))]
                self._decoded[order] = attrs
        return attrs

    # -- the graph's read interface -------------------------------------------------------

    @property
    def nodes(self) -> _Nodes:
        return _Nodes(self)

    def attrs(self, nid: str) -> dict[str, Any]:
        """The attributes of node ``nid``; KeyError if the plan has no such node."""
        if nid in self._machines:
            return self._machines[nid]
        kind, task, step = self._locate(nid)
        attrs = self._chain(task.order)
        if kind == STAGE:
            return attrs[0]
        if kind == COPYBACK:
            return attrs[-1]
        return attrs[1 + task.steps.index(step)]

    def _locate(self, nid: str) -> tuple[str, Task, str]:
        kind, _, rest = nid.partition(":")
        job, _, rest = rest.partition("/")
        step = ""
        if kind == EXEC:
            rest, _, step = rest.rpartition("/")
        order = self._order.get(job, {}).get(rest)
        if order is None or kind not in (STAGE, EXEC, COPYBACK):
            raise KeyError(nid)
        task = self._tasks[order]
        if kind == EXEC and step not in task.steps:
            raise KeyError(nid)
        return kind, task, step

    def __contains__(self, nid: object) -> bool:
        if not isinstance(nid, str):
            return False
        if nid in self._machines:
            return True
        try:
            self._locate(nid)
        except KeyError:
            return False
        return True

    def items(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every node with its attributes: the machine stages, then each task's chain."""
        yield from self._machines.items()
        for t in self._tasks:
            yield from zip(t.nodes[1:], self._chain(t.order), strict=True)

    def predecessors(self, nid: str) -> Iterator[str]:
        if nid in self._machines:
            return iter(())
        kind, task, step = self._locate(nid)
        if kind == STAGE:
            ups = [self._tasks[u].copyback for u in self._upstream[task.order]]
            return iter([task.machine_stage, *ups] if task.machine_stage in self._machines
                        else ups)
        chain = task.nodes
        return iter([chain[chain.index(nid) - 1]])

    @property
    def edges(self) -> Iterator[tuple[str, str]]:
        for t in self._tasks:
            stage = t.task_stage
            for u in self.predecessors(stage):
                yield u, stage
            chain = t.nodes[1:]
            yield from zip(chain, chain[1:], strict=False)


def _moved(task: Task, order: int) -> Task:
    return Task(order, task.job, task.task, task.index, task.retries, task.steps, task.threads)


class _Nodes:
    """``table.nodes``: the read side of a graph's node view."""

    __slots__ = ("_table",)

    def __init__(self, table: PlanTable) -> None:
        self._table = table

    def __contains__(self, nid: object) -> bool:
        return nid in self._table

    def __getitem__(self, nid: str) -> dict[str, Any]:
        return self._table.attrs(nid)

    def __iter__(self) -> Iterator[str]:
        t = self._table
        yield from t._machines
        for task in t._tasks:
            yield from task.nodes[1:]

    def __len__(self) -> int:
        t = self._table
        return len(t._machines) + sum(2 + len(task.steps) for task in t._tasks)

    def __call__(self, data: bool = False) -> Iterator[Any]:
        return self._table.items() if data else iter(self)


class _CallSteps:
    """The ids of a table's ``call`` steps, as a container: ``nid in calls``."""

    __slots__ = ("_calls",)

    def __init__(self, calls: set[tuple[str, str]]) -> None:
        self._calls = calls

    def __contains__(self, nid: object) -> bool:
        if not isinstance(nid, str) or not nid.startswith("exec:"):
            return False
        job = nid[5:].partition("/")[0]
        return (job, nid.rpartition("/")[2]) in self._calls
