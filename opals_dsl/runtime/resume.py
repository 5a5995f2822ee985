"""Resuming: which tasks of a plan a run does, and why (``opf run``, ``--dry-run``, ``--force``,
``opf compile --status``).

In: a :class:`~opals_dsl.runtime.journal.Journal` (the records of the tasks that finished before)
and the plan it was read for. Out: one :class:`Decision` per task, in plan order, and the
scheduler's ``skip`` hook.

Decisions are made in dependency order (upstream tasks first); the first reason that applies:
``forced`` (``--force``); ``upstream T re-runs``; ``new`` (no record); ``failed in the last
run``; ``steps changed`` / ``command of step S changed: 'a' → 'b'`` / ``parameters of step S
changed: k 1 → 2`` / ``files or destinations of the task changed``; ``upstream T ran again
since`` (its sig is not the one recorded); ``input missing: P`` / ``input changed: P``;
``output missing: D`` / ``output changed: D``. Otherwise the task is ``unchanged`` and skipped.
With ``--checksum`` an input whose time changed but whose content did not is unchanged, and its
record is refreshed in the journal so that the next run does not hash it again.
"""

from __future__ import annotations

import heapq
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..plan.model import Task
from .journal import Journal
from .records import record_body, well_formed


@dataclass(frozen=True, slots=True)
class Decision:
    """What a run does with a task: ``run`` it or skip it, and ``reason`` in words."""

    task: Task
    run: bool
    reason: str


class Resume:
    """The decisions for the tasks of a journal's plan; see the module docstring."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.decisions: list[Decision] | None = None
        self._refresh: dict[int, dict[str, list[Any]]] = {}

    def skip(self, task: Task) -> bool:
        """The scheduler's ``skip`` hook: True if the decision for ``task`` is not to run it."""
        if self.decisions is None:
            self.decide()
        assert self.decisions is not None
        return not self.decisions[task.order].run

    def decide(self, force: bool = False) -> list[Decision]:
        """Decide for every task whether it runs, and why; in plan order."""
        n = len(self.journal.tasks)
        runs = [False] * n
        decisions: list[Decision | None] = [None] * n
        for i in self._dependency_order():
            ref = self.journal.tasks[i]
            reason: str | None = "forced" if force else None
            if reason is None:
                for u in self.journal.deps[i]:
                    if runs[u]:
                        reason = f"upstream {self.journal.tasks[u].name} re-runs"
                        break
            if reason is None:
                reason = self._compare(i)
            runs[i] = reason is not None
            decisions[i] = Decision(ref, runs[i], reason or "unchanged")
        self.decisions = [d for d in decisions if d is not None]
        if self._refresh and self.journal.writable:
            for i, ins in self._refresh.items():
                if not runs[i]:
                    self.journal.refresh_record(i, ins)
            self.journal.flush()
        self._refresh.clear()
        return self.decisions

    def _dependency_order(self) -> Iterable[int]:
        n = len(self.journal.tasks)
        waiting = [len(ups) for ups in self.journal.deps]
        downs: list[list[int]] = [[] for _ in range(n)]
        for i, ups in enumerate(self.journal.deps):
            for u in ups:
                downs[u].append(i)
        ready = [i for i in range(n) if not waiting[i]]
        heapq.heapify(ready)
        while ready:
            i = heapq.heappop(ready)
            yield i
            for d in downs[i]:
                waiting[d] -= 1
                if not waiting[d]:
                    heapq.heappush(ready, d)

    def _compare(self, i: int) -> str | None:
        ref = self.journal.tasks[i]
        line = self.journal.records.get(ref.name)
        if line is None:
            return "new"
        try:
            rec = json.loads(record_body(line))
        except (ValueError, RecursionError):
            rec = None
        if not well_formed(rec):  # a damaged record: as if there were none
            self.journal.forget_damaged(ref.name)
            return "new"
        if rec.get("failed"):
            return "failed in the last run"
        cmd, steps = self.journal.command(i)
        if rec.get("cmd") != cmd:
            return _what_changed(rec.get("steps") or [], steps)
        up = rec.get("up") or {}
        for u in self.journal.deps[i]:
            name = self.journal.tasks[u].name
            if up.get(name) != self.journal.sig_of(name):
                return f"upstream {name} ran again since"
        ins = rec.get("in") or {}
        fresh: dict[str, list[Any]] = {}
        own, common = self.journal.inputs(i)
        for path, shared in [(p, False) for p in own] + [(p, True) for p in common]:
            old = ins.get(path)
            if not isinstance(old, list) or len(old) < 2:
                return f"new input: {path}"
            st = self.journal.shared_stat(path) if shared else self.journal.stat(path)
            why, entry = self._input_changed(path, st, old)
            if why is not None:
                return why
            if entry is not None:
                fresh[path] = entry
        for dest, old in (rec.get("out") or {}).items():
            try:
                st = os.stat(os.path.join(self.journal.root, dest))
            except OSError:
                return f"output missing: {dest}"
            if not isinstance(old, list) or [st.st_size, st.st_mtime_ns] != old[:2]:
                return f"output changed: {dest}"
        if fresh:
            self._refresh[i] = fresh
        return None

    def _input_changed(self, path: str, st: list[int] | None,
                       old: list[Any]) -> tuple[str | None, list[Any] | None]:
        """(reason, None) if ``path`` (now ``st``) changed; (None, refreshed entry or None) if
        not."""
        if st is None:
            return f"input missing: {path}", None
        if st[0] == old[0] and st[1] == old[1]:
            return None, None
        if self.journal.checksum and len(old) > 2 and st[0] == old[0]:
            digest = self.journal.hash_of(path, st)
            if digest == old[2]:
                return None, [st[0], st[1], digest]
        return f"input changed: {path}", None

    def node_status(self) -> dict[str, str]:
        """``{node id: "run" | "skip"}`` for every node of every task (for the DOT drawing)."""
        if self.decisions is None:
            self.decide()
        assert self.decisions is not None
        status: dict[str, str] = {}
        for d in self.decisions:
            for node in d.task.nodes[1:]:
                status[node] = "run" if d.run else "skip"
        return status


def _short(value: Any, limit: int = 40) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if len(text) > limit:
        text = text[:limit - 1] + "…"
    return repr(text) if isinstance(value, str) else text


def _what_changed(old: list[Any], new: list[list[Any]]) -> str:
    """Why two ``steps`` lists (the recorded and the current one) make a task run again."""
    before = {s[0]: s[1] for s in old if isinstance(s, list) and len(s) == 2}
    if [s[0] for s in old if isinstance(s, list) and s] != [s[0] for s in new]:
        return (f"steps changed ({', '.join(before) or 'none'} → "
                f"{', '.join(s[0] for s in new)})")
    for step, now in new:
        was = before.get(step)
        if was == now:
            continue
        if isinstance(was, dict) and isinstance(now, dict):
            if was.get("function") != now.get("function"):
                return f"step {step} calls {now.get('function')} (was {was.get('function')})"
            a, b = was.get("kwargs") or {}, now.get("kwargs") or {}
            for key in sorted(set(a) | set(b)):
                if a.get(key) != b.get(key):
                    return (f"parameters of step {step} changed: {key} "
                            f"{_short(a.get(key, '(none)'))} → {_short(b.get(key, '(none)'))}")
        if isinstance(was, list) and isinstance(now, list):
            for x, y in zip(was, now, strict=False):
                if x != y:
                    return f"command of step {step} changed: {_short(x)} → {_short(y)}"
            return f"command of step {step} changed: {len(was)} → {len(now)} words"
        return f"command of step {step} changed"
    return "files or destinations of the task changed"
