"""The plan contract (opals_dsl.plan.model): every node the planner writes reads back as its typed
node and writes out again as the same attributes, in the same order; tasks are found in plan
order with what they wait for; a graph that is not a plan is refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest
from conftest import EXAMPLES, REPO

from opals_dsl.api import compile_file
from opals_dsl.plan import model


def test_each_kind_reads_back_what_it_writes() -> None:
    call = model.Call("pkg.mod:fn", {"a": 1, "files": ["x.xyz", "y.xyz"]})
    nodes = [
        model.MachineStage("dem", (("cfg/grid.cfg", "grid.cfg"),)),
        model.TaskStage("dem", "s1", 3, 2, (("data/s1.xyz", "s1.xyz"),)),
        model.Exec("dem", "s1", "grid", 1, ("python", "../lidar.py", "s1.xyz"), None,
                   ("../lidar.py", "s1.xyz"), ("s1.asc", "t.tmp"), ("t.tmp",)),
        model.Exec("dem", "s1", "call", 2, None, call, ("s1.asc",), (), ()),
        model.Copyback("dem", "s1", (("s1.asc", "results/grid/s1.asc"),)),
    ]
    for typed in nodes:
        attrs = typed.to_attrs()
        assert model.from_attrs(attrs) == typed
        assert attrs["kind"] == typed.kind
    assert [n.id for n in nodes] == ["stage:dem", "stage:dem/s1", "exec:dem/s1/grid",
                                     "exec:dem/s1/call", "copyback:dem/s1"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_the_planner_writes_every_node_through_the_contract(path: Path) -> None:
    """Reading a node and writing it again gives the same attributes in the same order: the
    planner writes nothing the contract does not know, and nothing in another order."""
    g = compile_file(path)
    for nid, attrs in g.nodes(data=True):
        typed = model.from_attrs(attrs)
        assert typed.id == nid
        again = typed.to_attrs()
        assert list(again.items()) == list(attrs.items()), nid
    info = model.info(g)
    assert list(info.to_attrs().items()) == list(g.graph.items())


def test_tasks_are_in_plan_order_with_what_they_wait_for() -> None:
    g = compile_file(REPO / "examples" / "strips.opf")
    found = model.tasks(g)
    names = [t.name for t in found.tasks]
    strips = [f"dem/strip{k}" for k in range(7326, 7335)]
    assert names == [*strips, "mosaic/0"]
    assert [t.order for t in found.tasks] == list(range(len(names)))
    assert found.upstream[-1] == tuple(range(len(strips)))
    assert all(ups == () for ups in found.upstream[:-1])
    assert found.downstream()[0] == [len(strips)]
    first = found.tasks[0]
    assert first.nodes == ("stage:dem", "stage:dem/strip7326", "exec:dem/strip7326/import",
                           "exec:dem/strip7326/grid", "copyback:dem/strip7326")
    machine, stage, execs, cb = model.chain(g, first)
    assert machine is not None and machine.files[0][1] == "grid.cfg"
    assert stage.index == 0 and stage.files == (("data/strip7326.las", "strip7326.las"),)
    assert [e.step for e in execs] == ["import", "grid"]
    assert cb.files[-1] == ("strip7326_dem.tif", "results/grid/strip7326_dem.tif")


def test_tasks_come_in_plan_order_whatever_the_order_of_the_graphs_nodes() -> None:
    """A plan read back from JSON or built by hand may list its nodes in any order; the tasks
    still come in plan order (job, then index), with the same chains and waits."""
    g = compile_file(REPO / "examples" / "strips.opf")
    mixed = nx.DiGraph()
    mixed.graph.update(g.graph)
    mixed.add_nodes_from(reversed(list(g.nodes(data=True))))
    mixed.add_edges_from(reversed(list(g.edges)))
    assert model.tasks(mixed) == model.tasks(g)
    assert [t.name for t in model.tasks(mixed).tasks][:2] == ["dem/strip7326", "dem/strip7327"]


def _plan(*nodes: model.Node, edges: tuple[tuple[str, str], ...] = ()) -> nx.DiGraph:
    g = nx.DiGraph()
    g.graph.update(model.graph_attrs("p", "/r", {}, sorted({n.job for n in nodes})))
    for n in nodes:
        g.add_node(n.id, **n.to_attrs())
    g.add_edges_from(edges)
    return g


def test_a_graph_that_is_not_a_plan_is_refused() -> None:
    ok = (model.MachineStage("j"), model.TaskStage("j", "t"), model.Copyback("j", "t"))
    assert len(model.tasks(_plan(*ok))) == 1
    with pytest.raises(model.PlanFormatError, match="lacks its task stage or copy-back"):
        model.tasks(_plan(model.MachineStage("j"), model.TaskStage("j", "t")))
    with pytest.raises(model.PlanFormatError, match="neither a machine stage nor a copy-back"):
        model.tasks(_plan(*ok, model.Exec("j", "t", "s", 0),
                          edges=(("exec:j/t/s", "stage:j/t"),)))
    with pytest.raises(model.PlanFormatError, match="unknown kind"):
        model.from_attrs({"kind": "mystery", "job": "j", "task": "t"})


def test_the_contract_and_the_engine_import_only_the_standard_library() -> None:
    code = ("import sys; import opals_dsl.plan.model, opals_dsl.plan.wire, "
            "opals_dsl.runtime.engine; "
            "print(sorted(m for m in ('networkx', 'lark', 'ipyparallel', 'rich') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
