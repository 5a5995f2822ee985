"""Fuzzing the front end: whatever a pipeline file holds, opf answers with a plan or an OpfError.

The invariant (SPEC §2: "no Python traceback, ever"): parse → check → plan, given any text,
either succeeds or raises :class:`opals_dsl.errors.OpfError` — never any other exception — and
an error renders to text whose every place lies inside the file. Inputs are arbitrary text, and
valid pipelines (the examples and a few that use every feature) with characters, tokens and
lines deleted, inserted, duplicated or swapped. Planning runs in a temporary folder holding the
few files the pipelines name, so mutations reach the planner's checks as well.
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
from opals_dsl.errors import OpfCheckError, OpfError, PipelineError
from opals_dsl.lang.check import check
from opals_dsl.lang.lower import build_plan
from opals_dsl.lang.parse import parse
from opals_dsl.source import SourceFile

REPO = Path(__file__).resolve().parents[1]

FEATURES = r'''pipeline every_feature
param n = 3
param cell = 0.5
param names = ["a", "b"]
param flag = true
param results = "results"
job a for x in range(n) {
    output "{results}/{job.name}" flat
    retries 1
    step s {
        out o = "{x}.txt"
        in "data/strip11.prj"
        run sh "cat {o} > {o}"
    }
}
job b for y in a.s.o {
    shared tool = "tools/lidar.py"
    output "out/{task.id}"
    step t {
        out p = "{y.stem}.p" temp
        call mod.sub:fn(a = y, b = [1, 2.5, "x"], c = names, d = cell, e = flag)
    }
    step u {
        out q = "{y.stem}.q"
        run awk '{{print $1}}' {t.p} --list {names} "quoted {y.name}" \
            {q} # comment
    }
}
job c for l in lines("list.txt") {
    step s {
        in b.u.q
        run echo {l} {b.u.q} {pipeline.name} {job.name} {task.id}
    }
}
job d for v in ["x", "y"] {
    step s {
        out z = "{v}.z"
        run echo {v.name} {z}
    }
}
'''

# files only: running an example leaves its state folder, examples/.opf/, beside them
SEEDS = [FEATURES] + [p.read_text(encoding="utf-8") for p in EXAMPLES]
assert len(SEEDS) >= 2
SEED_LINES = sorted({line for seed in SEEDS for line in seed.splitlines() if line.strip()})

#: words and characters that mutations insert: the language's own pieces
PIECES = [
    "{", "}", "{{", "}}", "(", ")", "[", "]", ",", "=", ".", ":", '"', "'", "\\", "\n", " ",
    "\t", "#", "\\\n", "job", "step", "run", "out", "in", "call", "for", "temp", "task", "param",
    "pipeline", "shared", "output", "flat", "by", "retries", "range", "lines", "sh", "1", "-1",
    "0", "1.5", "1e400", "true", "false", "x", "strip", "dem.grid.dem", "{strip.stem}", "..",
    "/", "*", "**", "{task.id}", '"data/*.xyz"', "é", "\r\n", "\x00",
    "tiles", "size", "buffer", "origin", "{tile.files}", "{tile.xmin}", "[x, 1]",
]
_TOKEN = re.compile(r"\w+|\s+|.", re.S)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pipeline folder with the files the seed pipelines name: a tiny stand-in for every
    file of ``examples/`` and the few that :data:`FEATURES` names; the LAS/LAZ files are
    copied as they are (``tiles(...)`` reads their headers while planning)."""
    root = tmp_path_factory.mktemp("fuzz")
    examples = REPO / "examples"
    names = [
        p.relative_to(examples).as_posix() for p in examples.rglob("*")
        if p.is_file() and p.suffix != ".opf"
        and not {"results", ".opf", "__pycache__"} & set(p.relative_to(examples).parts)
    ]
    for rel in [*names, "data/strip11.xyz", "data/strip12.xyz", "data/strip11.prj"]:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix in (".las", ".laz"):
            shutil.copyfile(examples / rel, path)
        else:
            path.write_text("0 0 0\n", encoding="utf-8")
    (root / "list.txt").write_text("t1\n# skipped\n\nt2\n", encoding="utf-8")
    return root


def front_end(text: str, folder: Path, overrides: dict[str, str] | None = None) -> None:
    """parse → check → plan, as ``opf compile`` does; OpfErrors are rendered and inspected."""
    source = SourceFile("fuzz.opf", text)
    try:
        pipeline = parse(source)
        params, diagnostics = check(pipeline, source, overrides or {})
        if diagnostics:
            # as opf check does: plan around the mistakes to find what else is wrong
            build_plan(pipeline, source, str(folder), params, "fuzz", lenient=True)
            raise OpfCheckError(diagnostics)
        build_plan(pipeline, source, str(folder), params, "fuzz")
    except OpfError as exc:
        rendered = exc.render()
        assert "Traceback" not in rendered
        if isinstance(exc, PipelineError):
            assert exc.diagnostics
            lines = text.count("\n") + 2
            for d in exc.diagnostics:
                if d.span is not None:
                    assert 1 <= d.span.line <= lines and d.span.column >= 1, d
                    assert d.message.strip()


def mutate(text: str, data: st.DataObject) -> str:
    """Apply 1-4 random edits: characters, tokens or whole lines."""
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        kind = data.draw(st.sampled_from(["char", "token", "line"]), label="kind")
        if kind == "line":
            lines = text.split("\n")
            a = data.draw(st.integers(0, len(lines) - 1))
            b = data.draw(st.integers(0, len(lines) - 1))
            op = data.draw(st.sampled_from(["delete", "duplicate", "swap", "move", "borrow"]))
            if op == "delete":
                del lines[a]
            elif op == "borrow":  # a line of another pipeline
                lines.insert(b, data.draw(st.sampled_from(SEED_LINES)))
            elif op == "duplicate":
                lines.insert(b, lines[a])
            elif op == "swap":
                lines[a], lines[b] = lines[b], lines[a]
            else:
                lines.insert(b, lines.pop(a))
            text = "\n".join(lines)
        elif kind == "token":
            tokens = _TOKEN.findall(text) or [""]
            i = data.draw(st.integers(0, len(tokens) - 1))
            op = data.draw(st.sampled_from(["delete", "duplicate", "replace", "insert"]))
            if op == "delete":
                del tokens[i]
            elif op == "duplicate":
                tokens.insert(i, tokens[i])
            else:
                piece = data.draw(st.sampled_from(PIECES + tokens[:200]))
                if op == "replace":
                    tokens[i] = piece
                else:
                    tokens.insert(i, piece)
            text = "".join(tokens)
        else:
            i = data.draw(st.integers(0, len(text)))
            j = min(len(text), i + data.draw(st.integers(1, 6)))
            op = data.draw(st.sampled_from(["delete", "duplicate", "insert"]))
            if op == "delete":
                text = text[:i] + text[j:]
            elif op == "duplicate":
                text = text[:i] + text[i:j] * 2 + text[j:]
            else:
                text = text[:i] + data.draw(st.sampled_from(PIECES) | st.characters()) + text[i:]
    return text


FUZZ = settings(
    max_examples=400, deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def test_the_seeds_are_valid_pipelines(workspace: Path):
    """The mutations start from pipelines that compile, so they explore near valid ones."""
    for seed in SEEDS:
        source = SourceFile("seed.opf", seed)
        pipeline = parse(source)
        params, diagnostics = check(pipeline, source, {})
        assert diagnostics == []
        assert build_plan(pipeline, source, str(workspace), params, "seed").number_of_nodes()


@FUZZ
@given(text=st.text(max_size=300))
def test_arbitrary_text_gives_a_plan_or_an_opf_error(workspace: Path, text: str):
    front_end(text, workspace)


@FUZZ
@given(text=st.lists(st.sampled_from(PIECES), max_size=60).map(" ".join))
def test_arbitrary_language_pieces_give_a_plan_or_an_opf_error(workspace: Path, text: str):
    front_end(text, workspace)


@FUZZ
@given(data=st.data())
def test_mutated_pipelines_give_a_plan_or_an_opf_error(workspace: Path, data: st.DataObject):
    seed = data.draw(st.sampled_from(SEEDS), label="seed")
    front_end(mutate(seed, data), workspace)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    name=st.sampled_from(["n", "cell", "names", "flag", "results", "nn", "x"]),
    value=st.sampled_from(["", "0", "-1", "2", "1.5", "1e400", "nan", "true", "a,b", "1,x",
                           ",", "../up", "/abs", "{x}", "é"]) | st.text(max_size=12),
)
def test_any_param_override_gives_a_plan_or_an_opf_error(
    workspace: Path, name: str, value: str
):
    front_end(FEATURES, workspace, {name: value})


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_files_through_compile_file_give_a_plan_or_an_opf_error(
    workspace: Path, data: st.DataObject
):
    """The same through :func:`opals_dsl.api.compile_file`, reading a real file."""
    text = mutate(data.draw(st.sampled_from(SEEDS)), data)
    path = workspace / "mutant.opf"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        compile_file(path)
    except OpfError as exc:
        assert "Traceback" not in exc.render()
    except UnicodeDecodeError:
        pass  # not UTF-8 text: opf's command line says so (exit 2)


@pytest.mark.parametrize(
    "text",
    [
        "param x = " + "[" * 2000 + "]" * 2000 + "\n",
        "param x = " + "[" * 2000 + "\n",
        "job j {\n    step s {\n        call m:f(a = " + "[" * 500 + "1" + "]" * 500 + ")\n"
        "    }\n}\n",
        "job j for x in " + "[" * 300 + '"a"' + "]" * 300 + " {\n}\n",
    ],
    ids=["list", "unclosed", "call", "source"],
)
def test_deeply_nested_brackets_give_an_opf_error_not_a_recursion_error(
    workspace: Path, text: str
):
    with pytest.raises(OpfError):
        front_end_strict(text, workspace)


def test_an_output_declared_twice_that_a_later_job_loops_over_gives_errors_not_a_crash(
        workspace: Path):
    """Found by the mutation test: the second declaration made every task publish the output
    twice, and the job looping over it zipped its tasks with twice as many files."""
    text = (REPO / "examples" / "per_strip.opf").read_text(encoding="utf-8")
    line = '        out dem = "{strip.stem}_dem.tif"\n'
    assert text.count(line) == 1
    source = SourceFile("twice.opf", text.replace(line, line * 2))
    pipeline = parse(source)
    params, diagnostics = check(pipeline, source, {})
    assert any("duplicate output 'dem' in step 'grid'" in d.message for d in diagnostics)
    with pytest.raises(PipelineError):  # as opf check plans around the mistakes
        build_plan(pipeline, source, str(workspace), params, "twice", lenient=True)


def front_end_strict(text: str, folder: Path) -> None:
    """parse → check → plan, letting every error through."""
    source = SourceFile("deep.opf", text)
    pipeline = parse(source)
    params, diagnostics = check(pipeline, source, {})
    if diagnostics:
        raise OpfCheckError(diagnostics)
    build_plan(pipeline, source, str(folder), params, "deep")
