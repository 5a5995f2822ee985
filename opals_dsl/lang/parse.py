"""Parsing: pipeline text → syntax tree (:mod:`.nodes`), or an :class:`OpfSyntaxError`.

The grammar is ``grammar/opf.lark`` (shipped inside the package). The Lark LALR parser is built
on first use, with ``strict=True`` so a grammar conflict is a build error. Building it takes a
few tenths of a second, more than the rest of checking a small file, so it is kept for the next
process in this user's cache folder (:func:`_cache_file`), where nobody else can write: Lark's
cache is a pickle, and loading one runs what it says. A small post-lexer drops newlines inside
``( )`` and ``[ ]`` and remembers the tokens before a failure, so a syntax error can say what
was expected *there*, in words ("a step name", "'{'", "end of file"), instead of terminal names.
Tree to nodes is a separate pass that keeps positions; mistakes inside strings and ``run`` lines
(braces, quotes, escapes) are collected and reported together after the parse.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import math
import os
import sys
import time
from collections.abc import Iterator
from functools import cache
from importlib import resources

import lark
from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedToken, VisitError

from ..errors import Diagnostic, OpfSyntaxError
from ..source import SourceFile, Span
from . import nodes as n
from .syntax_errors import point, syntax_diagnostic
from .words import parse_template, split_run_line, string_chars

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


#: how the parser is built; part of its cache file's name
_OPTIONS = {"parser": "lalr", "lexer": "contextual", "strict": True,
            "propagate_positions": True, "maybe_placeholders": True}


@cache
def _parser() -> tuple[Lark, _PostLex]:
    postlex = _PostLex()
    text = grammar_text()
    with _cache_held(text) as path:
        # Lark reads the file if it is there and whole, else builds the parser and saves it;
        # without a file (None) it builds the parser in memory
        return Lark(text, postlex=postlex, cache=path or False, **_OPTIONS), postlex


@contextlib.contextmanager
def _cache_held(grammar: str) -> Iterator[str | None]:
    """The parser's cache file (:func:`_cache_file`), its lock held for the block so that no
    other process reads or writes it meanwhile (none reads one half written); None where there
    is no such file, or its lock is still held after :data:`CACHE_WAIT` seconds (by an
    ``opf`` stopped while loading it, say: nobody waits for it)."""
    path = _cache_file(grammar)
    if path is None:
        yield None
        return
    try:
        lock = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        yield None
        return
    try:
        yield path if _hold(lock, CACHE_WAIT) else None
    finally:
        os.close(lock)


#: seconds a process waits for another one to be done with the parser's cache file
CACHE_WAIT = 3.0


def _hold(fd: int, seconds: float) -> bool:
    """Take an exclusive lock on ``fd``, trying for up to ``seconds``; True once held."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)


def _cache_file(grammar: str) -> str | None:
    """Where this user's built parser for ``grammar`` is kept: ``$XDG_CACHE_HOME/opf/`` (else
    ``~/.cache/opf/``), named by the grammar, the options and the versions of Lark and Python;
    None where that folder cannot be made or is not this user's alone (the parser is then
    built every time)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    if not os.path.isabs(base):  # no home folder to speak of
        return None
    folder = os.path.join(base, "opf")
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        st = os.stat(folder)
    except OSError:
        return None
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        return None
    key = hashlib.sha256("\0".join([grammar, repr(sorted(_OPTIONS.items())), lark.__version__,
                                    sys.version]).encode()).hexdigest()[:32]
    return os.path.join(folder, f"parser-{key}.lark")


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
        raise OpfSyntaxError([syntax_diagnostic(source, exc, postlex, parser)]) from None
    except _TooDeep as exc:
        message = f"brackets are nested more than {MAX_NESTING} deep here"
        raise OpfSyntaxError([Diagnostic(point(source, exc.token), message, source)]) from None
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
    (:mod:`.fmt`) lays them out again; what lies between them is blanks and comments."""
    parser, _postlex = _parser()
    text = source.text if source.text.endswith("\n") else source.text + "\n"
    if text.startswith("\ufeff"):  # as parse() reads it: offsets stay the same
        text = " " + text[1:]
    return list(parser.parse_interactive(text).iter_parse())


# -- syntax errors in words ------------------------------------------------------------------


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
            point(self.source, tok),
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
        items = [i for i in items if i is not None]
        if any(isinstance(i, (n.Ref, n.ValueList)) for i in items):
            kept = tuple(i if isinstance(i, n.Ref) else self._literal(i) for i in items)
            return n.ValueList(kept, self._span(meta))
        values = tuple(self._literal(i) for i in items)
        return n.Literal(tuple(v.value for v in values), self._span(meta))

    def _literal(self, item, where: str = "") -> n.Literal:
        if isinstance(item, n.ValueList):
            ref = next(i for i in item.items if isinstance(i, n.Ref))
            self.problems.append(Diagnostic(
                ref.span,
                f"'{ref.dotted}': {'a call' if where == 'call' else where or 'this list'} takes "
                "plain values, not names, in a list; write "
                "the value itself (only the origin of tiles(...) may name params)",
                self.source,
            ))
            return n.Literal((), item.span)
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
        values = self._literal(items[0], "a list of values")
        return n.ListSource(
            tuple(n.Literal(v, values.span) for v in values.value), self._span(meta)
        )

    def func_source(self, meta, items):
        fname, args = items[0], [a for a in items[1:] if a is not None]
        span = self._span(meta)
        if fname.value == "tiles":
            return self._tiles(args, span)
        named = [a for a in args if isinstance(a, n.Kwarg)]
        if named and fname.value in ("range", "lines"):
            self.problems.append(Diagnostic(
                named[0].name.span,
                f"{fname.value}(...) takes no named arguments; only tiles(...) does "
                "(size = ..., buffer = ..., origin = [...])",
                self.source,
            ))
            args = [a for a in args if not isinstance(a, n.Kwarg)]
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

    def _tiles(self, args: list, span: Span | None) -> n.TilesSource:
        """``tiles(GLOB, size = S, buffer = B, origin = [X, Y])``: the glob first, then the
        named arguments, each once; ``size`` is required."""
        usage = 'write tiles("data/*.laz", size = 500, buffer = 25, origin = [0, 0])'
        positional = [a for a in args if not isinstance(a, n.Kwarg)]
        named: dict[str, n.Kwarg] = {}
        pattern = n.Template((), span)
        if not positional or not isinstance(positional[0], n.Template):
            where = positional[0].span if positional else span
            self._problem(where, f"tiles(...) takes the LAS/LAZ files' glob first; {usage}")
        else:
            pattern = positional[0]
            if args[0] is not positional[0]:
                self._problem(pattern.span, f"the glob comes before the named arguments; {usage}")
        for extra in positional[1:]:
            self._problem(extra.span, "tiles(...) takes one glob, then named arguments "
                          f"(size, buffer, origin); {usage}")
        for kw in (a for a in args if isinstance(a, n.Kwarg)):
            key = kw.name.value
            if key not in ("size", "buffer", "origin"):
                self._problem(kw.name.span, f"tiles(...) has no argument '{key}'; it takes "
                              "size, buffer and origin")
            elif key in named:
                self._problem(kw.name.span, f"argument '{key}' is given twice; remove one")
            else:
                named[key] = kw
        if "size" not in named:
            self._problem(span, f"tiles(...) needs the tiles' side length, size = S; {usage}")
        values = {k: self._source_value(kw.value, k) for k, kw in named.items()}
        return n.TilesSource(pattern, values.get("size"), values.get("buffer"),
                             values.get("origin"), span)

    def _source_value(self, item, key: str):
        if isinstance(item, (n.Ref, n.ValueList)):
            return item
        return self._literal(item, f"the {key} of tiles(...)")

    def _problem(self, span: Span | None, message: str) -> None:
        self.problems.append(Diagnostic(span, message, self.source))

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
            threads=tuple(b for b in body if isinstance(b, n.Threads)),
            timeouts=tuple(b for b in body if isinstance(b, n.Timeout)),
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

    def threads(self, meta, items):
        return n.Threads(self._number(items[0]), self._span(meta))

    def timeout(self, meta, items):
        return n.Timeout(self._number(items[0]), self._span(meta))

    def _number(self, item):
        """A ``threads`` or ``timeout`` value: a param, a number, or a duration's text."""
        if not isinstance(item, Token):
            return item
        span = _span_of(self.source, item)
        if item.type == "INT":
            return n.Literal(int(item), span)
        if item.type == "FLOAT":
            return n.Literal(float(item), span)
        return n.Literal(str(item), span)

    def step(self, meta, items):
        name, *body = items
        return n.Step(
            name=name,
            outs=tuple(b for b in body if isinstance(b, n.Out)),
            ins=tuple(i for b in body if isinstance(b, tuple) for i in b),
            actions=tuple(b for b in body if isinstance(b, (n.Run, n.Call))),
            span=self._span(meta),
            threads=tuple(b for b in body if isinstance(b, n.Threads)),
            timeouts=tuple(b for b in body if isinstance(b, n.Timeout)),
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
            return n.Run((), span=point(self.source, tok, 3))
        return split_run_line(self.source, str(tok), tok.start_pos, self._report)

    def call(self, meta, items):
        module, function, *kwargs = items
        kwargs = [
            n.Kwarg(k.name, self._value(k.value, "call"), k.span) for k in kwargs if k is not None
        ]
        return n.Call(module, function.value, tuple(kwargs), self._span(meta))

    def kwarg(self, meta, items):
        # the value as written: a call and a source each say what they take
        return n.Kwarg(items[0], items[1], self._span(meta))
