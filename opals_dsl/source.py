"""Source text and positions: the first stage of the front end.

A :class:`SourceFile` holds the text of one pipeline file; a :class:`Span` is a place in it
(1-based line and column, end exclusive). :func:`render_diagnostic` turns a place and a message
into what a person reads::

    strips.opf:12:9: error: unknown name 'celll'; did you mean 'cell'?
        run python {tool} grid --cell {celll}
                                       ^^^^^
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Span:
    """A place in a source file: 1-based line and column; the end is exclusive."""

    file: str
    line: int
    column: int
    end_line: int
    end_column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


@dataclass(frozen=True, slots=True)
class SourceFile:
    """The text of one pipeline file and the name it is shown under."""

    name: str
    text: str

    @classmethod
    def read(cls, path: str | Path) -> SourceFile:
        path = Path(path)
        return cls(name=str(path), text=path.read_text(encoding="utf-8"))

    def line(self, number: int) -> str:
        # only "\n" ends a line of the file (str.splitlines also breaks at U+2028, form feeds...)
        lines = self.text.split("\n")
        if 1 <= number <= len(lines):
            return lines[number - 1].removesuffix("\r")
        return ""

    def position(self, offset: int) -> tuple[int, int]:
        """1-based (line, column) of a character offset."""
        offset = max(0, min(offset, len(self.text)))
        line = self.text.count("\n", 0, offset) + 1
        start = self.text.rfind("\n", 0, offset) + 1
        return line, offset - start + 1

    def span(self, start: int, end: int) -> Span:
        """The span of the half-open character range [start, end)."""
        line, column = self.position(start)
        end_line, end_column = self.position(max(start, end))
        return Span(self.name, line, column, end_line, end_column)


def render_diagnostic(
    source: SourceFile | None, span: Span | None, message: str, severity: str = "error"
) -> str:
    """``file:line:col: error: message``, then the source line and a caret under the place."""
    if span is None:
        return f"{severity}: {message}"
    head = f"{span}: {severity}: {message}"
    if source is None:
        return head
    text = source.line(span.line).expandtabs(1)
    if not text.strip():
        return head
    width = 1
    if span.end_line == span.line and span.end_column > span.column:
        width = span.end_column - span.column
    width = max(1, min(width, len(text) - span.column + 1))
    caret = " " * (span.column - 1) + "^" * width
    return f"{head}\n    {text}\n    {caret}"
