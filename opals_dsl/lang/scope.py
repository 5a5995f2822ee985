"""Names: what a ``{reference}`` means where it stands (:class:`Scope`, :class:`Binding`).

The checker (:mod:`.check`) and the planner (:mod:`.lower`) resolve with this same code, so what
the checker accepts is exactly what the planner understands. A reference of three parts whose
first is a job is always that job's output, so a param or loop variable called like a job hides
nothing. Misspelt names get a "did you mean" from :func:`closest` (edit distance, so a swapped
pair of letters counts as one mistake). :func:`job_dependencies` is the job-level graph of who
uses whose outputs.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import networkx as nx

from . import nodes as n

FILE_ATTRS = ("name", "stem", "suffix", "parent")
#: what the loop variable of ``tiles(...)`` offers; ``files`` is a list of files
TILE_ATTRS = ("id", "xmin", "ymin", "xmax", "ymax", "buffer", "files")


SPECIALS = {"task": ("id", "threads"), "job": ("name",), "pipeline": ("name",)}


@dataclass(frozen=True, slots=True)
class Binding:
    """What a reference means.

    kind: ``var`` | ``param`` | ``shared`` | ``out`` (``step``/``name`` set; own or earlier
    step) | ``gather`` (``job``/``step``/``name``) | ``special`` (``name`` is ``task.id``,
    ``task.threads``, ``job.name`` or ``pipeline.name``). ``attr`` is a file attribute
    (``stem`` ...) or None.
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


CTX_STEP = "step"  # run, call, in: everything (task.threads only here)


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
            close = scope.earlier_output(ref, ctx, step)
            table = scope.table
            if close is None and table.hints_left > 0 and table.hint_work > 0:
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
        self.tiles = isinstance(job.source, n.TilesSource)
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
            if self.var and self.tiles:
                names += [f"{self.var}.{a}" for a in TILE_ATTRS]
            elif self.var:
                names += [self.var] + [f"{self.var}.{a}" for a in FILE_ATTRS]
        if ctx == CTX_STEP:
            names += ["task.threads"]
            names += [dotted for j, dotted in self.table.outputs() if j is not self.job]
        if ctx == CTX_STEP and step is not None:
            names += list(self.shared)
            names += list(self.step_outs[step])
            for i in range(step):
                s = self.job.steps[i].name.value
                names += [f"{s}.{o}" for o in self.step_outs[i]]
        return names

    def earlier_output(self, ref: n.Ref, ctx: str, step: int | None) -> str | None:
        """``STEP.OUT`` for a bare ``OUT`` that an earlier step of this job declares (the
        latest such step): what a step writes to use another step's output."""
        if ctx != CTX_STEP or step is None or len(ref.parts) != 1:
            return None
        for i in range(step - 1, -1, -1):
            if ref.parts[0] in self.step_outs[i]:
                return f"{self.job.steps[i].name.value}.{ref.parts[0]}"
        return None

    def unknown(self, ref: n.Ref, ctx: str, step: int | None, what: str) -> ResolveError:
        return _UnknownName(self, ref, ctx, step, what)

    def resolve(self, ref: n.Ref, ctx: str, step: int | None = None) -> Binding:
        """The meaning of ``ref`` in context ``ctx`` (in step number ``step``)."""
        parts = ref.parts
        head = parts[0]
        allow_var = ctx != CTX_JOB
        in_step = ctx == CTX_STEP
        if head in SPECIALS:
            return _special(ref, allow_var, in_step)

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

        if self.var is not None and head == self.var and allow_var and self.tiles:
            return self._tile_attr(ref, ctx)
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
            return self._earlier_output(ref, ctx, step)

        others = head in self.shared or head in self.steps or head in self.jobs
        if not allow_var and (head == self.var or others):
            raise ResolveError(f"'{ref.dotted}' cannot be used here: {_BEFORE_TASKS}")
        if ctx in (CTX_OUT, CTX_OUTPUT) and others:
            raise ResolveError(
                f"'{ref.dotted}' cannot be used in an output name or folder; these may use "
                "params, the loop variable, task.id, job.name and pipeline.name"
            )
        raise self.unknown(ref, ctx, step, "")

    def _earlier_output(self, ref: n.Ref, ctx: str, step: int | None) -> Binding:
        """``STEP.OUT``: an output of an earlier step of this job."""
        head, out = ref.parts
        index = self.steps[head]
        if out not in self.step_outs[index]:
            raise self.unknown(ref, ctx, step, f": step '{head}' has no output '{out}'")
        if step is not None and index == step:
            raise ResolveError(
                f"step '{head}' cannot name its own output as '{ref.dotted}'; write '{{{out}}}'"
            )
        if step is not None and index > step:
            raise ResolveError(
                f"'{ref.dotted}' is an output of a later step; a step can only use "
                f"outputs of the steps written before it"
            )
        return Binding("out", name=out, step=head)

    def resolve_upstream(
        self, ref: n.Ref, ctx: str = CTX_STEP, step: int | None = None
    ) -> Binding:
        """``JOB.STEP.OUT`` of another job: a job's source, or a gather in a step."""
        parts = ref.parts
        head = parts[0]
        if len(parts) == 1 and head in self.params and step is None:
            value = self.params[head]
            if isinstance(value, int) and not isinstance(value, bool):
                fix = f"for {value} tasks numbered from 0, write range({head})"
            elif isinstance(value, str):
                fix = f"for the files its pattern matches, write \"{{{head}}}\""
            else:
                items = list(value) if isinstance(value, list | tuple) else []
                shown = [as_written(v) for v in items[:3]] + (["..."] if len(items) > 3 else [])
                fix = f"write its values as the job's list, [{', '.join(shown) or '...'}]"
            raise ResolveError(f"'{head}' is a param, and a job cannot loop over a param "
                               f"itself; {fix}")
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

    def _tile_attr(self, ref: n.Ref, ctx: str) -> Binding:
        """``{tile.id}``, ``{tile.xmin}`` ... ``{tile.files}`` of a tiles job."""
        parts = ref.parts
        offers = ", ".join(f"'{parts[0]}.{a}'" for a in TILE_ATTRS)
        if len(parts) == 1:
            raise ResolveError(
                f"'{parts[0]}' alone is not a value: a tile offers {offers}"
            )
        if len(parts) != 2 or parts[1] not in TILE_ATTRS:
            close = closest(parts[1], TILE_ATTRS) if len(parts) == 2 else None
            hint = f"did you mean '{parts[0]}.{close}'? " if close else ""
            raise ResolveError(f"'{ref.dotted}' is not known; {hint}a tile offers {offers}")
        if parts[1] == "files" and ctx != CTX_STEP:
            raise ResolveError(
                f"'{ref.dotted}' is a list of files, which only a step's command or 'in' line "
                "can use; name an output after '{" + parts[0] + ".id}'"
            )
        return Binding("var", attr=parts[1])

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


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """``; did you mean 'NAME'?`` for the candidate :func:`closest` finds for ``word``, else
    "": the end of a message about a misspelt name."""
    close = closest(word, candidates)
    return f"; did you mean '{close}'?" if close else ""


def templates_of_step(step: n.Step) -> Iterable[tuple[n.Ref, bool]]:
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
                if action.shell and k == len(action.words) - 1:
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
            refs.extend((r, i) for r, _ in templates_of_step(step))
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


def as_written(value: object) -> str:
    """A value as it is written in a pipeline file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple):
        return "[" + ", ".join(as_written(v) for v in value) + "]"
    return repr(value)


def _special(ref: n.Ref, allow_task: bool, in_step: bool = True) -> Binding:
    """``task.id``, ``task.threads``, ``job.name`` or ``pipeline.name``."""
    head, parts = ref.parts[0], ref.parts
    if len(parts) == 2 and parts[1] in SPECIALS[head]:
        if head == "task" and not allow_task:
            raise ResolveError(f"'{ref.dotted}' cannot be used here: {_BEFORE_TASKS}")
        if ref.dotted == "task.threads" and not in_step:
            raise ResolveError("'task.threads' is a step's thread count: use it in a step's "
                               "run, call or in line")
        return Binding("special", name=ref.dotted)
    if len(parts) == 1:
        raise ResolveError(
            f"'{head}' alone is not a value; write '{{{head}.{SPECIALS[head][0]}}}'"
        )
    raise ResolveError(
        f"'{ref.dotted}' is not known; '{head}' offers only "
        + " and ".join(f"'{head}.{a}'" for a in SPECIALS[head])
    )
