"""The plan graph itself: building it fast, and writing it as node-link JSON.

This is the one module that touches networkx's internals, and it does so for speed and memory
only, as measured at 100,000 tasks:

* :func:`add_chain` writes nodes and edges straight into the graph's dicts (networkx 3's
  documented data layout: ``_node`` holds each node's attribute dict, ``_succ``/``_pred`` its
  neighbours, with the edge attribute dict shared by both directions). ``add_node(n, **attrs)``
  and ``add_edges_from`` copy every attribute dict and check every argument; building the plan
  through them takes about twice as long. Like networkx's own methods, it clears the graph's
  cache of converted graphs afterwards.
* Inside a task's chain each node has one neighbour each way; it is kept in a
  :class:`Neighbour` (a three-slot mutable mapping) instead of a dict of one entry, and plan
  edges share one empty attribute dict. Together that keeps 1.2 KB less per task of four
  nodes (658 MB → 542 MB for a plan of 100,000 tasks).
* :func:`json_chunks` reads the same dicts to stream the plan as JSON a few dozen nodes at a
  time.

networkx is pinned to major version 3 in ``pyproject.toml`` for this reason;
``tests/test_plan_graph.py`` checks that a graph built here equals one built through networkx's
public methods.
"""

from __future__ import annotations

import gc
import io
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from json.encoder import encode_basestring
from typing import Any, TextIO

import networkx as nx


class _NoAttributes(dict):  # type: ignore[type-arg]
    """An empty dict that stays empty: what every edge :func:`add_chain` makes carries. Plan
    edges have no attributes, so they share one of these instead of a dict each; networkx's
    ``add_edge`` of an existing edge with no attributes still works, while writing an
    attribute fails instead of reaching every edge."""

    __slots__ = ()

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("plan edges carry no attributes; build a new graph to add some")

    def update(self, *args: Any, **kwargs: Any) -> None:
        if any(args) or kwargs:
            self._refuse()

    __setitem__ = __delitem__ = __ior__ = setdefault = pop = popitem = _refuse  # type: ignore


#: the attributes of every edge :func:`add_chain` makes
NO_ATTRIBUTES: Mapping[str, Any] = _NoAttributes()


class Neighbour(MutableMapping[str, Any]):
    """A node's neighbours in one direction, as networkx keeps them (neighbour -> edge
    attributes), for the common case of exactly one: inside a task's chain every node has one
    node before it and one after. Three slots instead of a dict: a dict of one entry takes
    184 bytes, this 56; a chain of four nodes has seven such maps.

    It is a full mutable mapping: adding a second neighbour, or removing the one, moves the
    entries into a dict it keeps from then on."""

    __slots__ = ("_key", "_value", "_more")

    def __init__(self, key: str, value: Mapping[str, Any]) -> None:
        self._key: str | None = key
        self._value = value
        self._more: dict[str, Any] | None = None

    def __getitem__(self, key: str) -> Any:
        if self._more is not None:
            return self._more[key]
        if key == self._key:
            return self._value
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return key in self._more if self._more is not None else key == self._key

    def __iter__(self) -> Iterator[str]:
        if self._more is not None:
            return iter(self._more)
        return iter((self._key,))

    def __len__(self) -> int:
        return len(self._more) if self._more is not None else 1

    def __setitem__(self, key: str, value: Any) -> None:
        if self._more is None:
            if key == self._key:
                self._value = value
                return
            self._more = {self._key: self._value}  # type: ignore[dict-item]
            self._key = self._value = None  # type: ignore[assignment]
        self._more[key] = value

    def __delitem__(self, key: str) -> None:
        if self._more is None:
            if key != self._key:
                raise KeyError(key)
            self._more = {}
            self._key = self._value = None  # type: ignore[assignment]
            return
        del self._more[key]

    def copy(self) -> dict[str, Any]:
        return dict(self.items())

    def pairs(self) -> Iterable[tuple[str, Any]]:
        """(neighbour, edge attributes), fast: what ``items()`` yields, without its view."""
        if self._more is not None:
            return self._more.items()
        return ((self._key, self._value),)  # type: ignore[return-value]

    def __repr__(self) -> str:
        return repr(dict(self.items()))


def add_chain(g: nx.DiGraph, chain: Sequence[tuple[str, dict[str, Any]]],
              after: Iterable[str] = ()) -> None:
    """Add the nodes of ``chain`` (``(id, attributes)``, new ids) to ``g``, each waiting for
    the one before it, and the first waiting for every node of ``after`` (already in ``g``).

    The attribute dicts are taken as they are, not copied. Inside the chain a node's one
    neighbour each way is a :class:`Neighbour`; the edges share :data:`NO_ATTRIBUTES`."""
    node, succ, pred = g._node, g._succ, g._pred
    prev: str | None = None
    for nid, attrs in chain:
        node[nid] = attrs
        if prev is None:
            into: dict[str, Any] = {}
            for u in after:
                if u not in into:
                    succ[u][nid] = into[u] = NO_ATTRIBUTES
            pred[nid] = Neighbour(*next(iter(into.items()))) if len(into) == 1 else into
        else:
            pred[nid] = Neighbour(prev, NO_ATTRIBUTES)
            succ[prev] = Neighbour(nid, NO_ATTRIBUTES)
        prev = nid
    if prev is not None:
        succ[prev] = {}  # the last node's later successors: tasks downstream of it
    cache = getattr(g, "__networkx_cache__", None)
    if cache:
        cache.clear()


def json_chunks(graph: nx.DiGraph, batch: int = 64) -> Iterator[str]:
    """The plan as networkx node-link JSON (``nx.node_link_data(graph, edges="edges")``,
    compact, UTF-8 text), in pieces: the same text as one ``json.dumps`` of it, without
    building the whole document in memory first.

    Nodes are encoded a few dozen at a time: small batches stay in the processor's cache,
    which makes the whole twice as fast as a few large ones."""
    encode = _compact_encoder()
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
        for v, d in (nbrs.pairs() if nbrs.__class__ is Neighbour else nbrs.items()):
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


def _compact_encoder() -> Callable[[Any], str]:
    """``json.dumps(x, separators=(",", ":"), ensure_ascii=False)`` for plain data, made once:
    ``JSONEncoder.encode`` builds a new C encoder on every call, a sixth of the time it takes
    to encode a batch of plan nodes. Without the C accelerator, the encoder's own method."""
    options = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return options.encode
    run = make(None, options.default, encode_basestring, None, ":", ",", False, False, True)
    return lambda value: "".join(run(value, 0))


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
