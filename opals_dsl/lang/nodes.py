"""The syntax tree of a pipeline file: what the parser produces and the checker and planner read.

Every node is a frozen, slotted dataclass with a ``span`` (its place in the file) that is left out
of equality, so two trees compare equal when they say the same thing wherever it was written.
Children are tuples. Templates (strings and ``run`` words) are already split into literal text
and ``{name.attr}`` placeholders, each placeholder with its own span.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..source import Span

_SPAN = field(default=None, compare=False, repr=False)


#: soft keywords: names wherever a name is expected
SOFT_KEYWORDS = frozenset(
    "step out in call shared output retries param for flat by temp threads timeout".split()
)
RESERVED = frozenset({"task", "job", "pipeline"})


@dataclass(frozen=True, slots=True)
class Name:
    """A declared name (job, step, output, param, ...) and where it was written."""

    value: str
    span: Span | None = _SPAN


@dataclass(frozen=True, slots=True)
class Ref:
    """A reference to something declared: ``strip``, ``strip.stem``, ``dem.grid.dem``."""

    parts: tuple[str, ...]
    span: Span | None = _SPAN

    @property
    def dotted(self) -> str:
        return ".".join(self.parts)


@dataclass(frozen=True, slots=True)
class Template:
    """A string with placeholders: ``parts`` alternate literal ``str`` and :class:`Ref`."""

    parts: tuple[str | Ref, ...]
    span: Span | None = _SPAN

    @property
    def refs(self) -> tuple[Ref, ...]:
        return tuple(p for p in self.parts if isinstance(p, Ref))

    @property
    def is_constant(self) -> bool:
        return not self.refs


@dataclass(frozen=True, slots=True)
class Literal:
    """A plain value: ``str``, ``int``, ``float``, ``bool`` or a tuple of literals' values."""

    value: object
    span: Span | None = _SPAN


@dataclass(frozen=True, slots=True)
class ValueList:
    """A bracketed list that names params (``[x0, y0]``): its items are values or names.

    Only ``tiles(..., origin = [X, Y])`` takes one; a list that holds plain values only is a
    :class:`Literal` of a tuple."""

    items: tuple[Literal | Ref, ...]
    span: Span | None = _SPAN


Value = Literal | Ref


@dataclass(frozen=True, slots=True)
class GlobSource:
    pattern: Template
    span: Span | None = _SPAN


@dataclass(frozen=True, slots=True)
class ListSource:
    items: tuple[Literal, ...]
    span: Span | None = _SPAN


@dataclass(frozen=True, slots=True)
class RangeSource:
    args: tuple[Value, ...]
    span: Span | None = _SPAN


@dataclass(frozen=True, slots=True)
class LinesSource:
    path: Template
    span: Span | None = _SPAN


@dataclass(frozen=True, slots=True)
class UpstreamSource:
    """``for x in JOB.STEP.OUT``: one task per task of JOB."""

    ref: Ref
    span: Span | None = _SPAN


@dataclass(frozen=True, slots=True)
class TilesSource:
    """``tiles(GLOB, size = S, buffer = B, origin = [X, Y])``: one task per tile of a square
    grid that meets the LAS/LAZ files GLOB matches. ``buffer`` and ``origin`` are None when
    not given (0 and ``[0, 0]``)."""

    pattern: Template
    size: Value | None
    buffer: Value | None = None
    origin: Literal | Ref | ValueList | None = None
    span: Span | None = _SPAN


Source = GlobSource | ListSource | RangeSource | LinesSource | UpstreamSource | TilesSource


@dataclass(frozen=True, slots=True)
class Param:
    name: Name
    value: Literal
    span: Span | None = _SPAN


@dataclass(frozen=True, slots=True)
class Shared:
    name: Name
    path: Template
    span: Span | None = _SPAN


@dataclass(frozen=True, slots=True)
class Output:
    folder: Template
    flat: bool
    span: Span | None = _SPAN


@dataclass(frozen=True, slots=True)
class Retries:
    value: Value
    span: Span | None = _SPAN


@dataclass(frozen=True, slots=True)
class Threads:
    """``threads N``: engine slots (and threads) a step takes; a literal or a param."""

    value: Value
    span: Span | None = _SPAN


@dataclass(frozen=True, slots=True)
class Timeout:
    """``timeout DURATION``: ``value`` is the duration as written (a :class:`Literal` string
    such as ``"1h30m"``, or a number), or a param."""

    value: Value
    span: Span | None = _SPAN


@dataclass(frozen=True, slots=True)
class Out:
    name: Name
    path: Template
    temp: bool
    span: Span | None = _SPAN


@dataclass(frozen=True, slots=True)
class In:
    """One item of an ``in`` statement: a name (``Ref``) or a file (``Template``)."""

    item: Ref | Template
    span: Span | None = _SPAN


@dataclass(frozen=True, slots=True)
class Word:
    """One word of a ``run`` line, as a template."""

    template: Template
    span: Span | None = _SPAN


@dataclass(frozen=True, slots=True)
class Run:
    """``run WORD ...``; ``shell`` names the shell (``sh`` or ``bash``) of ``run sh "script"``,
    ``run sh -c "script"`` and ``run bash -c "script"``, whose script is the last word ("" for
    any other run line).

    ``shell_problems`` lists, with their places, the mistakes in a shell script that the checker
    reports: a placeholder where its value would not arrive as it is (inside the script's own
    quotes, after a backslash, ...), the script naming ``$1``, ``$@`` or ``$*`` itself.
    """

    words: tuple[Word, ...]
    shell: str = ""
    shell_problems: tuple[tuple[Span | None, str], ...] = field(default=(), compare=False)
    span: Span | None = _SPAN


@dataclass(frozen=True, slots=True)
class Kwarg:
    name: Name
    value: Value
    span: Span | None = _SPAN


@dataclass(frozen=True, slots=True)
class Call:
    """``call pkg.mod:fn(key = value, ...)``."""

    module: str
    function: str
    kwargs: tuple[Kwarg, ...]
    span: Span | None = _SPAN

    @property
    def target(self) -> str:
        return f"{self.module}:{self.function}"


@dataclass(frozen=True, slots=True)
class Step:
    name: Name
    outs: tuple[Out, ...]
    ins: tuple[In, ...]
    actions: tuple[Run | Call, ...]
    span: Span | None = _SPAN
    threads: tuple[Threads, ...] = ()
    timeouts: tuple[Timeout, ...] = ()

    @property
    def action(self) -> Run | Call | None:
        return self.actions[0] if self.actions else None


@dataclass(frozen=True, slots=True)
class Job:
    name: Name
    var: Name | None
    source: Source | None
    shared: tuple[Shared, ...]
    outputs: tuple[Output, ...]
    retries: tuple[Retries, ...]
    steps: tuple[Step, ...]
    span: Span | None = _SPAN
    threads: tuple[Threads, ...] = ()
    timeouts: tuple[Timeout, ...] = ()


@dataclass(frozen=True, slots=True)
class Pipeline:
    name: Name | None
    params: tuple[Param, ...]
    jobs: tuple[Job, ...]
    span: Span | None = _SPAN
