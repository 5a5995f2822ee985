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
into the run's state folder or a scratch root's ``opf`` folder (:class:`Protected`), more than
:data:`MAX_TASKS` tasks — is found here and reported as a :class:`PlanError`, every one of them.

Speed: templates are compiled once per job into literal text and small functions of the task,
and whatever is the same for every task of a job (shared files, gathered lists, params, the
destination folder) is computed once, so expanding 100,000 tasks is a loop of string joins and
dict inserts. The cyclic garbage collector is paused while the graph is built: it would
otherwise walk the growing graph again and again and take most of the time.
"""

from __future__ import annotations

import fnmatch
import gc
import glob as globmod
import io
import json
import os
import posixpath
import re
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from json.encoder import encode_basestring
from operator import attrgetter
from pathlib import PurePosixPath
from typing import Any, TextIO

import networkx as nx

from . import nodes as n
from .check import (
    CTX_JOB,
    CTX_OUT,
    CTX_OUTPUT,
    CTX_STEP,
    Binding,
    Checker,
    JobTable,
    ResolveError,
    Scope,
    job_dependencies,
)
from .errors import PlanError
from .source import SourceFile, Span
from .words import shell_places

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_WILDCARDS = re.compile(r"[*?\[]")
#: at most this many errors are reported for one declaration (a glob, an out, an in)
_REPORT_LIMIT = 3
#: the most tasks a job, and a whole pipeline, may have: ten times what the planner is built
#: for, so that a slip (``range(1000000000)``, a huge ``--param``) is a message, not an
#: exhausted memory
MAX_TASKS = 10_000_000
#: the largest file ``lines(...)`` reads (MAX_TASKS lines of about 25 characters)
MAX_LIST_FILE_BYTES = 256 * 1024 * 1024


def format_value(value: object) -> str:
    """A value as templates show it: numbers as Python prints them, booleans true/false."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | list):
        return ",".join(format_value(v) for v in value)
    return str(value)


def safe_id(text: str) -> str:
    """``text`` made safe as a folder name: characters outside ``A-Za-z0-9._-`` become ``_``."""
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


def _leaves(norm: str) -> bool:
    """Does a normalised relative path climb out of its folder (``..`` or ``../x``)?"""
    return norm == ".." or norm.startswith("../")


def _attr(path: str, attr: str) -> str:
    """``.name``, ``.stem``, ``.suffix`` or ``.parent`` of a path, as :class:`PurePosixPath`
    gives them; plain string slicing for the usual normalised path (it runs once per task)."""
    if not path or path == "." or "//" in path or path.endswith("/") or "/./" in path or (
        path.startswith("./") or path.endswith("/.")
    ):
        p = PurePosixPath(path)
        return str(p.parent) if attr == "parent" else getattr(p, attr)
    slash = path.rfind("/")
    if attr == "parent":
        return "." if slash < 0 else (path[:slash] or "/")
    name = path[slash + 1 :]
    if attr == "name":
        return name
    dot = name.rfind(".")
    if 0 < dot < len(name) - 1:
        return name[:dot] if attr == "stem" else name[dot:]
    return name if attr == "stem" else ""


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
    outs: dict[tuple[str, str], str]
    text: str  # the loop value as a word: a file's base name (its local copy), or the value
    path: str  # the loop value whose .stem etc. templates take: the file's path, or the value
    stem: str  # its .stem, wanted by most pipelines (in output names)


@dataclass(slots=True)
class _JobPlan:
    """What later jobs need to know of an expanded job."""

    tasks: list[str]
    # (step, out) -> per-task destination (plan form), in task order
    published: dict[tuple[str, str], list[str]]


#: a piece of compiled text: the same for every task of a job (str), or a function of the task
Text = str | Callable[[_TaskCtx], str]

_task_id = attrgetter("task")
_var_text = attrgetter("text")
_var_stem = attrgetter("stem")


def _render(pieces: list[Text]) -> Text:
    """Join compiled pieces into one piece (constant when every piece is)."""
    if all(isinstance(p, str) for p in pieces):
        return "".join(pieces)  # type: ignore[arg-type]
    if len(pieces) == 1:
        return pieces[0]
    if len(pieces) == 2 and isinstance(pieces[1], str):
        first, rest = pieces[0], pieces[1]
        return lambda t: first(t) + rest  # type: ignore[operator]
    return lambda t: "".join([p if p.__class__ is str else p(t) for p in pieces])


def _text_of(piece: Text, t: _TaskCtx) -> str:
    return piece if piece.__class__ is str else piece(t)  # type: ignore[operator,return-value]


@dataclass(slots=True)
class _Step:
    """One step compiled for every task of its job."""

    step: n.Step
    name: str
    # out, name, text, (step, name), temp; plus, once expanding, its destination list
    outs: list[tuple]
    action: Callable[[_TaskCtx], tuple[list[str] | None, dict | None]]
    inputs: list[object]  # str (constant) | list[str] (gather) | function of the task
    in_files: list[tuple[Text, n.In]]


class Planner:
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
        self.jobs: dict[str, _JobPlan] = {}
        # destination -> (job, task, out, step) of the output copied back there
        self.destinations: dict[str, tuple[str, str, n.Out, str]] = {}
        # shared-drive file -> (job, task or None, span) of the first stage that reads it
        # (shared files, glob matches, `in` files: not the upstream outputs a task waits for)
        self.readers: dict[str, tuple[str, str | None, Span | None]] = {}
        # readers that are not a stage's: what they are ("its list file", ...)
        self.reader_what: dict[str, str] = {}
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

    def plan_path(self, path: str) -> str:
        """A shared-drive path in plan form: relative to the root if inside it, else absolute."""
        path = path.replace("\\", "/") if os.sep == "\\" else path
        if not (
            path.startswith(("/", "."))
            or "/." in path
            or "//" in path
            or path.endswith("/")
            or not path
        ):
            return path  # already normal, and relative to the root
        if posixpath.isabs(path):
            norm = posixpath.normpath(path)
            rel = posixpath.relpath(norm, self.root) if norm.startswith(self.root) else None
            return rel if rel is not None and not _leaves(rel) else norm
        norm = posixpath.normpath(path)
        if _leaves(norm):
            return posixpath.normpath(posixpath.join(self.root, norm))
        return norm

    def abspath(self, path: str) -> str:
        return os.path.join(self.root, path)

    def error(
        self, span: Span | None, message: str, key: object = None, limit: int = _REPORT_LIMIT
    ) -> None:
        """Report, at most ``limit`` times for one ``key`` (a declaration)."""
        if key is not None:
            ident = (key[0], id(key[1])) if isinstance(key, tuple) else id(key)
            count = self.reported.get(ident, 0)
            self.reported[ident] = count + 1
            if count >= limit:
                return
        self.c.error(span, message)

    def compile_template(
        self, tpl: n.Template, scope: Scope, ctx: str, step: int | None = None
    ) -> Text:
        """A template as one piece of text: constant, or a function of the task."""
        pieces: list[Text] = []
        for p in tpl.parts:
            pieces.append(p if isinstance(p, str) else self.text(scope.resolve(p, ctx, step)))
        return _render(pieces)

    def text(self, b: Binding) -> Text:
        """A binding as templates show it (files as task-local paths)."""
        if b.kind == "special":
            if b.name == "task.id":
                return _task_id
            return self.job_name if b.name == "job.name" else self.name
        if b.kind == "param":
            value = format_value(self.params[b.name])
            return _attr(value, b.attr) if b.attr else value
        if b.kind == "var":
            attr = b.attr
            if attr == "stem":
                return _var_stem
            if attr:
                return lambda t: _attr(t.path, attr)
            return _var_text
        if b.kind == "shared":
            base = self._shared_local.get(b.name)
            if base is None:  # lenient: its path names something unknown
                raise ResolveError(f"shared file '{b.name}' could not be planned")
            return _attr(base, b.attr) if b.attr else "../" + base
        if b.kind == "out":
            key, attr = (b.step, b.name), b.attr
            if key not in self._compiled_outs:  # lenient: its template names something unknown
                raise ResolveError(f"output '{b.step}.{b.name}' could not be planned")
            if attr:
                return lambda t: _attr(t.outs[key], attr)
            return lambda t: t.outs[key]
        if b.kind == "gather":
            return ",".join(self.gathered(b))
        raise AssertionError(b.kind)

    def value(self, b: Binding) -> object:
        """A binding as a value: lists (gathers, list params) as lists, params with their type;
        a function of the task where it differs per task."""
        if b.kind == "gather":
            return self.gathered(b)
        if b.kind == "param" and not b.attr:
            value = self.params[b.name]
            return list(value) if isinstance(value, tuple) else value
        if b.kind == "var" and not b.attr:
            return lambda t: t.text if t.var.file is not None else t.var.value
        return self.text(b)

    def gathered(self, b: Binding) -> list[str]:
        """The local paths of a gather's files: ``JOB/TASK-ID/name`` in the task folder."""
        tasks, dests = self.published(b.job, b.step, b.name)
        return [
            f"{b.job}/{tid}/{posixpath.basename(dest)}"
            for tid, dest in zip(tasks, dests, strict=True)
        ]

    def published(self, job: str, step: str, out: str) -> tuple[list[str], list[str]]:
        """The task ids of an expanded job and where each copies one output back to."""
        up = self.jobs.get(job)
        dests = up.published.get((step, out)) if up is not None else None
        if up is None or dests is None:  # lenient: that job or output could not be planned
            raise ResolveError(f"output '{job}.{step}.{out}' could not be planned")
        return up.tasks, dests

    # -- expansion -----------------------------------------------------------------------

    def job_template(self, tpl: n.Template, scope: Scope, job: str) -> str:
        empty = _TaskCtx(job, "", None, {}, "", "", "")
        return _text_of(self.compile_template(tpl, scope, CTX_JOB), empty)

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
            if not self.room_for(len(src.items), src.span, "this list"):
                return None
            return [TaskValue(i.value) for i in src.items]
        if isinstance(src, n.RangeSource):
            args = [
                a.value if isinstance(a, n.Literal) else self.params.get(a.parts[0])
                for a in src.args
            ]
            if not all(isinstance(a, int) and not isinstance(a, bool) for a in args):
                raise ResolveError("range takes whole numbers")  # lenient: checked already
            values = range(*args)  # type: ignore[arg-type]
            shown = f"range({', '.join(map(str, args))})"
            if not values:
                self.c.error(src.span, f"{shown} is empty, so the job would have no task")
                return None
            try:
                count = len(values)
            except OverflowError:  # more than sys.maxsize; the step is 1
                count = values.stop - values.start
            if not self.room_for(count, src.span, shown):
                return None
            return [TaskValue(v) for v in values]
        if isinstance(src, n.LinesSource):
            rel = self.plan_path(self.job_template(src.path, scope, jname))
            self.read(rel, jname, None, src.path.span, src, what="its list file")
            lines = self.list_file(rel, src.path.span)
            if lines is None:
                return None
            if not lines:
                self.c.error(src.path.span, f"the list file '{rel}' has no lines, so the job "
                             "would have no task")
                return None
            return [TaskValue(v) for v in lines]
        assert isinstance(src, n.UpstreamSource)
        b = scope.resolve_upstream(src.ref)
        tasks, dests = self.published(b.job, b.step, b.name)
        if not self.room_for(len(dests), src.span, f"job '{b.job}'"):
            return None
        return [
            TaskValue(d, file=d, upstream=tid) for tid, d in zip(tasks, dests, strict=True)
        ]

    def glob(self, pattern: str, src: n.GlobSource) -> list[TaskValue] | None:
        if not _WILDCARDS.search(pattern):
            rel = self.plan_path(pattern)
            if not os.path.isfile(self.abspath(rel)):
                self.c.error(src.pattern.span,
                             f"the input file '{rel}' {_why_not_a_file(self.abspath(rel))}")
                return None
            return [TaskValue(rel, file=rel)]
        files = sorted(self.plan_path(f) for f in _glob_files(pattern, self.root))
        if not files:
            self.c.error(
                src.pattern.span,
                f"the pattern '{pattern}' matches no file (in {self.root}); check the folder "
                "and the spelling",
            )
            return None
        if not self.room_for(len(files), src.pattern.span, f"the pattern '{pattern}'"):
            return None
        return [TaskValue(f, file=f) for f in files]

    def room_for(self, count: int, span: Span | None, what: str) -> bool:
        """Count ``count`` more tasks, or report (at ``span``) that they are more than
        :data:`MAX_TASKS` for the job or the pipeline and return False."""
        if count > MAX_TASKS:
            self.c.error(span, f"{what} would make {count:,} tasks; a job may have at most "
                         f"{MAX_TASKS:,}")
            return False
        if self.task_count + count > MAX_TASKS:
            total = self.task_count + count
            self.c.error(span, f"{what} would make {count:,} more tasks, {total:,} in all; a "
                         f"pipeline may have at most {MAX_TASKS:,}")
            return False
        self.task_count += count
        return True

    def list_file(self, rel: str, span: Span | None) -> list[str] | None:
        """The values of a ``lines(...)`` file: its lines, stripped, without blank ones and
        ``#`` comments; None (reported) when it is not a regular file of at most
        :data:`MAX_LIST_FILE_BYTES`, not UTF-8, holds a NUL, or has too many lines."""
        path = self.abspath(rel)
        try:
            # not blocking on a named pipe without a writer: its type is refused below
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            self.c.error(span, f"the list file '{rel}' {_why_not_a_file(path)}")
            return None
        except OSError as exc:
            self.c.error(span, f"the list file '{rel}' cannot be read: {exc.strerror or exc}")
            return None
        room = MAX_TASKS - self.task_count
        values: list[str] = []
        try:
            with open(fd, encoding="utf-8-sig", closefd=True) as fh:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode):
                    self.c.error(span, f"the list file '{rel}' is not a regular file (a device or "
                                 "named pipe would be read for ever); name an ordinary file")
                    return None
                if info.st_size > MAX_LIST_FILE_BYTES:
                    self.c.error(span, f"the list file '{rel}' is {info.st_size:,} bytes, more "
                                 f"than the {MAX_LIST_FILE_BYTES:,} a list file may have")
                    return None
                for number, line in enumerate(fh, 1):
                    value = line.strip()
                    if not value or value.startswith("#"):
                        continue
                    if "\0" in value:
                        self.c.error(span, f"line {number} of the list file '{rel}' holds a NUL "
                                     "character, which no file name or command word can hold; "
                                     "is it a text file?")
                        return None
                    if len(values) >= room:
                        self.c.error(span, f"the list file '{rel}' has more than {room:,} lines; "
                                     f"a job and a pipeline may have at most {MAX_TASKS:,} tasks")
                        return None
                    values.append(value)
        except UnicodeDecodeError as exc:
            self.c.error(span, f"the list file '{rel}' is not UTF-8 text ({exc.reason} at byte "
                         f"{exc.start:,}); save it as UTF-8")
            return None
        except IsADirectoryError:
            self.c.error(span, f"the list file '{rel}' {_why_not_a_file(path)}")
            return None
        except OSError as exc:
            self.c.error(span, f"the list file '{rel}' cannot be read: {exc.strerror or exc}")
            return None
        self.task_count += len(values)
        return values

    def plan_job(self, job: n.Job) -> None:
        jname = job.name.value
        self.job_name = jname
        scope = Scope(self.pipeline, job, self.params, self.table)
        values = self._guarded(lambda: self.task_values(job, scope), None)
        machine = f"stage:{jname}"

        # Job Prephase: shared files by base name in the job folder
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
                             f"the shared file '{rel}' {_why_not_a_file(self.abspath(rel))}")
            self.read(rel, jname, None, s.path.span, s)
            shared_files.append([rel, base])
        if values is None:
            return

        labels = [
            _attr(v.file, "stem") if v.file is not None else format_value(v.value) for v in values
        ]
        ids = ["0"] if job.source is None else task_ids(labels)
        if job.var is not None and job.var.value not in ("task", "job", "pipeline") and (
            ids[0] == safe_id(labels[0])
        ):
            # the loop values differ (ignoring case; else the ids have their index in front):
            # the file's stem or the value tells the tasks apart
            var = job.var.value
            if isinstance(job.source, (n.GlobSource, n.UpstreamSource)):
                self._clash_hint[jname] = f"{{{var}.stem}}"
            elif not any("/" in label for label in labels):
                self._clash_hint[jname] = f"{{{var}}}"
        retries = 0
        if job.retries:
            rv = job.retries[0].value
            retries = rv.value if isinstance(rv, n.Literal) else self.params.get(rv.parts[0], 0)
            if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
                self.c.error(job.retries[0].span, "retries takes a whole number, 0 or more")
                retries = 0

        # compile once per job
        if job.outputs:
            folder_t = self._guarded(
                lambda: self.compile_template(job.outputs[0].folder, scope, CTX_OUTPUT), None)
            if folder_t is None:
                return
            flat = job.outputs[0].flat
            if isinstance(folder_t, str):
                self.check_folder(folder_t, job.outputs[0])
        else:
            folder_t = f"results/{jname}"
            flat = False
        steps: list[_Step] = []
        self._compiled_outs = set()
        for i, step in enumerate(job.steps):
            sname = step.name.value
            outs = []
            for o in step.outs:
                text = self._guarded(
                    lambda o=o, i=i: self.compile_template(o.path, scope, CTX_OUT, i), _BROKEN
                )
                if text is not _BROKEN:
                    outs.append((o, o.name.value, text, (sname, o.name.value), o.temp))
                    self._compiled_outs.add((sname, o.name.value))
            inputs, in_files = self._guarded(
                lambda step=step, i=i: self.compile_ins(step, scope, i), ([], [])
            )
            action = self._guarded(
                lambda step=step, i=i: self.compile_action(step.action, scope, i), _no_action
            )
            steps.append(_Step(step, sname, outs, action, inputs, in_files))
        for step in job.steps:  # a call's module in the pipeline's folder is read too
            if isinstance(step.action, n.Call):
                module = _module_file(self.root, step.action.module)
                if module is not None:
                    self.read(module, jname, None, step.action.span, step.action,
                              what="the Python module of its call")
        # where each step's outputs go, when the folder is the same for every task
        prefixes: list[str] | None = None
        if isinstance(folder_t, str):
            folder = self.plan_path(folder_t or ".")
            prefixes = [_prefix(folder if flat else self.plan_path(posixpath.join(folder, s.name)))
                        for s in steps]

        g = self.graph
        node, succ, pred = g._node, g._succ, g._pred
        _add_node(g, machine, {"kind": "stage", "scope": "machine", "job": jname, "task": None,
                               "affinity": None, "files": shared_files})
        published: dict[tuple[str, str], list[str]] = {
            o[3]: [] for cs in steps for o in cs.outs if not o[4]
        }
        for cs in steps:  # each out with the list its destinations go to (None if temp)
            cs.outs = [(*o, published.get(o[3])) for o in cs.outs]  # type: ignore[misc]
        destinations, readers = self.destinations, self.readers
        var_span = job.var.span if job.var else None
        stage_var = any(b.kind == "var" and b.attr is None for b in self._file_bindings)
        # a glob's matches are the job's inputs, staged or not: no copy-back may overwrite them
        read_var = isinstance(job.source, n.GlobSource)

        # gathered files: the same for every task of the job
        gathers = sorted(
            {(b.job, b.step, b.name) for b in self._file_bindings if b.kind == "gather"}
        )
        up_job = job.source.ref.parts[0] if isinstance(job.source, n.UpstreamSource) else None
        gather_files: list[list[str]] = []
        gather_locals: dict[str, str] = {}
        gather_edges: list[str] = []
        for gj, gs, go in gathers:
            up_tasks, up_dests = self.published(gj, gs, go)
            for utid, dest in zip(up_tasks, up_dests, strict=True):
                local = f"{gj}/{utid}/{posixpath.basename(dest)}"
                if local in gather_locals:
                    if gather_locals[local] != dest:
                        self.c.error(
                            job.name.span,
                            f"two gathered files would have the same local name '{local}' "
                            f"('{gather_locals[local]}' and '{dest}'); give the outputs of "
                            f"job '{gj}' different file names",
                        )
                    continue
                gather_locals[local] = dest
                gather_files.append([dest, local])
            gather_edges.extend(f"copyback:{gj}/{utid}" for utid in up_tasks)
        gather_edges = list(dict.fromkeys(gather_edges))
        waits = set(gather_edges)  # the copy-backs every task of the job waits for
        upstream_cb: str | None = None

        for index, (value, tid) in enumerate(zip(values, ids, strict=True)):
            if value.file is not None:
                vtext = posixpath.basename(value.file)
                vpath = value.file
                stem = labels[index]
            else:
                vtext = vpath = labels[index]
                stem = _attr(vtext, "stem")
            t = _TaskCtx(jname, tid, value, {}, vtext, vpath, stem)
            if up_job is not None:
                upstream_cb = f"copyback:{up_job}/{value.upstream}"
            key = (jname, tid)
            stage_id = f"stage:{jname}/{tid}"
            stage_files: list[list[str]] = []
            local_src: dict[str, str] = {}  # this task's own staged files: local -> source
            if stage_var and value.file is not None:
                stage_files.append([value.file, vtext])
                local_src[vtext] = value.file
            if read_var:
                if value.file in destinations:
                    self.read(value.file, jname, tid, var_span, job.source, waits, upstream_cb)
                else:
                    readers.setdefault(value.file, (jname, tid, var_span))
            if gather_files:
                stage_files += gather_files

            if prefixes is None:
                text = _text_of(folder_t, t)
                if text[:1] == "~":
                    self.check_folder(text, job.outputs[0])
                folder = self.plan_path(text or ".")
                task_prefixes = [
                    _prefix(folder if flat else self.plan_path(posixpath.join(folder, s.name)))
                    for s in steps
                ]
            else:
                task_prefixes = prefixes
            produced: dict[str, tuple[str, str]] = {}  # local -> (step, out)
            copy_files: list[list[str]] = []
            execs: list[tuple[str, dict]] = []
            for k, cs in enumerate(steps):
                sname = cs.name
                out_locals: list[str] = []
                temps: list[str] = []
                prefix = task_prefixes[k]
                for o, oname, render, okey, temp, dests in cs.outs:
                    text = render if render.__class__ is str else render(t)
                    if text and "/" not in text and text != "." and text != "..":
                        local = text  # one file name: already normal
                    else:
                        local = self.out_local(text, o, t)
                    if local in produced:
                        self.error(
                            o.path.span,
                            f"in task '{tid}' outputs '{'.'.join(produced[local])}' and "
                            f"'{sname}.{oname}' "
                            f"are both the file '{local}', so one would overwrite the other; "
                            "give them different names",
                            o,
                        )
                    produced[local] = okey
                    t.outs[okey] = local
                    out_locals.append(local)
                    if temp:
                        temps.append(local)
                        continue
                    dest = prefix + local
                    if prefix[:1] == "/":  # absolute: the file may still lie inside the root
                        dest = self.plan_path(dest)
                    if dest in destinations or dest in readers:
                        self.claim(dest, jname, tid, o, sname)
                    else:
                        destinations[dest] = (jname, tid, o, sname)
                    copy_files.append([local, dest])
                    dests.append(dest)
                in_locals: list[str] = []
                for render, item in cs.in_files:
                    rel = self.plan_path(_text_of(render, t))
                    local = posixpath.basename(rel)
                    in_locals.append(local)
                    if not os.path.isfile(self.abspath(rel)):
                        self.c.error(item.span, f"the input file '{rel}' (task '{tid}') "
                                     f"{_why_not_a_file(self.abspath(rel))}")
                    seen = local_src.get(local)
                    if seen is None:
                        local_src[local] = rel
                        stage_files.append([rel, local])
                        self.read(rel, jname, tid, item.span, item, waits, upstream_cb)
                    elif seen != rel:
                        self.c.error(
                            item.span,
                            f"in task '{tid}' two inputs have the file name '{local}' "
                            f"('{seen}' and '{rel}'); rename one of them",
                        )
                argv, call = cs.action(t)
                inputs = self.step_inputs(cs, t, in_locals)
                execs.append((
                    f"exec:{jname}/{tid}/{sname}",
                    {"kind": "exec", "job": jname, "task": tid, "step": sname, "affinity": key,
                     "index": k, "argv": argv, "call": call, "inputs": inputs,
                     "outputs": out_locals, "temp": temps},
                ))
            for local in produced:
                if local in local_src or local in gather_locals:
                    self.error(job.name.span, f"in task '{tid}' the input '{local}' would be "
                               "overwritten by an output of the same name; rename the output",
                               job)

            # the task's chain, written straight into the graph (see _add_node)
            _add_node(g, stage_id, {"kind": "stage", "scope": "task", "job": jname, "task": tid,
                                    "affinity": key, "index": index, "retries": retries,
                                    "files": stage_files})
            _add_edge(succ, pred, machine, stage_id)
            prev = stage_id
            for nid, attrs in execs:
                node[nid] = attrs
                succ[nid] = {}
                pred[nid] = {prev: {}}
                succ[prev][nid] = pred[nid][prev]
                prev = nid
            cb = f"copyback:{jname}/{tid}"
            _add_node(g, cb, {"kind": "copyback", "job": jname, "task": tid, "affinity": key,
                              "files": copy_files})
            _add_edge(succ, pred, prev, cb)
            if upstream_cb is not None:
                _add_edge(succ, pred, upstream_cb, stage_id)
            for u in gather_edges:
                _add_edge(succ, pred, u, stage_id)
        self.jobs[jname] = _JobPlan(ids, published)

    def out_local(self, text: str, o: n.Out, t: _TaskCtx) -> str:
        if text and "/" not in text and text != "." and text != "..":
            return text  # one file name: already normal
        norm = posixpath.normpath(text) if text else ""
        if not text or posixpath.isabs(text) or _leaves(norm) or norm == ".":
            self.error(
                o.path.span,
                f"output '{o.name.value}' of task '{t.task}' is '{text}', which is not a file "
                "name inside the task folder",
                o,
            )
            return f"_invalid_/{o.name.value}"
        return norm

    def check_folder(self, text: str, decl: n.Output) -> None:
        """An output folder must not start with ``~``: opf does not expand it (no shell is
        involved), so the results would go to a folder named ``~``."""
        if text[:1] == "~":
            self.error(
                decl.folder.span,
                f"the output folder '{text}' starts with '~', which opf does not expand: the "
                "results would go to a folder named '~' in the pipeline's folder; write the "
                "folder in full (e.g. \"/home/me/results\"), or relative to the pipeline file",
                decl, 1,
            )

    def check_destinations(self) -> None:
        """No copy-back may write the pipeline file, into the run's state folder or into opf's
        part of a scratch root (see :class:`Protected`), nor over an input reached through a
        link. Checked once per destination folder; a folder is compared as written and with
        its links resolved."""
        if not self.destinations:
            return
        by_folder: dict[str, list[str]] = {}
        for dest in self.destinations:
            folder, _, _ = dest.rpartition("/")
            group = by_folder.get(folder)
            if group is None:
                group = by_folder[folder] = []
            group.append(dest)
        forms_of = {folder: Protected.forms(os.path.join(self.root, folder))
                    for folder in by_folder}
        self.check_linked_inputs(by_folder, forms_of)
        if self.protected is None:
            return
        for folder, dests in by_folder.items():
            forms = forms_of[folder]
            why = self.protected.folder_refusal(forms, self.root)
            for dest in dests:
                reason = why or self.protected.file_refusal(forms, posixpath.basename(dest))
                if reason is None:
                    continue
                job, task, o, step = self.destinations[dest]
                self.error(
                    o.path.span,
                    f"output '{o.name.value}' of step '{step}' (job '{job}') would be copied back "
                    f"to '{dest}', {reason}; choose another output folder or file name",
                    ("protected", o), 1,
                )

    def check_linked_inputs(self, by_folder: dict[str, list[str]],
                            forms_of: dict[str, tuple[str, ...]]) -> None:
        """A destination that is an input under another name, through a link in a folder
        (``output "link"`` where ``link`` points at ``data``): the names were compared as
        written when they were claimed (:meth:`claim`, :meth:`read`); here, resolved."""
        reader_forms: dict[str, tuple[str, ...]] = {}
        for src in self.readers:
            folder = src.rpartition("/")[0]
            if folder not in reader_forms:
                reader_forms[folder] = Protected.forms(os.path.join(self.root, folder))
        if all(len(f) == 1 for f in (*forms_of.values(), *reader_forms.values())):
            return  # no links: the names as written said it all
        real_inputs = {
            reader_forms[src.rpartition("/")[0]][-1] + "/" + posixpath.basename(src): src
            for src in self.readers
        }
        for folder, dests in by_folder.items():
            real = forms_of[folder][-1]
            for dest in dests:
                src = real_inputs.get(real + "/" + posixpath.basename(dest))
                if src is None or src == dest:
                    continue
                job, task, o, _ = self.destinations[dest]
                rjob, rtask, _ = self.readers[src]
                what = self.reader_what.get(src)
                who = (f"job '{rjob}' as {what}" if what is not None
                       else f"task '{rtask}' of job '{rjob}'" if rtask is not None
                       else f"job '{rjob}' as a shared file")
                self.error(
                    o.path.span,
                    f"output '{o.name.value}' of task '{task}' (job '{job}') would be copied back "
                    f"to '{dest}', which is '{src}' through a link, a file read by {who}; a "
                    "copy-back must not overwrite an input: give the output another name or "
                    "output folder",
                    o,
                )

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
            cb = f"copyback:{claim[0]}/{claim[1]}"
            if what is not None:
                self.error(span, _overwritten(src, f"read by job '{job}' as {what}", claim), decl)
            elif cb != upstream and cb not in waits:
                self.error(span, _reads_output(src, job, task, claim), decl)
        if src not in self.readers:
            self.readers[src] = (job, task, span)
            if what is not None:
                self.reader_what[src] = what

    def claim(self, dest: str, job: str, task: str, o: n.Out, step: str) -> None:
        first = self.destinations.get(dest)
        if first is None:
            self.destinations[dest] = (job, task, o, step)
            reader = self.readers.get(dest)
            if reader is not None:
                rjob, rtask, _ = reader
                what = self.reader_what.get(dest)
                who = (f"task '{rtask}' of job '{rjob}'" if rtask is not None
                       else f"job '{rjob}' (a shared file)")
                reads = f"which job '{rjob}' reads as {what}" if what is not None else (
                    f"a file that {who} reads as an input")
                self.error(
                    o.path.span,
                    f"output '{o.name.value}' of task '{task}' (job '{job}') would be copied back "
                    f"to '{dest}', {reads}; a copy-back must not overwrite an input: give the "
                    "output another name or output folder",
                    o,
                )
            return
        fjob, ftask, fout, _ = first
        limit = _REPORT_LIMIT
        if fout is o:
            limit = 1  # every task of the job clashes alike: once says it all
            hint = self._clash_hint.get(job, "{task.id}")
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
        self.error(o.path.span, msg, o, limit)

    def compile_action(
        self, action: n.Run | n.Call | None, scope: Scope, i: int
    ) -> Callable[[_TaskCtx], tuple[list[str] | None, dict | None]]:
        """The step's command as a function of the task: ``(argv, None)`` or ``(None, call)``."""
        if action is None:  # lenient: a step without a command (the checker says so)
            return _no_action
        if isinstance(action, n.Call):
            fixed: dict[str, object] = {}
            varying: list[tuple[str, Callable[[_TaskCtx], object]]] = []
            for kw in action.kwargs:
                name = kw.name.value
                if isinstance(kw.value, n.Ref):
                    v = self.value(scope.resolve(kw.value, CTX_STEP, i))
                else:
                    v = kw.value.value
                    v = list(v) if isinstance(v, tuple) else v
                if callable(v):
                    varying.append((name, v))
                fixed[name] = v
            target = action.target

            def call(t: _TaskCtx) -> tuple[None, dict]:
                kwargs = dict(fixed)
                for k, getv in varying:
                    kwargs[k] = getv(t)
                return None, {"function": target, "kwargs": kwargs}

            return call
        assert isinstance(action, n.Run)
        if action.shell:
            return self.compile_script(action.words[1].template, scope, i)

        words: list[object] = []  # str | list[str] (one word per item) | function -> str
        for w in action.words:
            parts = w.template.parts
            if len(parts) == 1 and isinstance(parts[0], n.Ref):
                words.append(self.run_value(parts[0], scope, i, starts_word=True))
                continue
            pieces: list[Text] = []
            for k, p in enumerate(parts):
                if isinstance(p, str):
                    pieces.append(p)
                    continue
                v = self.run_value(p, scope, i, starts_word=k == 0)
                pieces.append(",".join(v) if isinstance(v, list) else v)
            words.append(_render(pieces))
        if not any(isinstance(w, list) for w in words):
            return lambda t: ([w if w.__class__ is str else w(t) for w in words], None)

        def run(t: _TaskCtx) -> tuple[list[str], None]:
            argv: list[str] = []
            for w in words:
                if w.__class__ is str:
                    argv.append(w)  # type: ignore[arg-type]
                elif w.__class__ is list:
                    argv.extend(w)  # type: ignore[arg-type]
                else:
                    argv.append(w(t))  # type: ignore[operator]
            return argv, None

        return run

    def run_value(
        self, ref: n.Ref, scope: Scope, i: int, *, starts_word: bool
    ) -> str | list[str] | Callable[[_TaskCtx], str]:
        """A placeholder of a run line as words: one (constant or a function of the task), or a
        list (a gather or a list param: one word per item).

        A file of the task folder (the loop's file, an output) that begins a word and whose
        name begins with '-' is written ``./-n.txt``, so that no program takes it for an
        option."""
        b = scope.resolve(ref, CTX_STEP, i)
        if b.kind == "gather" or (b.kind == "param" and b.attr is None):
            v = self.value(b)
            if isinstance(v, list):
                return [format_value(x) for x in v]
        piece = self.text(b)
        if not starts_word or b.attr is not None:
            return piece
        if b.kind == "out":
            return lambda t: _not_an_option(piece(t))  # type: ignore[operator]
        if b.kind == "var":
            return lambda t: (
                "./" + t.text if t.text[:1] == "-" and t.var.file is not None else t.text
            )
        return piece

    def compile_script(
        self, tpl: n.Template, scope: Scope, i: int
    ) -> Callable[[_TaskCtx], tuple[list[str], None]]:
        """``run sh "SCRIPT"`` as ``["/bin/sh", "-c", SCRIPT', "sh", VALUE...]``.

        No value is ever part of the script the shell parses: each placeholder becomes a quoted
        positional parameter, ``"$1"`` or ``"${12}"`` (a list one per item, ``"$3" "$4"``), and
        the values follow the script as the shell's arguments. A name used twice refers to one
        parameter. ``words.shell_places`` says where a placeholder may stand (and the checker
        refuses the rest), so that ``"$1"`` stays one word holding exactly the value."""
        script: list[str] = []
        args: list[Text] = []
        numbered: dict[tuple[str, bool], str] = {}  # one parameter for a name used twice
        places = iter(shell_places(tpl.parts))
        for p in tpl.parts:
            if isinstance(p, str):
                script.append(p)
                continue
            _why, starts_word = next(places)
            kind = scope.resolve(p, CTX_STEP, i).kind
            key = (p.dotted, starts_word and kind in ("var", "out"))  # see run_value
            refs = numbered.get(key)
            if refs is None:
                v = self.run_value(p, scope, i, starts_word=starts_word)
                items: list[Text] = v if isinstance(v, list) else [v]  # type: ignore[assignment]
                refs = " ".join(_positional(len(args) + k + 1) for k in range(len(items)))
                args.extend(items)
                numbered[key] = refs
            script.append(refs)
        head = ["/bin/sh", "-c", "".join(script), "sh"]
        if all(a.__class__ is str for a in args):
            argv = head + args  # type: ignore[operator]
            return lambda t: (list(argv), None)
        return lambda t: (
            head + [a if a.__class__ is str else a(t) for a in args], None  # type: ignore[misc]
        )

    def compile_ins(
        self, step: n.Step, scope: Scope, i: int
    ) -> tuple[list[object], list[tuple[Text, n.In]]]:
        """What a step reads: the file-valued names its ``in`` line and command mention (each
        a constant, a list or a function of the task), and its ``in`` files."""
        seen: dict[Binding, None] = {}  # in the order met
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
        inputs: list[object] = []
        file_source = scope.job.source is None or isinstance(
            scope.job.source, (n.GlobSource, n.UpstreamSource)
        )
        for r in refs:
            b = scope.resolve(r, CTX_STEP, i)
            if b.attr is not None or b.kind in ("special", "param") or b in seen:
                continue
            if b.kind == "var" and not file_source:
                continue
            if b.kind == "out" and b.step == step.name.value:
                continue
            seen[b] = None
            if b.kind == "var":
                inputs.append(_var_text)
            elif b.kind == "gather":
                inputs.append(self.gathered(b))
            else:
                inputs.append(self.text(b))
        files = [
            (self.compile_template(item.item, scope, CTX_STEP, i), item)
            for item in step.ins
            if isinstance(item.item, n.Template)
        ]
        self._file_bindings.extend(seen)  # only once the step's reads all compiled
        return inputs, files

    def step_inputs(self, cs: _Step, t: _TaskCtx, in_locals: list[str]) -> list[str]:
        out: list[str] = []
        for x in cs.inputs:
            if x.__class__ is str:
                out.append(x)  # type: ignore[arg-type]
            elif x.__class__ is list:
                out.extend(x)  # type: ignore[arg-type]
            else:
                out.append(x(t))  # type: ignore[operator]
        if not in_locals:
            return out  # distinct already: one entry per distinct file-valued name
        out += in_locals
        return list(dict.fromkeys(out))

    def run(self) -> nx.DiGraph:
        deps = job_dependencies(self.pipeline, self.params)
        if self.lenient and not nx.is_directed_acyclic_graph(deps):
            # jobs waiting for each other cannot be planned (the checker reports the cycle)
            deps = deps.subgraph(
                j for part in nx.strongly_connected_components(deps) if len(part) == 1
                for j in part
            ).copy()
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
        g.graph.update(
            pipeline=self.name,
            root=self.root,
            params={k: list(v) if isinstance(v, tuple) else v for k, v in self.params.items()},
            jobs=[j.name.value for j in self.pipeline.jobs],
        )
        if self.c.diagnostics:
            raise PlanError(self.c.diagnostics)
        return g


def _glob_files(pattern: str, root: str) -> list[str]:
    """The files (not folders) a glob pattern matches, as :func:`glob.glob` writes them
    (relative to ``root`` unless the pattern is absolute).

    A pattern whose wildcards are all in its last part (``data/*.xyz``) is matched from one
    folder listing, which knows which entries are files without a ``stat`` per match."""
    folder, _, last = pattern.rpartition("/")
    if globmod.has_magic(folder) or "**" in last or not last:
        found = globmod.glob(pattern, root_dir=None if os.path.isabs(pattern) else root,
                             recursive=True)
        return [f for f in found if os.path.isfile(os.path.join(root, f))]
    match = re.compile(fnmatch.translate(last)).match
    hidden = last.startswith(".")
    if not folder and pattern.startswith("/"):
        folder = "/"
    prefix = folder if folder.endswith("/") else folder + "/" if folder else ""
    try:
        with os.scandir(os.path.join(root, folder)) as entries:
            return [
                prefix + e.name for e in entries
                if match(e.name) and (hidden or e.name[0] != ".") and e.is_file()
            ]
    except OSError:
        return []


def _why_not_a_file(path: str) -> str:
    """What is at ``path``, which is not a file to read: the end of an error message."""
    if os.path.isdir(path):
        return "is a folder, not a file"
    if os.path.islink(path):
        return f"is a symbolic link to '{os.readlink(path)}', which does not exist"
    if os.path.exists(path):
        return "is not a regular file"
    return "does not exist"


def _positional(k: int) -> str:
    """A quoted reference to the shell's ``k``-th positional parameter."""
    return f'"${k}"' if k < 10 else f'"${{{k}}}"'


def _not_an_option(path: str) -> str:
    """A task-folder-relative path that no program takes for an option."""
    return "./" + path if path[:1] == "-" else path


def _prefix(folder: str) -> str:
    """What goes before a task-folder-relative name to give its destination."""
    if folder == ".":
        return ""
    return folder if folder.endswith("/") else folder + "/"


def _overwritten(src: str, who: str, claim: tuple[str, str, n.Out, str]) -> str:
    cjob, ctask, cout, _ = claim
    return (
        f"'{src}' is {who}, and output '{cout.name.value}' of task '{ctask}' (job '{cjob}') "
        "would be copied back over it; a copy-back must not overwrite a file the pipeline "
        "reads: give the output another name or output folder"
    )


def _reads_output(src: str, job: str, task: str | None,
                  claim: tuple[str, str, n.Out, str]) -> str:
    cjob, ctask, cout, cstep = claim
    who = f"task '{task}'" if task is not None else f"job '{job}' (a shared file)"
    if cjob == job:
        return (
            f"the input '{src}' of {who} is where output '{cout.name.value}' of task '{ctask}' "
            "of the same job is copied back; a job cannot read its own outputs: write them to "
            "another folder"
        )
    return (
        f"the input '{src}' of {who} is where output '{cout.name.value}' of task '{ctask}' (job "
        f"'{cjob}') is copied back, but nothing makes this task wait for it; name the output "
        f"as {{{cjob}.{cstep}.{cout.name.value}}} (in the command or an 'in' line) instead"
    )


# Nodes and edges are written straight into the graph's dicts (networkx's documented layout:
# ``_node`` holds each node's attribute dict, ``_succ``/``_pred`` its neighbours with the edge
# attribute dict shared by both). ``add_node(n, **attrs)`` and ``add_nodes_from`` copy every
# attribute dict twice; at 100,000 tasks that is a quarter of the time spent planning.


def _add_node(g: nx.DiGraph, nid: str, attrs: dict) -> None:
    g._node[nid] = attrs
    g._succ[nid] = {}
    g._pred[nid] = {}


def _add_edge(succ: dict, pred: dict, u: str, v: str) -> None:
    if v not in succ[u]:
        succ[u][v] = pred[v][u] = {}


def _no_action(t: _TaskCtx) -> tuple[list[str], None]:
    return [], None


def _module_file(root: str, module: str) -> str | None:
    """The file of a ``call``'s module in the pipeline's folder (``pkg/mod.py`` or
    ``pkg/mod/__init__.py``), relative to it; None if it lies elsewhere."""
    base = module.replace(".", "/")
    for candidate in (f"{base}.py", f"{base}/__init__.py"):
        if module and os.path.isfile(os.path.join(root, candidate)):
            return candidate
    return None


def default_scratch() -> str:
    """The scratch root an engine of this machine uses without ``--scratch``:
    ``$OPF_SCRATCH``, else the system temp folder (resolved)."""
    base = os.environ.get("OPF_SCRATCH") or tempfile.gettempdir()
    return os.path.realpath(os.path.expanduser(base))


@dataclass(frozen=True, slots=True)
class Protected:
    """The places no output may be copied back to, as absolute paths:

    * ``pipeline``: the pipeline file (``output "." flat`` with ``out o = "self.opf"`` would
      replace it);
    * ``state``: the run's state folder (journal, logs, trace, lock), and everything in it;
    * ``scratch``: scratch roots, of which the ``opf`` folder is refused — the job and task
      folders the engines create, fill and empty live there, so a result copied back into one
      would be deleted by a task's clean-up. The rest of a scratch root is not opf's (it is
      the system temp folder by default) and is left alone.

    ``opf check`` protects the defaults (:meth:`for_pipeline`); ``opf run`` the state folder
    and scratch root it is given, and then the scratch roots its engines report.
    """

    pipeline: str | None = None
    state: str | None = None
    scratch: tuple[str, ...] = ()

    @classmethod
    def for_pipeline(cls, path: str | os.PathLike[str], *, state: str | None = None,
                     scratch: Iterable[str | None] = (None,)) -> Protected:
        """The defaults for a pipeline file: ``.opf`` beside it unless ``state``; the scratch
        roots ``scratch`` (None: :func:`default_scratch`)."""
        path = os.path.abspath(os.fspath(path))
        roots = [default_scratch() if r is None else os.path.abspath(os.path.expanduser(r))
                 for r in scratch]
        return cls(path, os.path.abspath(state or os.path.join(os.path.dirname(path), ".opf")),
                   tuple(dict.fromkeys(roots)))

    def with_scratch(self, roots: Iterable[str]) -> Protected:
        return Protected(self.pipeline, self.state, tuple(dict.fromkeys([*self.scratch, *roots])))

    @staticmethod
    def forms(path: str) -> tuple[str, ...]:
        """An absolute path as written (normalised) and with its links resolved."""
        norm = os.path.normpath(path)
        real = os.path.realpath(norm)
        return (norm,) if real == norm else (norm, real)

    def _areas(self, root: str | None) -> list[tuple[tuple[str, ...], str]]:
        def shown(path: str) -> str:  # as the pipeline's destinations are shown
            if root is None:
                return path
            rel = os.path.relpath(path, root)
            return path if rel == ".." or rel.startswith("../") else rel

        areas = []
        if self.state:
            areas.append((self.forms(self.state),
                          f"inside the run's state folder '{shown(self.state)}' (its journal, "
                          "logs and trace)"))
        for base in self.scratch:
            work = os.path.join(base, "opf")
            areas.append((self.forms(work),
                          f"inside '{shown(work)}', where the engines keep their job and task "
                          "folders (a task's folder is emptied after its copy-back)"))
        return areas

    def folder_refusal(self, folder: tuple[str, ...], root: str | None = None) -> str | None:
        """Why nothing may be copied back into a folder (its :meth:`forms`), or None; paths
        inside ``root`` are named relative to it."""
        for area, why in self._areas(root):
            for f in folder:
                for a in area:
                    if f == a or f.startswith(a.rstrip("/") + "/"):
                        return why
        return None

    def file_refusal(self, folder: tuple[str, ...], name: str) -> str | None:
        """Why the file ``name`` in a folder (its :meth:`forms`) may not be written, or None."""
        if self.pipeline is None:
            return None
        for path in self.forms(self.pipeline):  # the file as named, and a link's target
            if name == os.path.basename(path):
                mine = self.forms(os.path.dirname(path))
                if any(f in mine for f in folder):
                    return "which is the pipeline file itself"
        return None


#: stands for a part of a step that could not be compiled (lenient planning)
_BROKEN = object()


def build_plan(
    pipeline: n.Pipeline,
    source: SourceFile | None,
    root: str,
    params: Mapping[str, object],
    pipeline_name: str,
    *,
    lenient: bool = False,
    protected: Protected | None = None,
) -> nx.DiGraph:
    """Lower a checked pipeline to its plan; raises :class:`PlanError` with every problem.

    ``lenient`` plans a pipeline that has check errors too, leaving out the parts that name
    unknown things, to find what else is wrong (its plan is never run). ``protected`` names
    the places no output may be copied back to (none if None)."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        return Planner(
            pipeline, source, os.path.abspath(root), params, pipeline_name, lenient, protected
        ).run()
    finally:
        if collecting:
            gc.enable()


def json_chunks(graph: nx.DiGraph, batch: int = 64) -> Iterator[str]:
    """The plan as networkx node-link JSON (``nx.node_link_data(graph, edges="edges")``,
    compact, UTF-8 text), in pieces: the same text as one ``json.dumps`` of it, without
    building the whole document in memory first.

    Nodes are encoded a few dozen at a time: small batches stay in the processor's cache,
    which makes the whole twice as fast as a few large ones."""
    encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
    directed = "true" if graph.is_directed() else "false"
    yield f'{{"directed":{directed},"multigraph":false,"graph":{encode(graph.graph)},"nodes":['
    nodes = list(graph.nodes)
    for k in range(0, len(nodes), batch):
        part = [{**graph._node[v], "id": v} for v in nodes[k : k + batch]]
        yield ("," if k else "") + encode(part)[1:-1]
    yield '],"edges":['
    quote = encode_basestring  # a JSON string literal, non-ASCII kept
    rows: list[str] = []
    first = True
    for u, nbrs in graph._succ.items():
        for v, d in nbrs.items():
            if d:
                rows.append(encode({**d, "source": u, "target": v}))
            else:
                rows.append(f'{{"source":{quote(u)},"target":{quote(v)}}}')
        if len(rows) >= 16 * batch:
            yield ("" if first else ",") + ",".join(rows)
            first, rows = False, []
    if rows:
        yield ("" if first else ",") + ",".join(rows)
    yield "]}\n"


def write_json(graph: nx.DiGraph, out: TextIO) -> None:
    """Write the plan as node-link JSON to a text stream (see :func:`json_chunks`)."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        for chunk in json_chunks(graph):
            out.write(chunk)
    finally:
        if collecting:
            gc.enable()


def to_json(graph: nx.DiGraph) -> str:
    """The plan as node-link JSON text, ending in a newline."""
    buf = io.StringIO()
    write_json(graph, buf)
    return buf.getvalue()
