"""Planning: a checked pipeline → the explicit plan, a ``networkx.DiGraph`` of plain data.

Each job is expanded into its tasks (one per glob match, list item, ``range`` number, line of a
``lines()`` file, or upstream task), and each task into the chain::

    stage:JOB  →  stage:JOB/TASK  →  exec:JOB/TASK/STEP …  →  copyback:JOB/TASK

with the files each node moves or reads written on it (see docs/plan-format.md for every
attribute). Upstream outputs add ``copyback:UP/T → stage:JOB/TASK`` edges: one per task for a
``for x in UP.STEP.OUT`` map, every task of UP for a ``{UP.STEP.OUT}`` gather.

What can only be known by looking at files or at all tasks together — globs that match nothing,
missing inputs, two outputs copied to one destination, two inputs with one local name — is
found here and reported as a :class:`PlanError`, every one of them. Templates are compiled once
per job into literal text and bindings, so expanding 100,000 tasks is a loop of string joins.
"""

from __future__ import annotations

import glob as globmod
import os
import posixpath
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import networkx as nx

from . import nodes as n
from .check import (
    CTX_JOB,
    CTX_OUT,
    CTX_OUTPUT,
    CTX_STEP,
    Binding,
    Checker,
    Scope,
    job_dependencies,
)
from .errors import PlanError
from .source import SourceFile

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_WILDCARDS = re.compile(r"[*?\[]")
#: at most this many collisions are reported for one declaration
_REPORT_LIMIT = 3


def format_value(value: object) -> str:
    """A value as templates show it: numbers as Python prints them, booleans true/false."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(format_value(v) for v in value)
    return str(value)


def safe_id(text: str) -> str:
    out = _UNSAFE.sub("_", text) or "_"
    if set(out) == {"."}:
        out = "_" * len(out)
    return out


def task_ids(labels: list[str]) -> list[str]:
    """Readable, stable task ids; on a clash (ignoring case) every id gets its index in front."""
    ids = [safe_id(label) for label in labels]
    if len({i.lower() for i in ids}) != len(ids):
        width = len(str(len(ids) - 1))
        ids = [f"{k:0{width}d}-{i}" for k, i in enumerate(ids)]
    return ids


def _attr(path: str, attr: str) -> str:
    p = PurePosixPath(path)
    if attr == "parent":
        return str(p.parent)
    return getattr(p, attr)


@dataclass(slots=True)
class TaskValue:
    """The loop value of one task: ``file`` is its path (shared drive, plan form) if a file."""

    value: object
    file: str | None = None
    upstream: str | None = None  # upstream task id, for a map over another job


@dataclass(slots=True)
class _TaskCtx:
    job: str
    task: str
    var: TaskValue | None
    outs: dict[tuple[str, str], str] = field(default_factory=dict)


@dataclass(slots=True)
class _JobPlan:
    """What later jobs need to know of an expanded job."""

    tasks: list[str]
    # (step, out) -> per-task destination (plan form), in task order
    published: dict[tuple[str, str], list[str]]


class Planner:
    def __init__(
        self,
        pipeline: n.Pipeline,
        source: SourceFile | None,
        root: str,
        params: Mapping[str, object],
        pipeline_name: str,
    ) -> None:
        self.pipeline = pipeline
        self.root = root
        self.params = params
        self.name = pipeline_name
        self.c = Checker(source)
        self.graph = nx.DiGraph()
        self.jobs: dict[str, _JobPlan] = {}
        self.destinations: dict[str, tuple[str, str, n.Out]] = {}
        self.collisions: dict[int, int] = {}

    # -- values --------------------------------------------------------------------------

    def plan_path(self, path: str) -> str:
        """A shared-drive path in plan form: relative to the root if inside it, else absolute."""
        path = path.replace("\\", "/") if os.sep == "\\" else path
        if posixpath.isabs(path):
            norm = posixpath.normpath(path)
            rel = posixpath.relpath(norm, self.root) if norm.startswith(self.root) else None
            return rel if rel is not None and not rel.startswith("..") else norm
        norm = posixpath.normpath(path)
        if norm.startswith(".."):
            return posixpath.normpath(posixpath.join(self.root, norm))
        return norm

    def abspath(self, path: str) -> str:
        return os.path.join(self.root, path)

    def compile_template(
        self, tpl: n.Template, scope: Scope, ctx: str, step: int | None = None
    ) -> Callable[[_TaskCtx], str]:
        parts: list[str | Binding] = []
        for p in tpl.parts:
            parts.append(p if isinstance(p, str) else scope.resolve(p, ctx, step))
        if all(isinstance(p, str) for p in parts):
            const = "".join(parts)  # type: ignore[arg-type]
            return lambda t: const
        getters = [self.getter(p, local=True) if isinstance(p, Binding) else p for p in parts]

        def render(t: _TaskCtx) -> str:
            return "".join(g if isinstance(g, str) else format_value(g(t)) for g in getters)

        return render

    def getter(self, b: Binding, local: bool) -> Callable[[_TaskCtx], object]:
        """A function of the task giving the binding's value (files as task-local paths)."""
        if b.kind == "special":
            name = b.name
            if name == "task.id":
                return lambda t: t.task
            if name == "job.name":
                return lambda t: t.job
            return lambda t: self.name
        if b.kind == "param":
            value = self.params[b.name]
            if b.attr:
                text = _attr(format_value(value), b.attr)
                return lambda t: text
            return lambda t: value
        if b.kind == "var":
            attr = b.attr
            if attr:
                return lambda t: _attr(
                    t.var.file if t.var.file is not None else format_value(t.var.value), attr
                )
            return lambda t: (
                posixpath.basename(t.var.file) if t.var.file is not None else t.var.value
            )
        if b.kind == "shared":
            job_shared = self._shared_local
            name, attr = b.name, b.attr
            if attr:
                return lambda t: _attr(job_shared[name], attr)
            return lambda t: "../" + job_shared[name]
        if b.kind == "out":
            key, attr = (b.step, b.name), b.attr
            if attr:
                return lambda t: _attr(t.outs[key], attr)
            return lambda t: t.outs[key]
        if b.kind == "gather":
            up = self.jobs[b.job]
            locals_ = [
                f"{b.job}/{tid}/{posixpath.basename(dest)}"
                for tid, dest in zip(up.tasks, up.published[(b.step, b.name)], strict=True)
            ]
            return lambda t: locals_
        raise AssertionError(b.kind)

    # -- expansion -----------------------------------------------------------------------

    def job_template(self, tpl: n.Template, scope: Scope, job: str) -> str:
        return self.compile_template(tpl, scope, CTX_JOB)(_TaskCtx(job, "", None))

    def task_values(self, job: n.Job, scope: Scope) -> list[TaskValue] | None:
        src = job.source
        jname = job.name.value
        if src is None:
            return [TaskValue(None)]
        if isinstance(src, n.GlobSource):
            pattern = self.job_template(src.pattern, scope, jname)
            return self.glob(pattern, src)
        if isinstance(src, n.ListSource):
            if not src.items:
                self.c.error(src.span, "this list is empty, so the job would have no task")
                return None
            return [TaskValue(i.value) for i in src.items]
        if isinstance(src, n.RangeSource):
            args = [
                a.value if isinstance(a, n.Literal) else self.params[a.parts[0]] for a in src.args
            ]
            values = list(range(*args))  # type: ignore[arg-type]
            if not values:
                self.c.error(src.span, f"range({', '.join(map(str, args))}) is empty, so the "
                             "job would have no task")
                return None
            return [TaskValue(v) for v in values]
        if isinstance(src, n.LinesSource):
            rel = self.plan_path(self.job_template(src.path, scope, jname))
            try:
                with open(self.abspath(rel), encoding="utf-8") as fh:
                    lines = [ln.strip() for ln in fh]
            except FileNotFoundError:
                self.c.error(src.path.span, f"the list file '{rel}' does not exist")
                return None
            except (OSError, UnicodeDecodeError) as exc:
                self.c.error(src.path.span, f"the list file '{rel}' cannot be read: {exc}")
                return None
            values = [ln for ln in lines if ln and not ln.startswith("#")]
            if not values:
                self.c.error(src.path.span, f"the list file '{rel}' has no lines, so the job "
                             "would have no task")
                return None
            return [TaskValue(v) for v in values]
        assert isinstance(src, n.UpstreamSource)
        up_job, up_step, up_out = src.ref.parts
        up = self.jobs[up_job]
        dests = up.published[(up_step, up_out)]
        return [
            TaskValue(d, file=d, upstream=tid) for tid, d in zip(up.tasks, dests, strict=True)
        ]

    def glob(self, pattern: str, src: n.GlobSource) -> list[TaskValue] | None:
        if not _WILDCARDS.search(pattern):
            rel = self.plan_path(pattern)
            if not os.path.isfile(self.abspath(rel)):
                self.c.error(src.pattern.span, f"the input file '{rel}' does not exist")
                return None
            return [TaskValue(rel, file=rel)]
        if os.path.isabs(pattern):
            found = globmod.glob(pattern, recursive=True)
        else:
            found = globmod.glob(pattern, root_dir=self.root, recursive=True)
        files = sorted(
            self.plan_path(f) for f in found if os.path.isfile(os.path.join(self.root, f))
        )
        if not files:
            self.c.error(
                src.pattern.span,
                f"the pattern '{pattern}' matches no file (in {self.root}); check the folder "
                "and the spelling",
            )
            return None
        return [TaskValue(f, file=f) for f in files]

    def plan_job(self, job: n.Job) -> None:
        jname = job.name.value
        scope = Scope(self.pipeline, job, self.params)
        values = self.task_values(job, scope)

        # Job Prephase: shared files by base name in the job folder
        shared_files: list[list[str]] = []
        self._shared_local: dict[str, str] = {}
        names_seen: dict[str, n.Shared] = {}
        for s in job.shared:
            rel = self.plan_path(self.job_template(s.path, scope, jname))
            base = posixpath.basename(rel)
            self._shared_local[s.name.value] = base
            if base in names_seen:
                self.c.error(
                    s.path.span,
                    f"shared files '{names_seen[base].name.value}' and '{s.name.value}' have the "
                    f"same file name '{base}', and both would be copied into the job folder; "
                    "rename one of the files",
                )
            names_seen[base] = s
            if not os.path.isfile(self.abspath(rel)):
                self.c.error(s.path.span, f"the shared file '{rel}' does not exist")
            shared_files.append([rel, base])
        if values is None:
            return

        ids = ["0"] if job.source is None else task_ids(
            [
                PurePosixPath(v.file).stem if v.file is not None else format_value(v.value)
                for v in values
            ]
        )
        retries = 0
        if job.retries:
            rv = job.retries[0].value
            retries = rv.value if isinstance(rv, n.Literal) else self.params.get(rv.parts[0], 0)
            if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
                self.c.error(job.retries[0].span, "retries takes a whole number, 0 or more")
                retries = 0

        # compile once per job
        if job.outputs:
            folder_t = self.compile_template(job.outputs[0].folder, scope, CTX_OUTPUT)
            flat = job.outputs[0].flat
        else:
            folder_t = lambda t: f"results/{t.job}"  # noqa: E731
            flat = False
        steps = []
        for i, step in enumerate(job.steps):
            outs = [(o, self.compile_template(o.path, scope, CTX_OUT)) for o in step.outs]
            action = step.action
            compiled_action = self.compile_action(action, scope, i)
            ins, in_files = self.compile_ins(step, scope, i)
            steps.append((step, outs, compiled_action, ins, in_files))

        g = self.graph
        machine = f"stage:{jname}"
        g.add_node(
            machine, kind="stage", scope="machine", job=jname, task=None, affinity=None,
            files=shared_files,
        )
        published: dict[tuple[str, str], list[str]] = {
            (s.name.value, o.name.value): [] for s in job.steps for o in s.outs if not o.temp
        }
        uses_var_file = any(
            b.kind == "var" and b.attr is None for _, _, _, ins, _ in steps for b in ins
        )
        gathers = sorted(
            {(b.job, b.step, b.name) for _, _, _, ins, _ in steps for b in ins
             if b.kind == "gather"}
        )
        for index, (value, tid) in enumerate(zip(values, ids, strict=True)):
            t = _TaskCtx(jname, tid, value)
            key = (jname, tid)
            stage_files: list[list[str]] = []
            local_seen: dict[str, str] = {}

            def stage(src: str, local: str, what: str, span, t=t, stage_files=stage_files,
                      local_seen=local_seen) -> None:
                if local in local_seen and local_seen[local] != src:
                    self.c.error(
                        span,
                        f"in task '{t.task}' two inputs have the file name '{local}' "
                        f"('{local_seen[local]}' and '{src}'); rename one of them",
                    )
                    return
                if local not in local_seen:
                    local_seen[local] = src
                    stage_files.append([src, local])

            if uses_var_file and value.file is not None:
                stage(value.file, posixpath.basename(value.file), "loop", job.var.span)
            for gj, gs, go in gathers:
                up = self.jobs[gj]
                for utid, dest in zip(up.tasks, up.published[(gs, go)], strict=True):
                    stage(dest, f"{gj}/{utid}/{posixpath.basename(dest)}", "gather", None)

            folder = self.output_folder(folder_t(t))
            chain = [f"stage:{jname}/{tid}"]
            copy_files: list[list[str]] = []
            exec_nodes = []
            for step, outs, action, _ins, in_files in steps:
                sname = step.name.value
                out_locals, temps = [], []
                for o, render in outs:
                    local = self.out_local(render(t), o, t)
                    t.outs[(sname, o.name.value)] = local
                    out_locals.append(local)
                    if o.temp:
                        temps.append(local)
                        continue
                    dest = self.plan_path(
                        posixpath.join(folder, local) if flat
                        else posixpath.join(folder, sname, local)
                    )
                    self.claim(dest, jname, tid, o)
                    copy_files.append([local, dest])
                    published[(sname, o.name.value)].append(dest)
                for tpl_render, item in in_files:
                    rel = self.plan_path(tpl_render(t))
                    local = posixpath.basename(rel)
                    if not os.path.isfile(self.abspath(rel)):
                        self.c.error(item.span, f"the input file '{rel}' (task '{tid}') does "
                                     "not exist")
                    stage(rel, local, "in", item.span)
                inputs = self.step_inputs(_ins, t, in_files)
                node = f"exec:{jname}/{tid}/{sname}"
                attrs = action(t)
                exec_nodes.append(
                    (node, dict(kind="exec", job=jname, task=tid, step=sname, affinity=key,
                                index=len(exec_nodes), **attrs, inputs=inputs,
                                outputs=out_locals, temp=temps))
                )
                chain.append(node)
            produced = set()
            for _node, attrs in exec_nodes:
                produced.update(attrs["outputs"])
            for local in local_seen:
                if local in produced:
                    self.c.error(job.name.span, f"in task '{tid}' the input '{local}' would be "
                                 "overwritten by an output of the same name; rename the output")
            g.add_node(
                chain[0], kind="stage", scope="task", job=jname, task=tid, affinity=key,
                index=index, retries=retries, files=stage_files,
            )
            g.add_nodes_from(exec_nodes)
            cb = f"copyback:{jname}/{tid}"
            g.add_node(cb, kind="copyback", job=jname, task=tid, affinity=key, files=copy_files)
            chain.append(cb)
            g.add_edge(machine, chain[0])
            nx.add_path(g, chain)
            if value.upstream is not None:
                g.add_edge(f"copyback:{job.source.ref.parts[0]}/{value.upstream}", chain[0])
            for gj, _gs, _go in gathers:
                for utid in self.jobs[gj].tasks:
                    g.add_edge(f"copyback:{gj}/{utid}", chain[0])
        self.jobs[jname] = _JobPlan(ids, published)

    def output_folder(self, text: str) -> str:
        return self.plan_path(text or ".")

    def out_local(self, text: str, o: n.Out, t: _TaskCtx) -> str:
        norm = posixpath.normpath(text) if text else ""
        if not text or posixpath.isabs(text) or norm.startswith("..") or norm == ".":
            self.c.error(
                o.path.span,
                f"output '{o.name.value}' of task '{t.task}' is '{text}', which is not a file "
                "name inside the task folder",
            )
            return f"_invalid_/{o.name.value}"
        return norm

    def claim(self, dest: str, job: str, task: str, o: n.Out) -> None:
        first = self.destinations.get(dest)
        if first is None:
            self.destinations[dest] = (job, task, o)
            return
        count = self.collisions.get(id(o), 0)
        self.collisions[id(o)] = count + 1
        if count >= _REPORT_LIMIT:
            return
        fjob, ftask, fout = first
        if fout is o:
            var = next((j.var.value for j in self.pipeline.jobs if j.name.value == job and j.var),
                       "task")
            hint = f"{{{var}.stem}}" if var != "task" else "{task.id}"
            msg = (
                f"tasks '{ftask}' and '{task}' of job '{job}' would both copy output "
                f"'{o.name.value}' back to '{dest}'; make the name differ per task, e.g. "
                f"\"{hint}{PurePosixPath(dest).suffix}\""
            )
        else:
            msg = (
                f"output '{o.name.value}' of task '{task}' (job '{job}') would be copied back to "
                f"'{dest}', where output '{fout.name.value}' of task '{ftask}' (job '{fjob}') "
                "goes too; give one of them another name or output folder"
            )
        self.c.error(o.path.span, msg)

    def compile_action(self, action, scope: Scope, i: int) -> Callable[[_TaskCtx], dict]:
        if isinstance(action, n.Call):
            kws = []
            for kw in action.kwargs:
                if isinstance(kw.value, n.Ref):
                    kws.append((kw.name.value, self.getter(scope.resolve(kw.value, CTX_STEP, i),
                                                           local=True)))
                else:
                    value = kw.value.value
                    kws.append((kw.name.value, lambda t, v=value: list(v)
                                if isinstance(v, tuple) else v))
            target = action.target

            def call(t: _TaskCtx) -> dict:
                kwargs = {}
                for k, getv in kws:
                    v = getv(t)
                    kwargs[k] = list(v) if isinstance(v, tuple) else v
                return {"argv": None, "call": {"function": target, "kwargs": kwargs}}

            return call
        assert isinstance(action, n.Run)
        words = []
        for w in action.words:
            parts = w.template.parts
            if len(parts) == 1 and isinstance(parts[0], n.Ref):
                b = scope.resolve(parts[0], CTX_STEP, i)
                words.append(("one", self.getter(b, local=True)))
            else:
                words.append(("tpl", self.compile_template(w.template, scope, CTX_STEP, i)))
        if action.shell:
            script = action.words[1].template
            quoted = []
            for p in script.parts:
                if isinstance(p, str):
                    quoted.append(p)
                else:
                    quoted.append(self.getter(scope.resolve(p, CTX_STEP, i), local=True))

            def shell(t: _TaskCtx) -> dict:
                text = []
                for q in quoted:
                    if isinstance(q, str):
                        text.append(q)
                        continue
                    v = q(t)
                    if isinstance(v, (list, tuple)):
                        text.append(" ".join(_shq(format_value(x)) for x in v))
                    else:
                        text.append(_shq(format_value(v)))
                return {"argv": ["/bin/sh", "-c", "".join(text)], "call": None}

            return shell

        def run(t: _TaskCtx) -> dict:
            argv: list[str] = []
            for kind, fn in words:
                v = fn(t)
                if kind == "one" and isinstance(v, (list, tuple)):
                    argv.extend(format_value(x) for x in v)
                else:
                    argv.append(v if kind == "tpl" else format_value(v))
            return {"argv": argv, "call": None}

        return run

    def compile_ins(self, step: n.Step, scope: Scope, i: int):
        """File bindings a step reads (from its command and ``in`` names) and its ``in`` files."""
        bindings: list[Binding] = []
        seen = set()
        refs: list[n.Ref] = []
        for item in step.ins:
            if isinstance(item.item, n.Ref):
                refs.append(item.item)
        action = step.action
        if isinstance(action, n.Run):
            for w in action.words:
                refs.extend(w.template.refs)
        elif isinstance(action, n.Call):
            refs.extend(kw.value for kw in action.kwargs if isinstance(kw.value, n.Ref))
        for r in refs:
            b = scope.resolve(r, CTX_STEP, i)
            if b.attr is not None or b.kind in ("special", "param"):
                continue
            if b.kind == "var" and scope.job.source is not None and not isinstance(
                scope.job.source, (n.GlobSource, n.UpstreamSource)
            ):
                continue
            if b.kind == "out" and b.step == step.name.value:
                continue
            if b not in seen:
                seen.add(b)
                bindings.append(b)
        files = [
            (self.compile_template(item.item, scope, CTX_STEP, i), item)
            for item in step.ins
            if isinstance(item.item, n.Template)
        ]
        return bindings, files

    def step_inputs(self, bindings: list[Binding], t: _TaskCtx, in_files) -> list[str]:
        out: list[str] = []
        for b in bindings:
            if b.kind == "var":
                if t.var.file is not None:
                    out.append(posixpath.basename(t.var.file))
            elif b.kind == "shared":
                out.append("../" + self._shared_local[b.name])
            elif b.kind == "out":
                out.append(t.outs[(b.step, b.name)])
            elif b.kind == "gather":
                out.extend(self.getter(b, local=True)(t))  # type: ignore[arg-type]
        for render, _item in in_files:
            out.append(posixpath.basename(self.plan_path(render(t))))
        return list(dict.fromkeys(out))

    def run(self) -> nx.DiGraph:
        deps = job_dependencies(self.pipeline, self.params)
        order = {j.name.value: k for k, j in enumerate(self.pipeline.jobs)}
        by_name = {j.name.value: j for j in self.pipeline.jobs}
        for jname in nx.lexicographical_topological_sort(deps, key=lambda j: order[j]):
            job = by_name[jname]
            upstream = list(deps.predecessors(jname))
            if any(u not in self.jobs for u in upstream):
                continue  # an upstream job could not be expanded; its error is reported
            self.plan_job(job)
        g = self.graph
        g.graph.update(
            pipeline=self.name,
            root=self.root,
            params={k: list(v) if isinstance(v, tuple) else v for k, v in self.params.items()},
            jobs=[j.name.value for j in self.pipeline.jobs],
        )
        if self.c.diagnostics:
            raise PlanError(self.c.diagnostics)
        return g


def _shq(text: str) -> str:
    import shlex

    return shlex.quote(text)


def build_plan(
    pipeline: n.Pipeline,
    source: SourceFile | None,
    root: str,
    params: Mapping[str, object],
    pipeline_name: str,
) -> nx.DiGraph:
    """Lower a checked pipeline to its plan; raises :class:`PlanError` with every problem."""
    return Planner(pipeline, source, os.path.abspath(root), params, pipeline_name).run()
