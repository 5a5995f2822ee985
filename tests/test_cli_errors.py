"""One exit for every error: what ``opf`` prints and the status it exits with.

Every error a person reads is an :class:`~opals_dsl.errors.OpfError`, rendered once by the
command line; anything else that escapes is a bug in opf, shown as an internal error with its
traceback and exit status 70 — never hidden, never a bare Python crash."""

from __future__ import annotations

import inspect
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from opals_dsl import errors
from opals_dsl.cli import main
from opals_dsl.lang import compile as front_end
from opals_dsl.runtime.launch_options import LaunchUsageError

REPO = Path(__file__).resolve().parents[1]
STRIPS = REPO / "examples" / "strips.opf"


def test_a_crash_inside_opf_is_an_internal_error_with_its_traceback(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise KeyError("a bug")

    monkeypatch.setattr(front_end, "check", broken)
    assert main(["check", str(STRIPS)]) == errors.EXIT_INTERNAL == 70
    err = capsys.readouterr().err
    assert err.startswith("opf: internal error: KeyError: 'a bug'\n")
    assert "This is a bug in opf" in err
    assert "Traceback (most recent call last)" in err and "in broken" in err


def test_a_bad_option_is_a_usage_error_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(STRIPS), "--param", "cell"]) == errors.EXIT_INVALID
    err = capsys.readouterr().err
    assert err == "opf: error: --param takes NAME=VALUE, not 'cell'\n"


@pytest.mark.parametrize("argv, hint", [
    (["rnu", "x.opf"], "; did you mean 'run'?"),
    (["chek", "x.opf"], "; did you mean 'check'?"),
    (["check", "x.opf", "--json"], "unrecognized arguments: --json; did you mean '--format json'?"),
    (["run", "x.opf", "--keepgoing"], "unrecognized arguments: --keepgoing; did you mean "
                                      "'--keep-going'?"),
    (["compile", "x.opf", "--jsn"], "unrecognized arguments: --jsn; did you mean '--json'?"),
    (["run", "x.opf", "--zzzzz"], "unrecognized arguments: --zzzzz\n"),
])
def test_a_misspelt_command_or_option_gets_what_it_likely_meant(
        argv: list[str], hint: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ended:
        main(argv)
    assert ended.value.code == errors.EXIT_INVALID
    err = capsys.readouterr().err
    assert err.startswith(f"usage: opf {argv[0]} " if argv[0] in ("check", "run", "compile")
                          else "usage: opf ")
    assert hint in err.splitlines()[-1] + "\n"


def test_level_job_without_a_drawing_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """--level only changes a drawing; with --json (or nothing) it would be silently ignored."""
    for extra in (["--json"], []):
        assert main(["compile", str(STRIPS), "--level", "job", *extra]) == errors.EXIT_INVALID
        assert capsys.readouterr().err == (
            "opf: error: --level job draws one node per job step: use it with --dot or --svg\n")


def test_a_missing_file_is_said_in_words(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(tmp_path / "none.opf")]) == errors.EXIT_INVALID
    assert capsys.readouterr().err == f"opf: error: no such file: {tmp_path / 'none.opf'}\n"


def test_every_error_for_people_is_an_opf_error_with_its_status() -> None:
    found = {obj for _, obj in inspect.getmembers(errors, inspect.isclass)
             if issubclass(obj, Exception) and obj.__module__ == errors.__name__}
    assert found >= {errors.UsageError, errors.ClusterError, errors.ReportError,
                     errors.FormatError, errors.PipelineError, errors.PlanError}
    assert all(issubclass(cls, errors.OpfError) for cls in found)
    assert issubclass(LaunchUsageError, errors.UsageError)
    assert errors.ClusterError("x").exit_code == errors.EXIT_CLUSTER == 3
    for cls in (errors.UsageError, errors.ReportError, errors.ClusterError):
        assert cls("what is wrong").render() == "opf: error: what is wrong"
    statuses = [errors.EXIT_OK, errors.EXIT_FAILED, errors.EXIT_INVALID, errors.EXIT_CLUSTER,
                errors.EXIT_INTERNAL, errors.EXIT_INTERRUPTED]
    assert statuses == [0, 1, 2, 3, 70, 130]


@pytest.mark.parametrize("args", ["", "1, 2, 3", "1, 2, 3, 4"])
@pytest.mark.parametrize("command", ["check", "compile"])
def test_a_range_with_a_wrong_number_of_arguments_is_an_error_at_its_place(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], args: str, command: str) -> None:
    path = tmp_path / "p.opf"
    path.write_text(f"pipeline p\njob j for i in range({args}) {{\n    step s {{\n"
                    "        run echo {i}\n    }\n}\n")
    assert main([command, str(path)]) == errors.EXIT_INVALID
    err = capsys.readouterr().err
    assert "p.opf:2:16: error: range takes one or two whole numbers" in err
    assert "^^^^" in err and "internal error" not in err


def test_ctrl_c_while_opf_loads_its_modules_ends_it_quietly_with_status_130() -> None:
    """A SIGINT that reaches ``opf`` while it still imports its command's modules (a few
    tenths of a second on a cold start) ends it like one that comes later: ``opf:
    interrupted``, exit status 130, no traceback. The process sends the signal to itself as
    the import begins, started the way ``opf``'s console script starts it."""
    code = textwrap.dedent("""\
        import os, signal, sys
        class Interrupt:
            def find_spec(self, name, path=None, target=None):
                if name == "opals_dsl.cli.command":
                    os.kill(os.getpid(), signal.SIGINT)
        sys.meta_path.insert(0, Interrupt())
        from opals_dsl.cli import main
        sys.exit(main(["check", sys.argv[1]]))
        """)
    proc = subprocess.run([sys.executable, "-c", code, str(STRIPS)], capture_output=True,
                          text=True, timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert (proc.returncode, proc.stdout, proc.stderr) == (130, "", "opf: interrupted\n")


@pytest.mark.parametrize("command", ["check", "fmt"])
def test_a_file_that_is_not_utf8_is_named_with_the_line_and_column_of_its_first_bad_byte(
        command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Columns count characters, as in every diagnostic: the 'é' before the bad byte is one."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "latin1.opf").write_bytes(b'pipeline p\n# ok\nparam x = "\xc3\xa9\xe9"\n')
    assert main([command, "latin1.opf"]) == errors.EXIT_INVALID
    assert capsys.readouterr().err == (
        "opf: error: latin1.opf is not UTF-8 text (invalid continuation byte: byte 0xe9 at "
        "line 3, column 13)\n")
