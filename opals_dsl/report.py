"""``opf report``: a run's trace → one self-contained HTML page (timeline, summary, plan).

In: a run's state folder (``trace.jsonl``, one row per plan node as the scheduler wrote it, and
the step logs under ``logs/``), and optionally the plan (``networkx.DiGraph``,
docs/plan-format.md) the run executed. Out: an HTML file that opens offline — its style sheet,
its script and its data are inside it, nothing is fetched.

The page holds
    * a summary: wall time (first node start to last node end), tasks run / skipped / failed /
      retried / not run, bytes staged and copied back;
    * a timeline: one lane per engine, lanes grouped by machine, one bar per node that ran,
      coloured by kind (machine stage, task stage, exec, copy-back); failed nodes are drawn in
      red, nodes of a retry attempt carry a dark band; hovering a bar shows its task, step,
      times, bytes, attempt and exit status and outlines the other nodes of its task;
    * where the time went: engine time per phase (staging and copy-back versus computing),
      busy time per engine, the slowest tasks, every step's run times, and how often each
      machine really ran a job's machine stage (``done``) rather than finding it ready
      (``cached``);
    * the plan at job level (:func:`opals_dsl.dot.to_job_dot`, drawn by Graphviz's ``dot`` and
      inlined as SVG) when a plan is given and Graphviz is installed;
    * every failed node, with the last lines of the step's log for a task's last attempt.

:func:`analyse` turns trace rows into plain data (what the page shows, also embedded in it as
JSON, ``<script id="opf-data">``); :func:`render` writes the page; :func:`write_report` does
both for a state folder. The timeline is drawn by the page's own small script from that JSON,
so a run of many thousands of nodes stays a compact file; when the script has run it sets
``data-opf-ready`` (the number of bars drawn) on the ``<html>`` element, or ``data-opf-error``.

A trace cut short (a killed run) is read up to its last complete row. Times are the engines'
clocks (``time.time()``), so lanes of different machines are only as aligned as their clocks.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .engine import output_target, write_atomic
from .progress import format_bytes
from .progress import format_duration as _long_duration

if TYPE_CHECKING:
    import networkx as nx

#: bar categories, in legend order: (code, label)
PHASES = ("machine stage", "task stage", "exec", "copy-back")
MACHINE_STAGE, TASK_STAGE, EXEC, COPYBACK = range(4)
#: columns of a timeline row in the embedded JSON
BAR_FIELDS = ("lane", "start", "dur", "phase", "status", "attempt", "bytes", "task", "job",
              "step", "node", "exit")
#: statuses of rows for nodes that never ran
UNRUN = ("skipped", "blocked", "not-run")
SLOWEST = 10
MAX_FAILURES = 50
TAIL_LINES = 12
DEFAULT_OUTPUT = "report.html"


class ReportError(Exception):
    """No report can be made (no trace in the state folder, or nothing readable in it)."""


# -- reading ---------------------------------------------------------------------------------


def read_rows(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """The rows of a trace file and how many lines could not be read (a killed run's last)."""
    rows: list[dict[str, Any]] = []
    bad = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad += 1
    return rows, bad


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


# -- analysis --------------------------------------------------------------------------------


def analyse(rows: list[dict[str, Any]], plan: nx.DiGraph | None = None,
            state_dir: str | Path | None = None) -> dict[str, Any]:
    """What the report shows, as plain data (JSON-ready) computed from the trace rows.

    ``plan`` adds the pipeline's name, its job order and which steps are ``call`` steps (they
    have no exit status); ``state_dir`` lets failed steps show the tail of their logs.
    """
    timed = [r for r in rows if _timed(r) and _phase(r) is not None]
    t0 = min((r["start"] for r in timed), default=0.0)
    t1 = max((r["end"] for r in timed), default=0.0)
    wall = max(0.0, t1 - t0)

    jobs_order = list(plan.graph.get("jobs") or []) if plan is not None else []
    for r in rows:
        job = r.get("job")
        if job is not None and job not in jobs_order:
            jobs_order.append(job)
    calls = set()
    if plan is not None:
        calls = {n for n, a in plan.nodes(data=True) if a.get("kind") == "exec" and a.get("call")}

    # lanes: one per engine, grouped by machine (machines by name, engines by id)
    lane_keys = sorted({(str(r.get("machine") or "?"), r.get("engine")) for r in timed},
                       key=lambda k: (k[0], k[1] if isinstance(k[1], int) else -1, str(k[1])))
    lane_of = {k: i for i, k in enumerate(lane_keys)}

    # tasks, in job order then first appearance
    tasks: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        if r.get("task") is None or r.get("job") is None:
            continue
        key = (str(r["job"]), str(r["task"]))
        t = tasks.setdefault(key, {"rows": [], "max_attempt": 0})
        t["rows"].append(r)
        attempt = r.get("attempt") or 0
        if isinstance(attempt, int):
            t["max_attempt"] = max(t["max_attempt"], attempt)
    job_rank = {j: i for i, j in enumerate(jobs_order)}
    task_keys = sorted(tasks, key=lambda k: job_rank.get(k[0], len(job_rank)))
    task_index = {k: i for i, k in enumerate(task_keys)}

    outcome: dict[tuple[str, str], str] = {}
    for key, t in tasks.items():
        outcome[key] = _outcome(t["rows"])

    # bars
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
            lane_of[(str(r.get("machine") or "?"), r.get("engine"))],
            round(r["start"] - t0, 6), round(max(0.0, r["end"] - r["start"]), 6), phase,
            str(r.get("status")), int(r.get("attempt") or 0), int(r.get("bytes") or 0),
            task_index[key] if key is not None else -1, r.get("job"), r.get("step"),
            r.get("node"), exit_status,
        ])

    # time per phase (engine-seconds), bytes
    phase_time = [0.0] * len(PHASES)
    phase_count = [0] * len(PHASES)
    phase_bytes = [0] * len(PHASES)
    for b in bars:
        phase_time[b[3]] += b[2]
        phase_count[b[3]] += 1
        if b[4] != "failed":
            phase_bytes[b[3]] += b[6]
    busy = sum(phase_time)
    lane_busy = [0.0] * len(lane_keys)
    lane_tasks: list[set[int]] = [set() for _ in lane_keys]
    for b in bars:
        lane_busy[b[0]] += b[2]
        if b[3] == TASK_STAGE:
            lane_tasks[b[0]].add(b[7])
    lanes = [{"machine": m, "engine": e, "busy": lane_busy[i], "tasks": len(lane_tasks[i])}
             for i, (m, e) in enumerate(lane_keys)]
    engine_time = wall * len(lanes)

    # task counts (the same words as the terminal summary)
    counts = Counter(outcome.values())
    retries = sum(t["max_attempt"] for t in tasks.values())
    retried_tasks = sum(1 for t in tasks.values() if t["max_attempt"] > 0)
    summary = {
        "tasks": len(tasks), "done": counts["done"], "skipped": counts["skipped"],
        "failed": counts["failed"], "blocked": counts["blocked"], "not_run": counts["not-run"],
        "retried": retries, "retried_tasks": retried_tasks,
        "wall": wall, "start": t0 if timed else None, "end": t1 if timed else None,
        "nodes_run": len(bars),
        "bytes_staged": phase_bytes[MACHINE_STAGE] + phase_bytes[TASK_STAGE],
        "bytes_copied": phase_bytes[COPYBACK],
        "engines": len(lanes), "machines": len({m for m, _ in lane_keys}),
    }
    phases = [{"phase": PHASES[i], "seconds": phase_time[i], "nodes": phase_count[i],
               "bytes": phase_bytes[i], "share": phase_time[i] / busy if busy else 0.0}
              for i in range(len(PHASES))]
    idle = max(0.0, engine_time - busy)

    # per job
    jobs = []
    for job in jobs_order:
        keys = [k for k in task_keys if k[0] == job]
        if not keys:
            continue
        c = Counter(outcome[k] for k in keys)
        jobs.append({
            "job": job, "tasks": len(keys), "done": c["done"], "skipped": c["skipped"],
            "failed": c["failed"], "not_run": c["blocked"] + c["not-run"],
            "retried": sum(tasks[k]["max_attempt"] for k in keys),
            "exec": sum(b[2] for b in bars if b[8] == job and b[3] == EXEC),
        })

    # per step: every exec node that ran (all attempts)
    step_stats: dict[tuple[str, str], list[float]] = {}
    step_failed: Counter[tuple[str, str]] = Counter()
    for b in bars:
        if b[3] != EXEC:
            continue
        key = (str(b[8]), str(b[9]))
        step_stats.setdefault(key, []).append(b[2])
        if b[4] == "failed":
            step_failed[key] += 1
    steps = [{"job": j, "step": s, "runs": len(v), "failed": step_failed[(j, s)],
              "total": sum(v), "mean": sum(v) / len(v), "max": max(v)}
             for (j, s), v in sorted(step_stats.items(),
                                     key=lambda kv: job_rank.get(kv[0][0], len(job_rank)))]

    # slowest tasks: the span of each task's last attempt that ran (task stage → copy-back)
    spans = []
    for key, t in tasks.items():
        ran = [r for r in t["rows"] if _timed(r)]
        if not ran:
            continue
        last = max(int(r.get("attempt") or 0) for r in ran)
        mine = [r for r in ran if int(r.get("attempt") or 0) == last]
        start = min(r["start"] for r in mine)
        end = max(r["end"] for r in mine)
        spans.append({
            "job": key[0], "task": key[1], "seconds": end - start,
            "exec": sum(r["end"] - r["start"] for r in mine if _phase(r) == EXEC),
            "attempts": last + 1, "status": outcome[key],
            "engine": mine[-1].get("engine"), "machine": mine[-1].get("machine"),
        })
    spans.sort(key=lambda s: (-s["seconds"], s["job"], s["task"]))

    # machine stages per machine and job
    mstage: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    for r in timed:
        if _phase(r) == MACHINE_STAGE:
            mstage[(str(r.get("machine") or "?"), str(r.get("job")))][str(r.get("status"))] += 1
    machine_stages = [{"machine": m, "job": j, "done": c["done"], "cached": c["cached"],
                       "failed": c["failed"]}
                      for (m, j), c in sorted(mstage.items(),
                                              key=lambda kv: (kv[0][0],
                                                              job_rank.get(kv[0][1], 0)))]

    failures = _failures(rows, tasks, outcome, state_dir, t0)

    return {
        "pipeline": plan.graph.get("pipeline") if plan is not None else None,
        "summary": summary,
        "phases": phases,
        "idle": idle,
        "jobs": jobs,
        "steps": steps,
        "slowest": spans[:SLOWEST],
        "machine_stages": machine_stages,
        "lanes": lanes,
        "failures": failures[:MAX_FAILURES],
        "failures_total": len(failures),
        "timeline": {
            "t0": t0, "wall": wall, "fields": list(BAR_FIELDS), "phases": list(PHASES),
            "lanes": [{"machine": m, "engine": e} for m, e in lane_keys],
            "tasks": [f"{j}/{t}" for j, t in task_keys],
            "bars": bars,
        },
    }


def _outcome(task_rows: list[dict[str, Any]]) -> str:
    """A task's final state: that of the last group of rows written for it."""
    last = task_rows[-1]
    status = last.get("status")
    if status in UNRUN:
        return str(status)
    attempt = last.get("attempt") or 0
    mine = [r for r in task_rows if (r.get("attempt") or 0) == attempt and _timed(r)]
    if any(r.get("status") == "failed" for r in mine):
        return "failed"
    if any(r.get("kind") == "copyback" and r.get("status") == "done" for r in mine):
        return "done"
    return "failed"  # the attempt stopped before its copy-back


def _failures(rows: list[dict[str, Any]], tasks: Mapping[tuple[str, str], dict[str, Any]],
              outcome: Mapping[tuple[str, str], str], state_dir: str | Path | None,
              t0: float) -> list[dict[str, Any]]:
    found = []
    for r in rows:
        if r.get("status") != "failed" or not _timed(r):
            continue
        job, task = str(r.get("job")), r.get("task")
        key = (job, str(task)) if task is not None else None
        attempt = int(r.get("attempt") or 0)
        final = key is not None and attempt == tasks[key]["max_attempt"] \
            and outcome[key] == "failed"
        log = tail = None
        step = r.get("step")
        if final and step and state_dir is not None and key is not None:
            path = Path(state_dir) / "logs" / job / key[1] / f"{step}.log"
            if path.is_file():
                log = str(path.resolve())
                tail = _tail(path)
        found.append({
            "node": r.get("node"), "job": job, "task": task, "step": step,
            "phase": PHASES[_phase(r) or 0], "attempt": attempt,
            "engine": r.get("engine"), "machine": r.get("machine"),
            "start": r["start"] - t0, "seconds": r["end"] - r["start"],
            "exit": r.get("returncode"), "message": r.get("message"),
            "outcome": outcome.get(key, "failed") if key is not None else "failed",
            "final": final, "log": log, "tail": tail,
        })
    return found


def _tail(path: Path, lines: int = TAIL_LINES) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 16384))
            data = f.read()
    except OSError:
        return []
    return data.decode("utf-8", errors="replace").splitlines()[-lines:]


# -- the plan drawing ------------------------------------------------------------------------


def plan_svg(plan: nx.DiGraph, timeout: float = 30.0) -> str | None:
    """The job-level plan drawn by Graphviz as inline SVG, or None without Graphviz."""
    from .dot import to_job_dot

    exe = shutil.which("dot")
    if exe is None:
        return None
    try:
        done = subprocess.run(
            [exe, "-Tsvg", "-Gfontname=Helvetica", "-Gfontsize=12", "-Nfontname=Helvetica",
             "-Efontname=Helvetica"],
            input=to_job_dot(plan), capture_output=True, text=True, timeout=timeout,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0 or "<svg" not in done.stdout:
        return None
    svg = done.stdout[done.stdout.index("<svg"):]
    # Graphviz's comments hold node ids; drop them (a "--" inside would end a comment early)
    while "<!--" in svg:
        a = svg.index("<!--")
        b = svg.find("-->", a)
        if b < 0:
            break
        svg = svg[:a] + svg[b + 3:]
    return svg


# -- the page --------------------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    """``0.0123`` → ``"12 ms"``, ``75.2`` → ``"1 min 15 s"`` (as the run's summary says)."""
    if seconds < 0.01:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return _long_duration(seconds)


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f}%" if whole > 0 else "–"


def _table(head: Iterable[str], body: Iterable[Iterable[Any]], numeric: Iterable[int] = (),
           cls: str = "") -> str:
    num = set(numeric)
    out = [f'<table class="{cls}"><thead><tr>']
    out += [f'<th class="{"n" if i in num else ""}">{_e(h)}</th>' for i, h in enumerate(head)]
    out.append("</tr></thead><tbody>")
    for row in body:
        out.append("<tr>")
        out += [f'<td class="{"n" if i in num else ""}">{c}</td>' for i, c in enumerate(row)]
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _tile(metric: str, label: str, value: Any, shown: str, cls: str = "") -> str:
    return (f'<div class="tile {cls}" data-metric="{_e(metric)}" data-value="{_e(value)}">'
            f'<div class="v">{_e(shown)}</div><div class="l">{_e(label)}</div></div>')


def _when(t: float | None) -> str:
    if t is None:
        return "–"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def render(data: Mapping[str, Any], *, svg: str | None = None, title: str | None = None,
           source: str | None = None, plan_note: str | None = None) -> str:
    """The HTML page for :func:`analyse`'s ``data``; ``svg`` is the plan drawing to inline."""
    s = data["summary"]
    name = title or data.get("pipeline") or "opf run"
    blob = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    blob = blob.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")

    tiles = [
        _tile("wall", "wall time", round(s["wall"], 3), format_duration(s["wall"])),
        _tile("done", "tasks run", s["done"], str(s["done"]), "ok"),
        _tile("skipped", "skipped", s["skipped"], str(s["skipped"])),
        _tile("failed", "failed", s["failed"], str(s["failed"]), "bad" if s["failed"] else ""),
        _tile("retried", "retried", s["retried"], str(s["retried"]),
              "warn" if s["retried"] else ""),
    ]
    if s["blocked"] or s["not_run"]:
        tiles.append(_tile("not_run", "not run", s["blocked"] + s["not_run"],
                           str(s["blocked"] + s["not_run"]), "warn"))
    tiles += [
        _tile("bytes_staged", "staged", s["bytes_staged"], format_bytes(s["bytes_staged"])),
        _tile("bytes_copied", "copied back", s["bytes_copied"],
              format_bytes(s["bytes_copied"])),
        _tile("engines", f"engines on {s['machines']} machine{'s' if s['machines'] != 1 else ''}",
              s["engines"], str(s["engines"])),
    ]

    # where the time went
    phases = data["phases"]
    busy = sum(p["seconds"] for p in phases)
    stack = "".join(
        f'<span class="seg p{i}" style="width:{100 * p["share"]:.3f}%" '
        f'title="{_e(p["phase"])}: {_e(format_duration(p["seconds"]))}"></span>'
        for i, p in enumerate(phases) if p["seconds"] > 0
    )
    staging = phases[MACHINE_STAGE]["seconds"] + phases[TASK_STAGE]["seconds"]
    sentence = (
        f"Of {_e(format_duration(busy))} of engine time in nodes, staging took "
        f"<b>{_pct(staging, busy)}</b>, copy-back <b>{_pct(phases[COPYBACK]['seconds'], busy)}"
        f"</b> and the steps themselves <b>{_pct(phases[EXEC]['seconds'], busy)}</b>."
    )
    if data["summary"]["engines"]:
        total = s["wall"] * s["engines"]
        sentence += (f" The engines were busy {_pct(busy, total)} of the wall time "
                     f"({_e(format_duration(data['idle']))} idle).")
    phase_table = _table(
        ["phase", "nodes", "engine time", "share", "bytes"],
        [[f'<span class="sw p{i}"></span>{_e(p["phase"])}', p["nodes"],
          _e(format_duration(p["seconds"])), _pct(p["seconds"], busy),
          _e(format_bytes(p["bytes"])) if i != EXEC else
          f'<span class="muted">{_e(format_bytes(p["bytes"]))} written</span>']
         for i, p in enumerate(phases)],
        numeric=(1, 2, 3, 4),
    )
    lanes_table = _table(
        ["machine", "engine", "tasks", "busy", "of wall"],
        [[_e(ln["machine"]), _e(ln["engine"]), ln["tasks"], _e(format_duration(ln["busy"])),
          _pct(ln["busy"], s["wall"])] for ln in data["lanes"]],
        numeric=(1, 2, 3, 4),
    )
    slowest = _table(
        ["task", "time", "of which steps", "attempts", "engine", "outcome"],
        [[_e(f"{t['job']}/{t['task']}"), _e(format_duration(t["seconds"])),
          _e(format_duration(t["exec"])), t["attempts"], _e(t["engine"]),
          f'<span class="st {_e(t["status"])}">{_e(t["status"])}</span>']
         for t in data["slowest"]],
        numeric=(1, 2, 3, 4),
    )
    jobs = _table(
        ["job", "tasks", "run", "skipped", "failed", "not run", "retried", "step time"],
        [[_e(j["job"]), j["tasks"], j["done"], j["skipped"], j["failed"], j["not_run"],
          j["retried"], _e(format_duration(j["exec"]))] for j in data["jobs"]],
        numeric=range(1, 8),
    )
    steps = _table(
        ["job", "step", "runs", "failed", "total", "mean", "longest"],
        [[_e(x["job"]), _e(x["step"]), x["runs"], x["failed"], _e(format_duration(x["total"])),
          _e(format_duration(x["mean"])), _e(format_duration(x["max"]))]
         for x in data["steps"]],
        numeric=range(2, 7),
    )
    mstages = _table(
        ["machine", "job", "ran", "found ready", "failed"],
        [[_e(m["machine"]), _e(m["job"]), m["done"], m["cached"], m["failed"]]
         for m in data["machine_stages"]],
        numeric=(2, 3, 4),
    )

    if svg:
        plan_html = f'<div class="plan">{svg}</div>'
    else:
        plan_html = f'<p class="muted">{_e(plan_note or "The plan is not drawn.")}</p>'

    failures_html = _failures_html(data)

    sub = [f"trace: {_e(source)}"] if source else []
    sub.append(f"started {_e(_when(s['start']))}")
    sub.append(f"{s['nodes_run']} nodes ran on {s['engines']} engine"
               f"{'s' if s['engines'] != 1 else ''}")
    if data.get("unreadable"):
        sub.append(f"{data['unreadable']} unreadable trace line"
                   f"{'s' if data['unreadable'] != 1 else ''} skipped")

    legend = "".join(
        f'<span class="key"><span class="sw p{i}"></span>{_e(p)}</span>'
        for i, p in enumerate(PHASES)
    ) + ('<span class="key"><span class="sw failed"></span>failed</span>'
         '<span class="key"><span class="sw retry"></span>retry attempt</span>'
         '<span class="key"><span class="sw p0 cached"></span>machine stage found ready</span>')

    return _PAGE.format(
        title=_e(f"{name} — opf run report"),
        name=_e(name),
        sub=" · ".join(sub),
        tiles="".join(tiles),
        legend=legend,
        stack=stack,
        sentence=sentence,
        phase_table=phase_table,
        lanes_table=lanes_table,
        slowest=slowest,
        jobs=jobs,
        steps=steps,
        mstages=mstages,
        plan=plan_html,
        failures=failures_html,
        nfail=data["failures_total"],
        css=_CSS,
        script=_SCRIPT,
        data=blob,
        generated=_e(_when(time.time())),
    )


def _failures_html(data: Mapping[str, Any]) -> str:
    fails = data["failures"]
    if not fails:
        return '<p class="muted">No node failed.</p>'
    out = []
    for f in fails:
        what = f["step"] and f"step {f['step']}" or f["phase"]
        head = (f'<b>{_e(f["job"])}/{_e(f["task"] if f["task"] is not None else "")}</b> '
                f'{_e(what)} · attempt {f["attempt"] + 1} · engine {_e(f["engine"])} on '
                f'{_e(f["machine"])} · after {_e(format_duration(f["seconds"]))}')
        if f["exit"] is not None:
            head += f" · exit status {_e(f['exit'])}"
        if f["final"]:
            head += ' · <span class="st failed">failed for good</span>'
        else:
            head += f' · <span class="st {_e(f["outcome"])}">task then {_e(f["outcome"])}</span>'
        body = ""
        if f.get("message"):
            body += f'<div>{_e(f["message"])}</div>'
        if f["tail"] is not None:
            body += f'<pre class="tail">{_e(chr(10).join(f["tail"]))}</pre>'
        if f["log"]:
            body += (f'<div class="muted">log: <a href="{_e(Path(f["log"]).as_uri())}">'
                     f'{_e(f["log"])}</a></div>')
        out.append(f'<li class="{"final" if f["final"] else ""}">{head}{body}</li>')
    more = data["failures_total"] - len(fails)
    tail = f'<p class="muted">… and {more} more.</p>' if more > 0 else ""
    return f'<ul class="failures">{"".join(out)}</ul>{tail}'


# -- entry points ----------------------------------------------------------------------------


def write_report(state_dir: str | Path, out_path: str | Path,
                 plan: nx.DiGraph | None = None) -> Path:
    """Write the report of the run whose state is in ``state_dir`` to ``out_path``; its path.

    ``plan`` (the plan that ran) adds the pipeline's name and the job-level plan drawing.
    Raises :class:`ReportError` when ``state_dir`` holds no trace.
    """
    state = Path(state_dir)
    trace = state / "trace.jsonl"
    if not trace.is_file():
        raise ReportError(f"there is no trace of a run in {state} (no trace.jsonl); "
                          f"run the pipeline with 'opf run' first")
    rows, bad = read_rows(trace)
    data = analyse(rows, plan, state)
    data["unreadable"] = bad
    if plan is None:
        svg, note = None, ("Give the pipeline file (opf report FILE) to draw its plan here.")
    else:
        svg = plan_svg(plan)
        note = None if svg else ("Graphviz's 'dot' program is not installed, so the plan is "
                                 "not drawn (apt-get install graphviz).")
    page = render(data, svg=svg, source=str(trace), plan_note=note)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    target, atomic = output_target(str(out))
    if atomic:
        write_atomic(target, page.encode("utf-8"))
    else:  # a device or pipe: written into, never replaced
        with open(target, "wb") as fh:
            fh.write(page.encode("utf-8"))
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the arguments of ``opf report [FILE | STATE_DIR] [-o PATH]`` to its subparser."""
    p.add_argument(
        "file", nargs="?", default=".opf", metavar="FILE | STATE_DIR",
        help="a pipeline file (its run's state is .opf beside it, or --state) or a run's "
        "state folder (default: .opf)",
    )
    p.add_argument("-o", "--output", metavar="PATH", default=DEFAULT_OUTPUT,
                   help=f"where to write the HTML page (default: {DEFAULT_OUTPUT})")
    p.add_argument("--state", metavar="DIR",
                   help="the run's state folder, when FILE was run with --state")
    p.add_argument(
        "--param", "-p", action="append", metavar="NAME=VALUE",
        help="the parameters FILE was run with (for the plan drawing)",
    )


def main(args: argparse.Namespace) -> int:
    """``opf report``: write the page, print where it is; 0, or 2 if there is nothing to show."""
    target = Path(args.file).expanduser()
    plan = None
    if target.is_dir():
        state = target
    elif target.is_file():
        from .api import compile_file
        from .cli import parse_params

        plan = compile_file(target, parse_params(getattr(args, "param", None)))
        state = target.resolve().parent / ".opf"
    else:
        print(f"opf: error: {target} is neither a pipeline file nor a run's state folder",
              file=sys.stderr)
        return 2
    if getattr(args, "state", None):
        state = Path(args.state).expanduser()
    try:
        out = write_report(state, args.output, plan)
    except ReportError as exc:
        print(f"opf: error: {exc}", file=sys.stderr)
        return 2
    print(f"opf: report written to {out}")
    return 0


# -- the page's parts ------------------------------------------------------------------------

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<header>
<h1>{name} <span class="muted">— run report</span></h1>
<div class="sub">{sub}</div>
</header>
<section class="tiles">{tiles}</section>

<section id="timeline">
<div class="bar-head">
<h2>Timeline</h2>
<div class="legend">{legend}</div>
<div class="zoom"><button type="button" data-z="0.5" title="zoom out">−</button>\
<button type="button" data-z="0" title="fit the run to the window">fit</button>\
<button type="button" data-z="2" title="zoom in">+</button></div>
</div>
<div class="tl"><div id="tl-labels"></div><div id="tl-scroll">
<noscript><p class="muted">The timeline is drawn by the page's script; allow scripts to \
see it.</p></noscript></div></div>
</section>

<div class="cols">
<section><h2>Where the time went</h2>
<div class="stack">{stack}</div>
<p>{sentence}</p>
{phase_table}
<h3>Engines</h3>
{lanes_table}
</section>
<section><h2>Slowest tasks</h2>
{slowest}
<h3>Jobs</h3>
{jobs}
</section>
</div>

<div class="cols">
<section><h2>Steps</h2>
{steps}
</section>
<section><h2>Machine stages</h2>
<p class="muted">How often each machine copied a job's shared files (ran) and how often a task
found them already there.</p>
{mstages}
</section>
</div>

<section><h2>Plan</h2>
{plan}
</section>

<section><h2>Failures <span class="muted">({nfail})</span></h2>
{failures}
</section>

<footer class="muted">Written by opf report on {generated}.</footer>
<div id="tip" role="tooltip" hidden></div>
<script type="application/json" id="opf-data">{data}</script>
<script>{script}</script>
</body>
</html>
"""

_CSS = """
:root { --p0:#8e7cc3; --p1:#5b9bd5; --p2:#e8a838; --p3:#45a89a; --bad:#d93025;
  --ink:#1f2328; --muted:#667085; --line:#e4e7ec; --bg:#f7f8fa; }
* { box-sizing: border-box; }
body { margin: 0; padding: 18px 24px 40px; font: 13px/1.45 system-ui, -apple-system,
  "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: var(--ink); background: var(--bg); }
h1 { font-size: 20px; margin: 0 0 2px; } h2 { font-size: 15px; margin: 0 0 8px; }
h3 { font-size: 13px; margin: 14px 0 6px; }
.muted { color: var(--muted); font-weight: normal; }
.sub { color: var(--muted); font-size: 12px; word-break: break-all; }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px;
  padding: 12px 14px; margin-top: 12px; }
.tiles { display: flex; flex-wrap: wrap; gap: 8px; background: none; border: 0; padding: 0; }
.tile { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 8px 14px;
  min-width: 104px; }
.tile .v { font-size: 20px; font-weight: 600; font-variant-numeric: tabular-nums; }
.tile .l { color: var(--muted); font-size: 12px; }
.tile.ok .v { color: #1e7e34; } .tile.bad .v { color: var(--bad); }
.tile.warn .v { color: #b26a00; }
.cols { display: grid; grid-template-columns: 1fr 1fr; gap: 0 12px; }
@media (max-width: 1000px) { .cols { grid-template-columns: 1fr; } }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: 3px 8px; border-bottom: 1px solid var(--line);
  white-space: nowrap; }
th { font-weight: 600; color: var(--muted); font-size: 12px; }
td.n, th.n { text-align: right; }
.bar-head { display: flex; align-items: center; gap: 18px; flex-wrap: wrap; }
.bar-head h2 { margin: 0; }
.legend { display: flex; gap: 12px; flex-wrap: wrap; color: var(--muted); font-size: 12px; }
.key { display: inline-flex; align-items: center; gap: 5px; }
.sw { display: inline-block; width: 12px; height: 12px; border-radius: 2px;
  vertical-align: -2px; margin-right: 5px; }
.key .sw { margin-right: 0; }
.sw.p0, .seg.p0 { background: var(--p0); } .sw.p1, .seg.p1 { background: var(--p1); }
.sw.p2, .seg.p2 { background: var(--p2); } .sw.p3, .seg.p3 { background: var(--p3); }
.key .sw.p2 { background: linear-gradient(90deg, var(--p2) 50%, #c7861a 50%); }
.sw.cached { opacity: .4; }
.sw.failed { background: var(--bad); }
.sw.retry { background: linear-gradient(#222 0 30%, var(--p2) 30%); }
.zoom { margin-left: auto; display: flex; gap: 4px; }
.zoom button { font: inherit; border: 1px solid var(--line); background: #fff; border-radius: 5px;
  padding: 1px 10px; cursor: pointer; }
.zoom button:hover { background: var(--bg); }
.tl { display: flex; margin-top: 8px; border-top: 1px solid var(--line); }
#tl-labels { flex: none; width: 190px; position: relative; font-size: 12px;
  border-right: 1px solid var(--line); }
#tl-labels div { position: absolute; left: 0; right: 6px; white-space: nowrap; overflow: hidden;
  text-overflow: ellipsis; }
#tl-labels .m { font-weight: 600; }
#tl-labels .e { padding-left: 12px; color: var(--muted); }
#tl-scroll { flex: 1; overflow-x: auto; overflow-y: hidden; min-width: 0; }
#tl-scroll svg { display: block; }
svg .lane { fill: #fafbfc; } svg .lane.odd { fill: #f2f4f7; }
svg .grp { fill: #eef0f4; }
svg .tick { stroke: #d0d5dd; stroke-width: 1; } svg .tickl { fill: var(--muted); font-size: 11px; }
svg .b { stroke: none; } svg .b.p0 { fill: var(--p0); } svg .b.p1 { fill: var(--p1); }
svg .b.p2 { fill: var(--p2); } svg .b.p2.alt:not(.failed) { fill: #c7861a; }
svg .b.p3 { fill: var(--p3); }
svg .b.cached { opacity: .4; }
svg .b.failed { fill: var(--bad); stroke: #7a1710; stroke-width: 1; }
svg .rt { fill: #222; pointer-events: none; }
svg .bl { fill: #2b1d00; font-size: 10px; pointer-events: none; }
svg .b.hl { stroke: #111; stroke-width: 1.5; }
svg .b.cur { stroke: #000; stroke-width: 2; }
.stack { display: flex; height: 14px; border-radius: 4px; overflow: hidden; margin: 4px 0 8px;
  background: var(--line); }
.seg { display: block; height: 100%; }
.st { padding: 0 6px; border-radius: 8px; font-size: 12px; background: var(--line); }
.st.done { background: #dcf2e1; color: #1e7e34; } .st.failed { background: #fde2e0;
  color: #a4160d; } .st.skipped { background: #eef0f4; }
.plan { overflow-x: auto; } .plan svg { max-width: 100%; height: auto; }
ul.failures { list-style: none; padding: 0; margin: 0; }
ul.failures li { border-left: 3px solid #f0b4ae; padding: 4px 10px; margin: 6px 0; }
ul.failures li.final { border-left-color: var(--bad); }
pre.tail { background: #1f2328; color: #e6edf3; padding: 8px 10px; border-radius: 6px;
  overflow-x: auto; font-size: 12px; margin: 6px 0; }
#tip { position: fixed; z-index: 10; pointer-events: none; background: #1f2328; color: #fff;
  padding: 7px 10px; border-radius: 6px; font-size: 12px; max-width: 460px;
  box-shadow: 0 4px 14px rgba(0,0,0,.25); }
#tip b { font-weight: 600; } #tip .k { color: #9aa4b2; display: inline-block; min-width: 62px; }
#tip .node { color: #c9d1d9; word-break: break-all; margin-bottom: 3px; }
footer { margin-top: 14px; font-size: 12px; }
"""

# The page's script: draws the timeline from the embedded data, zooms, shows a tooltip on hover.
_SCRIPT = r"""
(function () {
  "use strict";
  var root = document.documentElement;
  try {
    var D = JSON.parse(document.getElementById("opf-data").textContent);
    var T = D.timeline, bars = T.bars, lanes = T.lanes, F = {};
    T.fields.forEach(function (f, i) { F[f] = i; });
    var AXIS = 22, GROUP = 20, LANE = 22, BAR = 14, PAD = 10;
    var scroll = document.getElementById("tl-scroll");
    var labels = document.getElementById("tl-labels");
    var tip = document.getElementById("tip");

    function esc(s) {
      return String(s).replace(/[&<>"]/g, function (c) {
        return {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c];
      });
    }
    function dur(s) {
      if (s < 1) return (s * 1000).toFixed(s < 0.01 ? 1 : 0) + " ms";
      if (s < 10) return s.toFixed(2) + " s";
      if (s < 60) return s.toFixed(1) + " s";
      var m = Math.floor(Math.round(s) / 60), r = Math.round(s) % 60;
      if (m < 60) return m + " min " + r + " s";
      return Math.floor(m / 60) + " h " + (m % 60) + " min";
    }
    function bytes(n) {
      var u = ["B", "KiB", "MiB", "GiB", "TiB"], v = n, i = 0;
      while (v >= 1024 && i < u.length - 1) { v /= 1024; i++; }
      return i === 0 ? n + " B" : v.toFixed(1) + " " + u[i];
    }

    function shorten(m) {  // "host:/a/long/scratch/path" → "host:…/scratch/path"
      if (m.length <= 30) return m;
      var host = m.split(":")[0];
      return host.slice(0, 12) + ":…" + m.slice(-(26 - Math.min(12, host.length)));
    }

    // lanes: a header row per machine, then its engines
    var y = AXIS, laneY = [], lab = [], last = null;
    lanes.forEach(function (ln, i) {
      if (ln.machine !== last) {
        lab.push('<div class="m" style="top:' + (y + 3) + 'px" title="' + esc(ln.machine) +
                 '">' + esc(shorten(ln.machine)) + "</div>");
        y += GROUP; last = ln.machine;
      }
      laneY.push(y);
      lab.push('<div class="e" style="top:' + (y + 3) + 'px">engine ' + esc(ln.engine) + "</div>");
      y += LANE;
    });
    var height = y + 6;
    labels.style.height = height + "px";
    labels.innerHTML = lab.join("");

    // a bar's label names its task by id, or by its job where the job has one task
    var perJob = {}, label = T.tasks.map(function (t) {
      var job = t.slice(0, t.indexOf("/"));
      perJob[job] = (perJob[job] || 0) + 1;
      return job;
    });
    label = T.tasks.map(function (t, i) {
      return perJob[label[i]] === 1 ? t : t.slice(t.indexOf("/") + 1);
    });

    var scale = 0, byTask = {}, current = -1;
    function fitScale() {
      return Math.max(1e-9, (scroll.clientWidth - 2 * PAD - 2) / Math.max(T.wall, 1e-3));
    }
    function step(pxPerSec) {
      var target = 90 / pxPerSec, p = Math.pow(10, Math.floor(Math.log10(target)));
      var m = [1, 2, 5, 10].find(function (k) { return k * p >= target; });
      return m * p;
    }
    function draw() {
      var width = Math.max(scroll.clientWidth - 2, Math.ceil(T.wall * scale + 2 * PAD));
      var out = ['<svg xmlns="http://www.w3.org/2000/svg" width="' + width + '" height="' +
                 height + '">'];
      var gy = AXIS, lastM = null;
      lanes.forEach(function (ln, i) {
        if (ln.machine !== lastM) {
          out.push('<rect class="grp" x="0" y="' + gy + '" width="' + width + '" height="' +
                   GROUP + '"/>');
          gy += GROUP; lastM = ln.machine;
        }
        out.push('<rect class="lane' + (i % 2 ? " odd" : "") + '" x="0" y="' + laneY[i] +
                 '" width="' + width + '" height="' + LANE + '"/>');
        gy += LANE;
      });
      var st = step(scale);
      for (var t = 0; t <= T.wall + 1e-9; t += st) {
        var x = (PAD + t * scale).toFixed(1);
        out.push('<line class="tick" x1="' + x + '" x2="' + x + '" y1="' + (AXIS - 4) +
                 '" y2="' + height + '"/>');
        out.push('<text class="tickl" x="' + x + '" y="' + (AXIS - 8) +
                 '" text-anchor="middle">' + (t === 0 ? "0" : dur(t)) + "</text>");
      }
      var nth = {};  // exec bars of a task so far in this attempt: alternate their shade
      for (var i = 0; i < bars.length; i++) {
        var b = bars[i];
        var bx = PAD + b[F.start] * scale, bw = Math.max(1, b[F.dur] * scale);
        var by = laneY[b[F.lane]] + (LANE - BAR) / 2;
        if (b[F.phase] === 1) nth[b[F.task]] = 0;
        var alt = b[F.phase] === 2 && (nth[b[F.task]] = (nth[b[F.task]] || 0) + 1) % 2 === 0;
        var cls = "b p" + b[F.phase] + (alt ? " alt" : "") +
                  (b[F.status] === "failed" ? " failed" : "") +
                  (b[F.status] === "cached" ? " cached" : "");
        out.push('<rect class="' + cls + '" data-i="' + i + '" x="' + bx.toFixed(2) + '" y="' +
                 by + '" width="' + bw.toFixed(2) + '" height="' + BAR + '"/>');
        if (b[F.attempt] > 0) {
          out.push('<rect class="rt" x="' + bx.toFixed(2) + '" y="' + by + '" width="' +
                   bw.toFixed(2) + '" height="4"/>');
        }
        if (b[F.phase] === 2 && bw > 40) {  // name the step where it fits
          var name = label[b[F.task]] + " " + b[F.step], fit = Math.floor((bw - 6) / 6.2);
          if (name.length > fit) name = fit > 2 ? name.slice(0, fit - 1) + "…" : "";
          if (name) {
            out.push('<text class="bl" x="' + (bx + 3).toFixed(2) + '" y="' + (by + BAR - 4) +
                     '">' + esc(name) + "</text>");
          }
        }
      }
      out.push("</svg>");
      scroll.innerHTML = out.join("");
      byTask = {};
      var rects = scroll.querySelectorAll("rect.b");
      for (var j = 0; j < rects.length; j++) {
        var k = bars[+rects[j].getAttribute("data-i")][F.task];
        if (k >= 0) (byTask[k] = byTask[k] || []).push(rects[j]);
      }
      current = -1;
      return rects.length;
    }

    function mark(i, on) {
      if (i < 0) return;
      var b = bars[i], k = b[F.task];
      (k >= 0 ? byTask[k] : []).forEach(function (r) { r.classList.toggle("hl", on); });
      var el = scroll.querySelector('rect.b[data-i="' + i + '"]');
      if (el) el.classList.toggle("cur", on);
    }
    function show(i, ev) {
      var b = bars[i], rows = [];
      var task = b[F.task] >= 0 ? T.tasks[b[F.task]] : b[F.job] + " (every task of the job)";
      var what = T.phases[b[F.phase]] + (b[F.status] === "cached" ? " (found ready)" : "");
      function row(k, v) { rows.push('<div><span class="k">' + k + "</span>" + v + "</div>"); }
      rows.push('<div class="node">' + esc(b[F.node]) + "</div>");
      row("kind", esc(what));
      row("task", esc(task));
      if (b[F.step]) row("step", esc(b[F.step]));
      row("engine", esc(lanes[b[F.lane]].engine) + " on " + esc(lanes[b[F.lane]].machine));
      row("took", dur(b[F.dur]));
      row("started", dur(b[F.start]) + " into the run");
      row("bytes", bytes(b[F.bytes]) + (b[F.phase] === 2 ? " written" :
          b[F.phase] === 3 ? " copied back" : " staged"));
      var status = b[F.status] === "failed" ? "<b style=\"color:#ff8a80\">failed</b>" :
                   esc(b[F.status]);
      if (b[F.exit] !== null && b[F.exit] !== undefined) {
        status += ", exit status " + esc(b[F.exit]);
      }
      row("status", status);
      if (b[F.attempt] > 0) row("attempt", (b[F.attempt] + 1) + " (a retry)");
      tip.innerHTML = rows.join("");
      tip.hidden = false;
      move(ev);
    }
    function move(ev) {
      var w = tip.offsetWidth, h = tip.offsetHeight;
      var x = ev.clientX + 14, yy = ev.clientY + 14;
      if (x + w > window.innerWidth - 4) x = Math.max(4, ev.clientX - w - 14);
      if (yy + h > window.innerHeight - 4) yy = Math.max(4, ev.clientY - h - 14);
      tip.style.left = x + "px"; tip.style.top = yy + "px";
    }
    scroll.addEventListener("mousemove", function (ev) {
      var a = ev.target.getAttribute && ev.target.getAttribute("data-i");
      var i = a === null || a === undefined ? -1 : +a;
      if (i !== current) {
        mark(current, false); current = i; mark(i, true);
        if (i < 0) tip.hidden = true; else show(i, ev);
      } else if (i >= 0) move(ev);
    });
    scroll.addEventListener("mouseleave", function () {
      mark(current, false); current = -1; tip.hidden = true;
    });
    document.querySelectorAll(".zoom button").forEach(function (btn) {
      btn.addEventListener("click", function () {
        var z = +btn.getAttribute("data-z");
        var centre = (scroll.scrollLeft + scroll.clientWidth / 2 - PAD) / scale;
        scale = z === 0 ? fitScale() : Math.max(fitScale(), scale * z);
        fitted = scale === fitScale();
        draw();
        scroll.scrollLeft = Math.max(0, centre * scale + PAD - scroll.clientWidth / 2);
      });
    });
    var fitted = true;
    window.addEventListener("resize", function () {
      if (fitted) { scale = fitScale(); draw(); }
    });

    scale = fitScale();
    var drawn = draw();
    root.setAttribute("data-opf-ready", String(drawn));
  } catch (err) {
    root.setAttribute("data-opf-error", String(err && err.stack || err));
    throw err;
  }
})();
"""
