"""The engines of each machine as its slots: where a task that needs several threads may run.

A machine (an engine's host and scratch root, :class:`~opals_dsl.runtime.executor.EngineInfo`) has
as many slots as it has engines, and an engine runs one task at a time, so a machine whose
engines each run a one-thread task is full. A task whose steps use ``threads N`` (N > 1) takes
one engine of a machine to run on and *borrows* N - 1 more of the same machine, which take no
work until the task is over: at no moment does a machine run more threads than it has engines.
(A task holds its slots from its task stage to its copy-back: the slots are taken for the most
any of its steps needs, since the whole chain of a task runs on one engine.)

The policy, used by :class:`~opals_dsl.runtime.scheduler.Scheduler`:

* Tasks that need several slots go first, in plan order. One is placed on a machine that has
  enough idle engines (an engine is idle when it holds no batch and is not borrowed); of those,
  the machine with the fewest idle engines, so that larger holes stay open for larger tasks
  (ties: the machine's name), and there its lowest engine ids.
* When the first of them fits nowhere now, engines are *reserved* for it: as many as it needs,
  on one machine large enough, those that cost least to keep free — the engines of another
  wide task first (they come free together, and take no one-thread work meanwhile), then
  idle ones, then those with the fewest batches queued; of the machines, the one whose chosen
  engines cost least (ties: its name). Reserved engines take no new work, so they come free;
  every other engine goes on with one-thread tasks. Without the reservation a steady stream
  of short one-thread tasks could keep a wide task waiting for ever. The reservation holds
  until the task is placed (on whichever machine first has room), or until one of its
  engines leaves.
* A task that needs more slots than the largest machine now has fails (engines were lost
  since the run began; before it begins, :func:`too_wide` is how the session refuses such a
  plan).

Tasks with one thread (the default) cost nothing here beyond a set lookup per engine.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sized


class Slots:
    """Which engines belong to which machine, which are borrowed, which machine is reserved."""

    def __init__(self, machines: Mapping[int, str]) -> None:
        #: engine -> its machine
        self.machine: dict[int, str] = dict(machines)
        #: borrowed engine -> the engine running the task that borrowed it
        self.lent: dict[int, int] = {}
        #: (task, engines) while engines are kept free for that task
        self.reserved: tuple[int, frozenset[int]] | None = None

    def add(self, engine: int, machine: str) -> None:
        self.machine[engine] = machine

    def remove(self, engine: int) -> None:
        self.machine.pop(engine, None)
        self.lent.pop(engine, None)
        if self.reserved is not None and engine in self.reserved[1]:
            self.reserved = None

    def sizes(self) -> dict[str, int]:
        """Engines per machine."""
        sizes: dict[str, int] = {}
        for m in self.machine.values():
            sizes[m] = sizes.get(m, 0) + 1
        return sizes

    def largest(self) -> int:
        return max(self.sizes().values(), default=0)

    def usable(self, engine: int) -> bool:
        """Whether ``engine`` may be given a one-thread batch now."""
        if engine in self.lent:
            return False
        reserved = self.reserved
        return reserved is None or engine not in reserved[1]

    def place(self, task: int, need: int, held: Mapping[int, Sized]
              ) -> tuple[int, tuple[int, ...]] | None:
        """An engine to run ``task`` (which needs ``need`` slots) on and the engines it
        borrows, now taken; None when no machine has enough idle engines (one is reserved)."""
        idle: dict[str, list[int]] = {}
        for e, m in self.machine.items():
            batches = held.get(e)
            if e not in self.lent and batches is not None and not len(batches):
                idle.setdefault(m, []).append(e)
            else:
                idle.setdefault(m, [])
        fits = [(len(es), m) for m, es in idle.items() if len(es) >= need]
        if fits:
            _, m = min(fits)
            engines = sorted(idle[m])[:need]
            for b in engines[1:]:
                self.lent[b] = engines[0]
            if self.reserved is not None and self.reserved[0] == task:
                self.reserved = None
            return engines[0], tuple(engines[1:])
        if self.reserved is None or self.reserved[0] != task:
            self._reserve(task, need, held)
        return None

    def _reserve(self, task: int, need: int, held: Mapping[int, Sized]) -> None:
        owners = set(self.lent.values())

        def distance(e: int) -> int:  # what it costs to keep an engine free
            batches = held.get(e)
            queued = len(batches) if batches is not None else 0
            if e in self.lent or (e in owners and queued == 1):
                return 0  # a wide task's engines come free together, and idle meanwhile
            return 1 if not queued else 2 + queued

        best: tuple[int, str, list[int]] | None = None
        on: dict[str, list[int]] = {}
        for e, m in self.machine.items():
            on.setdefault(m, []).append(e)
        for m, engines in on.items():
            if len(engines) < need:
                continue
            chosen = sorted(engines, key=lambda e: (distance(e), e))[:need]
            score = sum(distance(e) for e in chosen)
            if best is None or (score, m) < best[:2]:
                best = (score, m, chosen)
        self.reserved = (task, frozenset(best[2])) if best is not None else None

    def give_back(self, borrowed: Iterable[int]) -> None:
        for b in borrowed:
            self.lent.pop(b, None)

    def release_reservation(self) -> None:
        self.reserved = None


def too_wide(needs: Iterable[tuple[str, int]], sizes: Mapping[str, int]) -> str | None:
    """Why a plan cannot run on machines of these ``sizes`` (engines per machine), or None:
    ``needs`` are (step, threads) pairs."""
    largest = max(sizes.values(), default=0)
    wide = sorted({(step, n) for step, n in needs if n > largest})
    if not wide or not sizes:
        return None
    steps = ", ".join(f"step {step} needs {n} threads" for step, n in wide)
    machines = ", ".join(f"{m} has {size}" for m, size in sorted(sizes.items()))
    return (f"{steps}, but the largest machine of the cluster has {largest} engine"
            f"{'s' if largest != 1 else ''} (engines per machine: {machines}); lower the "
            f"step's 'threads' to at most {largest}, or run on machines with more engines "
            f"(-n, or a cluster with more engines per machine)")
