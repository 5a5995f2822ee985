"""The report's page: figures (:func:`opals_dsl.report.analyse.analyse`) → one HTML page.

The page is self-contained: its style sheet (``page.css``), its script (``page.js``) and its
data (the figures as JSON, ``<script id="opf-data">``) are written into the page template
(``page.html``), so it opens offline. The three files ship inside the package; they are plain
HTML, CSS and JavaScript so that they can be read and edited as such. The script draws the
timeline from the data, and sets ``data-opf-ready`` (the number of bars drawn) on the
``<html>`` element when it has run, or ``data-opf-error``.

The plan at job level is drawn by Graphviz's ``dot`` (:func:`plan_svg`) and inlined as SVG.
"""

from __future__ import annotations

import html
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterable, Mapping
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from ..errors import plural
from ..plan.dot import to_job_dot
from ..units import format_bytes, format_duration
from .analyse import COPYBACK, EXEC, MACHINE_STAGE, PHASES, TASK_STAGE

if TYPE_CHECKING:
    import networkx as nx


@cache
def _asset(name: str) -> str:
    """One of the page's files shipped in this package: ``page.html``, ``page.css``,
    ``page.js``."""
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def plan_svg(plan: nx.DiGraph, timeout: float = 30.0) -> str | None:
    """The job-level plan drawn by Graphviz as inline SVG, or None without Graphviz."""
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
    name = title or data.get("pipeline") or "opf run"
    blob = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    blob = blob.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    if svg:
        plan_html = f'<div class="plan">{svg}</div>'
    else:
        plan_html = f'<p class="muted">{_e(plan_note or "The plan is not drawn.")}</p>'
    return _asset("page.html").format(
        title=_e(f"{name} — opf run report"),
        name=_e(name),
        sub=_subtitle(data, source),
        tiles="".join(_tiles(data["summary"])),
        legend=_legend(),
        **_time_parts(data),
        **_tables(data),
        plan=plan_html,
        failures=_failures_html(data),
        nfail=data["failures_total"],
        interrupted=_interrupted_html(data),
        css=_asset("page.css"),
        script=_asset("page.js"),
        data=blob,
        generated=_e(_when(time.time())),
    )


def _tiles(s: Mapping[str, Any]) -> list[str]:
    tiles = [
        _tile("wall", "first task to last", round(s["wall"], 3),
              format_duration(s["wall"])),
        _tile("done", "task run" if s["done"] == 1 else "tasks run", s["done"], str(s["done"]),
              "ok"),
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
        _tile("engines", f"{'engine' if s['engines'] == 1 else 'engines'} on "
              f"{plural(s['machines'], 'machine')}", s["engines"], str(s["engines"])),
    ]
    return tiles


def _time_parts(data: Mapping[str, Any]) -> dict[str, str]:
    """Where the time went: the stacked bar, the sentence, the phase and engine tables."""
    s = data["summary"]
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
    if s["engines"]:
        total = s["wall"] * s["engines"]
        held = data.get("held") or 0.0
        kept = (f"{_e(format_duration(held))} kept free for steps with threads, "
                if held else "")
        unreported = data.get("unreported") or 0.0
        if unreported:
            kept += (f"{_e(format_duration(unreported))} in tasks whose engine never reported "
                     f"back, lost or interrupted, ")
        sentence += (f" The engines were busy {_pct(busy + unreported, total)} of the wall time "
                     f"({kept}{_e(format_duration(data['idle']))} idle).")
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
        ["machine", "engine", "tasks", "busy", "of wall", "kept free for threads"],
        [[_e(ln["machine"]), _e(ln["engine"]), ln["tasks"], _e(format_duration(ln["busy"])),
          _pct(ln["busy"], s["wall"]),
          _e(format_duration(ln["held"])) if ln.get("held") else ""]
         for ln in data["lanes"]],
        numeric=(1, 2, 3, 4, 5),
    )
    return {"stack": stack, "sentence": sentence, "phase_table": phase_table,
            "lanes_table": lanes_table}


def _tables(data: Mapping[str, Any]) -> dict[str, str]:
    """The slowest tasks, the jobs, the steps and the machine stages."""
    slowest = _table(
        ["task", "time", "of which steps", "attempts", "engine", "outcome", "why it ran"],
        [[_e(f"{t['job']}/{t['task']}"), _e(format_duration(t["seconds"])),
          _e(format_duration(t["exec"])), t["attempts"], _e(t["engine"]),
          f'<span class="st {_e(t["status"])}">{_e(t["status"])}</span>',
          _e(t.get("why") or "–")]
         for t in data["slowest"]],
        numeric=(1, 2, 3, 4),
    )
    why = _table(
        ["why", "tasks", "for example"],
        [[_e(w["why"]), w["tasks"], _e(f"{w['example']}: {w['reason']}")]
         for w in data.get("why") or []],
        numeric=(1,),
    ) if data.get("why") else ('<p class="muted">Not recorded: the run ran without its '
                               'journal, or was made by an older opf.</p>')
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
    return {"slowest": slowest, "jobs": jobs, "steps": steps, "mstages": mstages, "why": why}


def _subtitle(data: Mapping[str, Any], source: str | None) -> str:
    s = data["summary"]
    sub = [f"trace: {_e(source)}"] if source else []
    run = data.get("run") or {}
    if run.get("status"):
        sub.insert(0, f'run {_e(run.get("number", "?"))}: <b>{_e(run["status"])}</b>')
    sub.append(f"started {_e(_when(s['start']))}")
    sub.append(f"{plural(s['nodes_run'], 'node')} ran on {plural(s['engines'], 'engine')}")
    if data.get("unreadable"):
        sub.append(f"{data['unreadable']} unreadable trace line"
                   f"{'s' if data['unreadable'] != 1 else ''} skipped")
    return " · ".join(sub)


def _legend() -> str:
    return "".join(
        f'<span class="key"><span class="sw p{i}"></span>{_e(p)}</span>'
        for i, p in enumerate(PHASES)
    ) + ('<span class="key"><span class="sw failed"></span>failed</span>'
         '<span class="key"><span class="sw timeout"></span>timed out</span>'
         '<span class="key"><span class="sw retry"></span>retry attempt</span>'
         '<span class="key"><span class="sw p0 cached"></span>machine stage found ready</span>')


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
        if f.get("timeout"):
            head += ' · <span class="st timeout">timed out</span>'
        if f["final"]:
            head += ' · <span class="st failed">failed for good</span>'
        else:
            head += f' · <span class="st {_e(f["outcome"])}">task then {_e(f["outcome"])}</span>'
        body = f'<div>{_e(f["message"])}</div>' if f.get("message") else ""
        body += _log(f, data.get("link_base"))
        out.append(f'<li class="{"final" if f["final"] else ""}">{head}{body}</li>')
    return f'<ul class="failures">{"".join(out)}</ul>{_more(data["failures_total"], fails)}'


def _interrupted_html(data: Mapping[str, Any]) -> str:
    """The tasks engines held when the run was interrupted, with the log of the step each
    had begun; nothing when the run was not interrupted while tasks were out."""
    held = data.get("interrupted") or []
    if not held:
        return ""
    out = []
    for t in held:
        head = (f'<b>{_e(t["job"])}/{_e(t["task"])}</b> · attempt {t["attempt"] + 1} · '
                f'engine {_e(t["engine"])} on {_e(t["machine"])} · held for '
                f'{_e(format_duration(t["seconds"]))}')
        if t["step"]:
            head += f" · step {_e(t['step'])} had begun"
        out.append(f"<li>{head}{_log(t, data.get('link_base'))}</li>")
    tail = _more(data["interrupted_total"], held)
    return (f'<section><h2>Interrupted <span class="muted">({data["interrupted_total"]})'
            f'</span></h2><p class="muted">The run was interrupted while engines held these '
            f'tasks (running, or waiting their turn in the engine\'s batch). The next run runs '
            f'what did not finish.</p><ul class="failures">{"".join(out)}</ul>{tail}'
            f'</section>')


def _log(entry: Mapping[str, Any], base: str | None) -> str:
    """The last lines of an entry's log and a link to it, where there is one: relative to
    ``base``, the folder the page is written in (so that the state folder can be moved or
    served as a whole), else absolute."""
    out = ""
    if entry["tail"] is not None:
        out += f'<pre class="tail">{_e(chr(10).join(entry["tail"]))}</pre>'
    if entry["log"]:
        href = (quote(os.path.relpath(entry["log"], base)) if base
                else Path(entry["log"]).as_uri())
        out += (f'<div class="muted">log: <a href="{_e(href)}">'
                f'{_e(entry["log"])}</a></div>')
    return out


def _more(total: int, shown: list[Any]) -> str:
    """``… and N more.`` for a list shown cut short."""
    more = total - len(shown)
    return f'<p class="muted">… and {more} more.</p>' if more > 0 else ""
