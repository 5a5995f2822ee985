"""Syntax errors in words: what the parser expected where it stopped, said the way a person
reads a pipeline file ("a step name", "'{'", "end of file"), never as grammar terminal names.

:func:`syntax_diagnostic` turns a Lark error into one :class:`~opals_dsl.errors.Diagnostic`: at
end of input it says "unexpected end of file" and which block is still open; for a greedy
``run`` line it shows the one word that is wrong; the expected tokens come from the parser
state, not from the token that failed. The parser (:mod:`.parse`) keeps the tokens and blocks it
saw (its post-lexer, passed in as ``postlex``) so that the message can name the statement being
written.
"""

from __future__ import annotations

import unicodedata
from copy import copy
from dataclasses import dataclass
from typing import Any

from lark import Lark, Token
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedToken

from ..errors import Diagnostic
from ..source import SourceFile, Span
from .nodes import RESERVED, SOFT_KEYWORDS
from .scope import did_you_mean
from .words import continued_comment

_WORDS = {
    "NAME": "a name",
    "STRING": 'a string in double quotes ("...")',
    "INT": "a whole number",
    "FLOAT": "a number",
    "_NL": "the end of the line",
    "$END": "the end of the file",
    "RUN_LINE": "'run' and a command",
    "LBRACE": "'{'",
    "RBRACE": "'}'",
    "LPAR": "'('",
    "RPAR": "')'",
    "LSQB": "'['",
    "RSQB": "']'",
    "COMMA": "','",
    "EQUAL": "'='",
    "DOT": "'.'",
    "COLON": "':'",
}

_VALUES = frozenset({"INT", "FLOAT", "STRING", "TRUE", "FALSE", "LSQB"})


_KIND = {"JOB": "job", "STEP": "step"}


_STEP_WORDS = frozenset({"out", "in", "run", "call"})


_JOB_WORDS = frozenset({"shared", "output", "retries", "step"})


_TOP_WORDS = frozenset({"pipeline", "param", "job"})


def _accepts(state) -> set[str]:
    """The terminals the parser could take next in ``state`` (a Lark parser state)."""
    conf = copy(state.parse_conf)
    conf.callbacks = {}
    out = set()
    for term in state.parse_conf.states[state.position]:
        if not term.isupper():
            continue
        trial = state.copy(deepcopy_values=False)
        trial.parse_conf = conf
        try:
            trial.feed_token(Token(term, ""), is_end=term == "$END")
        except UnexpectedToken:
            continue
        out.add(term)
    return out


def _describe(term: str, parser: Lark) -> str:
    if term in _WORDS:
        return _WORDS[term]
    for t in parser.terminals:
        if t.name == term and t.pattern.type == "str":
            return f"'{t.pattern.value}'"
    return term.lower()


def _expected_words(expected: set[str], parser: Lark) -> list[str]:
    expected = set(expected)
    out: list[str] = []
    if "NAME" in expected:
        out.append("a name")
        keyword_terms = {
            t.name
            for t in parser.terminals
            if t.pattern.type == "str" and t.pattern.value in SOFT_KEYWORDS
        } | {"TEMP"}
        expected -= keyword_terms | {"NAME"}
    if _VALUES <= expected:
        out.append('a value (a number, a "string", true, false or a [list])')
        expected -= _VALUES
    if {"INT", "FLOAT"} <= expected:
        expected.discard("INT")
    tail = [_WORDS["_NL"]] if "_NL" in expected else []
    expected.discard("_NL")
    out += sorted(_describe(t, parser) for t in expected)
    return sorted(set(out), key=lambda w: (w[0] != "'", w)) + tail


def _join(words: list[str]) -> str:
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " or " + words[-1]


def _token_text(tok: Token) -> str:
    if tok.type == "_NL":
        return "the end of the line"
    if tok.type == "$END":
        return "the end of the file"
    text = str(tok)
    if tok.type == "RUN_LINE":
        text = text[:64].split(None, 1)[0] if text.strip() else "run"
    if len(text) > 30:
        text = text[:27] + "..."
    return f"'{text}'"


_AFTER = {
    "JOB": "a job name, e.g. 'job dem for strip in \"data/*.xyz\" {'",
    "STEP": "a step name, e.g. 'step grid {'",
    "PIPELINE": "a pipeline name, e.g. 'pipeline strip_dems'",
    "PARAM": "a parameter name, e.g. 'param cell = 1.0'",
    "SHARED": "a name for the shared file, e.g. 'shared cfg = \"cfg/grid.cfg\"'",
    "OUT": "a name for the output, e.g. 'out dem = \"{strip.stem}.asc\"'",
    "FOR": "a loop variable name, e.g. 'for strip in \"data/*.xyz\"'",
}


_EQUALS = {
    "PARAM": "'param cell = 1.0'",
    "SHARED": "'shared cfg = \"cfg/grid.cfg\"'",
    "OUT": "'out dem = \"{strip.stem}.asc\"'",
}


def point(source: SourceFile, tok: Token, width: int = 1) -> Span:
    return Span(source.name, tok.line, tok.column, tok.line, tok.column + width)


@dataclass(slots=True)
class _Place:
    """Where a syntax error is: the token, its text as shown, its span, the two tokens before
    it, the kind of block around it, whether it starts a line, and the block's opener."""

    tok: Token
    got: str
    value: str
    span: Span
    prev: Token | None
    prev2: Token | None
    where: str
    line_start: bool
    opener: Token | None


def syntax_diagnostic(
    source: SourceFile, exc: Exception, postlex: Any, parser: Lark
) -> Diagnostic:
    """A Lark parse error as one diagnostic in words; ``postlex`` is the parser's post-lexer
    (what it saw before the error)."""
    if isinstance(exc, UnexpectedCharacters):
        return _bad_character(source, exc, parser)
    state = getattr(exc, "state", None)
    if isinstance(exc, UnexpectedEOF):
        tok = Token("$END", "", len(source.text), *source.position(len(source.text)))
    else:
        assert isinstance(exc, UnexpectedToken)
        tok = exc.token
    expected = set(getattr(exc, "expected", None) or ())
    if state is not None:
        expected = _accepts(state) or expected
    if tok.type != "$END" and "_NL" in expected:
        expected.discard("$END")
    words = _expected_words(expected, parser)
    if tok.type == "$END" or not getattr(tok, "line", None):
        return _end_of_file(source, postlex, words)
    place = _place(source, tok, postlex)
    msg = (_statement_message(place, words) or _token_message(place, postlex, expected, words)
           or f"unexpected {place.got}; expected {_join(words)}")
    if postlex.brackets and postlex.brackets[-1].line < tok.line:
        b = postlex.brackets[-1]
        msg += f" (the '{b}' on line {b.line} is never closed)"
    return Diagnostic(place.span, msg, source)


def _place(source: SourceFile, tok: Token, postlex: Any) -> _Place:
    """The tokens before ``tok`` and the blocks open around it."""
    pos = tok.start_pos if tok.start_pos is not None else len(source.text)
    before = [t for t in postlex.history if t.start_pos is not None and t.start_pos < pos]
    prev = before[-1] if before else None
    prev2 = before[-2] if len(before) >= 2 else None
    if postlex.context_pos == pos:
        context = postlex.context
    else:  # the lexer refused this token before it reached the post-lexer
        context = tuple(kind for kind, _ in postlex.blocks)
    where = _KIND.get(context[-1], "") if context else "top"
    opener = postlex.blocks[-1][1] if postlex.blocks else None
    end_col = tok.end_column if tok.end_line == tok.line and tok.end_column else tok.column + 1
    if tok.type in ("RUN_LINE", "_NL"):
        end_col = tok.column + (3 if tok.type == "RUN_LINE" else 1)
    span = Span(source.name, tok.line, tok.column, tok.line, end_col)
    got = _token_text(tok)
    value = str(tok) if tok.type != "RUN_LINE" else "run"
    line_start = prev is None or prev.type == "_NL"
    if (
        prev is not None and prev.type == "RUN_LINE" and str(prev) == "run"
        and prev.end_pos == tok.start_pos
    ):  # "runx": the lexer took "run" for the start of a run line
        span = Span(source.name, prev.line, prev.column, tok.line, end_col)
        value, got, line_start = "run" + str(tok), f"'run{tok}'", True
        where = "step"
    return _Place(tok, got, value, span, prev, prev2, where, line_start, opener)


def _statement_message(p: _Place, words: list[str]) -> str | None:
    """The message for a mistake in the word a statement starts with, if it is one."""
    tok, value, got = p.tok, p.value, p.got
    if "a name" in words and value in RESERVED and tok.type == "NAME":
        return f"'{value}' is reserved and cannot be used as a name; choose another name"
    if p.line_start and p.where == "top":
        return _top_statement(value, got, tok)
    if p.line_start and p.where == "job" and tok.type != "RBRACE":
        return _job_statement(value, got, p.opener)
    if p.line_start and p.where == "step" and tok.type != "RBRACE":
        return _step_statement(value, got, p.opener)
    prev, prev2 = p.prev, p.prev2
    if prev is not None and prev.type in _AFTER and "a name" in words:
        return f"expected {_AFTER[prev.type]}, but found {got}"
    if (
        prev is not None and prev2 is not None and prev2.type in _AFTER
        and str(prev) in SOFT_KEYWORDS
    ):
        return (f"unexpected {got}: '{prev}' was read as the name here; "
                f"expected {_AFTER[prev2.type]}")
    return None


def _token_message(p: _Place, postlex: Any, expected: set[str],
                   words: list[str]) -> str | None:
    """The message for a token that does not fit inside a statement, if one says more than
    what was expected."""
    tok, got, prev = p.tok, p.got, p.prev
    head = postlex.line_head.type if postlex.line_head is not None else None
    if prev is not None and prev.type == "IN" and head == "JOB":
        return (f"unexpected {got}: after 'in' comes the job's source: a glob \"data/*.xyz\", "
                'a list ["a", "b"], range(N), lines("list.txt") or JOB.STEP.OUT')
    if (tok.type == "LBRACE" and "a name" in words and "LBRACE" not in expected
            and head in ("CALL", "IN")):
        return "unexpected '{': here a name is written without braces, e.g. cell, not {cell}"
    if head == "CALL" and postlex.brackets and (
        ("RPAR" in expected and "a name" in words and tok.type in _VALUES)
        or (expected == {"EQUAL"} and tok.type in ("COMMA", "RPAR"))
    ):
        return (f"unexpected {got}: the arguments of a call are written NAME = VALUE, "
                "e.g. 'call tools.grid:run(cell = 1.0)'")
    if expected == {"EQUAL"} and head in _EQUALS:
        return f"unexpected {got}; expected '=' after the name, as in {_EQUALS[head]}"
    if prev is not None and prev.type == "LBRACE" and "_NL" in expected:
        return f"'{{' must end its line; put {got} on the next line"
    if head == "CALL" and "COLON" in expected and tok.type != "NAME":
        return (f"unexpected {got}: a call names its function as MODULE:FUNCTION, "
                "e.g. 'call tools.grid:run(cell = 1.0)'")
    if "_NL" in expected and tok.type == "RBRACE":
        return "'}' must stand on a line of its own"
    if "LBRACE" in expected and tok.type == "_NL":
        return "expected '{' at the end of this line, to open the block"
    if tok.type == "_NL" and words:
        return f"this line ends too early; expected {_join(words)}"
    return None


def _top_statement(value: str, got: str, tok: Token) -> str:
    if value == "pipeline":
        return "'pipeline NAME' must be the first statement of the file"
    if tok.type == "RBRACE":
        return "this '}' has no block to close; remove it"
    if value in _JOB_WORDS:
        return f"'{value}' lines belong inside a job: job NAME {{ ... }}"
    if value in _STEP_WORDS:
        return f"'{value}' lines belong inside a step of a job: step NAME {{ ... }}"
    return (
        f"unexpected {got}: a pipeline file holds 'pipeline', 'param' and 'job' statements, "
        f"one per line{_meant(value, ('pipeline', 'param', 'job'))}"
    )


def _meant(value: str, words: tuple[str, ...]) -> str:
    """``; did you mean 'WORD'?`` for a misspelt keyword of ``words``, else ""."""
    return did_you_mean(value, words) if value.isidentifier() else ""


def _job_statement(value: str, got: str, opener: Token | None) -> str:
    if value in _STEP_WORDS:
        return f"'{value}' lines belong inside a step, not directly in a job: step NAME {{ ... }}"
    if value in _TOP_WORDS and opener is not None:
        return (
            f"unexpected '{value}' inside a job: the job opened on line {opener.line} is not "
            "closed; add '}' on a line of its own before this line"
        )
    return (
        f"unexpected {got} in a job: a job holds 'shared', 'output', 'retries', 'threads', "
        "'timeout' and 'step' lines, and ends with '}' on a line of its own"
        + _meant(value, ("shared", "output", "retries", "threads", "timeout", "step"))
    )


def _step_statement(value: str, got: str, opener: Token | None) -> str:
    if value in _JOB_WORDS - {"step"}:
        return (
            f"'{value}' lines belong to the job, not to a step; move this line above the "
            "job's steps"
        )
    if (value in _TOP_WORDS or value == "step") and opener is not None:
        return (
            f"unexpected '{value}' inside a step: the step opened on line {opener.line} is not "
            "closed; add '}' on a line of its own before this line"
        )
    return (
        f"unexpected {got} in a step: a step holds 'out', 'in', 'threads' and 'timeout' lines "
        "and one 'run' or 'call' line, and ends with '}' on a line of its own"
        + _meant(value, ("out", "in", "threads", "timeout", "run", "call"))
    )


def _end_of_file(source: SourceFile, postlex: Any, words: list[str]) -> Diagnostic:
    if postlex.blocks:
        kind, opener = postlex.blocks[-1]
        what = _KIND.get(kind, "block")
        swallowed = [t for t in postlex.run_braces if t.start_pos > opener.start_pos]
        if swallowed:
            run = swallowed[-1]
            comment = continued_comment(str(run), run.start_pos)
            if comment is not None:
                return Diagnostic(source.span(comment[0], comment[1]), comment[2], source)
            at = run.start_pos + len(str(run).rstrip()) - 1
            return Diagnostic(
                source.span(at, at + 1),
                "this '}' is part of the run command (a run line takes the rest of its line), "
                f"so the {what} opened on line {opener.line} is never closed; put '}}' on a "
                "line of its own",
                source,
            )
        return Diagnostic(
            point(source, opener),
            f"the file ends before this {what} is closed; add '}}' on a line of its own "
            f"at the end of the {what}",
            source,
        )
    line = source.text.count("\n") + 1
    last = source.line(line - 1) if line > 1 else ""
    span = Span(source.name, max(1, line - 1), len(last) + 1, max(1, line - 1), len(last) + 2)
    msg = f"unexpected end of file; expected {_join(words)}"
    if postlex.brackets:
        b = postlex.brackets[-1]
        msg += f" (the '{b}' on line {b.line} is never closed)"
    return Diagnostic(span, msg, source)


def _bad_character(source: SourceFile, exc: UnexpectedCharacters, parser: Lark) -> Diagnostic:
    line, col = exc.line, exc.column
    char = source.text[exc.pos_in_stream] if exc.pos_in_stream < len(source.text) else ""
    span = Span(source.name, line, col, line, col + 1)
    if char == "'":
        msg = "unexpected single quote: strings are written in double quotes (\"...\")"
    elif char == "\\":
        msg = "unexpected backslash: only a run line may be continued with '\\'"
    elif char == '"':
        msg = 'this string is never closed: add the closing " on the same line'
    elif char in "\u201c\u201d\u201e\u2018\u2019\u00ab\u00bb":
        msg = (
            f"unexpected typographic quote '{char}': strings are written in plain double "
            'quotes (")'
        )
    elif unicodedata.category(char).startswith(("Z", "C")) and char not in "\t\n\r":
        msg = (
            f"unexpected invisible character U+{ord(char):04X}; delete it, or type a plain "
            "space instead"
        )
    else:
        shown = repr(char) if char.isprintable() and char != " " else f"U+{ord(char):04X}"
        msg = f"unexpected character {shown}"
        state = getattr(exc, "state", None)
        allowed = _accepts(state) if state is not None else set(exc.allowed or ())
        words = _expected_words(allowed, parser)
        if words:
            msg += f"; expected {_join(words)}"
    return Diagnostic(span, msg, source)
