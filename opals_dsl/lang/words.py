"""Templates and ``run`` lines: turning written text into literal parts and placeholders.

Two small scanners used by the parser, both keeping the source offset of every character so a
mistake inside a string or a command line is shown at its exact column:

* :func:`parse_template` — ``"{strip.stem}_dem.asc"`` → ``("", Ref(strip.stem), "_dem.asc")``;
  ``{{`` and ``}}`` are literal braces.
* :func:`split_run_line` — the text after ``run``, split into words as a POSIX shell would
  (quotes group, backslash escapes, ``#`` at the start of a word begins a comment, a backslash
  before the newline continues the line), each word then parsed as a template.

and, for the script of ``run sh "..."``, :func:`shell_places`: where each placeholder stands in
the shell text (the planner makes it a positional parameter, ``"$1"``; the checker refuses
the places where that would not stay one word holding the value).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from ..source import SourceFile, Span
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
    words = _shell_words(line, start, report)
    if words is None:
        return Run((), span=source.span(start, start + len(line)))
    out: list[Word] = []
    parsed: list[tuple[Template, list[int]]] = []
    for chars, offsets, _quoted in words:
        text = "".join(chars)
        tpl, starts = parse_template(source, text, offsets, report)
        parsed.append((tpl, starts))
        out.append(Word(tpl, tpl.span))
    span = source.span(start, start + len(line.rstrip()))
    shell = _shell_of(["".join(chars) for chars, _, _ in words], words[-1][2]) if words else ""
    problems: list[tuple[Span | None, str]] = []
    if shell:
        chars, offsets, _quoted = words[-1]
        problems = _script_problems(source, "".join(chars), offsets, *parsed[-1])
    return Run(tuple(out), shell=shell, shell_problems=tuple(problems), span=span)


def _shell_of(texts: list[str], last_quoted: list[bool]) -> str:
    """The shell of a run line that is a shell script in quotes — ``sh "SCRIPT"``, ``sh -c
    "SCRIPT"`` or ``bash -c "SCRIPT"``, the script quoted as a whole —, else ""."""
    if not (last_quoted and all(last_quoted)):
        return ""
    if (texts[:1] == ["sh"] and len(texts) == 2) or (
            len(texts) == 3 and texts[1] == "-c" and texts[0] in ("sh", "bash")):
        return texts[0]
    return ""


_COMMENT_CONTINUED = (
    "a comment ends the run line: this backslash belongs to the comment and continues "
    "nothing; end the comment's line without it, and put the comment on the command's last "
    "line or on a line of its own")


def _comment_continued(line: str, i: int, start: int, report: Report) -> None:
    """Report the backslash that ends the comment at ``i`` of a run line: the line went on past
    the comment only through it, yet it is the comment's text and continues nothing."""
    nl = line.find("\n", i)
    report(start + nl - (2 if line[nl - 1] == "\r" else 1), start + nl, _COMMENT_CONTINUED)


def continued_comment(line: str, start: int) -> tuple[int, int, str] | None:
    """The backslash that ends a comment of the run line ``line`` (at offset ``start`` of its
    file) and so took in the lines after it: its span and what to say, if there is one."""
    said: list[tuple[int, int, str]] = []
    _shell_words(line, start, lambda a, b, msg: said.append((a, b, msg)))
    return next((s for s in said if s[2] == _COMMENT_CONTINUED), None)


def _shell_words(line: str, start: int, report: Report
                 ) -> list[tuple[list[str], list[int], list[bool]]] | None:
    """The words of a ``run`` line as a POSIX shell splits them: each word's characters, their
    offsets in the source and whether each stood in quotes; None (reported) if a quote is
    never closed."""
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
            if "\n" in line[i:]:
                _comment_continued(line, i, start, report)
                return None
            break
        w = begin()
        if c == "'":
            close = line.find("'", i + 1)
            if close < 0:
                report(start + i, start + i + 1,
                       "this single quote is never closed on the run line; add the closing '")
                return None
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
                return None
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

    return words


def _script_problems(
    source: SourceFile, text: str, offsets: list[int], tpl: Template, starts: list[int]
) -> list[tuple[Span | None, str]]:
    """What is wrong with a ``run sh`` script (its text, each character at ``offsets``)."""
    cs: list[str | None] = []
    offs: list[int] = []
    at_start = dict(zip(starts, tpl.refs, strict=True))
    refs: dict[int, Ref] = {}
    ends: list[int] = []
    k = 0
    while k < len(text):
        offs.append(offsets[k])
        if k in at_start:
            refs[len(cs)] = at_start[k]
            cs.append(None)
            k = text.index("}", k) + 1
        else:
            cs.append(text[k])
            k += 2 if text[k] in "{}" and text[k + 1 : k + 2] == text[k] else 1
        ends.append(offsets[k - 1] + 1)
    places, positional = scan_shell(cs)
    problems: list[tuple[Span | None, str]] = []
    for index, ref in refs.items():
        why = places[index][0]
        if why is not None:
            problems.append((ref.span, misplaced_message(ref.dotted, why)))
    for a, b in positional:
        name = "".join(c or "" for c in cs[a:b])
        problems.append((source.span(offs[a], ends[b - 1]), positional_message(name)))
    return problems


# -- run sh: where each placeholder stands in the script ----------------------------------------
#
# A ``run sh`` script is the pipeline author's shell code; the values of its placeholders never
# become part of it. The planner writes each placeholder as a quoted reference to a positional
# parameter (``"$1"``, ``"${12}"``; a list as ``"$3" "$4" ...``) and passes the values after the
# script: ``/bin/sh -c SCRIPT sh VALUE...``. The shell expands ``"$1"`` to exactly one word
# holding the value and never parses an expanded value as code (POSIX 2.6: the results of
# expansion undergo only field splitting, globbing and quote removal, and inside double quotes
# none of them). That holds wherever the reference stands as plain shell text; the scanner below
# finds the places where it would not: inside the script's own quotes (the ``"`` of ``"$1"``
# would close theirs), after a backslash or a ``$``, inside backticks, ``${...}``, arithmetic
# (bash evaluates ``a[$(cmd)]`` in a value there), ``[[ ... ]]`` and ``word[...]``. It scans as
# bash and as POSIX sh (dash) do — the two differ only in ``$'...'`` — and a placeholder must
# stand in plain text for both. The script may not name ``$1``, ``$@``, ``$*`` itself: those
# are the values.

_BLANKS = " \t\n"
_WORD_END = _BLANKS + ";&|<>()"
_POSITIONAL = "123456789@*"

#: why a placeholder may not stand in a context of the scanner
_MISPLACED = {
    "sq": "stands inside shell quotes",
    "ansi": "stands inside shell quotes",
    "dq": "stands inside shell quotes",
    "backslash": "follows a backslash",
    "dollar": "follows a '$'",
    "bt": "stands inside backticks",
    "brace": "stands inside '${...}'",
    "arith": "stands inside shell arithmetic",
    "dbr": "stands inside '[[ ... ]]'",
    "bracket": "stands inside '[...]' within a word",
    "case": "comes after a 'case' inside $(...) within quotes",
}

#: how to fix each; <REF> stands for the placeholder, <NAME> for its name
_MISPLACED_FIX = {
    "sq": "opf quotes every substituted value for the shell itself, so remove the quotes "
          "around it",
    "backslash": "the backslash would escape the quoting opf gives the value; remove it (a "
                 "literal brace is written '{{')",
    "dollar": "<REF> is opf's value, not a shell variable; remove the '$' (the shell variable "
              "would be written '${{<NAME>}}')",
    "bt": "backticks quote differently; write $(...) instead",
    "brace": "give the value to a shell variable first (v=<REF>) and use that",
    "arith": "bash evaluates a value there as an expression and would run a command written in "
             "it; compute with a program instead (e.g. expr <REF> + 1)",
    "dbr": "bash evaluates the operands of -eq, -lt and the like there as expressions and would "
           "run a command written in a value; use '[ ... ]' instead",
    "bracket": "bash may evaluate a value there as an expression (an array index); write it as a "
               "word of its own",
    "case": "a pattern's ')' there makes the rest of the script ambiguous to read; write the "
            "case as a command of its own, outside the quotes",
}
_MISPLACED_FIX["ansi"] = _MISPLACED_FIX["dq"] = _MISPLACED_FIX["sq"]


def misplaced_message(dotted: str, why: str) -> str:
    """The error for placeholder ``{dotted}`` standing where a ``run sh`` value may not."""
    fix = _MISPLACED_FIX[why].replace("<REF>", "{" + dotted + "}").replace("<NAME>", dotted)
    return f"'{{{dotted}}}' {_MISPLACED[why]}: {fix}"


def positional_message(name: str) -> str:
    return (
        f"'{name}' in a run sh script: opf passes the values of the placeholders to the script as "
        "its positional parameters, so $1, $@ and $* are not the script's own; name a value by "
        "its placeholder, like {strip}"
    )


def shell_places(parts: tuple[str | Ref, ...]) -> list[tuple[str | None, bool]]:
    """For each placeholder of a ``run sh`` script (in order): why it may not stand where it
    stands (a key of the messages above) or None, and whether it begins a shell word."""
    cs: list[str | None] = []
    for p in parts:
        if isinstance(p, str):
            cs.extend(p)
        else:
            cs.append(None)
    places, _ = scan_shell(cs)
    return [places[k] for k, c in enumerate(cs) if c is None]


def scan_shell(
    cs: list[str | None],
) -> tuple[dict[int, tuple[str | None, bool]], list[tuple[int, int]]]:
    """Scan a script given as characters, None where a placeholder stands, as bash and as POSIX
    sh. Returns, by index, each placeholder's place (see :func:`shell_places`), and the index
    ranges where the script itself names a positional parameter (``$1``, ``${2}``, ``$@``)."""
    bash_places, bash_pos = _scan(cs, ansi=True)
    sh_places, sh_pos = _scan(cs, ansi=False)
    places = {
        k: (bash_places[k][0] or sh_places[k][0], sh_places[k][1]) for k in sh_places
    }
    return places, sorted(set(bash_pos) | set(sh_pos))


def _scan(
    cs: list[str | None], *, ansi: bool
) -> tuple[dict[int, tuple[str | None, bool]], list[tuple[int, int]]]:
    """Where in a ``run sh`` script each placeholder (``None`` in ``cs``) stands — in which
    kind of shell context, and whether at a word's start — and where ``$1``, ``${2}``... are;
    ``ansi``: the shell knows ``$'...'`` (bash)."""
    scanner = _ShellScanner(cs, ansi)
    scanner.run()
    return scanner.places, scanner.positional


class _ShellScanner:
    """Reads a script as a POSIX shell would, one character at a time, keeping a stack of the
    contexts it is in; each method reads in one kind of context and moves :attr:`i` on.

    A frame is ``[kind, paren depth, inside double quotes]``; kinds: ``cmd`` (command text),
    ``comment``, ``sq``/``dq`` (single/double quotes), ``ansi`` (``$'...'``), ``bt``
    (backticks), ``brace`` (``${...}``), ``arith``/``arithb`` (``$((...))``/``$[...]``),
    ``bracket`` (a glob's ``[...]``), ``dbr`` (``[[ ... ]]``)."""

    def __init__(self, cs: list[str | None], ansi: bool) -> None:
        self.cs = cs
        self.n = len(cs)
        self.ansi = ansi
        self.places: dict[int, tuple[str | None, bool]] = {}
        self.positional: list[tuple[int, int]] = []
        self.stack: list[list] = [["cmd", 0, False]]
        self.word_start = True
        self.confused = False
        self.i = 0

    def at(self, k: int) -> str | None:
        return self.cs[k] if k < self.n else ""

    def run(self) -> None:
        while self.i < self.n:
            frame = self.stack[-1]
            kind = frame[0]
            c = self.cs[self.i]
            if c is None:
                self.placeholder(kind)
            elif kind == "comment":
                if c == "\n":
                    self.stack.pop()
                    self.word_start = True
                self.i += 1
            elif kind == "sq":
                if c == "'":
                    self.stack.pop()
                self.i += 1
            elif c == "\\":
                self.backslash(kind)
            elif kind in ("ansi", "bt", "dq"):
                self.quoted(kind, c)
            else:
                self.unquoted(frame, kind, c)

    def placeholder(self, kind: str) -> None:
        i = self.i
        if i not in self.places:
            why = None if kind in ("cmd", "comment") else kind
            if self.confused and why is None:
                why = "case"
            self.places[i] = ("arith" if why == "arithb" else why, self.word_start)
        self.word_start = False
        self.i += 1

    def backslash(self, kind: str) -> None:
        if self.at(self.i + 1) is None:
            why = "backslash" if kind == "cmd" else kind
            self.places[self.i + 1] = ("arith" if why == "arithb" else why, False)
        self.word_start = False
        self.i += 2

    def quoted(self, kind: str, c: str) -> None:
        """Inside ``$'...'``, backticks or double quotes."""
        at, i = self.at, self.i
        if kind == "ansi":
            if c == "'":
                self.stack.pop()
            self.i += 1
        elif kind == "bt":
            if c == "`":
                self.stack.pop()
                self.i += 1
            elif c == "$" and at(i + 1) and at(i + 1) in _POSITIONAL:  # type: ignore[operator]
                self.positional.append((i, i + 2))
                self.i += 2
            else:
                self.i += 1
        elif c == '"':
            self.stack.pop()
            self.i += 1
        elif c == "`":
            self.stack.append(["bt", 0, True])
            self.i += 1
        elif c == "$":
            depth = len(self.stack)
            self.i = self.dollar(i, True)
            self.word_start = len(self.stack) > depth and self.stack[-1][0] == "cmd"
        else:
            self.i += 1

    def dollar(self, k: int, in_dq: bool) -> int:
        """Handle the '$' at ``k``; returns the index to go on from."""
        at, stack = self.at, self.stack
        nxt = at(k + 1)
        if nxt is None:
            self.places[k + 1] = ("dollar", False)
            return k + 1
        if nxt == "(":
            if at(k + 2) == "(":
                stack.append(["arith", 0, in_dq])
                return k + 3
            stack.append(["cmd", 0, False])
            return k + 2
        if nxt == "{":
            j = k + 2
            if at(j) in ("#", "!"):
                j += 1
            if at(j) and at(j) in _POSITIONAL:  # type: ignore[operator]
                end = j + 1
                while at(end) and at(end).isdigit():  # type: ignore[union-attr]
                    end += 1
                end += at(end) == "}"
                self.positional.append((k, end))
            stack.append(["brace", 0, in_dq])
            return k + 2
        if nxt == "[":
            stack.append(["arithb", 0, in_dq])
            return k + 2
        if nxt == "'" and self.ansi and not in_dq:
            stack.append(["ansi", 0, False])
            return k + 2
        if nxt and nxt in _POSITIONAL:
            self.positional.append((k, k + 2))
            return k + 2
        return k + 1

    def unquoted(self, frame: list, kind: str, c: str) -> None:
        """Unquoted text: command text, ``${...}``, arithmetic, brackets."""
        if c == "$":
            depth = len(self.stack)
            self.i = self.dollar(self.i, frame[2] if kind != "cmd" else False)
            self.word_start = len(self.stack) > depth and self.stack[-1][0] == "cmd"
        elif (c == "'" and not (kind == "brace" and frame[2])) or c in ('"', "`"):
            self.stack.append([{"'": "sq", '"': "dq", "`": "bt"}[c], 0, c == '"'])
            self.word_start = False
            self.i += 1
        elif kind == "cmd":
            self.command(frame, c)
        elif kind == "dbr":
            self.double_bracket(c)
        else:
            self.enclosed(frame, kind, c)

    def enclosed(self, frame: list, kind: str, c: str) -> None:
        """Inside ``${...}``, ``$((...))``, ``$[...]`` or a glob's ``[...]``."""
        if kind in ("brace", "arithb"):
            if c == ("}" if kind == "brace" else "]"):
                self.stack.pop()
            self.i += 1
        elif kind == "arith":
            if c == "(":
                frame[1] += 1
            elif c == ")":
                if frame[1]:
                    frame[1] -= 1
                else:
                    self.stack.pop()
                    self.i += 1 if self.at(self.i + 1) == ")" else 0
                    self.word_start = False
            self.i += 1
        elif c == "]":  # a bracket
            self.stack.pop()
            self.i += 1
        elif c in _WORD_END:
            self.stack.pop()  # not a bracket after all: the word ends here
        else:
            self.i += 1

    def double_bracket(self, c: str) -> None:
        at, i = self.at, self.i
        if self.word_start and c == "]" and at(i + 1) == "]" and (
            at(i + 2) is not None and at(i + 2) in ("", *_WORD_END)  # type: ignore[operator]
        ):
            self.stack.pop()
            self.word_start = False
            self.i += 2
            return
        self.word_start = c in _BLANKS
        self.i += 1

    def command(self, frame: list, c: str) -> None:
        """Command text: blanks and operators end words; comments, subshells, tests."""
        at, i = self.at, self.i
        if c in _BLANKS or c in ";&|<>":
            self.word_start = True
            self.i += 1
        elif self.word_start and c == "#":
            self.stack.append(["comment", 0, False])
            self.i += 1
        elif c == "(":
            if self.word_start and at(i + 1) == "(":
                self.stack.append(["arith", 0, False])
                self.i += 2
                return
            frame[1] += 1
            self.word_start = True
            self.i += 1
        elif c == ")":
            if frame[1]:
                frame[1] -= 1
            elif len(self.stack) > 1:
                self.stack.pop()
                self.word_start = False
                self.i += 1
                return
            self.word_start = True
            self.i += 1
        elif c == "[":
            self.bracket(i)
        else:
            if self.word_start and not self.confused and _word_at(self.cs, i) == "case" and any(
                f[0] != "cmd" for f in self.stack
            ):
                # a pattern's ')' would seem to close the '$(' around; where that '$(' stands
                # in quotes, opf cannot tell what the rest of the script is in
                self.confused = True
            self.word_start = False
            self.i += 1

    def bracket(self, i: int) -> None:
        at = self.at
        nxt = at(i + 1)
        if self.word_start and nxt == "[" and at(i + 2) is not None and (
            at(i + 2) in ("", *_BLANKS)  # type: ignore[operator]
        ):
            self.stack.append(["dbr", 0, False])
            self.word_start = True
            self.i += 2
            return
        if not (self.word_start and nxt is not None and nxt in ("", *_WORD_END)):
            self.stack.append(["bracket", 0, False])  # not the word '[' (test)
        self.word_start = False
        self.i += 1


def _word_at(cs: list[str | None], i: int) -> str:
    end = i
    while end < len(cs) and cs[end] is not None and cs[end] not in _WORD_END:  # type: ignore[operator]
        end += 1
    return "".join(cs[i:end])  # type: ignore[arg-type]
