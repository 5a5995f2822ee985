"""A run's records: one folder per run and pipeline (trace, step logs, summary, report), so two
pipelines in one folder never mix and a run with nothing to do leaves the last real one as it
was; ``opf report`` (which run, where the page goes), ``opf runs`` and ``opf clean``.

Runs go through :func:`opals_dsl.runtime.session.run` with the in-process executor (real files,
real step processes) and through ``opf`` on the session cluster (tests/conftest.py); the
commands are called as the command line calls them.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_pipeline
from hypothesis import given
from hypothesis import strategies as st

from opals_dsl.api import compile_file
from opals_dsl.cli import main as opf_main
from opals_dsl.runtime import history, jobfolders, session, writers
from opals_dsl.runtime.executor import LocalExecutor

#: two pipelines with the same job, task and step names, each writing its own word
PIPELINE = """
pipeline NAME

job work for s in "data/*.txt" {
    shared tool = "tool.py"
    output "results_NAME" flat
    step make {
        out a = "{s.stem}.a"
        run python {tool} COMMAND
    }
}
"""


def two_pipelines(folder: Path) -> tuple[Path, Path]:
    tiles = write_pipeline(folder, PIPELINE.replace("NAME", "tiles").replace(
        "COMMAND", "copy {s} {a}"), name="tiles.opf", inputs=3)
    strips = write_pipeline(folder, PIPELINE.replace("NAME", "strips").replace(
        "COMMAND", "merge {a} {s} {s}"), name="strips.opf", inputs=3)
    return tiles, strips


def run(path: Path, **kwargs):
    return session.run(compile_file(path), executor=LocalExecutor([str(path.parent / "m")]),
                       state_dir=path.parent / ".opf", **kwargs)


def opf(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``opf ARGV...`` as the command line runs it: exit status, stdout, stderr."""
    status = opf_main(list(argv))
    out = capsys.readouterr()
    return status, out.out, out.err


def page_data(path: Path) -> dict:
    found = re.search(r'<script type="application/json" id="opf-data">(.*?)</script>',
                      path.read_text(encoding="utf-8"), re.DOTALL)
    assert found
    return json.loads(found.group(1))


def test_two_pipelines_in_one_folder_keep_their_own_records(tmp_path, capsys, monkeypatch):
    tiles, strips = two_pipelines(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert run(tiles).done == 3
    assert run(strips).done == 3
    state = tmp_path / ".opf"
    tile_log = state / "runs" / "tiles" / "1" / "logs" / "work" / "make" / "s1.log"
    strip_log = state / "runs" / "strips" / "1" / "logs" / "work" / "make" / "s1.log"
    assert "copy s1.txt s1.a" in tile_log.read_text()  # not overwritten by the other's
    assert "merge s1.a s1.txt s1.txt" in strip_log.read_text()

    status, out, _ = opf(capsys, "report", "tiles.opf")
    page = state / "runs" / "tiles" / "1" / "report.html"
    assert status == 0 and out == f"report: {page}\n"
    assert not (tmp_path / "report.html").exists()  # the report goes with the run's records
    data = page_data(page)
    assert data["pipeline"] == "tiles" and data["summary"]["done"] == 3

    # a run with nothing to do is a run of its own: the report still shows the one that worked
    again = run(tiles)
    assert (again.done, again.skipped) == (0, 3)
    assert again.records == str(state / "runs" / "tiles" / "2")
    status, _, _ = opf(capsys, "report", "tiles.opf", "-o", str(tmp_path / "last.html"))
    assert status == 0 and page_data(tmp_path / "last.html")["summary"]["done"] == 3
    status, _, _ = opf(capsys, "report", "tiles.opf", "--run", "2", "-o",
                       str(tmp_path / "two.html"))
    summary = page_data(tmp_path / "two.html")["summary"]
    assert status == 0 and (summary["done"], summary["skipped"]) == (0, 3)
    status, _, err = opf(capsys, "report", "tiles.opf", "--run", "7")
    assert status == 2 and f"no run 7 of tiles is recorded in {state} (runs 1 to 2" in err

    status, out, _ = opf(capsys, "runs", "tiles.opf")
    lines = out.splitlines()
    assert status == 0 and lines[0].split() == [
        "run", "started", "took", "tasks", "done", "skipped", "failed", "status"]
    assert [line.split()[0] for line in lines[1:3]] == ["1", "2"]
    assert lines[1].split()[-5:] == ["3", "3", "0", "0", "done"]
    assert lines[2].split()[-5:] == ["3", "0", "3", "0", "unchanged"]
    assert lines[3].startswith("opf report shows run 1 ")
    # a state folder of two pipelines: the report asks which
    status, _, err = opf(capsys, "report", str(state))
    assert status == 2 and "holds the runs of 2 pipelines (strips, tiles)" in err


def test_a_run_s_records_say_why_each_task_ran_and_its_report_shows_it(tmp_path, capsys,
                                                                        monkeypatch):
    """Each run keeps why each of its tasks was to run (``why.jsonl``, as the journal decided;
    the tasks it skipped are not in it), and its report counts the reasons by kind."""
    tiles, _ = two_pipelines(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert run(tiles).done == 3
    (tmp_path / "data" / "s2.txt").write_text("strip 2, measured again\n")
    os.utime(tmp_path / "data" / "s2.txt", ns=(1, 1))
    (tmp_path / "data" / "s4.txt").write_text("strip 4\n")
    assert run(tiles).done == 2
    runs = tmp_path / ".opf" / "runs" / "tiles"

    def why(number: int) -> dict[str, str]:
        lines = (runs / str(number) / "why.jsonl").read_text().splitlines()
        return {row["task"]: row["why"] for row in map(json.loads, lines)}

    assert why(1) == {"work/s1": "new", "work/s2": "new", "work/s3": "new"}
    assert why(2) == {"work/s2": "input changed: data/s2.txt", "work/s4": "new"}
    status, out, _ = opf(capsys, "report", str(tiles))
    assert status == 0
    data = page_data(runs / "2" / "report.html")
    page = (runs / "2" / "report.html").read_text()
    assert ">input changed</td>" in page and ">work/s2: input changed: data/s2.txt</td>" in page
    assert data["why"] == [
        {"why": "input changed", "tasks": 1, "example": "work/s2",
         "reason": "input changed: data/s2.txt"},
        {"why": "new", "tasks": 1, "example": "work/s4", "reason": "new"}]
    assert {t["task"]: t["why"] for t in data["slowest"]} == {
        "s2": "input changed: data/s2.txt", "s4": "new"}


def test_runs_lists_the_runs_of_a_pipeline_file_that_no_longer_parses(tmp_path, capsys,
                                                                      monkeypatch):
    """A file being edited (a syntax error anywhere after its pipeline line, or a file
    without one) still shows its runs; a broken pipeline line itself is the syntax error."""
    tiles, _ = two_pipelines(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert run(tiles).done == 3
    text = tiles.read_text()
    tiles.write_text(text.replace("step make {", "step make {{"))
    status, out, err = opf(capsys, "runs", "tiles.opf")
    assert status == 0, err
    assert out.splitlines()[1].split()[-5:] == ["3", "3", "0", "0", "done"]
    # no pipeline line: the file's stem names the records
    tiles.write_text(text.replace("pipeline tiles\n", "").replace("step make {", "stp make {"))
    status, out, err = opf(capsys, "runs", "tiles.opf")
    assert status == 0 and out.splitlines()[1].split()[-1] == "done", err
    tiles.write_text(text.replace("pipeline tiles", "pipeline tiles!"))
    status, _, err = opf(capsys, "runs", "tiles.opf")
    assert status == 2 and "tiles.opf:" in err and "Traceback" not in err


def test_report_where_nothing_ran_names_the_pipeline_and_the_folder(tmp_path, capsys,
                                                                     monkeypatch):
    tiles, _ = two_pipelines(tmp_path)
    (tmp_path / "strips.opf").unlink()
    monkeypatch.chdir(tmp_path)
    state = tmp_path / ".opf"
    status, out, err = opf(capsys, "report")
    assert status == 2 and out == ""
    assert err == f"opf: error: no run of tiles recorded in {state}; run it with 'opf run' " \
                  "first\n"
    status, _, err = opf(capsys, "report", "tiles.opf")
    assert status == 2 and f"no run of tiles recorded in {state}" in err
    status, _, err = opf(capsys, "runs", "tiles.opf")
    assert status == 0


def test_the_report_of_a_killed_run_says_it_was_killed(tmp_path, capsys, monkeypatch):
    """A run whose process is gone while its summary still says ``running``: ``opf runs``
    and ``opf report`` both call it killed."""
    tiles, _ = two_pipelines(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert run(tiles).done == 3
    summary = tmp_path / ".opf" / "runs" / "tiles" / "1" / "run.json"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    data = json.loads(summary.read_text())
    data.update(status="running", finished=None, pid=int(gone.stdout))
    summary.write_text(json.dumps(data))
    status, out, _ = opf(capsys, "runs", "tiles.opf")
    assert status == 0 and any(line.endswith("killed") for line in out.splitlines())
    status, out, _ = opf(capsys, "report", "tiles.opf")
    assert status == 0
    page = Path(out.split("report: ", 1)[1].strip()).read_text(encoding="utf-8")
    assert "run 1: <b>killed</b>" in page


def test_clean_keeps_the_last_runs_that_did_work(tmp_path, capsys, monkeypatch):
    """Runs with nothing to do do not push the runs that did work out of --keep."""
    tiles, _ = two_pipelines(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert run(tiles).done == 3
    assert run(tiles, force=True).done == 3
    for _ in range(2):
        assert run(tiles).skipped == 3
    runs = tmp_path / ".opf" / "runs" / "tiles"
    status, out, _ = opf(capsys, "clean", "tiles.opf", "--keep", "2")
    assert status == 0
    assert out.splitlines() == [f"removed records of run 3 (unchanged): {runs / '3'}"]
    assert sorted(p.name for p in runs.iterdir()) == ["1", "2", "4"]


@dataclasses.dataclass
class _Run:
    """What :func:`history.prunable` reads of a past run."""

    number: int
    did_work: bool
    status: str = "done"


@given(st.lists(st.tuples(st.booleans(), st.sampled_from(["done", "failed", history.RUNNING])),
                max_size=12),
       st.integers(min_value=1, max_value=14))
def test_clean_never_removes_one_of_the_last_keep_runs_that_did_work(runs, keep):
    """Invariant: ``opf clean --keep K`` (K >= 1) keeps the last K runs that did work (all of
    them when there are fewer), the last run of all and every run still going on."""
    found = [_Run(i + 1, worked, status) for i, (worked, status) in enumerate(runs)]
    removed = history.prunable(found, keep)  # type: ignore[arg-type]
    gone = {r.number for r in removed}
    worked = [r.number for r in found if r.did_work]
    assert not gone & set(worked[-keep:])
    assert not found or found[-1].number not in gone
    assert all(r.status != history.RUNNING for r in removed)


def test_clean_keeps_every_run_when_fewer_than_keep_did_work(tmp_path, capsys, monkeypatch):
    tiles, _ = two_pipelines(tmp_path)
    monkeypatch.chdir(tmp_path)
    for _ in range(4):
        assert run(tiles, force=True).done == 3
    runs = tmp_path / ".opf" / "runs" / "tiles"
    status, out, _ = opf(capsys, "clean", "tiles.opf")
    assert (status, out) == (0, "nothing to clean for tiles\n")
    assert sorted(p.name for p in runs.iterdir()) == ["1", "2", "3", "4"]
    status, out, _ = opf(capsys, "clean", "tiles.opf", "--keep", "3")
    assert status == 0
    assert out.splitlines() == [f"removed records of run 1 (done): {runs / '1'}"]


def test_clean_under_a_run_going_on_removes_nothing_and_says_to_wait(tmp_path, capsys,
                                                                    monkeypatch):
    tiles, _ = two_pipelines(tmp_path)
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert run(tiles, force=True).done == 3
    state = tmp_path / ".opf"
    with open(state / "run.lock", "w") as held:  # as a run going on holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        status, out, err = opf(capsys, "clean", "tiles.opf", "--keep", "1")
    assert (status, out) == (2, "")
    assert err == (f"opf: error: another opf run (process 4242) is using the state folder "
                   f"{state}; nothing was removed; clean again once it has finished\n")
    assert sorted(p.name for p in (state / "runs" / "tiles").iterdir()) == ["1", "2"]


PARAM_PIPELINE = """
pipeline tiles
param results = "results"

job work for s in "data/*.txt" {
    shared tool = "tool.py"
    output "{results}" flat
    step make {
        out a = "{s.stem}.a"
        run python {tool} copy {s} {a}
    }
}
"""


def test_a_second_run_into_the_same_folders_is_refused_whatever_its_state_folder(
        tmp_path, capsys, monkeypatch):
    """Two runs that copy back into the same folders would overwrite each other's results,
    whatever their state folders: while one runs, the other is refused before it writes
    anything. A run of the same pipeline into other folders (another param) goes ahead."""
    path = write_pipeline(tmp_path, PARAM_PIPELINE, name="tiles.opf", inputs=2)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPF_SCRATCH", str(tmp_path / "scratch"))
    state_a = tmp_path / "state-a"
    plan = compile_file(path)
    held = session.lock_results(str(tmp_path), session.destination_folders(plan), state_a)
    with held:  # as a run going on holds it
        status, out, err = opf(capsys, "run", "tiles.opf", "--state", "state-b", "-n", "1")
        assert (status, out) == (2, "")
        assert err == (
            f"opf: error: another opf run (process {os.getpid()}, state folder {state_a}) is "
            f"copying back into the same folders (results): the two would overwrite each "
            f"other's results; wait for it to finish, or give this run other destinations\n")
        assert not (tmp_path / "state-b" / "runs").exists()
        status, _, err = opf(capsys, "run", "tiles.opf", "--state", "state-c", "-n", "1",
                             "-p", "results=other")
        assert status == 0, err
        assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["s1.a", "s2.a"]
    status, _, err = opf(capsys, "run", "tiles.opf", "--state", "state-b", "-n", "1")
    assert status == 0, err  # once the other run is over
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["s1.a", "s2.a"]


def test_runs_of_other_pipelines_into_the_same_folder_are_refused_also_through_a_link(
        tmp_path, capsys, monkeypatch):
    """Two runs that copy back into the same folder would overwrite each other's results,
    whatever their pipelines and state folders, and whether the folder is named as it is or
    through a symbolic link: while one runs, the other is refused before it writes anything;
    once it is over, the other runs."""
    monkeypatch.setenv("OPF_SCRATCH", str(tmp_path / "scratch"))
    shared = tmp_path / "shared-results"
    shared.mkdir()
    alias = tmp_path / "alias"
    alias.symlink_to(shared, target_is_directory=True)
    a = write_pipeline(tmp_path / "a", PARAM_PIPELINE, name="tiles.opf", inputs=2)
    write_pipeline(tmp_path / "b", PARAM_PIPELINE.replace("pipeline tiles", "pipeline dems"),
                       name="dems.opf", inputs=2)
    plan = compile_file(a, {"results": str(shared)})
    state_a = tmp_path / "a" / ".opf"
    monkeypatch.chdir(tmp_path / "b")
    with session.lock_results(str(tmp_path / "a"), session.destination_folders(plan), state_a,
                              str(a)):  # as a run going on holds it
        for results in (shared, alias):
            status, out, err = opf(capsys, "run", "dems.opf", "-n", "1", "-p",
                                   f"results={results}")
            assert (status, out) == (2, "")
            assert err == (
                f"opf: error: another opf run (process {os.getpid()} on {socket.gethostname()}, "
                f"pipeline {a}, state folder {state_a}) is copying back into the same folder "
                f"({shared}): the two would overwrite each other's results; wait for it to "
                f"finish, or give this run other destinations\n")
        assert list(shared.iterdir()) == []
    status, _, err = opf(capsys, "run", "dems.opf", "-n", "1", "-p", f"results={alias}")
    assert status == 0, err
    assert sorted(p.name for p in shared.iterdir()) == ["s1.a", "s2.a"]


def test_the_registration_of_a_run_that_was_killed_holds_nothing_up(tmp_path, capsys,
                                                                     monkeypatch):
    """A run killed with ``kill -9`` leaves its registration of the folders it was copying
    back into behind; nobody holds it, so the next run into those folders goes ahead and
    removes it."""
    monkeypatch.setenv("OPF_SCRATCH", str(tmp_path / "scratch"))
    results = tmp_path / "results"
    code = ("import sys\nfrom opals_dsl.runtime.writers import registered\n"
            "with registered([sys.argv[1]], {}, lambda o, c: 'refused'):\n"
            "    print('held', flush=True)\n    sys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(results)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        left = [p for p in writers.registry().glob(f"*-{holder.pid}-*.json")]
        assert len(left) == 1
    finally:
        holder.kill()
        holder.wait()
    assert left[0].exists()
    write_pipeline(tmp_path, PARAM_PIPELINE, name="tiles.opf", inputs=2)
    monkeypatch.chdir(tmp_path)
    status, _, err = opf(capsys, "run", "tiles.opf", "-n", "1")
    assert status == 0, err
    assert not left[0].exists()


LONG_NAMES = """
pipeline longnames
job j for f in "data/*.x" {
    output "results" flat
    step s {
        out o = "o.txt"
        run sh "cat {f} > {o}"
    }
}
"""


def test_an_input_with_a_name_as_long_as_a_file_name_may_be_runs(tmp_path, capsys,
                                                                 monkeypatch):
    """An input named with 255 bytes gives its task a shortened id (its start and a hash):
    the task's folder and its step's log (``<id>.log``) fit a file name."""
    monkeypatch.setenv("OPF_SCRATCH", str(tmp_path / "scratch"))
    write_pipeline(tmp_path, LONG_NAMES, name="long.opf", inputs=0)
    stem = "b" * 253
    (tmp_path / "data" / f"{stem}.x").write_text("long\n")
    monkeypatch.chdir(tmp_path)
    status, _, err = opf(capsys, "run", "long.opf", "-n", "1")
    assert status == 0, err
    assert (tmp_path / "results" / "o.txt").read_text() == "long\n"
    [log] = (tmp_path / ".opf" / "runs").rglob("*.log")
    assert log.name.startswith("b" * 183 + "-") and len(log.name) == 204


def engines_ended() -> None:
    """What the end of the engine processes does: the in-process engine lets go of the job
    folders it holds."""
    while jobfolders._HELD:
        os.close(jobfolders._HELD.popitem()[1][1])


def test_clean_prunes_old_runs_and_the_scratch_folder(tmp_path, capsys, monkeypatch):
    tiles, strips = two_pipelines(tmp_path)
    monkeypatch.chdir(tmp_path)
    scratch = tmp_path / "m"
    assert run(tiles).done == 3
    assert run(tiles, force=True).done == 3
    assert run(tiles).skipped == 3
    assert run(strips).done == 3
    runs = tmp_path / ".opf" / "runs"
    # a task that fails keeps its folder in the scratch space
    tiles.write_text(tiles.read_text().replace("copy {s} {a}", "fail 3"))
    assert run(tiles).failed >= 1
    kept = [p for p in (scratch / "opf" / "tiles").rglob("s1") if p.is_dir()]
    assert kept, "the failed task's folder is kept"

    # the scratch folder is shared by every checkout with a pipeline of this name: kept unless
    # asked for
    status, out, err = opf(capsys, "clean", "tiles.opf", "--keep", "1", "--dry-run",
                           "--scratch", str(scratch))
    assert status == 0 and "scratch folder of tiles" not in out
    assert f"kept the scratch folder {scratch / 'opf' / 'tiles'}" in err
    status, out, _ = opf(capsys, "clean", "tiles.opf", "--keep", "1", "--dry-run",
                         "--scratch-folder", "--scratch", str(scratch))
    assert status == 0
    assert out.splitlines() == [
        f"would remove records of run 1 (done): {runs / 'tiles' / '1'}",
        f"would remove records of run 2 (done): {runs / 'tiles' / '2'}",
        f"would remove records of run 3 (unchanged): {runs / 'tiles' / '3'}",
        f"would remove scratch folder of tiles (job folders, kept task folders): "
        f"{scratch / 'opf' / 'tiles'}"]
    assert sorted(p.name for p in (runs / "tiles").iterdir()) == ["1", "2", "3", "4"]

    # the in-process engine still holds the job folder, as a live engine of a cluster would
    status, out, err = opf(capsys, "clean", "tiles.opf", "--keep", "1", "--scratch-folder",
                           "--scratch", str(scratch))
    assert status == 0 and out.splitlines()[0].startswith("removed records of run 1 ")
    assert "scratch folder" not in out
    assert err == (f"kept 1 job folder in {scratch / 'opf' / 'tiles'}: an engine holds it (a "
                   f"run going on, or a cluster's engine keeping it for its next run); the "
                   f"rest was removed\n")
    assert all(p.is_dir() for p in kept)
    engines_ended()
    # without --scratch it looks where the last run's engines worked, as its records say,
    # not in the default scratch root
    last = json.loads((runs / "tiles" / "4" / "run.json").read_text())
    assert last["scratch"] == [str(scratch.resolve())]
    monkeypatch.setenv("OPF_SCRATCH", str(tmp_path / "elsewhere"))
    status, out, err = opf(capsys, "clean", "tiles.opf", "--keep", "1", "--scratch-folder")
    assert status == 0 and out.splitlines() == [
        f"removed scratch folder of tiles (job folders, kept task folders): "
        f"{scratch / 'opf' / 'tiles'}"]
    # the last run stays; the other pipeline is untouched
    assert sorted(p.name for p in (runs / "tiles").iterdir()) == ["4"]
    assert not (scratch / "opf" / "tiles").exists()
    assert (scratch / "opf" / "strips").is_dir()
    assert sorted(p.name for p in (runs / "strips").iterdir()) == ["1"]
    status, out, err = opf(capsys, "clean", "tiles.opf", "--keep", "1", "--scratch-folder",
                           "--scratch", str(tmp_path / "elsewhere"))
    assert out == "nothing to clean for tiles\n"
    assert err.startswith(f"no scratch folder {tmp_path / 'elsewhere' / 'opf' / 'tiles'}: "
                          f"runs given --scratch DIR keep it there")
    # a run with nothing to do never pushes out the last run that did work
    tiles.write_text(tiles.read_text().replace("fail 3", "copy {s} {a}"))
    assert run(tiles).done >= 1
    assert run(tiles).skipped == 3
    status, out, _ = opf(capsys, "clean", "tiles.opf", "--keep", "1", "--scratch",
                         str(scratch))
    assert sorted(p.name for p in (runs / "tiles").iterdir()) == ["5", "6"]
    # the next run gets a number of its own
    assert run(tiles).records == str(runs / "tiles" / "7")


def test_cli_run_report_goes_into_the_runs_records(cluster, tmp_path):
    tiles, _ = two_pipelines(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "opals_dsl", "run", "tiles.opf", "--cluster-file",
         str(cluster.client_file), "--report"],
        cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    page = tmp_path / ".opf" / "runs" / "tiles" / "1" / "report.html"
    assert f"report: {page}\n" in proc.stdout
    assert page_data(page)["summary"]["done"] == 3
    assert not (tmp_path / "report.html").exists()
    record = json.loads((page.parent / "run.json").read_text())
    assert (record["run"], record["status"], record["done"], record["tasks"]) == (
        1, "done", 3, 3)


def test_a_run_that_never_started_is_not_the_one_opf_report_shows(tmp_path, capsys,
                                                                  monkeypatch):
    """A run whose cluster could not be reached (exit 3) is recorded, but left no trace:
    ``opf report`` still shows the last run that did work."""
    tiles, _ = two_pipelines(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert run(tiles).exit_code == 0
    status, _, err = opf(capsys, "run", "tiles.opf", "--force", "--cluster-file",
                         str(tmp_path / "nosuch.json"))
    assert status == 3, err
    status, out, _ = opf(capsys, "runs", "tiles.opf")
    assert status == 0 and re.search(r"^\s*2\b", out, re.MULTILINE), out
    status, out, err = opf(capsys, "report", "tiles.opf")
    assert status == 0, err
    assert page_data(tmp_path / ".opf" / "runs" / "tiles" / "1" / "report.html")[
        "summary"]["done"] == 3
