"""Checking: syntax tree → every mistake that can be found without touching files.

Each pass is a small function over the tree that appends :class:`Diagnostic` records; all passes
run, so one ``opf check`` reports every mistake at once. The passes:

* :func:`check_params` — duplicate params, ``--param`` overrides (unknown names, bad values);
* :func:`check_declarations` — duplicate jobs, steps, outputs, shared names, call arguments;
  reserved names; names that would mean two things (a step called like the loop variable, ...);
  a job without steps, a step without (or with two) commands;
* :func:`check_references` — every ``{name}`` resolves where it is used, a step names no later
  step and not itself, another job's ``temp`` output is never used, list values stand alone,
  ``in`` names files, ``range`` and ``retries`` get whole numbers, ``threads`` and
  ``timeout`` usable values (:mod:`.limits`), outputs stay in the task folder;
* :func:`check_job_cycles` — jobs that wait for each other;
* :func:`~.mistakes.check_likely_mistakes` — warnings: what is valid but would fail or do
  nothing when run (a file of the pipeline's folder that a ``run`` line names but nothing
  stages, a ``call`` of a function its module lacks, a pattern in ``in``, ...).

Name resolution lives in :mod:`.scope`; the planner resolves with the same code, so what the
checker accepts is exactly what the planner understands.
"""

from __future__ import annotations

import math
import posixpath
import re
from collections.abc import Mapping

import networkx as nx

from ..errors import Diagnostic
from ..source import SourceFile
from . import nodes as n
from .limits import check_limits
from .mistakes import check_likely_mistakes
from .nodes import RESERVED
from .scope import (
    CTX_JOB,
    CTX_OUT,
    CTX_OUTPUT,
    CTX_STEP,
    SPECIALS,
    Binding,
    JobTable,
    ResolveError,
    Scope,
    as_written,
    did_you_mean,
    job_dependencies,
    templates_of_step,
)

_INT = re.compile(r"[-+]?[0-9]+")



class Checker:
    """Collects diagnostics for one pipeline file; ``root`` is the pipeline's folder, for the
    warnings that look at files (None: those are not looked for)."""

    def __init__(self, source: SourceFile | None, root: str | None = None) -> None:
        self.source = source
        self.root = root
        self.diagnostics: list[Diagnostic] = []

    def error(self, span, message: str) -> None:
        self.diagnostics.append(Diagnostic(span, message, self.source))

    def warn(self, span, message: str) -> None:
        self.diagnostics.append(Diagnostic(span, message, self.source, "warning"))


def param_values(
    pipeline: n.Pipeline, overrides: Mapping[str, str], checker: Checker
) -> dict[str, object]:
    """Param values after ``--param`` overrides, converted to each default's type."""
    values: dict[str, object] = {}
    for p in pipeline.params:
        values.setdefault(p.name.value, p.value.value)
    for name, text in overrides.items():
        shown = text if len(text) <= 60 else f"{text[:28]}...{text[-28:]}"
        shown = shown.replace("\0", "\\0")
        if name not in values:
            hint = did_you_mean(name, values)
            known = ", ".join(values) or "none"
            checker.error(
                None,
                f"--param {name}={shown}: this pipeline has no parameter '{name}'{hint} "
                f"(its parameters: {known})",
            )
            continue
        try:
            values[name] = convert_param(text, values[name])
        except ValueError as exc:
            checker.error(
                None,
                f"--param {name}={shown}: {exc} (the default of '{name}' is "
                f"{as_written(values[name])})",
            )
    return values


def convert_param(text: str, default: object) -> object:
    """Convert a ``--param`` value to the type of the parameter's default.

    Raises ValueError saying what was expected.
    """
    if "\0" in text:  # no file name, command word or environment value can hold one
        raise ValueError("a value cannot hold a NUL character")
    if isinstance(default, bool):
        if text in ("true", "false"):
            return text == "true"
        raise ValueError("expected true or false")
    if isinstance(default, int):
        if not _INT.fullmatch(text.strip()):
            raise ValueError("expected a whole number")
        try:
            return int(text)
        except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
            raise ValueError("this whole number is too large") from None
    if isinstance(default, float):
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise ValueError("expected a number")
        return value
    if isinstance(default, tuple):
        items = [t.strip() for t in text.split(",")] if text.strip() else []
        kinds = {type(v) for v in default}
        if len(kinds) == 1 and kinds != {tuple}:
            sample = default[0]
            out = []
            for item in items:
                try:
                    out.append(convert_param(item, sample))
                except ValueError:
                    kind = "true or false values" if isinstance(sample, bool) else (
                        "whole numbers" if isinstance(sample, int) else "numbers"
                    )
                    raise ValueError(
                        f"expected a comma-separated list of {kind}, and '{item}' is not one"
                    ) from None
            return tuple(out)
        return tuple(items)
    return text


def check_params(pipeline: n.Pipeline, checker: Checker) -> None:
    seen: dict[str, n.Param] = {}
    for p in pipeline.params:
        _declare(checker, seen, p.name, p, "parameter")
        if p.name.value in RESERVED:
            _reserved(checker, p.name, "a parameter")


def _reserved(checker: Checker, name: n.Name, what: str) -> None:
    attr = SPECIALS[name.value][0]
    checker.error(
        name.span,
        f"'{name.value}' is reserved (it is the '{{{name.value}.{attr}}}' of templates), so it "
        f"cannot be the name of {what}; choose another name",
    )


def _declare(
    checker: Checker, seen: dict, name: n.Name, node, what: str, where: str = ""
) -> None:
    first = seen.get(name.value)
    if first is not None:
        line = first.name.span.line if first.name.span else "?"
        checker.error(
            name.span,
            f"duplicate {what} '{name.value}'{where}: it is already declared on line {line}; "
            "give it another name",
        )
    else:
        seen[name.value] = node


def check_declarations(pipeline: n.Pipeline, params: Mapping[str, object], c: Checker) -> None:
    jobs: dict[str, n.Job] = {}
    for job in pipeline.jobs:
        _declare(c, jobs, job.name, job, "job")
        if job.name.value in RESERVED:
            _reserved(c, job.name, "a job")
        shared: dict[str, n.Shared] = {}
        for s in job.shared:
            _declare(c, shared, s.name, s, "shared name")
        for what, items in (("output", job.outputs), ("retries", job.retries)):
            for extra in items[1:]:
                c.error(extra.span, f"a job has at most one '{what}' line; remove this one")
        if not job.steps:
            c.error(job.name.span, f"job '{job.name.value}' has no step; add 'step NAME {{ ... }}'")
        singles = _single_names(job, params, shared, c)
        steps: dict[str, n.Step] = {}
        for step in job.steps:
            _declare(c, steps, step.name, step, "step", f" in job '{job.name.value}'")
            if step.name.value in RESERVED:
                _reserved(c, step.name, "a step")
            elif step.name.value in singles:
                c.error(
                    step.name.span,
                    f"step '{step.name.value}' has the name of {singles[step.name.value]}, so "
                    f"'{{{step.name.value}.…}}' would mean two things; rename one of them",
                )
            _check_step_declarations(step, singles, c)


def _single_names(job: n.Job, params: Mapping[str, object], shared: Mapping[str, n.Shared],
                  c: Checker) -> dict[str, str]:
    """The names a job's steps and outputs may not take (params, shared files, the loop
    variable), each with what it names; reports the clashes among those."""
    singles = {**{p: "a parameter" for p in params}, **{s: "a shared file" for s in shared}}
    if job.var is not None:
        var = job.var.value
        if var in RESERVED:
            _reserved(c, job.var, "a loop variable")
        elif var in params:
            c.error(
                job.var.span,
                f"the loop variable '{var}' has the name of a parameter, so '{{{var}}}' "
                "would mean two things; rename one of them",
            )
        elif var in shared:
            c.error(
                shared[var].name.span,
                f"shared file '{var}' has the name of the loop variable, so '{{{var}}}' "
                "would mean two things; rename one of them",
            )
        singles[var] = "the loop variable"
    for s in job.shared:
        if s.name.value in params:
            c.error(
                s.name.span,
                f"shared file '{s.name.value}' has the name of a parameter, so "
                f"'{{{s.name.value}}}' would mean two things; rename one of them",
            )
        if s.name.value in RESERVED:
            _reserved(c, s.name, "a shared file")
    return singles


def _check_step_declarations(step: n.Step, singles: Mapping[str, str], c: Checker) -> None:
    """A step's outputs, its one command and its call's arguments."""
    outs: dict[str, n.Out] = {}
    for o in step.outs:
        _declare(c, outs, o.name, o, "output", f" in step '{step.name.value}'")
        if o.name.value in RESERVED:
            _reserved(c, o.name, "an output")
        elif o.name.value in singles:
            c.error(
                o.name.span,
                f"output '{o.name.value}' has the name of {singles[o.name.value]}, so "
                f"'{{{o.name.value}}}' would mean two things; rename one of them",
            )
    if len(step.actions) == 0:
        c.error(
            step.name.span,
            f"step '{step.name.value}' has no command; add one 'run ...' or 'call ...' line",
        )
    for extra in step.actions[1:]:
        c.error(extra.span, "a step runs exactly one command; split this into another step")
    for action in step.actions:
        if isinstance(action, n.Call):
            given: set[str] = set()
            for kw in action.kwargs:
                if kw.name.value in given:
                    c.error(
                        kw.name.span,
                        f"argument '{kw.name.value}' is given twice in this call; remove one",
                    )
                given.add(kw.name.value)


def is_list_binding(b: Binding, params: Mapping[str, object]) -> bool:
    if b.kind == "gather" or (b.kind == "var" and b.attr == "files"):
        return True
    return b.kind == "param" and b.attr is None and isinstance(params.get(b.name), tuple)


def _whole_number(
    c: Checker, params: Mapping[str, object], b: Binding | None, v: n.Value, what: str,
    minimum: int | None = None,
) -> None:
    """Report unless ``v`` (a literal, or a param resolved to ``b``) is a whole number."""
    need = "a whole number" if minimum is None else f"a whole number, {minimum} or more"
    if isinstance(v, n.Ref):
        if b is None:
            return
        if b.kind != "param" or b.attr is not None:
            c.error(v.span, f"{what} takes {need}, or a parameter holding one")
            return
        value = params.get(b.name)
        shown = f"but parameter '{b.name}' is {as_written(value)}"
    else:
        value = v.value
        shown = f"not {as_written(value)}"
    if isinstance(value, bool) or not isinstance(value, int):
        c.error(v.span, f"{what} takes {need}, {shown}")
    elif minimum is not None and value < minimum:
        c.error(v.span, f"{what} takes {need}, {shown}")


def _not_a_file(b: Binding, ref: n.Ref, scope: Scope, step: int) -> str | None:
    """Why an ``in NAME`` does not name a file, or None when it does."""
    quoted = f'write: in "{{{ref.dotted}}}"'
    if b.kind == "var" and b.attr == "files":
        return None
    if b.attr is not None:
        return f"'in {ref.dotted}' names a text, not a file; to stage the file it names, {quoted}"
    if b.kind == "special":
        return f"'in {ref.dotted}' names a text, not a file"
    if b.kind == "param":
        return (
            f"'in {ref.dotted}' names a parameter's value, not a file; to stage the file it "
            f"names, {quoted}"
        )
    if b.kind == "var" and not isinstance(scope.job.source, (n.GlobSource, n.UpstreamSource)):
        return (
            f"the loop variable '{ref.dotted}' holds values, not files; to stage the file it "
            f"names, {quoted}"
        )
    if b.kind == "out" and b.step == scope.job.steps[step].name.value:
        return (
            f"'{ref.dotted}' is an output of this step; 'in' lists the files a step reads"
        )
    return None


def check_references(pipeline: n.Pipeline, params: Mapping[str, object], c: Checker) -> None:
    table = JobTable(pipeline)
    for job in pipeline.jobs:
        scope = Scope(pipeline, job, params, table)

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
                b = resolve(a, CTX_JOB) if isinstance(a, n.Ref) else None
                _whole_number(c, params, b, a, "range")
        elif isinstance(src, n.TilesSource):
            for r in src.pattern.refs:
                resolve(r, CTX_JOB)
            _check_tiles_numbers(src, params, c, lambda r: resolve(r, CTX_JOB))
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
        for rt in job.retries[:1]:
            b = resolve(rt.value, CTX_JOB) if isinstance(rt.value, n.Ref) else None
            _whole_number(c, params, b, rt.value, "retries", minimum=0)
        check_limits(job, scope, params, c.error)
        for i, step in enumerate(job.steps):
            for o in step.outs:
                for r in o.path.refs:
                    resolve(r, CTX_OUT)
                _check_out_path(o, c)
            bound: dict[int, Binding | None] = {}
            for ref, alone in templates_of_step(step):
                b = bound[id(ref)] = resolve(ref, CTX_STEP, i)
                if b is not None and not alone and is_list_binding(b, params):
                    what = (
                        "a list of files" if b.kind in ("gather", "var")
                        else f"a list (the value of parameter '{b.name}')"
                    )
                    c.error(
                        ref.span,
                        f"'{{{ref.dotted}}}' is {what} and must stand as a word of its own, "
                        "with blanks around it (it becomes one word per item)",
                    )
            for action in step.actions:
                if isinstance(action, n.Run):
                    if not action.words:
                        c.error(action.span, "this run line has no command")
                    for span, message in action.shell_problems:
                        c.error(span, message)
            for item in step.ins:
                if isinstance(item.item, n.Ref):
                    b = bound.get(id(item.item))
                    why = _not_a_file(b, item.item, scope, i) if b is not None else None
                    if why:
                        c.error(item.span, why)


def _check_tiles_numbers(src: n.TilesSource, params: Mapping[str, object], c: Checker,
                         resolve) -> None:
    """``size > 0``, ``buffer >= 0`` and ``origin = [X, Y]``: numbers, or params holding them."""

    def number(v: n.Value, what: str, positive: bool = False, zero: bool = False) -> None:
        need = "a number greater than 0" if positive else (
            "a number, 0 or more" if zero else "a number")
        if isinstance(v, n.Ref):
            b = resolve(v)
            if b is None:
                return
            if b.kind != "param" or b.attr is not None:
                c.error(v.span, f"{what} takes {need}, or a parameter holding one")
                return
            value, shown = params.get(b.name), f"but parameter '{b.name}' is"
        else:
            value, shown = v.value, "not"
        if isinstance(value, bool) or not isinstance(value, int | float):
            c.error(v.span, f"{what} takes {need}, {shown} {as_written(value)}")
        elif (positive and value <= 0) or (zero and value < 0):
            c.error(v.span, f"{what} takes {need}, {shown} {as_written(value)}")

    if src.size is not None:
        number(src.size, "the size of tiles(...)", positive=True)
    if src.buffer is not None:
        number(src.buffer, "the buffer of tiles(...)", zero=True)
    origin = src.origin
    if isinstance(origin, n.Ref):
        b = resolve(origin)
        value = params.get(b.name) if b is not None and b.kind == "param" else None
        if b is not None and not (isinstance(value, tuple) and len(value) == 2 and all(
            isinstance(x, int | float) and not isinstance(x, bool) for x in value
        )):
            c.error(origin.span, "the origin of tiles(...) takes two numbers, [X, Y], or a "
                    "parameter holding them")
    elif origin is not None:
        items = origin.items if isinstance(origin, n.ValueList) else (
            tuple(n.Literal(v, origin.span) for v in origin.value)
            if isinstance(origin.value, tuple) else None)
        if items is None or len(items) != 2:
            c.error(origin.span, "the origin of tiles(...) takes two numbers, [X, Y]")
            return
        for item in items:
            number(item, "the origin of tiles(...)")


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
        return
    # placeholders stand for one folder or file name each
    shape = "".join(p if isinstance(p, str) else "x" for p in o.path.parts).replace("\\", "/")
    norm = posixpath.normpath(shape)
    if norm == ".." or norm.startswith("../"):
        c.error(
            o.path.span,
            f"output '{o.name.value}' leaves the task folder with '..'; an output is a file name "
            "inside the task folder",
        )
    elif norm == ".":
        c.error(
            o.path.span,
            f"output '{o.name.value}' names the task folder itself, not a file in it",
        )



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


PASSES = (check_declarations, check_references, check_job_cycles, check_likely_mistakes)


def check(
    pipeline: n.Pipeline, source: SourceFile | None, overrides: Mapping[str, str] | None = None,
    root: str | None = None,
) -> tuple[dict[str, object], list[Diagnostic]]:
    """Run every check; returns the parameter values and the diagnostics found (errors and
    warnings, told apart by their ``severity``). ``root``: the pipeline's folder, where the
    warnings about files not staged and modules not there look."""
    c = Checker(source, root)
    check_params(pipeline, c)
    params = param_values(pipeline, overrides or {}, c)
    for check_pass in PASSES:
        check_pass(pipeline, params, c)
    return params, c.diagnostics
