"""The slot policy (:mod:`opals_dsl.runtime.slots`) over generated sequences of events.

The scheduler asks :class:`Slots` where a task that needs several threads may run, which
engines may take one-thread batches, and gives borrowed engines back when a task ends. These
tests drive it as the scheduler does — engines with queues of batches, the first one running —
through generated sequences of wide tasks, one-thread batches and completions, and check the
invariants after every event. The runs on real engines are in ``test_threads.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from opals_dsl.runtime.slots import Slots, too_wide


@dataclass
class Batch:
    threads: int
    borrowed: tuple[int, ...] = ()


@dataclass
class Cluster:
    """Engines with their queues (at most ``DEPTH`` batches each), as the scheduler keeps
    them."""

    machines: dict[int, str]
    slots: Slots = field(init=False)
    held: dict[int, list[Batch]] = field(init=False)
    #: (task, threads) of the wide tasks not placed yet, in order
    waiting: list[tuple[int, int]] = field(default_factory=list)

    DEPTH = 2

    def __post_init__(self) -> None:
        self.slots = Slots(self.machines)
        self.held = {e: [] for e in self.machines}

    def place_wide(self) -> None:
        while self.waiting:
            task, need = self.waiting[0]
            placed = self.slots.place(task, need, self.held)
            if placed is None:
                return
            engine, borrowed = placed
            assert not self.held[engine], "a wide task went to a busy engine"
            assert all(not self.held[b] for b in borrowed), "a busy engine was borrowed"
            assert engine not in borrowed
            assert len(borrowed) == need - 1
            assert {self.machines[e] for e in (engine, *borrowed)} == {self.machines[engine]}
            self.waiting.pop(0)
            self.held[engine].append(Batch(need, borrowed))
        self.slots.release_reservation()

    def narrow(self) -> None:
        free = [e for e in sorted(self.held)
                if len(self.held[e]) < self.DEPTH and self.slots.usable(e)]
        if free:
            self.held[min(free, key=lambda e: (len(self.held[e]), e))].append(Batch(1))

    def complete(self, k: int) -> None:
        busy = sorted(e for e, batches in self.held.items() if batches)
        if busy:
            batch = self.held[busy[k % len(busy)]].pop(0)
            self.slots.give_back(batch.borrowed)

    def running_threads(self) -> dict[str, int]:
        running: dict[str, int] = dict.fromkeys(self.machines.values(), 0)
        for e, batches in self.held.items():
            if batches:
                running[self.machines[e]] += batches[0].threads
        return running

    def check(self) -> None:
        sizes = self.slots.sizes()
        for machine, threads in self.running_threads().items():
            assert threads <= sizes[machine], (machine, threads, sizes)
        for b in self.slots.lent:
            assert not self.held[b], f"borrowed engine {b} holds work"


def _engines(sizes: list[int]) -> dict[int, str]:
    machines = {}
    engine = 0
    for k, n in enumerate(sizes):
        for _ in range(n):
            machines[engine] = f"m{k}"
            engine += 1
    return machines


events_st = st.lists(st.one_of(
    st.tuples(st.just("wide"), st.integers(2, 4)),
    st.tuples(st.just("narrow"), st.just(0)),
    st.tuples(st.just("done"), st.integers(0, 7)),
), max_size=60)


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(1, 4), min_size=1, max_size=3), events=events_st)
def test_no_machine_ever_runs_more_threads_than_it_has_engines_and_wide_tasks_get_placed(
        sizes: list[int], events: list[tuple[str, int]]) -> None:
    """Invariants: after every event no machine runs more threads than it has engines, a wide
    task gets its threads on one machine, and no borrowed engine holds work; and while
    one-thread work keeps arriving, every wide task that fits a machine is placed after
    finitely many completions (the reservation keeps it from waiting for ever)."""
    cluster = Cluster(_engines(sizes))
    largest = max(sizes)
    for k, (kind, value) in enumerate(events):
        if kind == "wide":
            if value <= largest:
                cluster.waiting.append((k, value))
        elif kind == "narrow":
            cluster.narrow()
        else:
            cluster.complete(value)
        cluster.place_wide()
        cluster.check()
    # one-thread work keeps coming (a narrow batch after every completion): the wide tasks
    # still get placed
    for step in range(1000):
        if not cluster.waiting:
            break
        cluster.complete(step)
        cluster.narrow()
        cluster.place_wide()
        cluster.check()
    assert not cluster.waiting, "a wide task waited for ever"


def test_a_plan_wider_than_every_machine_is_named_with_the_machines_sizes() -> None:
    reason = too_wide([("dem/grid", 4), ("dem/grid", 4), ("dem/fill", 2)],
                      {"a:/tmp": 2, "b:/tmp": 3})
    assert reason is not None
    assert reason.startswith("step dem/grid needs 4 threads, but the largest machine of the "
                             "cluster has 3 engines (engines per machine: a:/tmp has 2, "
                             "b:/tmp has 3)")
    assert too_wide([("dem/grid", 3)], {"a:/tmp": 2, "b:/tmp": 3}) is None
