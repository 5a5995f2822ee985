"""Checking: syntax tree → every mistake that can be found without touching files.

Each pass is a small function over the tree that appends :class:`Diagnostic` records; all passes
run, so one ``opf check`` reports every mistake at once. The passes:

* :func:`check_params` — duplicate params, ``--param`` overrides (unknown names, bad values);
* :func:`check_declarations` — duplicate jobs, steps, outputs, shared names, call arguments;
  reserved names; names that would mean two things (a step called like the loop variable, ...);
  a job without steps, a step without (or with two) commands;
* :func:`check_references` — every ``{name}`` resolves where it is used, a step names no later
  step and not itself, another job's ``temp`` output is never used, list values stand alone,
  ``in`` names files, ``range`` and ``retries`` get whole numbers, outputs stay in the task
  folder;
* :func:`check_job_cycles` — jobs that wait for each other.

Name resolution lives in :class:`Scope`; the planner resolves with the same code, so what the
checker accepts is exactly what the planner understands. A reference of three parts whose first
is a job is always that job's output, so a param or loop variable called like a job hides
nothing. Misspelt names get a "did you mean" from :func:`closest` (edit distance, so a swapped
pair of letters counts as one mistake).
"""

from __future__ import annotations

import difflib
import math
import posixpath
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import networkx as nx

from . import nodes as n
from .errors import Diagnostic
from .parse import RESERVED
from .source import SourceFile

FILE_ATTRS = ("name", "stem", "suffix", "parent")
_INT = re.compile(r"[-+]?[0-9]+")
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


def _distance(a: str, b: str, limit: int) -> int:
    """Edits (insert, delete, replace, swap two neighbours) that turn ``a`` into ``b``; any
    number above ``limit`` when there are more than ``limit``."""
    if abs(len(a) - len(b)) > limit:
        return limit + 1
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        row = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            row[j] = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                row[j] = min(row[j], prev2[j - 2] + 1)
        if min(row) > limit and (not prev or min(prev) > limit):
            return limit + 1
        prev2, prev = prev, row
    return prev[len(b)]


def closest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate a misspelt ``word`` most likely meant, or None.

    difflib finds a few similar names; among them, one that a single slip of the keys (two for
    longer names) turns into ``word`` wins, else the most similar one if it is close enough.
    A dotted name is compared only with names that share one of its parts (``dem.grd.dem`` with
    the outputs of job ``dem``), which keeps this quick in pipelines of many jobs.
    """
    dots = word.count(".")
    parts = set(word.split("."))

    def near(c: str) -> bool:
        if abs(c.count(".") - dots) > 1:
            return False
        return "." not in c or not dots or not parts.isdisjoint(c.split("."))

    candidates = [c for c in dict.fromkeys(candidates) if c != word and near(c)]
    similar = difflib.get_close_matches(word, candidates, n=6, cutoff=0.6)
    limit = 0 if len(word) <= 2 else 1 if len(word) <= 5 else 2
    low = word.lower()
    scored = sorted((_distance(low, c.lower(), limit), k, c) for k, c in enumerate(similar))
    if scored and scored[0][0] <= limit:
        return scored[0][2]
    best = difflib.get_close_matches(word, similar, n=1, cutoff=0.75)
    return best[0] if best else None


_BEFORE_TASKS = (
    "a job's source, its shared paths and its retries are read before there are tasks, so they "
    "may use only params, pipeline.name and job.name"
)


class ResolveError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class _UnknownName(ResolveError):
    """An unknown name; its "did you mean" is looked for only when the message is read."""

    def __init__(self, scope: Scope, ref: n.Ref, ctx: str, step: int | None, what: str) -> None:
        Exception.__init__(self, ref.dotted)
        self._find = (scope, ref, ctx, step, what)
        self._message: str | None = None

    @property
    def message(self) -> str:  # type: ignore[override]
        if self._message is None:
            scope, ref, ctx, step, what = self._find
            close = None
            table = scope.table
            if table.hints_left > 0 and table.hint_work > 0:
                table.hints_left -= 1
                candidates = scope._candidates_of(ref, ctx, step)
                table.hint_work -= len(candidates)
                close = closest(ref.dotted, candidates)
            hint = f"; did you mean '{close}'?" if close else ""
            self._message = f"unknown name '{ref.dotted}'{what}{hint}"
        return self._message

    def __str__(self) -> str:
        return self.message


class JobTable:
    """What the scopes of every job of one pipeline share, made once: the jobs by name, and
    (on first need, for a "did you mean") every ``JOB.STEP.OUT`` of the pipeline.

    Pass one to each :class:`Scope` of a pipeline: a scope made without one builds its own,
    which costs a pass over every job, so a scope per job without it is quadratic."""

    def __init__(self, pipeline: n.Pipeline) -> None:
        self.jobs = {j.name.value: j for j in pipeline.jobs}
        self._pipeline = pipeline
        self._outputs: list[tuple[n.Job, str]] | None = None
        #: how many more "did you mean" searches may be made, and how many names they may
        #: still compare in all (see :data:`HINT_BUDGET`)
        self.hints_left = HINT_BUDGET
        self.hint_work = HINT_WORK

    def outputs(self) -> list[tuple[n.Job, str]]:
        """(job, ``JOB.STEP.OUT``) for every output of every job."""
        if self._outputs is None:
            self._outputs = [
                (j, f"{j.name.value}.{s.name.value}.{o.name.value}")
                for j in self._pipeline.jobs for s in j.steps for o in s.outs
            ]
        return self._outputs


#: "did you mean" searches per pipeline: each looks through every name a place can see, so a
#: file with an unknown name in each of 100,000 jobs would take hours to check; beyond this
#: many the message names the unknown name without a suggestion (only the first 50 messages
#: are shown anyway)
HINT_BUDGET = 200
#: names compared in all by the "did you mean" searches of a pipeline, for the same reason
HINT_WORK = 1_000_000


class Scope:
    """Names visible in one job: resolves a reference in a context to a :class:`Binding`."""

    def __init__(
        self, pipeline: n.Pipeline, job: n.Job, params: Mapping[str, object],
        table: JobTable | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.job = job
        self.params = params
        self.var = job.var.value if job.var else None
        self.shared = {s.name.value: s for s in job.shared}
        self.steps = {s.name.value: i for i, s in enumerate(job.steps)}
        self.step_outs = [{o.name.value: o for o in s.outs} for s in job.steps]
        self.table = table if table is not None else JobTable(pipeline)
        self.jobs = self.table.jobs
        self._known: dict[tuple[str, int | None], list[str]] = {}

    def _candidates_of(self, ref: n.Ref, ctx: str, step: int | None) -> list[str]:
        """The names a misspelt ``ref`` is compared with: of a job named right, only its own
        outputs (``dem.grd.dem`` is compared with the outputs of job ``dem``)."""
        parts = ref.parts
        if ctx == CTX_STEP and len(parts) == 3 and parts[0] in self.jobs:
            job = self.jobs[parts[0]]
            if job is not self.job:
                return [f"{parts[0]}.{s.name.value}.{o.name.value}"
                        for s in job.steps for o in s.outs]
        return self._candidates(ctx, step)

    def _candidates(self, ctx: str, step: int | None) -> list[str]:
        key = (ctx, step)
        if key not in self._known:
            self._known[key] = self._names(ctx, step)
        return self._known[key]

    def _names(self, ctx: str, step: int | None) -> list[str]:
        names = list(self.params) + ["pipeline.name", "job.name"]
        if ctx != CTX_JOB:
            names += ["task.id"]
            if self.var:
                names += [self.var] + [f"{self.var}.{a}" for a in FILE_ATTRS]
        if ctx == CTX_STEP:
            names += [dotted for j, dotted in self.table.outputs() if j is not self.job]
        if ctx == CTX_STEP and step is not None:
            names += list(self.shared)
            names += list(self.step_outs[step])
            for i in range(step):
                s = self.job.steps[i].name.value
                names += [f"{s}.{o}" for o in self.step_outs[i]]
        return names

    def unknown(self, ref: n.Ref, ctx: str, step: int | None, what: str) -> ResolveError:
        return _UnknownName(self, ref, ctx, step, what)

    def resolve(self, ref: n.Ref, ctx: str, step: int | None = None) -> Binding:
        """The meaning of ``ref`` in context ``ctx`` (in step number ``step``)."""
        parts = ref.parts
        head = parts[0]
        allow_var = ctx != CTX_JOB
        in_step = ctx == CTX_STEP
        if head in SPECIALS:
            if len(parts) == 2 and parts[1] in SPECIALS[head]:
                if head == "task" and not allow_var:
                    raise ResolveError(f"'{ref.dotted}' cannot be used here: {_BEFORE_TASKS}")
                return Binding("special", name=ref.dotted)
            if len(parts) == 1:
                raise ResolveError(
                    f"'{head}' alone is not a value; write '{{{head}.{SPECIALS[head][0]}}}'"
                )
            raise ResolveError(
                f"'{ref.dotted}' is not known; '{head}' offers only "
                + " and ".join(f"'{head}.{a}'" for a in SPECIALS[head])
            )

        # JOB.STEP.OUT: three parts never name anything else, so a param, loop variable or
        # shared file called like a job does not hide that job's outputs
        if in_step and head in self.jobs and len(parts) == 3:
            return self.resolve_upstream(ref, ctx, step)

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

        others = head in self.shared or head in self.steps or head in self.jobs
        if not allow_var and (head == self.var or others):
            raise ResolveError(f"'{ref.dotted}' cannot be used here: {_BEFORE_TASKS}")
        if ctx in (CTX_OUT, CTX_OUTPUT) and others:
            raise ResolveError(
                f"'{ref.dotted}' cannot be used in an output name or folder; these may use "
                "params, the loop variable, task.id, job.name and pipeline.name"
            )
        raise self.unknown(ref, ctx, step, "")

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
        if head == self.job.name.value and step is None:
            raise ResolveError(
                f"'{ref.dotted}' is an output of this job itself; a job cannot take its tasks "
                "from its own outputs"
            )
        if head == self.job.name.value:
            own = step is not None and self.job.steps[step].name.value == parts[1]
            local = parts[2] if own else f"{parts[1]}.{parts[2]}"
            raise ResolveError(
                f"'{ref.dotted}' names this job's own output as another job's; "
                f"within a job write '{{{local}}}'"
            )
        other = self.jobs[head]
        ostep = next((s for s in other.steps if s.name.value == parts[1]), None)
        if ostep is None:
            raise self.unknown(ref, ctx, step, f": job '{head}' has no step '{parts[1]}'")
        out = next((o for o in ostep.outs if o.name.value == parts[2]), None)
        if out is None:
            raise self.unknown(
                ref, ctx, step, f": step '{parts[1]}' of job '{head}' has no output '{parts[2]}'"
            )
        if out.temp:
            raise ResolveError(
                f"'{ref.dotted}' is a temp output of job '{head}': it is never copied "
                "back, so no other job can use it; drop 'temp' from its declaration"
            )
        return Binding("gather", job=head, step=parts[1], name=parts[2])

    def _bad_attr(self, ref: n.Ref) -> ResolveError:
        offers = ", ".join(f".{a}" for a in FILE_ATTRS[:-1]) + f" and .{FILE_ATTRS[-1]}"
        if len(ref.parts) == 2:
            close = closest(ref.parts[1], FILE_ATTRS)
            hint = f"; did you mean '{ref.parts[0]}.{close}'?" if close else ""
            return ResolveError(
                f"'{ref.parts[0]}' has no attribute '.{ref.parts[1]}'{hint} "
                f"(a value offers {offers})"
            )
        return ResolveError(f"'{ref.dotted}' is not known: a value offers only {offers}")


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
        shown = text if len(text) <= 60 else f"{text[:28]}...{text[-28:]}"
        shown = shown.replace("\0", "\\0")
        if name not in values:
            close = closest(name, values)
            hint = f"; did you mean '{close}'?" if close else ""
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
                f"{_show(values[name])})",
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
        steps: dict[str, n.Step] = {}
        if not job.steps:
            c.error(job.name.span, f"job '{job.name.value}' has no step; add 'step NAME {{ ... }}'")
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
                    f"step '{step.name.value}' has no command; "
                    "add one 'run ...' or 'call ...' line",
                )
            for extra in step.actions[1:]:
                c.error(
                    extra.span,
                    "a step runs exactly one command; split this into another step",
                )
            for action in step.actions:
                if isinstance(action, n.Call):
                    given: set[str] = set()
                    for kw in action.kwargs:
                        if kw.name.value in given:
                            c.error(
                                kw.name.span,
                                f"argument '{kw.name.value}' is given twice in this call; "
                                "remove one",
                            )
                        given.add(kw.name.value)


def _templates_of_step(step: n.Step) -> Iterable[tuple[n.Ref, bool]]:
    """(ref, alone-in-its-word) for every reference a step's command and ins make.

    In a ``run sh "..."`` script a word is a shell word: a placeholder stands alone when
    blanks or the script's ends surround it.
    """
    for item in step.ins:
        if isinstance(item.item, n.Ref):
            yield item.item, True
        else:
            for r in item.item.refs:
                yield r, False
    for action in step.actions:
        if isinstance(action, n.Run):
            for k, w in enumerate(action.words):
                parts = w.template.parts
                if action.shell and k == 1:
                    for j, p in enumerate(parts):
                        if isinstance(p, n.Ref):
                            yield p, _alone_in_script(parts, j)
                    continue
                alone = len(parts) == 1
                for r in w.template.refs:
                    yield r, alone
        else:
            for kw in action.kwargs:
                if isinstance(kw.value, n.Ref):
                    yield kw.value, True


def _alone_in_script(parts: tuple[str | n.Ref, ...], j: int) -> bool:
    before = parts[j - 1] if j > 0 else None
    after = parts[j + 1] if j + 1 < len(parts) else None
    ok_before = before is None or (isinstance(before, str) and before[-1:].isspace())
    ok_after = after is None or (isinstance(after, str) and after[:1].isspace())
    return ok_before and ok_after


def is_list_binding(b: Binding, params: Mapping[str, object]) -> bool:
    if b.kind == "gather":
        return True
    return b.kind == "param" and b.attr is None and isinstance(params.get(b.name), tuple)


def _show(value: object) -> str:
    """A value as it is written in a pipeline file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return repr(value)


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
        shown = f"but parameter '{b.name}' is {_show(value)}"
    else:
        value = v.value
        shown = f"not {_show(value)}"
    if isinstance(value, bool) or not isinstance(value, int):
        c.error(v.span, f"{what} takes {need}, {shown}")
    elif minimum is not None and value < minimum:
        c.error(v.span, f"{what} takes {need}, {shown}")


def _not_a_file(b: Binding, ref: n.Ref, scope: Scope, step: int) -> str | None:
    """Why an ``in NAME`` does not name a file, or None when it does."""
    quoted = f'write: in "{{{ref.dotted}}}"'
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
        for i, step in enumerate(job.steps):
            for o in step.outs:
                for r in o.path.refs:
                    resolve(r, CTX_OUT)
                _check_out_path(o, c)
            bound: dict[int, Binding | None] = {}
            for ref, alone in _templates_of_step(step):
                b = bound[id(ref)] = resolve(ref, CTX_STEP, i)
                if b is not None and not alone and is_list_binding(b, params):
                    what = (
                        "a list of files" if b.kind == "gather"
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


def job_dependencies(pipeline: n.Pipeline, params: Mapping[str, object]) -> nx.DiGraph:
    """Job-level graph: an edge ``up -> down`` when ``down`` uses an output of ``up``;
    edge attribute ``ref`` is the first reference that makes it."""
    graph = nx.DiGraph()
    graph.add_nodes_from(j.name.value for j in pipeline.jobs)
    table = JobTable(pipeline)
    for job in pipeline.jobs:
        scope = Scope(pipeline, job, params, table)
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
