"""Planning: a checked pipeline → the explicit plan, a ``networkx.DiGraph`` of plain data.

Each job is expanded into its tasks (one per glob match, list item, ``range`` number, line of a
``lines()`` file, or upstream task), and each task into the chain::

    stage:JOB  →  stage:JOB/TASK  →  exec:JOB/TASK/STEP …  →  copyback:JOB/TASK

with the files each node moves or reads written on it (see docs/plan-format.md for every
attribute). Upstream outputs add ``copyback:UP/T → stage:JOB/TASK`` edges: one per task for a
``for x in UP.STEP.OUT`` map, every task of UP for a ``{UP.STEP.OUT}`` gather.

What can only be known by looking at files or at all tasks together — globs that match nothing,
missing inputs, two outputs copied to one destination, two inputs (or an input and an output)
with one local name, a task reading a file that another task's copy-back writes without waiting
for it, an output that would be copied back over the pipeline file, a file the pipeline reads,
into the run's state folder or a scratch root's ``opf`` folder (:mod:`.protect`), more than
:data:`~opals_dsl.lang.expand.MAX_TASKS` tasks — is found here and reported as a
:class:`PlanError`, every one of them.

The steps of a job, in :meth:`Planner.plan_job`: expand its values (:mod:`.expand`), stage its
shared files, name its tasks, compile its steps once (:mod:`.templates`), then emit each task —
its staged files, its outputs claiming their destinations, its ``in`` files, its chain written
into the graph through the plan contract (:mod:`opals_dsl.plan.model`,
:func:`opals_dsl.plan.graph.add_chain`), or handed to a sink that never holds the graph. The
cyclic garbage collector is paused while the graph is built: it would otherwise walk the
growing graph again and again and take most of the time.
"""

from __future__ import annotations

import gc
import os
import posixpath
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import networkx as nx

from ..errors import PlanError
from ..plan import model
from ..plan.graph import PlanSink, add_chain
from ..source import SourceFile, Span
from . import nodes as n
from .check import Checker
from .expand import (
    Expander,
    TaskValue,
    format_value,
    leaves,
    path_attr,
    safe_id,
    task_ids,
    why_not_a_file,
)
from .limits import step_limits
from .protect import (
    REPORT_LIMIT,
    DestinationChecks,
    Protected,
    overwritten_message,
    reads_output_message,
)
from .scope import CTX_OUT, CTX_OUTPUT, Binding, JobTable, ResolveError, Scope, job_dependencies
from .templates import BROKEN, CompiledStep, StepCompiler, TaskCtx, Text, no_action, text_of


@dataclass(slots=True)
class _JobPlan:
    """What later jobs need to know of an expanded job."""

    tasks: list[str]
    # (step, out) -> per-task destination (plan form), in task order
    published: dict[tuple[str, str], list[str]]


@dataclass(slots=True)
class _Compiled:
    """A job's steps and output folder, compiled once for all its tasks."""

    folder: Text
    flat: bool
    steps: list[CompiledStep]


@dataclass(slots=True)
class _JobCtx:
    """What the tasks of one job share while they are emitted."""

    job: n.Job
    name: str
    machine: str
    steps: list[CompiledStep]
    folder: Text
    flat: bool
    prefixes: list[str] | None  # where each step's outputs go, if the same for every task
    published: dict[tuple[str, str], list[str]]
    labels: list[str]
    retries: int
    var_span: Span | None
    stage_var: bool  # a step reads the loop value's file
    read_var: bool  # the loop values are files of the job's glob
    tiles: bool  # the loop values are tiles, whose files are the job's inputs
    stage_tiles: bool  # a step reads a tile's files
    up_job: str | None
    gather_files: list[list[str]]
    gather_locals: dict[str, str]
    gather_edges: list[str]
    waits: set[str]  # the copy-backs every task of the job waits for



class Planner(StepCompiler, Expander, DestinationChecks):
    """Lowers one checked pipeline; :func:`build_plan` is the way in."""

    def __init__(
        self,
        pipeline: n.Pipeline,
        source: SourceFile | None,
        root: str,
        params: Mapping[str, object],
        pipeline_name: str,
        lenient: bool = False,
        protected: Protected | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.protected = protected
        self.root = root
        self.lenient = lenient
        self.params = params
        self.name = pipeline_name
        self.c = Checker(source)
        self.graph = nx.DiGraph()
        # where each chain goes: the graph, or a PlanSink that never holds it (build_plan)
        self.add_chain: Callable[..., None] = lambda chain, after=(): add_chain(
            self.graph, chain, after)
        self.jobs: dict[str, _JobPlan] = {}
        # destination -> (job, task, out, step) of the output copied back there
        self.destinations: dict[str, tuple[str, str, n.Out, str]] = {}
        self.folders: dict[str, str] = {}  # folder above a destination -> one inside it
        self.folders_reported: set[str] = set()  # paths found a file and a folder at once
        # shared-drive file -> (job, task or None, span) of the first stage that reads it
        # (shared files, glob matches, `in` files: not the upstream outputs a task waits for)
        self.readers: dict[str, tuple[str, str | None, Span | None]] = {}
        # readers that are not a stage's: what they are ("its list file", ...)
        self.reader_what: dict[str, str] = {}
        self.in_checked: dict[str, str | None] = {}  # `in` file -> why it is no file, or None
        self.reported: dict[object, int] = {}
        self._shared_local: dict[str, str] = {}
        self._file_bindings: list[Binding] = []
        self._compiled_outs: set[tuple[str, str]] = set()
        self.job_name = ""
        # job -> the placeholder that tells its tasks apart, for the hint of a clash
        self._clash_hint: dict[str, str] = {}
        self.table = JobTable(pipeline)
        self.task_count = 0  # tasks of the jobs expanded so far (see room_for)

    def _guarded(self, make: Callable[[], object], fallback: object) -> Any:
        """``make()``; when lenient, a part naming something unknown becomes ``fallback``, so
        the rest of the job is still planned and its own mistakes found (the checker has
        already reported the unknown name)."""
        if not self.lenient:
            return make()
        try:
            return make()
        except ResolveError:
            return fallback

    # -- values --------------------------------------------------------------------------

    def error(
        self, span: Span | None, message: str, key: object = None, limit: int = REPORT_LIMIT
    ) -> None:
        """Report, at most ``limit`` times for one ``key`` (a declaration)."""
        if key is not None:
            ident = (key[0], id(key[1])) if isinstance(key, tuple) else id(key)
            count = self.reported.get(ident, 0)
            self.reported[ident] = count + 1
            if count >= limit:
                return
        self.c.error(span, message)

    # -- expansion -----------------------------------------------------------------------

    # -- a job, step by step ----------------------------------------------------------------

    def plan_job(self, job: n.Job) -> None:
        """Expand a job's values, stage its shared files, compile its steps once, then emit
        every task's chain into the graph."""
        jname = job.name.value
        self.job_name = jname
        scope = Scope(self.pipeline, job, self.params, self.table)
        values = self._guarded(lambda: self.task_values(job, scope), None)
        shared_files = self.stage_shared(job, scope)
        if values is None:
            return
        labels, ids = self.name_tasks(job, values)
        compiled = self.compile_job(job, scope)
        if compiled is None:
            return
        jc = self.job_context(job, compiled, labels, ids)
        self.add_chain([(jc.machine, model.machine_stage_attrs(jname, shared_files))])
        for index, (value, tid) in enumerate(zip(values, ids, strict=True)):
            self.emit_task(jc, index, value, tid)
        self.jobs[jname] = _JobPlan(ids, jc.published)

    def stage_shared(self, job: n.Job, scope: Scope) -> list[list[str]]:
        """The Job Prephase's files, ``[source, name in the job folder]``; notes each shared
        file's name for the templates that use it."""
        jname = job.name.value
        shared_files: list[list[str]] = []
        self._shared_local = {}
        names_seen: dict[str, n.Shared] = {}
        for s in job.shared:
            path = self._guarded(lambda s=s: self.job_template(s.path, scope, jname), None)
            if path is None:
                continue
            rel = self.plan_path(path)
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
                self.c.error(s.path.span,
                             f"the shared file '{rel}' {why_not_a_file(self.abspath(rel))}")
            self.read(rel, jname, None, s.path.span, s)
            shared_files.append([rel, base])
        return shared_files

    def name_tasks(self, job: n.Job, values: list[TaskValue]) -> tuple[list[str], list[str]]:
        """Each task's label (its value's stem, or the value) and its id; notes what tells the
        tasks apart, for the hint of a destination clash."""
        labels = [path_attr(v.file, "stem") if v.file is not None else format_value(v.value)
                  for v in values]
        if job.source is None:
            ids = ["0"]
        elif isinstance(job.source, n.UpstreamSource):
            # a task of a downstream job is named after the task whose output it takes: the
            # upstream ids are unique and stable already, and its outputs' stems often are not
            ids = [str(v.upstream) for v in values]
        else:
            ids = task_ids(labels)
        if job.var is not None and job.var.value not in ("task", "job", "pipeline") and (
            task_ids(labels)[0] == safe_id(labels[0])
        ):
            # the loop values differ (ignoring case; else the ids have their index in front):
            # the file's stem or the value tells the tasks apart
            var = job.var.value
            if isinstance(job.source, (n.GlobSource, n.UpstreamSource)):
                self._clash_hint[job.name.value] = f"{{{var}.stem}}"
            elif isinstance(job.source, n.TilesSource):
                self._clash_hint[job.name.value] = f"{{{var}.id}}"
            elif not any("/" in label for label in labels):
                self._clash_hint[job.name.value] = f"{{{var}}}"
        return labels, ids

    def retries_of(self, job: n.Job) -> int:
        if not job.retries:
            return 0
        rv = job.retries[0].value
        retries = rv.value if isinstance(rv, n.Literal) else self.params.get(rv.parts[0], 0)
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            self.c.error(job.retries[0].span, "retries takes a whole number, 0 or more")
            return 0
        return retries

    def compile_job(self, job: n.Job, scope: Scope) -> _Compiled | None:
        """What is the same for every task of a job, compiled once: the output folder and the
        steps (outputs, reads, command); None if the output folder names something unknown."""
        jname = job.name.value
        if job.outputs:
            folder_t = self._guarded(
                lambda: self.compile_template(job.outputs[0].folder, scope, CTX_OUTPUT), None)
            if folder_t is None:
                return None
            flat = job.outputs[0].flat
            if isinstance(folder_t, str):
                self.check_folder(folder_t, job.outputs[0])
        else:
            folder_t, flat = f"results/{jname}", False
        steps: list[CompiledStep] = []
        self._compiled_outs = set()
        for i, step in enumerate(job.steps):
            sname = step.name.value
            threads, timeout = step_limits(job, step, self.params)
            self.step_threads = threads  # {task.threads} in this step's command
            outs = []
            for o in step.outs:
                text = self._guarded(
                    lambda o=o, i=i: self.compile_template(o.path, scope, CTX_OUT, i), BROKEN
                )
                if text is not BROKEN:
                    outs.append((o, o.name.value, text, (sname, o.name.value), o.temp))
                    self._compiled_outs.add((sname, o.name.value))
            inputs, in_files = self._guarded(
                lambda step=step, i=i: self.compile_ins(step, scope, i), ([], [])
            )
            action = self._guarded(
                lambda step=step, i=i: self.compile_action(step.action, scope, i), no_action
            )
            steps.append(CompiledStep(step, sname, outs, action, inputs, in_files, threads,
                                      timeout))
        for step in job.steps:  # a call's module in the pipeline's folder is read too
            if isinstance(step.action, n.Call):
                module = model.module_file(self.root, step.action.module)
                if module is not None:
                    self.read(module, jname, None, step.action.span, step.action,
                              what="the Python module of its call")
        return _Compiled(folder_t, flat, steps)

    def job_context(self, job: n.Job, compiled: _Compiled, labels: list[str],
                    ids: list[str]) -> _JobCtx:
        """Everything the tasks of a job share: the destination lists its outputs fill, where
        the outputs go when that is the same for every task, and the gathered files."""
        steps = compiled.steps
        published: dict[tuple[str, str], list[str]] = {
            o[3]: [] for cs in steps for o in cs.outs if not o[4]
        }
        for cs in steps:  # each out with the list its destinations go to (None if temp)
            cs.outs = [(*o, published.get(o[3])) for o in cs.outs]  # type: ignore[misc]
        prefixes: list[str] | None = None
        if isinstance(compiled.folder, str):
            prefixes = self.prefixes(compiled.folder, compiled.flat, steps)
        gather_files, gather_locals, gather_edges = self.gathers(job)
        return _JobCtx(
            job=job, name=job.name.value, machine=model.machine_stage_id(job.name.value),
            steps=steps, folder=compiled.folder, flat=compiled.flat, prefixes=prefixes,
            published=published, labels=labels, retries=self.retries_of(job),
            var_span=job.var.span if job.var else None,
            stage_var=any(b.kind == "var" and b.attr is None for b in self._file_bindings),
            # a glob's matches are the job's inputs, staged or not: no copy-back may overwrite
            read_var=isinstance(job.source, n.GlobSource),
            tiles=isinstance(job.source, n.TilesSource),
            stage_tiles=any(b.kind == "var" and b.attr == "files" for b in self._file_bindings),
            up_job=job.source.ref.parts[0] if isinstance(job.source, n.UpstreamSource) else None,
            gather_files=gather_files, gather_locals=gather_locals, gather_edges=gather_edges,
            waits=set(gather_edges),
        )

    def prefixes(self, folder_text: str, flat: bool, steps: list[CompiledStep]) -> list[str]:
        """What goes before each step's outputs to give their destinations."""
        folder = self.plan_path(folder_text or ".")
        return [_prefix(folder if flat else self.plan_path(posixpath.join(folder, s.name)))
                for s in steps]

    def gathers(self, job: n.Job) -> tuple[list[list[str]], dict[str, str], list[str]]:
        """The files every task of the job gathers from other jobs (``[source, local]``), their
        local names, and the copy-backs they wait for."""
        found = sorted(
            {(b.job, b.step, b.name) for b in self._file_bindings if b.kind == "gather"}
        )
        files: list[list[str]] = []
        locals_: dict[str, str] = {}
        edges: list[str] = []
        for gj, gs, go in found:
            up_tasks, up_dests = self.published(gj, gs, go)
            for utid, dest in zip(up_tasks, up_dests, strict=True):
                local = f"{gj}/{utid}/{posixpath.basename(dest)}"
                if local in locals_:
                    if locals_[local] != dest:
                        self.c.error(
                            job.name.span,
                            f"two gathered files would have the same local name '{local}' "
                            f"('{locals_[local]}' and '{dest}'); give the outputs of "
                            f"job '{gj}' different file names",
                        )
                    continue
                locals_[local] = dest
                files.append([dest, local])
            edges.extend(model.copyback_id(gj, utid) for utid in up_tasks)
        return files, locals_, list(dict.fromkeys(edges))

    # -- a task ----------------------------------------------------------------------------------

    def emit_task(self, jc: _JobCtx, index: int, value: TaskValue, tid: str) -> None:
        """One task's chain — task stage, a node per step, copy-back — into the graph, with
        every file it stages and every destination it claims."""
        t = self.task_ctx(jc, index, value, tid)
        upstream_cb = (model.copyback_id(jc.up_job, value.upstream)
                       if jc.up_job is not None else None)
        stage_files, local_src = self.stage_value(jc, t, upstream_cb)
        prefixes = jc.prefixes if jc.prefixes is not None else self.task_prefixes(jc, t)
        produced: dict[str, tuple[str, str]] = {}  # local -> (step, out)
        copy_files: list[list[str]] = []
        execs: list[tuple[str, dict]] = []
        key = (jc.name, tid)
        for k, cs in enumerate(jc.steps):
            out_locals, temps = self.claim_outputs(t, cs, prefixes[k], produced, copy_files)
            in_locals = self.stage_in_files(t, cs, local_src, stage_files, jc.waits,
                                            upstream_cb)
            argv, call = cs.action(t)
            execs.append((
                model.exec_id(jc.name, tid, cs.name),
                model.exec_attrs(jc.name, tid, cs.name, key, k, argv, call,
                                 self.step_inputs(cs, t, in_locals), out_locals, temps,
                                 cs.threads, cs.timeout),
            ))
        for local in produced:
            if local in local_src or local in jc.gather_locals:
                self.error(jc.job.name.span, f"in task '{tid}' the input '{local}' would be "
                           "overwritten by an output of the same name; rename the output",
                           jc.job)
        after = [jc.machine] if upstream_cb is None else [jc.machine, upstream_cb]
        self.add_chain([
            (model.task_stage_id(jc.name, tid),
             model.task_stage_attrs(jc.name, tid, key, index, jc.retries, stage_files)),
            *execs,
            (model.copyback_id(jc.name, tid),
             model.copyback_attrs(jc.name, tid, key, copy_files)),
        ], after + jc.gather_edges)

    @staticmethod
    def task_ctx(jc: _JobCtx, index: int, value: TaskValue, tid: str) -> TaskCtx:
        if value.file is not None:
            vtext = posixpath.basename(value.file)
            return TaskCtx(jc.name, tid, value, {}, vtext, value.file, jc.labels[index])
        vtext = jc.labels[index]
        return TaskCtx(jc.name, tid, value, {}, vtext, vtext, path_attr(vtext, "stem"))

    def stage_value(self, jc: _JobCtx, t: TaskCtx, upstream_cb: str | None
                    ) -> tuple[list[list[str]], dict[str, str]]:
        """The task stage's files so far — the loop value's file if a step reads it, and the
        gathered files — and the task's own staged files by local name."""
        value = t.var
        assert value is not None
        stage_files: list[list[str]] = []
        local_src: dict[str, str] = {}  # this task's own staged files: local -> source
        if jc.stage_var and value.file is not None:
            stage_files.append([value.file, t.text])
            local_src[t.text] = value.file
        if jc.read_var:
            if value.file in self.destinations:
                self.read(value.file, jc.name, t.task, jc.var_span, jc.job.source, jc.waits,
                          upstream_cb)
            else:
                self.readers.setdefault(value.file, (jc.name, t.task, jc.var_span))
        if jc.tiles:
            self.stage_tile(jc, t, stage_files, local_src, upstream_cb)
        if jc.gather_files:
            stage_files += jc.gather_files
        return stage_files, local_src

    def stage_tile(self, jc: _JobCtx, t: TaskCtx, stage_files: list[list[str]],
                   local_src: dict[str, str], upstream_cb: str | None) -> None:
        """A tile's files: inputs of the job (no copy-back may overwrite them), staged by base
        name when a step reads them."""
        for f in t.var.value.files:  # type: ignore[union-attr]
            if f in self.destinations:
                self.read(f, jc.name, t.task, jc.var_span, jc.job.source, jc.waits, upstream_cb)
            else:
                self.readers.setdefault(f, (jc.name, t.task, jc.var_span))
            if not jc.stage_tiles:
                continue
            local = posixpath.basename(f)
            seen = local_src.get(local)
            if seen is None:
                local_src[local] = f
                stage_files.append([f, local])
            elif seen != f:
                self.error(
                    jc.job.source.span,  # type: ignore[union-attr]
                    f"tile '{t.task}' reads two files named '{local}' ('{seen}' and '{f}'), "
                    "and both would be copied into its task folder; rename one of them",
                    jc.job,
                )

    def task_prefixes(self, jc: _JobCtx, t: TaskCtx) -> list[str]:
        """Where each step's outputs go, for an output folder that differs per task."""
        text = text_of(jc.folder, t)
        if text[:1] == "~":
            self.check_folder(text, jc.job.outputs[0])
        if ".." in text:
            self.check_inside(text, jc.job.outputs[0], t.task)
        return self.prefixes(text, jc.flat, jc.steps)

    def claim_outputs(self, t: TaskCtx, cs: CompiledStep, prefix: str,
                      produced: dict[str, tuple[str, str]], copy_files: list[list[str]]
                      ) -> tuple[list[str], list[str]]:
        """A step's outputs in this task (every one, and the temp ones), each published one
        claiming its destination."""
        destinations, readers = self.destinations, self.readers
        out_locals: list[str] = []
        temps: list[str] = []
        for o, oname, render, okey, temp, dests in cs.outs:
            text = render if render.__class__ is str else render(t)
            if text and "/" not in text and text != "." and text != "..":
                local = text  # one file name: already normal
            else:
                local = self.out_local(text, o, t)
            if local in produced:
                self.error(
                    o.path.span,
                    f"in task '{t.task}' outputs '{'.'.join(produced[local])}' and "
                    f"'{cs.name}.{oname}' are both the file '{local}', so one would overwrite "
                    "the other; give them different names",
                    o,
                )
            # (a name of no more than a quarter as many characters fits: 4 bytes a character)
            if len(local) > _NAME_MAX // 4 and _name_too_long(local):
                self.error(o.path.span, f"output '{oname}' of task '{t.task}' is '{local}', a "
                                        f"name longer than the {_NAME_MAX} bytes a file or "
                                        f"folder name may have; give it a shorter one", o)
            produced[local] = okey
            t.outs[okey] = local
            out_locals.append(local)
            if temp:
                temps.append(local)
                continue
            dest = prefix + local
            if prefix[:1] == "/":  # absolute: the file may still lie inside the root
                dest = self.plan_path(dest)
            if (dest in destinations or dest in readers or dest in self.folders
                    or dest.rpartition("/")[0] not in self.folders):
                self.claim(dest, t.job, t.task, o, cs.name)
            else:
                destinations[dest] = (t.job, t.task, o, cs.name)
            copy_files.append([local, dest])
            dests.append(dest)
        return out_locals, temps

    def stage_in_files(self, t: TaskCtx, cs: CompiledStep, local_src: dict[str, str],
                       stage_files: list[list[str]], waits: set[str],
                       upstream_cb: str | None) -> list[str]:
        """The ``in`` files of a step in this task, staged by base name; their local names."""
        in_locals: list[str] = []
        for render, item in cs.in_files:
            rel = self.plan_path(text_of(render, t))
            local = posixpath.basename(rel)
            in_locals.append(local)
            self.check_in_file(rel, item.span, None if render.__class__ is str else t.task)
            seen = local_src.get(local)
            if seen is None:
                local_src[local] = rel
                stage_files.append([rel, local])
                self.read(rel, t.job, t.task, item.span, item, waits, upstream_cb)
            elif seen != rel:
                self.c.error(
                    item.span,
                    f"in task '{t.task}' two inputs have the file name '{local}' "
                    f"('{seen}' and '{rel}'); rename one of them",
                )
        return in_locals

    # -- claims and reads -------------------------------------------------------------------

    def out_local(self, text: str, o: n.Out, t: TaskCtx) -> str:
        if text and "/" not in text and text != "." and text != "..":
            return text  # one file name: already normal
        norm = posixpath.normpath(text) if text else ""
        if not text or posixpath.isabs(text) or leaves(norm) or norm == ".":
            self.error(
                o.path.span,
                f"output '{o.name.value}' of task '{t.task}' is '{text}', which is not a file "
                "name inside the task folder",
                o,
            )
            return f"_invalid_/{o.name.value}"
        return norm

    def read(
        self, src: str, job: str, task: str | None, span: Span | None, decl: object,
        waits: set[str] | frozenset[str] = frozenset(), upstream: str | None = None,
        what: str | None = None,
    ) -> None:
        """Note that a stage copies ``src`` from the shared drive; it must not be a file that
        some task's copy-back writes, unless the stage waits for that copy-back (``waits``,
        ``upstream``). ``what`` names a file that the planner itself reads (a job's list
        file): no copy-back may write it at all."""
        claim = self.destinations.get(src)
        if claim is not None:
            cb = model.copyback_id(claim[0], claim[1])
            if what is not None:
                self.error(span, overwritten_message(src, f"read by job '{job}' as {what}",
                                                     claim), decl)
            elif cb != upstream and cb not in waits:
                self.error(span, reads_output_message(src, job, task, claim), decl)
        if src not in self.readers:
            self.readers[src] = (job, task, span)
            if what is not None:
                self.reader_what[src] = what

    def graph_attrs(self, source: str | None = None) -> dict[str, Any]:
        return model.graph_attrs(
            self.name, self.root,
            {k: list(v) if isinstance(v, tuple) else v for k, v in self.params.items()},
            [j.name.value for j in self.pipeline.jobs], source,
        )

    def run(self) -> nx.DiGraph:
        deps = job_dependencies(self.pipeline, self.params)
        if self.lenient and not nx.is_directed_acyclic_graph(deps):
            # jobs waiting for each other cannot be planned (the checker reports the cycle);
            # what they read of their own (a glob, shared files) is still looked at
            deps = deps.subgraph(
                j for part in nx.strongly_connected_components(deps) if len(part) == 1
                for j in part
            ).copy()
            for job in self.pipeline.jobs:
                if job.name.value not in deps and not isinstance(job.source, n.UpstreamSource):
                    scope = Scope(self.pipeline, job, self.params, self.table)
                    self._guarded(lambda job=job, scope=scope: self.task_values(job, scope), None)
                    self.stage_shared(job, scope)
        order = {j.name.value: k for k, j in enumerate(self.pipeline.jobs)}
        by_name = {j.name.value: j for j in self.pipeline.jobs}
        for jname in nx.lexicographical_topological_sort(deps, key=lambda j: order[j]):
            job = by_name[jname]
            upstream = list(deps.predecessors(jname))
            if any(u not in self.jobs for u in upstream):
                continue  # an upstream job could not be expanded; its error is reported
            self._file_bindings: list[Binding] = []
            self.plan_job(job)
        self.check_destinations()
        g = self.graph
        g.graph.update(self.graph_attrs())
        if self.c.diagnostics:
            raise PlanError(self.c.diagnostics)
        return g


#: the longest name of a file or folder (bytes), on the file systems opf writes to
_NAME_MAX = 255


def _name_too_long(path: str) -> bool:
    """Is a part of ``path`` longer than a file name may be?"""
    return any(len(part.encode("utf-8", "surrogateescape")) > _NAME_MAX
               for part in path.split("/"))


def _prefix(folder: str) -> str:
    """What goes before a task-folder-relative name to give its destination."""
    if folder == ".":
        return ""
    return folder if folder.endswith("/") else folder + "/"


def build_plan(
    pipeline: n.Pipeline,
    source: SourceFile | None,
    root: str,
    params: Mapping[str, object],
    pipeline_name: str,
    *,
    lenient: bool = False,
    protected: Protected | None = None,
    sink: PlanSink | None = None,
    source_name: str | None = None,
) -> nx.DiGraph | None:
    """Lower a checked pipeline to its plan; raises :class:`PlanError` with every problem.

    ``lenient`` plans a pipeline that has check errors too, leaving out the parts that name
    unknown things, to find what else is wrong (its plan is never run). ``protected`` names
    the places no output may be copied back to (none if None). With a ``sink``
    (:class:`~opals_dsl.plan.graph.NodeLinkWriter`, :class:`~opals_dsl.plan.model.PlanCounts`)
    the graph is never built: the sink is started with the graph's attributes (``source``
    being ``source_name``), gets every chain as it is planned, and is closed if the plan has
    no error; None is returned."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        planner = Planner(
            pipeline, source, os.path.abspath(root), params, pipeline_name, lenient, protected
        )
        if sink is None:
            return planner.run()
        sink.start(planner.graph_attrs(source_name))
        planner.add_chain = sink.add_chain
        planner.run()
        sink.close()
        return None
    finally:
        if collecting:
            gc.enable()
