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
For tools, :func:`finding` turns a diagnostic (or a problem without a place, such as a missing
file) into a plain record and :func:`render_findings` writes a list of them as JSON or as GitHub
workflow annotations (``opf check --format json|github``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .source import SourceFile, Span, render_diagnostic

#: how many diagnostics are shown before "... and N more"
MAX_SHOWN = 50


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One finding: where (``span``, may be None for command-line problems) and what."""

    span: Span | None
    message: str
    source: SourceFile | None = field(default=None, compare=False, repr=False)
    #: ``error`` (nothing runs) or ``warning`` (a likely mistake; ``--strict`` makes it an error)
    severity: str = "error"

    def render(self) -> str:
        return render_diagnostic(self.source, self.span, self.message, self.severity)

    def as_error(self) -> Diagnostic:
        """This finding with severity ``error`` (``--strict``)."""
        return Diagnostic(self.span, self.message, self.source)


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


def plural(n: int, word: str) -> str:
    """``plural(1, "error")`` → ``"1 error"``, ``plural(2, "error")`` → ``"2 errors"``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def by_place(diagnostics: Iterable[Diagnostic]) -> list[Diagnostic]:
    """Diagnostics in the order of the file (those without a place first)."""
    return sorted(
        diagnostics,
        key=lambda d: (
            d.span is not None,
            d.span.file if d.span else "",
            d.span.line if d.span else 0,
            d.span.column if d.span else 0,
        ),
    )


def not_utf8(name: str, exc: UnicodeDecodeError) -> str:
    """What is said of a file ``name`` whose text (all of it, ``exc.object``) is not UTF-8:
    the first byte that is not, by line and column (in characters, as diagnostics count)."""
    data = bytes(exc.object)
    line = data.count(b"\n", 0, exc.start) + 1
    begins = data.rfind(b"\n", 0, exc.start) + 1
    column = len(data[begins:exc.start].decode("utf-8", errors="replace")) + 1
    return (f"{name} is not UTF-8 text ({exc.reason}: byte 0x{data[exc.start]:02x} at line "
            f"{line}, column {column})")


def error_line(message: str) -> str:
    """A message as ``opf`` shows an error on the command line."""
    return f"opf: error: {message}"


class OpfError(Exception):
    """Root of every error opf reports to a person; ``exit_code`` is the process status."""

    exit_code = EXIT_INVALID

    def render(self) -> str:
        return str(self)


class PipelineError(OpfError):
    """An error in a pipeline file or its parameters: one or more diagnostics."""

    def __init__(self, diagnostics: Iterable[Diagnostic],
                 warnings: Iterable[Diagnostic] = ()) -> None:
        self.diagnostics = by_place(diagnostics)
        #: the warnings found beside the errors (shown with them, in the order of the file)
        self.warnings = by_place(warnings)
        super().__init__("\n".join(d.render() for d in self.diagnostics))

    def with_warnings(self, warnings: Iterable[Diagnostic]) -> PipelineError:
        """This error, also carrying ``warnings`` (found by an earlier stage)."""
        self.warnings = by_place([*warnings, *self.warnings])
        return self

    def render(self) -> str:
        # a warning first where an error has the same place: it often says why
        found = by_place([*self.warnings, *self.diagnostics])
        shown = [d.render() for d in found[:MAX_SHOWN]]
        more = len(found) - MAX_SHOWN
        if more > 0:
            shown.append(f"... and {more} more")
        count = len(self.diagnostics)
        also = f" and {plural(len(self.warnings), 'warning')}" if self.warnings else ""
        shown.append(f"{plural(count, 'error')}{also} found; nothing was run.")
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


class _SentenceError(OpfError):
    """An error said in one sentence, with no place in a pipeline file."""

    def render(self) -> str:
        return error_line(str(self))


class ClusterError(_SentenceError):
    """The ipyparallel cluster could not be started or reached."""

    exit_code = EXIT_CLUSTER


class UsageError(_SentenceError):
    """A bad command line (a bad option or combination of options), or a file or folder it
    names that cannot be used; the message is one sentence saying what to do instead."""


class ThreadsError(_SentenceError):
    """A step needs more threads than the largest machine of the cluster has engines: the
    pipeline cannot run there (exit status 2, before anything runs)."""


class ReportError(_SentenceError):
    """No report can be made (no trace in the state folder, or nothing readable in it)."""


class FormatError(_SentenceError):
    """``opf fmt``'s layout would change what a file says (a bug in opf); the file is left
    alone."""


# -- findings for tools ----------------------------------------------------------------------


def split_hint(message: str) -> tuple[str, str | None]:
    """``"what is wrong; how to fix it"`` → the two halves (the hint is None without a ``; ``).

    opf's messages say what is wrong, then after the first ``"; "`` what to do about it, so
    ``what + "; " + hint`` is always the message as printed.
    """
    what, sep, hint = message.partition("; ")
    return (what, hint) if sep and what and hint else (message, None)


def finding(what: Diagnostic | str, file: str | None = None, severity: str | None = None
            ) -> dict[str, Any]:
    """One finding as tools read it: ``file``, ``line``, ``column``, ``end_line``,
    ``end_column`` (1-based, the end exclusive, as :class:`Span`; None where a problem has no
    place in the file, like a bad ``--param``), ``severity``, ``message`` and ``hint``.

    ``what`` is a diagnostic or the message of a problem without a place; ``file`` is the
    pipeline file it concerns, used when the diagnostic does not name one.
    """
    span = what.span if isinstance(what, Diagnostic) else None
    message = what.message if isinstance(what, Diagnostic) else what
    text, hint = split_hint(message)
    if severity is None:
        severity = what.severity if isinstance(what, Diagnostic) else "error"
    return {
        "file": span.file if span is not None else file,
        "line": span.line if span is not None else None,
        "column": span.column if span is not None else None,
        "end_line": span.end_line if span is not None else None,
        "end_column": span.end_column if span is not None else None,
        "severity": severity,
        "message": text,
        "hint": hint,
    }


def _annotation_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _annotation_property(text: str) -> str:
    return _annotation_data(text).replace(":", "%3A").replace(",", "%2C")


def github_annotation(f: dict[str, Any]) -> str:
    """A finding as a GitHub Actions workflow command: ``::error file=F,line=L,col=C,...::msg``.

    GitHub's columns are 1-based and its ``endColumn`` is the last column of the place, so the
    exclusive end of a span is one less; columns are only given for a place on one line.
    """
    props = []
    if f.get("file"):
        props.append(f"file={_annotation_property(str(f['file']))}")
    if f.get("line") is not None:
        props.append(f"line={f['line']}")
        end_line = f.get("end_line") or f["line"]
        if end_line == f["line"] and f.get("column") is not None:
            end_column = max(f["column"], (f.get("end_column") or f["column"] + 1) - 1)
            props += [f"col={f['column']}", f"endColumn={end_column}"]
        elif end_line != f["line"]:
            props.append(f"endLine={end_line}")
    props.append("title=opf check")
    message = f["message"] if f.get("hint") is None else f"{f['message']}; {f['hint']}"
    level = f.get("severity") if f.get("severity") in ("error", "warning", "notice") else "error"
    return f"::{level} {','.join(props)}::{_annotation_data(message)}"


def render_findings(findings: list[dict[str, Any]], form: str) -> str:
    """The findings as ``json`` (a list, one object per finding) or ``github`` annotations."""
    if form == "json":
        return json.dumps(findings, indent=2, ensure_ascii=False) + "\n"
    if form == "github":
        return "".join(github_annotation(f) + "\n" for f in findings)
    raise ValueError(f"unknown format {form!r}")
