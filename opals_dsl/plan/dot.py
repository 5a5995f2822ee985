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

from . import model

STYLE = {
    ("stage", "machine"): 'shape=folder, style=filled, fillcolor="#cfe2f3"',
    ("stage", "task"): 'shape=box, style="rounded,filled", fillcolor="#d9ead3"',
    ("exec", None): 'shape=box, style=filled, fillcolor="#fff2cc"',
    # Graphviz sizes a cds by its label's box but draws the arrow inside that box, so a label
    # of two or more lines spills over its edges without a margin of its own
    ("copyback", None): 'shape=cds, margin="0.2,0.2", style=filled, fillcolor="#f4cccc"',
}
STATUS_COLOUR = {"skip": "#dddddd", "run": "#fff2cc", "failed": "#ea9999"}


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _files_label(pairs: tuple[model.FilePair, ...], index: int, limit: int = 4) -> list[str]:
    names = [posixpath.basename(p[index]) for p in pairs]
    if len(names) > limit:
        names = names[: limit - 1] + [f"... {len(names) - limit + 1} more"]
    return names


def _program(e: model.Exec) -> str:
    """What an exec node runs, in a few words: ``python lidar.py``, ``sh``, ``pkg.mod:fn``."""
    argv = e.argv
    if not argv:
        return e.call.function if e.call is not None else ""
    if argv[:2] == ("/bin/sh", "-c"):
        return "sh"
    if argv[0] == "python" and len(argv) > 1 and argv[1].endswith(".py"):
        return f"python {posixpath.basename(argv[1])}"
    return posixpath.basename(argv[0])


def _label(node: model.Node) -> str:
    if isinstance(node, model.MachineStage):
        return "\n".join([f"job {node.job}: machine stage"] + _files_label(node.files, 1))
    if isinstance(node, model.TaskStage):
        return "\n".join([f"{node.task}: stage"] + _files_label(node.files, 1))
    if isinstance(node, model.Exec):
        outs = ", ".join(posixpath.basename(o) for o in node.outputs[:3])
        if len(node.outputs) > 3:
            outs += f", ... {len(node.outputs) - 3} more"
        return "\n".join(x for x in (f"{node.task}: {node.step}", _program(node), outs) if x)
    return "\n".join([f"{node.task}: copy back"] + _files_label(node.files, 1))


def _style(node: model.Node) -> str:
    return STYLE[(node.kind, node.scope if isinstance(node, model.MachineStage | model.TaskStage)
                  else None)]


def to_dot(graph: nx.DiGraph, status: Mapping[str, str] | None = None) -> str:
    """The whole plan as DOT: one cluster per job."""
    info = model.info(graph)
    lines = [
        f"digraph {_q(info.pipeline)} {{",
        "  rankdir=LR;",
        '  node [fontname="Helvetica", fontsize=10];',
        '  edge [color="#666666"];',
    ]
    by_job: dict[str, list[tuple[str, model.Node]]] = {}
    job_of: dict[str, str] = {}
    for nid, node in model.nodes(graph):
        by_job.setdefault(node.job, []).append((nid, node))
        job_of[nid] = node.job
    for k, job in enumerate(info.jobs or sorted(by_job)):
        lines.append(f"  subgraph cluster_{k} {{")
        lines.append(f"    label={_q('job ' + job)}; style=rounded; color=\"#999999\";")
        for nid, node in by_job.get(job, []):
            style = _style(node)
            if status and node.task is not None and nid in status:
                style = style.split("fillcolor")[0] + f'fillcolor="{STATUS_COLOUR[status[nid]]}"'
            lines.append(f"    {_q(nid)} [label={_q(_label(node))}, {style}];")
        lines.append("  }")
    for u, v in graph.edges:
        between = job_of[u] != job_of[v]
        lines.append(f"  {_q(u)} -> {_q(v)}" + (" [style=dashed];" if between else ";"))
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_job_dot(graph: nx.DiGraph) -> str:
    """One node per job step, with task counts; edges between jobs where outputs flow.

    Read from the plan's tasks, not its nodes: a task's chain is read only when it has steps
    not seen in its job yet (once a job), so a plan table is drawn without decoding it all."""
    info = model.info(graph)
    found = model.tasks(graph)
    steps: dict[str, dict[str, int]] = {}
    tasks: dict[str, int] = {}
    seen: set[tuple[str, tuple[str, ...]]] = set()
    flows: set[tuple[str, str]] = set()
    for t, ups in zip(found.tasks, found.upstream, strict=True):
        tasks[t.job] = tasks.get(t.job, 0) + 1
        if (t.job, t.steps) not in seen:
            seen.add((t.job, t.steps))
            for ex in model.chain(graph, t)[2]:
                steps.setdefault(ex.job, {}).setdefault(ex.step, ex.index)
        flows.update((found.tasks[u].job, t.job) for u in ups if found.tasks[u].job != t.job)
    lines = [
        f"digraph {_q(info.pipeline)} {{",
        "  rankdir=LR;",
        '  node [fontname="Helvetica", fontsize=10];',
    ]
    for k, job in enumerate(info.jobs or sorted(steps)):
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
    for up_job, down_job in sorted(flows):
        last = max(steps[up_job].items(), key=lambda kv: kv[1])[0]
        first = min(steps[down_job].items(), key=lambda kv: kv[1])[0]
        lines.append(f"  {_q(up_job + '/' + last)} -> {_q(down_job + '/' + first)} "
                     "[style=dashed];")
    lines.append("}")
    return "\n".join(lines) + "\n"
