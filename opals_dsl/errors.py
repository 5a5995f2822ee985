"""The error family of opf, one class per stage, each knowing how it is shown and its exit status.

* :class:`OpfSyntaxError` — the file does not parse (the parse stops at the first one);
* :class:`OpfCheckError` — the file parses but says something wrong (every one is collected);
* :class:`PlanError` — the pipeline cannot be lowered to a plan (files, globs, destinations);
* :class:`ClusterError` — no cluster could be started or reached (exit 3);
* :class:`UsageError` — a bad command line, or a file or folder named on it that cannot be
  used (exit 2);
* :class:`ReportError` — no report can be made of a run (exit 2).

Every error a person should read is an :class:`OpfError`; anything else that escapes is a bug in
opf, shown as an internal error with its traceback and :data:`EXIT_INTERNAL`. The exit statuses
are defined here, once.

A bad ``--param`` is reported among the check errors (it has no place in the file). A task
that fails is not an exception: the run's summary carries it, and ``opf run`` exits 1.

Pipeline-file errors carry :class:`Diagnostic` records with structured fields (place, message),
so tests can assert fields and the command line renders them with the source line and a caret.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .source import SourceFile, Span, render_diagnostic

#: how many diagnostics are shown before "... and N more"
MAX_SHOWN = 50


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One finding: where (``span``, may be None for command-line problems) and what."""

    span: Span | None
    message: str
    source: SourceFile | None = field(default=None, compare=False, repr=False)

    def render(self) -> str:
        return render_diagnostic(self.source, self.span, self.message)


#: every task done (or skipped as unchanged)
EXIT_OK = 0
#: a task failed, or the run was stopped before every task ran
EXIT_FAILED = 1
#: the pipeline file or the command line is invalid
EXIT_INVALID = 2
#: the cluster could not be started or reached, or every engine was lost
EXIT_CLUSTER = 3
#: a bug in opf itself (sysexits' EX_SOFTWARE): shown with its traceback
EXIT_INTERNAL = 70
#: stopped by Ctrl-C (128 + SIGINT, as shells report it)
EXIT_INTERRUPTED = 130


class OpfError(Exception):
    """Root of every error opf reports to a person; ``exit_code`` is the process status."""

    exit_code = EXIT_INVALID

    def render(self) -> str:
        return str(self)


class PipelineError(OpfError):
    """An error in a pipeline file or its parameters: one or more diagnostics."""

    def __init__(self, diagnostics: Iterable[Diagnostic]) -> None:
        self.diagnostics = sorted(
            diagnostics,
            key=lambda d: (
                d.span is not None,
                d.span.file if d.span else "",
                d.span.line if d.span else 0,
                d.span.column if d.span else 0,
            ),
        )
        super().__init__("\n".join(d.render() for d in self.diagnostics))

    def render(self) -> str:
        shown = [d.render() for d in self.diagnostics[:MAX_SHOWN]]
        more = len(self.diagnostics) - MAX_SHOWN
        if more > 0:
            shown.append(f"... and {more} more")
        count = len(self.diagnostics)
        shown.append(f"{count} error{'s' if count != 1 else ''} found; nothing was run.")
        return "\n".join(shown)

    @property
    def first(self) -> Diagnostic:
        return self.diagnostics[0]


class OpfSyntaxError(PipelineError):
    """The pipeline file does not parse."""


class OpfCheckError(PipelineError):
    """The pipeline file parses but is wrong (unknown names, duplicates, cycles, ...)."""


class PlanError(PipelineError):
    """The pipeline cannot be lowered to a plan (missing files, clashing destinations, ...)."""


class ClusterError(OpfError):
    """The ipyparallel cluster could not be started or reached."""

    exit_code = EXIT_CLUSTER

    def render(self) -> str:
        return f"opf: error: {self}"


class UsageError(OpfError):
    """A bad command line (a bad option or combination of options), or a file or folder it
    names that cannot be used; the message is one sentence saying what to do instead."""

    def render(self) -> str:
        return f"opf: error: {self}"


class ReportError(OpfError):
    """No report can be made (no trace in the state folder, or nothing readable in it)."""

    def render(self) -> str:
        return f"opf: error: {self}"
