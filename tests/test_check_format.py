"""``opf check --format json|github``: every finding with its place, for tools; same exit status.

Every golden error case (syntax errors, check errors, plan errors, bad ``--param``) and every
way a file cannot be read gives well-formed JSON: a list of objects with file, line, column,
end line, end column, severity, message and hint, where message and hint together are exactly
what ``opf check`` prints for people. GitHub annotations carry the same places.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest

from opals_dsl.api import compile_file
from opals_dsl.cli import main
from opals_dsl.cli.common import parse_params
from opals_dsl.errors import Diagnostic, PipelineError, finding, github_annotation, split_hint
from opals_dsl.source import Span

GOLDEN = Path(__file__).resolve().parent / "golden" / "errors"
CASES = sorted(GOLDEN.glob("*.opf"))
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "strips.opf"
KEYS = ["file", "line", "column", "end_line", "end_column", "severity", "message", "hint"]
_TEXT_LINE = re.compile(
    r"^(?:(?P<place>\S+?):(?P<line>\d+):(?P<col>\d+): |opf: )?(?P<severity>error|warning): "
    r"(?P<msg>.*)$")


def opf(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(argv))
    return status, out.getvalue(), err.getvalue()


def _args(case: Path) -> list[str]:
    extra = case.with_suffix(".args")
    return extra.read_text(encoding="utf-8").split() if extra.exists() else []


def check_records(records: object, file: str) -> list[dict]:
    """The JSON is a non-empty list of findings, each with every key and sound places."""
    assert isinstance(records, list) and records
    for r in records:
        assert list(r) == KEYS
        assert r["severity"] in ("error", "warning")
        assert isinstance(r["message"], str) and r["message"].strip()
        assert r["hint"] is None or (isinstance(r["hint"], str) and r["hint"].strip())
        assert r["file"] == file
        places = [r["line"], r["column"], r["end_line"], r["end_column"]]
        if r["line"] is None:
            assert places == [None] * 4
        else:
            assert all(isinstance(p, int) and p >= 1 for p in places)
            assert (r["end_line"], r["end_column"]) >= (r["line"], r["column"])
    return records


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.stem)
def test_every_golden_error_gives_json_with_the_places_and_words_of_the_text(
    case: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.chdir(GOLDEN)
    text_status, _, text = opf("check", case.name, *_args(case))
    status, out, err = opf("check", "--format", "json", case.name, *_args(case))
    assert (status, err) == (text_status, "")
    records = check_records(json.loads(out), case.name)
    # the same findings as the text, in the same order, each at the same place
    shown = [m for m in map(_TEXT_LINE.match, text.splitlines()) if m]
    assert len(shown) == len(records) or len(records) > 50  # text shows at most 50
    for m, r in zip(shown, records, strict=False):
        said = r["message"] if r["hint"] is None else f"{r['message']}; {r['hint']}"
        assert said == m["msg"] and r["severity"] == m["severity"]
        if m["place"]:
            assert (r["line"], r["column"]) == (int(m["line"]), int(m["col"]))
        else:
            assert r["line"] is None


def test_the_golden_cases_cover_every_kind_of_error(monkeypatch: pytest.MonkeyPatch):
    """Syntax, check and plan errors, and a bad --param, so the test above sees each path."""
    monkeypatch.chdir(GOLDEN)
    kinds = set()
    for case in CASES:
        try:
            compile_file(case.name, parse_params(_args(case)[1::2]))
        except PipelineError as exc:
            kinds.add(type(exc).__name__)
            if any(d.span is None for d in exc.diagnostics):
                kinds.add("bad --param")
    assert kinds == {"OpfSyntaxError", "OpfCheckError", "PlanError", "bad --param"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["missing.opf"], "no such file: missing.opf"),
        (["."], ". is a folder, not a pipeline file"),
        (["latin1.opf"], "latin1.opf is not UTF-8 text (invalid continuation byte: byte 0xe9 at "
                         "line 1, column 12)"),
        ([str(EXAMPLE), "--param", "cell"], "--param takes NAME=VALUE, not 'cell'"),
    ],
    ids=["missing", "folder", "not-utf8", "param-syntax"],
)
def test_problems_without_a_place_still_give_one_json_finding(
    argv: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "latin1.opf").write_bytes(b"param x = \"\xe9\"\n")
    text_status, _, text = opf("check", *argv)
    status, out, err = opf("check", "--format", "json", *argv)
    assert (status, err) == (text_status, "") and status == 2
    [record] = check_records(json.loads(out), argv[0])
    said = (record["message"] if record["hint"] is None
            else f"{record['message']}; {record['hint']}")
    assert said == message
    assert message in text  # what people read says the same


def test_a_good_pipeline_gives_an_empty_list_and_status_0():
    assert opf("check", "--format", "json", str(EXAMPLE)) == (0, "[]\n", "")
    assert opf("check", "--format", "github", str(EXAMPLE)) == (0, "", "")


def test_github_annotations_carry_the_places(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(GOLDEN)
    status, out, _ = opf("check", "--format", "github", "duplicates.opf")
    assert status == 2
    lines = out.splitlines()
    assert len(lines) == 7  # 6 errors, and the warning that tools.stats is not there
    assert sum(line.startswith("::warning ") for line in lines) == 1
    assert lines[0] == (
        "::error file=duplicates.opf,line=3,col=7,endColumn=10,title=opf check::duplicate "
        "parameter 'cell': it is already declared on line 2; give it another name"
    )
    status, out, _ = opf("check", "--format", "github", "missing.opf")
    assert (status, out) == (2, "::error file=missing.opf,title=opf check::no such file: "
                                "missing.opf\n")


def test_github_annotations_escape_what_would_end_them():
    f = finding(Diagnostic(Span("a,b:c%.opf", 2, 3, 4, 1), "50% done\nnext; fix it"))
    assert github_annotation(f) == (
        "::error file=a%2Cb%3Ac%25.opf,line=2,endLine=4,title=opf check::50%25 done%0Anext; "
        "fix it"
    )


def test_a_message_splits_into_what_and_hint_and_back():
    assert split_hint("unknown name 'celll'; did you mean 'cell'?") == (
        "unknown name 'celll'", "did you mean 'cell'?")
    assert split_hint("no hint here") == ("no hint here", None)
    for message in ["a; b; c", "; x", "x; ", "plain"]:
        what, hint = split_hint(message)
        assert (what if hint is None else f"{what}; {hint}") == message
