"""The plan contract: the node kinds of a plan and a task's chain, as types.

A plan is a ``networkx.DiGraph`` (docs/plan-format.md) whose node attributes are plain data, so
that ``opf compile --json`` writes it as it is. This module is the one place that knows those
attributes: the planner writes every node through the ``*_attrs`` functions below, and every
reader (the scheduler, the engine request, the journal, the report, the DOT drawing, the
command line) reads them back through :func:`node` and :func:`tasks` as frozen dataclasses.
Nobody else reads a node attribute by its string key, so adding or renaming one is a change
here that the type checker and these tests follow everywhere.

Four node kinds, one class each:

=====================  ===========================  ========================================
node id                class                        what it does
=====================  ===========================  ========================================
``stage:JOB``          :class:`MachineStage`        Job Prephase: job folder + shared files
``stage:JOB/TASK``     :class:`TaskStage`           Task Prephase: task folder + inputs
``exec:JOB/TASK/STEP`` :class:`Exec`                one step, in the task folder
``copyback:JOB/TASK``  :class:`Copyback`            Task Postphase: outputs to destinations
=====================  ===========================  ========================================

A :class:`Task` is one chain ``stage:JOB → stage:JOB/TASK → exec… → copyback:JOB/TASK`` with
its place in plan order; :func:`tasks` finds every chain of a plan and the tasks each waits for
(a task waits for the copy-backs that lead into its task stage).

Why functions that build dicts beside the classes: the planner writes hundreds of thousands of
nodes, and building a frozen dataclass per node only to turn it into a dict would cost a
quarter of the planning time. The ``*_attrs`` functions are the single definition of each
kind's attributes and their order (the order is the order of ``opf compile --json``); each
class's :meth:`to_attrs` calls its function, and a test checks that ``from_attrs`` inverts it.

This module imports only the standard library: the graph is only read through ``graph.nodes``,
``graph.graph`` and ``graph.predecessors``.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Container, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import networkx as nx

STAGE = "stage"
EXEC = "exec"
COPYBACK = "copyback"
#: the ``scope`` of a stage node
MACHINE = "machine"
TASK = "task"

#: a file moved by a stage or copy-back node: (from, to) — see each class for which is which
FilePair = tuple[str, str]


class PlanFormatError(ValueError):
    """A graph that does not follow the plan contract (not one the planner wrote)."""


# -- node ids ---------------------------------------------------------------------------------


def machine_stage_id(job: str) -> str:
    return f"stage:{job}"


def task_stage_id(job: str, task: str) -> str:
    return f"stage:{job}/{task}"


def exec_id(job: str, task: str, step: str) -> str:
    return f"exec:{job}/{task}/{step}"


def copyback_id(job: str, task: str) -> str:
    return f"copyback:{job}/{task}"


def step_of(nid: str | None) -> str | None:
    """The step an exec node id names (step names hold no ``/``); None for other nodes."""
    if nid and nid.startswith("exec:"):
        return nid.rsplit("/", 1)[-1]
    return None


# -- the attributes of each kind: written by the planner, read by from_attrs -----------------
#
# ``files`` and the lists of an exec node are stored as given (lists of lists, as JSON has
# them); ``affinity`` is the (job, task) tuple that pins a task's nodes to one engine.
#
# Each node's attributes are a plain ``dict``, but made as the instance dict of a small class
# per kind, attributes set in the same order every time: CPython then lets all dicts of a kind
# share one table of keys and keep only their values (an exec node's 13 attributes: 232 bytes
# instead of 504). They are ordinary dicts in every other respect; one that gains a key simply
# gets a table of its own.


class _TaskStageAttrs:
    def __init__(self, job: str, task: str, affinity: tuple[str, str], index: int,
                 retries: int, files: list[list[str]]) -> None:
        self.kind = STAGE
        self.scope = TASK
        self.job = job
        self.task = task
        self.affinity = affinity
        self.index = index
        self.retries = retries
        self.files = files


class _ExecAttrs:
    def __init__(self, job: str, task: str, step: str, affinity: tuple[str, str], index: int,
                 argv: list[str] | None, call: dict[str, Any] | None, inputs: list[str],
                 outputs: list[str], temp: list[str], threads: int,
                 timeout: float | None) -> None:
        self.kind = EXEC
        self.job = job
        self.task = task
        self.step = step
        self.affinity = affinity
        self.index = index
        self.argv = argv
        self.call = call
        self.inputs = inputs
        self.outputs = outputs
        self.temp = temp
        self.threads = threads
        self.timeout = timeout


class _CopybackAttrs:
    def __init__(self, job: str, task: str, affinity: tuple[str, str],
                 files: list[list[str]]) -> None:
        self.kind = COPYBACK
        self.job = job
        self.task = task
        self.affinity = affinity
        self.files = files


def machine_stage_attrs(job: str, files: list[list[str]]) -> dict[str, Any]:
    return {"kind": STAGE, "scope": MACHINE, "job": job, "task": None, "affinity": None,
            "files": files}


def task_stage_attrs(job: str, task: str, affinity: tuple[str, str], index: int, retries: int,
                     files: list[list[str]]) -> dict[str, Any]:
    return _TaskStageAttrs(job, task, affinity, index, retries, files).__dict__


def exec_attrs(job: str, task: str, step: str, affinity: tuple[str, str], index: int,
               argv: list[str] | None, call: dict[str, Any] | None, inputs: list[str],
               outputs: list[str], temp: list[str], threads: int = 1,
               timeout: float | None = None) -> dict[str, Any]:
    return _ExecAttrs(job, task, step, affinity, index, argv, call, inputs, outputs, temp,
                      threads, timeout).__dict__


def may_hold_floats(attrs: Mapping[str, Any]) -> bool:
    """Can this node's attributes hold a float? Only an exec node's ``timeout`` and a
    ``call``'s arguments can; every other attribute is a string, an integer, None or a list of
    those. (The plan's JSON writer picks its encoder by this, :mod:`opals_dsl.plan.graph`.)"""
    return attrs.get("timeout") is not None or attrs.get("call") is not None


def copyback_attrs(job: str, task: str, affinity: tuple[str, str],
                   files: list[list[str]]) -> dict[str, Any]:
    return _CopybackAttrs(job, task, affinity, files).__dict__


def call_attrs(function: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    return {"function": function, "kwargs": kwargs}


# -- the node kinds ---------------------------------------------------------------------------


def _pairs(files: Sequence[Sequence[str]] | None) -> tuple[FilePair, ...]:
    # the pairs as tuples (a tuple of a tuple is the same object: nothing is copied then)
    return tuple(map(tuple, files)) if files else ()  # type: ignore[arg-type]


def _lists(pairs: Sequence[FilePair]) -> list[list[str]]:
    return [[a, b] for a, b in pairs]


@dataclass(frozen=True, slots=True)
class MachineStage:
    """Job Prephase, run at most once per machine: ``files`` are (source on the shared drive,
    base name in the job folder)."""

    job: str
    files: tuple[FilePair, ...] = ()

    kind = STAGE
    scope = MACHINE
    task = None

    @property
    def id(self) -> str:
        return machine_stage_id(self.job)

    def to_attrs(self) -> dict[str, Any]:
        return machine_stage_attrs(self.job, _lists(self.files))

    @classmethod
    def from_attrs(cls, a: Mapping[str, Any]) -> MachineStage:
        return cls(a["job"], _pairs(a.get("files")))


@dataclass(frozen=True, slots=True)
class TaskStage:
    """Task Prephase: ``files`` are (source on the shared drive — an input, or an upstream
    task's published output —, path relative to the task folder); ``index`` is the task's
    position in its job, ``retries`` how often it may run again after a failure."""

    job: str
    task: str
    index: int = 0
    retries: int = 0
    files: tuple[FilePair, ...] = ()

    kind = STAGE
    scope = TASK

    @property
    def id(self) -> str:
        return task_stage_id(self.job, self.task)

    def to_attrs(self) -> dict[str, Any]:
        return task_stage_attrs(self.job, self.task, (self.job, self.task), self.index,
                                self.retries, _lists(self.files))

    @classmethod
    def from_attrs(cls, a: Mapping[str, Any]) -> TaskStage:
        return cls(a["job"], a["task"], int(a.get("index") or 0), int(a.get("retries") or 0),
                   _pairs(a.get("files")))


@dataclass(frozen=True, slots=True)
class Call:
    """A ``call`` step: ``function`` is ``package.module:function``; ``kwargs`` plain values,
    files as paths relative to the task folder."""

    function: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def to_attrs(self) -> dict[str, Any]:
        return call_attrs(self.function, dict(self.kwargs))

    @classmethod
    def from_attrs(cls, a: Mapping[str, Any]) -> Call:
        return cls(str(a["function"]), dict(a.get("kwargs") or {}))


@dataclass(frozen=True, slots=True)
class Exec:
    """One step of a task: exactly one of ``argv`` (words; a first word ``python`` means the
    engine's interpreter) and ``call``. ``inputs`` are the files it reads, ``outputs`` every
    file it declares, ``temp`` those never copied back — all relative to the task folder
    (shared files as ``../name``). ``threads`` is how many engine slots of its machine the
    step holds while it runs (and the thread count its process is told); ``timeout`` the
    seconds it may run before it is stopped (None: no limit)."""

    job: str
    task: str
    step: str
    index: int
    argv: tuple[str, ...] | None = None
    call: Call | None = None
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    temp: tuple[str, ...] = ()
    threads: int = 1
    timeout: float | None = None

    kind = EXEC

    @property
    def id(self) -> str:
        return exec_id(self.job, self.task, self.step)

    def to_attrs(self) -> dict[str, Any]:
        return exec_attrs(
            self.job, self.task, self.step, (self.job, self.task), self.index,
            list(self.argv) if self.argv is not None else None,
            self.call.to_attrs() if self.call is not None else None,
            list(self.inputs), list(self.outputs), list(self.temp), self.threads,
            self.timeout,
        )

    @classmethod
    def from_attrs(cls, a: Mapping[str, Any]) -> Exec:
        argv = a.get("argv")
        call = a.get("call")
        timeout = a.get("timeout")
        return cls(
            a["job"], a["task"], a["step"], int(a.get("index") or 0),
            tuple(argv) if argv is not None else None,
            Call.from_attrs(call) if call else None,
            tuple(a.get("inputs") or ()), tuple(a.get("outputs") or ()),
            tuple(a.get("temp") or ()), int(a.get("threads") or 1),
            float(timeout) if timeout is not None else None,
        )


@dataclass(frozen=True, slots=True)
class Copyback:
    """Task Postphase: ``files`` are (path relative to the task folder, destination on the
    shared drive)."""

    job: str
    task: str
    files: tuple[FilePair, ...] = ()

    kind = COPYBACK

    @property
    def id(self) -> str:
        return copyback_id(self.job, self.task)

    def to_attrs(self) -> dict[str, Any]:
        return copyback_attrs(self.job, self.task, (self.job, self.task), _lists(self.files))

    @classmethod
    def from_attrs(cls, a: Mapping[str, Any]) -> Copyback:
        return cls(a["job"], a["task"], _pairs(a.get("files")))


Node = MachineStage | TaskStage | Exec | Copyback


def from_attrs(a: Mapping[str, Any]) -> Node:
    """The typed node for one node's attributes."""
    kind = a.get("kind")
    if kind == EXEC:
        return Exec.from_attrs(a)
    if kind == STAGE:
        if a.get("task") is None:
            return MachineStage.from_attrs(a)
        return TaskStage.from_attrs(a)
    if kind == COPYBACK:
        return Copyback.from_attrs(a)
    raise PlanFormatError(f"a plan node of unknown kind {kind!r}")


class CompactPlan:
    """A plan that is not a graph but reads like one (:class:`~opals_dsl.plan.table.PlanTable`:
    ``graph``, ``nodes``, ``predecessors``, ``edges``), with short ways for what a run reads
    most. The functions of this module take them; the subclass gives each."""

    graph: dict[str, Any]

    def tasks(self) -> Tasks:
        raise NotImplementedError

    def chain(self, task: Task) -> tuple[MachineStage | None, TaskStage, list[Exec], Copyback]:
        raise NotImplementedError

    def destination_folders(self) -> set[str]:
        raise NotImplementedError

    def call_steps(self) -> Container[str]:
        raise NotImplementedError


def node(graph: nx.DiGraph, nid: str) -> Node:
    """The typed node ``nid`` of a plan."""
    return from_attrs(graph.nodes[nid])


def nodes(graph: nx.DiGraph) -> Iterator[tuple[str, Node]]:
    """Every node of a plan, typed, in the graph's order."""
    for nid, a in graph.nodes(data=True):
        yield nid, from_attrs(a)


def kind_of(graph: nx.DiGraph, nid: str) -> str:
    """A node's kind (``stage``, ``exec`` or ``copyback``) without reading the rest."""
    return str(graph.nodes[nid]["kind"])


def job_of(graph: nx.DiGraph, nid: str) -> str:
    """The job a node belongs to, without reading the rest."""
    return str(graph.nodes[nid]["job"])


# -- the plan as a whole ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlanInfo:
    """The graph's own attributes: the pipeline's name, its folder (absolute), the pipeline
    file's name relative to it, the parameters after ``--param``, the jobs in written order."""

    pipeline: str
    root: str
    params: Mapping[str, Any] = field(default_factory=dict)
    jobs: tuple[str, ...] = ()
    source: str | None = None

    def to_attrs(self) -> dict[str, Any]:
        return graph_attrs(self.pipeline, self.root, dict(self.params), list(self.jobs),
                           self.source)


def graph_attrs(pipeline: str, root: str, params: dict[str, Any], jobs: list[str],
                source: str | None = None) -> dict[str, Any]:
    attrs: dict[str, Any] = {"pipeline": pipeline, "root": root, "params": params, "jobs": jobs}
    if source is not None:
        attrs["source"] = source
    return attrs


def info(graph: nx.DiGraph) -> PlanInfo:
    g = graph.graph
    return PlanInfo(str(g["pipeline"]), str(g["root"]), dict(g.get("params") or {}),
                    tuple(g.get("jobs") or ()), g.get("source"))


def set_source(graph: nx.DiGraph, source: str) -> None:
    """Record the pipeline file's name (relative to the plan's root) in the plan."""
    graph.graph["source"] = source


class PlanCounts:
    """The size of a plan — its pipeline's name, jobs, tasks and steps to run — counted as the
    planner writes it, instead of building the graph (``opf check``, the summary of ``opf
    compile``): a plan sink, like :class:`~opals_dsl.plan.graph.NodeLinkWriter`."""

    __slots__ = ("pipeline", "jobs", "tasks", "steps")

    def __init__(self) -> None:
        self.pipeline, self.jobs, self.tasks, self.steps = "", 0, 0, 0

    @classmethod
    def of(cls, graph: nx.DiGraph) -> PlanCounts:
        """The counts of a plan that is already a graph."""
        counts = cls()
        counts.start(graph.graph)
        found = tasks(graph)
        counts.tasks = len(found)
        counts.steps = sum(len(t.steps) for t in found.tasks)
        return counts

    def start(self, attrs: Mapping[str, Any]) -> None:
        self.pipeline, self.jobs = str(attrs["pipeline"]), len(attrs.get("jobs") or ())

    def add_chain(self, chain: Sequence[tuple[str, dict[str, Any]]],
                  after: object = ()) -> None:
        for _, attrs in chain:
            kind = attrs["kind"]
            if kind == EXEC:
                self.steps += 1
            elif kind == STAGE and attrs["scope"] == TASK:
                self.tasks += 1

    def close(self) -> None:
        pass


@dataclass(frozen=True, slots=True)
class Task:
    """One task's chain, with its place in plan order (jobs as written, then the task's index
    in its job), how often it may be retried, its steps' names in step order and the most
    engine slots one of its steps holds (``threads``)."""

    order: int
    job: str
    task: str
    index: int
    retries: int
    steps: tuple[str, ...]
    threads: int = 1

    @property
    def name(self) -> str:
        return f"{self.job}/{self.task}"

    @property
    def machine_stage(self) -> str:
        return machine_stage_id(self.job)

    @property
    def task_stage(self) -> str:
        return task_stage_id(self.job, self.task)

    @property
    def execs(self) -> tuple[str, ...]:
        """The exec nodes' ids, in step order."""
        return tuple(exec_id(self.job, self.task, step) for step in self.steps)

    @property
    def copyback(self) -> str:
        return copyback_id(self.job, self.task)

    @property
    def nodes(self) -> tuple[str, ...]:
        """Every node of the chain, the machine stage first."""
        return (self.machine_stage, self.task_stage, *self.execs, self.copyback)

    def kinds(self) -> list[tuple[str, str]]:
        """Every node of the chain with its kind, the machine stage first."""
        return [(self.machine_stage, STAGE), (self.task_stage, STAGE),
                *((nid, EXEC) for nid in self.execs), (self.copyback, COPYBACK)]


@dataclass(frozen=True, slots=True)
class Tasks:
    """A plan's tasks in plan order, and for each the orders of the tasks it waits for."""

    tasks: tuple[Task, ...]
    upstream: tuple[tuple[int, ...], ...]

    def __len__(self) -> int:
        return len(self.tasks)

    def downstream(self) -> list[list[int]]:
        """For each task, the tasks that wait for it (in plan order)."""
        downs: list[list[int]] = [[] for _ in self.tasks]
        for i, ups in enumerate(self.upstream):
            for u in ups:
                downs[u].append(i)
        return downs


def tasks(graph: nx.DiGraph) -> Tasks:
    """Every task chain of a plan, checked, in plan order, with what each waits for.

    Raises :class:`PlanFormatError` for a graph that is not a plan: a node of an unknown kind,
    a task without its task stage or copy-back, a task stage waiting for something other than a
    machine stage or a copy-back."""
    if isinstance(graph, CompactPlan):
        return graph.tasks()
    jobs = list(graph.graph.get("jobs") or [])
    job_rank = {job: i for i, job in enumerate(jobs)}
    # per task, a short list rather than a dict (a plan has a million of them):
    # [task stage, index, retries, copy-back, threads, [exec node...]]
    found: dict[tuple[str, str], list[Any]] = {}
    for nid, a in graph.nodes(data=True):
        kind = a.get("kind")
        task = a.get("task")
        if task is None:
            if kind != STAGE:
                raise PlanFormatError(f"plan node {nid} has no task")
            continue
        chain = found.get((a["job"], task))
        if chain is None:
            chain = found[(a["job"], task)] = [None, 0, 0, None, 1, []]
        if kind == STAGE:
            chain[0] = nid
            chain[1] = int(a.get("index") or 0)
            chain[2] = int(a.get("retries") or 0)
        elif kind == EXEC:
            chain[5].append(nid)
            threads = a.get("threads")
            if threads is not None and threads > chain[4]:
                chain[4] = int(threads)
        elif kind == COPYBACK:
            chain[3] = nid
        else:
            raise PlanFormatError(f"plan node {nid} has an unknown kind {kind!r}")

    def step_index(nid: str) -> int:
        return int(graph.nodes[nid].get("index") or 0)

    def rank(item: tuple[tuple[str, str], list[Any]]) -> tuple[int, str, int, str]:
        (job, task), chain = item
        return job_rank.get(job, len(jobs)), job, chain[1], task

    ordered: Any = found.items()
    previous = None
    for item in ordered:  # the planner's plans are in order already: no sort, no sort keys
        key = rank(item)
        if previous is not None and key < previous:
            ordered = sorted(found.items(), key=rank)
            break
        previous = key
    chains: list[Task] = []
    order_of: dict[str, int] = {}
    shared: dict[tuple[str, ...], tuple[str, ...]] = {}  # one tuple of step names a job
    for order, ((job, task), chain) in enumerate(ordered):
        stage, index, retries, copyback, threads, execs = chain
        if stage is None or copyback is None:
            raise PlanFormatError(f"task {job}/{task} of the plan lacks its task stage or "
                                  "copy-back")
        execs.sort(key=step_index)
        steps = tuple(str(graph.nodes[nid]["step"]) for nid in execs)
        t = Task(order, job, task, index, retries, shared.setdefault(steps, steps), threads)
        if t.task_stage != stage or t.copyback != copyback or list(t.execs) != execs:
            raise PlanFormatError(f"the nodes of task {t.name} do not have the ids the plan "
                                  f"format gives them")
        chains.append(t)
        order_of[t.copyback] = order
    upstream: list[tuple[int, ...]] = []
    nodes_ = graph.nodes
    for t in chains:
        ups: set[int] = set()
        for pred in graph.predecessors(t.task_stage):
            if pred in order_of:
                ups.add(order_of[pred])
            elif nodes_[pred].get("kind") != STAGE or nodes_[pred].get("task") is not None:
                raise PlanFormatError(f"task stage {t.task_stage} waits for {pred}, which is "
                                      "neither a machine stage nor a copy-back")
        upstream.append(tuple(sorted(ups)))
    return Tasks(tuple(chains), tuple(upstream))


def chain(graph: nx.DiGraph, task: Task) -> tuple[MachineStage | None, TaskStage, list[Exec],
                                                 Copyback]:
    """The typed nodes of one task: machine stage (None if the plan lacks it), task stage,
    exec nodes in step order, copy-back."""
    if isinstance(graph, CompactPlan):
        return graph.chain(task)
    nodes_ = graph.nodes
    machine = (MachineStage.from_attrs(nodes_[task.machine_stage])
               if task.machine_stage in nodes_ else None)
    return (machine, TaskStage.from_attrs(nodes_[task.task_stage]),
            [Exec.from_attrs(nodes_[nid]) for nid in task.execs],
            Copyback.from_attrs(nodes_[task.copyback]))


def destination_folders(graph: nx.DiGraph) -> set[str]:
    """The folders the copy-back nodes write into (plan form: relative to the root or
    absolute; ``""`` the root itself)."""
    if isinstance(graph, CompactPlan):
        return graph.destination_folders()
    return {posixpath.dirname(dest) for dest in destinations(graph)}


def destinations(graph: nx.DiGraph) -> Iterator[str]:
    """Every destination a copy-back node writes (plan form: relative to the root or
    absolute)."""
    for _, a in graph.nodes(data=True):
        if a.get("kind") == COPYBACK:
            for _, dest in a.get("files") or ():
                yield dest


def module_file(root: str, module: str) -> str | None:
    """The file of a ``call``'s module (``pkg.mod``) in the pipeline's folder ``root``:
    ``pkg/mod.py`` or ``pkg/mod/__init__.py``, relative to it; None if it lies elsewhere (the
    planner reads it as an input of the job, the journal as an input of its tasks)."""
    base = module.replace(".", "/")
    for candidate in (f"{base}.py", f"{base}/__init__.py"):
        if module and os.path.isfile(os.path.join(root, candidate)):
            return candidate
    return None


def call_steps(graph: nx.DiGraph) -> Container[str]:
    """The ids of the exec nodes that are ``call`` steps (they have no exit status)."""
    if isinstance(graph, CompactPlan):
        return graph.call_steps()
    return {nid for nid, a in graph.nodes(data=True) if a.get("kind") == EXEC and a.get("call")}
