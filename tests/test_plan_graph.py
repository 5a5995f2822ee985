"""The plan graph's fast construction (opals_dsl.plan.graph): a plan built by ``add_chain``
is the same graph networkx's own methods would build, its compact neighbour maps behave
exactly like the dicts networkx would have put there, and a plan written while it is planned
(``NodeLinkWriter``) is the JSON of that graph."""

from __future__ import annotations

import io
import json

import networkx as nx
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from opals_dsl.plan import graph as graph_module
from opals_dsl.plan import model
from opals_dsl.plan.graph import Neighbour, NodeLinkWriter, add_chain, to_json

CHAINS = st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=6)


def build(lengths: list[int]) -> tuple[nx.DiGraph, nx.DiGraph]:
    """The same plan-shaped graph twice: a root, then chains of the given lengths, each waiting
    for the root and for the end of the chain before it; once through add_chain, once through
    networkx's add_node/add_edge."""
    fast, slow = nx.DiGraph(), nx.DiGraph()
    add_chain(fast, [("root", {"kind": "root"})])
    slow.add_node("root", kind="root")
    last = None
    for c, length in enumerate(lengths):
        chain = [(f"n{c}.{k}", {"chain": c, "k": k, "cell": 0.5 * k, "name": f"Straße {k}",
                                "call": {"kwargs": [None, True]} if k else None})
                 for k in range(length)]
        after = ["root"] if last is None else ["root", last]
        add_chain(fast, chain, after)
        for k, (nid, attrs) in enumerate(chain):
            slow.add_node(nid, **attrs)
            for u in (after if k == 0 else [chain[k - 1][0]]):
                slow.add_edge(u, nid)
        last = chain[-1][0]
    return fast, slow


@given(CHAINS)
def test_a_graph_built_by_add_chain_equals_one_built_by_networkx(lengths):
    """Invariant: nodes, their attributes and order, edges, adjacency both ways and the
    node-link JSON are those of the same graph built through networkx's public methods."""
    fast, slow = build(lengths)
    assert nx.utils.graphs_equal(fast, slow)
    assert list(fast.nodes(data=True)) == list(slow.nodes(data=True))
    assert list(fast.edges(data=True)) == list(slow.edges(data=True))
    for n in slow:
        assert list(fast.predecessors(n)) == list(slow.predecessors(n))
        assert list(fast.successors(n)) == list(slow.successors(n))
        assert fast.in_degree(n) == slow.in_degree(n)
        assert fast.out_degree(n) == slow.out_degree(n)
    assert to_json(fast) == to_json(slow) == json.dumps(
        nx.node_link_data(slow, edges="edges"), separators=(",", ":"), ensure_ascii=False) + "\n"
    assert json.loads(to_json(fast)) == nx.node_link_data(slow, edges="edges")
    assert list(nx.topological_sort(fast)) == list(nx.topological_sort(slow))


@given(CHAINS, st.data())
def test_a_built_graph_stays_networkx_after_changes(lengths, data):
    """Invariant: removing nodes, adding edges and copying a subgraph give the same result on
    a graph built by add_chain as on one built by networkx."""
    fast, slow = build(lengths)
    nodes = list(slow)
    for _ in range(data.draw(st.integers(0, 4))):
        u, v = data.draw(st.sampled_from(nodes)), data.draw(st.sampled_from(nodes))
        if data.draw(st.booleans()):
            fast.add_edge(u, v)
            slow.add_edge(u, v)
        elif u in slow and u != "root":
            fast.remove_node(u)
            slow.remove_node(u)
            nodes.remove(u)
        assert nx.utils.graphs_equal(fast, slow)
    keep = data.draw(st.sets(st.sampled_from(nodes)))
    assert nx.utils.graphs_equal(fast.subgraph(keep).copy(), slow.subgraph(keep).copy())



@given(CHAINS, st.integers(min_value=1, max_value=5), st.data())
def test_a_plan_written_while_planned_is_the_json_of_the_graph(lengths, batch, data):
    """Invariant: what NodeLinkWriter writes for a series of add_chain calls — each chain
    waiting for any nodes added before it, also ones inside a chain — is byte for byte the
    node-link JSON of the graph the same calls build, for any batch size."""
    graph, out = nx.DiGraph(), io.StringIO()
    attrs = {"pipeline": "p", "jobs": ["a", "b"], "params": {"x": [1, "ü"]}}
    graph.graph.update(attrs)
    writer = NodeLinkWriter(out, batch=batch)
    writer.start(attrs)
    added: list[str] = []
    for c, length in enumerate([1, *lengths]):
        chain = [(f"n{c}.{k}", {"chain": c, "k": k, "files": [[f"in{k}", "ö"]]})
                 for k in range(length)]
        after = data.draw(st.lists(st.sampled_from(added), unique=True)) if added else []
        add_chain(graph, chain, after)
        writer.add_chain([(nid, dict(a)) for nid, a in chain], after)  # it takes them as given
        added += [nid for nid, _ in chain]
    writer.close()
    assert out.getvalue() == to_json(graph)
    assert json.loads(out.getvalue()) == nx.node_link_data(graph, edges="edges")


def test_a_chain_waiting_for_a_node_never_added_is_refused():
    writer = NodeLinkWriter(io.StringIO())
    writer.start({})
    writer.add_chain([("a", {})])
    writer.add_chain([("b", {})], ["a", "nowhere"])
    with pytest.raises(KeyError, match="nowhere"):
        writer.close()

OPS = st.lists(st.tuples(st.sampled_from(["set", "del"]), st.sampled_from("abc"),
                         st.integers()), max_size=12)


@given(st.sampled_from("abc"), OPS)
def test_a_neighbour_map_behaves_as_a_dict(first, ops):
    """Invariant: after any sequence of assignments and deletions, a Neighbour holds what a
    dict given the same operations holds, in the same order, and fails where the dict fails."""
    mine, model = Neighbour(first, 0), {first: 0}
    for op, key, value in ops:
        if op == "set":
            mine[key] = value
            model[key] = value
        else:
            failed = False
            try:
                del model[key]
            except KeyError:
                failed = True
            if failed:
                try:
                    del mine[key]
                except KeyError:
                    pass
                else:
                    raise AssertionError(f"deleting missing {key!r} did not fail")
            else:
                del mine[key]
        assert list(mine.items()) == list(model.items())
        assert len(mine) == len(model)
        assert mine == model and mine.copy() == model
        for k in "abcd":
            assert (k in mine) == (k in model)
            assert mine.get(k) == model.get(k)


def test_an_attribute_written_onto_a_plan_edge_fails_rather_than_reaching_every_edge():
    g, _ = build([2, 2])
    with pytest.raises(TypeError, match="no attributes"):
        g.edges["n0.0", "n0.1"]["weight"] = 1
    with pytest.raises(TypeError, match="no attributes"):
        g.add_edge("n0.0", "n0.1", weight=1)
    assert g.edges["n1.0", "n1.1"] == {}


def test_node_attributes_are_plain_dicts_that_take_new_keys(tmp_path):
    """The planner's node attributes share their keys between nodes of a kind to save memory;
    they stay ordinary dicts: JSON-encodable, in the documented key order, open to changes
    of one node that leave the others alone."""
    from opals_dsl.api import compile_file
    (tmp_path / "a.txt").write_text("a\n")
    (tmp_path / "b.txt").write_text("b\n")
    (tmp_path / "p.opf").write_text(
        'pipeline p\njob j for s in "*.txt" {\n    output "out" flat\n'
        '    step copy {\n        out o = "{s.stem}.o"\n        run cp {s} {o}\n    }\n}\n')
    g = compile_file(tmp_path / "p.opf")
    a, b = g.nodes["exec:j/a/copy"], g.nodes["exec:j/b/copy"]
    assert type(a) is dict and type(g.nodes["copyback:j/a"]) is dict
    assert type(g.nodes["stage:j/a"]) is dict
    assert list(a) == ["kind", "job", "task", "step", "affinity", "index", "argv", "call",
                       "inputs", "outputs", "temp", "threads", "timeout"]
    a["note"] = 1
    del a["timeout"]
    assert "note" not in b and b["timeout"] is None
    assert json.loads(json.dumps(a))["note"] == 1
    assert json.loads(to_json(g))["nodes"][2]["note"] == 1


NAMES = st.text(st.characters(codec=None, exclude_categories=()), max_size=6)  # surrogates too
PLAIN = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | NAMES,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(NAMES, inner, max_size=3),
    max_leaves=6)


@st.composite
def plan_nodes(draw: st.DrawFn) -> dict:
    """A plan node's attributes as the planner makes them (opals_dsl.plan.model)."""
    job, task, name = draw(NAMES), draw(NAMES), draw(NAMES)
    files = draw(st.lists(st.lists(NAMES, min_size=2, max_size=2), max_size=2))
    kind = draw(st.sampled_from(["stage", "exec", "copyback"]))
    if kind == "stage":
        attrs = model.task_stage_attrs(job, task, (job, task), draw(st.integers(0, 2**40)),
                                       draw(st.integers(0, 9)), files)
    elif kind == "copyback":
        attrs = model.copyback_attrs(job, task, (job, task), files)
    else:
        call = draw(st.none() | st.builds(model.call_attrs, NAMES,
                                          st.dictionaries(NAMES, PLAIN, max_size=3)))
        attrs = model.exec_attrs(
            job, task, name, (job, task), draw(st.integers(0, 9)),
            None if call else draw(st.lists(NAMES, max_size=3)), call,
            draw(st.lists(NAMES, max_size=2)), [name], [], draw(st.integers(1, 64)),
            draw(st.none() | st.floats(min_value=0, exclude_min=True)))
    attrs["id"] = f"{kind}:{job}/{task}"
    return attrs


@given(st.lists(plan_nodes(), max_size=8))
@example([model.exec_attrs("j", "t", "s", ("j", "t"), 0, ["a"], None, [], [], [], 1, 5e-05)])
@example([model.exec_attrs("j", "t", "s", ("j", "t"), 0, None,
                           model.call_attrs("m:f", {"eps": 1e-07, "x": float("nan")}),
                           [], [], [], 1, None)])
@example([model.copyback_attrs("j", "t\udcff", ("j", "t\udcff"), [])])
def test_plan_nodes_are_written_as_the_standard_library_writes_them(nodes):
    """Invariant: the encoder of plan nodes (orjson where it writes the same text) writes any
    batch of plan nodes — tiny, huge and non-finite floats in timeouts and call arguments,
    integers beyond 64 bits, names that are not UTF-8 — exactly as json.dumps does."""
    assert graph_module.orjson is not None  # the fast path is there to be checked
    assert graph_module._nodes_encoder()(nodes) == json.dumps(
        nodes, separators=(",", ":"), ensure_ascii=False)
