"""Steps that use several cores (``threads N``) and steps that hang (``timeout DURATION``), run
by real ``opf run`` processes on real ipyparallel engines.

* One machine of 2 engines (an embedded cluster, ``-n 2``): tasks with ``threads 2`` never run
  at the same time, and a step's process sees ``{task.threads}`` and the thread variables.
* Two machines of 2 engines each (a controller and four ``ipengine`` processes started here;
  two share scratch root ``m1``, two ``m2`` — that is what makes them machines): with
  ``threads 2`` and ``threads 1`` tasks mixed, no machine runs more threads than it has engines
  at any moment, and every engine works. A step that needs more threads than 2 is refused with
  exit status 2 before anything runs.
* Timeouts: a step that hangs (``sleep 600 & wait``) is stopped with everything it started,
  retried, reported as timed out in the failure report, the trace and the HTML report; a
  ``call`` step that sleeps in Python is stopped too.

Whether machines are ever oversubscribed is read from the trace: every exec row's start and end
on the engines' clock (one host here), with the step's threads from the plan.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import EngineCluster, engines_on_machines, trace_rows

from opals_dsl.api import compile_file
from opals_dsl.plan import model
from opals_dsl.report.analyse import analyse
from opals_dsl.runtime.steps import THREAD_VARS


def opf(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("OPF_SCRATCH", None)
    return subprocess.run([sys.executable, "-m", "opals_dsl", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def write(folder: Path, text: str, name: str = "p.opf") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def exec_rows(path: Path) -> list[dict]:
    """The exec rows of a run's trace that ran, each with its step's ``threads`` (plan)."""
    plan = compile_file(path)
    threads = {}
    for nid, node in model.nodes(plan):
        if isinstance(node, model.Exec):
            threads[nid] = node.threads
    rows = [r for r in trace_rows(path.parent / ".opf")
            if r["kind"] == "exec" and r["start"] is not None]
    for r in rows:
        r["threads"] = threads[r["node"]]
    return rows


def most_threads_at_once(rows: list[dict]) -> dict[str, int]:
    """Per machine, the most threads its exec rows ran at one moment (ends before starts at
    the same instant: a slot freed and taken again is not an overlap)."""
    events: dict[str, list[tuple[float, int, int]]] = {}
    for r in rows:
        events.setdefault(r["machine"], []).extend(
            [(r["start"], 1, r["threads"]), (r["end"], 0, -r["threads"])])
    most = {}
    for machine, evs in events.items():
        now = peak = 0
        for _, _, delta in sorted(evs):
            now += delta
            peak = max(peak, now)
        most[machine] = peak
    return most


# -- one machine of 2 engines ------------------------------------------------------------------

ONE_MACHINE = """
job wide for i in range(6) {
    threads 2
    shared tool = "envdump.py"
    output "out" flat
    step s {
        out o = "wide{i}.txt"
        run python {tool} {o} {task.threads} 0.3
    }
}
job called {
    threads 2
    output "out" flat
    step c {
        out o = "called.txt"
        call envdump:dump(out = o, threads = task.threads)
    }
}
job narrow for i in range(2) {
    shared tool = "envdump.py"
    output "out" flat
    step s {
        out o = "narrow{i}.txt"
        run python {tool} {o} {task.threads} 0
    }
}
"""

ENVDUMP = """
import os, sys, time

def dump(out, threads):
    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
             "NUMEXPR_NUM_THREADS", "GDAL_NUM_THREADS")
    with open(out, "w") as f:
        f.write(" ".join(os.environ.get(n, "-") for n in names) + " " + repr(threads) + "\\n")

if __name__ == "__main__":  # envdump.py OUT THREADS SECONDS
    dump(sys.argv[1], int(sys.argv[2]))
    time.sleep(float(sys.argv[3]))
"""


@pytest.fixture(scope="module")
def one_machine(tmp_path_factory: pytest.TempPathFactory
                ) -> tuple[Path, subprocess.CompletedProcess]:
    folder = tmp_path_factory.mktemp("one")
    (folder / "envdump.py").write_text(ENVDUMP, encoding="utf-8")
    path = write(folder, ONE_MACHINE)
    proc = opf("run", "p.opf", "-n", "2", "--scratch", str(folder / "scratch"), cwd=folder)
    return path, proc


def test_tasks_with_threads_2_never_overlap_on_a_machine_of_2_engines(one_machine) -> None:
    path, proc = one_machine
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = exec_rows(path)
    wide = sorted((r for r in rows if r["job"] == "wide"), key=lambda r: r["start"])
    assert len(wide) == 6
    for before, after in zip(wide, wide[1:], strict=False):
        assert before["end"] <= after["start"], (before, after)
    assert list(most_threads_at_once(rows).values()) == [2]


def test_a_step_sees_its_threads_in_the_environment_and_in_task_threads(one_machine) -> None:
    path, proc = one_machine
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = path.parent / "out"
    for i in range(6):
        assert (out / f"wide{i}.txt").read_text().split() == ["2"] * 6
    for i in range(2):
        assert (out / f"narrow{i}.txt").read_text().split() == ["1"] * 6
    # a call step: the variables while it runs, and {task.threads} as a number
    assert (out / "called.txt").read_text().split() == ["2"] * 6
    assert set(THREAD_VARS) == {"OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                "NUMEXPR_NUM_THREADS", "GDAL_NUM_THREADS"}


def test_the_trace_and_report_show_a_threaded_steps_threads_and_the_engines_it_kept_free(
        one_machine) -> None:
    path, proc = one_machine
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = trace_rows(path.parent / ".opf")
    wide = [r for r in rows if r["job"] in ("wide", "called")]
    assert len(wide) >= 7 * 3
    for r in wide:  # the machine's other engine was kept free for the whole task
        assert r["borrowed"] == [1 - r["engine"]], r
        assert r.get("threads") == (2 if r["kind"] == "exec" else None), r
    narrow = [r for r in rows if r["job"] == "narrow"]
    assert narrow and all("borrowed" not in r and "threads" not in r for r in narrow)

    data = analyse(rows)
    held = {ln["engine"]: ln["held"] for ln in data["lanes"]}
    lent = {e for r in wide for e in r["borrowed"]}
    assert sorted(held) == [0, 1] and lent
    assert {e for e, seconds in held.items() if seconds > 0} == lent
    busy = sum(ln["busy"] for ln in data["lanes"])
    wall = data["summary"]["wall"]
    assert data["idle"] == pytest.approx(max(0.0, 2 * wall - busy - sum(held.values())))
    report = opf("report", "p.opf", "-o", "r.html", cwd=path.parent)
    assert report.returncode == 0, report.stderr
    assert "kept free for steps with threads" in (path.parent / "r.html").read_text()


# -- two machines of 2 engines each ------------------------------------------------------------

MIXED = """
job wide for i in range(4) {
    threads 2
    output "out" flat
    step s {
        out o = "wide{i}.txt"
        run sh "sleep 0.6; echo {task.threads} > {o}"
    }
}
job narrow for i in range(12) {
    output "out" flat
    step s {
        out o = "narrow{i}.txt"
        run sh "sleep 0.3; echo {task.threads} > {o}"
    }
}
"""


@pytest.fixture(scope="module")
def two_machines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineCluster]:
    """Four engines: two with scratch root ``m1``, two with ``m2`` — two machines of 2."""
    with engines_on_machines(tmp_path_factory.mktemp("two"), "two",
                             ("m1", "m1", "m2", "m2")) as tc:
        yield tc


def test_mixed_threads_never_oversubscribe_a_machine_and_use_every_engine(
        two_machines: EngineCluster, tmp_path: Path) -> None:
    path = write(tmp_path, MIXED)
    proc = opf("run", "p.opf", "--cluster-file", str(two_machines.client_file), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = exec_rows(path)
    assert len(rows) == 16
    most = most_threads_at_once(rows)
    # every engine is used: each machine ran 2 threads at once, on both its engines (an
    # engine a wide task borrows runs no row of its own, so the trace's engine ids alone
    # cannot show it), and never more
    assert sorted(most.values()) == [2, 2], most
    assert (tmp_path / "out" / "wide3.txt").read_text() == "2\n"


def test_a_step_wider_than_every_machine_is_refused_before_anything_runs(
        two_machines: EngineCluster, tmp_path: Path) -> None:
    path = write(tmp_path, """
        job dem for i in range(2) {
            output "out" flat
            step grid {
                threads 3
                out o = "d{i}.txt"
                run sh "echo ran > {o}"
            }
        }
    """)
    proc = opf("run", str(path.name), "--cluster-file", str(two_machines.client_file),
               cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr
    assert "Traceback" not in err
    assert "step dem/grid needs 3 threads" in err, err
    assert "largest machine of the cluster has 2 engines" in err, err
    assert err.count("has 2") >= 2, err  # both machines with their sizes
    assert not (tmp_path / "out").exists()
    assert not any(p.stat().st_size for p in (tmp_path / ".opf").glob("runs/*/*/trace.jsonl"))


# -- timeouts ----------------------------------------------------------------------------------

HANGS = """
param pids = "pids.txt"
job hang {
    timeout 1s
    retries 1
    output "out" flat
    step wait {
        out o = "never.txt"
        run sh "sleep 600 & echo $! >> {pids}; wait"
    }
}
job nap {
    output "out" flat
    step doze {
        timeout 2s
        out o = "nap.txt"
        call napper:nap(seconds = 600, out = o)
    }
}
"""

NAPPER = """
import time

def nap(seconds, out):
    time.sleep(seconds)
    with open(out, "w") as f:
        f.write("woke up")
"""


@pytest.mark.slow
def test_a_step_past_its_timeout_is_stopped_with_its_children_retried_and_reported(
        tmp_path: Path) -> None:
    (tmp_path / "napper.py").write_text(NAPPER, encoding="utf-8")
    pids = tmp_path / "pids.txt"
    write(tmp_path, HANGS)
    try:
        proc = opf("run", "p.opf", "-n", "2", "--keep-going", "--param", f"pids={pids}",
                   "--scratch", str(tmp_path / "scratch"), cwd=tmp_path)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1, out
        assert "step wait timed out after 1s" in out
        assert "step doze timed out after 2s" in out
        assert "Traceback" not in out

        # the step's child (the sleep) went with it, on both attempts
        started = [int(line) for line in pids.read_text().split()]
        assert len(started) == 2
        for pid in started:
            if psutil.pid_exists(pid):
                proc_ = psutil.Process(pid)
                assert proc_.status() == psutil.STATUS_ZOMBIE or "sleep" not in " ".join(
                    proc_.cmdline()), f"the step's child {pid} still runs"

        rows = [r for r in trace_rows(tmp_path / ".opf")
                if r["kind"] == "exec"]
        hang = sorted((r for r in rows if r["job"] == "hang"), key=lambda r: r["attempt"])
        assert [(r["status"], r["attempt"]) for r in hang] == [("timeout", 0), ("timeout", 1)]
        assert all(r["message"] == "step wait timed out after 1s" for r in hang)
        assert [r["status"] for r in rows if r["job"] == "nap"] == ["timeout"]
        assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())

        report = opf("report", "p.opf", "-o", str(tmp_path / "report.html"), cwd=tmp_path)
        assert report.returncode == 0, report.stderr
        page = (tmp_path / "report.html").read_text(encoding="utf-8")
        assert page.count('<span class="st timeout">timed out</span>') == 3
        assert "step wait timed out after 1s" in page
    finally:
        if pids.exists():
            for line in pids.read_text().split():
                try:
                    leftover = psutil.Process(int(line))
                    if "sleep" in " ".join(leftover.cmdline()):
                        leftover.kill()
                except psutil.Error:
                    pass


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs a machine of 2 cores or more")
def test_one_wide_task_gets_the_engines_its_threads_need_from_an_embedded_cluster(tmp_path):
    """Without -n the embedded cluster starts no more engines than tasks to run — but never
    fewer than the widest step's threads, or a lone `threads 2` task would be refused."""
    path = write(tmp_path, """\
        job wide for i in range(1) {
            threads 2
            output "out" flat
            step s {
                out o = "w{i}.txt"
                run sh "echo $OMP_NUM_THREADS > {o}"
            }
        }
        """)
    proc = opf("run", "p.opf", "--scratch", str(tmp_path / "scratch"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (path.parent / "out" / "w0.txt").read_text() == "2\n"
    assert len({r["engine"] for r in trace_rows(tmp_path / ".opf")}) == 1  # ran on one of them
