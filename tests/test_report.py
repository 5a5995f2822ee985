"""``opf report``: reports built from a real run on real engines, checked against its trace and
its summary, and opened in a real headless browser (Chromium; skipped where none is installed).

The run (once per module) uses the session cluster of tests/conftest.py — three engines on two
"machines" — and a pipeline with a task that fails once and is retried, a task that fails for
good (``--keep-going``), a skipped task and a job that gathers the others' outputs.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import re
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import EngineCluster, last_run, read_json_lines, write_pipeline

from opals_dsl.api import compile_file
from opals_dsl.cli import main as opf_main
from opals_dsl.cli.report import write_report
from opals_dsl.runtime import session
from opals_dsl.runtime.cluster import ClusterOptions
from opals_dsl.runtime.connect import open_cluster
from opals_dsl.runtime.events import RunSummary
from opals_dsl.units import format_duration

PIPELINE = """\
    pipeline report_check

    param marks = "MARKS"

    job work for s in "data/s*.txt" {
        shared tool = "tool.py"
        output "out" by step
        retries 1
        step first {
            out a = "{s.stem}.a"
            run python {tool} sleepcopy 0.15 {s} {a}
        }
        step second {
            out b = "{s.stem}.b"
            run python {tool} failonce {marks}/{s.stem} {first.a} {b}
        }
    }

    job broken {
        shared tool = "tool.py"
        step bad {
            out x = "x.txt"
            run python {tool} fail 7
        }
    }

    job extra for v in ["keep", "old"] {
        shared tool = "tool.py"
        step copy {
            out c = "{v}.txt"
            run python {tool} copy {tool} {c}
        }
    }

    job total {
        shared tool = "tool.py"
        output "out" flat
        step merge {
            out all = "all.txt"
            run python {tool} merge {all} {work.second.b}
        }
    }
"""


class Run:
    """A finished real run: its pipeline, plan, state folder, summary, trace and report."""

    def __init__(self, pipeline: Path, plan: Any, state: Path, summary: RunSummary,
                 trace: list[dict[str, Any]], html: Path) -> None:
        self.pipeline = pipeline
        self.plan = plan
        self.state = state
        self.summary = summary
        self.trace = trace
        self.html = html

    @property
    def text(self) -> str:
        return self.html.read_text(encoding="utf-8")

    @property
    def data(self) -> dict[str, Any]:
        return embedded_data(self.text)


def embedded_data(page: str) -> dict[str, Any]:
    found = re.search(r'<script type="application/json" id="opf-data">(.*?)</script>', page,
                      re.DOTALL)
    assert found, "the page embeds no data"
    return json.loads(found.group(1))


@pytest.fixture(scope="module")
def run(cluster: EngineCluster, tmp_path_factory: pytest.TempPathFactory) -> Run:
    folder = tmp_path_factory.mktemp("report")
    marks = folder / "marks"
    marks.mkdir()
    (marks / "s1").touch()  # s1 and s3 pass at once; s2 fails its first attempt
    (marks / "s3").touch()
    path = write_pipeline(folder, PIPELINE.replace("MARKS", str(marks)), inputs=3)
    plan = compile_file(path)
    state = folder / ".opf"  # where `opf run p.opf` keeps its state
    with open_cluster(ClusterOptions(cluster_file=str(cluster.client_file)), state) as executor:
        summary = session.run(plan, executor=executor, state_dir=state, resume=False,
                              keep_going=True,
                           skip=lambda ref: ref.job == "extra" and ref.task == "old")
    trace = read_json_lines(last_run(state) / "trace.jsonl")
    html = write_report(last_run(state), folder / "report.html", plan)
    return Run(path, plan, state, summary, trace, html)


def timed_rows(trace: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in trace if r["start"] is not None and r["end"] is not None]


# -- the report's data against the run -------------------------------------------------------


def test_the_run_did_what_the_report_must_show(run: Run) -> None:
    s = run.summary
    assert (s.total, s.done, s.failed, s.skipped, s.retried) == (7, 5, 1, 1, 1)


def test_summary_matches_the_run(run: Run) -> None:
    s, got = run.summary, run.data["summary"]
    assert got["tasks"] == s.total
    assert got["done"] == s.done
    assert got["failed"] == s.failed
    assert got["skipped"] == s.skipped
    assert got["retried"] == s.retried
    assert got["retried_tasks"] == 1
    assert got["blocked"] == s.blocked and got["not_run"] == s.not_run
    assert got["bytes_staged"] == s.bytes_staged
    assert got["bytes_copied"] == s.bytes_copied
    # the nodes that ran: not the machine stages found ready, nor the nodes that never ran
    ran = [r for r in run.trace if r.get("start") is not None
           and r["status"] not in ("cached", "skipped", "blocked", "not-run", "reused")]
    assert any(r["status"] == "cached" for r in run.trace)
    assert got["nodes_run"] == len(ran)
    # the wall time lies within the driver's own start and end of the run
    assert s.started <= got["start"] < got["end"] <= s.finished
    assert got["wall"] == pytest.approx(got["end"] - got["start"])
    assert 0.15 < got["wall"] <= s.wall
    # the tiles show the same figures; the time is named for what it spans, not "wall time"
    # as in the run's summary (which counts from the engines being ready)
    assert (f'data-metric="wall" data-value="{round(got["wall"], 3)}"><div class="v">'
            f'{format_duration(got["wall"])}</div><div class="l">first task to last</div>'
            in run.text)
    for metric in ("done", "failed", "skipped", "retried", "bytes_staged", "bytes_copied"):
        assert f'data-metric="{metric}" data-value="{got[metric]}"' in run.text


def test_every_node_that_ran_is_one_bar_on_its_engine_lane(run: Run) -> None:
    data = run.data["timeline"]
    f = {name: i for i, name in enumerate(data["fields"])}
    rows = timed_rows(run.trace)
    bars = data["bars"]
    assert len(bars) == len(rows) > 0
    t0 = min(r["start"] for r in rows)
    assert data["t0"] == pytest.approx(t0)
    for bar in bars:
        lane = data["lanes"][bar[f["lane"]]]
        matches = [r for r in rows
                   if (r["node"], r["attempt"], r["engine"]) == (bar[f["node"]], bar[f["attempt"]],
                                                                 lane["engine"])
                   and abs(r["start"] - t0 - bar[f["start"]]) < 1e-5]
        assert len(matches) == 1, bar
        row = matches[0]
        assert lane["machine"] == row["machine"]
        assert bar[f["dur"]] == pytest.approx(row["end"] - row["start"], abs=1e-5)
        assert bar[f["status"]] == row["status"]
        assert bar[f["bytes"]] == row["bytes"]
        kind = {0: "stage", 1: "stage", 2: "exec", 3: "copyback"}[bar[f["phase"]]]
        assert kind == row["kind"]
        assert (bar[f["phase"]] == 0) == (row["task"] is None)
        if row["task"] is not None:
            assert data["tasks"][bar[f["task"]]] == f"{row['job']}/{row['task']}"
    # lanes: one per engine that ran something, grouped by machine
    engines = {(r["machine"], r["engine"]) for r in rows}
    assert {(ln["machine"], ln["engine"]) for ln in data["lanes"]} == engines
    machines = [ln["machine"] for ln in data["lanes"]]
    assert machines == sorted(machines)


def test_time_per_phase_adds_up_to_the_nodes(run: Run) -> None:
    rows = timed_rows(run.trace)
    phases = {p["phase"]: p for p in run.data["phases"]}
    expected = {"machine stage": 0.0, "task stage": 0.0, "exec": 0.0, "copy-back": 0.0}
    for r in rows:
        name = {"exec": "exec", "copyback": "copy-back"}.get(r["kind"]) or (
            "machine stage" if r["task"] is None else "task stage")
        expected[name] += r["end"] - r["start"]
    for name, seconds in expected.items():
        assert phases[name]["seconds"] == pytest.approx(seconds, abs=1e-4)
    assert sum(p["share"] for p in phases.values()) == pytest.approx(1.0)
    assert phases["exec"]["nodes"] == sum(1 for r in rows if r["kind"] == "exec")


def test_each_machine_ran_each_jobs_machine_stage_once(run: Run) -> None:
    rows = timed_rows(run.trace)
    stages = run.data["machine_stages"]
    assert stages
    for m in stages:
        assert m["done"] == 1, m  # the first task of the job there copies; the others find it
        attempts = sum(1 for r in rows if r["machine"] == m["machine"] and r["job"] == m["job"]
                       and r["kind"] == "stage" and r["task"] is not None)
        assert m["done"] + m["cached"] + m["failed"] == attempts


def test_slowest_tasks_and_steps(run: Run) -> None:
    data = run.data
    slowest = data["slowest"]
    assert [t["seconds"] for t in slowest] == sorted((t["seconds"] for t in slowest),
                                                     reverse=True)
    work = [t for t in slowest if t["job"] == "work"]
    assert len(work) == 3 and all(t["seconds"] > 0.15 for t in work)
    assert {t["task"]: t["attempts"] for t in work} == {"s1": 1, "s2": 2, "s3": 1}
    steps = {(x["job"], x["step"]): x for x in data["steps"]}
    assert steps[("work", "first")]["runs"] == 4  # s2 ran it twice
    assert steps[("work", "second")]["failed"] == 1
    assert steps[("broken", "bad")]["failed"] == 1
    assert steps[("work", "first")]["mean"] > 0.15
    jobs = {j["job"]: j for j in data["jobs"]}
    assert (jobs["work"]["done"], jobs["work"]["retried"]) == (3, 1)
    assert (jobs["extra"]["done"], jobs["extra"]["skipped"]) == (1, 1)
    assert jobs["broken"]["failed"] == 1


def test_failures_are_listed_with_their_log(run: Run) -> None:
    fails = {(f["job"], f["task"], f["attempt"]): f for f in run.data["failures"]}
    assert set(fails) == {("work", "s2", 0), ("broken", "0", 0)}
    retried = fails[("work", "s2", 0)]
    assert (retried["final"], retried["outcome"], retried["step"]) == (False, "done", "second")
    # the failed attempt's log stays beside the retry's, and the report shows it
    logs = last_run(run.state) / "logs" / "work" / "second"
    assert retried["log"] == str((logs / "s2.log").resolve())
    assert "first attempt fails" in retried["tail"]
    assert "first attempt fails" not in (logs / "attempt2" / "s2.log").read_text()
    assert (logs / "attempt2" / "s2.log").read_text().startswith("$ ")
    final = fails[("broken", "0", 0)]
    assert final["final"] and final["step"] == "bad"
    assert final["log"] == str((last_run(run.state) / "logs" / "broken" / "bad" / "0.log")
                               .resolve())
    assert "the input was unreadable" in final["tail"]
    assert "the input was unreadable" in run.text
    assert "failed for good" in run.text


def _log_links(page: str) -> list[str]:
    return re.findall(r'log: <a href="([^"]+)">', page)


def test_log_links_are_relative_to_the_page_so_a_moved_state_folder_keeps_them(
        run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every link to a log, followed from the folder of the page, reaches that log: in the
    run's own folder, in another folder, and after the state folder moved with its report. A
    page written into a pipe or device, which has no folder, links absolutely."""
    from urllib.parse import unquote
    moved = tmp_path / "moved"
    shutil.copytree(run.state, moved)
    out = tmp_path / "elsewhere" / "r.html"
    for page in (write_report(last_run(run.state), None, run.plan), out,
                 write_report(last_run(moved), None, run.plan)):
        if page == out:
            assert opf_report(str(run.pipeline), "-o", str(out)) == 0
        links = _log_links(page.read_text(encoding="utf-8"))
        assert len(links) == 2, links  # the retried attempt's log and the final failure's
        for href in links:
            assert not href.startswith(("/", "file:")), href
            assert (page.parent / unquote(href)).is_file(), (page, href)
        if page.parent.is_relative_to(moved):
            assert all((page.parent / unquote(h)).resolve().is_relative_to(moved.resolve())
                       for h in links)
    if os.path.exists("/dev/stdout"):  # here a pipe
        proc = subprocess.run([sys.executable, "-m", "opals_dsl", "report", str(run.pipeline),
                               "-o", "/dev/stdout"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        links = _log_links(proc.stdout)
        assert len(links) == 2 and all(h.startswith("file:///") for h in links), links


def test_the_plan_is_drawn_at_job_level(run: Run) -> None:
    if shutil.which("dot") is None:
        assert "Graphviz" in run.text
        pytest.skip("Graphviz's dot is not installed")
    page = run.text
    plan = page[page.index("<h2>Plan</h2>"):]
    assert "<svg" in plan
    for label in ("job work (3 tasks)", "job total (1 task)", "merge", "second"):
        assert label in plan


def test_the_page_needs_nothing_from_outside(run: Run) -> None:
    page = run.text
    assert "<link" not in page
    assert not re.search(r"<script[^>]*\bsrc=", page)
    assert not re.search(r"<(img|iframe|image|use)\b", page)
    assert "@import" not in page and "url(" not in page
    logs = _log_links(page)
    for ref in re.findall(r'(?:href|src)="([^"]*)"', page):
        assert ref in logs and ":" not in ref, ref  # only the links to step logs, relative


# -- the command -----------------------------------------------------------------------------


def opf_report(*argv: str) -> int:
    """``opf report ARGV...`` as the command line runs it; its exit status."""
    return opf_main(["report", *argv])


def test_report_command_from_the_pipeline_file_and_from_the_state_folder(
        run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "from-file.html"
    assert opf_report(str(run.pipeline), "-o", str(out)) == 0
    assert str(out) in capsys.readouterr().out
    from_file = embedded_data(out.read_text(encoding="utf-8"))
    assert from_file["pipeline"] == "report_check"
    assert from_file["summary"] == run.data["summary"]

    out2 = tmp_path / "sub" / "from-state.html"
    assert opf_report(str(run.state), "-o", str(out2)) == 0
    page = out2.read_text(encoding="utf-8")
    assert embedded_data(page)["summary"] == run.data["summary"]
    assert "opf report FILE" in page  # no plan without the pipeline file: says how to get it

    moved = tmp_path / "elsewhere"
    shutil.copytree(run.state / "runs", moved / "runs")
    out3 = tmp_path / "state-option.html"
    assert opf_report(str(run.pipeline), "--state", str(moved), "-o", str(out3)) == 0
    assert embedded_data(out3.read_text(encoding="utf-8"))["summary"] == run.data["summary"]


def test_a_report_that_cannot_be_written_is_named_and_nothing_else_is_written(
        run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a-file").write_text("in the way")
    out = tmp_path / "a-file" / "r.html"
    assert opf_report(str(run.pipeline), "-o", str(out)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"opf: error: cannot write the report {out}: "), err
    assert err.rstrip().endswith("; it was not written"), err
    assert "opf-tmp" not in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
    if os.path.isdir("/proc/self"):  # a folder that is there but takes no files
        assert opf_report(str(run.pipeline), "-o", "/proc/opf-report.html") == 2
        err = capsys.readouterr().err
        assert err.startswith("opf: error: cannot write the report /proc/opf-report.html: ")
        assert "opf-tmp" not in err, err  # not the name of the temporary it could not create


def test_report_command_without_a_trace(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.html"
    assert opf_report(str(tmp_path), "-o", str(out)) == 2
    err = capsys.readouterr().err
    assert f"no run recorded in {tmp_path}" in err
    assert not out.exists()
    assert opf_report(str(tmp_path / "nothing-here"), "-o", str(out)) == 2
    assert "neither a pipeline file nor" in capsys.readouterr().err


def test_a_trace_cut_short_and_tasks_that_never_ran(tmp_path: Path) -> None:
    """A killed run's trace: the last line half-written; blocked and never-run tasks."""
    def row(node: str, kind: str, task: str | None, status: str, start: float | None,
            attempt: int = 0, engine: int | None = 0, nbytes: int = 0) -> str:
        step = node.rsplit("/", 1)[1] if node.startswith("exec:") else None
        return json.dumps({
            "node": node, "kind": kind, "job": "j", "task": task, "step": step,
            "engine": engine if start is not None else None,
            "machine": "h:/s" if start is not None else None, "start": start,
            "end": None if start is None else start + 1.0, "status": status,
            "bytes": nbytes, "attempt": attempt,
        })

    lines = [
        row("stage:j", "stage", None, "done", 100.0, nbytes=10),
        row("stage:j/a", "stage", "a", "done", 101.0, nbytes=5),
        row("exec:j/a/s", "exec", "a", "failed", 102.0),
        row("stage:j", "stage", None, "cached", 103.0, attempt=1, engine=1),
        row("stage:j/a", "stage", "a", "done", 104.0, attempt=1, engine=1, nbytes=5),
        row("exec:j/a/s", "exec", "a", "done", 105.0, attempt=1, engine=1, nbytes=3),
        row("copyback:j/a", "copyback", "a", "done", 106.0, attempt=1, engine=1, nbytes=3),
        row("stage:j/b", "stage", "b", "blocked", None),
        row("exec:j/b/s", "exec", "b", "blocked", None),
        row("copyback:j/b", "copyback", "b", "blocked", None),
        row("stage:j/c", "stage", "c", "not-run", None, attempt=1),
        '{"node":"stage:j/d","kind":"st',
    ]
    (tmp_path / "trace.jsonl").write_text("\n".join(lines), encoding="utf-8")
    out = write_report(tmp_path, tmp_path / "r.html")
    data = embedded_data(out.read_text(encoding="utf-8"))
    s = data["summary"]
    assert (s["tasks"], s["done"], s["blocked"], s["not_run"], s["failed"]) == (3, 1, 1, 1, 0)
    assert (s["retried"], s["retried_tasks"]) == (2, 2)  # a's retry, and c's that never ran
    assert (s["wall"], s["bytes_staged"], s["bytes_copied"]) == (7.0, 20, 3)
    assert data["unreadable"] == 1 and "1 unreadable trace line skipped" in out.read_text()
    assert len(data["timeline"]["bars"]) == 7
    assert [ln["engine"] for ln in data["timeline"]["lanes"]] == [0, 1]
    f = {name: i for i, name in enumerate(data["timeline"]["fields"])}
    exits = [b[f["exit"]] for b in data["timeline"]["bars"] if b[f["phase"]] == 2]
    assert exits == [None, 0]  # a failed step's status is not in this trace; a done one's is 0
    assert data["machine_stages"] == [
        {"machine": "h:/s", "job": "j", "done": 1, "cached": 1, "failed": 0}]
    assert [(x["task"], x["final"], x["outcome"]) for x in data["failures"]] == [
        ("a", False, "done")]


def test_time_an_engine_held_a_task_without_reporting_is_in_no_phase(tmp_path: Path) -> None:
    """A lost engine's row and an interrupted task's row span the time the engine held the
    task: that time is a bar on its lane, but in no phase and not a node that ran; the
    interrupted task is listed with the log of the step it had begun."""
    def row(node: str, kind: str, task: str, status: str, start: float | None,
            end: float | None = None, engine: int | None = 0) -> dict:
        return {"node": node, "kind": kind, "job": "j", "task": task,
                "step": node.rsplit("/", 1)[1] if kind == "exec" else None,
                "engine": engine, "machine": "h:/s" if engine is not None else None,
                "start": start, "end": end, "status": status, "bytes": 0, "attempt": 0}

    rows = [
        row("stage:j/a", "stage", "a", "done", 100.0, 101.0),
        row("exec:j/a/s", "exec", "a", "done", 101.0, 103.0),
        row("copyback:j/a", "copyback", "a", "done", 103.0, 104.0),
        row("stage:j/b", "stage", "b", "lost", 100.0, 110.0, engine=1),
        row("stage:j/b", "stage", "b", "interrupted", 111.0, 131.0, engine=2),
        row("exec:j/b/s", "exec", "b", "not-run", None, engine=None),
        row("copyback:j/b", "copyback", "b", "not-run", None, engine=None),
        # c was in the same batch as b: the engine held both for the same time, once
        row("stage:j/c", "stage", "c", "interrupted", 111.0, 131.0, engine=2),
        row("exec:j/c/s", "exec", "c", "not-run", None, engine=None),
        row("copyback:j/c", "copyback", "c", "not-run", None, engine=None),
    ]
    (tmp_path / "trace.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows),
                                          encoding="utf-8")
    log = tmp_path / "logs" / "j" / "s" / "b.log"
    log.parent.mkdir(parents=True)
    log.write_text("$ step s\nhalf way\n")
    out = write_report(tmp_path, tmp_path / "r.html")
    page = out.read_text(encoding="utf-8")
    data = embedded_data(page)
    assert sum(p["seconds"] for p in data["phases"]) == 4.0  # task a's three nodes only
    assert data["unreported"] == 30.0
    assert data["summary"]["nodes_run"] == 3 and data["summary"]["not_run"] == 2
    assert len(data["timeline"]["bars"]) == 6
    assert {ln["engine"]: ln["busy"] for ln in data["lanes"]} == {0: 4.0, 1: 10.0, 2: 20.0}
    assert [t["task"] for t in data["slowest"]] == ["a"]  # no span of its own for b or c
    held, _ = data["interrupted"]
    assert (held["task"], held["engine"], held["seconds"], held["step"]) == ("b", 2, 20.0, "s")
    assert held["log"] == str(log.resolve()) and held["tail"] == ["$ step s", "half way"]
    assert "30.0 s in tasks whose engine never reported back" in page
    assert "<h2>Interrupted" in page and "step s had begun" in page


def test_counts_of_one_are_said_in_the_singular(tmp_path: Path) -> None:
    """A run of one task on one engine: '1 task run', '1 engine on 1 machine' (it said
    '1 tasks run' and '1 engines')."""
    rows = [{"node": node, "kind": kind, "job": "j", "task": task, "step": step, "engine": 0,
             "machine": "h:/s", "start": 100.0 + k, "end": 101.0 + k, "status": "done",
             "bytes": 1, "attempt": 0}
            for k, (node, kind, task, step) in enumerate([
                ("stage:j", "stage", None, None), ("stage:j/a", "stage", "a", None),
                ("exec:j/a/s", "exec", "a", "s"), ("copyback:j/a", "copyback", "a", None)])]
    (tmp_path / "trace.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows),
                                          encoding="utf-8")
    page = write_report(tmp_path, tmp_path / "r.html").read_text(encoding="utf-8")
    assert '<div class="v">1</div><div class="l">task run</div>' in page
    assert '<div class="v">1</div><div class="l">engine on 1 machine</div>' in page
    assert "4 nodes ran on 1 engine<" in page
    assert not re.search(r"\b1 (engines|tasks|machines|nodes)\b", page)
    # a trace of one node: '1 node ran'
    (tmp_path / "trace.jsonl").write_text(json.dumps(rows[0]) + "\n", encoding="utf-8")
    page = write_report(tmp_path, tmp_path / "r.html").read_text(encoding="utf-8")
    assert "1 node ran on 1 engine<" in page


# -- in a real browser -----------------------------------------------------------------------


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        exe = shutil.which(name)
        if exe:
            return exe
    return None


CHROMIUM = _chromium()
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium binary on PATH (Debian: apt-get install chromium)")


def _flags(profile: Path) -> list[str]:
    return ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}"]


@needs_chromium
def test_the_page_runs_its_script_without_error_and_renders(run: Run, tmp_path: Path) -> None:
    assert CHROMIUM is not None
    url = run.html.resolve().as_uri()
    done = subprocess.run(
        [CHROMIUM, *_flags(tmp_path / "profile"), "--enable-logging=stderr", "--v=0",
         "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    assert "Uncaught" not in done.stderr, done.stderr[-2000:]
    assert not re.search(r"<html[^>]*data-opf-error", dom)
    ready = re.search(r'<html[^>]*data-opf-ready="(\d+)"', dom)
    assert ready, "the page's script did not finish"
    bars = len(run.data["timeline"]["bars"])
    assert int(ready.group(1)) == bars == len(timed_rows(run.trace))
    assert len(re.findall(r'<rect class="b p\d[^"]*" data-i="', dom)) == bars
    labels = re.findall(r'<div class="e" style="top:\d+px">engine (\d+)</div>', dom)
    assert sorted(labels) == sorted(str(ln["engine"]) for ln in run.data["timeline"]["lanes"])

    shot = tmp_path / "report.png"
    done = subprocess.run(
        [CHROMIUM, *_flags(tmp_path / "profile2"), f"--screenshot={shot}",
         "--window-size=1400,900", url],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    head = shot.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", head[16:24]) == (1400, 900)


class DevTools:
    """Chromium driven over ``--remote-debugging-pipe`` (the DevTools protocol on fds 3 and 4,
    JSON messages ended by a NUL byte): enough to load a page, move the mouse and read it."""

    def __init__(self, exe: str, profile: Path) -> None:
        def above(fd: int) -> int:
            new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
            os.close(fd)
            return new

        to_read, self._to = map(above, os.pipe())      # we write, the browser reads fd 3
        self._from, to_write = map(above, os.pipe())   # the browser writes fd 4

        def fds() -> None:
            os.dup2(to_read, 3)
            os.dup2(to_write, 4)

        self.proc = subprocess.Popen(
            [exe, *_flags(profile), "--remote-debugging-pipe", "--window-size=1400,900",
             "about:blank"],
            preexec_fn=fds, close_fds=False, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_read)
        os.close(to_write)
        self._buf = b""
        self._id = 0
        self.events: list[dict[str, Any]] = []
        page = next(t for t in self.call("Target.getTargets")["targetInfos"]
                    if t["type"] == "page")
        self.session = self.call("Target.attachToTarget",
                                 {"targetId": page["targetId"], "flatten": True})["sessionId"]

    def call(self, method: str, params: dict[str, Any] | None = None, *,
             page: bool = False, timeout: float = 30.0) -> dict[str, Any]:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if page:
            msg["sessionId"] = self.session
        os.write(self._to, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self._from], [], [], left)[0]:
                    raise TimeoutError(f"no answer to {method}")
                chunk = os.read(self._from, 1 << 16)
                if not chunk:
                    raise EOFError("the browser closed the pipe")
                self._buf += chunk
            raw, _, self._buf = self._buf.partition(b"\0")
            answer = json.loads(raw)
            if answer.get("id") == self._id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer["result"]
            self.events.append(answer)

    def eval(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                           page=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call("Browser.close", timeout=5)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to)
        os.close(self._from)


@needs_chromium
def test_hovering_a_bar_shows_its_node_and_outlines_its_task(run: Run, tmp_path: Path) -> None:
    assert CHROMIUM is not None
    browser = DevTools(CHROMIUM, Path(tempfile.mkdtemp(dir=tmp_path)))
    try:
        browser.call("Runtime.enable", page=True)
        browser.call("Page.navigate", {"url": run.html.resolve().as_uri()}, page=True)
        deadline = time.monotonic() + 30
        while True:
            ready, error = browser.eval(
                "[document.documentElement && document.documentElement.dataset.opfReady,"
                " document.documentElement && document.documentElement.dataset.opfError]")
            assert not error, error
            if ready:
                break
            assert time.monotonic() < deadline, "the page's script did not finish"
            time.sleep(0.05)
        errors = [e for e in browser.events if e.get("method") == "Runtime.exceptionThrown"]
        assert not errors, errors

        data = run.data["timeline"]
        f = {name: i for i, name in enumerate(data["fields"])}
        # the retried task's failed step, then the retry's same step
        picks = [i for i, b in enumerate(data["bars"]) if b[f["node"]] == "exec:work/s2/second"]
        assert len(picks) == 2
        own = sum(1 for b in data["bars"]
                  if b[f["phase"]] != 0 and data["tasks"][b[f["task"]]] == "work/s2")
        for i, (status, attempt) in zip(picks, (("failed", 1), ("done", 2)), strict=True):
            x, y = browser.eval(
                f"(() => {{ const r = document.querySelector('rect.b[data-i=\"{i}\"]')"
                f".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }})()"
            )
            browser.call("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y},
                         page=True)
            hidden, tip = browser.eval(
                "[document.getElementById('tip').hidden, document.getElementById('tip').innerText]"
            )
            assert not hidden
            assert "exec:work/s2/second" in tip and "work/s2" in tip and "second" in tip
            assert status in tip
            assert ("a retry" in tip) == (attempt > 1)
            assert ("exit status 0" in tip) == (status == "done")
            bar = data["bars"][i]
            engine = data["lanes"][bar[f["lane"]]]["engine"]
            assert f"{engine} on {data['lanes'][bar[f['lane']]]['machine']}" in tip
            assert browser.eval("document.querySelectorAll('rect.b.hl').length") == own
        browser.call("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": 5, "y": 5},
                     page=True)
        assert browser.eval("document.getElementById('tip').hidden") is True
        assert browser.eval("document.querySelectorAll('rect.b.hl').length") == 0

        # zooming in widens the drawing; "fit" brings it back
        width = browser.eval("document.querySelector('#tl-scroll svg').getAttribute('width')")
        browser.eval("document.querySelector('.zoom button[data-z=\"2\"]').click()")
        wider = browser.eval("document.querySelector('#tl-scroll svg').getAttribute('width')")
        assert int(wider) > int(width)
        browser.eval("document.querySelector('.zoom button[data-z=\"0\"]').click()")
        assert browser.eval(
            "document.querySelector('#tl-scroll svg').getAttribute('width')") == width
        png = base64.b64decode(browser.call("Page.captureScreenshot", {"format": "png"},
                                            page=True)["data"])
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        browser.close()


def test_reasons_are_counted_by_what_made_a_task_run_not_the_step_it_ran_from() -> None:
    """The report's kinds of reasons leave out the step a task ran again from and the name of
    an upstream task: a param change counts as one, whichever step the tasks started at."""
    from opals_dsl.report.analyse import _why_kinds

    kinds = _why_kinds({
        "dem/a": "from step grid: param cell changed",
        "dem/b": "from step grid: output missing: results/grid/b.tif",
        "dem/c": "from step import: param cell changed",
        "dem/d": "new",
        "mosaic/0": "upstream dem/a re-runs",
    })
    assert [(k["why"], k["tasks"], k["example"]) for k in kinds] == [
        ("param cell changed", 2, "dem/a"), ("new", 1, "dem/d"),
        ("output missing", 1, "dem/b"), ("upstream re-runs", 1, "mosaic/0")]
