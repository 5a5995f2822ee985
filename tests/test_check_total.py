"""`opf check` is total: whatever names and strings a pipeline file gets wrong, every finding
comes out as an OpfError, and the findings that need the files (a missing file, two outputs
with one destination) are still reported when names are wrong elsewhere in the file.

The pipelines are the examples and the golden-plan pipeline, with their names and strings
mutated the way people get them wrong — a misspelt reference, a renamed declaration, a string
emptied or pointed elsewhere —, plus a job ``probe_zz`` that always has a missing shared file
and a destination clash. Nothing but :class:`~opals_dsl.errors.OpfError` may come out of
:func:`opals_dsl.api.compile_file` (what ``opf check`` runs); a crash inside opf would be a
bug, and before this test the checker hid such crashes by dropping every file finding.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from conftest import EXAMPLES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opals_dsl.api import compile_file
from opals_dsl.errors import OpfError, OpfSyntaxError, PipelineError

REPO = Path(__file__).resolve().parents[1]
FEATURES = REPO / "tests" / "golden" / "plans" / "features"
SEEDS = {p.name: p.read_text(encoding="utf-8")
         for p in [*EXAMPLES, FEATURES / "features.opf"]}

PROBE = '''
job probe_zz for p in "probe/*.xyz" {
    shared missing = "cfg/no_such_file_zz.cfg"
    step s {
        out o = "same_zz.out"
        run prog {p} {o}
    }
}
'''
MISSING = "the shared file 'cfg/no_such_file_zz.cfg' does not exist"
CLASH = "would both copy output 'o' back to"

REF = re.compile(r"(?<!\{)\{([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)\}(?!\})")
DECL = re.compile(r"^\s*(?:out|shared|param|step|job)\s+([A-Za-z_][A-Za-z0-9_]*)", re.M)
STRING = re.compile(r'"((?:[^"\\\n]|\\.)*)"')


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The files the seeds and the probe name."""
    root = tmp_path_factory.mktemp("total")
    shutil.copytree(REPO / "examples", root, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
        "results*", ".opf", "__pycache__", "*.opf"))
    shutil.copytree(FEATURES, root, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.opf"))
    (root / "probe").mkdir()
    for name in ("p1.xyz", "p2.xyz"):
        (root / "probe" / name).write_text("1 2 3\n", encoding="utf-8")
    return root


def _misspell(name: str, how: int) -> str:
    head, dot, rest = name.partition(".")
    if how == 0:
        return f"{head}_zz{dot}{rest}"  # an unknown name
    if how == 1 and rest:
        return f"{head}.{rest}_zz"  # an unknown attribute or output
    if how == 2 and len(head) > 1:
        return f"{head[1]}{head[0]}{head[2:]}{dot}{rest}"  # two letters swapped
    return f"{head}{dot}{rest}".rstrip(".") + "_zz"


@st.composite
def mutants(draw: st.DrawFn) -> tuple[str, str]:
    """(seed name, mutated text with the probe job) — at least one name mutated."""
    seed = draw(st.sampled_from(sorted(SEEDS)))
    text = SEEDS[seed]
    for k in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["ref", "ref", "decl", "string"]) if k else st.just("ref"))
        pattern = {"ref": REF, "decl": DECL, "string": STRING}[kind]
        found = list(pattern.finditer(text))
        if not found:
            continue
        m = draw(st.sampled_from(found), label=kind)
        old = m.group(1)
        if kind == "string":
            new = draw(st.sampled_from(["", "x", old[:-1], old + "x", "../" + old,
                                        "/nowhere_zz/" + old, "{unknown_zz}", "{" + old]))
        else:
            new = _misspell(old, draw(st.integers(0, 3)))
        text = text[:m.start(1)] + new + text[m.end(1):]
    return seed, text + PROBE


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(case=mutants())
def test_check_reports_file_findings_beside_name_errors(workspace: Path,
                                                        case: tuple[str, str]) -> None:
    """Only an OpfError comes out; unless the file no longer parses, the probe job's missing
    file and its clash are among the findings, whatever else is wrong."""
    seed, text = case
    path = workspace / "mutant.opf"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(OpfError) as caught:  # the probe job alone guarantees findings
        compile_file(path)
    error = caught.value
    assert isinstance(error, PipelineError), (seed, error)
    if isinstance(error, OpfSyntaxError):
        return  # the parse stopped: nothing after it can be said
    messages = [d.message for d in error.diagnostics]
    assert any(MISSING in m for m in messages), (seed, messages, text)
    assert any(CLASH in m for m in messages), (seed, messages, text)


def test_a_file_finding_is_reported_beside_an_unknown_name_that_stops_the_planner(
        workspace: Path) -> None:
    """An unknown name in an output folder: the planner cannot expand that job at all, and
    the probe job's findings must still be reported."""
    text = SEEDS["strips.opf"].replace('output "{results}" by step',
                                       'output "{resultz}" by step') + PROBE
    path = workspace / "folder.opf"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(PipelineError) as caught:
        compile_file(path)
    messages = [d.message for d in caught.value.diagnostics]
    assert any("unknown name 'resultz'" in m for m in messages), messages
    assert any(MISSING in m for m in messages), messages
    assert any(CLASH in m for m in messages), messages


@pytest.mark.parametrize("command", ["run echo {celll}", "run sh \"echo {celll}\"",
                                     "call tools.qc:density(cell = celll)"])
def test_a_missing_input_is_reported_beside_an_unknown_name_in_the_same_step(
        workspace: Path, command: str) -> None:
    """The step's command names something unknown: its `in` files are still checked."""
    path = workspace / "same_step.opf"
    path.write_text('job k {\n    step u {\n        in "data/nosuch.prj"\n'
                    f'        {command}\n    }}\n}}\n', encoding="utf-8")
    with pytest.raises(PipelineError) as caught:
        compile_file(path)
    messages = [d.message for d in caught.value.diagnostics]
    assert any("unknown name 'celll'" in m for m in messages), messages
    assert "the input file 'data/nosuch.prj' does not exist" in messages, messages
