"""Formatting: a pipeline file → the same pipeline in opf's one layout (``opf fmt``).

What comes in is the text of a file that parses; what goes out parses to an equal syntax tree,
keeps every comment between the same two tokens, and formats to itself.

How, and why it is right
    The formatter lays out the parser's own tokens (:func:`~opals_dsl.lang.parse.tokens`) again,
    not a
    tree rebuilt into text: a statement is the tokens of one line, and those tokens hold all that
    has meaning. What lies between two tokens is only what the lexer skips: blanks, comments
    (``#`` to the end of the line) and the newlines it drops inside brackets. Blanks hold no
    ``#``, and a ``#`` inside a string or a ``run`` line lies inside a token, so every ``#``
    found *between* tokens starts a comment and every comment is found this way, at its place
    (:func:`comments`). A ``run`` line is one token that keeps its ``\\`` continuations and its
    own comment; it is written as it stands, except that its continuation lines move with the
    block's indentation and blanks at its end go (not after a backslash, which would continue
    it), and only when the line still splits into exactly the same words
    (:func:`opals_dsl.lang.words.split_run_line` decides). A bare ``run`` followed at once by
    a ``#`` is a run line with no words and a comment outside it: the two stay joined, since a
    blank between them would move the comment into the run line. Each result is checked before it is
    returned: it must parse to a tree equal to the original's and hold the same comments in
    the same order, or :class:`FormatError` leaves the file alone. (Working on tokens, not on
    the tree, also keeps every statement where it was written: the tree groups a job's lines
    by kind, so the comments between them would lose their places.)

The layout
    * four spaces per block; one statement per line; tokens one space apart, none inside
      ``( )`` and ``[ ]``, before ``,`` or around ``.`` and ``:``; ``=`` between spaces;
    * no blank line at the start or end of a block; never two blank lines in a row; one blank
      line after ``pipeline`` and around every job (above the comments that lead into it);
      elsewhere blank lines stay where they were;
    * consecutive ``param``, ``shared`` and ``out`` lines line up their ``=``; the trailing
      comments of a paragraph (lines with no blank or comment line between) line up two spaces
      after the longest line that has one;
    * a bracketed list stays on one line when it fits in :data:`LINE_LENGTH` columns and holds
      no comment and no trailing comma; otherwise it gets one item per line, each with a comma
      (so a trailing comma asks for that layout, as in black);
    * lines end with ``\\n``, and the file with exactly one. (``opf fmt`` keeps a file's CRLF
      line ends and its byte order mark: those are the file's encoding, not its layout.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from lark import Token

from ..errors import FormatError, OpfSyntaxError
from ..source import SourceFile
from . import nodes as n
from .parse import parse, tokens
from .words import split_run_line

#: the longest line a bracketed list is kept on
LINE_LENGTH = 100
INDENT = 4

_NO_SPACE_AFTER = frozenset({"LPAR", "LSQB", "DOT", "COLON"})
_NO_SPACE_BEFORE = frozenset({"RPAR", "RSQB", "COMMA", "DOT", "COLON", "LPAR"})
_OPENERS = frozenset({"LPAR", "LSQB"})
_CLOSERS = frozenset({"RPAR", "RSQB"})
_ALIGNED = frozenset({"PARAM", "SHARED", "OUT"})
_COMMENT = re.compile(r"#[^\n]*")


@dataclass(frozen=True, slots=True)
class Comment:
    """A comment outside ``run`` lines: where its ``#`` is, its text (without trailing blanks),
    and whether it stands on a line of its own."""

    pos: int
    text: str
    own_line: bool

    @property
    def end(self) -> int:
        return self.pos + len(self.text)


def _prepared(text: str) -> str:
    # the text as the parser reads it (see parse.parse): offsets are the same as in ``text``
    text = text if text.endswith("\n") else text + "\n"
    return " " + text[1:] if text.startswith("\ufeff") else text


def comments(source: SourceFile) -> list[Comment]:
    """Every comment of a file that parses, except those inside ``run`` lines, in order."""
    return _comments(_prepared(source.text), tokens(source))


def _comments(text: str, toks: list[Token]) -> list[Comment]:
    found: list[Comment] = []

    def scan(start: int, end: int) -> None:
        for m in _COMMENT.finditer(text, start, end):
            line_start = text.rfind("\n", 0, m.start()) + 1
            own_line = not text[line_start : m.start()].strip(" \t\f")
            found.append(Comment(m.start(), m.group().rstrip(" \t\r\f\v"), own_line))

    prev = 0
    for tok in toks:
        scan(prev, tok.start_pos)
        if tok.type == "_NL":  # a line end token holds the comment lines that follow it
            scan(tok.start_pos, tok.end_pos)
        prev = tok.end_pos
    scan(prev, len(text))
    return found


def format_source(source: SourceFile) -> str:
    """The text of ``source`` in the canonical layout.

    Raises :class:`OpfSyntaxError` when the file does not parse (nothing can be said about its
    layout then) and :class:`FormatError` when the result would not mean the same.
    """
    before = _tree(source)
    text = _prepared(source.text)
    toks = tokens(source)
    found = _comments(text, toks)
    result = _Layout(text, toks, found).render()
    _verify(source, before, found, result)
    return result


def _tree(source: SourceFile) -> n.Pipeline:
    """The syntax tree of ``source``, also where the only mistakes are found while the tree is
    built (a name where a value must be, an unknown ``tiles`` argument): the parser read the
    whole file, and the layout does not depend on them. A file that does not parse raises."""
    try:
        return parse(source)
    except OpfSyntaxError as error:
        pipeline = getattr(error, "pipeline", None)
        if pipeline is None:
            raise
        return pipeline


def _verify(source: SourceFile, before: n.Pipeline, found: list[Comment], result: str) -> None:
    formatted = SourceFile(source.name, result)
    why = ""
    try:
        if _tree(formatted) != before:
            why = "the formatted file would mean something else"
        elif [c.text for c in comments(formatted)] != [c.text for c in found]:
            why = "the formatted file would lose or reorder a comment"
    except OpfSyntaxError:
        why = "the formatted file would not parse"
    if why:
        raise FormatError(
            f"{source.name}: not formatted: {why}. This is a bug in opf; the file "
            "was left as it was. Please report it with the file."
        )


# -- the layout ------------------------------------------------------------------------------


@dataclass
class _Statement:
    toks: list[Token]
    notes: list[Comment]  # comments between its first token and its line end
    depth: int = 0
    blank: int = 0
    pad: int = 0

    @property
    def kind(self) -> str:
        return self.toks[0].type

    @property
    def start(self) -> int:
        return self.toks[0].start_pos

    @property
    def end(self) -> int:
        return max([self.toks[-1].end_pos, *(c.end for c in self.notes)])


@dataclass
class _Note:
    """A comment on a line of its own between statements."""

    comment: Comment
    depth: int = 0
    blank: int = 0

    @property
    def start(self) -> int:
        return self.comment.pos

    @property
    def end(self) -> int:
        return self.comment.end


@dataclass
class _Item:
    lead: list[Comment] = field(default_factory=list)  # own-line comments before it
    body: list = field(default_factory=list)  # Token | _Group | Comment (a comment inside)
    after: list[Comment] = field(default_factory=list)  # comments after it, before the next


@dataclass
class _Group:
    """A bracketed list: ``( ... )`` or ``[ ... ]``."""

    open: Token
    raw: list = field(default_factory=list)
    close: Token | None = None
    items: list[_Item] = field(default_factory=list)
    open_notes: list[Comment] = field(default_factory=list)  # on the line of the bracket
    tail: list[Comment] = field(default_factory=list)  # own-line, before the closing bracket
    comma: bool = False  # written with a trailing comma


@dataclass
class _Line:
    indent: int
    text: str = ""
    comment: str | None = None
    comment_col: int = 0
    blank: bool = False

    @property
    def width(self) -> int:
        return self.indent + len(self.text)


class _Layout:
    def __init__(self, text: str, toks: list[Token], found: list[Comment]) -> None:
        self.text = text
        self.elements = self._elements(toks, found)

    def _elements(self, toks: list[Token], found: list[Comment]) -> list[_Statement | _Note]:
        lines: list[tuple[list[Token], int]] = []
        current: list[Token] = []
        for tok in toks:
            if tok.type == "_NL":
                if current:
                    lines.append((current, tok.start_pos))
                current = []
            else:
                current.append(tok)
        if current:  # the parser needs a line end after every statement; kept for safety
            lines.append((current, len(self.text)))
        out: list[_Statement | _Note] = []
        k = 0
        for line, end in lines:
            while k < len(found) and found[k].pos < line[0].start_pos:
                out.append(_Note(found[k]))
                k += 1
            inline = []
            while k < len(found) and found[k].pos < end:
                inline.append(found[k])
                k += 1
            out.append(_Statement(line, inline))
        out += [_Note(c) for c in found[k:]]
        self._depths(out)
        self._blanks(out)
        self._align(out)
        return out

    @staticmethod
    def _depths(elements: list[_Statement | _Note]) -> None:
        depth = 0
        for e in elements:
            if isinstance(e, _Statement) and e.kind == "RBRACE":
                depth = max(0, depth - 1)
            e.depth = depth
            if isinstance(e, _Statement) and e.toks[-1].type == "LBRACE":
                depth += 1

    def _blanks(self, elements: list[_Statement | _Note]) -> None:
        prev: _Statement | _Note | None = None
        for e in elements:
            if prev is None:
                e.blank = 0
            else:
                e.blank = min(1, max(0, self.text.count("\n", prev.end, e.start) - 1))
                opens = isinstance(prev, _Statement) and prev.toks[-1].type == "LBRACE"
                if opens or (isinstance(e, _Statement) and e.kind == "RBRACE"):
                    e.blank = 0
            prev = e
        # top level: a blank line between sections (after `pipeline`, around every job)
        last = None
        for i, e in enumerate(elements):
            if not isinstance(e, _Statement) or e.depth != 0:
                continue
            if last is not None and e.kind != "RBRACE":
                a = elements[last]
                assert isinstance(a, _Statement)
                if not (a.kind == "PARAM" and e.kind == "PARAM"):
                    between = elements[last + 1 : i + 1]
                    if not any(x.blank for x in between):
                        between[0].blank = 1  # above the comments that lead into e
            last = i

    @staticmethod
    def _align(elements: list[_Statement | _Note]) -> None:
        run: list[_Statement] = []

        def close() -> None:
            width = max((len(s.toks[1]) for s in run), default=0)
            for s in run:
                s.pad = width - len(s.toks[1])
            run.clear()

        for e in elements:
            aligned = (
                isinstance(e, _Statement) and e.kind in _ALIGNED and len(e.toks) > 2
                and e.toks[2].type == "EQUAL"
            )
            if not aligned or e.blank or (run and run[-1].kind != e.kind):
                close()
            if aligned:
                run.append(e)
        close()

    # rendering

    def render(self) -> str:
        lines: list[_Line] = []
        for e in self.elements:
            if e.blank and lines:
                lines.append(_Line(0, blank=True))
            if isinstance(e, _Note):
                lines.append(_Line(e.depth * INDENT, comment=e.comment.text))
            else:
                lines += self._statement(e)
        _align_comments(lines)
        out = []
        for line in lines:
            if line.blank:
                out.append("")
                continue
            text = " " * line.indent + line.text
            if line.comment is not None:
                if line.text:
                    text = text + " " * (line.comment_col - len(text)) + line.comment
                else:
                    text += line.comment
            out.append(text)
        return "\n".join(out) + "\n" if out else ""

    def _statement(self, s: _Statement) -> list[_Line]:
        out = _Out(s.depth * INDENT)
        if s.kind == "RUN_LINE":
            # A comment follows a run line on its line only when nothing but a form feed lies
            # between a bare ``run`` and its ``#`` ("run#x"). It stays against the ``run``: a
            # blank or tab between them would make it part of the run line.
            notes = "".join(c.text for c in s.notes)
            out.put(self._run_line(s.toks[0], s.depth * INDENT) + notes)
            return out.lines
        stream = sorted([*s.toks, *s.notes], key=_position)
        body = _nest(stream)
        _body(out, body, s.depth * INDENT, tail=0, pad=(1, s.pad) if s.pad else None)
        return out.lines

    def _run_line(self, tok: Token, indent: int) -> str:
        """The run line as written, its continuation lines moved with the block and the blanks
        at its end gone — unless that would change a word or continue the line."""
        raw = str(tok)
        line_start = self.text.rfind("\n", 0, tok.start_pos) + 1
        old = self.text[line_start : tok.start_pos]
        new = " " * indent
        parts = raw.split("\n")
        # (inside the token every line end follows a backslash: only the last line has blanks
        # at its end, and a backslash left last by removing them would continue the line)
        for k, part in enumerate(parts):
            if k == len(parts) - 1 and not part.rstrip(" \t\r\f\v").endswith("\\"):
                part = part.rstrip(" \t\r\f\v")
            if k > 0 and part.startswith(old):
                part = new + part[len(old) :]
            parts[k] = part
        candidate = "\n".join(parts)
        if candidate == raw or _words(candidate) == _words(raw):
            return candidate
        return raw


def _words(line: str) -> tuple[n.Run, list[str]]:
    problems: list[str] = []
    run = split_run_line(SourceFile("", line), line, 0, lambda a, b, m: problems.append(m))
    return run, problems


def _position(e: Token | Comment) -> int:
    return e.pos if isinstance(e, Comment) else e.start_pos


def _nest(stream: list) -> list:
    """Tokens and comments → the same with each bracketed list as a :class:`_Group`."""
    top: list = []
    stack: list[list] = [top]
    groups: list[_Group] = []
    for e in stream:
        if isinstance(e, Token) and e.type in _OPENERS:
            g = _Group(e)
            stack[-1].append(g)
            stack.append(g.raw)
            groups.append(g)
        elif isinstance(e, Token) and e.type in _CLOSERS and groups:
            g = groups.pop()
            g.close = e
            stack.pop()
            _shape(g)
        else:
            stack[-1].append(e)
    return top


def _shape(g: _Group) -> None:
    """Split a group's contents at its commas into items, and give each comment its place."""
    parts: list[list] = [[]]
    for e in g.raw:
        if isinstance(e, Token) and e.type == "COMMA":
            parts.append([])
        else:
            parts[-1].append(e)
    commas = len(parts) - 1
    rest: list[Comment] = []
    if not any(not isinstance(e, Comment) for e in parts[-1]):
        rest = parts.pop()  # after a trailing comma, or an empty group
        g.comma = commas > 0
    for part in parts:
        i = 0
        while i < len(part) and isinstance(part[i], Comment):
            i += 1
        j = len(part)
        while j > i and isinstance(part[j - 1], Comment):
            j -= 1
        item = _Item(body=part[i:j], after=part[j:])
        for c in part[:i]:
            if c.own_line:
                item.lead.append(c)
            else:  # on the line of the comma before (or the bracket): stays there
                (g.items[-1].after if g.items else g.open_notes).append(c)
        g.items.append(item)
    for c in rest:
        if not c.own_line and not g.tail:
            (g.items[-1].after if g.items else g.open_notes).append(c)
        else:
            g.tail.append(c)


def _space(before: str, after: str) -> bool:
    return before not in _NO_SPACE_AFTER and after not in _NO_SPACE_BEFORE


def _first(e: Token | _Group) -> str:
    return e.open.type if isinstance(e, _Group) else e.type


def _last(e: Token | _Group) -> str:
    assert not isinstance(e, _Group) or e.close is not None
    return e.close.type if isinstance(e, _Group) else e.type


def _flat_body(body: list) -> str | None:
    out: list[str] = []
    prev = None
    for e in body:
        if isinstance(e, Comment):
            return None
        text = _flat_group(e) if isinstance(e, _Group) else str(e)
        if text is None:
            return None
        if prev is not None and _space(prev, _first(e)):
            out.append(" ")
        out.append(text)
        prev = _last(e)
    return "".join(out)


def _flat_group(g: _Group) -> str | None:
    """The group on one line, or None when it holds a comment or a trailing comma."""
    if g.comma or g.open_notes or g.tail or g.close is None:
        return None
    if any(item.lead or item.after for item in g.items):
        return None
    items = [_flat_body(item.body) for item in g.items]
    if any(i is None for i in items):
        return None
    return str(g.open) + ", ".join(items) + str(g.close)  # type: ignore[arg-type]


def _flat_width(body: list) -> int:
    """How much of ``body`` stands on the current line when laid out flat (up to a comment or
    a list that cannot be flat)."""
    width = 0
    prev = None
    for e in body:
        if isinstance(e, Comment):
            break
        text = _flat_group(e) if isinstance(e, _Group) else str(e)
        if text is None:
            width += 1 + int(prev is not None)
            break
        width += len(text) + int(prev is not None and _space(prev, _first(e)))
        prev = _last(e)
    return width


class _Out:
    """The lines of one statement as they are laid out."""

    def __init__(self, indent: int) -> None:
        self.lines = [_Line(indent)]

    @property
    def line(self) -> _Line:
        return self.lines[-1]

    def newline(self, indent: int) -> None:
        self.lines.append(_Line(indent))

    def put(self, text: str) -> None:
        if self.line.comment is not None:  # a line with a comment is finished
            self.newline(self.line.indent + INDENT)
            text = text.lstrip(" ")
        self.line.text += text

    def comment(self, c: Comment) -> None:
        if self.line.comment is None:
            self.line.comment = c.text
        else:
            self.lines.append(_Line(self.line.indent, comment=c.text))

    def note(self, c: Comment, indent: int) -> None:
        self.lines.append(_Line(indent, comment=c.text))


def _body(out: _Out, body: list, base: int, tail: int, pad: tuple[int, int] | None = None
          ) -> None:
    """Lay out a statement or a list item; ``tail`` is the width of what must follow it on its
    last line (a comma), ``pad`` spaces to add after the token at an index (alignment)."""
    prev = None
    for index, e in enumerate(body):
        if isinstance(e, Comment):  # a comment inside an item: the item goes on below it
            if e.own_line:
                out.note(e, base + INDENT)
            else:
                out.comment(e)
            prev = None
            continue
        if out.line.comment is not None:
            out.newline(base + INDENT)
        elif prev is not None and _space(prev, _first(e)):
            out.put(" ")
        if isinstance(e, _Group):
            _group(out, e, _flat_width(body[index + 1 :]) + tail)
        else:
            out.put(str(e))
        if pad is not None and pad[0] == index:
            out.put(" " * pad[1])
        prev = _last(e)


def _group(out: _Out, g: _Group, after: int) -> None:
    flat = _flat_group(g)
    if flat is not None and (not g.items or out.line.width + len(flat) + after <= LINE_LENGTH):
        out.put(flat)
        return
    indent = out.line.indent
    out.put(str(g.open))
    for c in g.open_notes:
        out.comment(c)
    for item in g.items:
        for c in item.lead:
            out.note(c, indent + INDENT)
        out.newline(indent + INDENT)
        _body(out, item.body, indent + INDENT, tail=1)
        out.put(",")
        for c in item.after:
            if c.own_line:
                out.note(c, indent + INDENT)
            else:
                out.comment(c)
    for c in g.tail:
        out.note(c, indent + INDENT)
    out.newline(indent)
    out.put(str(g.close))


def _align_comments(lines: list[_Line]) -> None:
    """Trailing comments of a paragraph (lines with no blank or comment line between) start in
    one column, two spaces after the longest line that has one."""
    i = 0
    while i < len(lines):
        if not lines[i].text:
            i += 1
            continue
        j = i
        while j < len(lines) and lines[j].text:
            j += 1
        widths = [line.width for line in lines[i:j] if line.comment is not None]
        for line in lines[i:j]:
            line.comment_col = max(widths, default=0) + 2
        i = j


def format_text(text: str, name: str) -> str:
    """Format the text of a whole file as read from disk: its line ends (CRLF or not) and a
    byte order mark are kept, the layout inside is canonical."""
    crlf = text.find("\n") > 0 and text[text.find("\n") - 1] == "\r"
    bom = text.startswith("\ufeff")
    universal = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    out = format_source(SourceFile(name, universal))
    if crlf:
        out = out.replace("\n", "\r\n")
    return ("\ufeff" if bom else "") + out
