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

from collections.abc import Iterator
from functools import cache
from importlib import resources

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedToken, VisitError

from . import nodes as n
from .errors import Diagnostic, OpfSyntaxError
from .source import SourceFile, Span
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


class _PostLex:
    """Drops newlines inside brackets; remembers recent tokens and open braces for messages."""

    always_accept = ("_NL",)

    def __init__(self) -> None:
        self.history: list[Token] = []
        self.blocks: list[Token] = []

    def process(self, stream: Iterator[Token]) -> Iterator[Token]:
        depth = 0
        self.history = []
        self.blocks = []
        for tok in stream:
            if tok.type in ("LPAR", "LSQB"):
                depth += 1
            elif tok.type in ("RPAR", "RSQB"):
                depth = max(0, depth - 1)
            elif tok.type == "_NL" and depth:
                continue
            elif tok.type == "LBRACE":
                self.blocks.append(tok)
            elif tok.type == "RBRACE" and self.blocks:
                self.blocks.pop()
            self.history.append(tok)
            if len(self.history) > 4:
                del self.history[0]
            yield tok


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
    try:
        tree = parser.parse(text)
    except (UnexpectedCharacters, UnexpectedToken, UnexpectedEOF) as exc:
        raise OpfSyntaxError([_syntax_diagnostic(source, exc, postlex, parser)]) from None
    builder = _Builder(source)
    try:
        pipeline = builder.transform(tree)
    except VisitError as exc:  # a bug in a callback: show the original error
        raise exc.orig_exc from None
    if builder.problems:
        raise OpfSyntaxError(builder.problems)
    return pipeline


# -- syntax errors in words ------------------------------------------------------------------


def _describe(term: str, parser: Lark) -> str:
    if term in _WORDS:
        return _WORDS[term]
    for t in parser.terminals:
        if t.name == term and t.pattern.type == "str":
            return f"'{t.pattern.value}'"
    return term.lower()


def _expected_words(expected: set[str], parser: Lark) -> list[str]:
    names = {t for t in expected if t == "NAME"}
    out: list[str] = []
    if names:
        out.append("a name")
    keyword_terms = {
        t.name
        for t in parser.terminals
        if t.pattern.type == "str" and t.pattern.value in SOFT_KEYWORDS
    } | {"TEMP"}
    for term in sorted(expected):
        if term == "NAME" or (names and term in keyword_terms):
            continue
        out.append(_describe(term, parser))
    return sorted(set(out), key=lambda w: (w[0] != "'", w))


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
        text = text.split()[0] if text.split() else "run"
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


def _syntax_diagnostic(
    source: SourceFile, exc: Exception, postlex: _PostLex, parser: Lark
) -> Diagnostic:
    if isinstance(exc, UnexpectedCharacters):
        line, col = exc.line, exc.column
        char = source.text[exc.pos_in_stream] if exc.pos_in_stream < len(source.text) else ""
        span = Span(source.name, line, col, line, col + 1)
        if char == "'":
            msg = "unexpected single quote: strings are written in double quotes (\"...\")"
        elif char == "\\":
            msg = "unexpected backslash: only a run line may be continued with '\\'"
        else:
            msg = f"unexpected character {char!r}"
            allowed = _expected_words(set(exc.allowed or ()), parser)
            if allowed:
                msg += f"; expected {_join(allowed)}"
        return Diagnostic(span, msg, source)

    if isinstance(exc, UnexpectedEOF):
        tok = Token("$END", "", 0, *source.position(len(source.text)))
        expected = set(exc.expected or ())
    else:
        assert isinstance(exc, UnexpectedToken)
        tok = exc.token
        expected = set(exc.expected or ())
        if exc.interactive_parser is not None:
            expected = set(exc.interactive_parser.accepts()) or expected
    expected.discard("$END") if tok.type != "$END" and "_NL" in expected else None

    if tok.type == "$END" or not getattr(tok, "line", None):
        line = source.text.count("\n") + 1
        if postlex.blocks:
            opener = postlex.blocks[-1]
            span = Span(source.name, opener.line, opener.column, opener.line, opener.column + 1)
            return Diagnostic(
                span,
                "unexpected end of file: this block is never closed; "
                "add '}' on a line of its own",
                source,
            )
        last = source.line(line - 1) if line > 1 else ""
        span = Span(source.name, max(1, line - 1), len(last) + 1, max(1, line - 1), len(last) + 2)
        return Diagnostic(
            span, f"unexpected end of file; expected {_join(_expected_words(expected, parser))}",
            source,
        )

    end_col = tok.end_column if tok.end_line == tok.line and tok.end_column else tok.column + 1
    if tok.type == "RUN_LINE":
        end_col = tok.column + 3
    if tok.type == "_NL":
        end_col = tok.column + 1
    span = Span(source.name, tok.line, tok.column, tok.line, end_col)
    words = _expected_words(expected, parser)
    prev = postlex.history[-2] if len(postlex.history) >= 2 else None
    got = _token_text(tok)

    if "a name" in words and str(tok) in RESERVED:
        msg = f"'{tok}' is reserved and cannot be used as a name; choose another name"
    elif prev is not None and prev.type in _AFTER and "a name" in words:
        msg = f"expected {_AFTER[prev.type]}, but found {got}"
    elif expected and expected <= {"RBRACE", "SHARED", "OUTPUT", "RETRIES", "STEP", "_NL"} and (
        "STEP" in expected
    ):
        msg = (
            f"unexpected {got} in a job: a job holds 'shared', 'output', 'retries' and "
            "'step' lines, and ends with '}' on a line of its own"
        )
    elif "RUN_LINE" in expected and "CALL" in expected:
        msg = (
            f"unexpected {got} in a step: a step holds 'out', 'in', and one 'run' or 'call' "
            "line, and ends with '}' on a line of its own"
        )
    elif "LBRACE" in expected and tok.type == "_NL":
        msg = "expected '{' at the end of this line, to open the block"
    elif tok.type == "_NL" and words:
        msg = f"this line ends too early; expected {_join(words)}"
    elif "_NL" in expected and tok.type == "RBRACE":
        msg = "'}' must stand on a line of its own"
    else:
        msg = f"unexpected {got}; expected {_join(words)}"
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


def _meta_span(source: SourceFile, meta) -> Span | None:
    if getattr(meta, "empty", True):
        return None
    return Span(source.name, meta.line, meta.column, meta.end_line, meta.end_column)


@v_args(meta=True)
class _Builder(Transformer):
    """Builds :mod:`nodes` from the Lark tree, collecting problems found inside tokens."""

    def __init__(self, source: SourceFile) -> None:
        super().__init__()
        self.source = source
        self.problems: list[Diagnostic] = []

    def _report(self, start: int, end: int, message: str) -> None:
        self.problems.append(Diagnostic(self.source.span(start, end), message, self.source))

    def _span(self, meta) -> Span | None:
        return _meta_span(self.source, meta)

    # names and values
    def name(self, meta, items):
        tok = items[0]
        return n.Name(str(tok), _span_of(self.source, tok))

    def ref(self, meta, items):
        return n.Ref(tuple(i.value for i in items), self._span(meta))

    def dotted(self, meta, items):
        return ".".join(i.value for i in items)

    def string(self, meta, items):
        tok = items[0]
        chars, offsets, closing = string_chars(str(tok), tok.start_pos, self._report)
        tpl, _ = parse_template(self.source, chars, offsets, self._report, closing=closing)
        return n.Template(tpl.parts, _span_of(self.source, tok))

    def int(self, meta, items):
        return n.Literal(int(items[0]), self._span(meta))

    def float(self, meta, items):
        return n.Literal(float(items[0]), self._span(meta))

    def boolean(self, meta, items):
        return n.Literal(str(items[0]) == "true", self._span(meta))

    def list(self, meta, items):
        values = tuple(self._literal(i) for i in items if i is not None)
        return n.Literal(tuple(v.value for v in values), self._span(meta))

    def _literal(self, item) -> n.Literal:
        if isinstance(item, n.Template):
            if not item.is_constant:
                ref = item.refs[0]
                self.problems.append(
                    Diagnostic(
                        ref.span,
                        "a value here is plain text, not a template: write '{{' and '}}' for "
                        "literal braces",
                        self.source,
                    )
                )
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
        return n.Param(items[0], self._literal(items[1]), self._span(meta))

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

    def _value(self, item) -> n.Value:
        if isinstance(item, n.Ref):
            return item
        return self._literal(item)

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
        value = n.Literal(int(item), self._span(meta)) if isinstance(item, Token) else item
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
        return split_run_line(self.source, str(tok), tok.start_pos, self._report)

    def call(self, meta, items):
        module, function, *kwargs = items
        return n.Call(
            module, function.value, tuple(k for k in kwargs if k is not None), self._span(meta)
        )

    def kwarg(self, meta, items):
        return n.Kwarg(items[0], self._value(items[1]), self._span(meta))
