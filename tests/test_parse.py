"""Parsing pipeline text into the syntax tree: every statement, every source, run-line words.

These are the positive cases (what a correct file means); what broken files say is in
``test_errors_golden.py``. Trees are compared as values: nodes leave their places out of
equality, and spans are asserted separately where they matter.
"""

from __future__ import annotations

import fcntl
import os
import pickle
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from opals_dsl.errors import OpfSyntaxError
from opals_dsl.lang import nodes as n
from opals_dsl.lang.parse import parse
from opals_dsl.source import SourceFile


def tree(text: str, name: str = "t.opf") -> n.Pipeline:
    return parse(SourceFile(name, textwrap.dedent(text)))


def T(*parts: str | tuple[str, ...]) -> n.Template:
    """A template from text pieces and ``("a", "b")`` tuples standing for ``{a.b}``."""
    return n.Template(tuple(n.Ref(p) if isinstance(p, tuple) else p for p in parts))


def step_of(body: str) -> n.Step:
    """The single step of a job whose step holds ``body``."""
    text = "job j {\n    step s {\n" + textwrap.indent(textwrap.dedent(body), "        ")
    text += "    }\n}\n"
    return parse(SourceFile("t.opf", text)).jobs[0].steps[0]


def words(line: str) -> list[tuple[str | n.Ref, ...]]:
    run = step_of(line + "\n").action
    assert isinstance(run, n.Run)
    return [w.template.parts for w in run.words]


# -- statements --------------------------------------------------------------------------------


def test_the_whole_example_pipeline():
    t = tree(
        """\
        # one DEM per strip, then a mosaic of all of them
        pipeline strip_dems

        param cell    = 1.0                 # a comment after a statement
        param results = "results"

        job dem for strip in "data/strip*.xyz" {
            shared cfg  = "cfg/grid.cfg"
            shared tool = "tools/lidar.py"
            output "{results}" by step
            retries 2

            step import {
                out odm = "{strip.stem}.odm"
                run python {tool} import {strip} {odm}
            }
            step grid {
                out dem = "{strip.stem}_dem.asc"
                run python {tool} grid --config {cfg} --cell {cell} {import.odm} {dem}
            }
        }

        job mosaic {
            shared tool = "tools/lidar.py"
            output "{results}" flat
            step merge {
                out mosaic = "mosaic.asc"
                run python {tool} mosaic -o {mosaic} {dem.grid.dem}   # every dem
            }
        }
        """
    )
    assert t.name == n.Name("strip_dems")
    assert t.params == (
        n.Param(n.Name("cell"), n.Literal(1.0)),
        n.Param(n.Name("results"), n.Literal("results")),
    )
    dem, mosaic = t.jobs
    assert dem.name == n.Name("dem") and dem.var == n.Name("strip")
    assert dem.source == n.GlobSource(T("data/strip*.xyz"))
    assert dem.shared == (
        n.Shared(n.Name("cfg"), T("cfg/grid.cfg")),
        n.Shared(n.Name("tool"), T("tools/lidar.py")),
    )
    assert dem.outputs == (n.Output(T(("results",)), flat=False),)
    assert dem.retries == (n.Retries(n.Literal(2)),)
    assert [s.name.value for s in dem.steps] == ["import", "grid"]
    assert dem.steps[0].outs == (n.Out(n.Name("odm"), T(("strip", "stem"), ".odm"), temp=False),)
    grid = dem.steps[1].action
    assert isinstance(grid, n.Run) and not grid.shell
    assert [w.template for w in grid.words] == [
        T("python"), T(("tool",)), T("grid"), T("--config"), T(("cfg",)), T("--cell"),
        T(("cell",)), T(("import", "odm")), T(("dem",)),
    ]
    assert mosaic.var is None and mosaic.source is None
    assert mosaic.outputs == (n.Output(T(("results",)), flat=True),)
    merge = mosaic.steps[0].action
    assert merge.words[-1].template == T(("dem", "grid", "dem"))  # the comment is gone


def test_pipeline_statement_is_optional():
    t = tree('param x = 1\njob j {\n    step s {\n        run true\n    }\n}\n')
    assert t.name is None and len(t.jobs) == 1


def test_an_empty_file_and_a_file_of_comments_are_empty_pipelines():
    assert tree("") == n.Pipeline(None, (), ())
    assert tree("# nothing here\n\n   # still nothing\n") == n.Pipeline(None, (), ())


@pytest.mark.parametrize(
    ("written", "value"),
    [
        ("3", 3),
        ("-7", -7),
        ("0.5", 0.5),
        ("-1.5e3", -1500.0),
        (".25", 0.25),
        ("2e3", 2000.0),
        ("true", True),
        ("false", False),
        ('"results"', "results"),
        (r'"say \"hi\" \\ bye"', 'say "hi" \\ bye'),
        ('"{{braces}}"', "{braces}"),
        ("[]", ()),
        ('[1, "a", 2.5, true]', (1, "a", 2.5, True)),
        ("[[1, 2], [3]]", ((1, 2), (3,))),
        ("[\n    1,\n    2,\n]", (1, 2)),
    ],
)
def test_param_literals(written: str, value: object):
    t = tree(f"param x = {written}\n")
    got = t.params[0].value.value
    assert got == value and type(got) is type(value)


def test_job_sources_of_every_kind():
    t = tree(
        """\
        param n = 3
        job g for f in "data/*.xyz" {
            step s {
                run a
            }
        }
        job l for v in ["a", "b", 3] {
            step s {
                run a
            }
        }
        job r1 for i in range(4) {
            step s {
                run a
            }
        }
        job r2 for i in range(1, n) {
            step s {
                run a
            }
        }
        job ln for t in lines("tiles/{pipeline.name}.txt") {
            step s {
                run a
            }
        }
        job up for d in g.s.out {
            step s {
                run a
            }
        }
        """
    )
    sources = {j.name.value: j.source for j in t.jobs}
    assert sources["g"] == n.GlobSource(T("data/*.xyz"))
    assert sources["l"] == n.ListSource((n.Literal("a"), n.Literal("b"), n.Literal(3)))
    assert sources["r1"] == n.RangeSource((n.Literal(4),))
    assert sources["r2"] == n.RangeSource((n.Literal(1), n.Ref(("n",))))
    assert sources["ln"] == n.LinesSource(T("tiles/", ("pipeline", "name"), ".txt"))
    assert sources["up"] == n.UpstreamSource(n.Ref(("g", "s", "out")))


def test_job_lines_shared_output_retries():
    t = tree(
        """\
        job j for x in ["a"] {
            shared cfg = "cfg/{job.name}.cfg"
            output "out/{x}/{task.id}"
            retries tries
            step s {
                run a
            }
        }
        """
    )
    job = t.jobs[0]
    assert job.shared == (n.Shared(n.Name("cfg"), T("cfg/", ("job", "name"), ".cfg")),)
    # no layout word: by step
    assert job.outputs == (n.Output(T("out/", ("x",), "/", ("task", "id")), flat=False),)
    assert job.retries == (n.Retries(n.Ref(("tries",))),)


def test_job_without_output_or_retries_has_none():
    job = tree("job j {\n    step s {\n        run a\n    }\n}\n").jobs[0]
    assert job.outputs == () and job.retries == () and job.shared == ()


def test_step_outs_temp_and_ins():
    step = step_of(
        """\
        out odm = "{x.stem}.odm" temp
        out log = "logs/{task.id}.log"
        in "data/{x.stem}.prj", cfg, dem.grid.dem
        in "more.txt"
        run a
        """
    )
    assert step.outs == (
        n.Out(n.Name("odm"), T(("x", "stem"), ".odm"), temp=True),
        n.Out(n.Name("log"), T("logs/", ("task", "id"), ".log"), temp=False),
    )
    assert step.ins == (
        n.In(T("data/", ("x", "stem"), ".prj")),
        n.In(n.Ref(("cfg",))),
        n.In(n.Ref(("dem", "grid", "dem"))),
        n.In(T("more.txt")),
    )


def test_call_with_keyword_arguments_of_every_kind():
    step = step_of(
        """\
        call tools.grid.sub:make_dem(
            src = import.odm,
            cell = 0.5,
            n = 3,
            keep = false,
            name = "dem",
            bands = ["r", "g"],
            stem = strip.stem,
        )
        """
    )
    call = step.action
    assert isinstance(call, n.Call)
    assert call.module == "tools.grid.sub" and call.function == "make_dem"
    assert call.target == "tools.grid.sub:make_dem"
    assert call.kwargs == (
        n.Kwarg(n.Name("src"), n.Ref(("import", "odm"))),
        n.Kwarg(n.Name("cell"), n.Literal(0.5)),
        n.Kwarg(n.Name("n"), n.Literal(3)),
        n.Kwarg(n.Name("keep"), n.Literal(False)),
        n.Kwarg(n.Name("name"), n.Literal("dem")),
        n.Kwarg(n.Name("bands"), n.Literal(("r", "g"))),
        n.Kwarg(n.Name("stem"), n.Ref(("strip", "stem"))),
    )


def test_call_without_arguments():
    call = step_of("call m:f()\n").action
    assert call == n.Call("m", "f", ())


def test_keywords_are_names_except_the_reserved_ones():
    t = tree(
        """\
        param for = 1
        job step for in in ["a"] {
            shared output = "x.cfg"
            step import {
                out in = "{in}.txt"
                out temp = "t.txt" temp
                out flat = "f.txt"
                call by.step:call(param = for, retries = shared)
            }
            step out {
                run echo {import.in}
            }
        }
        """
    )
    assert t.params[0].name.value == "for"
    job = t.jobs[0]
    assert (job.name.value, job.var.value) == ("step", "in")
    assert job.shared[0].name.value == "output"
    assert [s.name.value for s in job.steps] == ["import", "out"]
    outs = job.steps[0].outs
    assert [(o.name.value, o.temp) for o in outs] == [
        ("in", False), ("temp", True), ("flat", False),
    ]
    call = job.steps[0].action
    assert call.module == "by.step" and call.function == "call"
    assert [k.name.value for k in call.kwargs] == ["param", "retries"]
    assert job.steps[1].action.words[1].template == T(("import", "in"))


def test_a_keyword_is_a_whole_word():
    # 'output' in a step is not 'out' followed by 'put'
    with pytest.raises(OpfSyntaxError) as info:
        step_of('output "x"\nrun a\n')
    assert "'output'" in info.value.first.message


def test_comments_and_blank_lines_anywhere():
    t = tree(
        """\
        # header

        pipeline p   # named


        job j {   # opens
            # inside a job

            step s {  # opens a step
                # inside a step
                run a   # the rest is a comment
                # after the run line
            }   # closes a step

        }  # closes the job
        # trailer
        """
    )
    assert t == tree("pipeline p\njob j {\n    step s {\n        run a\n    }\n}\n")


def test_windows_line_ends_parse_like_unix_ones():
    unix = "param x = 1\njob j {\n    step s {\n        run a {x}\n    }\n}\n"
    assert tree(unix.replace("\n", "\r\n")) == tree(unix)


def test_a_file_may_end_without_a_newline():
    assert tree("param x = 1") == tree("param x = 1\n")


# -- run lines -----------------------------------------------------------------------------------


def test_run_words_split_as_a_shell_would():
    assert words('run a "b c" d') == [("a",), ("b c",), ("d",)]
    assert words("run a 'b \"c' d") == [("a",), ('b "c',), ("d",)]
    assert words(r"run a\ b c\\d") == [("a b",), ("c\\d",)]
    assert words(r'run "a\"b" "c\\d" "e\f"') == [('a"b',), ("c\\d",), ("e\\f",)]
    assert words("run a''b \"\"c") == [("ab",), ("c",)]
    assert words('run "" x') == [(), ("x",)]
    assert words("run \t a\t\tb  ") == [("a",), ("b",)]


def test_no_shell_operators_are_special():
    assert words("run cat a | sort > b && echo ; x") == [
        ("cat",), ("a",), ("|",), ("sort",), (">",), ("b",), ("&&",), ("echo",), (";",), ("x",)
    ]


def test_placeholders_inside_quotes_are_substituted_too():
    assert words("run x\"{a}\"y '--opt={b.stem}'") == [
        ("x", n.Ref(("a",)), "y"), ("--opt=", n.Ref(("b", "stem"))),
    ]


def test_doubled_braces_are_literal_braces():
    assert words("run awk '{{print $1}}' x{{y}} {{") == [
        ("awk",), ("{print $1}",), ("x{y}",), ("{",),
    ]


def test_backslash_newline_continues_a_run_line():
    # as in a shell, backslash-newline is removed: the indentation after it separates words,
    # and a word continued at the very start of the next line is one word
    text = "job j {\n step s {\n  run a \\\n   b\\\n   c \\\n   {x}\\\nyz\n  out o = \"o\"\n }\n}\n"
    step = tree(text).jobs[0].steps[0]
    assert [w.template.parts for w in step.action.words] == [
        ("a",), ("b",), ("c",), (n.Ref(("x",)), "yz"),
    ]
    assert step.outs[0].name.value == "o"  # the line after the run line is a statement again


def test_hash_starts_a_comment_only_at_the_start_of_a_word_outside_quotes():
    assert words("run a#b c # d e") == [("a#b",), ("c",)]
    assert words("run a '#b' \"#c\" \\#d") == [("a",), ("#b",), ("#c",), ("#d",)]
    assert words("run a #{x}") == [("a",)]


def test_run_sh_takes_a_script_in_double_quotes():
    run = step_of('run sh "cat {a} | wc -l > {b}"\n').action
    assert run.shell
    assert run.words[1].template == T("cat ", ("a",), " | wc -l > ", ("b",))
    assert run.shell_problems == ()


def shell_problems(script: str) -> list[tuple[str, str]]:
    """(the place as written, the message) of each problem in ``run sh "SCRIPT"``."""
    line = 'run sh "' + script.replace("\\", "\\\\").replace('"', '\\"') + '"'
    run = step_of(line + "\n").action
    assert run.shell
    text = line.split("\n")
    return [(text[0][s.column - 9 : s.end_column - 9], m) for s, m in run.shell_problems]


def test_run_sh_knows_placeholders_inside_shell_quotes():
    found = shell_problems("""cat '{a}' "{b}" {c} 'x' {d}""")
    assert [place for place, _ in found] == ["{a}", "{b}"]
    assert all("stands inside shell quotes" in m for _, m in found)


@pytest.mark.parametrize(
    ("script", "why"),
    [
        ("echo \\{p} \\' > {o}", "follows a backslash"),  # the injection
        ("echo ${p}", "follows a '$'"),
        ("echo $'it\\' {p} '", "inside shell quotes"),  # bash's $'...' takes \' as a quote
        ("echo $'a\\'' {p}", "inside shell quotes"),  # ... where POSIX sh opens '...' here
        ("echo `cat {p}`", "inside backticks"),
        ("echo ${{x:-{p}}}", "inside '${...}'"),
        ("echo $(( {p} + 1 ))", "shell arithmetic"),
        ("(( {p} > 1 ))", "shell arithmetic"),
        ("echo $[ {p} ]", "shell arithmetic"),
        ("[[ {p} -eq 1 ]]", "inside '[[ ... ]]'"),
        ("a[{p}]=1", "inside '[...]'"),
        ("ls [{p}]*", "inside '[...]'"),
        ("echo \"$(echo {o}) {p}\"", "inside shell quotes"),
        ("echo \"$(case x in a) echo \" {p} \";; esac)\"", "after a 'case'"),
    ],
)
def test_run_sh_refuses_a_placeholder_where_its_value_would_not_arrive_as_it_is(script, why):
    found = shell_problems(script)
    assert [place for place, _ in found] == ["{p}"]
    assert why in found[0][1]


@pytest.mark.parametrize(
    "script",
    [
        "cat {a} | wc -l > {o}",
        "{p}_dem.asc pre{p} x={p} --in={p}",
        "echo \"$(cat {p})\" $(cat {p}) $( (cd x && cat {p}) )",
        "[ {p} -eq 1 ] && echo {p} # a comment: it's {p}",
        "echo '$1' \"$0\" ${{#}} ${{x}} $(( 1 + 2 )) {p}",
        "case {p} in a) echo {p};; esac; echo $(case x in a) echo;; esac) {p}",
        "ls *.[ch] [ab]x {{a,b}} {p}",
    ],
)
def test_run_sh_takes_a_placeholder_in_plain_shell_text(script):
    assert shell_problems(script) == []


@pytest.mark.parametrize(
    ("script", "named"),
    [("echo $1", "$1"), ('echo "$@"', "$@"), ("echo $*", "$*"), ("echo ${{2}}", "${2}"),
     ("echo ${{#1}}", "${#1}"), ("echo `echo $3`", "$3")],
)
def test_run_sh_scripts_may_not_name_the_positional_parameters_that_carry_the_values(
    script, named
):
    found = shell_problems(script)
    assert len(found) == 1
    assert found[0][0] == named.replace("{", "{{").replace("}", "}}")
    assert found[0][1].startswith(f"'{named}' in a run sh script")


@pytest.mark.parametrize(
    "line",
    ["run sh cat {a}", 'run sh "cat {a}" more', "run bash \"cat {a}\"", 'run sh "a"b'],
)
def test_other_run_lines_are_not_shell_scripts(line: str):
    assert not step_of(line + "\n").action.shell


# -- places ------------------------------------------------------------------------------------


def test_spans_of_names_references_and_statements():
    t = tree(
        """\
        param cell = 1.0
        job dem for strip in "data/*.xyz" {
            step grid {
                out dem = "{strip.stem}.asc"   # comment
                run opalsGrid -inFile {strip} -cell {cell}
            }
        }
        """,
        name="dir/p.opf",
    )
    param = t.params[0]
    assert (param.span.file, param.span.line, param.span.column) == ("dir/p.opf", 1, 1)
    assert (param.span.end_line, param.span.end_column) == (1, 17)  # without the newline
    assert (param.value.span.line, param.value.span.column) == (1, 14)
    job = t.jobs[0]
    assert (job.name.span.line, job.name.span.column, job.name.span.end_column) == (2, 5, 8)
    assert (job.var.span.line, job.var.span.column) == (2, 13)
    assert (job.source.pattern.span.column, job.source.pattern.span.end_column) == (22, 34)
    assert (job.span.line, job.span.end_line) == (2, 7)
    out = job.steps[0].outs[0]
    ref = out.path.refs[0]
    assert (ref.span.line, ref.span.column, ref.span.end_column) == (4, 20, 32)
    # the statement ends where its text ends, before the comment
    assert (out.span.line, out.span.column, out.span.end_line, out.span.end_column) == (4, 9, 4, 37)
    run = job.steps[0].action
    cell = run.words[-1].template.refs[0]
    assert (cell.span.line, cell.span.column, cell.span.end_column) == (5, 45, 51)
    assert (run.words[0].span.line, run.words[0].span.column) == (5, 13)


def test_spans_count_escapes_and_continuations_in_the_source():
    t = tree(
        'job j for x in ["a"] {\n'
        "    step s {\n"
        '        out o = "a\\"b{x}"\n'
        "        run a \\\n"
        "            '{x.stem}'\n"
        "    }\n"
        "}\n"
    )
    step = t.jobs[0].steps[0]
    ref = step.outs[0].path.refs[0]
    assert (ref.span.line, ref.span.column, ref.span.end_column) == (3, 22, 25)
    ref = step.action.words[1].template.refs[0]
    assert (ref.span.line, ref.span.column, ref.span.end_column) == (5, 14, 22)


def test_the_same_pipeline_with_other_spacing_is_an_equal_tree():
    tight = (
        'pipeline p\nparam l = [1, 2]\njob j for x in "d/*.x" {\n'
        'shared c = "c.cfg"\noutput "r" flat\nstep s {\nout o = "{x.stem}.o"\n'
        "run a {c} {x} {o}\n}\n}\n"
    )
    loose = textwrap.dedent(
        """\

        pipeline   p
        param l=[
            1,
            2,
        ]

        job   j   for   x   in   "d/*.x"   {
            shared   c="c.cfg"
            output "r"   flat
            step s{
                out o   =   "{x.stem}.o"
                run   a  {c}\t{x} \\
                      {o}
            }
        }
        """
    )
    a, b = tree(tight), tree(loose)
    assert a == b
    assert a.jobs[0].span != b.jobs[0].span  # equal although written elsewhere
    assert tree(tight.replace('"r" flat', '"r"')) != a  # and a real difference shows


@pytest.mark.parametrize("text, meant", [
    ("jb j {\n}\n", "job"),
    ("parm cell = 1\n", "param"),
    ("job j {\n    sharde tool = \"t.py\"\n}\n", "shared"),
    ("job j {\n    outptu \"results\" flat\n}\n", "output"),
    ("job j {\n    step s {\n        rn echo hi\n    }\n}\n", "run"),
    ("job j {\n    step s {\n        otu o = \"x\"\n        run echo {o}\n    }\n}\n", "out"),
])
def test_a_misspelt_keyword_is_answered_with_the_keyword_meant(text: str, meant: str):
    with pytest.raises(OpfSyntaxError) as caught:
        parse(SourceFile("t.opf", text))
    [message] = [d.message for d in caught.value.diagnostics]
    assert message.endswith(f"; did you mean '{meant}'?"), message


def test_a_word_far_from_every_keyword_gets_no_guess():
    with pytest.raises(OpfSyntaxError) as caught:
        parse(SourceFile("t.opf", "job j {\n    zebra 1\n}\n"))
    assert "did you mean" not in caught.value.diagnostics[0].message


# -- the built parser, kept in the user's cache folder ----------------------------------------

PARSE_ONE = (
    "import sys\n"
    "from opals_dsl.lang.parse import parse\n"
    "from opals_dsl.source import SourceFile\n"
    "tree = parse(SourceFile('p.opf', 'pipeline p\\njob j for x in [1, 2] {\\n"
    "    step s {\\n        run echo {x}\\n    }\\n}\\n'))\n"
    "print(tree.name.value, [job.name.value for job in tree.jobs])\n"
)


def _parse_in_new_process(cache: Path, first: str = "") -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, XDG_CACHE_HOME=str(cache))
    return subprocess.run([sys.executable, "-c", first + PARSE_ONE], env=env,
                          capture_output=True, text=True, timeout=60)


def test_the_built_parser_is_kept_for_the_next_process_and_a_damaged_one_is_rebuilt(
        tmp_path: Path):
    """Invariant: the first process builds the parser and leaves it in the user's cache folder
    (``$XDG_CACHE_HOME/opf``, this user's alone) beside the lock that keeps two processes from
    reading and writing it at once; the next one reads it without writing it again; a damaged
    file is rebuilt and parses the same, with nothing said on stderr."""
    cache = tmp_path / "cache"
    first = _parse_in_new_process(cache)
    assert first.returncode == 0, first.stderr
    assert first.stdout == "p ['j']\n" and first.stderr == ""
    folder = cache / "opf"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    [kept] = [p for p in folder.iterdir() if p.suffix == ".lark"]
    assert kept.name.startswith("parser-")
    assert sorted(p.name for p in folder.iterdir()) == [kept.name, f"{kept.name}.lock"]
    before = kept.stat()
    second = _parse_in_new_process(cache)
    assert (second.returncode, second.stdout, second.stderr) == (0, "p ['j']\n", "")
    after = kept.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    kept.write_bytes(kept.read_bytes()[:200] + b"\0damaged")
    third = _parse_in_new_process(cache)
    assert (third.returncode, third.stdout, third.stderr) == (0, "p ['j']\n", "")
    rebuilt = kept.stat()
    assert rebuilt.st_mtime_ns != before.st_mtime_ns  # written again, and now read as it is:
    fourth = _parse_in_new_process(cache)
    assert (fourth.returncode, fourth.stdout, fourth.stderr) == (0, "p ['j']\n", "")
    assert kept.stat().st_mtime_ns == rebuilt.st_mtime_ns


class _Planted:
    """A pickle that, when loaded, creates the file ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def test_a_parser_file_that_others_could_have_written_is_never_loaded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Invariant: Lark's cache file is a pickle, which runs code as it loads; one in a cache
    folder that others may write to is never read (the parser is built in memory instead), so
    nobody can plant code for opf to run."""
    from opals_dsl.lang import parse as parse_module
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    path = parse_module._cache_file(parse_module.grammar_text())
    assert path is not None and os.path.dirname(path) == str(cache / "opf")
    marker = tmp_path / "planted-code-ran"
    with open(path, "wb") as f:
        f.write(b"header\n" + pickle.dumps(_Planted(marker)))
    (cache / "opf").chmod(0o777)
    run = _parse_in_new_process(cache)
    assert (run.returncode, run.stdout, run.stderr) == (0, "p ['j']\n", "")
    assert not marker.exists()
    # the same file in a folder of this user's alone is read: the marker shows it would run
    (cache / "opf").chmod(0o700)
    _parse_in_new_process(cache)
    assert marker.exists()


def test_a_process_that_holds_the_parser_s_file_does_not_hold_up_the_next(tmp_path: Path):
    """Invariant: a process that keeps the lock of the parser's cache file (an ``opf`` stopped
    with Ctrl-Z while it loads it, say) does not stop the next ``opf``: after a short wait that
    one builds its parser itself, leaving the file as it is."""
    cache = tmp_path / "cache"
    assert _parse_in_new_process(cache).returncode == 0
    [kept] = (cache / "opf").glob("parser-*.lark")
    before = kept.stat().st_mtime_ns
    with open(f"{kept}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        run = _parse_in_new_process(
            cache, "import opals_dsl.lang.parse as p\np.CACHE_WAIT = 0.2\n")
    assert (run.returncode, run.stdout, run.stderr) == (0, "p ['j']\n", "")
    assert kept.stat().st_mtime_ns == before
