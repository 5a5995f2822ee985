"""Tests of opals_dsl.runtime.cluster: the embedded cluster's life (start, stop, no process left
behind, nothing in the user's home, a killed run's cluster stopped by the next run, SIGTERM),
existing clusters by profile, and what engines are sent.

The embedded-cluster tests run ``opf run`` as a real subprocess with ``-n 1`` or ``-n 2``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import EngineCluster, files_under, last_run, process_gone, write_pipeline

from opals_dsl.runtime.cluster import stop_leftover_cluster
from opals_dsl.runtime.executor import RUN_TASKS, EngineCall, IPyParallelExecutor
from opals_dsl.runtime.fsatomic import is_temp_name
from opals_dsl.runtime.reaper import end_marked, end_run

QUICK = """
pipeline quick
job work for s in "data/*.txt" {
    shared tool = "tool.py"
    output "results" flat
    step copy {
        out a = "{s.stem}.a"
        run python {tool} copy {s} {a}
    }
}
"""

SLOW = """
pipeline slow
param pids = "{pids}"
job work for s in "data/*.txt" {{
    shared tool = "tool.py"
    output "results" flat
    step wait {{
        out a = "{{s.stem}}.a"
        run python {{tool}} pidfile {{pids}} 60 {{s}} {{a}}
    }}
}}
"""


def clean_env(home: Path) -> dict[str, str]:
    env = dict(os.environ, HOME=str(home))
    env.pop("IPYTHONDIR", None)
    env.pop("OPF_SCRATCH", None)
    return env


def opf_args(*args: str) -> list[str]:
    return [sys.executable, "-m", "opals_dsl", "run", *args]


def gone(pid: int, created: float) -> bool:
    """True if the process no longer runs (a zombie waiting to be reaped counts as gone)."""
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - created) > 0.01:
            return True
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def processes_using(ipython_dir: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("IPYTHONDIR") == str(ipython_dir) and not gone(
                    proc.pid, proc.create_time()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def test_embedded_cluster_runs_and_leaves_nothing_behind(tmp_path):
    path = write_pipeline(tmp_path / "p", QUICK, inputs=3)
    home = tmp_path / "home"
    home.mkdir()
    proc = subprocess.run(opf_args(str(path), "-n", "2"), cwd=tmp_path, env=clean_env(home),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "quick: 3 tasks on 2 engines (1 machine)" in proc.stderr
    got = sorted(p.name for p in (tmp_path / "p" / "results").iterdir())
    assert got == ["s1.a", "s2.a", "s3.a"]
    state = tmp_path / "p" / ".opf"
    rows = [json.loads(line) for line in (last_run(state) / "trace.jsonl").read_text().splitlines()]
    assert len({r["engine"] for r in rows}) == 2
    # ipyparallel's files stayed in the state folder, none in the home folder
    assert_only_the_registry_in(home)
    assert (state / "ipython" / "profile_opf").is_dir()
    assert not (state / "cluster.json").exists()
    assert processes_using(state / "ipython") == []


@pytest.mark.slow
def test_a_killed_run_s_cluster_is_stopped_by_the_next_run(tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    slow = write_pipeline(tmp_path / "p", SLOW.format(pids=pids), inputs=1)
    quick = tmp_path / "p" / "quick.opf"
    quick.write_text(QUICK)
    state = tmp_path / "state"
    home = tmp_path / "home"
    home.mkdir()
    env = clean_env(home)
    driver = subprocess.Popen(opf_args(str(slow), "-n", "1", "--state", str(state)),
                              cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: any(p.name.isdigit() for p in pids.iterdir()), timeout=60)
    finally:
        driver.send_signal(signal.SIGKILL)  # no handler can run: the cluster is orphaned
        driver.wait()
    step_pid = int(next(p for p in pids.iterdir() if p.name.isdigit()).read_text())
    step = psutil.Process(step_pid)
    record = json.loads((state / "cluster.json").read_text())
    procs = record["processes"]
    assert len(procs) >= 3  # controller, its schedulers, engine, nanny
    assert not any(gone(p["pid"], p["created"]) for p in procs)

    proc = subprocess.run(opf_args(str(quick), "-n", "1", "--state", str(state)),
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: all(gone(p["pid"], p["created"]) for p in procs), timeout=10)
    wait_for(lambda: gone(step.pid, step.create_time()), timeout=10)
    assert processes_using(state / "ipython") == []
    assert (tmp_path / "p" / "results" / "s1.a").read_text() == "copied:strip 1\n"


def test_sigterm_stops_the_run_its_steps_and_its_cluster(tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    slow = write_pipeline(tmp_path / "p", SLOW.format(pids=pids), inputs=2)
    home = tmp_path / "home"
    home.mkdir()
    state = tmp_path / "p" / ".opf"
    driver = subprocess.Popen(opf_args(str(slow), "-n", "2"), cwd=tmp_path,
                              env=clean_env(home), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: sum(p.name.isdigit() for p in pids.iterdir()) == 2, timeout=60)
        steps = [psutil.Process(int(p.read_text())) for p in pids.iterdir()
                 if p.name.isdigit()]
        record = json.loads((state / "cluster.json").read_text())
        t0 = time.monotonic()
        driver.send_signal(signal.SIGTERM)
        out, err = driver.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 130, err
    assert took < 15
    assert "interrupted" in err
    assert "Traceback" not in err
    for step in steps:
        wait_for(lambda step=step: gone(step.pid, step.create_time()), timeout=10)
    for p in record["processes"]:
        wait_for(lambda p=p: gone(p["pid"], p["created"]), timeout=10)
    assert not (state / "cluster.json").exists()
    results = tmp_path / "p" / "results"
    assert not results.exists() or not any(files_under(results))
    assert not any(is_temp_name(p.name) for p in files_under(tmp_path / "p"))


def test_cli_by_profile_name(cluster, tmp_path):
    path = write_pipeline(tmp_path / "p", QUICK, inputs=2)
    env = dict(os.environ, IPYTHONDIR=str(cluster.root / "ipython"))
    proc = subprocess.run(opf_args(str(path), "--profile", "opftest"), cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "quick: 2 tasks on" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "p" / "results").iterdir()) == ["s1.a", "s2.a"]
    # with work to do (--force), a profile that leads nowhere is exit 3
    proc = subprocess.run(opf_args(str(path), "--profile", "nosuchprofile", "--timeout", "1",
                                   "--force"),
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3
    profiles = cluster.root / "ipython"
    assert proc.stderr.splitlines()[-1] == (
        f"opf: error: there is no ipyparallel profile 'nosuchprofile' (no folder "
        f"{profiles / 'profile_nosuchprofile'}); start one with 'ipcluster start "
        f"--profile=nosuchprofile', or leave out --profile for a cluster of this machine")
    # a profile whose cluster is not running: no connection file to read
    (profiles / "profile_stopped").mkdir()
    proc = subprocess.run(opf_args(str(path), "--profile", "stopped", "--timeout", "1",
                                   "--force"),
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3
    client = profiles / "profile_stopped" / "security" / "ipcontroller-client.json"
    assert proc.stderr.splitlines()[-1] == (
        f"opf: error: no cluster of profile 'stopped' is running (no {client}); start one "
        f"with 'ipcluster start --profile=stopped'")


def test_nothing_to_run_exits_0_and_touches_no_cluster(cluster, tmp_path):
    """With every task unchanged, ``opf run`` neither reaches the cluster it is told of (a
    profile or connection file that leads nowhere is never looked at) nor starts one."""
    path = write_pipeline(tmp_path / "p", QUICK, inputs=1)
    state = tmp_path / "p" / ".opf"
    env = dict(os.environ, IPYTHONDIR=str(cluster.root / "ipython"))
    proc = subprocess.run(opf_args(str(path), "--cluster-file", str(cluster.client_file)),
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    home = tmp_path / "home"
    home.mkdir()
    for args in (["--profile", "nosuch", "--timeout", "1"],
                 ["--cluster-file", str(tmp_path / "nowhere.json")],
                 ["-n", "1"]):
        proc = subprocess.run(opf_args(str(path), *args), cwd=tmp_path, env=clean_env(home),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, (args, proc.stderr)
        assert "nothing to run" in proc.stderr, (args, proc.stderr)
        assert "error" not in proc.stderr, (args, proc.stderr)
    # the embedded cluster was never started: it would have made its ipyparallel folder
    assert not (state / "ipython").exists()
    assert_only_the_registry_in(home)


def assert_only_the_registry_in(home: Path) -> None:
    """The home folder holds nothing but opf's registry of the runs that copy back
    (:mod:`opals_dsl.runtime.writers`), and no registration in it: the runs are over; and
    the parser opf built, kept for its next command (:mod:`opals_dsl.lang.parse`)."""
    left = sorted(str(p.relative_to(home)) for p in home.rglob("*"))
    parser = [p for p in left if re.fullmatch(r"\.cache/opf/parser-[0-9a-f]+\.lark(\.lock)?", p)]
    assert len(parser) in (0, 2), left
    assert [p for p in left if p not in parser] == [
        ".cache", ".cache/opf", ".cache/opf/writing", ".cache/opf/writing/.lock"]


def test_verbose_says_where_the_time_went_and_the_cluster_is_gone(tmp_path):
    """``opf run -v`` prints the run's phases on standard error; the embedded cluster has no
    more engines than tasks to run; after the run no process of it is left, also when the
    cluster was started while the pipeline compiled (a first run) and the pipeline then did
    not compile: that start is cancelled, and the state folder the run made is removed."""
    home = tmp_path / "home"
    home.mkdir()
    path = write_pipeline(tmp_path / "p", QUICK, inputs=1)
    state = tmp_path / "p" / ".opf"
    proc = subprocess.run(opf_args(str(path), "-v"), cwd=tmp_path,
                          env=clean_env(home), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # one engine per core, but no more than there are tasks to run
    assert "quick: 1 task on 1 engine (1 machine)" in proc.stderr
    phases = proc.stderr[proc.stderr.index("time since opf started"):]
    for phase in ("imports", "compile", "decide", "cluster start", "engines ready", "run",
                  "stop", "total"):
        assert f"\n  {phase} " in phases, phases
    assert (tmp_path / "p" / "results" / "s1.a").is_file()
    assert not (state / "cluster.json").exists()
    assert processes_using(state / "ipython") == []

    broken = write_pipeline(tmp_path / "b", QUICK.replace("step copy", "step copy copy"),
                            inputs=1)
    proc = subprocess.run(opf_args(str(broken), "-v"), cwd=tmp_path,
                          env=clean_env(home), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "\n  compile " in proc.stderr, proc.stderr
    assert not (tmp_path / "b" / ".opf").exists()
    assert processes_using(tmp_path / "b" / ".opf" / "ipython") == []


def test_engines_send_plain_tracebacks_and_receive_functions_by_name(cluster):
    executor = IPyParallelExecutor(cluster.client(), timeout=30)
    try:
        engine = min(executor.engines())
        with pytest.raises(Exception) as info:
            executor.client[engine].apply_sync(EngineCall("builtins:int"), "not a number")
        assert info.value.ename == "ValueError"
        assert "\x1b[" not in "".join(info.value.traceback)
        assert "not a number" in "".join(info.value.traceback)
        machines = {e.machine.split(":", 1)[1] for e in executor.engines().values()}
        assert {Path(m).name for m in machines} == {"m1", "m2"}
    finally:
        executor.close()
    data = pickle.dumps(RUN_TASKS)
    assert len(data) < 200 and b"run_tasks" in data
    assert pickle.loads(data)([]) == []


def test_stop_leftover_cluster_only_touches_the_recorded_processes(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        created = psutil.Process(sleeper.pid).create_time()
        record = {"cluster_id": "x", "profile_dir": str(tmp_path / "profile"), "processes": [
            {"pid": sleeper.pid, "created": created},
            # the pid of a live process, but not the process recorded (its pid was reused)
            {"pid": other.pid, "created": created - 1000},
        ]}
        (tmp_path / "cluster.json").write_text(json.dumps(record))
        assert stop_leftover_cluster(tmp_path) is True
        assert sleeper.wait(timeout=10) is not None
        assert other.poll() is None
        assert not (tmp_path / "cluster.json").exists()
        assert stop_leftover_cluster(tmp_path) is False
    finally:
        for p in (sleeper, other):
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.parametrize("ending", ["run", "marked"])
def test_what_a_process_starts_while_it_is_ended_is_ended_too(tmp_path, ending):
    """Ending a run (or the processes of a mark, as a lifeline ends a dead engine's steps)
    looks again once what it found has ended: a process that starts another as it ends (an
    engine starting its nanny when the stop comes) leaves nothing running."""
    marker = "ending-" + os.urandom(4).hex()
    script = (
        "import signal, subprocess, sys, time\n"
        "def on_term(*_):\n"
        "    child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],\n"
        "                             start_new_session=True)\n"
        "    open(sys.argv[1], 'w').write(str(child.pid))\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, on_term)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n")
    note = tmp_path / "child"
    proc = subprocess.Popen([sys.executable, "-c", script, str(note)], stdout=subprocess.PIPE,
                            env=dict(os.environ, OPF_RUN_ID=marker), start_new_session=True)
    child = None
    try:
        assert proc.stdout.readline() == b"ready\n"
        record = {"pid": proc.pid, "created": psutil.Process(proc.pid).create_time()}
        if ending == "run":
            ended = {p.pid for p in end_run([record], marker, grace=5.0)}
        else:
            ended = set(end_marked("OPF_RUN_ID", marker, grace=5.0))
        assert proc.wait(timeout=10) == 0  # it ended by its handler, having started a child
        child = int(note.read_text())
        assert ended == {proc.pid, child}
        assert process_gone(child, wait=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if child is not None and not process_gone(child, wait=0.1):
            os.kill(child, signal.SIGKILL)


def test_a_cluster_that_cannot_start_exits_3_and_leaves_nothing(tmp_path):
    path = write_pipeline(tmp_path / "p", QUICK, inputs=1)
    home = tmp_path / "home"
    home.mkdir()
    state = tmp_path / "p" / ".opf"
    # engines cannot register within a hundredth of a second
    proc = subprocess.run(opf_args(str(path), "-n", "1", "--timeout", "0.01"), cwd=tmp_path,
                          env=clean_env(home), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert "could not start a local ipyparallel cluster of 1 engine" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "p" / "results").exists()
    assert not (state / "cluster.json").exists()
    assert processes_using(state / "ipython") == []


def test_engines_without_opf_are_refused_with_exit_3(tmp_path):
    # this engine's Python finds a broken opals_dsl first, as a machine without opf would fail
    fake = tmp_path / "fake" / "opals_dsl"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('opf is not installed here')\n")
    small = EngineCluster(root=tmp_path / "c", profile_dir=tmp_path / "c" / "profile",
                          cluster_id="noopf",
                          env=dict(os.environ, IPYTHONDIR=str(tmp_path / "c" / "ipython"),
                                   PYTHONPATH=str(tmp_path / "fake")))
    small.root.mkdir()
    try:
        small.start_controller()
        small.start_engine(tmp_path / "c" / "scratch")
        small.wait_for_engines(1)
        path = write_pipeline(tmp_path / "p", QUICK, inputs=1)
        proc = subprocess.run(opf_args(str(path), "--cluster-file", str(small.client_file)),
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 3, proc.stderr
        assert "engine 0 cannot run opf tasks" in proc.stderr
        assert "opf is not installed here" in proc.stderr
        assert not (tmp_path / "p" / "results").exists()
    finally:
        small.stop()
