"""Golden tests of what ``opf check`` prints for broken pipelines.

Every ``tests/golden/errors/NAME.opf`` is a broken pipeline; ``NAME.err`` is exactly what
``opf check NAME.opf`` writes to stderr when run in that folder (so the file is shown by its
relative name), and the exit status must be 2 with nothing on stdout. An optional ``NAME.args``
holds further command-line words (``--param ...``). The files the pipelines glob and stage are in
``tests/golden/errors/data/``. Messages that name the pipeline's folder itself (a glob that
matches nothing says where it looked) show it as ``$GOLDEN``.

When a message changes on purpose, regenerate the ``.err`` files and read the diff::

    OPF_REGEN_GOLDEN=1 python -m pytest tests/test_errors_golden.py
"""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from opals_dsl.api import compile_file
from opals_dsl.cli import main
from opals_dsl.errors import OpfCheckError, OpfSyntaxError, PipelineError, PlanError
from opals_dsl.lang.check import check
from opals_dsl.lang.parse import parse
from opals_dsl.source import SourceFile

GOLDEN = Path(__file__).resolve().parent / "golden" / "errors"
CASES = sorted(GOLDEN.glob("*.opf"))
REGEN = os.environ.get("OPF_REGEN_GOLDEN") == "1"


def _args(case: Path) -> list[str]:
    extra = case.with_suffix(".args")
    return shlex.split(extra.read_text(encoding="utf-8")) if extra.exists() else []


def _shown(text: str) -> str:
    return text.replace(str(GOLDEN), "$GOLDEN")


def run_in_process(case: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, str]:
    """``opf check`` through :func:`opals_dsl.cli.main`: (status, stdout, stderr)."""
    monkeypatch.chdir(GOLDEN)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(["check", case.name, *_args(case)])
    return status, out.getvalue(), _shown(err.getvalue())


def _opf_command() -> list[str]:
    """The installed ``opf`` program of this interpreter, else ``python -m opals_dsl``."""
    exe = shutil.which("opf", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "opals_dsl"]


def test_there_are_enough_golden_cases_and_each_has_its_expected_text():
    assert len(CASES) >= 30
    names = {p.stem for p in CASES}
    expected = {p.stem for p in GOLDEN.glob("*.err")}
    assert expected == names, "every NAME.opf needs a NAME.err and the other way round"
    # the set covers syntax errors, checks and planning errors
    assert sum(n.startswith("syntax_") for n in names) >= 10


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.stem)
def test_opf_check_prints_the_golden_text(case: Path, monkeypatch: pytest.MonkeyPatch):
    status, out, err = run_in_process(case, monkeypatch)
    expected_file = case.with_suffix(".err")
    if REGEN:
        expected_file.write_text(err, encoding="utf-8")
    assert status == 2
    assert out == ""
    assert "Traceback" not in err
    assert err == expected_file.read_text(encoding="utf-8")


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.stem)
def test_every_message_has_place_source_line_and_caret(case: Path):
    """Each diagnostic of a pipeline file has the SPEC §2 shape: ``file:line:col: error: ...``,
    the source line, and a caret under the column it names."""
    text = case.with_suffix(".err").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert lines[-1].endswith("found; nothing was run.")
    source = case.read_text(encoding="utf-8").splitlines()
    for k, line in enumerate(lines):
        if not line.startswith(f"{case.name}:"):
            continue
        severity = "warning" if line.split(": ", 2)[1:2] == ["warning"] else "error"
        place, _, message = line.partition(f": {severity}: ")
        assert message and "__ANON" not in message and "_NL" not in message
        _, lineno, col = place.split(":")
        shown, caret = lines[k + 1], lines[k + 2]
        assert shown == "    " + source[int(lineno) - 1].expandtabs(1)
        assert caret.startswith("    " + " " * (int(col) - 1) + "^")
    if case.with_suffix(".args").exists():
        assert any(line.startswith("opf: error: --param ") for line in lines)


SUBPROCESS_CASES = ["syntax_run_swallows_brace", "unknown_names", "missing_files",
                    "bad_param_value"]


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_the_opf_program_exits_2_without_traceback(name: str):
    case = GOLDEN / f"{name}.opf"
    proc = subprocess.run(
        [*_opf_command(), "check", case.name, *_args(case)],
        cwd=GOLDEN, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert _shown(proc.stderr) == case.with_suffix(".err").read_text(encoding="utf-8")


def _failure(name: str, params: dict[str, str] | None = None) -> PipelineError:
    with pytest.raises(PipelineError) as info:
        compile_file(GOLDEN / f"{name}.opf", params)
    return info.value


def _places(error: PipelineError) -> list[tuple[int, int]]:
    return [(d.span.line, d.span.column) for d in error.diagnostics if d.span is not None]


def test_syntax_error_fields_missing_brace():
    error = _failure("syntax_missing_open_brace")
    assert isinstance(error, OpfSyntaxError)
    assert _places(error) == [(2, 34)]
    d = error.first
    assert d.span.file.endswith("syntax_missing_open_brace.opf")
    assert "'{'" in d.message


def test_syntax_error_fields_brace_swallowed_by_run_line():
    error = _failure("syntax_run_swallows_brace")
    assert isinstance(error, OpfSyntaxError)
    assert _places(error) == [(5, 56)]
    assert "'}'" in error.first.message and "line 2" in error.first.message


def test_syntax_error_fields_unclosed_block_points_at_its_brace():
    error = _failure("syntax_unclosed_block_eof")
    assert _places(error) == [(2, 35)]
    span = error.first.span
    assert (span.end_line, span.end_column) == (2, 36)


def test_check_error_fields_unknown_names():
    error = _failure("unknown_names")
    assert isinstance(error, OpfCheckError)
    found = {(d.span.line, d.span.column): d.message for d in error.diagnostics}
    assert found[(8, 20)].startswith("unknown name 'strp.stem'")
    assert "did you mean 'strip.stem'?" in found[(8, 20)]
    assert "did you mean 'cell'?" in found[(13, 54)]
    assert "did you mean 'import.odm'?" in found[(13, 62)]
    # the span covers the placeholder with its braces
    span = next(d.span for d in error.diagnostics if "'celll'" in d.message)
    assert span.end_column - span.column == len("{celll}")


def test_plan_error_fields_same_destination():
    error = _failure("same_destination")
    assert isinstance(error, PlanError)
    # a clash shared by every task of the job is reported once, at its declaration
    assert _places(error) == [(5, 19), (12, 19)]
    assert "{strip.stem}" in error.diagnostics[0].message


def test_param_errors_have_no_place_but_name_the_param():
    error = _failure("bad_param_value", {"cell": "fine", "tiles": "3"})
    assert [d.span for d in error.diagnostics] == [None]
    assert error.first.message.startswith("--param cell=fine:")
    assert "Traceback" not in error.render()



def test_the_shown_line_is_the_line_of_the_reported_place():
    text = 'param x = "a\u2028b"\njob j {\n    step s {\n        run echo {y}\n    }\n}\n'
    source = SourceFile("sep.opf", text)
    _, diagnostics = check(parse(source), source, {})
    shown = OpfCheckError(diagnostics).render().splitlines()
    assert shown[0].startswith("sep.opf:4:18: error: unknown name 'y'")
    assert shown[1] == "    " + "        run echo {y}"
