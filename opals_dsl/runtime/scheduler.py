"""The scheduler: runs a plan (``networkx.DiGraph``, docs/plan-format.md) on a set of engines.

In: the plan (its tasks read through :mod:`opals_dsl.plan.model`) and an
:class:`~opals_dsl.runtime.executor.Executor` (a few engines that each run
:func:`~opals_dsl.runtime.engine.run_tasks` on batches of task requests). Out: a
:class:`~opals_dsl.runtime.events.RunSummary`, a trace file (one row per plan node, JSON lines) and
events for a :class:`~opals_dsl.runtime.events.RunListener` (the progress display, the journal of
:mod:`.journal`). :mod:`.session` wires a run around it.

Unit of work
    A plan's task is the chain machine stage → task stage → exec nodes → copy-back, all pinned to
    one engine by its ``affinity``. The scheduler submits whole chains: a task's request carries
    every node of the chain and the engine runs them in order and reports one trace row per node,
    so the nodes stay explicit in the trace while the driver pays for one message per *batch* of
    tasks, not per node. The machine stage travels with every task of its job; the engine decides
    (under a lock shared by the engines of one machine) whether it still has to be done there.

State (only the loop in :meth:`Scheduler.run` changes it)
    per task: ``pending`` (upstream tasks not finished yet), ``state`` (waiting, ready, running,
    done, skipped, failed, blocked, not-run) and ``attempt``; a heap of ready tasks keyed by plan
    order; per engine the batches it holds and the number of tasks in them; the batches in
    flight. A task becomes ready when every upstream task whose published outputs its task stage
    reads (the copy-back predecessors of its task stage) is done or skipped.

Policy
    * Ready tasks are taken in plan order (jobs as written, tasks by index), so runs are
      repeatable and ties are broken the same way every time.
    * A batch goes to the engine with the fewest tasks outstanding (ties: lowest engine id), and
      an engine holds at most ``depth`` batches, so it always has the next batch queued while
      it works on one, and no more.
    * Batch size adapts to what the tasks cost: the first batches of a job hold one task; after
      that a batch holds about ``batch_seconds`` of work at the job's measured mean task time
      (at most ``max_batch`` tasks and never more than a fair share of the ready tasks). Long
      tasks therefore travel alone, which keeps engines evenly loaded and lets a downstream task
      start as soon as its own upstream task is done; thousands of tiny tasks travel in dozens,
      which is what makes the driver fast.
    * A task whose steps use ``threads N`` (N > 1) travels alone and holds N engines of one
      machine — the one it runs on and N - 1 it borrows — until it is over (:mod:`.slots`).

Results come back as futures (ipyparallel's ``AsyncResult`` is a ``concurrent.futures.Future``);
their done-callbacks only put the batch on a completion queue, and the loop consumes it.

Outcomes
    * A task whose request fails is submitted again (from its task stage, to whichever engine is
      least loaded) until it has used its ``retries`` (the task stage node's ``retries``
      attribute, 0 if absent, or the scheduler's ``retries`` for every task). Failed for good:
      without ``keep_going`` no new task is submitted, batches not yet started are withdrawn,
      running ones finish; with it, only the tasks that depend on the failure (transitively) are
      left out, and ``summary.blocked_by`` says which failure left out which tasks.
    * An engine that is lost (its result fails as an engine failure, or it leaves the cluster)
      takes no more work; the tasks it held go back to the ready heap with their attempt number
      unchanged, and each gets a trace row with status ``lost`` for its task stage on that
      engine. The executor is asked to ``discard`` it (a lost engine still running on this
      machine is killed, so that it cannot hold its task's folder). The tasks of the batch it
      was running are charged with the loss and from then on travel alone; a task charged
      :data:`LOST_LIMIT` times fails for good (it keeps killing its engine), naming the step
      whose log was written last. If no engine remains, the run ends (``summary.no_engines``).
    * ``skip(task) -> bool`` is asked when a task becomes ready, before it would be submitted; a
      skipped task counts as finished for the tasks downstream (a journal uses this to resume).
    * After each round of results the listeners get ``checkpoint()``: a journal makes what it
      recorded durable then, once per round rather than once per task.
    * Ctrl-C (``KeyboardInterrupt``) stops submitting, asks the executor to interrupt what is
      running, waits briefly for it, and returns with ``summary.interrupted`` set.

Every request carries the run's id (``run_id``: given, the executor's, or a fresh one), which
the engines put in the environment of the steps as ``OPF_RUN_ID``, and, when a ``stamp`` hook is
given (a journal's :meth:`~opals_dsl.runtime.journal.Journal.stamp`), what the engine needs to leave
a receipt once the task's results landed; a ``start`` hook (:meth:`.resume.Resume.start_of`)
gives the step a task resumes at.

The trace has a row per node and attempt (:data:`TRACE_FIELDS`); the row of the node that
failed also holds the engine's ``returncode`` and ``message``. Nodes that did not run get rows
with status ``skipped``, ``blocked`` or ``not-run``; a task that an engine held when the run was
interrupted gets first a row ``interrupted`` on its task stage, from when it was sent until then.

A synchronous executor (:class:`~opals_dsl.runtime.executor.LocalExecutor`) runs requests in this
process, one after the other, for tests of the policy and for stepping through a run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import math
import queue
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..plan import model
from ..plan.model import Task
from ..plan.trace import TAIL_LINES, TRACE_FILE, log_path
from ..plan.trace import tail as read_tail
from ..plan.wire import Failure, Receipt, TaskResult, WireError
from .events import Counts, RunListener, RunSummary, TaskFailure, new_run_id
from .executor import EngineInfo, Executor, describe_error
from .request import FirstSeen, build_request
from .slots import Slots
from .trace import TraceWriter

if TYPE_CHECKING:
    import networkx as nx

# task states
WAITING = "waiting"
READY = "ready"
RUNNING = "running"
DONE = "done"
SKIPPED = "skipped"
FAILED = "failed"
BLOCKED = "blocked"  # an upstream task failed for good
NOT_RUN = "not-run"  # the run stopped before the task was submitted

#: a task on which this many engines were lost fails for good: it keeps killing its engine
LOST_LIMIT = 2


@dataclass(slots=True)
class _Batch:
    id: int
    engine: int
    tasks: list[int]
    attempts: list[int]
    future: Future
    sent: float = 0.0
    borrowed: tuple[int, ...] = ()  # engines of its machine kept free while it runs


class Scheduler:
    """Runs one plan on one executor; see the module docstring for the policy."""

    def __init__(
        self,
        plan: nx.DiGraph,
        executor: Executor,
        *,
        state_dir: str | Path,
        records: str | Path | None = None,
        scratch: str | None = None,
        keep_going: bool = False,
        skip: Callable[[Task], bool] | None = None,
        listener: RunListener | None = None,
        retries: int | None = None,
        checksum: bool = False,
        tasks: model.Tasks | None = None,
        run_id: str | None = None,
        stamp: Callable[[Task], Receipt | None] | None = None,
        start: Callable[[Task], int] | None = None,
        shared: FirstSeen | None = None,
        depth: int = 2,
        batch_seconds: float = 0.1,
        max_batch: int = 256,
        engine_wait: float = 0.0,
        interrupt_wait: float = 5.0,
    ) -> None:
        self.plan = plan
        self.info = model.info(plan)
        self.executor = executor
        self.state_dir = Path(state_dir)
        #: where the trace and the step logs go: the run's records (default: the state folder)
        self.records = Path(records) if records is not None else self.state_dir
        self.logs = self.records / "logs"
        # the executor may have been told the scratch root when it identified its engines
        self.scratch = scratch if scratch is not None else getattr(executor, "scratch", None)
        self.keep_going = keep_going
        self.skip = skip
        self.listener = listener or RunListener()
        self.depth = depth
        self.batch_seconds, self.max_batch = batch_seconds, max_batch
        self.engine_wait, self.interrupt_wait = engine_wait, interrupt_wait
        self.run_id = run_id or getattr(executor, "run_id", None) or new_run_id()
        self.stamp, self.start = stamp, start
        self.shared = shared or FirstSeen(self.info.root)  # every task stages that version

        found = tasks if tasks is not None else model.tasks(plan)
        self.tasks: list[Task] = list(found.tasks)
        self.deps = found.upstream
        if retries is not None:
            self.tasks = [dataclasses.replace(t, retries=retries) for t in self.tasks]
        self.checksum = checksum
        n = len(self.tasks)
        #: task -> the tasks that wait for it (tasks nobody waits for are not in it)
        self.dependents: dict[int, list[int]] = {}
        for i, ups in enumerate(self.deps):
            for u in ups:
                self.dependents.setdefault(u, []).append(i)
        self.pending = [len(ups) for ups in self.deps]
        self.state = [WAITING] * n
        self.attempt = [0] * n
        #: task -> the engines lost while it was running (tasks with none are not in it)
        self.lost_on: dict[int, list[int]] = {}
        #: task -> (engine, sent, stopped) for the tasks engines held when the run stopped
        self.stopped_on: dict[int, tuple[int, float, float]] = {}
        self.ready: list[int] = []
        #: ready tasks that need several slots of a machine (see :mod:`.slots`)
        self.wide: list[int] = []
        self.threads = [t.threads for t in self.tasks]
        self.engines: dict[int, EngineInfo] = dict(executor.engines())
        self.held: dict[int, list[_Batch]] = {e: [] for e in self.engines}
        self.slots = Slots({e: info.machine for e, info in self.engines.items()})
        self.load: dict[int, int] = dict.fromkeys(self.engines, 0)
        self.batches: dict[int, _Batch] = {}
        self.completions: queue.SimpleQueue[_Batch] = queue.SimpleQueue()
        self.estimate: dict[str, float] = {}
        self.stopping = False
        self.summary = RunSummary(total=n)
        self._batch_ids = 0
        self._interrupt_requested = False
        self._last_counts: Counts | None = None
        self.trace: TraceWriter | None = None

    def interrupt(self) -> None:
        """Ask the loop to stop as on Ctrl-C; safe to call from a signal handler."""
        self._interrupt_requested = True

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> RunSummary:
        s = self.summary
        s.started = time.time()
        self.trace = TraceWriter(self.records / TRACE_FILE)
        s.trace, s.records = str(self.trace.path), str(self.records)
        self.listener.run_started(len(self.tasks), dict(self.engines))
        try:
            self._make_ready([i for i in range(len(self.tasks)) if self.pending[i] == 0])
            self._loop()
        except KeyboardInterrupt:
            s.interrupted = True
            self._stop("interrupted")
            self._drain_after_interrupt()
        finally:
            self._finish()
        return s

    def counts(self) -> Counts:
        s = self.summary
        return Counts(
            total=s.total, done=s.done, skipped=s.skipped, failed=s.failed,
            running=sum(self.load.values()), engines=len(self.engines),
            engines_busy=sum(1 for batches in self.held.values() if batches)
            + len(self.slots.lent),
        )

    def _report_counts(self) -> None:
        counts = self.counts()
        if counts != self._last_counts:
            self._last_counts = counts
            self.listener.counts_changed(counts)

    def _loop(self) -> None:
        last_refresh = time.monotonic()
        no_engine_since: float | None = None
        while True:
            if self._interrupt_requested:
                raise KeyboardInterrupt
            if not self.stopping:
                self._fill()
            self._report_counts()
            if not self.batches:
                if self.stopping or not (self.ready or self.wide):
                    return
                if not self.engines:
                    # work left, nobody to do it: wait a little for engines to join
                    now = time.monotonic()
                    no_engine_since = no_engine_since or now
                    if now - no_engine_since >= self.engine_wait:
                        self.summary.no_engines = True
                        self._stop("no engine is left")
                        return
            else:
                no_engine_since = None
            try:
                batch = self.completions.get(timeout=0.2)
            except queue.Empty:
                batch = None
            while batch is not None:
                self._complete(batch)
                try:
                    batch = self.completions.get_nowait()
                except queue.Empty:
                    batch = None
            self.listener.checkpoint()
            if self.trace is not None:
                self.trace.flush()
            now = time.monotonic()
            if now - last_refresh > 1.0 or not self.engines:
                last_refresh = now
                self._refresh()

    def _fill(self) -> None:
        if self.wide:
            self._fill_wide()
        usable = self.slots.usable
        while self.ready:
            free = [e for e in self.engines if len(self.held[e]) < self.depth and usable(e)]
            if not free:
                return
            engine = min(free, key=lambda e: (self.load[e], e))
            slots = sum(self.depth - len(self.held[e]) for e in free)
            size = self._batch_size(self.tasks[self.ready[0]].job, slots)
            picked: list[int] = []
            while self.ready and len(picked) < size:
                if picked and self.ready[0] in self.lost_on:
                    break  # a task that was running when an engine was lost travels alone
                picked.append(heapq.heappop(self.ready))
                if picked[-1] in self.lost_on:
                    break
            self._submit(engine, picked)

    def _fill_wide(self) -> None:
        """Place the ready tasks that need several slots, in plan order (:mod:`.slots`)."""
        while self.wide:
            i = self.wide[0]
            need = self.threads[i]
            if need > self.slots.largest():
                heapq.heappop(self.wide)
                self._too_wide(i, need)
                continue
            placed = self.slots.place(i, need, self.held)
            if placed is None:
                return  # a machine is reserved for it meanwhile
            heapq.heappop(self.wide)
            self._submit(placed[0], [i], placed[1])
        self.slots.release_reservation()

    def _too_wide(self, i: int, need: int) -> None:
        ref = self.tasks[i]
        sizes = ", ".join(f"{m} has {n}" for m, n in sorted(self.slots.sizes().items()))
        self._failed_for_good(i, TaskFailure(
            job=ref.job, task=ref.task, attempt=self.attempt[i], engine=None, machine=None,
            node=None, step=None, kind="engine", returncode=None, log=None, tail=[],
            task_dir=None, message=f"the task needs {need} threads on one machine, but no "
                                   f"machine has that many engines any more ({sizes or 'none'})"))

    def _push_ready(self, i: int) -> None:
        heapq.heappush(self.wide if self.threads[i] > 1 else self.ready, i)

    def _batch_size(self, job: str, slots: int) -> int:
        est = self.estimate.get(job)
        if est is None:
            return 1
        size = int(self.batch_seconds / max(est, 1e-5))
        fair = math.ceil(len(self.ready) / max(slots, 1))
        return max(1, min(size, self.max_batch, fair))

    def _submit(self, engine: int, picked: list[int], borrowed: tuple[int, ...] = ()) -> None:
        stamp, start = self.stamp, self.start
        requests = [
            build_request(self.plan, self.tasks[i], self.attempt[i], scratch=self.scratch,
                          info=self.info,
                          logs=self.logs, checksum=self.checksum, run_id=self.run_id,
                          receipt=stamp(self.tasks[i]) if stamp is not None else None,
                          start=start(self.tasks[i]) if start is not None else 0,
                          shared=self.shared)
            for i in picked
        ]
        try:
            future = self.executor.submit(engine, requests)
        except Exception as exc:
            self.slots.give_back(borrowed)
            if not self.executor.is_engine_loss(exc):
                raise
            self._lose_engine(engine, picked, resubmit=False)
            return
        self._batch_ids += 1
        batch = _Batch(self._batch_ids, engine, picked, [self.attempt[i] for i in picked],
                       future, time.time(), borrowed)
        for i in picked:
            self.state[i] = RUNNING
        self.batches[batch.id] = batch
        self.held[engine].append(batch)
        self.load[engine] += len(picked)
        self.listener.tasks_submitted([self.tasks[i] for i in picked], engine)
        future.add_done_callback(lambda _f, b=batch: self.completions.put(b))

    def _complete(self, batch: _Batch) -> None:
        if batch.id not in self.batches:  # already handled: its engine was lost
            self.executor.release(batch.future)
            return
        del self.batches[batch.id]
        self.slots.give_back(batch.borrowed)
        engine = batch.engine
        if engine in self.held:
            with contextlib.suppress(ValueError):
                self.held[engine].remove(batch)
            self.load[engine] -= len(batch.tasks)
        future = batch.future
        error = future.exception()
        results = None if error is not None else future.result()
        self.executor.release(future)
        if error is not None:
            if self.executor.is_engine_loss(error):
                self._lose_engine(engine, batch.tasks, lost_batch=batch)
                return
            if _is_withdrawn(error):
                for i in batch.tasks:
                    self.state[i] = NOT_RUN
                return
            if self.summary.interrupted:  # stopped by our own interrupt
                self._held_at_stop(batch)
                return
            message = describe_error(error)
            for i, attempt in zip(batch.tasks, batch.attempts, strict=True):
                self._task_failed(i, attempt, engine, None, Failure(
                    "engine", f"the engine could not run the task: {message}"))
            return
        assert results is not None
        durations: dict[str, list[float]] = {}
        for i, attempt, data in zip(batch.tasks, batch.attempts, results, strict=True):
            try:
                result = TaskResult.from_wire(data)
            except WireError as exc:
                self._task_failed(i, attempt, engine, None, Failure("engine", str(exc)))
                continue
            if self.trace is not None:
                self.trace.task_rows(self.tasks[i], attempt, engine, result, batch.borrowed)
            s = self.summary
            s.bytes_staged += result.bytes_staged
            s.bytes_copied += result.bytes_copied
            span = result.span
            if span is not None:
                durations.setdefault(self.tasks[i].job, []).append(span)
            if result.ok:
                self.state[i] = DONE
                s.done += 1
                self.listener.task_done(self.tasks[i], result, engine)
                self._release(i)
            else:
                self._task_failed(i, attempt, engine, result.machine,
                                  result.failure or Failure("unknown", "the task failed"))
        for job, values in durations.items():
            mean = sum(values) / len(values)
            old = self.estimate.get(job)
            self.estimate[job] = mean if old is None else 0.5 * old + 0.5 * mean

    def _task_failed(self, i: int, attempt: int, engine: int, machine: str | None,
                     failure: Failure) -> None:
        ref = self.tasks[i]
        if machine is None:
            info = self.engines.get(engine)
            machine = info.machine if info else None
        record = TaskFailure.of(ref, attempt, engine, machine, failure)
        if attempt < ref.retries and not self.stopping:
            self.attempt[i] = attempt + 1
            self.summary.retried += 1
            self.listener.task_retrying(ref, record)
            self.state[i] = READY
            self._push_ready(i)
            return
        self._failed_for_good(i, record)

    def _failed_for_good(self, i: int, record: TaskFailure) -> None:
        ref = self.tasks[i]
        self.state[i] = FAILED
        self.summary.failed += 1
        self.summary.failures.append(record)
        self.listener.task_failed(ref, record)
        # what waits for it can never run, whether the run goes on or stops
        blocked = self._block_dependents(i)
        if blocked:
            self.summary.blocked_by[ref.name] = [self.tasks[d].name for d in blocked]
        if not self.keep_going:
            self._stop(f"task {ref.name} failed")

    def _release(self, i: int) -> None:
        ready = []
        for d in self.dependents.get(i, ()):
            self.pending[d] -= 1
            if self.pending[d] == 0 and self.state[d] == WAITING:
                ready.append(d)
        if ready:
            self._make_ready(ready)

    def _make_ready(self, tasks: list[int]) -> None:
        # a skipped task releases its dependents at once; they are asked in plan order too
        todo = list(tasks)
        heapq.heapify(todo)
        while todo:
            j = heapq.heappop(todo)
            if self.skip is not None and self.skip(self.tasks[j]):
                self.state[j] = SKIPPED
                self.summary.skipped += 1
                self._trace_unrun(j, SKIPPED)
                self.listener.task_skipped(self.tasks[j])
                for d in self.dependents.get(j, ()):
                    self.pending[d] -= 1
                    if self.pending[d] == 0 and self.state[d] == WAITING:
                        heapq.heappush(todo, d)
            else:
                self.state[j] = READY
                self._push_ready(j)

    def _block_dependents(self, i: int) -> list[int]:
        """Block every task that waits (transitively) for task ``i``; the ones blocked now and
        the nearest ones an earlier failure blocked (not what lies beyond them: a failure
        costs no more than the tasks it blocks), in plan order."""
        todo = list(self.dependents.get(i, ()))
        blocked: set[int] = set()
        while todo:
            d = todo.pop()
            if d in blocked or self.state[d] not in (WAITING, BLOCKED):
                continue
            blocked.add(d)
            if self.state[d] == WAITING:
                self.state[d] = BLOCKED
                todo.extend(self.dependents.get(d, ()))
        return sorted(blocked)

    def _lose_engine(self, engine: int, tasks: Iterable[int] = (), *,
                     resubmit: bool = True, lost_batch: _Batch | None = None) -> None:
        """Take ``engine`` out; its tasks (``tasks`` and those it holds) become ready again
        with their attempt unchanged. ``resubmit=False``: ``tasks`` were never sent;
        ``lost_batch``: the batch whose failure showed the loss (``tasks`` are its tasks).

        The tasks of the batch the engine was running (its oldest: an engine runs its batches
        in order) are charged with the loss; one charged :data:`LOST_LIMIT` times fails for
        good instead — it keeps killing its engine. A lost engine still running on this machine
        is killed (``Executor.discard``), so that it cannot hold a task's folder for ever."""
        sent = list(tasks)
        moved = list(sent)
        info = self.engines.get(engine)
        lost_at = time.time()
        lost: list[_Batch] = [] if lost_batch is None else [lost_batch]
        for batch in self.held.pop(engine, []):
            future = batch.future
            if future.done() and future.exception() is None:
                continue  # it finished before the loss: its result is on the completion queue
            if self.batches.pop(batch.id, None) is not None:
                moved.extend(batch.tasks)
                lost.append(batch)
        self.slots.remove(engine)
        for batch in lost:
            self.slots.give_back(batch.borrowed)
            for i, attempt in zip(batch.tasks, batch.attempts, strict=True):
                if self.trace is not None:
                    self.trace.held_row(self.tasks[i], attempt, engine,
                                        info.machine if info else None, batch.sent, lost_at)
        running = min(lost, key=lambda b: b.id) if lost and resubmit else None
        if running is not None:
            for i in running.tasks:
                self.lost_on.setdefault(i, []).append(engine)
        self.load.pop(engine, None)
        note = None
        known = self.engines.pop(engine, None) is not None
        if known:
            with contextlib.suppress(Exception):
                note = self.executor.discard(engine)
        given_up = [i for i in moved if len(self.lost_on.get(i, ())) >= LOST_LIMIT]
        again = [i for i in moved if i not in given_up]
        for i in again:
            self.state[i] = READY
            self._push_ready(i)
        self.summary.resubmitted += len(again) - (0 if resubmit else len(sent))
        if known:
            self.summary.engines_lost += 1
            self.listener.engine_lost(engine, [self.tasks[i] for i in again])
            if note:
                self.listener.engine_discarded(engine, note)
        for i in given_up:
            self._kept_killing(i, engine, info, running.sent if running else lost_at)

    def _kept_killing(self, i: int, engine: int, info: EngineInfo | None,
                      since: float) -> None:
        """Task ``i`` was running on :data:`LOST_LIMIT` engines that were lost: it fails for
        good, its report naming the step whose log was written last."""
        ref = self.tasks[i]
        engines = self.lost_on[i]
        node = step = log = None
        tail: list[str] = []
        for exec_node in reversed(ref.execs):
            name = model.step_of(exec_node)
            path = log_path(self.logs, ref.job, ref.task, name, self.attempt[i])
            try:
                written = path.stat().st_mtime
            except OSError:
                continue
            if written >= since - 2.0:  # the file server's clock may differ a little
                node, step, log, tail = exec_node, name, str(path), read_tail(path, TAIL_LINES)
                break
        during = f" while it ran step {step}" if step else ""
        ids = ", ".join(str(e) for e in engines)
        record = TaskFailure(
            job=ref.job, task=ref.task, attempt=self.attempt[i], engine=engine,
            machine=info.machine if info else None, node=node, step=step, kind="engine-lost",
            returncode=None, log=log, tail=tail, task_dir=None,
            message=(f"the engine running this task was lost {len(engines)} times (engines "
                     f"{ids}){during}: the task keeps killing its engine — a step that ends or "
                     f"crashes the engine's own process (a call of os._exit, a crash in a "
                     f"call step's native code) or exhausts the machine's memory"),
        )
        if self.trace is not None:
            self.trace.write({
                "node": node or ref.task_stage, "kind": "exec" if node else "stage",
                "job": ref.job, "task": ref.task, "step": step, "engine": engine,
                "machine": record.machine, "start": since, "end": time.time(),
                "status": FAILED, "bytes": 0, "attempt": self.attempt[i],
                "returncode": None, "message": record.message,
            })
        self._failed_for_good(i, record)

    def _refresh(self) -> None:
        added, gone = self.executor.refresh()
        for engine in gone:
            self._lose_engine(engine)
        for info in added:
            if info.id not in self.engines:
                self.engines[info.id] = info
                self.slots.add(info.id, info.machine)
                self.held[info.id] = []
                self.load[info.id] = 0
                self.listener.engine_added(info)

    def _stop(self, reason: str) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.listener.stopping(reason)
        queued = [b.future for batches in self.held.values() for b in batches[1:]]
        if queued:
            with contextlib.suppress(Exception):
                self.executor.withdraw(queued)

    def _drain_after_interrupt(self) -> None:
        busy = [e for e, batches in self.held.items() if batches]
        with contextlib.suppress(Exception):
            self.executor.interrupt(busy)
        deadline = time.monotonic() + self.interrupt_wait
        while self.batches and time.monotonic() < deadline:
            try:
                batch = self.completions.get(timeout=0.1)
            except queue.Empty:
                continue
            self._complete(batch)

    def _held_at_stop(self, batch: _Batch) -> None:
        for i in batch.tasks:
            self.state[i] = NOT_RUN
            self.stopped_on[i] = (batch.engine, batch.sent, time.time())

    def _trace_unrun(self, i: int, status: str) -> None:
        if self.trace is None:
            return
        ref, attempt = self.tasks[i], self.attempt[i]
        held = self.stopped_on.get(i)
        if held is not None:
            info = self.engines.get(held[0])
            self.trace.held_row(ref, attempt, held[0], info.machine if info else None,
                                held[1], held[2], "interrupted")
        self.trace.unrun_rows(ref, status, attempt, 1 if held is None else 2)

    def _finish(self) -> None:
        s = self.summary
        for batch in list(self.batches.values()):  # engines that did not answer in time
            self._held_at_stop(batch)
        self.batches.clear()
        for engine in self.held:
            self.held[engine] = []
            self.load[engine] = 0
        for i, state in enumerate(self.state):
            if state in (WAITING, READY, RUNNING, NOT_RUN, BLOCKED):
                if state == BLOCKED:
                    s.blocked += 1
                else:
                    self.state[i] = NOT_RUN
                    s.not_run += 1
                    if i in self.stopped_on:
                        s.stopped_tasks.append(i)
                self._trace_unrun(i, state if state == BLOCKED else NOT_RUN)
        s.finished = time.time()
        if self.trace is not None:
            self.trace.close()
            s.trace_error = self.trace.error
        self._report_counts()
        self.listener.run_finished(s)


def _is_withdrawn(error: BaseException) -> bool:
    return type(error).__name__ == "TaskAborted"
