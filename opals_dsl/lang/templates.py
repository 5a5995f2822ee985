"""Compiling a job's templates and commands, once per job, into text that is the same for every
task (a ``str``) or a small function of the task (:class:`TaskCtx`).

Whatever is the same for every task of a job (shared files, gathered lists, params, the
destination folder) is computed here once, so planning 100,000 tasks is a loop of string joins
and dict inserts. :class:`StepCompiler` is the part of the planner that does this; like
:class:`~opals_dsl.lang.expand.Expander` it shares the planner's state and is one of its base
classes.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import attrgetter

from ..plan import model
from . import nodes as n
from .expand import TaskValue, format_value, path_attr
from .scope import CTX_JOB, CTX_STEP, TILE_ATTRS, Binding, ResolveError, Scope
from .words import shell_places


@dataclass(slots=True)
class TaskCtx:
    job: str
    task: str
    var: TaskValue | None
    outs: dict[tuple[str, str], str]
    text: str  # the loop value as a word: a file's base name (its local copy), or the value
    path: str  # the loop value whose .stem etc. templates take: the file's path, or the value
    stem: str  # its .stem, wanted by most pipelines (in output names)


#: a piece of compiled text: the same for every task of a job (str), or a function of the task
Text = str | Callable[[TaskCtx], str]


_task_id = attrgetter("task")


_var_text = attrgetter("text")


_var_stem = attrgetter("stem")


class TaskList:
    """A list of words that differs per task (a tile's files): one word per item."""

    __slots__ = ("words",)

    def __init__(self, words: Callable[[TaskCtx], list[str]]) -> None:
        self.words = words

    def __call__(self, t: TaskCtx) -> list[str]:
        return self.words(t)


def flatten(parts: Sequence[object], t: TaskCtx) -> list[str]:
    """The words of ``parts`` for task ``t``: a string is one word, a list its words, a
    :class:`TaskList` the task's words, anything else (a compiled template) one word."""
    out: list[str] = []
    for x in parts:
        if x.__class__ is str:
            out.append(x)  # type: ignore[arg-type]
        elif x.__class__ is list:
            out.extend(x)  # type: ignore[arg-type]
        elif x.__class__ is TaskList:
            out.extend(x(t))  # type: ignore[operator]
        else:
            out.append(x(t))  # type: ignore[operator]
    return out


def tile_locals(t: TaskCtx) -> list[str]:
    """The local copies of a tile's files: their base names in the task folder."""
    return [posixpath.basename(f) for f in t.var.value.files]  # type: ignore[union-attr]


def _tile_value(attr: str) -> Callable[[TaskCtx], object]:
    return lambda t: getattr(t.var.value, attr)  # type: ignore[union-attr]


def render_pieces(pieces: list[Text]) -> Text:
    """Join compiled pieces into one piece (constant when every piece is)."""
    if all(isinstance(p, str) for p in pieces):
        return "".join(pieces)  # type: ignore[arg-type]
    if len(pieces) == 1:
        return pieces[0]
    if len(pieces) == 2 and isinstance(pieces[1], str):
        first, rest = pieces[0], pieces[1]
        return lambda t: first(t) + rest  # type: ignore[operator]
    return lambda t: "".join([p if p.__class__ is str else p(t) for p in pieces])


def text_of(piece: Text, t: TaskCtx) -> str:
    return piece if piece.__class__ is str else piece(t)  # type: ignore[operator,return-value]


@dataclass(slots=True)
class CompiledStep:
    """One step compiled for every task of its job."""

    step: n.Step
    name: str
    # out, name, text, (step, name), temp; plus, once expanding, its destination list
    outs: list[tuple]
    action: Callable[[TaskCtx], tuple[list[str] | None, dict | None]]
    inputs: list[object]  # str (constant) | list[str] (gather) | function of the task
    in_files: list[tuple[Text, n.In]]
    threads: int = 1
    timeout: float | None = None


def _positional(k: int) -> str:
    """A quoted reference to the shell's ``k``-th positional parameter."""
    return f'"${k}"' if k < 10 else f'"${{{k}}}"'


def _not_an_option(path: str) -> str:
    """A task-folder-relative path that no program takes for an option."""
    return "./" + path if path[:1] == "-" else path


def _numbered(pieces: list) -> tuple[str, list[Text]]:
    """A ``run sh`` script with each placeholder a quoted positional parameter, and the values
    of the parameters in order: ``pieces`` are the script's text and ``((name, starts a
    word), value)`` pairs, a list value one parameter per item. A name used twice refers to
    one parameter."""
    script: list[str] = []
    args: list[Text] = []
    numbered: dict[tuple[str, bool], str] = {}
    for p in pieces:
        if isinstance(p, str):
            script.append(p)
            continue
        key, v = p
        refs = numbered.get(key)
        if refs is None:
            items: list[Text] = v if isinstance(v, list) else [v]
            refs = " ".join(_positional(len(args) + k + 1) for k in range(len(items)))
            args.extend(items)
            numbered[key] = refs
        script.append(refs)
    return "".join(script), args


def no_action(t: TaskCtx) -> tuple[list[str], None]:
    return [], None


#: stands for a part of a step that could not be compiled (lenient planning)
BROKEN = object()


class StepCompiler:
    """The compiling steps of the planner; see the module docstring."""

    #: the thread count of the step being compiled (``{task.threads}``)
    step_threads: int = 1
    #: planning around unknown names, for the diagnostics only (see the planner)
    lenient: bool = False

    def job_template(self, tpl: n.Template, scope: Scope, job: str) -> str:
        empty = TaskCtx(job, "", None, {}, "", "", "")
        return text_of(self.compile_template(tpl, scope, CTX_JOB), empty)

    def compile_template(
        self, tpl: n.Template, scope: Scope, ctx: str, step: int | None = None
    ) -> Text:
        """A template as one piece of text: constant, or a function of the task."""
        pieces: list[Text] = []
        for p in tpl.parts:
            pieces.append(p if isinstance(p, str) else self.text(scope.resolve(p, ctx, step)))
        return render_pieces(pieces)

    def text(self, b: Binding) -> Text:
        """A binding as templates show it (files as task-local paths)."""
        if b.kind == "special":
            if b.name == "task.id":
                return _task_id
            if b.name == "task.threads":
                return str(self.step_threads)
            return self.job_name if b.name == "job.name" else self.name
        if b.kind == "param":
            value = format_value(self.params[b.name])
            return path_attr(value, b.attr) if b.attr else value
        if b.kind == "var":
            attr = b.attr
            if attr == "files":
                return lambda t: ",".join(tile_locals(t))
            if attr in TILE_ATTRS:
                value = _tile_value(attr)
                return lambda t: format_value(value(t))
            if attr == "stem":
                return _var_stem
            if attr:
                return lambda t: path_attr(t.path, attr)
            return _var_text
        if b.kind == "shared":
            base = self._shared_local.get(b.name)
            if base is None:  # lenient: its path names something unknown
                raise ResolveError(f"shared file '{b.name}' could not be planned")
            return path_attr(base, b.attr) if b.attr else "../" + base
        if b.kind == "out":
            key, attr = (b.step, b.name), b.attr
            if key not in self._compiled_outs:  # lenient: its template names something unknown
                raise ResolveError(f"output '{b.step}.{b.name}' could not be planned")
            if attr:
                return lambda t: path_attr(t.outs[key], attr)
            return lambda t: t.outs[key]
        if b.kind == "gather":
            return ",".join(self.gathered(b))
        raise AssertionError(b.kind)

    def value(self, b: Binding) -> object:
        """A binding as a value: lists (gathers, list params) as lists, params with their type;
        a function of the task where it differs per task."""
        if b.kind == "gather":
            return self.gathered(b)
        if b.kind == "special" and b.name == "task.threads":
            return self.step_threads
        if b.kind == "param" and not b.attr:
            value = self.params[b.name]
            return list(value) if isinstance(value, tuple) else value
        if b.kind == "var" and not b.attr:
            return lambda t: t.text if t.var.file is not None else t.var.value
        if b.kind == "var" and b.attr == "files":
            return tile_locals
        if b.kind == "var" and b.attr in TILE_ATTRS and b.attr != "id":
            return _tile_value(b.attr)
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
        # lenient: that job or output could not be planned, or the output's name is declared
        # twice in its step (the checker says so), so its tasks published it twice
        if up is None or dests is None or len(dests) != len(up.tasks):
            raise ResolveError(f"output '{job}.{step}.{out}' could not be planned")
        return up.tasks, dests

    def compile_action(
        self, action: n.Run | n.Call | None, scope: Scope, i: int
    ) -> Callable[[TaskCtx], tuple[list[str] | None, dict | None]]:
        """The step's command as a function of the task: ``(argv, None)`` or ``(None, call)``."""
        if action is None:  # lenient: a step without a command (the checker says so)
            return no_action
        if isinstance(action, n.Call):
            fixed: dict[str, object] = {}
            varying: list[tuple[str, Callable[[TaskCtx], object]]] = []
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

            def call(t: TaskCtx) -> tuple[None, dict]:
                kwargs = dict(fixed)
                for k, getv in varying:
                    kwargs[k] = getv(t)
                return None, model.call_attrs(target, kwargs)

            return call
        assert isinstance(action, n.Run)
        if action.shell:
            return self.compile_script(action.words[-1].template, scope, i,
                                       ["bash", "-c"] if action.shell == "bash" else
                                       ["/bin/sh", "-c"])

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
                if isinstance(v, TaskList):  # not alone in its word: the checker says so
                    v = self.text(scope.resolve(p, CTX_STEP, i))
                pieces.append(",".join(v) if isinstance(v, list) else v)
            words.append(render_pieces(pieces))
        if not any(isinstance(w, list | TaskList) for w in words):
            # a copy of the constant words with the varying ones filled in: twice as fast as
            # building the list word by word, and this runs for every step of every task
            fixed = [w if w.__class__ is str else "" for w in words]
            varying = [(k, w) for k, w in enumerate(words) if w.__class__ is not str]

            def run_words(t: TaskCtx) -> tuple[list[str], None]:
                argv = fixed.copy()
                for k, word in varying:
                    argv[k] = word(t)  # type: ignore[operator]
                return argv, None

            return run_words

        def run(t: TaskCtx) -> tuple[list[str], None]:
            return flatten(words, t), None

        return run

    def run_value(
        self, ref: n.Ref, scope: Scope, i: int, *, starts_word: bool
    ) -> str | list[str] | TaskList | Callable[[TaskCtx], str]:
        """A placeholder of a run line as words: one (constant or a function of the task), or a
        list (a gather or a list param: one word per item).

        A file of the task folder (the loop's file, an output) that begins a word and whose
        name begins with '-' is written ``./-n.txt``, so that no program takes it for an
        option."""
        b = scope.resolve(ref, CTX_STEP, i)
        if b.kind == "var" and b.attr == "files":
            return TaskList(lambda t: [_not_an_option(w) for w in tile_locals(t)])
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
        self, tpl: n.Template, scope: Scope, i: int, shell: list[str]
    ) -> Callable[[TaskCtx], tuple[list[str], None]]:
        """``run sh "SCRIPT"`` (and ``run sh -c "SCRIPT"``) as ``["/bin/sh", "-c", SCRIPT',
        "sh", VALUE...]``; ``run bash -c "SCRIPT"`` as ``["bash", "-c", SCRIPT', "bash",
        VALUE...]`` (``shell``: the first two words).

        No value is ever part of the script the shell parses: each placeholder becomes a quoted
        positional parameter, ``"$1"`` or ``"${12}"`` (a list one per item, ``"$3" "$4"``), and
        the values follow the script as the shell's arguments. A name used twice refers to one
        parameter. ``words.shell_places`` says where a placeholder may stand (and the checker
        refuses the rest), so that ``"$1"`` stays one word holding exactly the value."""
        name = posixpath.basename(shell[0])  # the script's $0
        pieces: list[str | tuple[tuple[str, bool], object]] = []
        places = iter(shell_places(tpl.parts))
        for p in tpl.parts:
            if isinstance(p, str):
                pieces.append(p)
                continue
            _why, starts_word = next(places)
            kind = scope.resolve(p, CTX_STEP, i).kind
            key = (p.dotted, starts_word and kind in ("var", "out"))  # see run_value
            pieces.append((key, self.run_value(p, scope, i, starts_word=starts_word)))
        if any(not isinstance(p, str) and isinstance(p[1], TaskList) for p in pieces):
            # a tile's files: as many parameters as the task has files
            def per_task(t: TaskCtx) -> tuple[list[str], None]:
                concrete = [p if isinstance(p, str) else (p[0], p[1](t) if isinstance(
                    p[1], TaskList) else p[1]) for p in pieces]
                script, args = _numbered(concrete)
                return [*shell, script, name] + [text_of(a, t) for a in args], None

            return per_task
        script_text, args = _numbered(pieces)
        head = [*shell, script_text, name]
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
            try:
                b = scope.resolve(r, CTX_STEP, i)
            except ResolveError:
                if not self.lenient:
                    raise
                continue  # reported by the checker; the step's other reads are still checked
            if b.kind == "var" and b.attr == "files" and b not in seen:
                pass  # a tile's files: staged like the loop's file
            elif b.attr is not None or b.kind in ("special", "param") or b in seen:
                continue
            if b.kind == "var" and not file_source and b.attr != "files":
                continue
            if b.kind == "out" and b.step == step.name.value:
                continue
            seen[b] = None
            if b.kind == "var" and b.attr == "files":
                inputs.append(TaskList(tile_locals))
            elif b.kind == "var":
                inputs.append(_var_text)
            elif b.kind == "gather":
                inputs.append(self.gathered(b))
            else:
                inputs.append(self.text(b))
        files = []
        for item in step.ins:
            if isinstance(item.item, n.Template):
                try:
                    files.append((self.compile_template(item.item, scope, CTX_STEP, i), item))
                except ResolveError:
                    if not self.lenient:
                        raise
        self._file_bindings.extend(seen)  # only once the step's reads all compiled
        return inputs, files

    def step_inputs(self, cs: CompiledStep, t: TaskCtx, in_locals: list[str]) -> list[str]:
        out = flatten(cs.inputs, t)
        if not in_locals:
            return out  # distinct already: one entry per distinct file-valued name
        out += in_locals
        return list(dict.fromkeys(out))
