"""Source text and positions: the first stage of the front end.

A :class:`SourceFile` holds the text of one pipeline file (read only if it is a regular file of
at most :data:`MAX_FILE_BYTES`); a :class:`Span` is a place in it (1-based line and column, end
exclusive), found by bisection in a table of line starts, so a place costs no more in a large
file than in a small one. :func:`render_diagnostic` turns a place and a message
into what a person reads::

    strips.opf:12:9: error: unknown name 'celll'; did you mean 'cell'?
        run python {tool} grid --cell {celll}
                                       ^^^^^
"""

from __future__ import annotations

import bisect
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

#: the largest pipeline file opf reads; checking one takes about 150 bytes of memory per byte
#: of the file (the parse tree), so this bounds it near 5 GB, while 100,000 jobs written out one
#: by one take about 12 MB
MAX_FILE_BYTES = 32 * 1024 * 1024
#: the longest source line shown under a message; of a longer one, a window around the place
SHOWN_LINE = 160


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
    # the offset where each line starts, made on first need: a place is found by bisection, so
    # the thousands of places a large file's parse asks for cost no more than reading it once
    _starts: list[int] | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def read(cls, path: str | Path) -> SourceFile:
        """Read a pipeline file: a regular file of at most :data:`MAX_FILE_BYTES`, UTF-8.

        Raises :class:`SourceTooLarge` or :class:`NotARegularFile` (both ``OSError``s with a
        message for people) before reading a byte of a file that is neither, so a device or a
        named pipe given as the pipeline cannot keep ``opf`` reading for ever.
        """
        path = Path(path)
        with open(path, "rb", opener=_nonblocking) as fh:
            info = os.fstat(fh.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise NotARegularFile(str(path), "a pipeline file")
            if info.st_size > MAX_FILE_BYTES:
                raise SourceTooLarge(str(path), info.st_size, MAX_FILE_BYTES, "a pipeline file")
            data = fh.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:  # it grew while being read
            raise SourceTooLarge(str(path), len(data), MAX_FILE_BYTES, "a pipeline file")
        return cls(name=str(path), text=data.decode("utf-8"))

    def _line_starts(self) -> list[int]:
        starts = self._starts
        if starts is None:
            starts = [0]
            find = self.text.find
            at = find("\n")
            while at >= 0:
                starts.append(at + 1)
                at = find("\n", at + 1)
            object.__setattr__(self, "_starts", starts)
        return starts

    def line(self, number: int) -> str:
        # only "\n" ends a line of the file (str.splitlines also breaks at U+2028, form feeds...)
        starts = self._line_starts()
        if not 1 <= number <= len(starts):
            return ""
        begin = starts[number - 1]
        end = starts[number] - 1 if number < len(starts) else len(self.text)
        return self.text[begin:end].removesuffix("\r")

    def offset(self, line: int, column: int) -> int:
        """The character offset of a 1-based (line, column)."""
        starts = self._line_starts()
        return starts[max(0, min(line, len(starts)) - 1)] + column - 1

    def text_at(self, span: Span) -> str:
        """The text a span covers, as written."""
        return self.text[self.offset(span.line, span.column):
                         self.offset(span.end_line, span.end_column)]

    def position(self, offset: int) -> tuple[int, int]:
        """1-based (line, column) of a character offset."""
        offset = max(0, min(offset, len(self.text)))
        starts = self._line_starts()
        line = bisect.bisect_right(starts, offset)
        return line, offset - starts[line - 1] + 1

    def span(self, start: int, end: int) -> Span:
        """The span of the half-open character range [start, end)."""
        line, column = self.position(start)
        end_line, end_column = self.position(max(start, end))
        return Span(self.name, line, column, end_line, end_column)


class NotARegularFile(OSError):
    """A file opf must read whole is a device, a named pipe or a socket."""

    def __init__(self, path: str, what: str) -> None:
        super().__init__(
            f"{path} is not a regular file (a device, named pipe or socket would be read for "
            f"ever); {what} must be an ordinary file"
        )
        self.path = path


class SourceTooLarge(OSError):
    """A file opf must read whole is larger than the limit for it."""

    def __init__(self, path: str, size: int, limit: int, what: str) -> None:
        super().__init__(
            f"{path} is {_mib(size)}, more than the {_mib(limit)} that {what} may have"
        )
        self.path = path


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MiB" if size % (1024 * 1024) else (
        f"{size // (1024 * 1024)} MiB")


def _nonblocking(path: str, flags: int) -> int:
    # a named pipe without a writer would block the open itself; O_NONBLOCK lets it return so
    # that the file's type can be looked at (a regular file ignores the flag)
    return os.open(path, flags | os.O_NONBLOCK)


def render_diagnostic(
    source: SourceFile | None, span: Span | None, message: str, severity: str = "error"
) -> str:
    """``file:line:col: error: message``, then the source line and a caret under the place;
    ``opf: error: message`` for a finding that has no place in the file (a ``--param``), as
    for the command line's other errors."""
    if span is None:
        return f"opf: {severity}: {message}"
    head = f"{span}: {severity}: {message}"
    if source is None:
        return head
    text = source.line(span.line).expandtabs(1)
    if not text.strip():
        return head
    width = 1
    if span.end_line == span.line and span.end_column > span.column:
        width = span.end_column - span.column
    column = span.column
    if len(text) > SHOWN_LINE:  # a window of a very long line around the place
        begin = max(0, min(column - 1 - SHOWN_LINE // 3, len(text) - SHOWN_LINE))
        end = begin + SHOWN_LINE
        before, after = ("..." if begin else ""), ("..." if end < len(text) else "")
        text = before + text[begin:end] + after
        column = column - begin + len(before)
        width = min(width, end - begin - (column - len(before)) + 1)
    width = max(1, min(width, len(text) - column + 1))
    caret = " " * (column - 1) + "^" * width
    return f"{head}\n    {text}\n    {caret}"
