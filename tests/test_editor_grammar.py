"""The TextMate grammar (``editors/opf.tmLanguage.json``) colours what opf's own parser sees.

Every example, every pipeline of the docs and ``editors/test/features.opf`` (every construct,
including the tricky ones: ``#`` inside strings and quoted run words, ``x#y``, continued run
lines, keywords used as names) is tokenised by ``editors/test/tokenize.mjs`` with
``vscode-textmate`` and ``vscode-oniguruma``, exactly as VS Code does. The expected scope of
each character comes from opf itself: its tokens (keywords, declared names, strings, numbers,
``run`` lines), its syntax tree (placeholders inside strings and run lines, names outside them,
call arguments) and its comments. Nothing outside a comment may be coloured as one.

Needs ``node`` and the two npm packages (``cd editors/test && npm ci``; ``.ci/run`` installs
them); without them these tests skip and say so. The VS Code extension folder is checked
without node.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import EXAMPLES

from opals_dsl.lang import nodes as n
from opals_dsl.lang.fmt import comments
from opals_dsl.lang.parse import parse, tokens
from opals_dsl.source import SourceFile

ROOT = Path(__file__).resolve().parents[1]
EDITORS = ROOT / "editors"
GRAMMAR = EDITORS / "opf.tmLanguage.json"
HARNESS = EDITORS / "test" / "tokenize.mjs"
MODULES = EDITORS / "test" / "node_modules"
NODE = shutil.which("node")

needs_node = pytest.mark.skipif(
    NODE is None or not all((MODULES / m / "package.json").is_file()
                            for m in ("vscode-textmate", "vscode-oniguruma")),
    reason="the grammar is tokenised with node and the npm packages vscode-textmate and "
    "vscode-oniguruma: install node, then run 'npm ci' in editors/test (.ci/run does both)",
)

DECLARED = {
    "PIPELINE": "entity.name.namespace.pipeline.opf",
    "PARAM": "variable.other.constant.param.opf",
    "JOB": "entity.name.type.job.opf",
    "STEP": "entity.name.function.step.opf",
    "SHARED": "variable.other.shared.opf",
    "OUT": "variable.other.output.opf",
}
STATEMENTS = {*DECLARED, "OUTPUT", "RETRIES", "IN", "CALL"}
COMMENT = "comment.line.number-sign.opf"


def pipelines(tmp: Path) -> list[Path]:
    """The examples, the features file, and the docs' whole pipelines written to files."""
    from test_docs import ALL

    files = list(EXAMPLES) + [EDITORS / "test" / "features.opf"]
    for k, block in enumerate(b for b in ALL if b.lang in ("opf", "opf-parse")):
        path = tmp / f"doc{k:02}.opf"
        path.write_text(block.text, encoding="utf-8")
        files.append(path)
    return files


# -- what opf says each character is ---------------------------------------------------------


def _statements(toks: list) -> list[list]:
    out, current = [], []
    for tok in toks:
        if tok.type == "_NL":
            if current:
                out.append(current)
            current = []
        else:
            current.append(tok)
    return out + ([current] if current else [])


def _walk(node, inside_template: bool = False):
    """Every Ref of the tree, and whether it stands in a template (a placeholder)."""
    if isinstance(node, n.Ref):
        yield node, inside_template
    elif isinstance(node, n.Run):
        for word in node.words:  # not shell_quoted: those repeat placeholders of the words
            yield from _walk(word, True)
    elif dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            yield from _walk(getattr(node, f.name),
                             inside_template or isinstance(node, n.Template))
    elif isinstance(node, tuple):
        for item in node:
            yield from _walk(item, inside_template)


def _kwargs(node):
    if isinstance(node, n.Kwarg):
        yield node
    elif dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            yield from _kwargs(getattr(node, f.name))
    elif isinstance(node, tuple):
        for item in node:
            yield from _kwargs(item)


def run_comments(text: str, start: int) -> list[tuple[int, int]]:
    """The comments of a run line (as opals_dsl.words reads it: a ``#`` that starts a word
    outside quotes), without a continuing backslash at their end."""
    found = []
    i, in_word = 3, False
    while i < len(text):
        c = text[i]
        if c == "\\":
            if text.startswith("\n", i + 1):
                i += 2
                continue
            in_word, i = True, i + 2
        elif c in " \t\r\n":
            in_word, i = False, i + 1
        elif c == "#" and not in_word:
            end = text.find("\n", i)
            end = len(text) if end < 0 else end
            body = text[i:end].rstrip()
            found.append((start + i, start + i + len(body.removesuffix("\\").rstrip())))
            i = end
        elif c == "'":
            in_word, i = True, text.index("'", i + 1) + 1
        elif c == '"':
            k = i + 1
            while text[k] != '"':
                k += 2 if text[k] == "\\" else 1
            in_word, i = True, k + 1
        else:
            in_word, i = True, i + 1
    return found


def expectations(source: SourceFile) -> tuple[list[tuple[int, int, str, str]], list]:
    """(start, end, scope, what) for every place whose colour opf decides; and the comments."""
    expect: list[tuple[int, int, str, str]] = []

    def at(tok, scope: str, what: str) -> None:
        expect.append((tok.start_pos, tok.end_pos, scope, what))

    for stmt in _statements(tokens(source)):
        first = stmt[0]
        if first.type == "RUN_LINE":
            expect.append((first.start_pos, first.start_pos + 3, "keyword.other.run.opf", "run"))
            expect.append((first.start_pos, first.end_pos, "meta.run.opf", "a run line"))
            continue
        if first.type in STATEMENTS:
            at(first, f"keyword.other.{first}.opf", "a statement's keyword")
        if first.type in DECLARED:
            at(stmt[1], DECLARED[first.type], f"the name a '{first}' declares")
        if first.type == "JOB" and len(stmt) > 4 and stmt[2].type == "FOR":
            at(stmt[2], "keyword.control.for.opf", "for")
            at(stmt[3], "variable.parameter.loop.opf", "the loop variable")
            at(stmt[4], "keyword.control.in.opf", "in")
        if first.type == "CALL":
            colon = next(k for k, t in enumerate(stmt) if t.type == "COLON")
            expect.append((stmt[1].start_pos, stmt[colon - 1].end_pos,
                           "entity.name.namespace.module.opf", "the called module"))
            at(stmt[colon + 1], "entity.name.function.call.opf", "the called function")
        for prev, tok in zip([None, *stmt], stmt, strict=False):
            if tok.type == "STRING":
                at(tok, "string.quoted.double.opf", "a string")
            elif tok.type in ("INT", "FLOAT"):
                at(tok, "constant.numeric.opf", "a number")
            elif tok.type == "DURATION":
                at(tok, "constant.numeric.duration.opf", "a duration")
            elif tok.type in ("TRUE", "FALSE"):
                at(tok, "constant.language.boolean.opf", "a boolean")
            elif tok.type in ("TEMP", "FLAT", "BY") and prev is not None and prev.type == "STRING":
                at(tok, "storage.modifier.opf", f"'{tok}'")
    tree = parse(source)
    for ref, placeholder in _walk(tree):
        if ref.span is None:
            continue
        start = _offset(source, ref.span.line, ref.span.column)
        end = _offset(source, ref.span.end_line, ref.span.end_column)
        if placeholder:
            expect.append((start, end, "meta.placeholder.opf", f"the placeholder {{{ref.dotted}}}"))
        else:
            expect.append((start, end, "variable.other.opf", f"the name {ref.dotted}"))
    for kwarg in _kwargs(tree):
        span = kwarg.name.span
        expect.append((_offset(source, span.line, span.column),
                       _offset(source, span.end_line, span.end_column),
                       "variable.parameter.argument.opf", "a call's argument name"))
    found = [(c.pos, c.end) for c in comments(source)]
    for tok in tokens(source):
        if tok.type == "RUN_LINE":
            found += run_comments(str(tok), tok.start_pos)
    expect += [(a, b, COMMENT, "a comment") for a, b in found]
    return expect, found


def _offset(source: SourceFile, line: int, column: int) -> int:
    starts = [0] + [m.end() for m in re.finditer("\n", source.text)]
    return starts[line - 1] + column - 1


@pytest.fixture(scope="module")
def tokenised(tmp_path_factory: pytest.TempPathFactory) -> dict[Path, list]:
    files = pipelines(tmp_path_factory.mktemp("docs"))
    if NODE is None:
        pytest.skip("no node")
    done = subprocess.run([NODE, str(HARNESS), str(GRAMMAR), *map(str, files)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return {Path(k): v for k, v in json.loads(done.stdout).items()}


@needs_node
def test_every_pipeline_is_coloured_as_opf_reads_it(tokenised: dict[Path, list]):
    assert len(tokenised) >= 10
    problems = []
    for path, lines in tokenised.items():
        source = SourceFile(path.name, path.read_text(encoding="utf-8"))
        scopes: dict[int, list[str]] = {}
        offset = 0
        for text, toks in zip(source.text.split("\n"), lines, strict=True):
            for start, end, names in toks:
                for col in range(start, min(end, len(text))):
                    scopes[offset + col] = names
            offset += len(text) + 1
        expect, found = expectations(source)
        for start, end, scope, what in expect:
            for pos in range(start, end):
                if source.text[pos] in "\r\n":
                    continue
                if scope not in scopes.get(pos, []):
                    line, col = source.position(pos)
                    problems.append(f"{path.name}:{line}:{col}: {what} {source.text[pos]!r} "
                                    f"is not {scope}: {scopes.get(pos)}")
                    break
        in_comment = {p for a, b in found for p in range(a, b)}
        for pos, names in scopes.items():
            if COMMENT in names and pos not in in_comment and not source.text[pos].isspace():
                line, col = source.position(pos)
                problems.append(f"{path.name}:{line}:{col}: {source.text[pos]!r} is coloured "
                                "as a comment but is none")
    assert not problems, "\n".join(problems[:30])


@needs_node
def test_the_features_file_has_every_kind_of_place(tokenised: dict[Path, list]):
    """The features file shows every construct the test above checks, so none goes untested."""
    source = SourceFile.read(EDITORS / "test" / "features.opf")
    expect, found = expectations(source)
    scopes = {scope for _, _, scope, _ in expect}
    assert {"keyword.other.run.opf", "meta.run.opf", "meta.placeholder.opf", COMMENT,
            "string.quoted.double.opf", "variable.other.opf", "entity.name.type.job.opf",
            "entity.name.function.step.opf", "variable.parameter.loop.opf",
            "variable.parameter.argument.opf", "entity.name.function.call.opf",
            "constant.numeric.opf", "constant.numeric.duration.opf",
            "constant.language.boolean.opf", "storage.modifier.opf"} <= scopes
    runs = [t for t in tokens(source) if t.type == "RUN_LINE"]
    assert any("\\\n" in str(t) for t in runs)  # a continued run line
    assert any(run_comments(str(t), t.start_pos) for t in runs)  # a comment on a run line
    assert "x#y" in source.text and "'# nor this'" in source.text and '"a#b"' in source.text
    assert "run# " in source.text  # a bare run with a comment right after it


def test_run_comments_are_found_as_opf_reads_them():
    text = "run a x#y '# q' \"# d\" \\# #c1 \\\n  b # c2 \\\n c"
    found = [text[a:b] for a, b in run_comments(text, 0)]
    assert found == ["#c1", "# c2"]


# -- the VS Code extension folder ------------------------------------------------------------


def test_the_vscode_extension_declares_the_language_and_its_grammar():
    folder = EDITORS / "vscode"
    package = json.loads((folder / "package.json").read_text(encoding="utf-8"))
    [language] = package["contributes"]["languages"]
    assert language["id"] == "opf" and language["extensions"] == [".opf"]
    [grammar] = package["contributes"]["grammars"]
    assert grammar["language"] == "opf" and grammar["scopeName"] == "source.opf"
    # the extension carries the grammar (a copied folder must work on its own): the same file
    assert (folder / grammar["path"]).read_bytes() == GRAMMAR.read_bytes(), (
        "editors/vscode's grammar differs from editors/opf.tmLanguage.json; copy it over")
    assert json.loads(GRAMMAR.read_text(encoding="utf-8"))["scopeName"] == "source.opf"
    config = json.loads((folder / language["configuration"]).read_text(encoding="utf-8"))
    assert config["comments"] == {"lineComment": "#"}
    assert ["{", "}"] in config["brackets"] and ["[", "]"] in config["brackets"]
    rules = config["indentationRules"]
    increase, decrease = re.compile(rules["increaseIndentPattern"]), re.compile(
        rules["decreaseIndentPattern"])
    assert increase.search('job dem for strip in "data/*.xyz" {  # one task a strip')
    assert increase.search("    step grid {")
    assert not increase.search("        run awk '{print}' {")  # a run line opens no block
    assert not increase.search('    out dem = "{strip.stem}.asc"')
    assert decrease.search("    }") and not decrease.search("    run echo }")
