"""``opf fmt``: one layout, the same meaning, every comment kept, and a second pass changes nothing.

The invariants (SPEC §5.4), each a property test over pipelines that hypothesis writes in a
random layout (blanks, tabs, indentation, blank lines, lists over several lines, trailing
commas, ``run`` continuations) with comments everywhere a comment may stand, and over the
examples and the docs' pipelines with comments sprinkled in:

* the formatted text parses to a syntax tree equal to the original's;
* formatting the formatted text changes nothing;
* every comment survives, between the same two tokens (commas aside, which the layout adds).

Then the command: files rewritten atomically (their line ends, mode and links kept), ``--check``
and ``--diff`` change nothing, a file with errors is never touched (exit 2).
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import EXAMPLES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fuzz_frontend import SEEDS as FUZZ_SEEDS
from test_fuzz_frontend import mutate

from opals_dsl.cli import main
from opals_dsl.errors import OpfSyntaxError
from opals_dsl.lang.fmt import LINE_LENGTH, comments, format_source
from opals_dsl.lang.parse import parse, tokens
from opals_dsl.source import SourceFile

ROOT = Path(__file__).resolve().parents[1]


def fmt(text: str) -> str:
    return format_source(SourceFile("t.opf", text))


def tokens_and_comments(text: str) -> list[tuple[str, str]]:
    """The file as the parser's tokens and the comments between them, in order; commas and
    line ends left out (the layout may add a trailing comma and move lines), a run line
    as its kind only (its words are compared in the syntax tree)."""
    source = SourceFile("t.opf", text)
    seq = [(t.start_pos, t.type, "" if t.type == "RUN_LINE" else str(t))
           for t in tokens(source) if t.type not in ("_NL", "COMMA")]
    seq += [(c.pos, "#", c.text) for c in comments(source)]
    return [(kind, value) for _, kind, value in sorted(seq)]


def tree(text: str):
    """The syntax tree, also of a file whose only mistakes are found while it is built (the
    parser read it all); a file that does not parse raises."""
    try:
        return parse(SourceFile("t.opf", text))
    except OpfSyntaxError as error:
        if getattr(error, "pipeline", None) is None:
            raise
        return error.pipeline


def laid_out_or_refused(text: str) -> bool:
    """A text that does not parse is refused with the parser's error (False); one that parses
    keeps its tree and comments and formats to itself (True)."""
    try:
        tree(text)
    except OpfSyntaxError:
        with pytest.raises(OpfSyntaxError):
            fmt(text)
        return False
    assert_invariants(text)
    return True


def assert_invariants(text: str) -> str:
    before = tree(text)
    once = fmt(text)
    assert tree(once) == before, once
    assert fmt(once) == once, once
    assert tokens_and_comments(once) == tokens_and_comments(text), once
    return once


# -- examples ----------------------------------------------------------------------------------


def test_the_examples_are_in_the_canonical_layout():
    """``opf fmt --check examples/`` passes: the files users copy from are laid out as opf
    lays them out (after editing one, run ``opf fmt examples/``); so is the editor test's."""
    for path in [*EXAMPLES, ROOT / "editors" / "test" / "features.opf"]:
        text = path.read_text(encoding="utf-8")
        assert fmt(text) == text, f"{path.name} is not formatted; run: opf fmt examples/"


def test_a_messy_pipeline_gets_the_canonical_layout():
    messy = textwrap.dedent("""\
          # one DEM per strip
        pipeline   strip_dems
        param cell=1.0   # metres
        param results = "results"     # where
        job dem for strip in "data/strip*.xyz"{
        \tshared cfg="cfg/grid.cfg"
        \tshared tool = "tools/lidar.py"


        \toutput "{results}"   by   step
          step import {
                out odm="{strip.stem}.odm"   temp
                in "data/{strip.stem}.prj" ,dem.grid.dem
                run python {tool} import {strip}   {odm}   # two   blanks stay
          }
        }
        job mosaic {
          step merge {
            call tools.grid:mosaic( dems = dem.grid.dem,cell=cell , names=["a","b"] )
            }
        }
        """)
    assert fmt(messy) == textwrap.dedent("""\
        # one DEM per strip
        pipeline strip_dems

        param cell    = 1.0        # metres
        param results = "results"  # where

        job dem for strip in "data/strip*.xyz" {
            shared cfg  = "cfg/grid.cfg"
            shared tool = "tools/lidar.py"

            output "{results}" by step
            step import {
                out odm = "{strip.stem}.odm" temp
                in "data/{strip.stem}.prj", dem.grid.dem
                run python {tool} import {strip}   {odm}   # two   blanks stay
            }
        }

        job mosaic {
            step merge {
                call tools.grid:mosaic(dems = dem.grid.dem, cell = cell, names = ["a", "b"])
            }
        }
        """)


def test_the_layout_shown_in_the_docs_is_what_opf_fmt_makes():
    from test_docs import blocks

    # the first two pipelines of the page: a file ("This file:") and its layout ("becomes:")
    before, after, *_ = [b for b in blocks(ROOT / "docs" / "editors.md") if b.lang == "opf-parse"]
    assert fmt(before.text) == after.text
    assert fmt(after.text) == after.text


def test_lists_with_comments_or_a_trailing_comma_get_one_item_a_line():
    text = textwrap.dedent("""\
        param sizes = [1, 2,]
        param names = [   # the strips
            "a", "b"  # the first two
            # and one more
            , "c"
        ]
        """)
    assert fmt(text) == textwrap.dedent("""\
        param sizes = [
            1,
            2,
        ]
        param names = [  # the strips
            "a",
            "b",         # the first two
            # and one more
            "c",
        ]
        """)


def test_a_list_too_long_for_one_line_gets_one_item_a_line():
    items = ", ".join(f'"strip{i:02}"' for i in range(12))
    once = fmt(f"param names = [{items}]\n")
    assert once.splitlines()[1] == '    "strip00",' and once.splitlines()[-1] == "]"
    assert all(len(line) <= LINE_LENGTH for line in once.splitlines())
    short = fmt('param names = [\n    "a",\n    "b"\n]\n')
    assert short == 'param names = ["a", "b"]\n'


def test_run_lines_stay_word_for_word_and_continuations_move_with_the_block():
    text = (
        "job j {\n"
        "  step s {\n"
        "    run  awk '{{print $1}}'   \"a # b\" x#y {x} \\\n"
        "      --flag \\\n"
        "         last   # the end   \n"
        "    run echo \"a \\\n"
        "  b\"\n"
        "  }\n"
        "}\n"
    )
    once = fmt(text)
    assert once == (
        "job j {\n"
        "    step s {\n"
        "        run  awk '{{print $1}}'   \"a # b\" x#y {x} \\\n"
        "          --flag \\\n"
        "             last   # the end\n"
        # inside quotes the continuation's blanks are part of the word: kept as written
        "        run echo \"a \\\n"
        "  b\"\n"
        "    }\n"
        "}\n"
    )
    assert_invariants(text)


def test_blanks_after_a_backslash_at_the_end_of_a_run_line_stay():
    """``a\\ `` ends in an escaped blank; without the blank the line would go on."""
    for end in ["x\\ ", "# note \\ "]:
        text = f"job j {{\n    step s {{\n        run echo {end}\n    }}\n}}\n"
        assert fmt(text) == text
        assert_invariants(text)


def test_a_comment_right_after_a_bare_run_stays_against_it():
    """``run#x`` is a run line with no words followed by a comment outside it; a blank between
    the two would take the comment into the run line, so the formatter keeps them joined and
    the comment stays a comment of its own (reduced from a mutation of examples/per_strip.opf
    that the fuzzing property test found). A form feed between them is a blank that goes."""
    for line, kept in [("run#python {tool} x", "run#python {tool} x"), ("run\f#x  ", "run#x")]:
        text = f"job j {{\n  step s {{\n     {line}\n  }}\n}}\n"
        assert assert_invariants(text) == f"job j {{\n    step s {{\n        {kept}\n    }}\n}}\n"


def test_blank_lines_between_sections_and_none_at_block_edges():
    text = textwrap.dedent("""\


        pipeline p
        param a = 1
        param b = 2


        param c = 3
        # the first job
        job x {

            step s {
                run a

            }

        }
        # after x
        job y {
            step s {
                run b
            }
        }


        """)
    assert fmt(text) == textwrap.dedent("""\
        pipeline p

        param a = 1
        param b = 2

        param c = 3

        # the first job
        job x {
            step s {
                run a
            }
        }

        # after x
        job y {
            step s {
                run b
            }
        }
        """)


def test_empty_and_comment_only_files():
    assert fmt("") == ""
    assert fmt("\n\n  \n") == ""
    assert fmt("  # only a comment  \n\n\n# and another") == "# only a comment\n\n# and another\n"


def test_a_file_with_errors_is_refused():
    with pytest.raises(OpfSyntaxError):
        fmt("job j {\n    step s {\n        run echo x\n    }\n")
    with pytest.raises(OpfSyntaxError):
        fmt("param x = 1 2\n")


GOLDEN_ERRORS = ROOT / "tests" / "golden" / "errors"


def test_mistakes_found_while_the_tree_is_built_do_not_stop_the_layout():
    """As the docs promise, only a file that does not parse is refused: one whose mistakes
    are found while its tree is built (a name in a param's list, an unknown source or
    ``tiles`` argument, a '{' never closed inside a run line, which stays word for word) is
    laid out, faithfully, as is every golden error case that parses."""
    for text in ("pipeline p\nparam a = 1\nparam   b = [a, 2]\n",
                 "job j {\n  step s {\n    run echo {x\n  }\n}\n",  # inside a word
                 'job j for x in files("a") {\n  step s {\n run echo {x}\n}\n}\n'):
        with pytest.raises(OpfSyntaxError):
            parse(SourceFile("t.opf", text))
        assert_invariants(text)
    laid_out = sum(laid_out_or_refused(case.read_text(encoding="utf-8"))
                   for case in sorted(GOLDEN_ERRORS.glob("*.opf")))
    assert laid_out >= 30, laid_out


# -- property tests ----------------------------------------------------------------------------

NAMES = st.sampled_from(["a", "dem", "strip", "x1", "_t", "step", "out", "in", "temp", "flat",
                         "by", "for", "call", "shared", "output", "retries", "param"])
COMMENT_TEXT = st.text(alphabet="ab #\"'{}\\;", max_size=8)


class Writer:
    """Writes a pipeline in a random layout, with comments wherever they may stand; records
    each comment's unique mark so the test can find it again."""

    def __init__(self, data: st.DataObject) -> None:
        self.data = data
        self.marks: list[str] = []

    def draw(self, strategy):
        return self.data.draw(strategy)

    def comment(self) -> str:
        mark = f"#c{len(self.marks)}~"
        self.marks.append(mark)
        return mark + self.draw(COMMENT_TEXT)

    def gap(self, tight: bool) -> str:
        """Blanks between two tokens (none allowed next to punctuation)."""
        return self.draw(st.sampled_from(["", " ", "  ", "\t"] if tight else [" ", "  ", "\t"]))

    def line_end(self) -> str:
        tail = self.draw(st.sampled_from(["", " ", "\t"]))
        if self.draw(st.booleans()):
            tail += self.draw(st.sampled_from(["", " ", "  "])) + self.comment()
        return tail + "\n" + "\n" * self.draw(st.integers(0, 2))

    def indent(self) -> str:
        return self.draw(st.sampled_from(["", " ", "  ", "    ", "\t", "        "]))

    def own_line_comments(self) -> str:
        return "".join(self.indent() + self.comment() + "\n"
                       for _ in range(self.draw(st.integers(0, 2))))

    # values
    def template(self, placeholders: bool) -> str:
        parts = self.draw(st.lists(st.sampled_from(
            ["a", "data/", "*.xyz", "#x", " ", "\\\"", "\\\\", "{{", "}}", ";", "é"]
            + (["{strip.stem}", "{task.id}", "{a}"] if placeholders else [])
        ), max_size=5))
        return '"' + "".join(parts) + '"'

    def literal(self, depth: int = 0) -> str:
        kind = self.draw(st.sampled_from(["int", "float", "bool", "str"]
                                         + (["list"] if depth < 2 else [])))
        if kind == "int":
            return str(self.draw(st.integers(-5, 500)))
        if kind == "float":
            return self.draw(st.sampled_from(["1.0", "0.5", "-2.5", "1e3", ".5", "2.", "1.5e-3"]))
        if kind == "bool":
            return self.draw(st.sampled_from(["true", "false"]))
        if kind == "str":
            return self.template(False)
        return self.bracketed("[", "]", [self.literal(depth + 1)
                                         for _ in range(self.draw(st.integers(0, 4)))])

    def ref(self) -> str:
        return ".".join(self.draw(NAMES) for _ in range(self.draw(st.integers(1, 3))))

    def bracketed(self, open_: str, close: str, items: list[str]) -> str:
        """A list in brackets, maybe over several lines, maybe with comments and a trailing
        comma."""
        def brk() -> str:
            if not self.draw(st.booleans()):
                return self.gap(True)
            text = ""
            if self.draw(st.booleans()):
                text += " " + self.comment()
            text += "\n" + self.own_line_comments() + self.indent()
            return text

        out = open_ + brk()
        for k, item in enumerate(items):
            out += item
            if k < len(items) - 1:
                out += self.gap(True) + "," + brk()
        if items and self.draw(st.booleans()):
            out += ","
        return out + brk() + close

    # statements
    def statement(self, depth: str, text: str) -> str:
        return self.own_line_comments() + depth + text + self.line_end()

    def run_line(self, indent: str) -> str:
        words = self.draw(st.lists(st.sampled_from(
            ["python", "{tool}", "-o", "{odm}", "'{{a}}'", '"two words"', "x#y", "'# not'",
             '"{strip.stem} b"', "a\\ b", ">", "&&", "é"]
        ), min_size=1, max_size=6))
        out = "run"
        for word in words:
            if self.draw(st.integers(0, 5)) == 0:
                out += " \\\n" + indent + self.indent()
            else:
                out += self.draw(st.sampled_from([" ", "  ", "\t"]))
            out += word
        if self.draw(st.booleans()):  # (a backslash at its end would continue the line)
            out += " " + self.comment().rstrip("\\")
        return self.own_line_comments() + indent + out + "\n" + "\n" * self.draw(st.integers(0, 1))

    def step(self, indent: str) -> str:
        inner = indent + self.indent() + " "
        out = self.statement(indent, f"step{self.gap(False)}{self.draw(NAMES)}{self.gap(False)}{{")
        for _ in range(self.draw(st.integers(0, 2))):
            temp = self.gap(False) + "temp" if self.draw(st.booleans()) else ""
            out += self.statement(inner, f"out {self.draw(NAMES)}{self.gap(True)}={self.gap(True)}"
                                  f"{self.template(True)}{temp}")
        if self.draw(st.booleans()):
            items = [self.ref() if self.draw(st.booleans()) else self.template(True)
                     for _ in range(self.draw(st.integers(1, 3)))]
            out += self.statement(inner, "in " + ("," + self.gap(True)).join(items))
        for _ in range(self.draw(st.integers(0, 2))):
            if self.draw(st.booleans()):
                out += self.run_line(inner)
            else:
                args = [f"{self.draw(NAMES)}{self.gap(True)}={self.gap(True)}"
                        + (self.ref() if self.draw(st.booleans()) else self.literal())
                        for _ in range(self.draw(st.integers(0, 3)))]
                out += self.statement(inner, f"call pkg.mod:fn{self.bracketed('(', ')', args)}")
        return out + self.statement(indent, "}")

    def job(self) -> str:
        source = self.draw(st.sampled_from(["", "glob", "list", "range", "lines", "ref"]))
        head = f"job {self.draw(NAMES)}"
        if source:
            value = {
                "glob": lambda: self.template(True),
                "list": lambda: self.bracketed("[", "]", [self.template(False)]),
                "range": lambda: "range" + self.bracketed(
                    "(", ")", [self.draw(st.sampled_from(["3", "n", "-1"]))
                               for _ in range(self.draw(st.integers(1, 2)))]),
                "lines": lambda: 'lines("list.txt")',
                "ref": self.ref,
            }[source]()
            head += f" for {self.draw(NAMES)} in {value}"
        out = self.statement("", head + self.gap(False) + "{")
        inner = self.indent() + " "
        for _ in range(self.draw(st.integers(0, 4))):
            kind = self.draw(st.sampled_from(["shared", "output", "retries", "step", "step"]))
            if kind == "shared":
                out += self.statement(inner, f"shared {self.draw(NAMES)} = {self.template(True)}")
            elif kind == "output":
                layout = self.draw(st.sampled_from(["", " flat", " by step", " by  step"]))
                out += self.statement(inner, f"output {self.template(True)}{layout}")
            elif kind == "retries":
                out += self.statement(inner, f"retries {self.draw(st.sampled_from(['2', 'n']))}")
            else:
                out += self.step(inner)
        return out + self.statement("", "}")

    def pipeline(self) -> str:
        out = "\n" * self.draw(st.integers(0, 2)) + self.own_line_comments()
        if self.draw(st.booleans()):
            out += self.statement(self.indent(), "pipeline p")
        for _ in range(self.draw(st.integers(0, 5))):
            if self.draw(st.booleans()):
                name = self.draw(NAMES)
                out += self.statement(self.indent(), f"param {name}{self.gap(True)}="
                                      f"{self.gap(True)}{self.literal()}")
            else:
                out += self.job()
        return out + self.own_line_comments()


PROPERTY = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.slow
@PROPERTY
@given(data=st.data())
def test_formatting_keeps_the_tree_and_every_comment_and_is_idempotent(data: st.DataObject):
    """For any pipeline in any layout: parse(fmt(x)) == parse(x), fmt(fmt(x)) == fmt(x), and
    every comment (also those on run lines) is in the result, between the same tokens."""
    writer = Writer(data)
    text = writer.pipeline()
    once = assert_invariants(text)
    marks = sorted(writer.marks, key=text.find)
    positions = [once.find(mark) for mark in marks]
    assert all(p >= 0 for p in positions), (text, once)
    assert positions == sorted(positions), "comments changed their order"


def sprinkle(text: str, data: st.DataObject) -> str:
    """Comments added at line ends and as lines of their own, where a comment may stand:
    not inside a run line's continuation."""
    lines = text.split("\n")
    out: list[str] = []
    continued = False
    for k, line in enumerate(lines):
        out.append(line)
        if k == len(lines) - 1 or continued or line.rstrip().endswith("\\"):
            continued = line.rstrip().endswith("\\")
            continue
        continued = False
        if line.strip() and data.draw(st.booleans()):
            out[-1] += data.draw(st.sampled_from([" ", "  ", "\t"])) + f"# end {k} \"x\" {{y}}"
        if data.draw(st.integers(0, 3)) == 0:
            out.append(data.draw(st.sampled_from(["", "  ", "\t"])) + f"#line {k}")
    return "\n".join(out)


def _doc_pipelines() -> list[str]:
    from test_docs import ALL

    return [b.text for b in ALL if b.lang in ("opf", "opf-parse")]


SEEDS = [p.read_text(encoding="utf-8") for p in EXAMPLES] + _doc_pipelines()


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_examples_with_comments_sprinkled_in_keep_tree_comments_and_layout(
    data: st.DataObject
):
    """The examples and every pipeline of the docs, with comments added: the same invariants
    (same tree, idempotent, every comment kept between the same tokens)."""
    seed = data.draw(st.sampled_from(SEEDS))
    text = sprinkle(seed, data)
    once = assert_invariants(text)
    for mark in re.findall(r"#(?:end|line) \d+", text):
        assert mark in once


def test_the_docs_pipelines_format_without_complaint():
    """Every pipeline of the docs (some use a layout of their own) formats and keeps its
    meaning; none needs more than one pass."""
    assert len(SEEDS) >= 10
    for seed in SEEDS:
        assert_invariants(seed)


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_text_is_formatted_faithfully_or_refused_as_a_syntax_error(data: st.DataObject):
    """Pipelines with characters, tokens and lines deleted, inserted or swapped (the front
    end's fuzzing): a text that does not parse is refused with the parser's error; one that
    parses (mistakes found while its tree is built included) keeps its tree and comments and
    formats to itself."""
    laid_out_or_refused(mutate(data.draw(st.sampled_from(FUZZ_SEEDS)), data))


# -- the command -------------------------------------------------------------------------------

MESSY = "job j {\n  step s {\n      run echo {x}\n  }\n}\n"
NEAT = "job j {\n    step s {\n        run echo {x}\n    }\n}\n"


def opf(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "opals_dsl", *args], cwd=cwd, input=stdin,
                          capture_output=True, text=True, timeout=120)


def test_opf_fmt_rewrites_by_rename_and_a_second_run_changes_nothing(tmp_path: Path):
    path = tmp_path / "p.opf"
    path.write_text(MESSY, encoding="utf-8")
    inode = path.stat().st_ino
    done = opf("fmt", "p.opf", cwd=tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "reformatted p.opf\n")
    assert path.read_text(encoding="utf-8") == NEAT
    # written beside it and renamed into place: a new file, no temporary left behind
    assert path.stat().st_ino != inode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.opf"]
    mtime = path.stat().st_mtime_ns
    again = opf("fmt", "p.opf", cwd=tmp_path)
    assert (again.returncode, again.stdout, again.stderr) == (0, "", "")
    assert path.stat().st_mtime_ns == mtime


def test_check_and_diff_change_nothing(tmp_path: Path):
    path = tmp_path / "p.opf"
    path.write_text(MESSY, encoding="utf-8")
    check = opf("fmt", "--check", "p.opf", cwd=tmp_path)
    assert (check.returncode, check.stderr) == (1, "would reformat p.opf\n")
    diff = opf("fmt", "--diff", "p.opf", cwd=tmp_path)
    assert diff.returncode == 0
    assert "--- p.opf\n+++ p.opf (formatted)\n" in diff.stdout
    assert "\n-      run echo {x}\n" in diff.stdout and "\n+        run echo {x}\n" in diff.stdout
    both = opf("fmt", "--check", "--diff", "p.opf", cwd=tmp_path)
    assert both.returncode == 1 and both.stdout == diff.stdout
    assert path.read_text(encoding="utf-8") == MESSY
    path.write_text(NEAT, encoding="utf-8")
    clean = opf("fmt", "--check", "p.opf", cwd=tmp_path)
    assert (clean.returncode, clean.stdout, clean.stderr) == (0, "", "")


def test_a_file_with_errors_is_left_as_it_was_and_the_others_are_formatted(tmp_path: Path):
    broken = tmp_path / "broken.opf"
    broken.write_text("job j {\n  step s {\n    run echo x\n  }\n", encoding="utf-8")
    good = tmp_path / "good.opf"
    good.write_text(MESSY, encoding="utf-8")
    before = broken.read_bytes()
    done = opf("fmt", "broken.opf", "good.opf", "missing.opf", cwd=tmp_path)
    assert done.returncode == 2
    assert "broken.opf:1:7: error: the file ends before this job is closed" in done.stderr
    assert "    job j {\n" in done.stderr and "^" in done.stderr
    assert "opf: broken.opf: not formatted: fix the error above first" in done.stderr
    assert "opf: error: no such file: missing.opf" in done.stderr
    assert "Traceback" not in done.stderr
    assert broken.read_bytes() == before
    assert good.read_text(encoding="utf-8") == NEAT
    # --check: errors win over "would change"
    good.write_text(MESSY, encoding="utf-8")
    assert opf("fmt", "--check", "good.opf", "broken.opf", cwd=tmp_path).returncode == 2


def test_line_ends_byte_order_mark_mode_and_links_are_kept(tmp_path: Path):
    path = tmp_path / "p.opf"
    path.write_bytes(b"\xef\xbb\xbf" + MESSY.replace("\n", "\r\n").encode())
    path.chmod(0o600)
    link = tmp_path / "link.opf"
    link.symlink_to(path.name)
    assert main(["fmt", str(link)]) == 0
    assert link.is_symlink()
    assert path.read_bytes() == b"\xef\xbb\xbf" + NEAT.replace("\n", "\r\n").encode()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert main(["fmt", "--check", str(path)]) == 0


def test_a_read_only_file_is_left_as_it_was(tmp_path: Path):
    """A file made read-only is not replaced (its folder would let a rename do it, and the
    new file would be the formatter's user's): an error names it, exit status 2."""
    path = tmp_path / "p.opf"
    path.write_text(MESSY, encoding="utf-8")
    path.chmod(0o444)
    done = opf("fmt", "p.opf", cwd=tmp_path)
    assert done.returncode == 2
    assert "opf: error: p.opf: cannot write: the file is read-only" in done.stderr
    assert path.read_text(encoding="utf-8") == MESSY
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert opf("fmt", "--check", "p.opf", cwd=tmp_path).returncode == 1  # it would change


def test_folders_and_standard_input(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".opf").mkdir()  # a run's state folder is not looked into
    (tmp_path / ".opf" / "x.opf").write_text(MESSY, encoding="utf-8")
    (tmp_path / "sub" / "a.opf").write_text(MESSY, encoding="utf-8")
    (tmp_path / "b.opf").write_text(NEAT, encoding="utf-8")
    done = opf("fmt", ".", cwd=tmp_path)
    assert (done.returncode, done.stderr) == (0, f"reformatted {os.path.join('sub', 'a.opf')}\n")
    assert (tmp_path / ".opf" / "x.opf").read_text(encoding="utf-8") == MESSY
    piped = opf("fmt", "-", cwd=tmp_path, stdin=MESSY)
    assert (piped.returncode, piped.stdout) == (0, NEAT)
    assert opf("fmt", "--check", "-", cwd=tmp_path, stdin=MESSY).returncode == 1
    (tmp_path / "empty").mkdir()
    empty = opf("fmt", "empty", cwd=tmp_path)
    assert (empty.returncode, empty.stderr) == (2, "opf: error: empty holds no .opf file\n")
    bad = opf("fmt", "-", cwd=tmp_path, stdin="job {\n")
    assert bad.returncode == 2 and bad.stdout == "" and "<stdin>:1:5: error:" in bad.stderr


def test_fmt_is_in_the_help():
    done = subprocess.run([sys.executable, "-m", "opals_dsl", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert re.search(r"^\s+fmt\s+rewrite pipeline files", done.stdout, re.M)
