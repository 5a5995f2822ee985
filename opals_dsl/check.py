"""Checking: syntax tree → every mistake that can be found without touching files.

Each pass is a small function over the tree that appends :class:`Diagnostic` records; all passes
run, so one ``opf check`` reports every mistake at once. The passes:

* :func:`check_params` — duplicate params, ``--param`` overrides (unknown names, bad values);
* :func:`check_declarations` — duplicate jobs, steps, outputs, shared names; reserved names;
  names that would mean two things (a step called like the loop variable, ...);
* :func:`check_references` — every ``{name}`` resolves where it is used, a step names no later
  step and not itself, another job's ``temp`` output is never used, list values stand alone;
* :func:`check_job_cycles` — jobs that wait for each other.

Name resolution lives in :class:`Scope`; the planner resolves with the same code, so what the
checker accepts is exactly what the planner understands.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import networkx as nx

from . import nodes as n
from .errors import Diagnostic
from .parse import RESERVED
from .source import SourceFile

FILE_ATTRS = ("name", "stem", "suffix", "parent")
SPECIALS = {"task": ("id",), "job": ("name",), "pipeline": ("name",)}


@dataclass(frozen=True, slots=True)
class Binding:
    """What a reference means.

    kind: ``var`` | ``param`` | ``shared`` | ``out`` (``step``/``name`` set; own or earlier
    step) | ``gather`` (``job``/``step``/``name``) | ``special`` (``name`` is ``task.id``,
    ``job.name`` or ``pipeline.name``). ``attr`` is a file attribute (``stem`` ...) or None.
    """

    kind: str
    name: str | None = None
    step: str | None = None
    job: str | None = None
    attr: str | None = None


# where a template stands decides which names it may use
CTX_JOB = "job"  # globs, lines(), shared paths: params, pipeline.name, job.name
CTX_OUTPUT = "output"  # output folders: + loop variable, task.id
CTX_OUT = "out"  # out templates: + loop variable, task.id
CTX_STEP = "step"  # run, call, in: everything


class ResolveError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Scope:
    """Names visible in one job: resolves a reference in a context to a :class:`Binding`."""

    def __init__(self, pipeline: n.Pipeline, job: n.Job, params: Mapping[str, object]) -> None:
        self.pipeline = pipeline
        self.job = job
        self.params = params
        self.var = job.var.value if job.var else None
        self.shared = {s.name.value: s for s in job.shared}
        self.steps = {s.name.value: i for i, s in enumerate(job.steps)}
        self.step_outs = [{o.name.value: o for o in s.outs} for s in job.steps]
        self.jobs = {j.name.value: j for j in pipeline.jobs}

    def _candidates(self, ctx: str, step: int | None) -> list[str]:
        names = list(self.params) + ["pipeline.name", "job.name"]
        if ctx != CTX_JOB:
            names += ["task.id"]
            if self.var:
                names += [self.var] + [f"{self.var}.{a}" for a in FILE_ATTRS]
        if ctx == CTX_STEP and step is not None:
            names += list(self.shared)
            names += list(self.step_outs[step])
            for i in range(step):
                s = self.job.steps[i].name.value
                names += [f"{s}.{o}" for o in self.step_outs[i]]
            for j in self.pipeline.jobs:
                if j is self.job:
                    continue
                for s in j.steps:
                    names += [f"{j.name.value}.{s.name.value}.{o.name.value}" for o in s.outs]
        return names

    def unknown(self, ref: n.Ref, ctx: str, step: int | None, what: str) -> ResolveError:
        dotted = ref.dotted
        close = difflib.get_close_matches(dotted, self._candidates(ctx, step), n=1, cutoff=0.7)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return ResolveError(f"unknown name '{dotted}'{what}{hint}")

    def resolve(self, ref: n.Ref, ctx: str, step: int | None = None) -> Binding:
        """The meaning of ``ref`` in context ``ctx`` (in step number ``step``)."""
        parts = ref.parts
        head = parts[0]
        allow_var = ctx != CTX_JOB
        in_step = ctx == CTX_STEP
        where = {
            CTX_JOB: " (here only params, pipeline.name and job.name may be used)",
            CTX_OUTPUT: "",
            CTX_OUT: "",
            CTX_STEP: "",
        }[ctx]

        if head in SPECIALS:
            if len(parts) == 2 and parts[1] in SPECIALS[head]:
                if head == "task" and not allow_var:
                    raise ResolveError(
                        "task.id cannot be used here: this is decided before there are tasks"
                    )
                return Binding("special", name=ref.dotted)
            raise ResolveError(
                f"'{ref.dotted}' is not known; '{head}' offers only "
                + " and ".join(f"'{head}.{a}'" for a in SPECIALS[head])
            )

        # own outputs of this step, bare
        if in_step and step is not None and head in self.step_outs[step]:
            if len(parts) == 1:
                return Binding("out", name=head, step=self.job.steps[step].name.value)
            if len(parts) == 2 and parts[1] in FILE_ATTRS:
                return Binding(
                    "out", name=head, step=self.job.steps[step].name.value, attr=parts[1]
                )

        if self.var is not None and head == self.var and allow_var:
            if len(parts) == 1:
                return Binding("var")
            if len(parts) == 2 and parts[1] in FILE_ATTRS:
                return Binding("var", attr=parts[1])
            raise self._bad_attr(ref)

        if head in self.params:
            if len(parts) == 1:
                return Binding("param", name=head)
            if len(parts) == 2 and parts[1] in FILE_ATTRS:
                return Binding("param", name=head, attr=parts[1])
            raise self._bad_attr(ref)

        if in_step and head in self.shared:
            if len(parts) == 1:
                return Binding("shared", name=head)
            if len(parts) == 2 and parts[1] in FILE_ATTRS:
                return Binding("shared", name=head, attr=parts[1])
            raise self._bad_attr(ref)

        if in_step and head in self.steps and len(parts) == 2:
            index = self.steps[head]
            outs = self.step_outs[index]
            if parts[1] not in outs:
                raise self.unknown(ref, ctx, step, f": step '{head}' has no output '{parts[1]}'")
            if step is not None and index == step:
                raise ResolveError(
                    f"step '{head}' cannot name its own output as '{ref.dotted}'; "
                    f"write '{{{parts[1]}}}'"
                )
            if step is not None and index > step:
                raise ResolveError(
                    f"'{ref.dotted}' is an output of a later step; a step can only use "
                    f"outputs of the steps written before it"
                )
            return Binding("out", name=parts[1], step=head)

        if in_step and head in self.jobs and len(parts) == 3:
            return self.resolve_upstream(ref, ctx, step)

        if not allow_var and (head == self.var or head in self.shared):
            raise ResolveError(f"'{ref.dotted}' cannot be used here{where}")
        if ctx in (CTX_OUT, CTX_OUTPUT) and (
            head in self.shared or head in self.steps or head in self.jobs
        ):
            raise ResolveError(
                f"'{ref.dotted}' cannot be used in an output name or folder; these may use "
                "params, the loop variable, task.id, job.name and pipeline.name"
            )
        raise self.unknown(ref, ctx, step, where)

    def resolve_upstream(
        self, ref: n.Ref, ctx: str = CTX_STEP, step: int | None = None
    ) -> Binding:
        """``JOB.STEP.OUT`` of another job: a job's source, or a gather in a step."""
        parts = ref.parts
        head = parts[0]
        if len(parts) != 3 or head not in self.jobs:
            raise self.unknown(
                ref, ctx, step,
                ": a job's source name must be another job's output, written JOB.STEP.OUT",
            )
        if head == self.job.name.value:
            raise ResolveError(
                f"'{ref.dotted}' names this job's own output as another job's; "
                f"within a job write '{{{parts[1]}.{parts[2]}}}'"
            )
        other = self.jobs[head]
        ostep = next((s for s in other.steps if s.name.value == parts[1]), None)
        if ostep is None:
            raise self.unknown(ref, ctx, step, f": job '{head}' has no step '{parts[1]}'")
        out = next((o for o in ostep.outs if o.name.value == parts[2]), None)
        if out is None:
            raise self.unknown(
                ref, ctx, step, f": step '{head}.{parts[1]}' has no output '{parts[2]}'"
            )
        if out.temp:
            raise ResolveError(
                f"'{ref.dotted}' is a temp output of job '{head}': it is never copied "
                "back, so no other job can use it; drop 'temp' from its declaration"
            )
        return Binding("gather", job=head, step=parts[1], name=parts[2])

    def _bad_attr(self, ref: n.Ref) -> ResolveError:
        return ResolveError(
            f"'{ref.dotted}': a value offers only the attributes "
            + ", ".join(f".{a}" for a in FILE_ATTRS)
        )


class Checker:
    """Collects diagnostics for one pipeline file."""

    def __init__(self, source: SourceFile | None) -> None:
        self.source = source
        self.diagnostics: list[Diagnostic] = []

    def error(self, span, message: str) -> None:
        self.diagnostics.append(Diagnostic(span, message, self.source))


def param_values(
    pipeline: n.Pipeline, overrides: Mapping[str, str], checker: Checker
) -> dict[str, object]:
    """Param values after ``--param`` overrides, converted to each default's type."""
    values: dict[str, object] = {}
    for p in pipeline.params:
        values.setdefault(p.name.value, p.value.value)
    for name, text in overrides.items():
        if name not in values:
            close = difflib.get_close_matches(name, list(values), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            known = ", ".join(values) or "none"
            checker.error(
                None,
                f"--param {name}={text}: this pipeline has no parameter '{name}'{hint} "
                f"(its parameters: {known})",
            )
            continue
        try:
            values[name] = convert_param(text, values[name])
        except ValueError as exc:
            checker.error(None, f"--param {name}={text}: {exc}")
    return values


def convert_param(text: str, default: object) -> object:
    """Convert a ``--param`` value to the type of the parameter's default."""
    if isinstance(default, bool):
        if text in ("true", "false"):
            return text == "true"
        raise ValueError("expected true or false, as the parameter's default is a boolean")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise ValueError("expected a whole number, as the parameter's default is one") from None
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise ValueError("expected a number, as the parameter's default is one") from None
    if isinstance(default, tuple):
        items = [t.strip() for t in text.split(",")] if text.strip() else []
        kinds = {type(v) for v in default}
        if len(kinds) == 1 and kinds != {tuple}:
            sample = default[0]
            return tuple(convert_param(t, sample) for t in items)
        return tuple(items)
    return text


def check_params(pipeline: n.Pipeline, checker: Checker) -> None:
    seen: dict[str, n.Param] = {}
    for p in pipeline.params:
        _declare(checker, seen, p.name, p, "parameter")
        if p.name.value in RESERVED:
            checker.error(p.name.span, f"'{p.name.value}' is reserved and cannot be declared")


def _declare(checker: Checker, seen: dict, name: n.Name, node, what: str) -> None:
    first = seen.get(name.value)
    if first is not None:
        line = first.name.span.line if first.name.span else "?"
        checker.error(
            name.span,
            f"duplicate {what} '{name.value}': it is already declared on line {line}; "
            "give it another name",
        )
    else:
        seen[name.value] = node


def check_declarations(pipeline: n.Pipeline, params: Mapping[str, object], c: Checker) -> None:
    jobs: dict[str, n.Job] = {}
    for job in pipeline.jobs:
        _declare(c, jobs, job.name, job, "job")
        shared: dict[str, n.Shared] = {}
        for s in job.shared:
            _declare(c, shared, s.name, s, "shared name")
        for what, items in (("output", job.outputs), ("retries", job.retries)):
            for extra in items[1:]:
                c.error(extra.span, f"a job has at most one '{what}' line; remove this one")
        steps: dict[str, n.Step] = {}
        if not job.steps:
            c.error(job.name.span, f"job '{job.name.value}' has no step; add 'step NAME {{ ... }}'")
        singles = {**{p: "a parameter" for p in params}, **{s: "a shared file" for s in shared}}
        if job.var is not None:
            var = job.var.value
            if var in RESERVED:
                c.error(job.var.span, f"'{var}' is reserved and cannot be declared")
            elif var in params:
                c.error(
                    job.var.span,
                    f"the loop variable '{var}' has the name of a parameter; rename one of them",
                )
            elif var in shared:
                c.error(
                    shared[var].name.span,
                    f"shared name '{var}' is the name of the job's loop variable; rename one",
                )
            singles[var] = "the loop variable"
        for s in job.shared:
            if s.name.value in params:
                c.error(
                    s.name.span,
                    f"shared name '{s.name.value}' is the name of a parameter; rename one of them",
                )
            if s.name.value in RESERVED:
                c.error(s.name.span, f"'{s.name.value}' is reserved and cannot be declared")
        for step in job.steps:
            _declare(c, steps, step.name, step, f"step in job '{job.name.value}'")
            if step.name.value in RESERVED:
                c.error(step.name.span, f"'{step.name.value}' is reserved and cannot be declared")
            elif step.name.value in singles:
                c.error(
                    step.name.span,
                    f"step '{step.name.value}' has the name of {singles[step.name.value]}, so "
                    f"'{{{step.name.value}.…}}' would mean two things; rename one of them",
                )
            outs: dict[str, n.Out] = {}
            for o in step.outs:
                _declare(c, outs, o.name, o, f"output in step '{step.name.value}'")
                if o.name.value in RESERVED:
                    c.error(o.name.span, f"'{o.name.value}' is reserved and cannot be declared")
                elif o.name.value in singles:
                    c.error(
                        o.name.span,
                        f"output '{o.name.value}' has the name of {singles[o.name.value]}, so "
                        f"'{{{o.name.value}}}' would mean two things; rename one of them",
                    )
            if len(step.actions) == 0:
                c.error(
                    step.name.span,
                    f"step '{step.name.value}' has no command; "
                    "add one 'run ...' or 'call ...' line",
                )
            for extra in step.actions[1:]:
                c.error(
                    extra.span,
                    "a step runs exactly one command; split this into another step",
                )


def _templates_of_step(step: n.Step) -> Iterable[tuple[n.Ref, bool]]:
    """(ref, alone-in-its-word) for every reference a step's command and ins make."""
    for item in step.ins:
        if isinstance(item.item, n.Ref):
            yield item.item, True
        else:
            for r in item.item.refs:
                yield r, False
    for action in step.actions:
        if isinstance(action, n.Run):
            for w in action.words:
                alone = len(w.template.parts) == 1
                for r in w.template.refs:
                    yield r, alone
        else:
            for kw in action.kwargs:
                if isinstance(kw.value, n.Ref):
                    yield kw.value, True


def is_list_binding(b: Binding, params: Mapping[str, object]) -> bool:
    if b.kind == "gather":
        return True
    return b.kind == "param" and b.attr is None and isinstance(params.get(b.name), tuple)


def check_references(pipeline: n.Pipeline, params: Mapping[str, object], c: Checker) -> None:
    for job in pipeline.jobs:
        scope = Scope(pipeline, job, params)

        def resolve(
            ref: n.Ref, ctx: str, step: int | None = None, scope: Scope = scope
        ) -> Binding | None:
            try:
                return scope.resolve(ref, ctx, step)
            except ResolveError as exc:
                c.error(ref.span, exc.message)
                return None

        src = job.source
        if isinstance(src, (n.GlobSource, n.LinesSource)):
            tpl = src.pattern if isinstance(src, n.GlobSource) else src.path
            for r in tpl.refs:
                resolve(r, CTX_JOB)
        elif isinstance(src, n.RangeSource):
            if not 1 <= len(src.args) <= 2:
                c.error(src.span, "range takes one or two whole numbers: range(N) or range(A, B)")
            for a in src.args:
                value = a.value if isinstance(a, n.Literal) else None
                if isinstance(a, n.Ref):
                    b = resolve(a, CTX_JOB)
                    value = params.get(b.name) if b and b.kind == "param" and not b.attr else 0
                    if b and b.kind != "param":
                        c.error(a.span, "range takes whole numbers or parameters holding them")
                if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                    c.error(a.span, f"range takes whole numbers, not {value!r}")
        elif isinstance(src, n.UpstreamSource):
            try:
                scope.resolve_upstream(src.ref)
            except ResolveError as exc:
                c.error(src.ref.span, exc.message)
        for s in job.shared:
            for r in s.path.refs:
                resolve(r, CTX_JOB)
        for o in job.outputs:
            for r in o.folder.refs:
                resolve(r, CTX_OUTPUT)
        for i, step in enumerate(job.steps):
            for o in step.outs:
                for r in o.path.refs:
                    resolve(r, CTX_OUT)
                _check_out_path(o, c)
            for ref, alone in _templates_of_step(step):
                b = resolve(ref, CTX_STEP, i)
                if b is not None and not alone and is_list_binding(b, params):
                    c.error(
                        ref.span,
                        f"'{{{ref.dotted}}}' is a list of files and must be a word of its own "
                        "(it becomes one word per file)",
                    )
            for action in step.actions:
                if isinstance(action, n.Run):
                    if not action.words:
                        c.error(action.span, "this run line has no command")
                    for r in action.shell_quoted:
                        c.error(
                            r.span,
                            f"'{{{r.dotted}}}' stands inside shell quotes: opf quotes every "
                            "substituted value for the shell itself, so remove the quotes "
                            "around it",
                        )
                    if action.shell and len(action.words) == 2:
                        for r in action.words[1].template.refs:
                            resolve(r, CTX_STEP, i)  # already checked; kept for clarity
            for item in step.ins:
                if isinstance(item.item, n.Ref):
                    b = resolve(item.item, CTX_STEP, i)
                    if b is not None and b.attr is not None:
                        c.error(item.span, f"'in {item.item.dotted}' names a text, not a file")


def _check_out_path(o: n.Out, c: Checker) -> None:
    text = "".join(p for p in o.path.parts if isinstance(p, str))
    first = o.path.parts[0] if o.path.parts else ""
    if not o.path.parts or (o.path.is_constant and not text.strip()):
        c.error(o.path.span, f"output '{o.name.value}' has an empty file name")
        return
    if isinstance(first, str) and (first.startswith("/") or first.startswith("\\")):
        c.error(
            o.path.span,
            f"output '{o.name.value}' is an absolute path; an output is a file name relative to "
            "the task folder (its destination is set by the job's 'output' line)",
        )
    segments = text.replace("\\", "/").split("/")
    if ".." in segments:
        c.error(
            o.path.span,
            f"output '{o.name.value}' leaves the task folder with '..'; an output is a file name "
            "inside the task folder",
        )


def job_dependencies(pipeline: n.Pipeline, params: Mapping[str, object]) -> nx.DiGraph:
    """Job-level graph: an edge ``up -> down`` when ``down`` uses an output of ``up``;
    edge attribute ``ref`` is the first reference that makes it."""
    graph = nx.DiGraph()
    graph.add_nodes_from(j.name.value for j in pipeline.jobs)
    for job in pipeline.jobs:
        scope = Scope(pipeline, job, params)
        refs: list[tuple[n.Ref, int | None]] = []
        if isinstance(job.source, n.UpstreamSource):
            refs.append((job.source.ref, None))
        for i, step in enumerate(job.steps):
            refs.extend((r, i) for r, _ in _templates_of_step(step))
        for ref, i in refs:
            try:
                b = scope.resolve(ref, CTX_STEP, i) if i is not None else (
                    scope.resolve_upstream(ref)
                )
            except ResolveError:
                continue
            if b.kind == "gather" and not graph.has_edge(b.job, job.name.value):
                graph.add_edge(b.job, job.name.value, ref=ref)
    return graph


def check_job_cycles(pipeline: n.Pipeline, params: Mapping[str, object], c: Checker) -> None:
    graph = job_dependencies(pipeline, params)
    for cycle in sorted(nx.simple_cycles(graph), key=lambda cy: sorted(cy)):
        # report at the reference that closes the cycle, in the job written last
        order = {j.name.value: k for k, j in enumerate(pipeline.jobs)}
        down = max(cycle, key=lambda j: order[j])
        up = cycle[cycle.index(down) - 1]
        ref = graph.edges[up, down]["ref"]
        path = " -> ".join(cycle[cycle.index(down):] + cycle[: cycle.index(down)] + [down])
        c.error(
            ref.span,
            f"jobs wait for each other in a cycle ({path}); a job cannot use outputs of a job "
            "that uses its own",
        )


PASSES = (check_declarations, check_references, check_job_cycles)


def check(
    pipeline: n.Pipeline, source: SourceFile | None, overrides: Mapping[str, str] | None = None
) -> tuple[dict[str, object], list[Diagnostic]]:
    """Run every check; returns the parameter values and the diagnostics found."""
    c = Checker(source)
    check_params(pipeline, c)
    params = param_values(pipeline, overrides or {}, c)
    for check_pass in PASSES:
        check_pass(pipeline, params, c)
    return params, c.diagnostics
