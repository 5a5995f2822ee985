"""Limits: an absurd pipeline, parameter or list file is a clear message with exit status 2,
never a hang, an exhausted memory or a traceback; and checking does work in proportion to the
file (the figures are printed by ``benchmarks/check_scale.py``, never asserted here).

The limits (see docs/language.md, "Limits"): a pipeline file is a regular file of at most
32 MiB; a string or a ``run`` line has at most 1,048,576 characters; a job, and a pipeline, has
at most 10,000,000 tasks; a ``lines(...)`` file is a regular file of at most 256 MiB whose
values hold no NUL character.

Where the unlimited work would be large (``range(1000000000)``, ``/dev/zero``), ``opf`` runs
as a child process whose address space is capped (``RLIMIT_AS``), so that a missing limit shows
as a failure of the child, not as a machine out of memory; a named pipe that would be waited on
for ever is bounded by the child's timeout.
"""

from __future__ import annotations

import bisect
import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from opals_dsl.api import compile_file
from opals_dsl.errors import PipelineError
from opals_dsl.lang import expand, scope
from opals_dsl.source import SourceFile, Span, render_diagnostic

#: the address space a child ``opf`` may use: far more than checking these small files needs,
#: far less than building a billion tasks or reading /dev/zero would take
CHILD_MEMORY = 2 * 1024**3


def opf(*args: str, cwd: Path, memory: int | None = CHILD_MEMORY,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    def cap() -> None:
        if memory is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    return subprocess.run([sys.executable, "-m", "opals_dsl", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=timeout, preexec_fn=cap)


def refused(proc: subprocess.CompletedProcess[str], *expected: str) -> None:
    """Exit status 2, every expected text in the message, and no traceback."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "MemoryError" not in proc.stderr
    for text in expected:
        assert text in proc.stderr, proc.stderr


def pipeline(folder: Path, text: str, name: str = "p.opf") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


LINES = """\
    param list = "list.txt"
    job cells for cell in lines("{list}") {
        step s {
            out o = "{cell}.txt"
            in "{cell}.prj"
            run echo {cell} {o}
        }
    }
"""


RANGE = """\
    param n = 3
    job tiles for i in range(n) {
        step s {
            out o = "{i}.txt"
            run echo {i} {o}
        }
    }
"""


# -- the pipeline file -----------------------------------------------------------------------


def test_a_named_pipe_as_the_pipeline_file_is_refused_not_waited_on(tmp_path: Path):
    os.mkfifo(tmp_path / "p.opf")
    refused(opf("check", "p.opf", cwd=tmp_path, timeout=60),
            "opf: error: p.opf is not a regular file", "a pipeline file must be an ordinary file")


def test_dev_zero_as_the_pipeline_file_is_refused_not_read(tmp_path: Path):
    refused(opf("check", "/dev/zero", cwd=tmp_path), "opf: error: /dev/zero is not a regular file")


def test_a_pipeline_file_over_32_mib_is_refused_before_it_is_read(tmp_path: Path):
    with open(tmp_path / "big.opf", "wb") as f:  # sparse: costs no disk
        f.truncate(33 * 1024 * 1024)
    refused(opf("check", "big.opf", cwd=tmp_path, memory=512 * 1024**2),
            "opf: error: big.opf is 33 MiB, more than the 32 MiB that a pipeline file may have")


def test_a_nul_character_in_the_pipeline_is_a_syntax_error(tmp_path: Path):
    pipeline(tmp_path, """\
        job j {
            step s {
                out o = "a\0b.txt"
                run echo {o}
            }
        }
    """)
    proc = opf("check", "p.opf", cwd=tmp_path)
    refused(proc, "p.opf:3:19: error: unexpected NUL character (U+0000)")


def test_a_string_over_the_limit_is_refused_where_it_starts(tmp_path: Path):
    pipeline(tmp_path, f"""\
        param long = "{'x' * (2 * 1024 * 1024)}"
        job j {{
            step s {{
                run echo {{long}}
            }}
        }}
    """)
    proc = opf("check", "p.opf", cwd=tmp_path, memory=1024**3)
    refused(proc, "p.opf:1:14: error: this string is 2,097,154 characters long, more than the "
            "1,048,576 opf takes")
    # the line is shown as a window around the place, not as two million characters
    assert max(len(line) for line in proc.stderr.splitlines()) < 400


def test_a_run_line_over_the_limit_is_refused(tmp_path: Path):
    words = " ".join(["word"] * 300_000)
    pipeline(tmp_path, f"""\
        job j {{
            step s {{
                run echo {words}
            }}
        }}
    """)
    refused(opf("check", "p.opf", cwd=tmp_path, memory=1024**3),
            "p.opf:3:9: error: this run line is 1,500,008 characters long, more than the "
            "1,048,576 opf takes; no system runs a command that long")


def test_numbers_too_large_for_a_computer_are_refused(tmp_path: Path):
    pipeline(tmp_path, f"""\
        param many = {'7' * 5000}
        job j for i in range(many) {{
            step s {{
                run echo {{i}}
            }}
        }}
    """)
    refused(opf("check", "p.opf", cwd=tmp_path),
            "p.opf:1:14: error: the number 777777777777...777777777777 (5,000 digits) is too "
            "large")
    pipeline(tmp_path / "q", RANGE)
    refused(opf("check", "p.opf", "--param", f"n={'9' * 5000}", cwd=tmp_path / "q"),
            "opf: error: --param n=9999999999999999999999999999...9999999999999999999999999999: "
            "this whole number is too large")


# -- tasks -------------------------------------------------------------------------------------




def test_a_huge_range_is_refused_without_building_its_tasks(tmp_path: Path):
    pipeline(tmp_path, RANGE.replace("range(n)", "range(1000000000)"))
    refused(opf("check", "p.opf", cwd=tmp_path),
            "p.opf:2:20: error: range(1000000000) would make 1,000,000,000 tasks; a job may have "
            "at most 10,000,000")


def test_a_huge_param_is_refused_without_building_its_tasks(tmp_path: Path):
    pipeline(tmp_path, RANGE)
    refused(opf("check", "p.opf", "--param", "n=1000000000", cwd=tmp_path),
            "p.opf:2:20: error: range(1000000000) would make 1,000,000,000 tasks")
    refused(opf("run", "p.opf", "--dry-run", "--param", "n=100000000000000000000000",
                cwd=tmp_path),
            "range(100000000000000000000000) would make 100,000,000,000,000,000,000,000 tasks")


def test_the_task_limit_counts_the_whole_pipeline(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(expand, "MAX_TASKS", 10)
    path = pipeline(tmp_path, RANGE + RANGE.replace("param n = 3", "").replace("tiles", "more"))
    assert len(compile_file(path, {"n": "5"})) > 0
    with pytest.raises(PipelineError) as info:
        compile_file(path, {"n": "6"})
    assert [d.message for d in info.value.diagnostics] == [
        "range(6) would make 6 more tasks, 12 in all; a pipeline may have at most 10"]
    with pytest.raises(PipelineError) as info:
        compile_file(path, {"n": "11"})
    assert info.value.first.message == "range(11) would make 11 tasks; a job may have at most 10"


def test_a_list_file_with_too_many_lines_is_refused_as_it_is_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(expand, "MAX_TASKS", 10)
    path = pipeline(tmp_path, LINES)
    (tmp_path / "list.txt").write_text("".join(f"c{i}\n" for i in range(11)))
    with pytest.raises(PipelineError) as info:
        compile_file(path)
    assert info.value.first.message == (
        "the list file 'list.txt' has more than 10 lines; a job and a pipeline may have at most "
        "10 tasks")


# -- lines(...) files ----------------------------------------------------------------------------


def test_a_named_pipe_as_a_list_file_is_refused_not_waited_on(tmp_path: Path):
    pipeline(tmp_path, LINES)
    os.mkfifo(tmp_path / "list.txt")
    refused(opf("check", "p.opf", cwd=tmp_path, timeout=60),
            "p.opf:2:29: error: the list file 'list.txt' is not a regular file")


def test_dev_zero_as_a_list_file_is_refused_not_read(tmp_path: Path):
    pipeline(tmp_path, LINES)
    refused(opf("check", "p.opf", "--param", "list=/dev/zero", cwd=tmp_path),
            "error: the list file '/dev/zero' is not a regular file")


def test_a_list_file_over_the_size_limit_is_refused(tmp_path: Path):
    pipeline(tmp_path, LINES)
    with open(tmp_path / "list.txt", "wb") as f:  # sparse: costs no disk
        f.truncate(300 * 1024 * 1024)
    refused(opf("check", "p.opf", cwd=tmp_path),
            "error: the list file 'list.txt' is 314,572,800 bytes, more than the 268,435,456 a "
            "list file may have")


def test_a_nul_in_a_list_file_value_is_a_message_not_a_traceback(tmp_path: Path):
    pipeline(tmp_path, LINES)
    (tmp_path / "list.txt").write_bytes(b"a\nb\x00c\n")
    (tmp_path / "a.prj").write_text("")
    refused(opf("check", "p.opf", cwd=tmp_path),
            "p.opf:2:29: error: line 2 of the list file 'list.txt' holds a NUL character")


# -- work in proportion to the file ------------------------------------------------------------


def test_checking_many_jobs_builds_the_job_table_once_per_pass(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Name resolution shares one table of the pipeline's jobs: a table per job would make
    checking quadratic in the number of jobs."""
    built = []
    original = scope.JobTable.__init__

    def counting(self, pipeline):
        built.append(pipeline)
        original(self, pipeline)

    monkeypatch.setattr(scope.JobTable, "__init__", counting)
    jobs = "".join(
        f'job j{i} {{\n    output "r" flat\n    step s {{\n        out o = "o{i}.txt"\n'
        f"        run echo {{o}}\n    }}\n}}\n" for i in range(300)
    )
    compile_file(pipeline(tmp_path, jobs))
    assert 1 <= len(built) <= 4  # checking, the job graph twice, planning


def test_many_unknown_names_get_a_bounded_number_of_suggestions(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A suggestion looks through every name in sight; past a budget the message has none."""
    monkeypatch.setattr(scope, "HINT_BUDGET", 2)
    jobs = "".join(
        f"job j{i} {{\n    step s{i} {{\n        out o{i} = \"o{i}.txt\"\n"
        f"        run echo {{o{i}x}}\n    }}\n}}\n" for i in range(4)
    )
    with pytest.raises(PipelineError) as info:
        compile_file(pipeline(tmp_path, jobs))
    messages = [d.message for d in info.value.diagnostics]
    assert messages[:2] == [f"unknown name 'o{i}x'; did you mean 'o{i}'?" for i in range(2)]
    assert messages[2:] == [f"unknown name 'o{i}x'" for i in range(2, 4)]
    # and the names compared in all are bounded too: here the first search uses them up
    monkeypatch.setattr(scope, "HINT_BUDGET", 200)
    monkeypatch.setattr(scope, "HINT_WORK", 1)
    with pytest.raises(PipelineError) as info:
        compile_file(pipeline(tmp_path, jobs))
    messages = [d.message for d in info.value.diagnostics]
    assert messages == ["unknown name 'o0x'; did you mean 'o0'?",
                        *(f"unknown name 'o{i}x'" for i in range(1, 4))]


def test_a_misspelt_output_of_a_job_is_compared_with_that_jobs_outputs_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Each search compares one name here (job j1 has one output), not the 49 outputs of all
    other jobs, so a budget of 60 names gives every one of the 50 messages its suggestion."""
    monkeypatch.setattr(scope, "HINT_WORK", 60)
    jobs = "".join(
        f"job j{i} {{\n    step s {{\n        out dem = \"o{i}.txt\"\n"
        f"        run echo {{j{(i + 1) % 50}.s.dme}} {{dem}}\n    }}\n}}\n" for i in range(50)
    )
    with pytest.raises(PipelineError) as info:
        compile_file(pipeline(tmp_path, jobs))
    assert [d.message for d in info.value.diagnostics] == [
        f"unknown name 'j{k}.s.dme': step 's' of job 'j{k}' has no output 'dme'; did you mean "
        f"'j{k}.s.dem'?" for k in [*range(1, 50), 0]]


@given(st.text(alphabet="ab\n\r\u2028", max_size=40), st.data())
def test_a_place_found_by_bisection_is_the_place_counted_from_the_start(text: str, data):
    """Invariant: line and column of any offset are those of counting newlines from the start;
    and the line shown is the text between two newlines (without a carriage return)."""
    source = SourceFile("x.opf", text)
    offset = data.draw(st.integers(0, len(text)))
    line = text.count("\n", 0, offset) + 1
    column = offset - (text.rfind("\n", 0, offset) + 1) + 1
    assert source.position(offset) == (line, column)
    assert source.span(offset, len(text)).line == line
    lines = text.split("\n")
    assert [source.line(k) for k in range(len(lines) + 2)] == [
        "", *(x.removesuffix("\r") for x in lines), ""]
    assert source._starts == [0] + [k + 1 for k, c in enumerate(text) if c == "\n"]
    assert bisect.bisect_right(source._starts, offset) == line


def test_a_long_line_is_shown_as_a_window_around_the_place():
    text = "a" * 1000 + "BAD" + "z" * 1000
    shown = render_diagnostic(SourceFile("x.opf", text), Span("x.opf", 1, 1001, 1, 1004), "m")
    head, line, caret = shown.splitlines()
    assert len(line) < 200
    at = caret.index("^")
    assert line[at:at + 3] == "BAD" and caret.strip() == "^^^"


def test_a_param_value_holding_a_nul_is_a_bad_param(tmp_path: Path):
    """A NUL can stand in no path, command word or environment value: refused as a bad
    --param (shown escaped), never a ValueError from the file system further on."""
    path = pipeline(tmp_path, 'param results = "r"\njob a {\n    output "{results}"\n'
                              '    step s {\n        out o = "x"\n        run touch {o}\n'
                              '    }\n}\n')
    with pytest.raises(PipelineError) as info:
        compile_file(path, {"results": "a\0b"})
    assert [d.message for d in info.value.diagnostics] == [
        "--param results=a\\0b: a value cannot hold a NUL character (the default of 'results' "
        'is "r")']
