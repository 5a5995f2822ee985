"""The plan graph itself: building it fast, and writing it as node-link JSON.

This is the one module that touches networkx's internals, and it does so for speed only, as
measured at 100,000 tasks:

* :func:`add_chain` writes nodes and edges straight into the graph's dicts (networkx 3's
  documented data layout: ``_node`` holds each node's attribute dict, ``_succ``/``_pred`` its
  neighbours, with the edge attribute dict shared by both directions). ``add_node(n, **attrs)``
  and ``add_edges_from`` copy every attribute dict and check every argument; building the plan
  through them takes about twice as long. Like networkx's own methods, it clears the graph's
  cache of converted graphs afterwards.
* :func:`json_chunks` reads the same dicts to stream the plan as JSON a few dozen nodes at a
  time.

networkx is pinned to major version 3 in ``pyproject.toml`` for this reason;
``tests/test_graph.py`` checks that a graph built here equals one built through networkx's
public methods.
"""

from __future__ import annotations

import gc
import io
import json
from collections.abc import Iterable, Iterator, Sequence
from json.encoder import encode_basestring
from typing import Any, TextIO

import networkx as nx


def add_chain(g: nx.DiGraph, chain: Sequence[tuple[str, dict[str, Any]]],
              after: Iterable[str] = ()) -> None:
    """Add the nodes of ``chain`` (``(id, attributes)``, new ids) to ``g``, each waiting for
    the one before it, and the first waiting for every node of ``after`` (already in ``g``).

    The attribute dicts are taken as they are, not copied."""
    node, succ, pred = g._node, g._succ, g._pred
    prev: str | None = None
    for nid, attrs in chain:
        node[nid] = attrs
        succ[nid] = {}
        if prev is None:
            into: dict[str, dict] = {}
            pred[nid] = into
            for u in after:
                if u not in into:
                    succ[u][nid] = into[u] = {}
        else:
            edge: dict = {}
            pred[nid] = {prev: edge}
            succ[prev][nid] = edge
        prev = nid
    cache = getattr(g, "__networkx_cache__", None)
    if cache:
        cache.clear()


def json_chunks(graph: nx.DiGraph, batch: int = 64) -> Iterator[str]:
    """The plan as networkx node-link JSON (``nx.node_link_data(graph, edges="edges")``,
    compact, UTF-8 text), in pieces: the same text as one ``json.dumps`` of it, without
    building the whole document in memory first.

    Nodes are encoded a few dozen at a time: small batches stay in the processor's cache,
    which makes the whole twice as fast as a few large ones."""
    encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
    directed = "true" if graph.is_directed() else "false"
    yield f'{{"directed":{directed},"multigraph":false,"graph":{encode(graph.graph)},"nodes":['
    nodes = list(graph.nodes)
    for k in range(0, len(nodes), batch):
        part = [{**graph._node[v], "id": v} for v in nodes[k : k + batch]]
        yield ("," if k else "") + encode(part)[1:-1]
    yield '],"edges":['
    quote = encode_basestring  # a JSON string literal, non-ASCII kept
    rows: list[str] = []
    first = True
    for u, nbrs in graph._succ.items():
        for v, d in nbrs.items():
            if d:
                rows.append(encode({**d, "source": u, "target": v}))
            else:
                rows.append(f'{{"source":{quote(u)},"target":{quote(v)}}}')
        if len(rows) >= 16 * batch:
            yield ("" if first else ",") + ",".join(rows)
            first, rows = False, []
    if rows:
        yield ("" if first else ",") + ",".join(rows)
    yield "]}\n"


def write_json(graph: nx.DiGraph, out: TextIO) -> None:
    """Write the plan as node-link JSON to a text stream (see :func:`json_chunks`)."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        for chunk in json_chunks(graph):
            out.write(chunk)
    finally:
        if collecting:
            gc.enable()


def to_json(graph: nx.DiGraph) -> str:
    """The plan as node-link JSON text, ending in a newline."""
    buf = io.StringIO()
    write_json(graph, buf)
    return buf.getvalue()
