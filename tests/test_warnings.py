"""Warnings: what a pipeline may say but most likely does not mean, found before anything runs.

Each case is a real pipeline folder checked by ``opf check`` (in process, through
:func:`opals_dsl.cli.main`, and once as a real program): the warning has its place, the line,
a caret and a hint; it never changes the exit status; ``--strict`` makes it an error (exit 2,
nothing run); ``--format json|github`` give it severity ``warning``. The examples give none.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import EXAMPLES

from opals_dsl.cli import main

TOOL = "import sys\n\n\ndef density(src, dst):\n    pass\n"

#: name → (pipeline, the files beside it, the place and words of the warning, the words of
#: its line as shown under it)
CASES = {
    "undeclared_file": (
        """\
        job dem for s in "data/*.txt" {
            step grid {
                out o = "{s.stem}.out"
                run python tools/lidar.py {s} {o}
            }
        }
        """,
        "4:20: warning: 'tools/lidar.py' is a file in the pipeline's folder, but the step runs "
        "in its task folder on an engine, where nothing stages it; declare shared tool = "
        "\"tools/lidar.py\" in the job and write {tool}",
        "^^^^^^^^^^^^^^",
    ),
    "call_function_missing": (
        """\
        job dem for s in "data/*.txt" {
            step qc {
                out o = "{s.stem}.out"
                call tools.qcc:densty(src = s, dst = o)
            }
        }
        """,
        "4:9: warning: module 'tools.qcc' (tools/qcc.py) has no function 'densty', so the "
        "call would fail; did you mean 'density'?",
        "^" * 39,
    ),
    "call_module_missing": (
        """\
        job dem for s in "data/*.txt" {
            step qc {
                out o = "{s.stem}.out"
                call tools.qc:density(src = s, dst = o)
            }
        }
        """,
        "4:9: warning: module 'tools.qc' is not in the pipeline's folder (no tools/qc.py "
        "beside it) nor installed, so the call would fail; check the module's name, or put "
        "the file there",
        "^" * 39,
    ),
    "loop_variable_unused": (
        """\
        job dem for s in "data/*.txt" {
            step grid {
                out o = "{s.stem}.out"
                run touch {o}
            }
        }
        """,
        "1:13: warning: no step of job 'dem' uses '{s}', so the files its pattern matches are "
        "never staged where the steps run; write {s} where a step reads the file (a job over "
        "names, not files, loops over a list or lines(...))",
        "^",
    ),
    "no_job": (
        """\
        pipeline lonely
        param cell = 1.0
        """,
        "1:10: warning: this pipeline has no job, so running it does nothing; add one: the "
        "lines 'job NAME {', 'step NAME {' and 'run COMMAND', each block ended by a line '}'",
        "^^^^^^",
    ),
    "bare_redirect": (
        """\
        job dem for s in "data/*.txt" {
            step count {
                out o = "{s.stem}.out"
                run wc -l {s} > {o}
            }
        }
        """,
        "4:23: warning: '>' goes to wc as a word of its own: a run line starts the program "
        "without a shell, so nothing is redirected, piped or chained; for a shell, write the "
        "line as run sh \"...\" (each {name} in it is quoted for the shell)",
        "^",
    ),
}


def make_folder(folder: Path, pipeline: str) -> Path:
    (folder / "data").mkdir(parents=True, exist_ok=True)
    (folder / "data" / "a.txt").write_text("a\n", encoding="utf-8")
    (folder / "tools").mkdir(exist_ok=True)
    (folder / "tools" / "lidar.py").write_text("print('lidar')\n", encoding="utf-8")
    (folder / "tools" / "qcc.py").write_text(TOOL, encoding="utf-8")
    path = folder / "p.opf"
    path.write_text(textwrap.dedent(pipeline), encoding="utf-8")
    return path


def opf(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(argv))
    return status, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_warning_has_its_place_line_caret_and_hint_and_keeps_status_0(
        name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline, said, caret = CASES[name]
    path = make_folder(tmp_path, pipeline)
    monkeypatch.chdir(tmp_path)
    status, out, err = opf("check", "p.opf")
    assert status == 0
    assert out.startswith("p.opf: ok — ")
    lines = err.splitlines()
    assert lines[0] == f"p.opf:{said}"
    line, column = map(int, said.split(":")[:2])
    assert lines[1] == "    " + path.read_text(encoding="utf-8").splitlines()[line - 1]
    assert lines[2] == "    " + " " * (column - 1) + caret
    assert lines[3:] == ["1 warning found (--strict makes them errors)."]


@pytest.mark.parametrize("flags", [[], ["--json"], ["--dot"], ["--json", "--only", "dem"]])
def test_compile_shows_the_warnings_too_and_keeps_status_0(
        flags: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline, said, _ = CASES["undeclared_file"]
    make_folder(tmp_path, pipeline)
    monkeypatch.chdir(tmp_path)
    _, _, checked = opf("check", "p.opf")
    status, out, err = opf("compile", "p.opf", *flags)
    assert status == 0 and out
    assert err == checked and err.startswith(f"p.opf:{said}")


@pytest.mark.parametrize("name", sorted(CASES))
def test_strict_makes_a_warning_an_error(name: str, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline, said, _ = CASES[name]
    make_folder(tmp_path, pipeline)
    monkeypatch.chdir(tmp_path)
    status, out, err = opf("check", "p.opf", "--strict")
    assert (status, out) == (2, "")
    assert err.splitlines()[0] == f"p.opf:{said.replace(': warning: ', ': error: ')}"
    assert err.splitlines()[-1] == "1 error found; nothing was run."


@pytest.mark.parametrize("name", sorted(CASES))
def test_tools_see_a_warning_as_severity_warning(name: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline, said, _ = CASES[name]
    make_folder(tmp_path, pipeline)
    monkeypatch.chdir(tmp_path)
    status, out, _ = opf("check", "p.opf", "--format", "json")
    line, column = map(int, said.split(":")[:2])
    [found] = json.loads(out)
    assert status == 0
    assert (found["line"], found["column"], found["severity"]) == (line, column, "warning")
    assert f"{found['message']}; {found['hint']}" == said.split(": warning: ", 1)[1]
    status, out, _ = opf("check", "p.opf", "--format", "github")
    assert status == 0 and out.startswith(f"::warning file=p.opf,line={line},col={column},")
    status, out, _ = opf("check", "p.opf", "--format", "json", "--strict")
    assert status == 2 and [f["severity"] for f in json.loads(out)] == ["error"]


def test_a_pattern_in_in_is_explained_where_the_file_is_missing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No file is called 'data/*.txt', so the planner reports it missing; the warning at the
    same place, shown first, says why."""
    make_folder(tmp_path, """\
        job dem {
            step merge {
                out o = "all.out"
                in "data/*.txt"
                run cat {o}
            }
        }
    """)
    monkeypatch.chdir(tmp_path)
    status, _, err = opf("check", "p.opf")
    assert status == 2
    assert err.splitlines()[0] == (
        "p.opf:4:12: warning: 'in' takes files, not patterns, and \"data/*.txt\" is a "
        "pattern; for a task per matching file use a job over it (job NAME for f in "
        "\"data/*.txt\"), and for the files of another job a gather ({JOB.STEP.OUT})")
    assert err.splitlines()[3].startswith("p.opf:4:12: error: the input file 'data/*.txt'")
    status, out, _ = opf("check", "p.opf", "--format", "json")
    assert [f["severity"] for f in json.loads(out)] == ["warning", "error"]


def test_a_missing_input_that_every_task_names_is_one_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An `in` file written without the task's names is the same file for every task: one
    error without a task, not one per task; a per-task name still says which task."""
    make_folder(tmp_path, """\
        job dem for s in "data/*.txt" {
            step merge {
                out o = "{s.stem}.out"
                in "data/*.txt"
                in "data/{s.stem}.prj"
                run cat {s} {o}
            }
        }
    """)
    for name in "bcd":
        (tmp_path / "data" / f"{name}.txt").write_text(name, encoding="utf-8")
    (tmp_path / "data" / "b.prj").write_text("b", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    status, _, err = opf("check", "p.opf")
    assert status == 2
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert errors == [
        "p.opf:4:12: error: the input file 'data/*.txt' does not exist",
        "p.opf:5:12: error: the input file 'data/a.prj' (task 'a') does not exist",
        "p.opf:5:12: error: the input file 'data/c.prj' (task 'c') does not exist",
        "p.opf:5:12: error: the input file 'data/d.prj' (task 'd') does not exist",
    ]


def test_warnings_are_shown_beside_errors_and_leave_their_status(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_folder(tmp_path, """\
        job dem for s in "data/*.txt" {
            step count {
                out o = "{s.stem}.out"
                run wc -l {s} {celll} > {o}
            }
        }
    """)
    monkeypatch.chdir(tmp_path)
    status, _, err = opf("check", "p.opf")
    assert status == 2
    assert [line.split(": ")[1] for line in err.splitlines() if line.startswith("p.opf:")] == [
        "error", "warning"]
    assert err.splitlines()[-1] == "1 error and 1 warning found; nothing was run."


def test_a_call_module_is_read_never_imported(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The module's source would write a file if it were imported (or run): checking it
    finds that the function is missing — and that one defined under 'if' is there — without
    that."""
    make_folder(tmp_path, CASES["call_function_missing"][0])
    (tmp_path / "tools" / "qcc.py").write_text(
        "import pathlib\npathlib.Path('imported').write_text('yes')\n\n"
        "if True:\n    def density(src, dst):\n        pass\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    status, _, err = opf("check", "p.opf")
    assert status == 0
    assert err.splitlines()[0].endswith("has no function 'densty', so the call would fail; "
                                        "did you mean 'density'?")
    assert not (tmp_path / "imported").exists()
    assert "tools.qcc" not in sys.modules
    path = tmp_path / "p.opf"
    path.write_text(path.read_text(encoding="utf-8").replace("densty", "density"),
                    encoding="utf-8")
    assert opf("check", "p.opf") == (0, "p.opf: ok — p: 1 job, 1 task, 1 step run\n", "")
    assert not (tmp_path / "imported").exists()


def test_a_module_that_does_not_parse_is_a_warning(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    make_folder(tmp_path, CASES["call_function_missing"][0])
    (tmp_path / "tools" / "qcc.py").write_text("def densty(:\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    status, _, err = opf("check", "p.opf")
    assert status == 0
    assert "warning: module 'tools.qcc' (tools/qcc.py) does not parse (line 1: " in err


def test_only_the_bare_operator_is_a_mistake(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A quoted '>' is a word the program gets on purpose, and a declared tool written as
    {tool} is staged: neither is warned about, the bare '>' is."""
    make_folder(tmp_path, """\
        job dem for s in "data/*.txt" {
            shared tool = "tools/lidar.py"
            step grep {
                out o = "{s.stem}.out"
                run python {tool} grep ">" '|' {s} > {o}
            }
        }
    """)
    monkeypatch.chdir(tmp_path)
    status, _, err = opf("check", "p.opf")
    assert status == 0
    places = [line.split(": ")[0] for line in err.splitlines() if line.startswith("p.opf:")]
    assert places == ["p.opf:5:44"]  # the bare '>'


def test_a_declared_tool_written_as_its_path_is_pointed_to_its_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_folder(tmp_path, """\
        job dem for s in "data/*.txt" {
            shared lidar = "tools/lidar.py"
            step grid {
                out o = "{s.stem}.out"
                run python tools/lidar.py {s} {o}
            }
        }
    """)
    monkeypatch.chdir(tmp_path)
    _, _, err = opf("check", "p.opf")
    assert err.splitlines()[0].endswith(
        "where nothing stages it; write {lidar} instead (the job's shared file 'lidar')")


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_the_examples_give_no_warning(example: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "ex"
    shutil.copytree(example.parent, folder, ignore=shutil.ignore_patterns(
        "results*", ".opf", "__pycache__"))
    monkeypatch.chdir(folder)
    status, out, err = opf("check", example.name, "--strict")
    assert (status, err) == (0, "")


def test_opf_run_shows_the_warnings_and_strict_stops_it(tmp_path: Path) -> None:
    """The real program: ``opf run --dry-run`` shows the warning on stderr and goes on;
    with ``--strict`` it exits 2 and runs nothing."""
    make_folder(tmp_path, CASES["undeclared_file"][0])
    run = [sys.executable, "-m", "opals_dsl", "run", "p.opf", "--dry-run"]
    done = subprocess.run(run, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert done.stderr.startswith("p.opf:4:20: warning: 'tools/lidar.py' is a file")
    assert "run   dem/a" in done.stdout
    done = subprocess.run([*run, "--strict"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith("p.opf:4:20: error: 'tools/lidar.py' is a file")
    assert "Traceback" not in done.stderr
    assert not (tmp_path / ".opf").exists()
