"""The plan table (``opals_dsl.plan.table``) reads as the plan graph it stands for: every
question the runtime and the report ask of a plan gets the same answer from both."""

from __future__ import annotations

import tempfile
from pathlib import Path

import networkx as nx
import pytest
from conftest import EXAMPLES
from hypothesis import given
from test_plan_properties import SETTINGS, PipelineM, pipelines, write

from opals_dsl.errors import PipelineError
from opals_dsl.lang.compile import load, plan, plan_table
from opals_dsl.plan import model
from opals_dsl.plan.dot import to_job_dot
from opals_dsl.plan.table import PlanTable

REPO = Path(__file__).resolve().parents[1]
PIPELINES = list(EXAMPLES) + [REPO / "tests" / "golden" / "plans" / "features" / "features.opf"]


def both(path: Path, params: dict[str, str] | None = None) -> tuple[nx.DiGraph, PlanTable]:
    loaded = load(path, params)
    return plan(loaded), plan_table(loaded)


def assert_reads_alike(graph: nx.DiGraph, table: PlanTable) -> None:
    assert model.info(table) == model.info(graph)
    found, held = model.tasks(graph), model.tasks(table)
    assert held == found
    for t in found.tasks:
        assert model.chain(table, t) == model.chain(graph, t)
        for nid in t.nodes:
            assert nid in table.nodes
            assert model.node(table, nid) == model.node(graph, nid)
            assert model.kind_of(table, nid) == model.kind_of(graph, nid)
            assert sorted(table.predecessors(nid)) == sorted(graph.predecessors(nid))
        for wrong in (f"exec:{t.job}/{t.task}/no-such-step", f"copyback:{t.job}/{t.task}x",
                      f"stage:{t.job}x/{t.task}", f"other:{t.job}/{t.task}"):
            assert wrong not in table.nodes
            with pytest.raises(KeyError):
                table.nodes[wrong]
    assert dict(table.nodes(data=True)) == dict(graph.nodes(data=True))
    assert sorted(table.nodes) == sorted(graph.nodes)
    assert len(table.nodes) == graph.number_of_nodes()
    assert sorted(table.edges) == sorted(graph.edges)
    assert model.destination_folders(table) == model.destination_folders(graph)
    calls = model.call_steps(graph)
    for nid in graph.nodes:
        assert (nid in model.call_steps(table)) == (nid in calls)
    assert to_job_dot(table) == to_job_dot(graph)


@pytest.mark.parametrize("pipeline", PIPELINES, ids=lambda p: p.stem)
def test_every_example_s_table_reads_as_its_graph(pipeline: Path) -> None:
    assert_reads_alike(*both(pipeline))


@pytest.mark.slow
@SETTINGS
@given(pipelines())
def test_a_table_reads_as_the_graph_of_any_pipeline(generated: PipelineM) -> None:
    """Invariant: for any pipeline, the plan table answers tasks, chains, nodes, edges,
    destination folders and call steps as the plan graph does."""
    with tempfile.TemporaryDirectory() as tmp:
        opf = write(generated, Path(tmp))
        try:
            graph, table = both(opf, generated.overrides)
        except PipelineError as exc:
            raise AssertionError(f"{exc.render()}\n\n{generated.text}") from None
    assert_reads_alike(graph, table)


def test_jobs_planned_out_of_written_order_are_tasks_in_written_order(tmp_path: Path) -> None:
    """A job written first that reads a later job's outputs is planned after it; the table
    still numbers the tasks as the graph's reader does (jobs as written), and what each task
    waits for follows."""
    (tmp_path / "data").mkdir()
    for name in ("a", "b", "c"):
        (tmp_path / "data" / f"{name}.txt").write_text(name)
    pipeline = tmp_path / "order.opf"
    pipeline.write_text(
        'pipeline order\n'
        'job late for f in first.up.o {\n'
        '    output "out/late" flat\n'
        '    step copy {\n'
        '        out o = "{f.stem}.late"\n'
        '        run cp {f} {o}\n'
        '    }\n'
        '}\n'
        'job first for f in "data/*.txt" {\n'
        '    output "out/first" flat\n'
        '    step up {\n'
        '        out o = "{f.stem}.up"\n'
        '        run cp {f} {o}\n'
        '    }\n'
        '}\n')
    graph, table = both(pipeline)
    held = model.tasks(table)
    assert [t.job for t in held.tasks] == ["late"] * 3 + ["first"] * 3
    assert [t.order for t in held.tasks] == list(range(6))
    assert held.upstream[:3] == ((3,), (4,), (5,))
    assert_reads_alike(graph, table)
