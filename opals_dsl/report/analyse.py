"""The report's figures: a run's trace rows → plain data (JSON-ready) for the page.

In: the trace rows (one per plan node and attempt, as the scheduler wrote them), optionally the
plan that ran and the run's state folder (for the tails of failed steps' logs). Out: one dict
— summary, time per phase, engines, jobs, steps, slowest tasks, machine stages, failures and
the timeline's bars — that :mod:`opals_dsl.report.render` turns into the page and that the page
embeds for its script.

Each part of the figures is one function of the rows and of what earlier parts found; they run
in the order :func:`analyse` calls them.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..plan import model, trace

if TYPE_CHECKING:
    import networkx as nx

#: bar categories, in legend order: (code, label)
PHASES = ("machine stage", "task stage", "exec", "copy-back")
MACHINE_STAGE, TASK_STAGE, EXEC, COPYBACK = range(4)
#: columns of a timeline row in the embedded JSON
BAR_FIELDS = ("lane", "start", "dur", "phase", "status", "attempt", "bytes", "task", "job",
              "step", "node", "exit")
# the columns by name, for the code below
_LANE, _START, _DUR, _PHASE, _STATUS, _ATTEMPT, _BYTES, _TASK, _JOB, _STEP = range(10)
#: statuses of rows for nodes that never ran
UNRUN = ("skipped", "blocked", "not-run", "reused")
#: statuses of rows for nodes that failed: ``timeout`` is a step stopped at its time limit
FAILING = ("failed", "timeout")
#: statuses of the rows of tasks whose engine never reported back (a lost engine, an
#: interrupted run): the time it held them, in no phase
HELD = ("lost", "interrupted")
SLOWEST = 10
#: an upstream task's name in a reason (``upstream dem/s1 re-runs``), left out of its kind
_UPSTREAM = re.compile(r"^upstream \S+ ")
#: the step a task ran again from (``from step grid: param cell changed``), left out of its kind
_FROM_STEP = re.compile(r"^from step \S+: ")
MAX_FAILURES = 50
TAIL_LINES = 12

Row = dict[str, Any]
TaskKey = tuple[str, str]


def _phase(row: Mapping[str, Any]) -> int | None:
    kind = row.get("kind")
    if kind == "stage":
        return MACHINE_STAGE if row.get("task") is None else TASK_STAGE
    if kind == "exec":
        return EXEC
    if kind == "copyback":
        return COPYBACK
    return None


def _timed(row: Mapping[str, Any]) -> bool:
    return (isinstance(row.get("start"), int | float) and isinstance(row.get("end"), int | float)
            and row.get("status") not in UNRUN)


@dataclass(slots=True)
class _TaskRows:
    rows: list[Row]
    max_attempt: int = 0


def analyse(rows: list[Row], plan: nx.DiGraph | None = None,
            state_dir: str | Path | None = None) -> dict[str, Any]:
    """What the report shows, as plain data computed from the trace rows.

    ``plan`` adds the pipeline's name, its job order and which steps are ``call`` steps (they
    have no exit status); ``state_dir`` lets failed steps show the tail of their logs.
    """
    timed = [r for r in rows if _timed(r) and _phase(r) is not None]
    t0 = min((r["start"] for r in timed), default=0.0)
    t1 = max((r["end"] for r in timed), default=0.0)
    wall = max(0.0, t1 - t0)

    info = model.info(plan) if plan is not None else None
    jobs_order = list(info.jobs) if info is not None else []
    for r in rows:
        job = r.get("job")
        if job is not None and job not in jobs_order:
            jobs_order.append(job)
    job_rank = {j: i for i, j in enumerate(jobs_order)}
    calls = model.call_steps(plan) if plan is not None else set()

    lane_keys = _lanes(timed)
    tasks = _tasks(rows)
    task_keys = sorted(tasks, key=lambda k: job_rank.get(k[0], len(job_rank)))
    outcome = {key: _outcome(t.rows) for key, t in tasks.items()}
    bars = _bars(timed, t0, lane_keys, {k: i for i, k in enumerate(task_keys)}, calls)
    phases, busy, bytes_by_phase = _phases(bars)
    lanes = _lane_figures(bars, lane_keys, timed)
    held = sum(ln["held"] for ln in lanes)
    unreported = sum(ln["unreported"] for ln in lanes)

    counts = Counter(outcome.values())
    summary = {
        "tasks": len(tasks), "done": counts["done"], "skipped": counts["skipped"],
        "failed": counts["failed"], "blocked": counts["blocked"], "not_run": counts["not-run"],
        "retried": sum(t.max_attempt for t in tasks.values()),
        "retried_tasks": sum(1 for t in tasks.values() if t.max_attempt > 0),
        "wall": wall, "start": t0 if timed else None, "end": t1 if timed else None,
        # a machine stage found ready (cached) did not run
        "nodes_run": sum(1 for b in bars if b[_STATUS] not in HELD and b[_STATUS] != "cached"),
        "bytes_staged": bytes_by_phase[MACHINE_STAGE] + bytes_by_phase[TASK_STAGE],
        "bytes_copied": bytes_by_phase[COPYBACK],
        "engines": len(lanes), "machines": len({m for m, _ in lane_keys}),
    }
    why = trace.read_why(state_dir) if state_dir is not None else {}
    slowest = _slowest(tasks, outcome)[:SLOWEST]
    for t in slowest:
        t["why"] = why.get(f"{t['job']}/{t['task']}")
    failures = _failures(rows, tasks, outcome, state_dir, t0)
    stopped = _interrupted(rows, tasks, state_dir, t0)
    return {
        "pipeline": info.pipeline if info is not None else None,
        "summary": summary,
        "phases": phases,
        "idle": max(0.0, wall * len(lanes) - busy - held - unreported),
        "held": held,
        "unreported": unreported,
        "jobs": _jobs(jobs_order, task_keys, tasks, outcome, bars),
        "steps": _steps(bars, job_rank),
        "slowest": slowest,
        "why": _why_kinds(why),
        "machine_stages": _machine_stages(timed, job_rank),
        "lanes": lanes,
        "failures": failures[:MAX_FAILURES],
        "failures_total": len(failures),
        "interrupted": stopped[:MAX_FAILURES],
        "interrupted_total": len(stopped),
        "timeline": {
            "t0": t0, "wall": wall, "fields": list(BAR_FIELDS), "phases": list(PHASES),
            "lanes": [{"machine": m, "engine": e} for m, e in lane_keys],
            "tasks": [f"{j}/{t}" for j, t in task_keys],
            "bars": bars,
        },
    }


def _lane_key(r: Row) -> tuple[str, Any]:
    return (str(r.get("machine") or "?"), r.get("engine"))


def _borrowed(r: Row) -> list[tuple[str, Any]]:
    """The lanes a row's task held besides its own (a step with ``threads``)."""
    borrowed = r.get("borrowed")
    if not isinstance(borrowed, list):
        return []
    return [(str(r.get("machine") or "?"), e) for e in borrowed if isinstance(e, int)]


def _lanes(timed: list[Row]) -> list[tuple[str, Any]]:
    """One lane per engine, grouped by machine (machines by name, engines by id); an engine
    that was only held for another's threaded step too."""
    keys = {_lane_key(r) for r in timed}
    keys.update(k for r in timed for k in _borrowed(r))
    return sorted(keys, key=lambda k: (k[0], k[1] if isinstance(k[1], int) else -1, str(k[1])))


def _tasks(rows: list[Row]) -> dict[TaskKey, _TaskRows]:
    """Each task's rows, in first appearance."""
    tasks: dict[TaskKey, _TaskRows] = {}
    for r in rows:
        if r.get("task") is None or r.get("job") is None:
            continue
        t = tasks.setdefault((str(r["job"]), str(r["task"])), _TaskRows([]))
        t.rows.append(r)
        attempt = r.get("attempt") or 0
        if isinstance(attempt, int):
            t.max_attempt = max(t.max_attempt, attempt)
    return tasks


def _outcome(task_rows: list[Row]) -> str:
    """A task's final state: that of the last group of rows written for it."""
    last = task_rows[-1]
    status = last.get("status")
    if status in UNRUN:
        return str(status)
    attempt = last.get("attempt") or 0
    mine = [r for r in task_rows if (r.get("attempt") or 0) == attempt and _timed(r)]
    if any(r.get("status") in FAILING for r in mine):
        return "failed"
    if any(r.get("kind") == "copyback" and r.get("status") == "done" for r in mine):
        return "done"
    return "failed"  # the attempt stopped before its copy-back


def _bars(timed: list[Row], t0: float, lane_keys: list[tuple[str, Any]],
          task_index: Mapping[TaskKey, int], calls: set[str]) -> list[list[Any]]:
    """One timeline bar per node that ran (columns: :data:`BAR_FIELDS`)."""
    lane_of = {k: i for i, k in enumerate(lane_keys)}
    bars = []
    for r in timed:
        phase = _phase(r)
        task = r.get("task")
        key = (str(r.get("job")), str(task)) if task is not None else None
        exit_status = r.get("returncode")
        if exit_status is None and phase == EXEC and r.get("status") == "done" \
                and r.get("node") not in calls:
            exit_status = 0
        bars.append([
            lane_of[_lane_key(r)],
            round(r["start"] - t0, 6), round(max(0.0, r["end"] - r["start"]), 6), phase,
            str(r.get("status")), int(r.get("attempt") or 0), int(r.get("bytes") or 0),
            task_index[key] if key is not None else -1, r.get("job"), r.get("step"),
            r.get("node"), exit_status,
        ])
    return bars


def _phases(bars: list[list[Any]]) -> tuple[list[dict[str, Any]], float, list[int]]:
    """Engine time, nodes and bytes per phase; the total busy time; bytes per phase."""
    seconds = [0.0] * len(PHASES)
    count = [0] * len(PHASES)
    nbytes = [0] * len(PHASES)
    for b in bars:
        if b[_STATUS] in HELD:
            continue
        seconds[b[_PHASE]] += b[_DUR]
        count[b[_PHASE]] += 1
        if b[_STATUS] not in FAILING:
            nbytes[b[_PHASE]] += b[_BYTES]
    busy = sum(seconds)
    phases = [{"phase": PHASES[i], "seconds": seconds[i], "nodes": count[i],
               "bytes": nbytes[i], "share": seconds[i] / busy if busy else 0.0}
              for i in range(len(PHASES))]
    return phases, busy, nbytes


def _lane_figures(bars: list[list[Any]], lane_keys: list[tuple[str, Any]],
                  timed: list[Row]) -> list[dict[str, Any]]:
    """Busy time and tasks per engine, and the time it was held (kept free) for a threaded
    step of another engine of its machine."""
    busy = [0.0] * len(lane_keys)
    held = [0.0] * len(lane_keys)
    tasks: list[set[int]] = [set() for _ in lane_keys]
    held_spans: list[list[tuple[float, float]]] = [[] for _ in lane_keys]
    for b in bars:
        if b[_STATUS] in HELD:  # the tasks of one batch share one span: count it once
            held_spans[b[_LANE]].append((b[_START], b[_START] + b[_DUR]))
            continue
        busy[b[_LANE]] += b[_DUR]
        if b[_PHASE] == TASK_STAGE:
            tasks[b[_LANE]].add(b[_TASK])
    unreported = [_covered(spans) for spans in held_spans]
    for lane, seconds in enumerate(unreported):
        busy[lane] += seconds
    lane_of = {k: i for i, k in enumerate(lane_keys)}
    for r in timed:
        for key in _borrowed(r):
            held[lane_of[key]] += max(0.0, r["end"] - r["start"])
    return [{"machine": m, "engine": e, "busy": busy[i], "held": held[i],
             "unreported": unreported[i], "tasks": len(tasks[i])}
            for i, (m, e) in enumerate(lane_keys)]


def _covered(spans: list[tuple[float, float]]) -> float:
    """The time that at least one of ``spans`` (start, end) covers."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def _jobs(jobs_order: list[str], task_keys: list[TaskKey], tasks: Mapping[TaskKey, _TaskRows],
          outcome: Mapping[TaskKey, str], bars: list[list[Any]]) -> list[dict[str, Any]]:
    jobs = []
    for job in jobs_order:
        keys = [k for k in task_keys if k[0] == job]
        if not keys:
            continue
        c = Counter(outcome[k] for k in keys)
        jobs.append({
            "job": job, "tasks": len(keys), "done": c["done"], "skipped": c["skipped"],
            "failed": c["failed"], "not_run": c["blocked"] + c["not-run"],
            "retried": sum(tasks[k].max_attempt for k in keys),
            "exec": sum(b[_DUR] for b in bars if b[_JOB] == job and b[_PHASE] == EXEC),
        })
    return jobs


def _steps(bars: list[list[Any]], job_rank: Mapping[str, int]) -> list[dict[str, Any]]:
    """Every step's run times: each exec node that ran (all attempts)."""
    times: dict[tuple[str, str], list[float]] = {}
    failed: Counter[tuple[str, str]] = Counter()
    for b in bars:
        if b[_PHASE] != EXEC:
            continue
        key = (str(b[_JOB]), str(b[_STEP]))
        times.setdefault(key, []).append(b[_DUR])
        if b[_STATUS] in FAILING:
            failed[key] += 1
    return [{"job": j, "step": s, "runs": len(v), "failed": failed[(j, s)],
             "total": sum(v), "mean": sum(v) / len(v), "max": max(v)}
            for (j, s), v in sorted(times.items(),
                                    key=lambda kv: job_rank.get(kv[0][0], len(job_rank)))]


def _slowest(tasks: Mapping[TaskKey, _TaskRows],
             outcome: Mapping[TaskKey, str]) -> list[dict[str, Any]]:
    """Tasks by the span of their last attempt that ran (task stage → copy-back), longest
    first."""
    spans = []
    for key, t in tasks.items():
        ran = [r for r in t.rows if _timed(r) and r.get("status") not in HELD]
        if not ran:
            continue
        last = max(int(r.get("attempt") or 0) for r in ran)
        mine = [r for r in ran if int(r.get("attempt") or 0) == last]
        spans.append({
            "job": key[0], "task": key[1],
            "seconds": max(r["end"] for r in mine) - min(r["start"] for r in mine),
            "exec": sum(r["end"] - r["start"] for r in mine if _phase(r) == EXEC),
            "attempts": last + 1, "status": outcome[key],
            "engine": mine[-1].get("engine"), "machine": mine[-1].get("machine"),
        })
    spans.sort(key=lambda s: (-s["seconds"], s["job"], s["task"]))
    return spans


def _why_kinds(why: Mapping[str, str]) -> list[dict[str, Any]]:
    """How many tasks ran for each kind of reason (the reason up to its first ``:``, after the
    step a task ran from, upstream tasks unnamed: ``upstream re-runs``), most first, with one
    task as an example."""
    kinds: dict[str, list[Any]] = {}
    for task, reason in why.items():
        kind = _UPSTREAM.sub("upstream ", _FROM_STEP.sub("", reason).split(": ", 1)[0])
        found = kinds.setdefault(kind, [0, task, reason])
        found[0] += 1
    return [{"why": k, "tasks": n, "example": t, "reason": r}
            for k, (n, t, r) in sorted(kinds.items(), key=lambda kv: (-kv[1][0], kv[0]))]


def _machine_stages(timed: list[Row], job_rank: Mapping[str, int]) -> list[dict[str, Any]]:
    """How often each machine ran a job's machine stage, found it ready, or failed it."""
    found: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    for r in timed:
        if _phase(r) == MACHINE_STAGE:
            found[(str(r.get("machine") or "?"), str(r.get("job")))][str(r.get("status"))] += 1
    return [{"machine": m, "job": j, "done": c["done"], "cached": c["cached"],
             "failed": c["failed"]}
            for (m, j), c in sorted(found.items(),
                                    key=lambda kv: (kv[0][0], job_rank.get(kv[0][1], 0)))]


def _failures(rows: list[Row], tasks: Mapping[TaskKey, _TaskRows],
              outcome: Mapping[TaskKey, str], state_dir: str | Path | None,
              t0: float) -> list[dict[str, Any]]:
    found = []
    for r in rows:
        if r.get("status") not in FAILING or not _timed(r):
            continue
        job, task = str(r.get("job")), r.get("task")
        key = (job, str(task)) if task is not None else None
        attempt = int(r.get("attempt") or 0)
        final = key is not None and attempt == tasks[key].max_attempt \
            and outcome[key] == "failed"
        log = tail = None
        step = r.get("step")
        if step and key is not None:  # every attempt's log
            log, tail = _log_of(state_dir, job, key[1], step, attempt)
        found.append({
            "node": r.get("node"), "job": job, "task": task, "step": step,
            "phase": PHASES[_phase(r) or 0], "attempt": attempt,
            "engine": r.get("engine"), "machine": r.get("machine"),
            "start": r["start"] - t0, "seconds": r["end"] - r["start"],
            "exit": r.get("returncode"), "message": r.get("message"),
            "outcome": outcome.get(key, "failed") if key is not None else "failed",
            "final": final, "log": log, "tail": tail,
            "timeout": r.get("status") == "timeout",
        })
    return found


def _interrupted(rows: list[Row], tasks: Mapping[TaskKey, _TaskRows],
                 state_dir: str | Path | None, t0: float) -> list[dict[str, Any]]:
    """The tasks an engine held when the run was interrupted (rows ``interrupted``), each with
    the log of the last of its steps that had begun (``step``, ``log``, ``tail``; None where
    no step had, or the logs are not at hand)."""
    found = []
    for r in rows:
        if r.get("status") != "interrupted" or not _timed(r) or r.get("task") is None:
            continue
        job, task = str(r.get("job")), str(r.get("task"))
        attempt = int(r.get("attempt") or 0)
        step = log = tail = None
        if state_dir is not None:
            steps = [x.get("step") for x in tasks[(job, task)].rows
                     if x.get("kind") == "exec" and (x.get("attempt") or 0) == attempt]
            for name in reversed([x for x in steps if x]):
                log, tail = _log_of(state_dir, job, task, name, attempt)
                if log is not None:
                    step = name
                    break
        found.append({
            "job": job, "task": task, "attempt": attempt, "engine": r.get("engine"),
            "machine": r.get("machine"), "start": r["start"] - t0,
            "seconds": r["end"] - r["start"], "step": step, "log": log, "tail": tail,
        })
    return found


def _log_of(state_dir: str | Path | None, job: str, task: str, step: str,
            attempt: int) -> tuple[str | None, list[str] | None]:
    """The path of a step's log for one attempt and its last lines; (None, None) where there
    is no such log or the logs are not at hand."""
    if state_dir is None:
        return None, None
    path = trace.log_path(Path(state_dir) / "logs", job, task, step, attempt)
    if not path.is_file():
        return None, None
    return str(path.resolve()), trace.tail(path, TAIL_LINES)
