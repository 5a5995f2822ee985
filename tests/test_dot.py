"""Drawing and writing plans: golden ``--dot``, ``--dot --level job`` and ``--json`` output of
every example pipeline, DOT that Graphviz accepts, and the shape of the drawings.

Each ``examples/NAME.opf`` (and ``tests/golden/plans/features/features.opf``, which uses every
kind of source, action and dependency) has three golden files in ``tests/golden/plans/``:
``NAME.dot``, ``NAME.job.dot`` and ``NAME.json``, exactly what ``opf compile`` writes, except
that the absolute folder of the pipeline (the JSON's ``root``) is written ``$ROOT``. After a
change on purpose, regenerate them and read the diff::

    OPF_REGEN_GOLDEN=1 python -m pytest tests/test_dot.py
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest
from conftest import EXAMPLES

from opals_dsl.api import compile_file
from opals_dsl.cli import main
from opals_dsl.lang.compile import count_plan, load, write_plan
from opals_dsl.plan import model
from opals_dsl.plan.dot import to_dot, to_job_dot
from opals_dsl.plan.graph import to_json

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden" / "plans"
# files only: running an example leaves its state folder, examples/.opf/, beside them
PIPELINES = list(EXAMPLES) + [
    GOLDEN / "features" / "features.opf"]
FORMATS = {"dot": ["--dot"], "job.dot": ["--dot", "--level", "job"], "json": ["--json"]}
REGEN = os.environ.get("OPF_REGEN_GOLDEN") == "1"
DOT = shutil.which("dot")


def compile_output(pipeline: Path, flags: list[str], tmp_path: Path) -> str:
    """What ``opf compile PIPELINE FLAGS -o FILE`` writes, with the pipeline folder as $ROOT."""
    target = tmp_path / "out"
    assert main(["compile", str(pipeline), *flags, "-o", str(target)]) == 0
    text = target.read_text(encoding="utf-8")
    root = str(pipeline.parent.resolve())
    return text.replace(json.dumps(root)[1:-1], "$ROOT")


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("pipeline", PIPELINES, ids=lambda p: p.stem)
def test_golden_plans(pipeline: Path, fmt: str, tmp_path: Path) -> None:
    text = compile_output(pipeline, FORMATS[fmt], tmp_path)
    golden = GOLDEN / f"{pipeline.stem}.{fmt}"
    if REGEN:
        golden.write_text(text, encoding="utf-8")
    assert golden.exists(), f"no golden file {golden.name}: run with OPF_REGEN_GOLDEN=1"
    assert text == golden.read_text(encoding="utf-8")


def test_every_example_has_golden_plans() -> None:
    stems = {p.stem for p in PIPELINES}
    assert {"strips", "strips_flat", "tiles", "autzen"} <= stems
    found = {p.name.split(".")[0] for p in GOLDEN.glob("*.*")}
    assert found == stems, "golden files without a pipeline, or the reverse"


def test_golden_json_is_the_plan(tmp_path: Path) -> None:
    """The golden JSON reads back into the graph the planner builds."""
    for pipeline in PIPELINES:
        g = compile_file(pipeline)
        data = json.loads((GOLDEN / f"{pipeline.stem}.json").read_text(encoding="utf-8"))
        assert data["graph"]["root"] == "$ROOT"
        data["graph"]["root"] = g.graph["root"]
        back = nx.node_link_graph(data, edges="edges")
        assert list(back.nodes) == list(g.nodes) and list(back.edges) == list(g.edges)
        for nid, attrs in g.nodes(data=True):
            assert json.loads(json.dumps(attrs)) == back.nodes[nid], nid



def test_a_plan_written_while_planned_is_the_json_of_its_graph() -> None:
    """``opf compile --json`` writes the plan while planning it (``write_plan``), never
    holding the graph; the text is the one the graph's writer gives for ``compile_file``."""
    for pipeline in PIPELINES:
        out = io.StringIO()
        write_plan(load(pipeline), out)
        assert out.getvalue() == to_json(compile_file(pipeline)), pipeline.name


def test_a_plan_counted_while_planned_has_the_size_of_its_graph() -> None:
    """``opf check`` counts jobs, tasks and steps as it plans (``count_plan``), never holding
    the graph; the counts are those of the graph ``compile_file`` returns."""
    for pipeline in PIPELINES:
        counted, graph = count_plan(load(pipeline)), compile_file(pipeline)
        of_graph = model.PlanCounts.of(graph)
        assert (counted.pipeline, counted.jobs, counted.tasks, counted.steps) == (
            of_graph.pipeline, of_graph.jobs, of_graph.tasks, of_graph.steps), pipeline.name
        assert counted.tasks == len(model.tasks(graph)) > 0
        assert counted.steps == sum(1 for _, a in graph.nodes(data=True) if a["kind"] == "exec")


# -- the DOT text --------------------------------------------------------------------------

_NODE = re.compile(r'^    "((?:[^"\\]|\\.)*)" \[label="((?:[^"\\]|\\.)*)", (.*)\];$')
_EDGE = re.compile(r'^  "((?:[^"\\]|\\.)*)" -> "((?:[^"\\]|\\.)*)"( \[style=dashed\])?;$')


def parse_dot(text: str) -> tuple[dict[str, str], list[tuple[str, str, bool]], list[str]]:
    """The nodes (id -> label), edges and cluster labels of a drawing by :func:`to_dot`."""
    nodes: dict[str, str] = {}
    edges: list[tuple[str, str, bool]] = []
    clusters: list[str] = []
    lines = text.splitlines()
    assert lines[0].startswith("digraph ") and lines[0].endswith("{") and lines[-1] == "}"
    assert text.count("{") == text.count("}")
    for line in lines[1:-1]:
        if m := _NODE.match(line):
            assert m.group(1) not in nodes, f"node drawn twice: {m.group(1)}"
            nodes[m.group(1)] = m.group(2)
        elif m := _EDGE.match(line):
            edges.append((m.group(1), m.group(2), bool(m.group(3))))
        elif m := re.match(r'^    label="(.*)"; style=rounded', line):
            clusters.append(m.group(1))
    return nodes, edges, clusters


@pytest.mark.parametrize("pipeline", PIPELINES, ids=lambda p: p.stem)
def test_task_drawing_shows_every_node_and_edge(pipeline: Path) -> None:
    g = compile_file(pipeline)
    nodes, edges, clusters = parse_dot(to_dot(g))
    assert list(nodes) == list(g.nodes)
    assert [(u, v) for u, v, _ in edges] == list(g.edges)
    for u, v, dashed in edges:
        assert dashed == (g.nodes[u]["job"] != g.nodes[v]["job"])
    assert clusters == [f"job {j}" for j in g.graph["jobs"]]
    for nid, a in g.nodes(data=True):
        label = nodes[nid].split("\\n")
        if a["kind"] == "exec":
            assert label[0] == f"{a['task']}: {a['step']}"
            assert os.path.basename(a["outputs"][0]) in label[-1]
        elif a["kind"] == "copyback":
            assert label[0] == f"{a['task']}: copy back"
            assert label[1:] == [os.path.basename(d) for _, d in a["files"]][:4]
        elif a["scope"] == "task":
            assert label[0] == f"{a['task']}: stage"
        else:
            assert label[0] == f"job {a['job']}: machine stage"


def test_job_drawing_shows_steps_counts_and_flows() -> None:
    g = compile_file(GOLDEN / "features" / "features.opf")
    text = to_job_dot(g)
    assert 'label="job grid (2 tasks)"' in text and 'label="job shade (2 tasks)"' in text
    assert '"grid/import" -> "grid/grid";' in text
    flows = re.findall(r'^  "(\w+)/\w+" -> "(\w+)/\w+" \[style=dashed\];$', text, re.M)
    assert flows == [("grid", "cut"), ("grid", "shade"), ("shade", "report")]


def test_long_file_lists_are_shortened_and_quotes_escaped(tmp_path: Path) -> None:
    g = nx.DiGraph(**model.graph_attrs('say "hi"', "/data", {}, ["j"]))
    files = tuple((f"d/f{k}.txt", f"f{k}.txt") for k in range(10))
    g.add_node("stage:j/a\\b", **model.TaskStage("j", 'a"b', files=files).to_attrs())
    g.add_node("exec:j/x/s", **model.Exec("j", "x", "s", 0, ("/bin/sh", "-c", "x"),
                                          outputs=tuple(f"o{k}" for k in range(5))).to_attrs())
    text = to_dot(g)
    assert r'digraph "say \"hi\"" {' in text
    assert r'"stage:j/a\\b" [label="a\"b: stage\nf0.txt\nf1.txt\nf2.txt\n... 7 more"' in text
    assert r'label="x: s\nsh\no0, o1, o2, ... 2 more"' in text
    if DOT:
        subprocess.run([DOT, "-Tcanon"], input=text, text=True, capture_output=True, check=True)


def test_status_colours_the_nodes() -> None:
    g = compile_file(REPO / "examples" / "strips.opf")
    plain = to_dot(g)
    status = {"exec:dem/strip7326/import": "skip", "exec:dem/strip7327/grid": "failed"}
    coloured = to_dot(g, status)
    changed = [(a, b) for a, b in zip(plain.splitlines(), coloured.splitlines(), strict=True)
               if a != b]
    assert len(changed) == 2
    assert 'fillcolor="#dddddd"' in changed[0][1] and 'fillcolor="#ea9999"' in changed[1][1]


@pytest.mark.skipif(DOT is None, reason="Graphviz 'dot' is not installed")
@pytest.mark.parametrize("fmt", ["dot", "job.dot"])
@pytest.mark.parametrize("pipeline", PIPELINES, ids=lambda p: p.stem)
def test_graphviz_accepts_the_drawings(pipeline: Path, fmt: str) -> None:
    text = (GOLDEN / f"{pipeline.stem}.{fmt}").read_text(encoding="utf-8")
    out = subprocess.run([DOT, "-Tsvg"], input=text, text=True, capture_output=True)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert out.stdout.lstrip().startswith("<?xml") and "<svg" in out.stdout


def test_compile_command_writes_the_drawing(tmp_path: Path) -> None:
    """The installed command, in a real process, writes the golden DOT to stdout."""
    pipeline = REPO / "examples" / "tiles.opf"
    proc = subprocess.run(
        [sys.executable, "-m", "opals_dsl", "compile", pipeline.name, "--dot", "--level", "job"],
        cwd=pipeline.parent, capture_output=True, text=True, check=True,
    )
    assert proc.stdout == (GOLDEN / "tiles.job.dot").read_text(encoding="utf-8")


def _inside(point: tuple[float, float], polygon: list[list[float]]) -> bool:
    """Whether a point lies inside a polygon (ray casting)."""
    x, y = point
    found = False
    for (x1, y1), (x2, y2) in zip(polygon, polygon[1:] + polygon[:1], strict=True):
        if (y1 > y) != (y2 > y) and x < x1 + (y - y1) * (x2 - x1) / (y2 - y1):
            found = not found
    return found


def labels_outside_their_shapes(dot_text: str) -> list[tuple[str, str]]:
    """(node, text line) for every line of a label that Graphviz draws past its node's shape:
    the corners of each line's box (the width Graphviz measured, from below the baseline to
    the top of the letters) must lie inside the outline it draws (``dot -Tjson``)."""
    laid = json.loads(subprocess.run([DOT, "-Tjson"], input=dot_text, text=True,
                                     capture_output=True, check=True).stdout)
    spilled = []
    for obj in laid.get("objects", []):
        outlines = [d["points"] for d in obj.get("_draw_", []) if d["op"] in "PpBb"]
        if not outlines:
            continue
        size = 14.0
        for d in obj.get("_ldraw_", []):
            size = d["size"] if d["op"] == "F" else size
            if d["op"] != "T":
                continue
            x, y = d["pt"]
            left = {"c": x - d["width"] / 2, "l": x, "r": x - d["width"]}[d["align"]]
            corners = [(cx, cy) for cx in (left, left + d["width"])
                       for cy in (y - 0.2 * size, y + 0.75 * size)]
            if not all(_inside(c, outlines[0]) for c in corners):
                spilled.append((obj["name"], d["text"]))
    return spilled


@pytest.mark.skipif(DOT is None, reason="Graphviz 'dot' is not installed")
@pytest.mark.parametrize("pipeline", PIPELINES, ids=lambda p: p.stem)
def test_every_label_stays_inside_its_shape(pipeline: Path) -> None:
    """Invariant: every line of every node's label is drawn inside the node's outline (the
    copy-backs' many-line labels spilled over their arrow shapes)."""
    text = (GOLDEN / f"{pipeline.stem}.dot").read_text(encoding="utf-8")
    assert labels_outside_their_shapes(text) == []


@pytest.mark.skipif(DOT is None, reason="Graphviz 'dot' is not installed")
def test_a_long_copy_back_label_stays_inside() -> None:
    # the check sees a label that spills: a box drawn too small for its two lines
    small = 'digraph g { a [label="a long line\\nanother long line", shape=box, height=0.1, ' \
            'width=0.1, fixedsize=true]; }'
    assert labels_outside_their_shapes(small) == [("a", "a long line"),
                                                  ("a", "another long line")]
    g = nx.DiGraph(**model.graph_attrs("p", "/data", {}, ["j"]))
    files = tuple((f"t/a_rather_long_file_name_{k}.tif", f"r/{k}.tif") for k in range(9))
    g.add_node("copyback:j/t", **model.Copyback("j", "t", files=files).to_attrs())
    assert labels_outside_their_shapes(to_dot(g)) == []
