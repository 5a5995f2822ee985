"""Drawing: plan graph → Graphviz DOT text, deterministic (same plan, same bytes).

:func:`to_dot` draws every node, one cluster per job, shaped and coloured by kind, labelled
with the task id, the step, the program and the files; edges between jobs (a task waiting for
another job's copy-back) are dashed. :func:`to_job_dot` draws one node per job step (for plans
with thousands of tasks), with the task count and the dependencies between jobs. ``status`` may
colour nodes by what a run would do with them (see ``opf run --dry-run``).
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping

import networkx as nx

STYLE = {
    ("stage", "machine"): 'shape=folder, style=filled, fillcolor="#cfe2f3"',
    ("stage", "task"): 'shape=box, style="rounded,filled", fillcolor="#d9ead3"',
    ("exec", None): 'shape=box, style=filled, fillcolor="#fff2cc"',
    ("copyback", None): 'shape=cds, style=filled, fillcolor="#f4cccc"',
}
STATUS_COLOUR = {"skip": "#dddddd", "run": "#fff2cc", "failed": "#ea9999"}


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _files_label(pairs: list, index: int, limit: int = 4) -> list[str]:
    names = [posixpath.basename(p[index]) for p in pairs]
    if len(names) > limit:
        names = names[: limit - 1] + [f"... {len(names) - limit + 1} more"]
    return names


def _program(a: Mapping) -> str:
    """What an exec node runs, in a few words: ``python lidar.py``, ``sh``, ``pkg.mod:fn``."""
    argv = a.get("argv")
    if not argv:
        return a["call"]["function"] if a.get("call") else ""
    if argv[:2] == ["/bin/sh", "-c"]:
        return "sh"
    if argv[0] == "python" and len(argv) > 1 and argv[1].endswith(".py"):
        return f"python {posixpath.basename(argv[1])}"
    return posixpath.basename(argv[0])


def _label(nid: str, a: Mapping) -> str:
    kind = a["kind"]
    if kind == "stage" and a.get("scope") == "machine":
        return "\n".join([f"job {a['job']}: machine stage"] + _files_label(a["files"], 1))
    if kind == "stage":
        return "\n".join([f"{a['task']}: stage"] + _files_label(a["files"], 1))
    if kind == "exec":
        outs = ", ".join(posixpath.basename(o) for o in a["outputs"][:3])
        if len(a["outputs"]) > 3:
            outs += f", ... {len(a['outputs']) - 3} more"
        return "\n".join(x for x in (f"{a['task']}: {a['step']}", _program(a), outs) if x)
    return "\n".join([f"{a['task']}: copy back"] + _files_label(a["files"], 1))


def to_dot(graph: nx.DiGraph, status: Mapping[str, str] | None = None) -> str:
    """The whole plan as DOT: one cluster per job."""
    lines = [
        f"digraph {_q(graph.graph.get('pipeline', 'plan'))} {{",
        "  rankdir=LR;",
        '  node [fontname="Helvetica", fontsize=10];',
        '  edge [color="#666666"];',
    ]
    by_job: dict[str, list[str]] = {}
    for nid, a in graph.nodes(data=True):
        by_job.setdefault(a["job"], []).append(nid)
    for k, job in enumerate(graph.graph.get("jobs") or sorted(by_job)):
        lines.append(f"  subgraph cluster_{k} {{")
        lines.append(f"    label={_q('job ' + job)}; style=rounded; color=\"#999999\";")
        for nid in by_job.get(job, []):
            a = graph.nodes[nid]
            style = STYLE[(a["kind"], a.get("scope") if a["kind"] == "stage" else None)]
            if status and a.get("task") is not None and nid in status:
                style = style.split("fillcolor")[0] + f'fillcolor="{STATUS_COLOUR[status[nid]]}"'
            lines.append(f"    {_q(nid)} [label={_q(_label(nid, a))}, {style}];")
        lines.append("  }")
    nodes = graph.nodes
    for u, v in graph.edges:
        between = nodes[u]["job"] != nodes[v]["job"]
        lines.append(f"  {_q(u)} -> {_q(v)}" + (" [style=dashed];" if between else ";"))
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_job_dot(graph: nx.DiGraph) -> str:
    """One node per job step, with task counts; edges between jobs where outputs flow."""
    steps: dict[str, dict[str, int]] = {}
    tasks: dict[str, int] = {}
    for _nid, a in graph.nodes(data=True):
        if a["kind"] == "exec":
            steps.setdefault(a["job"], {}).setdefault(a["step"], a["index"])
        elif a["kind"] == "stage" and a.get("scope") == "task":
            tasks[a["job"]] = tasks.get(a["job"], 0) + 1
    lines = [
        f"digraph {_q(graph.graph.get('pipeline', 'plan'))} {{",
        "  rankdir=LR;",
        '  node [fontname="Helvetica", fontsize=10];',
    ]
    jobs = graph.graph.get("jobs") or sorted(steps)
    for k, job in enumerate(jobs):
        count = tasks.get(job, 0)
        lines.append(f"  subgraph cluster_{k} {{")
        lines.append(
            f"    label={_q(f'job {job} ({count} task' + ('s' if count != 1 else '') + ')')};"
            ' style=rounded; color="#999999";'
        )
        ordered = sorted(steps.get(job, {}).items(), key=lambda kv: kv[1])
        for step, _ in ordered:
            lines.append(
                f"    {_q(job + '/' + step)} [label={_q(step)}, {STYLE[('exec', None)]}];"
            )
        for (a, _), (b, _) in zip(ordered, ordered[1:], strict=False):
            lines.append(f"    {_q(job + '/' + a)} -> {_q(job + '/' + b)};")
        lines.append("  }")
    flows: set[tuple[str, str]] = set()
    for u, v in graph.edges:
        ua, va = graph.nodes[u], graph.nodes[v]
        if ua["kind"] == "copyback" and va["kind"] == "stage" and ua["job"] != va["job"]:
            flows.add((ua["job"], va["job"]))
    for up, down in sorted(flows):
        last = max(steps[up].items(), key=lambda kv: kv[1])[0]
        first = min(steps[down].items(), key=lambda kv: kv[1])[0]
        lines.append(f"  {_q(up + '/' + last)} -> {_q(down + '/' + first)} [style=dashed];")
    lines.append("}")
    return "\n".join(lines) + "\n"
