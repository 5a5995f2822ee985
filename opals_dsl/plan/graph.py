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
  time, encoded by orjson where that writes the same text as the ``json`` module (four times
  as fast; :func:`_nodes_encoder` says where it does not).

Where the graph itself is not needed, the planner hands its chains to a :class:`PlanSink`
instead of a graph: :class:`NodeLinkWriter` writes the same JSON as each chain is planned and
never holds the plan (``opf compile --json``: a million tasks in about 1.1 GB instead of 3.8).

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
from typing import Any, Protocol, TextIO

import networkx as nx

from .model import may_hold_floats

try:
    import orjson
except ImportError:  # pragma: no cover - a platform without its wheel: the standard library
    orjson = None  # type: ignore[assignment]


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
    encode, encode_nodes = _compact_encoder(), _nodes_encoder()
    yield _head(encode, graph.graph, graph.is_directed())
    nodes = list(graph.nodes)
    for k in range(0, len(nodes), batch):
        part = [{**graph._node[v], "id": v} for v in nodes[k : k + batch]]
        yield ("," if k else "") + encode_nodes(part)[1:-1]
    yield '],"edges":['
    yield from _joined(_edge_rows(encode, (
        (u, nbrs.pairs() if nbrs.__class__ is Neighbour else nbrs.items())
        for u, nbrs in graph._succ.items()
    )), 16 * batch)
    yield "]}\n"


def _head(encode: Callable[[Any], str], attrs: Mapping[str, Any], directed: bool = True) -> str:
    """The node-link JSON text up to the first node."""
    kind = "true" if directed else "false"
    return f'{{"directed":{kind},"multigraph":false,"graph":{encode(attrs)},"nodes":['


def _edge_rows(encode: Callable[[Any], str],
               succ: Iterable[tuple[str, Iterable[tuple[str, Mapping[str, Any]]]]]
               ) -> Iterator[str]:
    """Each edge as node-link JSON, from each node's (successor, edge attributes) in order."""
    quote = encode_basestring  # a JSON string literal, non-ASCII kept
    for u, nbrs in succ:
        for v, d in nbrs:
            if d:
                yield encode({**d, "source": u, "target": v})
            else:
                yield f'{{"source":{quote(u)},"target":{quote(v)}}}'


def _joined(rows: Iterable[str], batch: int) -> Iterator[str]:
    """``",".join(rows)`` in pieces of ``batch`` rows."""
    part: list[str] = []
    first = True
    for row in rows:
        part.append(row)
        if len(part) >= batch:
            yield ("" if first else ",") + ",".join(part)
            first, part = False, []
    if part:
        yield ("" if first else ",") + ",".join(part)


class PlanSink(Protocol):
    """Where the planner puts a plan instead of a graph
    (:func:`opals_dsl.lang.lower.build_plan`): started with the graph's attributes, given each
    chain as :func:`add_chain` would be, closed at the end of a plan without errors.
    :class:`NodeLinkWriter` writes it as JSON; :class:`~opals_dsl.plan.model.PlanCounts`
    counts it; :class:`~opals_dsl.plan.table.PlanTable` holds it compactly for a run."""

    def start(self, attrs: dict[str, Any]) -> None: ...
    def add_chain(self, chain: Any, after: Any = ()) -> None: ...
    def close(self) -> None: ...


class NodeLinkWriter:
    """Writes a plan as node-link JSON while it is being planned, instead of building the
    graph: the planner hands each chain to :meth:`add_chain` (as it would to the module's
    :func:`add_chain`) and calls :meth:`close` at the end. The text is byte for byte what
    :func:`write_json` writes for the graph the same calls build; the graph is never held, so
    a plan of a million tasks takes a fraction of the memory (``opf compile --json``).

    Nodes are written as they come, a few dozen at a time. What the edges need is kept until
    :meth:`close`: each chain's node ids, and the nodes each node is in the ``after`` of.
    :meth:`start` comes first, with the graph's attributes, which open the text."""

    def __init__(self, out: TextIO, batch: int = 64) -> None:
        self._out = out
        self._encode = _compact_encoder()
        self._encode_nodes = _nodes_encoder()
        self._batch = batch
        self._pending: list[dict[str, Any]] = []
        self._written = 0
        self._chains: list[tuple[str, ...]] = []
        self._later: dict[str, dict[str, None]] = {}  # node -> nodes after it, outside its chain

    def start(self, attrs: Mapping[str, Any]) -> None:
        """Write the opening of the text: the graph's attributes."""
        self._out.write(_head(self._encode, attrs))

    def add_chain(self, chain: Sequence[tuple[str, dict[str, Any]]],
                  after: Iterable[str] = ()) -> None:
        """What :func:`add_chain` adds to a graph, written instead (new node ids; every node
        of ``after`` added before: :meth:`close` checks that)."""
        if not chain:
            return
        first = chain[0][0]
        for u in after:
            self._later.setdefault(u, {})[first] = None
        self._chains.append(tuple(nid for nid, _ in chain))
        for nid, attrs in chain:
            attrs["id"] = nid  # taken as they are, as add_chain does: only written, never kept
            self._pending.append(attrs)
            if len(self._pending) >= self._batch:
                self._flush()

    def _flush(self) -> None:
        if self._pending:
            text = self._encode_nodes(self._pending)[1:-1]
            self._out.write("," + text if self._written else text)
            self._written += len(self._pending)
            self._pending = []

    def close(self) -> None:
        """Write the rest of the nodes, every edge and the end of the text."""
        self._flush()
        write = self._out.write
        write('],"edges":[')
        for chunk in _joined(self._edge_rows(), 16 * self._batch):
            write(chunk)
        write("]}\n")

    def _edge_rows(self) -> Iterator[str]:
        """Each edge as node-link JSON, in the order of the graph's: by node, its successors
        being the next node of its chain, then those that named it in ``after`` in the order
        they were added. Plan edges carry no attributes."""
        quote, later = encode_basestring, self._later
        found = 0
        for ids in self._chains:
            target = quote(ids[0])
            for k in range(len(ids)):
                source = target
                if k + 1 < len(ids):
                    target = quote(ids[k + 1])
                    yield f'{{"source":{source},"target":{target}}}'
                if ids[k] in later:
                    found += 1
                    for v in later[ids[k]]:
                        yield f'{{"source":{source},"target":{quote(v)}}}'
        if found != len(later):
            missing = sorted(set(later) - {u for ids in self._chains for u in ids})
            raise KeyError(f"a chain waits for nodes that are not in the plan: {missing[:3]}")


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


def _nodes_encoder() -> Callable[[list[dict[str, Any]]], str]:
    """:func:`_compact_encoder` for a list of plan nodes' attributes, four times as fast with
    orjson (installed with opf) where that writes the same text.

    orjson writes every string, integer, list and dict of a plan node as the standard library
    does; it writes floats below 1e-4 without an exponent (``0.00005``, not ``5e-05``) and NaN
    and infinities as ``null``. A plan node holds floats only in a step's ``timeout`` and a
    ``call``'s arguments (:func:`opals_dsl.plan.model.may_hold_floats`), so a batch with either
    goes to the standard library, as does one orjson refuses (a file name that is not UTF-8, an
    integer beyond 64 bits)."""
    stdlib = _compact_encoder()
    if orjson is None:
        return stdlib
    dumps, refused = orjson.dumps, (TypeError, orjson.JSONEncodeError)

    def encode(nodes: list[dict[str, Any]]) -> str:
        for attrs in nodes:
            if may_hold_floats(attrs):
                return stdlib(nodes)
        try:
            return dumps(nodes).decode()
        except refused:
            return stdlib(nodes)

    return encode


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
