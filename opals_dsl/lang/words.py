"""Templates and ``run`` lines: turning written text into literal parts and placeholders.

Two small scanners used by the parser, both keeping the source offset of every character so a
mistake inside a string or a command line is shown at its exact column:

* :func:`parse_template` — ``"{strip.stem}_dem.asc"`` → ``("", Ref(strip.stem), "_dem.asc")``;
  ``{{`` and ``}}`` are literal braces.
* :func:`split_run_line` — the text after ``run``, split into words as a POSIX shell would
  (quotes group, backslash escapes, ``#`` at the start of a word begins a comment, a backslash
  before the newline continues the line), each word then parsed as a template.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from ..source import SourceFile
from .nodes import Ref, Run, Template, Word

_NAME_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")

#: called with (start offset, end offset, message) for every mistake found
Report = Callable[[int, int, str], None]

_BRACE_HELP = "to write a literal brace, double it: '{{' or '}}'"


def parse_template(
    source: SourceFile, chars: str, offsets: list[int], report: Report, *,
    closing: int | None = None,
) -> tuple[Template, list[int]]:
    """Split ``chars`` (each at ``offsets[i]`` in the source) into text and placeholders.

    Returns the template and, for each placeholder, the index in ``chars`` where it starts.
    """
    parts: list[str | Ref] = []
    starts: list[int] = []
    text: list[str] = []
    i, n = 0, len(chars)
    end_offset = closing if closing is not None else (offsets[-1] + 1 if offsets else 0)

    def off(k: int) -> int:
        return offsets[k] if k < n else end_offset

    while i < n:
        c = chars[i]
        if c == "{" and i + 1 < n and chars[i + 1] == "{":
            text.append("{")
            i += 2
        elif c == "}" and i + 1 < n and chars[i + 1] == "}":
            text.append("}")
            i += 2
        elif c == "{":
            close = chars.find("}", i + 1)
            inner = chars[i + 1 : close] if close >= 0 else ""
            if close < 0:
                report(off(i), off(i) + 1, f"this '{{' is never closed by '}}'; {_BRACE_HELP}")
                text.append(chars[i:])
                break
            if not _NAME_PATH.match(inner):
                what = f"'{{{inner}}}' is not a name" if inner.strip() else "'{}' holds no name"
                report(
                    off(i), off(close) + 1,
                    f"{what}: braces hold a name like {{strip.stem}}; {_BRACE_HELP} "
                    "(e.g. awk '{{print $1}}')",
                )
                text.append(chars[i : close + 1])
                i = close + 1
                continue
            if text:
                parts.append("".join(text))
                text = []
            parts.append(Ref(tuple(inner.split(".")), source.span(off(i), off(close) + 1)))
            starts.append(i)
            i = close + 1
        elif c == "}":
            report(off(i), off(i) + 1, f"this '}}' closes no '{{'; {_BRACE_HELP}")
            text.append(c)
            i += 1
        else:
            text.append(c)
            i += 1
    if text:
        parts.append("".join(text))
    span = source.span(offsets[0], end_offset) if offsets else None
    return Template(tuple(parts), span), starts


def string_chars(token_text: str, start: int, report: Report) -> tuple[str, list[int], int]:
    """Unescape a double-quoted string token; returns its characters, their offsets, and the
    offset of the closing quote."""
    chars: list[str] = []
    offsets: list[int] = []
    i = 1
    body_end = len(token_text) - 1
    while i < body_end:
        c = token_text[i]
        if c == "\\":
            nxt = token_text[i + 1] if i + 1 < body_end + 1 else ""
            if nxt in ('"', "\\"):
                chars.append(nxt)
                offsets.append(start + i)
                i += 2
                continue
            report(
                start + i, start + i + 2,
                f"unknown escape '\\{nxt}' in a string: only \\\" and \\\\ are escapes; "
                "write '\\\\' for a backslash (or use '/' in paths)",
            )
            chars.append(c)
            offsets.append(start + i)
            i += 1
            continue
        chars.append(c)
        offsets.append(start + i)
        i += 1
    return "".join(chars), offsets, start + body_end


def split_run_line(source: SourceFile, line: str, start: int, report: Report) -> Run:
    """Split a ``run`` token (``line``, at offset ``start`` in the source) into a :class:`Run`."""
    words: list[tuple[list[str], list[int], list[bool]]] = []
    i, n = 3, len(line)  # past "run"
    cur: tuple[list[str], list[int], list[bool]] | None = None

    def begin() -> tuple[list[str], list[int], list[bool]]:
        nonlocal cur
        if cur is None:
            cur = ([], [], [])
            words.append(cur)
        return cur

    while i < n:
        c = line[i]
        if c == "\\" and line.startswith("\n", i + 1):
            i += 2
            continue
        if c == "\\" and line.startswith("\r\n", i + 1):
            i += 3
            continue
        if c in " \t\r\n":
            cur = None
            i += 1
            continue
        if c == "#" and cur is None:
            nl = line.find("\n", i)
            if nl < 0:
                break
            i = nl
            continue
        w = begin()
        if c == "'":
            close = line.find("'", i + 1)
            if close < 0:
                report(start + i, start + i + 1,
                       "this single quote is never closed on the run line; add the closing '")
                return Run((), span=source.span(start, start + n))
            for k in range(i + 1, close):
                w[0].append(line[k])
                w[1].append(start + k)
                w[2].append(True)
            i = close + 1
        elif c == '"':
            k = i + 1
            while k < n and line[k] != '"':
                if line[k] == "\\" and k + 1 < n and line[k + 1] in '"\\$`\n':
                    if line[k + 1] != "\n":
                        w[0].append(line[k + 1])
                        w[1].append(start + k + 1)
                        w[2].append(True)
                    k += 2
                    continue
                w[0].append(line[k])
                w[1].append(start + k)
                w[2].append(True)
                k += 1
            if k >= n:
                report(start + i, start + i + 1,
                       'this double quote is never closed on the run line; add the closing "')
                return Run((), span=source.span(start, start + n))
            i = k + 1
        elif c == "\\":
            if i + 1 < n:
                w[0].append(line[i + 1])
                w[1].append(start + i + 1)
                w[2].append(False)
            i += 2
        else:
            w[0].append(c)
            w[1].append(start + i)
            w[2].append(False)
            i += 1

    out: list[Word] = []
    parsed: list[tuple[Template, list[int]]] = []
    for chars, offsets, _quoted in words:
        text = "".join(chars)
        tpl, starts = parse_template(source, text, offsets, report)
        parsed.append((tpl, starts))
        out.append(Word(tpl, tpl.span))
    span = source.span(start, start + len(line.rstrip()))
    shell = len(words) == 2 and "".join(words[0][0]) == "sh" and bool(words[1][2]) and all(
        words[1][2]
    )
    quoted_refs: list[Ref] = []
    if shell:
        script = "".join(words[1][0])
        state = _shell_quote_states(script)
        tpl, starts = parsed[1]
        for ref, idx in zip(tpl.refs, starts, strict=True):
            if state[idx]:
                quoted_refs.append(ref)
    return Run(tuple(out), shell=shell, shell_quoted=tuple(quoted_refs), span=span)


def _shell_quote_states(script: str) -> list[bool]:
    """For each character of a shell script: is it inside shell quotes?"""
    states: list[bool] = []
    single = double = False
    i = 0
    while i < len(script):
        c = script[i]
        states.append(single or double)
        if c == "\\" and not single and i + 1 < len(script):
            states.append(single or double)
            i += 2
            continue
        if c == "'" and not double:
            single = not single
        elif c == '"' and not single:
            double = not double
        i += 1
    return states

