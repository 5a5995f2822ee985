"""Resuming: which tasks of a plan a run does, and why (``opf run``, ``--dry-run``, ``--force``,
``opf compile --status``).

In: a :class:`~opals_dsl.runtime.journal.Journal` (the records of the tasks that finished before)
and the plan it was read for. Out: one :class:`Decision` per task, in plan order, and the
scheduler's ``skip`` hook.

Decisions are made in dependency order (upstream tasks first); the first reason that applies:
``forced`` (``--force``); ``new`` (no record); ``upstream T re-runs``; ``interrupted in the last
run`` (an engine held it when the run was interrupted); ``failed in the last run``; ``steps
changed`` / ``new input: P`` / ``input no longer read: P`` / ``command of step S changed: 'a' →
'b'`` (or ``gained 'w'``, ``lost 'w'``, ``the same words in another order``) / ``parameters of
step S changed: k 1 → 2`` / ``files or destinations of the task changed``; ``upstream T ran
again since`` (its sig is not the one recorded); ``input missing: P`` / ``input changed: P``;
``output missing: D`` / ``output changed: D``. Otherwise the task is ``unchanged`` and skipped.

Resuming from a step: where only the commands of some steps changed (a ``--param`` that only a
later step uses), the task runs again from the first step whose command changed, K, when the
outputs of steps before K that steps K... read are published (not ``temp``), and every
published output of steps before K is in place as recorded (its inputs and upstream tasks
unchanged, too). The engine then stages those published outputs instead of running the steps
that made them (:attr:`Decision.start`); the reason says ``from step S: param P changed`` (or
which command changed). Where such an output is ``temp``, the whole task runs, and the reason
says which output made it so. The same holds for published outputs missing or changed at their
destinations: the task runs from the first step that made one (``from step S: output missing:
D``), on the earlier steps' outputs, which are in place.
With ``--checksum`` an input whose time changed but whose content did not is unchanged, and its
record is refreshed in the journal so that the next run does not hash it again.
"""

from __future__ import annotations

import heapq
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..plan import model
from ..plan.model import Task
from .journal import Journal
from .records import record_body, well_formed

#: ``--force``: every task (True), none (False), or the tasks it says True of
Force = bool | Callable[[Task], bool]


@dataclass(frozen=True, slots=True)
class Decision:
    """What a run does with a task: ``run`` it or skip it, and ``reason`` in words; ``start``
    is the step it runs from (0: the whole task)."""

    task: Task
    run: bool
    reason: str
    start: int = 0


class Resume:
    """The decisions for the tasks of a journal's plan; see the module docstring."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        #: every decision, in plan order, once :meth:`decide` kept them
        self.decisions: list[Decision] | None = None
        # what the scheduler asks: per task whether it runs (1) or not (0), and the step it
        # starts at where that is not the first — a byte a task, not a Decision
        self._runs: bytearray | None = None
        self._from: dict[int, int] = {}
        self._refresh: dict[int, dict[str, list[Any]]] = {}
        self._starts: dict[int, int] = {}

    def skip(self, task: Task) -> bool:
        """The scheduler's ``skip`` hook: True if the decision for ``task`` is not to run it."""
        if self._runs is None:
            self.decide()
        assert self._runs is not None
        return not self._runs[task.order]

    def start_of(self, task: Task) -> int:
        """The scheduler's ``start`` hook: the step ``task`` runs from (0: all of them)."""
        if self._runs is None:
            self.decide()
        return self._from.get(task.order, 0)

    def decide(self, force: Force = False) -> list[Decision]:
        """Decide for every task whether it runs, and why; in plan order. ``force``: every
        task runs (True), or those it says True of (the targets of ``--only``)."""
        self._decide(force, keep=True)
        assert self.decisions is not None
        return self.decisions

    def settle(self, force: Force = False,
               why: Callable[[str, str], None] | None = None) -> int:
        """Decide as :meth:`decide` does, but keep only what :meth:`skip` and :meth:`start_of`
        answer — a byte a task, no :class:`Decision` —; the number of tasks to run. ``why``
        is told each task that is to run, and why (``(task name, reason)``), as it is decided."""
        return self._decide(force, keep=False, why=why)

    def _decide(self, force: Force, *, keep: bool,
                why: Callable[[str, str], None] | None = None) -> int:
        n = len(self.journal.tasks)
        runs = bytearray(n)
        decisions: list[Decision | None] | None = [None] * n if keep else None
        starts: dict[int, int] = {}
        for i in self._dependency_order():
            reason: str | None = "forced" if force is True or (
                callable(force) and force(self.journal.tasks[i])) else None
            if reason is None and self.journal.tasks[i].name not in self.journal.records:
                reason = "new"
            if reason is None:
                for u in self.journal.deps[i]:
                    if runs[u]:
                        reason = f"upstream {self.journal.tasks[u].name} re-runs"
                        break
            if reason is None:
                reason = self._compare(i)
            run = reason is not None
            runs[i] = run
            start = self._starts.pop(i, 0) if run else 0
            if start:
                starts[i] = start
            if decisions is not None:
                decisions[i] = Decision(self.journal.tasks[i], run, reason or "unchanged", start)
            if why is not None and reason is not None:
                why(self.journal.tasks[i].name, reason)
        self.decisions = None if decisions is None else [d for d in decisions if d is not None]
        self._runs, self._from = runs, starts
        if self._refresh and self.journal.writable:
            for i, ins in self._refresh.items():
                if not runs[i]:
                    self.journal.refresh_record(i, ins)
            self.journal.flush()
        self._refresh.clear()
        return sum(runs)

    def _dependency_order(self) -> Iterable[int]:
        n = len(self.journal.tasks)
        waiting = [len(ups) for ups in self.journal.deps]
        downs: dict[int, list[int]] = {}  # only the tasks some task waits for
        for i, ups in enumerate(self.journal.deps):
            for u in ups:
                downs.setdefault(u, []).append(i)
        ready = [i for i in range(n) if not waiting[i]]
        heapq.heapify(ready)
        while ready:
            i = heapq.heappop(ready)
            yield i
            for d in downs.get(i, ()):
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
        if rec.get("interrupted"):
            return "interrupted in the last run"
        if rec.get("failed"):
            return "failed in the last run"
        cmd, steps = self.journal.command(i)
        start, kept, changed = 0, None, ""
        own, common = self.journal.inputs(i)
        if rec.get("cmd") != cmd:  # named by the params behind it, or the inputs, if they changed
            changed = (_params_changed(rec, self.journal)
                       or _inputs_changed(rec.get("in"), own + common)
                       or _what_changed(rec.get("steps") or [], steps))
            start = self._first_changed(i, rec, steps)
            if not start:
                return changed
            _, _, execs, copyback = model.chain(self.journal.plan, ref)
            blocker = _temp_needed(execs, start)
            if blocker is not None:
                return f"{changed}; {blocker}, so the whole task runs"
            kept = _kept_destinations(execs, copyback, start)
        up = rec.get("up") or {}
        for u in self.journal.deps[i]:
            name = self.journal.tasks[u].name
            if up.get(name) != self.journal.sig_of(name):
                return f"upstream {name} ran again since"
        ins = rec.get("in") or {}
        fresh: dict[str, list[Any]] = {}
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
        bad: list[tuple[str, str]] = []  # (destination, why) of outputs not as recorded
        for dest, old in (rec.get("out") or {}).items():
            if kept is not None and dest not in kept:
                continue  # written again by the steps that run
            try:
                st = os.stat(os.path.join(self.journal.root, dest))
            except OSError:
                bad.append((dest, f"output missing: {dest}"))
                continue
            if not isinstance(old, list) or [st.st_size, st.st_mtime_ns] != old[:2]:
                bad.append((dest, f"output changed: {dest}"))
        if bad:
            start, changed = _redo_from(model.chain(self.journal.plan, ref), bad)
            if not start:
                return changed
        if fresh:
            self._refresh[i] = fresh
        if start:
            self._starts[i] = start
            return f"from step {steps[start][0]}: {changed}"
        return None

    def _first_changed(self, i: int, rec: dict[str, Any], steps: list[list[Any]]) -> int:
        """The first step whose command differs from the record's, where nothing but commands
        changed (``base``); 0 if the whole task must run."""
        if rec.get("base") != self.journal.base(i):
            return 0
        old = rec.get("steps") or []
        if len(old) != len(steps):
            return 0
        for k, (was, now) in enumerate(zip(old, steps, strict=True)):
            if not isinstance(was, list) or len(was) != 2 or was[1] != now[1]:
                return k
        return 0

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
        if self.journal.checksum and len(old) <= 2 and st[0] == old[0]:
            return (f"input changed: {path} (its time; the run that recorded it ran without "
                    f"--checksum, so there is no content hash to compare)"), None
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
            for node in d.task.execs[:d.start]:
                status[node] = "skip"
        return status


def _temp_needed(execs: list[model.Exec], start: int) -> str | None:
    """Why task's steps from ``start`` on cannot run alone: an output of an earlier step that
    they read and that is ``temp`` (never copied back, so gone); None if there is none."""
    made = {out: e for e in execs[:start] for out in e.outputs}
    for e in execs[start:]:
        for name in e.inputs:
            maker = made.get(name)
            if maker is not None and name in maker.temp:
                return (f"step {e.step} reads {name}, a temp output of step {maker.step} "
                        f"(never copied back)")
    return None


def _redo_from(chain: tuple[Any, Any, list[model.Exec], model.Copyback],
               bad: list[tuple[str, str]]) -> tuple[int, str]:
    """Where a task runs from when its published outputs ``bad`` (destination, why) are not
    as recorded: the first step that made one of them, and that output's reason; 0 (and the
    reason) if the whole task must run — the first step made one, or a step that runs reads a
    ``temp`` output of an earlier one."""
    _, _, execs, copyback = chain
    step_of = {out: k for k, e in enumerate(execs) for out in e.outputs}
    made = {dest: step_of.get(local, 0) for local, dest in copyback.files}
    dest, why = min(bad, key=lambda b: made.get(b[0], 0))  # the first of the earliest step
    first = made.get(dest, 0)  # before any step whose command changed: only those were looked at
    if not first:
        return 0, why
    blocker = _temp_needed(execs, first)
    if blocker is not None:
        return 0, f"{why}; {blocker}, so the whole task runs"
    return first, why


def _kept_destinations(execs: list[model.Exec], copyback: model.Copyback,
                       start: int) -> set[str]:
    """The destinations of the outputs of the steps before ``start`` (kept as they are)."""
    earlier = {out for e in execs[:start] for out in e.outputs}
    return {dest for local, dest in copyback.files if local in earlier}


def _params_changed(rec: dict[str, Any], journal: Journal) -> str | None:
    """``param P changed`` / ``params P, Q changed`` between a record and the plan."""
    old = rec.get("params")
    if not isinstance(old, dict):
        return None
    now = journal.info.params
    names = sorted(k for k in set(old) | set(now) if old.get(k) != now.get(k))
    if not names:
        return None
    return f"param{'s' if len(names) > 1 else ''} {', '.join(names)} changed"


def _inputs_changed(recorded: Any, now: list[str]) -> str | None:
    """``new input: P`` / ``input no longer read: P`` (the first few of each), where the files
    a task reads are not the ones its record has; None where they are."""
    if not isinstance(recorded, dict):
        return None
    added = [p for p in now if p not in recorded]
    dropped = sorted(set(recorded) - set(now))
    parts = [_paths(one, many, paths) for one, many, paths in (
        ("new input", "new inputs", added),
        ("input no longer read", "inputs no longer read", dropped)) if paths]
    return "; ".join(parts) or None


def _paths(one: str, many: str, paths: list[str]) -> str:
    return f"{one if len(paths) == 1 else many}: {_some(paths)}"


def _some(texts: list[str], shown: int = 3) -> str:
    """The first ``shown`` texts, and how many more."""
    more = f" and {len(texts) - shown} more" if len(texts) > shown else ""
    return ", ".join(texts[:shown]) + more


def _short(value: Any, limit: int = 40) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if len(text) > limit:
        text = text[:limit - 1] + "…"
    return repr(text) if isinstance(value, str) else text


def _apart(was: Any, now: Any, limit: int = 40) -> tuple[str, str]:
    """Two differing words (:func:`_short` each), shortened so that where they differ shows:
    past a long common start of two strings, each begins with "…" a little before the first
    difference."""
    both = isinstance(was, str) and isinstance(now, str)
    common = len(os.path.commonprefix([was, now])) if both else 0
    start = common - 10 if common > limit - 10 else 0
    if not start:
        return _short(was, limit), _short(now, limit)
    return _short("…" + was[start:], limit), _short("…" + now[start:], limit)


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
            return f"command of step {step} changed: {_words_changed(was, now)}"
        return f"command of step {step} changed"
    return "files or destinations of the task changed"


def _words_changed(was: list[Any], now: list[Any]) -> str:
    """How a command (a word list) changed: the words it gained and lost, counted as
    multisets (``gained '--cell', '5'``; ``lost '3'; gained '4'``; one for another: ``'5' →
    '7'``); the same words in another order are named by the first that moved."""
    old, new = Counter(map(_key, was)), Counter(map(_key, now))
    gained = _taken([w for w in now if new[_key(w)] > old[_key(w)]], new - old)
    lost = _taken([w for w in was if old[_key(w)] > new[_key(w)]], old - new)
    if not gained and not lost:
        x, y = next((x, y) for x, y in zip(was, now, strict=True) if x != y)
        a, b = _apart(x, y)
        return f"the same words in another order: {a} → {b} first"
    if len(gained) == 1 and len(lost) == 1:
        a, b = _apart(lost[0], gained[0])
        return f"{a} → {b}"
    parts = ([f"lost {_listed(lost)}"] if lost else []) + (
        [f"gained {_listed(gained)}"] if gained else [])
    return "; ".join(parts)


def _taken(words: list[Any], counts: Counter[str]) -> list[Any]:
    """``words`` in their order, each kept as often as ``counts`` says (the last ones)."""
    left = Counter(counts)
    kept = []
    for w in reversed(words):
        if left[_key(w)] > 0:
            left[_key(w)] -= 1
            kept.append(w)
    return kept[::-1]


def _key(word: Any) -> str:
    return word if isinstance(word, str) else json.dumps(word, sort_keys=True)


def _listed(words: list[Any]) -> str:
    return _some([_short(w) for w in words])
