"""What a step may take: its ``threads`` (engine slots of its machine) and its ``timeout``.

Both are written at job level (a default for the job's steps) or at step level (for that step);
the step's own line wins. Values are literals or params: ``threads`` a whole number, 1 or more;
``timeout`` a duration — whole numbers with the units ``s``, ``m``, ``h`` and ``d`` written
together (``90s``, ``30m``, ``2h``, ``1h30m``) — or, from a param, such a string or a number of
seconds. :func:`check_limits` reports what is wrong at its place; :func:`step_limits` gives the
values the planner writes into the plan.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from ..source import Span
from . import nodes as n
from .scope import CTX_JOB, Binding, ResolveError, Scope, as_written

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(?:(\d+)([smhd]))+")
_PART = re.compile(r"(\d+)([smhd])")

DURATION_HINT = "write whole numbers with a unit: 90s, 30m, 2h or 1h30m"


class LimitError(ValueError):
    """A ``threads`` or ``timeout`` value that cannot be used; the message says why."""


def parse_duration(text: str) -> float:
    """``"1h30m"`` → ``5400.0``; raises :class:`LimitError` for anything else."""
    t = text.strip()
    if not _DURATION.fullmatch(t):
        raise LimitError(f"'{text}' is not a duration; {DURATION_HINT}")
    seconds = sum(int(v) * _UNITS[u] for v, u in _PART.findall(t))
    if seconds <= 0:
        raise LimitError(f"a timeout must be longer than 0s, not '{text}'")
    return float(seconds)


def _value(v: n.Value, params: Mapping[str, object]) -> tuple[object, str]:
    """The value a ``threads`` or ``timeout`` line gives, and how to name it in a message."""
    if isinstance(v, n.Ref):
        value = params.get(v.parts[0])
        return value, f"but parameter '{v.parts[0]}' is {as_written(value)}"
    value = v.value if isinstance(v, n.Literal) else None
    return value, f"not {as_written(value)}"


def threads_of(v: n.Value, params: Mapping[str, object]) -> int:
    value, shown = _value(v, params)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LimitError(f"threads takes a whole number, 1 or more, {shown}")
    return value


def timeout_of(v: n.Value, params: Mapping[str, object]) -> float:
    value, shown = _value(v, params)
    if isinstance(value, str):
        if isinstance(v, n.Ref) and not _DURATION.fullmatch(value.strip()):
            raise LimitError(f"timeout takes a duration, {shown}; {DURATION_HINT}")
        return parse_duration(value)
    if isinstance(v, n.Ref) and isinstance(value, (int, float)) and not isinstance(value, bool):
        if value > 0:
            return float(value)  # a param may give seconds
        raise LimitError(f"a timeout must be longer than 0 seconds, {shown}")
    if isinstance(v, n.Ref):
        raise LimitError(f"timeout takes a duration (or a number of seconds), {shown}; "
                         f"{DURATION_HINT}")
    raise LimitError(f"a timeout needs a unit, {shown}; {DURATION_HINT}")


def step_limits(job: n.Job, step: n.Step, params: Mapping[str, object]
                ) -> tuple[int, float | None]:
    """The step's threads and timeout (seconds or None), its own lines before its job's;
    values that cannot be used count as not written (the checker reports them)."""
    threads, timeout = 1, None
    for line in (step.threads or job.threads)[:1]:
        try:
            threads = threads_of(line.value, params)
        except LimitError:
            pass
    for tline in (step.timeouts or job.timeouts)[:1]:
        try:
            timeout = timeout_of(tline.value, params)
        except LimitError:
            pass
    return threads, timeout


def check_limits(job: n.Job, scope: Scope, params: Mapping[str, object],
                 error: Callable[[Span | None, str], None]) -> None:
    """Report every ``threads`` or ``timeout`` line of a job and its steps that is repeated or
    whose value cannot be used, at its place."""
    for where, owner in [("a job", job), *(("a step", s) for s in job.steps)]:
        for what, lines in (("threads", owner.threads), ("timeout", owner.timeouts)):
            for extra in lines[1:]:
                error(extra.span, f"{where} has at most one '{what}' line; remove this one")
            for line in lines[:1]:
                value = line.value
                if isinstance(value, n.Ref):
                    try:
                        b: Binding | None = scope.resolve(value, CTX_JOB)
                    except ResolveError as exc:
                        error(value.span, exc.message)
                        continue
                    if b is None or b.kind != "param" or b.attr is not None:
                        error(value.span, f"{what} takes a value or a parameter holding one")
                        continue
                try:
                    if what == "threads":
                        threads_of(value, params)
                    else:
                        timeout_of(value, params)
                except LimitError as exc:
                    error(value.span, str(exc))

