"""Many machines for real: ``opf run --engines ssh:...`` on three hosts of their own.

Each test gets three fresh hosts (:mod:`hosts`: network, UTS and mount namespaces with their own
host name, ``/tmp`` and sshd, joined to this side by veth links in 198.18.0.0/15) and runs
``opf run`` as a real subprocess here, with the project folder as the shared drive. The
pipelines live in ``<repo>/.opf-hosts/`` (not under /tmp, which each host has its own of).

* the Job Prephase runs once per host, tasks spread over all hosts, outputs equal a local run's;
* a host lost mid-run (its link cut, or every process in it killed): its tasks run again on the
  others and the run ends with exit 0 (the time from loss to re-submission is printed);
* a host that cannot be reached at start, or lacks the engines' Python or opf: exit 3 with a
  message naming it and what to check;
* Ctrl-C: exit 130, and nothing opf started is left on any host or here;
* the hosts of a test session killed with SIGKILL are removed by the next session.

Root only (CI runs as root), and marked ``hosts``: the README's ``pytest`` leaves them out,
``.ci/run`` runs them after it (``pytest -m "hosts or slurm"``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import hosts as hostlib
import pytest
from conftest import REPO, files_under, kill_run_and_its_lifeline, last_run, write_pipeline
from hosts import Host, Hosts, missing

WHY = missing()
pytestmark = [pytest.mark.hosts, pytest.mark.skipif(WHY is not None, reason=WHY or "")]

#: a step that says where it runs (a file ``<marks>/<input>@<host>``), waits, then copies
HOST_TOOL = """
import os, socket, sys, time

marks, seconds, src, dst = sys.argv[1:5]
name = os.path.basename(src) + "@" + socket.gethostname()
open(os.path.join(marks, name), "w").close()
time.sleep(float(seconds))
with open(dst, "w") as f:
    f.write("copied:" + open(src).read())
"""

SPREAD = """
pipeline spread
job work for s in "data/*.txt" {
    shared tool = "tool.py"
    shared cfg  = "cfg.txt"
    output "results" by step
    step copy {
        out a = "{s.stem}.a"
        run python {tool} sleepcopy 0.3 {s} {a}
    }
    step again {
        out b = "{s.stem}.b"
        run python {tool} copy {copy.a} {b}
    }
}
job all {
    shared tool = "tool.py"
    output "results" flat
    step merge {
        out m = "merged.txt"
        run python {tool} merge {m} {work.again.b}
    }
}
"""

MARKED = """
pipeline marked
param marks = "{marks}"
param seconds = {seconds}
job work for s in "data/*.txt" {{
    shared tool = "hosttool.py"
    output "results" flat
    step wait {{
        out a = "{{s.stem}}.a"
        run python {{tool}} {{marks}} {{seconds}} {{s}} {{a}}
    }}
}}
"""

HOSTS = ("opfhost1", "opfhost2", "opfhost3")


@pytest.fixture(scope="session")
def session_folder() -> Iterator[Path]:
    """``<repo>/.opf-hosts/<pid>``: the shared drive of this session's hosts (and the folders
    of sessions that were killed before they could remove theirs are removed)."""
    folder = REPO / ".opf-hosts" / str(os.getpid())
    if folder.parent.is_dir():
        for old in folder.parent.iterdir():
            if old.name.isdigit() and not hostlib._alive(int(old.name)):
                shutil.rmtree(old, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        with_parent = folder.parent
        if with_parent.is_dir() and not any(with_parent.iterdir()):
            with_parent.rmdir()


@pytest.fixture
def shared(session_folder: Path, request: pytest.FixtureRequest) -> Path:
    """A folder on the shared drive for this test."""
    folder = session_folder / re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


@pytest.fixture
def hosts(shared: Path) -> Iterator[Hosts]:
    """Three hosts, stopped (every process in them killed) when the test ends, however."""
    made = Hosts(shared / "hosts", names=HOSTS)
    made.start()
    try:
        yield made
    finally:
        made.stop()


def run_env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("IPYTHONDIR", "OPF_SCRATCH"):
        env.pop(name, None)
    return env


def opf(*args: str) -> list[str]:
    return [sys.executable, "-m", "opals_dsl", "run", *args]


def trace(state: Path) -> list[dict]:
    return [json.loads(line) for line in (last_run(state) / "trace.jsonl").read_text().splitlines()
            if line]


def host_of(machine: str | None) -> str:
    return (machine or "").partition(":")[0]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def nothing_left(hosts: list[Host], state: Path) -> None:
    """No process opf started is left on these hosts (only sshd listens there), none here (the
    controller, ssh sessions), and no ipyparallel folder on any of them. No engine and no
    engine's nanny outlives opf at all: the hosts are asked while opf has just returned (the
    ssh sessions that carried them may take a moment to close)."""
    for host in hosts:
        engines = [(pid, cmd) for pid, cmd in host.processes() if "ipyparallel" in cmd]
        assert engines == [], f"ipyparallel processes outlive opf on {host.name}: {engines}"
    for host in hosts:
        wait_for(lambda h=host: h.processes() == [], 30,
                 f"the processes opf started on {host.name} to end: {host.processes()}")
        leftover = host.run("sh", "-c", "ls -d /tmp/opf-* 2>/dev/null", check=False)
        assert leftover.stdout.strip() == "", leftover.stdout
    import psutil

    mine = []
    for proc in psutil.process_iter(["environ", "cmdline"]):
        try:
            env = proc.info["environ"] or {}
            if env.get("IPYTHONDIR") == str(state / "ipython"):
                mine.append(proc)
        except psutil.Error:
            continue
    assert mine == []
    assert not (state / "launched.json").exists()


def engine_start_seconds(stderr: str) -> float | None:
    m = re.search(r"engines? on \d+ machines? ready in ([\d.]+) s", stderr)
    return float(m.group(1)) if m else None


def test_job_prephase_once_per_host_tasks_on_every_host_outputs_as_a_local_run(
        hosts: Hosts, shared: Path):
    path = write_pipeline(shared / "p", SPREAD, inputs=12)
    (shared / "p" / "cfg.txt").write_text("cell 1.0\n")
    local = shared / "local"
    shutil.copytree(shared / "p", local)
    state = shared / "p" / ".opf"

    # one engine per core on each host: HOST without :N
    proc = subprocess.run(
        opf(str(path), "--engines", ",".join(("ssh:" + HOSTS[0], *HOSTS[1:])),
            "--ssh-config", str(hosts.ssh_config), "--timeout", "300", "-v"),
        cwd=shared, env=run_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    cores = len(os.sched_getaffinity(0))
    assert f"{3 * cores} engines on 3 machines ready" in proc.stderr
    # -v shows where the time went, the engines' start over SSH and their stop included
    phases = {m.group(1) for m in re.finditer(r"^  (engines ready|run|stop) +[\d.]+ →",
                                              proc.stderr, re.M)}
    assert phases == {"engines ready", "run", "stop"}, proc.stderr
    assert ("opf: asking opfhost1, opfhost2, opfhost3 over SSH for their cores and the "
            "engines' Python\nopf: controller listening on 198.18.0.1;") in proc.stderr
    print(f"\n{3 * cores} engines over SSH on 3 hosts ready in "
          f"{engine_start_seconds(proc.stderr)} s")

    rows = trace(state)
    prephase = [r for r in rows if r["node"] == "stage:work"]
    done = sorted(host_of(r["machine"]) for r in prephase if r["status"] == "done")
    assert done == list(HOSTS)  # copied once on each host, never twice
    assert {r["status"] for r in prephase} <= {"done", "cached"}
    ran_on = {host_of(r["machine"]) for r in rows if r["node"].startswith("exec:work/")}
    assert ran_on == set(HOSTS)
    for host in hosts.hosts:  # each host's job folder (one per shared content) is on its /tmp
        assert host.run("sh", "-c", "cat /tmp/opf/spread/work/*/cfg.txt").stdout == "cell 1.0\n"

    # the same pipeline on this machine alone gives the same bytes
    ref = subprocess.run(opf(str(local / "p.opf"), "-n", "2", "--scratch",
                             str(shared / "scratch")),
                         cwd=shared, env=run_env(), capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    got = {p.relative_to(shared / "p" / "results"): p.read_bytes()
           for p in files_under(shared / "p" / "results")}
    want = {p.relative_to(local / "results"): p.read_bytes()
            for p in files_under(local / "results")}
    assert got == want
    assert len(got) == 12 * 2 + 1
    nothing_left(hosts.hosts, state)


@pytest.mark.parametrize("how", ["link", "kill", "engine"])
def test_a_host_lost_mid_run_its_tasks_run_again_on_the_others(
        hosts: Hosts, shared: Path, how: str):
    marks = shared / "marks"
    marks.mkdir()
    path = write_pipeline(shared / "p", MARKED.format(marks=marks, seconds=4), inputs=3)
    (shared / "p" / "hosttool.py").write_text(HOST_TOOL)
    state = shared / "p" / ".opf"
    driver = subprocess.Popen(
        opf(str(path), "--engines", "ssh:opfhost1:1,opfhost2:1,opfhost3:1",
            "--ssh-config", str(hosts.ssh_config), "--timeout", "300"),
        cwd=shared, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: any(p.name.endswith("@opfhost2") for p in marks.iterdir()), 300,
                 "a task to start on opfhost2")
        lost_task = next(p.name for p in marks.iterdir() if p.name.endswith("@opfhost2"))
        lost_task = lost_task.partition(".")[0]
        lost_at = time.time()
        if how == "link":
            hosts["opfhost2"].link_down()
        elif how == "kill":
            hosts["opfhost2"].kill_all()
        else:  # its engine alone (kill -9), the host and its sshd stay
            for pid, cmd in hosts["opfhost2"].processes():
                if "ipyparallel.engine" in cmd and "nanny" not in cmd:
                    os.kill(pid, signal.SIGKILL)
        out, err = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode == 0, err
    assert "Traceback" not in err
    assert "lost" in err
    results = shared / "p" / "results"
    assert {p.name: p.read_text() for p in results.iterdir()} == {
        f"s{i}.a": f"copied:strip {i}\n" for i in range(1, 4)}

    rows = trace(state)
    lost = [r for r in rows if r["status"] == "lost"]
    assert lost and {host_of(r["machine"]) for r in lost} == {"opfhost2"}
    assert lost_task in {r["task"] for r in lost}
    again = [r for r in rows if r["node"] == f"stage:work/{lost_task}" and r["status"] == "done"
             and host_of(r["machine"]) != "opfhost2" and r["start"] >= lost_at]
    assert again, f"{lost_task} did not run again on another host"
    noticed = max(r["end"] for r in lost if r["task"] == lost_task) - lost_at
    resubmitted = min(r["start"] for r in again) - lost_at
    print(f"\n3 engines over SSH on 3 hosts ready in {engine_start_seconds(err)} s; [{how}] "
          f"{lost_task}: loss noticed after {noticed:.1f} s, running again on another host "
          f"after {resubmitted:.1f} s")
    alive = [h for h in hosts.hosts if h.name != "opfhost2"]
    for host in alive:
        wait_for(lambda h=host: h.processes() == [], 30,
                 f"the processes opf started on {host.name} to end")


def test_a_host_that_cannot_be_reached_at_start_exits_3(hosts: Hosts, shared: Path):
    path = write_pipeline(shared / "p", SPREAD, inputs=2)
    (shared / "p" / "cfg.txt").write_text("cell 1.0\n")
    hosts["opfhost3"].link_down()  # up, but answers nothing
    t0 = time.monotonic()
    proc = subprocess.run(
        opf(str(path), "--engines", "ssh:opfhost1:1,opfhost2:1,opfhost3:1",
            "--ssh-config", str(hosts.ssh_config), "--timeout", "60"),
        cwd=shared, env=run_env(), capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    print(f"\nexit {proc.returncode} after {took:.1f} s")
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "cannot reach opfhost3 over SSH" in proc.stderr
    assert f"ssh -F {hosts.ssh_config} opfhost3 true" in proc.stderr
    assert not (shared / "p" / "results").exists()
    nothing_left([h for h in hosts.hosts if h.name != "opfhost3"], shared / "p" / ".opf")


def test_hosts_without_n_start_no_more_engines_than_the_run_has_tasks(hosts: Hosts,
                                                                       shared: Path):
    """``ssh:HOST`` without ``:N`` means one engine per core, but a run of one task starts one
    engine a host (the run decided what to run before the hosts were asked: its state folder
    exists, so the cluster does not start while the pipeline compiles)."""
    marks = shared / "marks"
    marks.mkdir()
    path = write_pipeline(shared / "p", MARKED.format(marks=marks, seconds=0), inputs=1)
    (shared / "p" / "hosttool.py").write_text(HOST_TOOL)
    (shared / "p" / ".opf").mkdir()
    proc = subprocess.run(
        opf(str(path), "--engines", "ssh:opfhost1,opfhost2", "--ssh-config",
            str(hosts.ssh_config), "--timeout", "300"),
        cwd=shared, env=run_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "starting 2 engines over SSH: opfhost1 (1), opfhost2 (1)" in proc.stderr
    assert (shared / "p" / "results" / "s1.a").read_text() == "copied:strip 1\n"
    nothing_left(hosts.hosts, shared / "p" / ".opf")


def test_engines_that_do_not_register_in_time_ask_for_a_longer_timeout(hosts: Hosts,
                                                                       shared: Path):
    """The hosts answered over SSH, so a timeout too short is the first thing to check (here
    the engines' Python answers the hosts' check, but an engine never starts)."""
    path = write_pipeline(shared / "p", SPREAD, inputs=1)
    (shared / "p" / "cfg.txt").write_text("cell 1.0\n")
    python = shared / "slow-python"
    python.write_text(f"#!/bin/sh\ncase \"$*\" in *ipyparallel.engine*) exec sleep 120;; esac\n"
                      f"exec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    proc = subprocess.run(
        opf(str(path), "--engines", "ssh:opfhost1:1", "--ssh-config", str(hosts.ssh_config),
            "--remote-python", str(python), "--timeout", "15"),
        cwd=shared, env=run_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "no engine registered within 15 s (--timeout)" in proc.stderr
    assert "Check: a longer --timeout" in proc.stderr
    nothing_left(hosts.hosts, shared / "p" / ".opf")


def test_ctrl_c_stops_the_run_and_every_engine_on_every_host(hosts: Hosts, shared: Path):
    marks = shared / "marks"
    marks.mkdir()
    path = write_pipeline(shared / "p", MARKED.format(marks=marks, seconds=60), inputs=6)
    (shared / "p" / "hosttool.py").write_text(HOST_TOOL)
    driver = subprocess.Popen(
        opf(str(path), "--engines", "ssh:opfhost1:1,opfhost2:1,opfhost3:1",
            "--ssh-config", str(hosts.ssh_config), "--timeout", "300"),
        cwd=shared, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(list(marks.iterdir())) == 3, 300, "a task on every host")
        driver.send_signal(signal.SIGINT)
        out, err = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode == 130, err
    assert "Traceback" not in err
    nothing_left(hosts.hosts, shared / "p" / ".opf")


def _of_cluster(cluster_id: str) -> list[int]:
    """The processes (on every host: they share this side's process ids) whose environment
    names ipyparallel cluster ``cluster_id``."""
    import psutil

    found = []
    for proc in psutil.process_iter(["environ"]):
        with contextlib.suppress(psutil.Error):
            if (proc.info["environ"] or {}).get("IPP_CLUSTER_ID") == cluster_id:
                found.append(proc.pid)
    return found


def _three_hosts_busy(hosts: Hosts, shared: Path) -> tuple[Path, list[str], subprocess.Popen]:
    """An ``opf run`` with a task sleeping 90 s on each of three hosts, once all three run:
    the pipeline, the engines' flags and opf's process."""
    marks = shared / "marks"
    marks.mkdir()
    path = write_pipeline(shared / "p", MARKED.format(marks=marks, seconds=90), inputs=3)
    (shared / "p" / "hosttool.py").write_text(HOST_TOOL)
    engines = ["--engines", "ssh:opfhost1:1,opfhost2:1,opfhost3:1",
               "--ssh-config", str(hosts.ssh_config), "--timeout", "300"]
    driver = subprocess.Popen(opf(str(path), *engines), cwd=shared, env=run_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(list(marks.iterdir())) == 3, 300, "a task on every host")
    except BaseException:
        driver.kill()
        driver.wait()
        raise
    return path, engines, driver


def test_the_engines_of_a_killed_run_are_ended_by_its_lifeline(hosts: Hosts, shared: Path):
    """``kill -9`` of opf: its launched cluster's lifeline ends the engines on every host
    within seconds, without another run, and none of them copies a result back."""
    state = shared / "p" / ".opf"
    _path, _engines, driver = _three_hosts_busy(hosts, shared)
    try:
        old = json.loads((state / "launched.json").read_text())["cluster_id"]
        assert len(_of_cluster(old)) >= 3
    finally:
        driver.kill()
        driver.wait()
    wait_for(lambda: _of_cluster(old) == [], 60, "the lifeline to end the engines")
    wait_for(lambda: not (state / "launched.json").exists(), 30, "the lifeline to finish")
    assert not (shared / "p" / "results").exists() or files_under(shared / "p" / "results") == []
    nothing_left(hosts.hosts, state)


def test_the_engines_of_a_killed_run_are_ended_by_the_next_run(hosts: Hosts, shared: Path):
    """``kill -9`` of opf and of its lifeline (its machine crashed) leaves its engines on the
    hosts, running their tasks; the next run in the state folder ends them before it decides
    what to run, so that none of them copies back behind its back (the old steps would sleep
    a minute more)."""
    state = shared / "p" / ".opf"
    path, engines, driver = _three_hosts_busy(hosts, shared)
    try:
        record = json.loads((state / "launched.json").read_text())
        kill_run_and_its_lifeline(driver)
        old = record["cluster_id"]
        assert sorted(host_of(r["ssh"][-1]) for r in record["ssh_engines"]) == list(HOSTS)
        assert {r["pid"] for r in record["ssh_engines"]} <= set(_of_cluster(old))
        proc = subprocess.run(opf(str(path), "-p", "seconds=0", *engines), cwd=shared,
                              env=run_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
        # at once, not after their heartbeat ran out: nothing of the killed run's cluster
        assert _of_cluster(old) == []
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    results = shared / "p" / "results"
    assert {p.name: p.read_text() for p in results.iterdir()} == {
        f"s{i}.a": f"copied:strip {i}\n" for i in range(1, 4)}
    nothing_left(hosts.hosts, state)


def test_hosts_of_a_killed_session_are_removed_by_the_next(shared: Path):
    maker = subprocess.Popen([sys.executable, str(REPO / "tests" / "hosts.py"),
                              str(shared / "hosts")], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        lines = [maker.stdout.readline() for _ in range(4)]  # the ssh config, three hosts
    finally:
        maker.kill()  # SIGKILL: no teardown of any kind
        maker.wait()
    holders = [int(line.split()[2]) for line in lines[1:]]
    assert all(hostlib._alive(pid) for pid in holders), lines
    namespaces = {hostlib._netns(pid) for pid in holders}

    hostlib.acquire()  # what the next session's fixture does first
    hostlib.release()
    wait_for(lambda: not any(hostlib._alive(pid) for pid in holders), 30, "the holders to go")
    for ns in namespaces:
        assert hostlib.pids_in_netns(ns) == []
    for i in (1, 2, 3):
        wait_for(lambda i=i: subprocess.run(["ip", "link", "show", f"opfv{i}"],
                                            capture_output=True).returncode != 0,
                 30, f"link opfv{i} to go")


@pytest.mark.parametrize(("python", "says"), [
    ("/no/such/python", "opfhost1 cannot run /no/such/python: "),
    ("/usr/bin/python3", "the Python on opfhost1 (/usr/bin/python3) cannot import ipyparallel "
                         "and opf: ModuleNotFoundError: No module named"),
])
def test_a_host_without_the_engines_python_or_opf_exits_3(hosts: Hosts, shared: Path,
                                                          python: str, says: str):
    if python == "/usr/bin/python3" and not Path(python).exists():
        pytest.skip("no system Python at /usr/bin/python3")
    path = write_pipeline(shared / "p", SPREAD, inputs=1)
    (shared / "p" / "cfg.txt").write_text("cell 1.0\n")
    proc = subprocess.run(
        opf(str(path), "--engines", "ssh:opfhost1:1", "--ssh-config", str(hosts.ssh_config),
            "--remote-python", python),
        cwd=shared, env=run_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"opf: error: {says}" in proc.stderr
    assert "--remote-python" in proc.stderr
    nothing_left(hosts.hosts, shared / "p" / ".opf")
