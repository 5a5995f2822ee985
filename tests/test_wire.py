"""The engine's request and result (opals_dsl.plan.wire): they travel as plain data, come back
equal, and a message in another format version is refused with a sentence that says so."""

from __future__ import annotations

import json
import pickle

import pytest

from opals_dsl.plan import wire


def request() -> wire.TaskRequest:
    return wire.TaskRequest(
        pipeline="p", root="/data", job="dem", task="s1",
        machine_stage=wire.Stage("stage:dem", (("cfg/grid.cfg", "grid.cfg"),)),
        task_stage=wire.Stage("stage:dem/s1", (("data/s1.xyz", "s1.xyz"),)),
        steps=(
            wire.Step("exec:dem/s1/grid", "grid", ("python", "../grid.py", "s1.xyz"),
                      inputs=("s1.xyz",), outputs=("s1.asc", "t.tmp"), temp=("t.tmp",)),
            wire.Step("exec:dem/s1/call", "call", None, "pkg.mod:fn", {"a": [1, 2]}),
        ),
        copyback=wire.Stage("copyback:dem/s1", (("s1.asc", "results/s1.asc"),)),
        attempt=1, scratch=None, logs="/state/logs/dem", checksum=True,
    )


def result() -> wire.TaskResult:
    return wire.TaskResult(
        job="dem", task="s1", attempt=1, ok=False, host="h", pid=7, scratch="/tmp",
        trace=(wire.TraceRow("stage:dem", "stage", 1.0, 1.5, "cached"),
               wire.TraceRow("exec:dem/s1/grid", "exec", 1.5, 2.5, "failed", 0, 3, "exit 3", 4)),
        failure=wire.Failure("exit", "step grid exited with status 3", "exec:dem/s1/grid",
                             "grid", 3, "/state/logs/dem/grid/s1.log", ("a", "b"), "/tmp/x"),
        bytes_staged=10, shared={"cfg/grid.cfg": [5, 99]},
        staged={"data/s1.xyz": [10, 100, "ab" * 32]},
    )


@pytest.mark.parametrize("make", [request, result])
def test_messages_travel_as_plain_data_and_come_back_equal(make) -> None:
    message = make()
    data = message.to_wire()
    assert data["v"] == wire.VERSION
    # plain data only: as pickle carries it, and as JSON would (tuples become lists)
    assert type(message).from_wire(pickle.loads(pickle.dumps(data))) == message
    assert type(message).from_wire(json.loads(json.dumps(data))) == message


def test_a_result_names_its_machine_and_span() -> None:
    r = result()
    assert r.machine == "h:/tmp"
    assert r.span == pytest.approx(1.5)
    assert wire.TaskResult("j", "t", 0, True, "h", 1, "/s").span is None


@pytest.mark.parametrize("cls", [wire.TaskRequest, wire.TaskResult])
def test_another_version_is_refused_in_words(cls) -> None:
    data = (request() if cls is wire.TaskRequest else result()).to_wire()
    data["v"] = wire.VERSION + 1
    with pytest.raises(wire.WireError, match="different versions of opf"):
        cls.from_wire(data)
    del data["v"]
    with pytest.raises(wire.WireError, match="version None"):
        cls.from_wire(data)


def test_an_incomplete_request_is_refused_in_words() -> None:
    data = request().to_wire()
    del data["task_stage"]
    with pytest.raises(wire.WireError, match="incomplete"):
        wire.TaskRequest.from_wire(data)
    with pytest.raises(wire.WireError, match="mapping"):
        wire.TaskRequest.from_wire(["not", "a", "request"])


def test_a_scratch_root_is_given_only_where_none_is_named() -> None:
    r = request()
    assert r.with_scratch("/s").scratch == "/s"
    named = r.with_scratch("/s")
    assert named.with_scratch("/other").scratch == "/s"
    assert r.with_scratch(None) is r
