"""Parsing: pipeline text → syntax tree (:mod:`opals_dsl.nodes`), or an :class:`OpfSyntaxError`.

The grammar is ``grammar/opf.lark`` (shipped inside the package). The Lark LALR parser is built
on first use, with ``strict=True`` so a grammar conflict is a build error, and never cached to
disk. A small post-lexer drops newlines inside ``( )`` and ``[ ]`` and remembers the tokens
before a failure, so a syntax error can say what was expected *there*, in words ("a step name",
"'{'", "end of file"), instead of terminal names. Tree to nodes is a separate pass that keeps
positions; mistakes inside strings and ``run`` lines (braces, quotes, escapes) are collected and
reported together after the parse.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Iterator
from copy import copy
from functools import cache
from importlib import resources

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedToken, VisitError

from ..errors import Diagnostic, OpfSyntaxError
from ..source import SourceFile, Span
from . import nodes as n
from .words import parse_template, split_run_line, string_chars

#: soft keywords: names wherever a name is expected
SOFT_KEYWORDS = frozenset(
    "step out in call shared output retries param for flat by temp".split()
)
RESERVED = frozenset({"task", "job", "pipeline"})

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


#: how deeply lists may nest (the tree is built recursively)
MAX_NESTING = 32
#: the longest string literal and the longest ``run`` line (with its continuation lines), in
#: characters: no command line can be that long (Linux takes at most 2 MiB of arguments, and
#: 128 KiB in one of them), and a string holds a file name, a folder or a short value; longer
#: ones only cost memory (each character is kept with its place in the file while parsing)
MAX_TEXT = 1024 * 1024


class _TooDeep(Exception):
    def __init__(self, token: Token) -> None:
        super().__init__(str(token))
        self.token = token


class _PostLex:
    """Drops newlines inside brackets; remembers what a syntax error message needs: the recent
    tokens, the blocks and brackets open, and ``run`` lines that end in ``}``.

    ``NAME`` is always accepted by the lexer, so a keyword is never split off a longer word
    (``output`` in a step is the unexpected word ``output``, not ``out`` and ``put``).
    """

    always_accept = ("_NL", "NAME")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.history: list[Token] = []
        self.blocks: list[tuple[str, Token]] = []  # (type of the line's first token, "{")
        self.brackets: list[Token] = []
        self.run_braces: list[Token] = []  # run lines whose last word is "}"
        # end offset of each line end -> the last token before it, so a statement's span can
        # end where its text ends rather than after the newline (and comments) that close it
        self.ends: dict[int, Token] = {}
        self._last: Token | None = None
        self.line_head: Token | None = None
        # the blocks open before the token last passed on
        self.context: tuple[str, ...] = ()
        self.context_pos = -1

    def process(self, stream: Iterator[Token]) -> Iterator[Token]:
        self.reset()
        for tok in stream:
            if tok.type == "_NL" and self.brackets:
                continue
            self.context = tuple(kind for kind, _ in self.blocks)
            self.context_pos = tok.start_pos if tok.start_pos is not None else -1
            if tok.type in ("LPAR", "LSQB"):
                self.brackets.append(tok)
                if len(self.brackets) > MAX_NESTING:
                    raise _TooDeep(tok)
            elif tok.type in ("RPAR", "RSQB"):
                if self.brackets:
                    self.brackets.pop()
            elif tok.type == "LBRACE":
                self.blocks.append((self.line_head.type if self.line_head else "", tok))
            elif tok.type == "RBRACE" and self.blocks:
                self.blocks.pop()
            elif tok.type == "RUN_LINE" and _ends_in_brace(tok):
                self.run_braces.append(tok)
            if tok.type == "_NL":
                self.line_head = None
                if self._last is not None and tok.end_pos is not None:
                    self.ends[tok.end_pos] = self._last
            else:
                self._last = tok
                if self.line_head is None:
                    self.line_head = tok
            self.history.append(tok)
            if len(self.history) > 8:
                del self.history[0]
            yield tok


def _ends_in_brace(tok: Token) -> bool:
    """Is the last word of a ``run`` line a lone ``}``? (without splitting a long line)"""
    text = tok.rstrip()
    return text.endswith("}") and text[-2:-1].isspace()


def grammar_text() -> str:
    return resources.files("opals_dsl").joinpath("grammar/opf.lark").read_text(encoding="utf-8")


@cache
def _parser() -> tuple[Lark, _PostLex]:
    postlex = _PostLex()
    parser = Lark(
        grammar_text(),
        parser="lalr",
        lexer="contextual",
        strict=True,
        propagate_positions=True,
        maybe_placeholders=True,
        postlex=postlex,
    )
    return parser, postlex


def parse(source: SourceFile) -> n.Pipeline:
    """Parse a pipeline file. Raises :class:`OpfSyntaxError` listing what is wrong."""
    parser, postlex = _parser()
    text = source.text if source.text.endswith("\n") else source.text + "\n"
    if text.startswith("\ufeff"):  # a byte order mark, as some editors write: a blank
        text = " " + text[1:]
    nul = text.find("\0")
    if nul >= 0:  # no file name, command word or value can hold one: say so before the lexer
        raise OpfSyntaxError([Diagnostic(
            source.span(nul, nul + 1),
            "unexpected NUL character (U+0000): a pipeline file is text and cannot hold one; "
            "delete it (was a binary file given as the pipeline?)",
            source,
        )])
    try:
        tree = parser.parse(text)
    except (UnexpectedCharacters, UnexpectedToken, UnexpectedEOF) as exc:
        raise OpfSyntaxError([_syntax_diagnostic(source, exc, postlex, parser)]) from None
    except _TooDeep as exc:
        message = f"brackets are nested more than {MAX_NESTING} deep here"
        raise OpfSyntaxError([Diagnostic(_point(source, exc.token), message, source)]) from None
    builder = _Builder(source, postlex.ends)
    try:
        pipeline = builder.transform(tree)
    except VisitError as exc:  # a bug in a callback: show the original error
        raise exc.orig_exc from None
    if builder.problems:
        # the whole file was read: the tree is complete (a broken template is kept as text),
        # so a caller may still check it to report every other mistake too
        error = OpfSyntaxError(builder.problems)
        error.pipeline = pipeline
        raise error
    return pipeline


def tokens(source: SourceFile) -> list[Token]:
    """The tokens the parser reads in a file that parses: everything but blanks and comments,
    newlines inside brackets dropped, with offsets into ``source.text``. The formatter
    (:mod:`opals_dsl.fmt`) lays them out again; what lies between them is blanks and comments."""
    parser, _postlex = _parser()
    text = source.text if source.text.endswith("\n") else source.text + "\n"
    if text.startswith("\ufeff"):  # as parse() reads it: offsets stay the same
        text = " " + text[1:]
    return list(parser.parse_interactive(text).iter_parse())


# -- syntax errors in words ------------------------------------------------------------------

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


def _point(source: SourceFile, tok: Token, width: int = 1) -> Span:
    return Span(source.name, tok.line, tok.column, tok.line, tok.column + width)


def _syntax_diagnostic(
    source: SourceFile, exc: Exception, postlex: _PostLex, parser: Lark
) -> Diagnostic:
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

    # the tokens before this one, and the blocks open around it
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

    if "a name" in words and value in RESERVED and tok.type == "NAME":
        msg = f"'{value}' is reserved and cannot be used as a name; choose another name"
    elif line_start and where == "top":
        msg = _top_statement(value, got, tok)
    elif line_start and where == "job" and tok.type != "RBRACE":
        msg = _job_statement(value, got, opener)
    elif line_start and where == "step" and tok.type != "RBRACE":
        msg = _step_statement(value, got, opener)
    elif prev is not None and prev.type in _AFTER and "a name" in words:
        msg = f"expected {_AFTER[prev.type]}, but found {got}"
    elif (
        prev is not None and prev2 is not None and prev2.type in _AFTER
        and str(prev) in SOFT_KEYWORDS
    ):
        msg = (
            f"unexpected {got}: '{prev}' was read as the name here; "
            f"expected {_AFTER[prev2.type]}"
        )
    elif (
        prev is not None and prev.type == "IN" and postlex.line_head is not None
        and postlex.line_head.type == "JOB"
    ):
        msg = (
            f"unexpected {got}: after 'in' comes the job's source: a glob \"data/*.xyz\", a "
            'list ["a", "b"], range(N), lines("list.txt") or JOB.STEP.OUT'
        )
    elif (
        tok.type == "LBRACE" and "a name" in words and "LBRACE" not in expected
        and postlex.line_head is not None and postlex.line_head.type in ("CALL", "IN")
    ):
        msg = "unexpected '{': here a name is written without braces, e.g. cell, not {cell}"
    elif (
        postlex.line_head is not None and postlex.line_head.type == "CALL"
        and postlex.brackets
        and (
            ("RPAR" in expected and "a name" in words and tok.type in _VALUES)
            or (expected == {"EQUAL"} and tok.type in ("COMMA", "RPAR"))
        )
    ):
        msg = (
            f"unexpected {got}: the arguments of a call are written NAME = VALUE, "
            "e.g. 'call tools.grid:run(cell = 1.0)'"
        )
    elif (
        expected == {"EQUAL"} and postlex.line_head is not None
        and postlex.line_head.type in _EQUALS
    ):
        example = _EQUALS[postlex.line_head.type]
        msg = f"unexpected {got}; expected '=' after the name, as in {example}"
    elif prev is not None and prev.type == "LBRACE" and "_NL" in expected:
        msg = f"'{{' must end its line; put {got} on the next line"
    elif (
        postlex.line_head is not None and postlex.line_head.type == "CALL"
        and "COLON" in expected and tok.type != "NAME"
    ):
        msg = (
            f"unexpected {got}: a call names its function as MODULE:FUNCTION, "
            "e.g. 'call tools.grid:run(cell = 1.0)'"
        )
    elif "_NL" in expected and tok.type == "RBRACE":
        msg = "'}' must stand on a line of its own"
    elif "LBRACE" in expected and tok.type == "_NL":
        msg = "expected '{' at the end of this line, to open the block"
    elif tok.type == "_NL" and words:
        msg = f"this line ends too early; expected {_join(words)}"
    else:
        msg = f"unexpected {got}; expected {_join(words)}"
    if postlex.brackets and postlex.brackets[-1].line < tok.line:
        b = postlex.brackets[-1]
        msg += f" (the '{b}' on line {b.line} is never closed)"
    return Diagnostic(span, msg, source)


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
        "one per line"
    )


def _job_statement(value: str, got: str, opener: Token | None) -> str:
    if value in _STEP_WORDS:
        return f"'{value}' lines belong inside a step, not directly in a job: step NAME {{ ... }}"
    if value in _TOP_WORDS and opener is not None:
        return (
            f"unexpected '{value}' inside a job: the job opened on line {opener.line} is not "
            "closed; add '}' on a line of its own before this line"
        )
    return (
        f"unexpected {got} in a job: a job holds 'shared', 'output', 'retries' and 'step' "
        "lines, and ends with '}' on a line of its own"
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
        f"unexpected {got} in a step: a step holds 'out' and 'in' lines and one 'run' or "
        "'call' line, and ends with '}' on a line of its own"
    )


def _end_of_file(source: SourceFile, postlex: _PostLex, words: list[str]) -> Diagnostic:
    if postlex.blocks:
        kind, opener = postlex.blocks[-1]
        what = _KIND.get(kind, "block")
        swallowed = [t for t in postlex.run_braces if t.start_pos > opener.start_pos]
        if swallowed:
            run = swallowed[-1]
            at = run.start_pos + len(str(run).rstrip()) - 1
            return Diagnostic(
                source.span(at, at + 1),
                "this '}' is part of the run command (a run line takes the rest of its line), "
                f"so the {what} opened on line {opener.line} is never closed; put '}}' on a "
                "line of its own",
                source,
            )
        return Diagnostic(
            _point(source, opener),
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


# -- tree → nodes ----------------------------------------------------------------------------


def _span_of(source: SourceFile, item: Tree | Token) -> Span | None:
    if isinstance(item, Token):
        if item.line is None:
            return None
        return Span(source.name, item.line, item.column, item.end_line, item.end_column)
    meta = item.meta
    if getattr(meta, "empty", True):
        return None
    return Span(source.name, meta.line, meta.column, meta.end_line, meta.end_column)


def _meta_span(source: SourceFile, meta, ends: dict[int, Token] | None = None) -> Span | None:
    if getattr(meta, "empty", True):
        return None
    last = (ends or {}).get(meta.end_pos)
    if last is not None and last.end_line is not None and last.start_pos >= meta.start_pos:
        return Span(source.name, meta.line, meta.column, last.end_line, last.end_column)
    return Span(source.name, meta.line, meta.column, meta.end_line, meta.end_column)


@v_args(meta=True)
class _Builder(Transformer):
    """Builds :mod:`nodes` from the Lark tree, collecting problems found inside tokens."""

    def __init__(self, source: SourceFile, ends: dict[int, Token] | None = None) -> None:
        super().__init__()
        self.source = source
        self.ends = ends or {}
        self.problems: list[Diagnostic] = []

    def _report(self, start: int, end: int, message: str) -> None:
        self.problems.append(Diagnostic(self.source.span(start, end), message, self.source))

    def _span(self, meta) -> Span | None:
        return _meta_span(self.source, meta, self.ends)

    # names and values
    def name(self, meta, items):
        tok = items[0]
        return n.Name(str(tok), _span_of(self.source, tok))

    def ref(self, meta, items):
        return n.Ref(tuple(i.value for i in items), self._span(meta))

    def dotted(self, meta, items):
        return ".".join(i.value for i in items)

    def _too_long(self, tok: Token, what: str, hint: str) -> bool:
        """Report a string or run line longer than :data:`MAX_TEXT`."""
        if len(tok) <= MAX_TEXT:
            return False
        self.problems.append(Diagnostic(
            _point(self.source, tok),
            f"this {what} is {len(tok):,} characters long, more than the {MAX_TEXT:,} opf "
            f"takes; {hint}",
            self.source,
        ))
        return True

    def string(self, meta, items):
        tok = items[0]
        if self._too_long(tok, "string",
                          'a long list of values belongs in a file read with lines("list.txt")'):
            return n.Template(("",), _span_of(self.source, tok))
        chars, offsets, closing = string_chars(str(tok), tok.start_pos, self._report)
        tpl, _ = parse_template(self.source, chars, offsets, self._report, closing=closing)
        return n.Template(tpl.parts, _span_of(self.source, tok))

    def int(self, meta, items):
        try:
            value = int(items[0])
        except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
            self._number_problem(meta, items[0])
            value = 0
        return n.Literal(value, self._span(meta))

    def float(self, meta, items):
        value = float(items[0])
        if not math.isfinite(value):
            self._number_problem(meta, items[0])
            value = 0.0
        return n.Literal(value, self._span(meta))

    def _number_problem(self, meta, tok: Token) -> None:
        shown = str(tok) if len(tok) <= 30 else f"{tok[:12]}...{tok[-12:]} ({len(tok):,} digits)"
        self.problems.append(Diagnostic(
            self._span(meta),
            f"the number {shown} is too large; write it as a string if it is a name or a code",
            self.source,
        ))

    def boolean(self, meta, items):
        return n.Literal(str(items[0]) == "true", self._span(meta))

    def list(self, meta, items):
        values = tuple(self._literal(i) for i in items if i is not None)
        return n.Literal(tuple(v.value for v in values), self._span(meta))

    def _literal(self, item, where: str = "") -> n.Literal:
        if isinstance(item, n.Template):
            if not item.is_constant:
                ref = item.refs[0]
                if where == "call":
                    msg = (
                        f"'{{{ref.dotted}}}': an argument of a call is a plain value or a "
                        f"name, not a template; to pass the value, write it without quotes "
                        f"and braces: {ref.dotted}"
                    )
                else:
                    msg = (
                        f"'{{{ref.dotted}}}': {where or 'this value'} is plain text, not a "
                        "template, so it cannot use names; write '{{' and '}}' for literal "
                        "braces"
                    )
                self.problems.append(Diagnostic(ref.span, msg, self.source))
            return n.Literal("".join(p for p in item.parts if isinstance(p, str)), item.span)
        return item

    # top level
    def start(self, meta, items):
        pipeline_name = None
        params, jobs = [], []
        for item in items:
            if item is None:
                continue
            if isinstance(item, n.Name):
                pipeline_name = item
            elif isinstance(item, n.Param):
                params.append(item)
            else:
                jobs.append(item)
        return n.Pipeline(pipeline_name, tuple(params), tuple(jobs), self._span(meta))

    def pipeline_stmt(self, meta, items):
        return items[0]

    def param_stmt(self, meta, items):
        return n.Param(items[0], self._literal(items[1], "a param's value"), self._span(meta))

    def for_clause(self, meta, items):
        return items[0], items[1]

    def glob_source(self, meta, items):
        return n.GlobSource(items[0], self._span(meta))

    def list_source(self, meta, items):
        return n.ListSource(
            tuple(n.Literal(v, items[0].span) for v in items[0].value), self._span(meta)
        )

    def func_source(self, meta, items):
        fname, args = items[0], [a for a in items[1:] if a is not None]
        span = self._span(meta)
        if fname.value == "range":
            return n.RangeSource(tuple(self._value(a) for a in args), span)
        if fname.value == "lines":
            if len(args) != 1 or not isinstance(args[0], n.Template):
                self.problems.append(
                    Diagnostic(span, 'lines(...) takes one file name: lines("list.txt")',
                               self.source)
                )
                return n.LinesSource(n.Template((), span), span)
            return n.LinesSource(args[0], span)
        self.problems.append(
            Diagnostic(
                fname.span,
                f"unknown source '{fname.value}(...)'; a job's source is a glob string, a list "
                '["a", "b"], range(N), range(A, B), lines("file.txt") or JOB.STEP.OUT',
                self.source,
            )
        )
        return n.ListSource((), span)

    def ref_source(self, meta, items):
        return n.UpstreamSource(items[0], self._span(meta))

    def _value(self, item, where: str = "") -> n.Value:
        if isinstance(item, n.Ref):
            return item
        return self._literal(item, where)

    def job(self, meta, items):
        name, loop, *body = items
        var, source = loop if loop is not None else (None, None)
        return n.Job(
            name=name,
            var=var,
            source=source,
            shared=tuple(b for b in body if isinstance(b, n.Shared)),
            outputs=tuple(b for b in body if isinstance(b, n.Output)),
            retries=tuple(b for b in body if isinstance(b, n.Retries)),
            steps=tuple(b for b in body if isinstance(b, n.Step)),
            span=self._span(meta),
        )

    def shared(self, meta, items):
        return n.Shared(items[0], items[1], self._span(meta))

    def output(self, meta, items):
        folder, layout = items
        return n.Output(folder, layout == "flat", self._span(meta))

    def flat(self, meta, items):
        return "flat"

    def by_step(self, meta, items):
        return "by step"

    def retries(self, meta, items):
        item = items[0]
        if isinstance(item, Token):
            value = n.Literal(int(item), _span_of(self.source, item))
        else:
            value = item
        return n.Retries(value, self._span(meta))

    def step(self, meta, items):
        name, *body = items
        return n.Step(
            name=name,
            outs=tuple(b for b in body if isinstance(b, n.Out)),
            ins=tuple(i for b in body if isinstance(b, tuple) for i in b),
            actions=tuple(b for b in body if isinstance(b, (n.Run, n.Call))),
            span=self._span(meta),
        )

    def out(self, meta, items):
        name, path, temp = items
        return n.Out(name, path, temp is not None, self._span(meta))

    def in_stmt(self, meta, items):
        out = []
        for item in items:
            span = item.span
            out.append(n.In(item, span))
        return tuple(out)

    def run(self, meta, items):
        tok = items[0]
        if self._too_long(tok, "run line", "no system runs a command that long (Linux takes at "
                          "most 2 MiB of arguments): let the command read long lists from a "
                          "file"):
            return n.Run((), span=_point(self.source, tok, 3))
        return split_run_line(self.source, str(tok), tok.start_pos, self._report)

    def call(self, meta, items):
        module, function, *kwargs = items
        return n.Call(
            module, function.value, tuple(k for k in kwargs if k is not None), self._span(meta)
        )

    def kwarg(self, meta, items):
        return n.Kwarg(items[0], self._value(items[1], "call"), self._span(meta))
