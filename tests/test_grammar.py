"""The grammar builds under LALR strict mode and ships inside the package."""

from __future__ import annotations

from lark import Lark

from opals_dsl.lang import nodes as n
from opals_dsl.lang.parse import _parser, grammar_text, parse
from opals_dsl.source import SourceFile


def test_grammar_builds_in_strict_lalr_mode():
    Lark(grammar_text(), parser="lalr", lexer="contextual", strict=True)
    parser, _ = _parser()
    assert parser.options.strict


def test_packaged_grammar_is_the_reference_grammar(tmp_path):
    from pathlib import Path

    top = Path(__file__).resolve().parents[1] / "grammar" / "opf.lark"
    assert grammar_text() == top.read_text(encoding="utf-8")


def test_keywords_are_names_and_lists_span_lines():
    text = (
        "param in = [1,\n  2]\n"
        "job step for out in range(in.x) {\n"
        "    step import {\n"
        "        out in = \"{out}.txt\"\n"
        "        run python -c 'print(1)' {in}\n"
        "    }\n"
        "}\n"
    )
    tree = parse(SourceFile("t.opf", text))
    assert tree.params[0].value == n.Literal((1, 2))
    job = tree.jobs[0]
    assert job.name.value == "step" and job.var.value == "out"
    step = job.steps[0]
    assert step.name.value == "import" and step.outs[0].name.value == "in"
    run = step.action
    assert [w.template.parts for w in run.words] == [
        ("python",), ("-c",), ("print(1)",), (n.Ref(("in",)),)
    ]
