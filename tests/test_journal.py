"""Tests of opals_dsl.runtime.journal: what a second run skips and why, the journal file,
``--dry-run``, ``--force``, ``--checksum`` and ``opf compile --dot --status``.

Runs go through :func:`opals_dsl.runtime.runtime.run_plan` with the in-process executor (real files,
real step processes) where the policy is tested, and through ``opf`` as a subprocess on the
session cluster (tests/conftest.py) where the command line is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import files_under, trace_rows, write_pipeline
from hypothesis import given, settings
from hypothesis import strategies as st

from opals_dsl.api import compile_file
from opals_dsl.runtime import resume, session
from opals_dsl.runtime.events import RunListener
from opals_dsl.runtime.executor import LocalExecutor
from opals_dsl.runtime.journal import Journal, journal_path
from opals_dsl.runtime.records import ENCODE, Written, record_line, time_of
from opals_dsl.runtime.request import build_request
from opals_dsl.runtime.resume import Resume
from opals_dsl.runtime.scheduler import Scheduler

CHAIN = """
pipeline chain
param greeting = "hello"
param results = "results"

job up for s in "data/*.txt" {
    shared tool = "tool.py"
    output "{results}/up" flat
    step copy {
        out a = "{s.stem}.a"
        run python {tool} copy {s} {a}
    }
}

job down for x in up.copy.a {
    shared tool = "tool.py"
    output "{results}/down" flat
    step copy {
        out b = "{x.stem}.b"
        run python {tool} copy {x} {b}
    }
}

job all {
    shared tool = "tool.py"
    output "{results}/all" flat
    step merge {
        out m = "all.txt"
        run python {tool} merge {m} {down.copy.b}
    }
}

job hello {
    output "{results}/hello" flat
    step say {
        out h = "hello.txt"
        call greet:say(word = greeting, out = h)
    }
}
"""

GREET = """
def say(word, out):
    with open(out, "w") as f:
        f.write(word + "\\n")
"""

ALL_TASKS = ["up/s1", "up/s2", "up/s3", "down/s1", "down/s2", "down/s3", "all/0", "hello/0"]


def project(tmp_path: Path) -> Path:
    path = write_pipeline(tmp_path / "p", CHAIN, inputs=3)
    (path.parent / "greet.py").write_text(GREET)
    return path


def run(path: Path, state: Path, scratch: Path, *, params=None, force=False, checksum=False,
        **kwargs):
    plan = compile_file(path, params)
    return session.run(plan, executor=LocalExecutor([str(scratch)]), state_dir=state,
                       force=force, checksum=checksum, **kwargs)


def decisions(path: Path, state: Path, *, params=None, force=False,
              checksum=False) -> dict[str, str]:
    plan = compile_file(path, params)
    found = Resume(Journal.read(state, plan, checksum=checksum)).decide(force)
    return {d.task.name: (d.reason if d.run else "skip") for d in found}


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in files_under(folder)}


def later(path: Path, text: str) -> None:
    """Rewrite ``path`` with a modification time surely different from before."""
    before = path.stat().st_mtime_ns
    path.write_text(text)
    os.utime(path, ns=(before + 2_000_000_000, before + 2_000_000_000))


def opf(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "opals_dsl", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


# -- what is skipped, and why --------------------------------------------------------------------


def test_a_second_run_skips_all_and_a_change_reruns_only_what_depends_on_it(tmp_path):
    path = project(tmp_path)
    state, scratch = tmp_path / "state", tmp_path / "m"
    first = run(path, state, scratch)
    assert (first.done, first.skipped) == (8, 0)
    results = path.parent / "results"
    before = snapshot(results)

    second = run(path, state, scratch)
    assert (second.done, second.skipped, second.exit_code) == (0, 8, 0)
    assert snapshot(results) == before  # nothing was rewritten
    rows = trace_rows(state)
    assert {r["status"] for r in rows if r["task"]} == {"skipped"}

    later(path.parent / "data" / "s2.txt", "strip 2, measured again\n")
    assert decisions(path, state) == {
        "up/s1": "skip", "up/s2": "input changed: data/s2.txt", "up/s3": "skip",
        "down/s1": "skip", "down/s2": "upstream up/s2 re-runs", "down/s3": "skip",
        "all/0": "upstream down/s2 re-runs", "hello/0": "skip",
    }
    third = run(path, state, scratch)
    assert (third.done, third.skipped) == (3, 5)
    after = snapshot(results)
    changed = {name for name in after if after[name] != before[name]}
    assert changed == {"up/s2.a", "down/s2.b", "all/all.txt"}
    assert after["down/s2.b"][0] == b"copied:copied:strip 2, measured again\n"
    assert set(decisions(path, state).values()) == {"skip"}


def test_every_reason_to_run_again(tmp_path):
    path = project(tmp_path)
    state, scratch = tmp_path / "state", tmp_path / "m"
    run(path, state, scratch)
    results = path.parent / "results"

    # a command that changed: a parameter substituted into a call's arguments, named as such
    got = decisions(path, state, params={"greeting": "servus"})
    assert got["hello/0"] == "param greeting changed"
    assert {k for k, v in got.items() if v != "skip"} == {"hello/0"}

    # a destination deleted, or changed by hand
    (results / "down" / "s1.b").unlink()
    (results / "up" / "s3.a").write_text("edited by hand")
    got = decisions(path, state)
    assert got["down/s1"] == "output missing: results/down/s1.b"
    assert got["up/s3"] == "output changed: results/up/s3.a"
    assert got["down/s3"] == "upstream up/s3 re-runs"
    assert got["all/0"] in ("upstream down/s1 re-runs", "upstream down/s3 re-runs")

    # a shared file changed: every task of the jobs that use it
    run(path, state, scratch)
    later(path.parent / "tool.py", (path.parent / "tool.py").read_text() + "\n# v2\n")
    got = decisions(path, state)
    assert got["up/s1"] == "input changed: tool.py"
    assert got["hello/0"] == "skip"

    # a new input file makes a new task, and changes the gather's command
    run(path, state, scratch)
    (path.parent / "data" / "s4.txt").write_text("strip 4\n")
    got = decisions(path, state)
    assert got["up/s4"] == "new"
    assert got["down/s4"] == "new"  # never run: that it has no record says most
    assert got["all/0"] == "upstream down/s4 re-runs"
    assert got["up/s1"] == "skip"

    # --force: everything
    assert set(decisions(path, state, force=True).values()) == {"forced"}


class EditsSharedFile(RunListener):
    """Rewrites a shared file on the shared drive as soon as the run's first task is done."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def task_done(self, task, result, engine) -> None:
        if "edited" not in self.path.read_text():
            later(self.path, self.path.read_text() + "\n# edited during the run\n")


SAY = """
param greeting = "hello"

job up for s in "data/*.txt" {
    output "results/up" flat
    step say {
        out a = "{s.stem}.a"
        call greet:say(word = greeting, out = a)
    }
}
"""


@pytest.mark.parametrize("edited", ["tool.py", "greet.py"])
def test_a_shared_file_edited_during_a_run_fails_the_tasks_after_and_the_next_run_redoes_all(
        tmp_path, edited):
    """Invariant: one run uses one version of each shared file and ``call`` module; a task that
    would see another fails naming it, and the next run runs again what used the earlier one."""
    text = CHAIN.split("job down")[0] if edited == "tool.py" else SAY
    path = write_pipeline(tmp_path / "p", text, inputs=3)
    (path.parent / "greet.py").write_text(GREET)
    state, scratch = tmp_path / "state", tmp_path / "m"
    file = path.parent / edited
    summary = run(path, state, scratch, keep_going=True, listener=EditsSharedFile(file),
                  depth=1, max_batch=1)
    assert (summary.done, summary.failed) == (1, 2)
    what = "shared file" if edited == "tool.py" else "the module file"
    for failure in summary.failures:
        assert failure.node == (f"stage:{failure.job}" if edited == "tool.py"
                                else f"exec:{failure.job}/{failure.task}/say")
        assert f"{what} {file} changed after the run started (then " in failure.message
        assert "the run's tasks use the version it had at the start" in failure.message
    assert sorted(p.name for p in (path.parent / "results" / "up").iterdir()) == ["s1.a"]
    # the next run runs every task: the one done used the version before the edit
    got = decisions(path, state)
    assert got == {"up/s1": f"input changed: {edited}", "up/s2": "failed in the last run",
                   "up/s3": "failed in the last run"}
    summary = run(path, state, scratch)
    assert (summary.done, summary.failed) == (3, 0)


def test_a_record_per_task_and_destination_set_so_switching_back_and_forth_skips(tmp_path):
    """Invariant: a run into other destinations (``--param results=...``) keeps the records of
    the first ones, so going back to them skips every task whose outputs there are as
    recorded, and going to the others again skips as well."""
    path = project(tmp_path)
    state, scratch = tmp_path / "state", tmp_path / "m"
    assert run(path, state, scratch).done == 8
    other = {"results": "results_05", "greeting": "servus"}
    assert run(path, state, scratch, params=other).done == 8
    assert set(decisions(path, state).values()) == {"skip"}
    back = run(path, state, scratch)
    assert (back.done, back.skipped) == (0, 8)
    assert set(decisions(path, state, params=other).values()) == {"skip"}
    assert run(path, state, scratch, params=other).skipped == 8
    # each set is judged by its own files: a change in results/ reruns there only
    later(path.parent / "results" / "up" / "s1.a", "edited by hand")
    assert decisions(path, state)["up/s1"] == "output changed: results/up/s1.a"
    assert set(decisions(path, state, params=other).values()) == {"skip"}
    # a compacted journal keeps every set
    Journal.open(state, compile_file(path))._rewrite()
    assert set(decisions(path, state, params=other).values()) == {"skip"}
    assert decisions(path, state)["up/s1"] == "output changed: results/up/s1.a"


def test_a_changed_command_word_is_named(tmp_path):
    path = project(tmp_path)
    state = tmp_path / "state"
    run(path, state, tmp_path / "m")
    text = path.read_text()
    path.write_text(text.replace("merge {m} {down.copy.b}", "merge {m} {down.copy.b} {m}"))
    assert decisions(path, state)["all/0"] == "command of step merge changed: gained 'all.txt'"
    path.write_text(text.replace("merge {m} {down.copy.b}", "merge {down.copy.b}"))
    assert decisions(path, state)["all/0"] == "command of step merge changed: lost 'all.txt'"
    path.write_text(text.replace("copy {x} {b}", "copy {b} {x}"))
    assert decisions(path, state)["down/s1"] == ("command of step copy changed: the same words "
                                                 "in another order: 's1.a' → 's1.b' first")
    path.write_text(text.replace("merge {m} {down.copy.b}", "merge {down.copy.b} {m} {m}"))
    assert decisions(path, state)["all/0"] == "command of step merge changed: gained 'all.txt'"
    path.write_text(text.replace("step merge", "step gather"))
    assert decisions(path, state)["all/0"] == "steps changed (merge → gather)"


def test_files_a_task_gains_or_loses_are_named_not_the_words_they_shift(tmp_path):
    """A task whose command changed because it reads other files (a tile that got a new file)
    is said to have a new input, or one it no longer reads, by path."""
    folder = tmp_path / "p"
    (folder / "data").mkdir(parents=True)
    for name in ("a", "b", "c"):
        (folder / "data" / f"{name}.txt").write_text(name)
    path = folder / "pipeline.opf"
    text = ('pipeline gather\njob all for x in ["one"] {\n    step cat {\n'
            '        out o = "o.txt"\n        in "data/a.txt"\n        in "data/b.txt"\n'
            '        run sh "cat a.txt b.txt > {o}"\n    }\n}\n')
    path.write_text(text)
    state = tmp_path / "state"
    assert run(path, state, tmp_path / "m").done == 1
    path.write_text(text.replace('in "data/b.txt"\n', 'in "data/b.txt"\n        in "data/c.txt"\n')
                    .replace("b.txt >", "b.txt c.txt >"))
    assert decisions(path, state)["all/one"] == "new input: data/c.txt"
    path.write_text(text.replace('        in "data/a.txt"\n', "").replace("a.txt b.txt", "b.txt"))
    assert decisions(path, state)["all/one"] == "input no longer read: data/a.txt"


@given(st.text(max_size=80), st.text(max_size=80), st.text(min_size=1, max_size=5))
def test_a_changed_word_is_shown_where_it_changed(start, rest, extra):
    """Invariant: two different words of a command are never shown alike, however long the
    part they have in common (each is shortened to 40 characters)."""
    was, now = start + rest, start + extra + rest
    a, b = resume._apart(was, now)
    assert a != b


def test_a_task_that_failed_runs_again(tmp_path):
    path = project(tmp_path)
    state, scratch = tmp_path / "state", tmp_path / "m"
    run(path, state, scratch)
    # the Python file of a call counts as an input of the task
    later(path.parent / "greet.py", "raise ImportError('broken for now')\n")
    assert decisions(path, state)["hello/0"] == "input changed: greet.py"
    summary = run(path, state, scratch, keep_going=True)
    assert (summary.done, summary.failed, summary.skipped) == (0, 1, 7)
    assert decisions(path, state)["hello/0"] == "failed in the last run"
    later(path.parent / "greet.py", GREET)
    summary = run(path, state, scratch, params={"greeting": "servus"})
    assert (summary.done, summary.failed, summary.skipped) == (1, 0, 7)
    assert (path.parent / "results" / "hello" / "hello.txt").read_text() == "servus\n"
    assert set(decisions(path, state, params={"greeting": "servus"}).values()) == {"skip"}


def test_an_upstream_task_that_ran_again_after_its_dependent_reruns_the_dependent(tmp_path):
    text = CHAIN.replace("run python {tool} copy {s} {a}",
                         "run python {tool} failon s3 4 {s} {a}")
    path = write_pipeline(tmp_path / "p", text, inputs=2)
    (path.parent / "greet.py").write_text(GREET)
    state, scratch = tmp_path / "state", tmp_path / "m"
    assert run(path, state, scratch).exit_code == 0
    # s1 changes, and a new s3 fails: the run stops after up/s1 ran, before down/s1
    later(path.parent / "data" / "s1.txt", "strip 1 again\n")
    (path.parent / "data" / "s3.txt").write_text("strip 3\n")
    summary = run(path, state, scratch, depth=1, max_batch=1)
    assert summary.failed == 1 and summary.not_run >= 1
    (path.parent / "data" / "s3.txt").unlink()
    got = decisions(path, state)
    assert got["up/s1"] == "skip"
    assert got["down/s1"] == "upstream up/s1 ran again since"
    assert got["all/0"] == "upstream down/s1 re-runs"
    summary = run(path, state, scratch)
    assert summary.exit_code == 0
    assert (path.parent / "results" / "down" / "s1.b").read_text() == (
        "copied:copied:strip 1 again\n")


def test_checksum_tells_a_touched_file_from_a_changed_one(tmp_path):
    path = project(tmp_path)
    state, scratch = tmp_path / "state", tmp_path / "m"
    run(path, state, scratch, checksum=True)
    record = json.loads(Journal.read(state, compile_file(path)).records["up/s1"])
    entry = record["in"]["data/s1.txt"]
    assert len(entry) == 3 and len(entry[2]) == 64  # size, time, SHA-256
    assert len(record["in"]["tool.py"]) == 3

    s1 = path.parent / "data" / "s1.txt"
    st = s1.stat()
    os.utime(s1, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # touched, not changed
    assert decisions(path, state)["up/s1"] == "input changed: data/s1.txt"
    assert decisions(path, state, checksum=True)["up/s1"] == "skip"
    summary = run(path, state, scratch, checksum=True)
    assert (summary.done, summary.skipped) == (0, 8)
    # the record now holds the new time: without --checksum the task is unchanged as well
    assert decisions(path, state)["up/s1"] == "skip"

    later(s1, "strip 9\n")  # same size, other content
    assert len("strip 9\n") == st.st_size
    assert decisions(path, state, checksum=True)["up/s1"] == "input changed: data/s1.txt"


def test_checksum_after_a_run_without_it_says_why_a_touched_file_counts_as_changed(tmp_path):
    path = project(tmp_path)
    state, scratch = tmp_path / "state", tmp_path / "m"
    run(path, state, scratch)  # no hashes recorded
    s1 = path.parent / "data" / "s1.txt"
    st = s1.stat()
    os.utime(s1, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # touched, not changed
    assert decisions(path, state, checksum=True)["up/s1"] == (
        "input changed: data/s1.txt (its time; the run that recorded it ran without "
        "--checksum, so there is no content hash to compare)")
    assert decisions(path, state)["up/s1"] == "input changed: data/s1.txt"


# -- the file ---------------------------------------------------------------------------------


def test_journal_lines_compaction_and_a_torn_last_line(tmp_path):
    path = project(tmp_path)
    state, scratch = tmp_path / "state", tmp_path / "m"
    run(path, state, scratch)
    file = journal_path(state, "chain")
    assert file == state / "journal" / "chain.jsonl"
    lines = file.read_text().splitlines()
    assert json.loads(lines[0]) == {"opf-journal": 1, "pipeline": "chain"}
    records = [json.loads(line) for line in lines[1:]]
    assert sorted(r["task"] for r in records) == sorted(ALL_TASKS)
    up1 = next(r for r in records if r["task"] == "up/s1")
    assert set(up1) == {"task", "sig", "dests", "cmd", "base", "steps", "params", "in", "up",
                        "out", "time"}
    assert up1["steps"] == [["copy", ["python", "../tool.py", "copy", "s1.txt", "s1.a"]]]
    dest = path.parent / "results" / "up" / "s1.a"
    assert up1["out"] == {"results/up/s1.a": [dest.stat().st_size, dest.stat().st_mtime_ns]}
    assert set(up1["in"]) == {"data/s1.txt", "tool.py"}
    down1 = next(r for r in records if r["task"] == "down/s1")
    assert down1["up"] == {"up/s1": up1["sig"]}  # the published input counts by its record
    assert set(down1["in"]) == {"tool.py"}
    hello = next(r for r in records if r["task"] == "hello/0")
    assert hello["steps"] == [["say", {"function": "greet:say",
                                       "kwargs": {"word": "hello", "out": "hello.txt"}}]]

    for _ in range(2):
        run(path, state, scratch, force=True)
    assert len(file.read_text().splitlines()) == 1 + 3 * 8
    # a run killed while writing leaves a cut line behind
    with open(file, "a") as f:
        f.write(file.read_text().splitlines()[-1][:50])
    journal = Journal.read(state, compile_file(path))
    assert journal.bad_lines == 1 and len(journal.records) == 8
    assert set(decisions(path, state).values()) == {"skip"}
    summary = run(path, state, scratch)  # compacts on opening
    assert summary.skipped == 8
    lines = file.read_text().splitlines()
    assert len(lines) == 1 + 8
    assert all(json.loads(line) for line in lines)

    # a garbled record counts as none: its task runs again, the others are skipped
    garbled = [line if '"task":"up/s2"' not in line else line.replace('"cmd"', '"cmd', 1)
               for line in lines]
    file.write_text("\n".join(garbled) + "\n")
    got = decisions(path, state)
    assert got["up/s2"] == "new" and got["up/s1"] == "skip"


def test_a_record_is_written_only_for_outputs_in_place(tmp_path):
    path = project(tmp_path)
    state, scratch = tmp_path / "state", tmp_path / "m"
    results = path.parent / "results"
    results.mkdir()
    (results / "down").write_text("a file where the folder belongs")
    summary = run(path, state, scratch, keep_going=True)
    assert summary.failed == 3 and summary.blocked == 1
    journal = Journal.read(state, compile_file(path))
    for name in ("down/s1", "down/s2", "down/s3"):
        assert json.loads(journal.records[name])["failed"] is True
    assert "failed" not in json.loads(journal.records["up/s1"])
    assert "all/0" not in journal.records
    # all/0 needs every down task: each of the three failures names it
    assert summary.blocked_by == {f"down/s{i}": ["all/0"] for i in (1, 2, 3)}
    (results / "down").unlink()
    got = decisions(path, state)
    assert got["down/s1"] == "failed in the last run"
    assert got["all/0"] == "new"  # it has never run
    assert got["up/s1"] == "skip"


# -- on the command line --------------------------------------------------------------------


def test_cli_dry_run_force_and_dot_status(cluster, tmp_path):
    path = project(tmp_path)
    folder = path.parent
    proc = opf("run", str(path), "--dry-run", "-n", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["run", "up/s1", "new"]
    assert lines[-1] == "chain: 8 of 8 tasks would run, 0 unchanged"
    assert not (folder / ".opf").exists()  # nothing ran, nothing was started or written
    assert not (folder / "results").exists()

    proc = opf("run", str(path), "--cluster-file", str(cluster.client_file), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    later(folder / "data" / "s3.txt", "strip 3 v2\n")
    proc = opf("run", str(path), "--dry-run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    table = {line.split()[1]: line for line in proc.stdout.splitlines()[:-1]}
    assert table["up/s3"].split(None, 2) == ["run", "up/s3", "input changed: data/s3.txt"]
    assert table["down/s3"].split(None, 2) == ["run", "down/s3", "upstream up/s3 re-runs"]
    assert table["up/s1"].split() == ["skip", "up/s1", "unchanged"]
    assert proc.stdout.splitlines()[-1] == "chain: 3 of 8 tasks would run, 5 unchanged"
    quiet = opf("run", str(path), "--dry-run", "-q", "--force", cwd=tmp_path)
    assert quiet.stdout == "chain: 8 of 8 tasks would run, 0 unchanged\n"

    dot = opf("compile", str(path), "--dot", "--status", cwd=tmp_path)
    assert dot.returncode == 0, dot.stderr
    node_lines = {line.split('"')[1]: line for line in dot.stdout.splitlines()
                  if line.startswith('    "')}
    assert 'fillcolor="#fff2cc"' in node_lines["stage:up/s3"]  # runs
    assert 'fillcolor="#fff2cc"' in node_lines["copyback:all/0"]
    assert 'fillcolor="#dddddd"' in node_lines["exec:up/s1/copy"]  # unchanged
    assert 'fillcolor="#cfe2f3"' in node_lines["stage:up"]  # machine stages keep their colour
    bad = opf("compile", str(path), "--status", cwd=tmp_path)
    assert bad.returncode == 2 and "--status" in bad.stderr

    # the run does what the dry run said, and says so
    proc = opf("run", str(path), "--cluster-file", str(cluster.client_file), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "chain: 5 of 8 tasks unchanged since the last run; 3 to run" in proc.stderr
    assert "skipped up/s1 (unchanged)" in proc.stderr
    assert "done up/s3 on engine" in proc.stderr
    assert "\n  skipped      5\n" in proc.stdout
    assert (folder / "results" / "all" / "all.txt").read_text().splitlines()[-1] == (
        "copied:copied:strip 3 v2")


def test_cli_nothing_to_run_starts_no_cluster(cluster, tmp_path):
    path = project(tmp_path)
    folder = path.parent
    proc = opf("run", str(path), "--cluster-file", str(cluster.client_file), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    before = snapshot(folder / "results")
    proc = opf("run", str(path), "-n", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "chain: all 8 tasks unchanged since the last run; nothing to run" in proc.stderr
    assert "engines" not in proc.stderr  # no cluster was started
    assert "chain: all tasks unchanged, none run" in proc.stdout
    assert not (folder / ".opf" / "cluster.json").exists()
    assert snapshot(folder / "results") == before
    rows = trace_rows(folder / ".opf")
    assert rows and {r["status"] for r in rows} == {"skipped"}
    assert all(r["start"] is None for r in rows)

    proc = opf("run", str(path), "--cluster-file", str(cluster.client_file), "--force",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "  run          8" in proc.stdout
    after = snapshot(folder / "results")
    assert {k: v[0] for k, v in after.items()} == {k: v[0] for k, v in before.items()}
    assert all(after[k][1] != before[k][1] for k in before)  # rewritten, the same bytes


# -- receipts: results that landed while nobody listened -----------------------------------------


def test_a_result_that_landed_unrecorded_is_recognised_by_its_receipt(tmp_path):
    """An engine that lands a task's results leaves a receipt; when the driver never heard
    of it (killed), the next run takes the receipt for the record: the task is unchanged, its
    downstream tasks run because their upstream ran again, and a result changed since the
    landing is still seen as changed. A receipt older than the task's record is ignored."""
    from opals_dsl.runtime.engine import run_tasks
    path = project(tmp_path)
    state, scratch = tmp_path / "state", tmp_path / "m"
    run(path, state, scratch)
    plan = compile_file(path)
    receipts = journal_path(state, "chain").with_suffix(".receipts")
    assert not receipts.exists() or not list(receipts.iterdir())  # a clean run leaves none

    journal = Journal.read(state, plan)  # the killed run's view: it sent up/s1, then died
    ref = next(t for t in journal.tasks if t.name == "up/s1")
    request = build_request(plan, ref, 0, scratch=str(scratch), logs=state / "logs",
                            receipt=journal.stamp(ref))
    assert run_tasks([request])[0]["ok"]
    assert len(list(receipts.iterdir())) == 1
    receipt = next(receipts.iterdir()).read_text()

    got = decisions(path, state)
    assert got["up/s1"] == "skip"  # not "output changed: results/up/s1.a"
    assert got["down/s1"] == "upstream up/s1 ran again since"
    assert {k for k, v in got.items() if v != "skip"} == {"down/s1", "all/0"}

    # the next run writes the receipt into the journal and removes it
    third = run(path, state, scratch)
    assert (third.done, third.skipped) == (2, 6)
    assert not list(receipts.iterdir())
    assert set(decisions(path, state).values()) == {"skip"}

    # an old receipt (sent before the task's last record) says nothing
    (receipts / "old.jsonl").write_text(receipt)
    assert set(decisions(path, state).values()) == {"skip"}

    # a receipt does not hide a change made after the landing
    (receipts / "old.jsonl").unlink()
    journal = Journal.read(state, plan)
    request = build_request(plan, ref, 0, scratch=str(scratch), logs=state / "logs",
                            receipt=journal.stamp(ref))
    assert run_tasks([request])[0]["ok"]
    later(path.parent / "results" / "up" / "s1.a", "edited by hand")
    assert decisions(path, state)["up/s1"] == "output changed: results/up/s1.a"


def test_a_run_takes_in_its_own_receipts_of_results_it_never_received(tmp_path):
    """An engine that finished after the run stopped listening (an interrupt, an engine taken
    for lost) left a receipt in the run's own file: closing the journal records it."""
    from opals_dsl.runtime.engine import run_tasks
    path = project(tmp_path)
    state, scratch = tmp_path / "state", tmp_path / "m"
    run(path, state, scratch)
    plan = compile_file(path)
    receipts = journal_path(state, "chain").with_suffix(".receipts")
    with Journal.open(state, plan) as journal:
        ref = next(t for t in journal.tasks if t.name == "up/s2")
        request = build_request(plan, ref, 0, scratch=str(scratch), logs=state / "logs",
                                receipt=journal.stamp(ref))
        assert run_tasks([request])[0]["ok"]  # its result never reaches this run
    assert not list(receipts.iterdir())
    got = decisions(path, state)
    assert got["up/s2"] == "skip"
    assert got["down/s2"] == "upstream up/s2 ran again since"


def test_a_task_held_at_an_interrupt_is_named_so_until_its_late_result_lands(tmp_path):
    """A task an engine held when the run was interrupted is recorded as interrupted, not
    left as new; if the engine lands its result after all, its receipt wins over that record
    (which has no time), so the task is unchanged, as any result that landed unheard."""
    from opals_dsl.runtime.engine import run_tasks
    from opals_dsl.runtime.events import RunSummary
    path = project(tmp_path)
    state, scratch = tmp_path / "state", tmp_path / "m"
    plan = compile_file(path)
    with Journal.open(state, plan) as journal:
        ref = next(t for t in journal.tasks if t.name == "up/s2")
        request = build_request(plan, ref, 0, scratch=str(scratch), logs=state / "logs",
                                receipt=journal.stamp(ref))
        journal.run_finished(RunSummary(interrupted=True, stopped_tasks=[ref.order]))
    got = decisions(path, state)
    assert got["up/s2"] == "interrupted in the last run"
    assert got["up/s1"] == "new"
    assert run_tasks([request])[0]["ok"]  # the engine went on and landed it
    got = decisions(path, state)
    assert got["up/s2"] == "skip"
    assert got["down/s2"] == "new"


def test_a_run_holds_only_the_sig_and_time_of_the_records_it_writes(tmp_path):
    """Invariant: once a run recorded a task, the journal holds no record line of it in memory
    (a run of a million tasks would hold hundreds of megabytes), yet every question about the
    task's record — its sig, for the stamps of the tasks downstream — gets the file's answer."""
    path = project(tmp_path)
    state, scratch = tmp_path / "state", tmp_path / "m"
    run(path, state, scratch)
    later(path.parent / "data" / "s1.txt", "strip 1 v2")  # up/s1, down/s1, all/0 run again
    plan = compile_file(path)
    with Journal.open(state, plan) as journal:
        resume = Resume(journal)
        resume.settle()
        summary = Scheduler(plan, LocalExecutor([str(scratch)]), state_dir=state,
                            listener=journal, skip=resume.skip, start=resume.start_of,
                            stamp=journal.stamp).run()
        assert (summary.done, summary.skipped) == (3, 5)
        ran = {"up/s1", "down/s1", "all/0"}
        assert not ran & set(journal.records)
        last = {}
        for line in journal_path(state, "chain").read_text().splitlines()[1:]:
            record = json.loads(line)
            last[record["task"]] = record
        for name in ALL_TASKS:
            assert journal.sig_of(name) == last[name]["sig"]
        # the record of down/s1 names the sig up/s1 got in this run
        assert last["down/s1"]["up"] == {"up/s1": last["up/s1"]["sig"]}
    assert set(decisions(path, state).values()) == {"skip"}


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["time", "x", "}", ',"time":']) | st.text(), inner, max_size=3),
    max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(fields=st.dictionaries(st.sampled_from(["cmd", "params", "out", "x"]), _JSON, max_size=4),
       when=st.none() | st.floats(min_value=0, max_value=4e9) | st.integers(0, 4 * 10**9),
       name=st.text(min_size=1), sig=st.integers(0, 2**64 - 1))
def test_written_gives_back_the_sig_and_time_a_parse_of_the_record_gives(fields, when, name,
                                                                         sig):
    """Invariant: for any record line, what :class:`Written` keeps of it (sig, ``time``) is
    what parsing the whole line gives — whatever its other fields hold (a parameter named
    ``time``, braces in strings), and 0 for a record without a time."""
    body = dict(fields)
    if when is not None:
        body["time"] = when
    line = record_line(name, f"{sig:016x}", ENCODE(body), "0123456789abcdef")
    written = Written(3)
    assert written.note(2, line) and 2 in written and 1 not in written
    assert written.sig(2) == json.loads(line)["sig"]
    assert written.time(2) == float(json.loads(line).get("time") or 0)
    assert time_of(line) == written.time(2)


def test_a_record_with_wrong_field_types_is_skipped_with_a_warning(tmp_path, capsys):
    """A damaged record (the journal edited by hand, or damaged on its disk) is skipped: its
    task runs again, a warning says so, and nothing raises."""
    path = project(tmp_path)
    state, scratch = tmp_path / "state", tmp_path / "m"
    run(path, state, scratch)
    file = journal_path(state, "chain")
    damage = {
        "up/s1": ("in", []),
        "up/s2": ("steps", 5),
        "up/s3": ("steps", [[["copy"], 1]]),
        "down/s1": ("out", 3),
        "down/s2": ("up", "x"),
        "hello/0": ("cmd", None),
    }
    lines = file.read_text().splitlines()
    edited = [lines[0]]
    for line in lines[1:]:
        record = json.loads(line)
        if record["task"] in damage:
            key, value = damage[record["task"]]
            record[key] = value
        elif record["task"] == "all/0":  # valid JSON, nested beyond what the parser follows
            line = line[:-1] + ',"deep":' + "[" * 100_000 + "]" * 100_000 + "}"
        edited.append(line if record["task"] == "all/0" else json.dumps(
            record, separators=(",", ":"), ensure_ascii=False))
    edited.insert(3, '{"task": "up/s9", "sig": "garbled')  # a whole line, not a record
    file.write_text("\n".join(edited) + "\n")

    journal = Journal.read(state, compile_file(path))
    got = {d.task.name: (d.reason if d.run else "skip") for d in Resume(journal).decide()}
    assert got == {
        "up/s1": "new", "up/s2": "new", "up/s3": "new",
        "down/s1": "upstream up/s1 re-runs", "down/s2": "upstream up/s2 re-runs",
        "down/s3": "upstream up/s3 re-runs", "all/0": "upstream down/s1 re-runs",
        "hello/0": "new",
    }
    damaged = sorted(set(damage) - {"down/s1", "down/s2"})  # those were never looked at
    assert sorted(journal.damaged) == damaged
    assert journal.warnings() == [
        f"1 line of the journal {file} is not a record and skipped",
        f"4 records of the journal {file} are damaged and skipped (up/s1, up/s2, up/s3, ...); "
        "those tasks run again"]

    from opals_dsl.cli import main

    status = main(["run", str(path), "--dry-run", "--state", str(state)])
    err = capsys.readouterr().err
    assert status == 0
    assert f"opf: warning: 4 records of the journal {file} are damaged and skipped" in err
    assert "Traceback" not in err

    summary = run(path, state, scratch)  # the run does them again and records them afresh
    assert summary.exit_code == 0 and summary.skipped == 0
    assert set(decisions(path, state).values()) == {"skip"}
