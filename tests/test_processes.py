"""The processes a run starts live no longer than the run: signals, lost and frozen engines,
a killed driver, a task that kills its engine.

Every process ``opf run`` starts for a run — the embedded cluster's controller and engines and
every step, with all it starts in turn — carries the run's id in its environment
(``OPF_RUN_ID``). The tests learn the id from a step (``echo $OPF_RUN_ID``) and look for
processes by it, never by name. Runs are real ``opf run`` subprocesses on real engines; each
test ends whatever it started, also when it fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import EngineCluster, write_pipeline

from opals_dsl.runtime import batch
from opals_dsl.runtime.cluster import stop_leftover_cluster

# -- helpers -----------------------------------------------------------------------------------


def opf_run(path: Path, *args: str, **kw) -> subprocess.Popen:
    return python(path.parent, "-m", "opals_dsl", "run", str(path), *args, **kw)


def python(cwd: Path, *args: str, **kw) -> subprocess.Popen:
    """This Python, in a session of its own, without the scratch root and run id of ours."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPF_SCRATCH", "OPF_RUN_ID")}
    return subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)


def wait_for(predicate, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.05)


def carrying(marker: str) -> list[psutil.Process]:
    """Running processes (not zombies) whose environment has ``OPF_RUN_ID=marker``."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if (proc.environ().get("OPF_RUN_ID") == marker
                    and proc.status() != psutil.STATUS_ZOMBIE):
                found.append(proc)
    return found


def alive(pid: int, created: float) -> bool:
    try:
        proc = psutil.Process(pid)
        return (abs(proc.create_time() - created) < 0.01
                and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def read_when_there(path: Path, timeout: float = 90.0) -> str:
    wait_for(lambda: path.is_file() and path.read_text().strip(), timeout, str(path))
    return path.read_text().strip()


class Cleanup:
    """Ends, at the end of a test, the driver, every process of the run (by marker and by pid)
    and an embedded cluster recorded in the state folder."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.drivers: list[subprocess.Popen] = []
        self.markers: list[str] = []
        self.pids: list[int] = []

    def __call__(self) -> None:
        for driver in self.drivers:
            if driver.poll() is None:
                driver.kill()
            with contextlib.suppress(Exception):
                driver.communicate(timeout=10)
        procs = [p for m in self.markers for p in carrying(m)]
        for pid in self.pids:
            with contextlib.suppress(psutil.Error):
                procs.append(psutil.Process(pid))
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.resume()
                proc.kill()
        stop_leftover_cluster(self.state)


@pytest.fixture
def cleanup(tmp_path):
    c = Cleanup(tmp_path / "p" / ".opf")
    try:
        yield c
    finally:
        c()


# -- signals -------------------------------------------------------------------------------------

def shell(*commands: str) -> str:
    """A ``run sh`` script of several commands (doubled braces: it goes through format)."""
    return "; ".join(commands)


SLEEPER = """
pipeline sleeper
param marks = "{marks}"
job w for n in range(1) {{
    output "results" flat
    step wait {{
        out a = "{{n}}.txt"
        run sh "@SCRIPT@"
    }}
}}
""".replace("@SCRIPT@", shell("echo $OPF_RUN_ID > {{marks}}/run",
                             "sleep 1001 & echo $! > {{marks}}/sleep", "wait",
                             "echo late > {{a}}"))


def sleeping_step(driver: subprocess.Popen, marks: Path,
                  cleanup: Cleanup) -> tuple[int, float, str]:
    """Once the SLEEPER step sleeps: its ``sleep`` (process id, start time) and the run's
    marker; the driver, the sleep and the marker are left to ``cleanup``."""
    cleanup.drivers.append(driver)
    sleeper = int(read_when_there(marks / "sleep"))
    cleanup.pids.append(sleeper)
    marker = read_when_there(marks / "run")
    cleanup.markers.append(marker)
    return sleeper, psutil.Process(sleeper).create_time(), marker


@pytest.mark.parametrize("sig, where", [(signal.SIGINT, "embedded"),
                                        (signal.SIGTERM, "embedded"),
                                        (signal.SIGHUP, "embedded"),
                                        (signal.SIGINT, "session")])
def test_a_signal_to_opf_run_ends_every_process_of_the_run(cluster, tmp_path, cleanup, sig,
                                                           where):
    marks = tmp_path / "marks"
    marks.mkdir()
    path = write_pipeline(tmp_path / "p", SLEEPER.format(marks=marks), inputs=0)
    args = ["-n", "1"] if where == "embedded" else ["--cluster-file", str(cluster.client_file)]
    scratch = tmp_path / "scratch"
    driver = opf_run(path, *args, "--scratch", str(scratch))
    sleeper, sleep_created, marker = sleeping_step(driver, marks, cleanup)
    assert carrying(marker), "the step carries the run's marker"

    driver.send_signal(sig)
    _out, err = driver.communicate(timeout=90)
    assert driver.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    # the step (sh) and what it started (sleep) are gone, and so is every process of the run
    wait_for(lambda: not alive(sleeper, sleep_created), 15, "the step's sleep to end")
    wait_for(lambda: not carrying(marker), 15, "the run's processes to end")
    assert not (tmp_path / "p" / "results").exists()
    # the interrupted task's folder (the job folder's one sub-folder) is gone too
    [job_folder] = [p for p in (scratch / "opf" / "sleeper" / "w").iterdir()
                    if p.is_dir() and not p.name.startswith(".")]
    assert [p.name for p in job_folder.iterdir() if p.is_dir()] == [], \
        "the interrupted task's folder was left in scratch"


# -- a killed engine ---------------------------------------------------------------------------

ORPHAN = """
pipeline orphan
param marks = "{marks}"
job w for n in range(2) {{
    output "results" flat
    step wait {{
        out a = "{{n}}.txt"
        run sh "@SCRIPT@"
    }}
}}
""".replace("@SCRIPT@", shell("if [ -e {{marks}}/tried-{{n}} ]; then echo ok > {{a}}; exit 0; fi",
            "touch {{marks}}/tried-{{n}}", "echo $PPID > {{marks}}/engine-{{n}}",
            "sleep 1001 & echo $! > {{marks}}/sleep-{{n}}", "wait",
            "echo late > {{marks}}/late-{{n}}", "echo late > {{a}}"))


def test_kill_9_of_an_engine_ends_the_step_it_was_running(tmp_path, cleanup):
    marks = tmp_path / "marks"
    marks.mkdir()
    path = write_pipeline(tmp_path / "p", ORPHAN.format(marks=marks), inputs=0)
    driver = opf_run(path, "-n", "2")
    cleanup.drivers.append(driver)
    engine = int(read_when_there(marks / "engine-0"))
    sleeper = int(read_when_there(marks / "sleep-0"))
    cleanup.pids.append(sleeper)
    created = psutil.Process(sleeper).create_time()
    other = int(read_when_there(marks / "sleep-1"))
    cleanup.pids.append(other)
    os.kill(other, signal.SIGTERM)  # the other task finishes ("late"): the run can end

    os.kill(engine, signal.SIGKILL)
    wait_for(lambda: not alive(sleeper, created), 15, "the killed engine's step to end")
    _out, err = driver.communicate(timeout=120)
    assert driver.returncode == 0, err
    assert "engine" in err and "was lost; 1 task goes to other engines" in err
    assert (tmp_path / "p" / "results" / "0.txt").read_text() == "ok\n"
    time.sleep(0.5)
    assert not (marks / "late-0").exists()  # the orphan never got to write


# -- a frozen engine -----------------------------------------------------------------------------

FROZEN = """
pipeline frozen
param marks = "{marks}"
job w for n in range(1) {{
    output "results" flat
    step wait {{
        out a = "{{n}}.txt"
        run sh "echo $PPID >> {{marks}}/engines; sleep 2; echo ok > {{a}}"
    }}
}}
"""


@pytest.mark.slow
def test_a_frozen_engine_is_taken_for_lost_and_its_task_runs_elsewhere(tmp_path, cleanup):
    marks = tmp_path / "marks"
    marks.mkdir()
    path = write_pipeline(tmp_path / "p", FROZEN.format(marks=marks), inputs=0)
    driver = opf_run(path, "-n", "2")
    cleanup.drivers.append(driver)
    frozen = int(read_when_there(marks / "engines").split()[0])
    cleanup.pids.append(frozen)
    os.kill(frozen, signal.SIGSTOP)
    try:
        out, err = driver.communicate(timeout=90)  # before: blocked on the task's lock
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(frozen, signal.SIGCONT)
    assert driver.returncode == 0, err
    assert "was lost; 1 task goes to other engines" in err
    assert f"its process {frozen} on this machine was stopped; it was killed" in err
    assert (tmp_path / "p" / "results" / "0.txt").read_text() == "ok\n"
    assert "stale" not in out + err
    wait_for(lambda: not psutil.pid_exists(frozen)
             or psutil.Process(frozen).status() == psutil.STATUS_ZOMBIE, 10, "engine gone")


def _other_host_engine(cluster: EngineCluster, scratch: Path) -> subprocess.Popen:
    """An engine that says it runs on another machine (a UTS namespace of its own)."""
    scratch.mkdir(parents=True, exist_ok=True)
    engine = [sys.executable, "-m", "ipyparallel.engine", f"--profile-dir={cluster.profile_dir}",
              f"--cluster-id={cluster.cluster_id}", "--log-level=WARN"]
    proc = subprocess.Popen(
        ["unshare", "--uts", "sh", "-c", 'hostname opf-elsewhere && exec "$@"', "sh", *engine],
        env=dict(cluster.env, OPF_SCRATCH=str(scratch)), cwd=cluster.root,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    cluster.engines.append(proc)
    return proc


def _can_unshare() -> bool:
    try:
        done = subprocess.run(["unshare", "--uts", "hostname", "x"], capture_output=True,
                              timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@pytest.mark.slow
def test_a_frozen_engine_elsewhere_that_comes_back_is_waited_for_quietly(tmp_path, cleanup):
    """Engines on another machine cannot be killed from here: the retry waits for the task's
    lock while the frozen engine holds it; once it resumes, its late answer is dropped
    without a word (ipyparallel would print it as a "stale result")."""
    if not _can_unshare():
        pytest.skip("cannot start a process with a host name of its own here")
    remote = EngineCluster(root=tmp_path / "c", profile_dir=tmp_path / "c" / "profile",
                           cluster_id="far",
                           env=dict(os.environ, IPYTHONDIR=str(tmp_path / "c" / "ipython")))
    remote.root.mkdir()
    marks = tmp_path / "marks"
    marks.mkdir()
    try:
        remote.start_controller()
        for _ in range(2):  # two engines of one machine: one scratch root
            _other_host_engine(remote, tmp_path / "c" / "scratch")
        remote.wait_for_engines(2)
        path = write_pipeline(tmp_path / "p", FROZEN.format(marks=marks), inputs=0)
        driver = opf_run(path, "--cluster-file", str(remote.client_file))
        cleanup.drivers.append(driver)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(driver.stderr), daemon=True)
        reader.start()
        frozen = int(read_when_there(marks / "engines").split()[0])
        os.kill(frozen, signal.SIGSTOP)
        try:
            wait_for(lambda: any("was lost" in line for line in lines), 60, "the loss")
            time.sleep(1.0)  # the task is sent again and waits for its folder's lock
        finally:
            os.kill(frozen, signal.SIGCONT)
        out = driver.stdout.read()
        driver.wait(timeout=90)
        reader.join(timeout=10)
        err = "".join(lines)
        assert driver.returncode == 0, err
        assert "stale" not in out + err, out
        assert (tmp_path / "p" / "results" / "0.txt").read_text() == "ok\n"
        assert "was killed" not in err  # not on this machine: left alone
    finally:
        remote.stop()


# -- a killed driver -----------------------------------------------------------------------------

LANDING = """
pipeline landing
param marks = "{marks}"
param go = "{go}"
job quick {{
    output "results" flat
    step make {{
        out a = "quick.txt"
        run sh "@QUICK@"
    }}
}}
job slow {{
    output "results" flat
    step make {{
        out b = "slow.txt"
        run sh "@SLOW@"
    }}
}}
""".replace("@QUICK@", shell("echo made > {{a}}", "touch {{marks}}/quick",
                           "while [ ! -e {{go}} ]; do sleep 0.05; done")).replace(
    "@SLOW@", shell("echo $OPF_RUN_ID > {{marks}}/run",
                    "if [ ! -e {{go}} ]; then sleep 1001 & echo $! > {{marks}}/sleep; wait; fi",
                    "echo made > {{b}}"))


@pytest.mark.slow
def test_kill_9_of_opf_run_ends_its_cluster_and_the_next_run_knows_what_landed(tmp_path,
                                                                              cleanup):
    marks = tmp_path / "marks"
    marks.mkdir()
    go = tmp_path / "go"
    path = write_pipeline(tmp_path / "p", LANDING.format(marks=marks, go=go), inputs=0)
    results = tmp_path / "p" / "results"
    state = tmp_path / "p" / ".opf"
    go.touch()
    first = opf_run(path, "-n", "2")
    cleanup.drivers.append(first)
    _out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    before = (results / "quick.txt").stat().st_mtime_ns
    for name in ("run", "quick"):
        (marks / name).unlink()

    go.unlink()
    driver = opf_run(path, "-n", "2", "--force")
    cleanup.drivers.append(driver)
    marker = read_when_there(marks / "run")
    cleanup.markers.append(marker)
    sleeper = int(read_when_there(marks / "sleep"))
    created = psutil.Process(sleeper).create_time()
    wait_for(lambda: (marks / "quick").exists(), 60, "the quick step")
    # the driver stops listening; the quick task's result lands meanwhile; then it is killed
    driver.send_signal(signal.SIGSTOP)
    go.touch()
    wait_for(lambda: (results / "quick.txt").stat().st_mtime_ns != before, 60, "the landing")
    receipts = state / "journal" / "landing.receipts"
    wait_for(lambda: receipts.is_dir() and any(
        '"quick/0"' in p.read_text() for p in receipts.iterdir()), 30, "the task's receipt")
    driver.send_signal(signal.SIGKILL)
    driver.communicate(timeout=30)

    # the embedded cluster dies with its driver, and with it the slow step
    wait_for(lambda: not carrying(marker), 15, "the killed run's processes to end")
    assert not alive(sleeper, created)

    # the result that landed is recognised; the slow task's result is the first run's
    dry = subprocess.run([sys.executable, "-m", "opals_dsl", "run", str(path), "--dry-run"],
                         cwd=path.parent, capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    table = {line.split()[1]: line.split(None, 2)[2] for line in dry.stdout.splitlines()[:-1]}
    assert table == {"quick/0": "unchanged", "slow/0": "unchanged"}, dry.stdout
    assert (results / "slow.txt").read_text() == "made\n"


ONE_TASK = """
pipeline p
job w for n in range(1) {
    output "results" flat
    step make {
        out a = "{n}.txt"
        run sh "echo made > {a}"
    }
}
"""


@pytest.mark.slow
def test_a_run_waits_for_the_lifeline_that_stops_what_a_killed_run_left(tmp_path, cleanup):
    """The lifeline of a run that launched its cluster elsewhere, once that run is dead, holds
    the state folder while it stops what the run's record names; a run started meanwhile waits
    for it, saying so, instead of being refused, and runs once it is done. The record names a
    controller that ignores SIGTERM (it gets SIGKILL) and a batch job whose cancel command
    waits for the test."""
    path = write_pipeline(tmp_path / "p", ONE_TASK, inputs=0)
    state = tmp_path / "p" / ".opf"
    state.mkdir()
    (state / "run.lock").touch()
    stubborn = python(tmp_path, "-c", "import signal, time; "
                      "signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True);"
                      " time.sleep(600)")
    cleanup.drivers.append(stubborn)
    assert stubborn.stdout.readline() == "ready\n"
    created = psutil.Process(stubborn.pid).create_time()
    go = tmp_path / "go"
    cancel = [sys.executable, "-c",
              f"import os, time\nwhile not os.path.exists({str(go)!r}): time.sleep(0.05)"]
    (state / "launched.json").write_text(json.dumps({
        "cluster_id": "opf-1-abcdef", "kind": "pbs", "driver": 1, "ssh_engines": [],
        "processes": [{"pid": stubborn.pid, "created": created}],
        "batch_job": {"kind": "pbs", "id": "1", "delete": cancel}}))

    lifeline = batch.start_lifeline(state)
    assert lifeline is not None and lifeline.stdin is not None
    cleanup.drivers.append(lifeline)
    lifeline.stdin.close()  # its run is gone, without a word
    wait_for(lambda: batch.ENDING in (state / "run.lock").read_text(), 30, "the lifeline's lock")
    driver = opf_run(path)
    cleanup.drivers.append(driver)
    assert driver.stderr is not None
    said = driver.stderr.readline()
    assert said == f"opf: waiting for process {lifeline.pid}, {batch.ENDING} in this state " \
                   f"folder\n"
    wait_for(lambda: not alive(stubborn.pid, created), 30, "the killed run's controller to end")
    time.sleep(0.5)
    assert driver.poll() is None and lifeline.poll() is None  # the batch job's cancel waits
    go.touch()
    _out, err = driver.communicate(timeout=120)
    assert driver.returncode == 0, said + err
    assert (tmp_path / "p" / "results" / "0.txt").read_text() == "made\n"
    assert lifeline.wait(timeout=30) == 0
    assert not (state / "launched.json").exists()


WAITING = """
pipeline p
job w for n in range(1) {{
    output "results" flat
    step make {{
        out a = "{{n}}.txt"
        run sh "touch {started}; while [ ! -e {go} ]; do sleep 0.05; done; echo made > {{a}}"
    }}
}}
"""


def test_a_run_under_nohup_goes_on_through_a_hang_up(tmp_path, cleanup):
    """``nohup opf run ...`` ignores SIGHUP, and so does the run: a hang-up while its step runs
    changes nothing (without nohup it ends the run with status 130)."""
    started, go = tmp_path / "started", tmp_path / "go"
    path = write_pipeline(tmp_path / "p", WAITING.format(started=started, go=go), inputs=0)
    env = {k: v for k, v in os.environ.items() if k not in ("OPF_SCRATCH", "OPF_RUN_ID")}
    driver = subprocess.Popen(
        [sys.executable, "-m", "opals_dsl", "run", str(path), "-n", "1"], cwd=path.parent,
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    cleanup.drivers.append(driver)
    wait_for(started.exists, 120, "the step to start")
    driver.send_signal(signal.SIGHUP)
    time.sleep(1.0)
    assert driver.poll() is None
    go.touch()
    _out, err = driver.communicate(timeout=120)
    assert driver.returncode == 0, err
    assert (tmp_path / "p" / "results" / "0.txt").read_text() == "made\n"


SCRIPT = """
import sys
import ipyparallel
import opals_dsl as opf

client = ipyparallel.Client(sys.argv[2])
try:
    opf.run(sys.argv[1], client=client, progress=False)
except KeyboardInterrupt as stopped:
    print("interrupted", stopped.summary.exit_code, stopped.summary.done, flush=True)
    raise
print("went on after the run", flush=True)
"""


def test_ctrl_c_in_a_script_stops_the_run_and_the_script(cluster, tmp_path, cleanup):
    """``opf.run`` interrupted in a script stops the run as ``opf run`` does, then raises
    RunInterrupted (a KeyboardInterrupt): the script does not go on to what follows."""
    marks = tmp_path / "marks"
    marks.mkdir()
    path = write_pipeline(tmp_path / "p", SLEEPER.format(marks=marks), inputs=0)
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    driver = python(path.parent, str(script), str(path), str(cluster.client_file))
    sleeper, created, marker = sleeping_step(driver, marks, cleanup)

    driver.send_signal(signal.SIGINT)
    out, err = driver.communicate(timeout=90)
    assert out.splitlines() == ["interrupted 130 0"], (out, err)
    assert driver.returncode == -signal.SIGINT, err
    assert "KeyboardInterrupt: the run was interrupted: 0 of 1 tasks done" in err
    wait_for(lambda: not alive(sleeper, created), 15, "the step's sleep to end")
    wait_for(lambda: not carrying(marker), 15, "the run's processes to end")


STARTING = """
import sys
import opals_dsl as opf

try:
    opf.run(sys.argv[1], n=1, progress=False)
except KeyboardInterrupt as stopped:
    s = stopped.summary
    print("interrupted", s.exit_code, s.done, s.not_run, s.total, s.trace, flush=True)
    raise
"""


def test_ctrl_c_while_the_engines_start_still_gives_the_script_a_summary(tmp_path, cleanup):
    """``opf.run`` interrupted before any task ran (its embedded cluster still starting)
    raises a KeyboardInterrupt with a summary, as the docs' example reads it: nothing done,
    every task not run, no trace; and the run's records say interrupted."""
    marks = tmp_path / "marks"
    marks.mkdir()
    path = write_pipeline(tmp_path / "p", SLEEPER.format(marks=marks), inputs=0)
    script = tmp_path / "script.py"
    script.write_text(STARTING)
    driver = python(path.parent, str(script), str(path))
    cleanup.drivers.append(driver)
    state = path.parent / ".opf"
    wait_for(lambda: using(state / "ipython"), 60, "the cluster to begin its start")
    driver.send_signal(signal.SIGINT)
    out, err = driver.communicate(timeout=90)
    assert out.splitlines() == ["interrupted 130 0 1 1 None"], (out, err)
    assert driver.returncode == -signal.SIGINT, err
    assert "AttributeError" not in err
    assert not (marks / "run").exists()  # no step began
    run = json.loads(next((state / "runs" / "sleeper").glob("*/run.json")).read_text())
    assert run["status"] == "interrupted"
    wait_for(lambda: not using(state / "ipython"), 15, "the cluster's processes to end")


COMPILING = """
import sys
import opals_dsl as opf

run = opf.run
print("ready", flush=True)
try:
    run(sys.argv[1], n=1, progress=False)
except KeyboardInterrupt as stopped:
    s = stopped.summary
    print("interrupted", s.exit_code, s.done, s.total, s.trace, flush=True)
    raise
"""


def test_ctrl_c_while_the_pipeline_compiles_gives_a_summary_of_no_task(tmp_path, cleanup):
    """Interrupted before the run began (a pipeline of 400,000 tasks still being planned),
    ``opf.run`` raises a KeyboardInterrupt whose summary is of no task, and nothing started."""
    big = SLEEPER.format(marks=tmp_path).replace("range(1)", "range(400000)")
    path = write_pipeline(tmp_path / "p", big, inputs=0)
    script = tmp_path / "script.py"
    script.write_text(COMPILING)
    driver = python(path.parent, str(script), str(path))
    cleanup.drivers.append(driver)
    assert driver.stdout.readline() == "ready\n"
    time.sleep(0.5)
    driver.send_signal(signal.SIGINT)
    out, err = driver.communicate(timeout=90)
    assert out.splitlines() == ["interrupted 130 0 0 None"], (out, err)
    assert driver.returncode == -signal.SIGINT, err
    assert not (path.parent / ".opf" / "runs").exists()


# -- a task that kills its engine ---------------------------------------------------------------

BOMB = """
pipeline bomb
job w for n in range(1) {
    output "results" flat
    step boom {
        call bomb:boom()
    }
}
"""


def test_a_call_that_ends_its_engine_fails_its_task_by_name(tmp_path, cleanup):
    path = write_pipeline(tmp_path / "p", BOMB, inputs=0)
    (path.parent / "bomb.py").write_text("import os\n\ndef boom():\n    print('going')\n"
                                         "    os._exit(0)\n")
    driver = opf_run(path, "-n", "2")
    cleanup.drivers.append(driver)
    _out, err = driver.communicate(timeout=120)
    assert driver.returncode == 1, err
    assert "FAILED w/0: step boom" in err
    assert "the engine running this task was lost 2 times" in err
    assert "keeps killing its engine" in err
    assert "| $ call bomb:boom()" in err
    assert "every engine of the cluster was lost" not in err


# -- Ctrl-C while the embedded cluster starts ------------------------------------------------


def using(ipython_dir: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if (proc.environ().get("IPYTHONDIR") == str(ipython_dir)
                    and proc.status() != psutil.STATUS_ZOMBIE):
                found.append(proc)
    return found


@pytest.mark.parametrize("checks_before", [1, 2, 3])
def test_an_interrupted_cluster_start_stops_between_steps_and_leaves_nothing(
        tmp_path, capfd, checks_before):
    """Ctrl-C while the embedded cluster starts is only noted (``interrupted``); the start
    stops at its next step — before the controller, after it, after the engines — never
    inside ipyparallel's event loop (which left "Task exception was never retrieved"), and
    what it started is stopped."""
    import gc

    from opals_dsl.runtime.cluster import ClusterOptions
    from opals_dsl.runtime.connect import open_cluster

    state = tmp_path / "state"
    asked = []

    def interrupted() -> bool:
        asked.append(True)
        return len(asked) >= checks_before

    try:
        with pytest.raises(KeyboardInterrupt), open_cluster(ClusterOptions(engines=1), state,
                                                             interrupted=interrupted):
            pytest.fail("the cluster started although the start was interrupted")
        gc.collect()
        assert len(asked) == checks_before
        wait_for(lambda: not using(state / "ipython"), 15, "the cluster's processes to end")
        assert not (state / "cluster.json").exists()
        err = capfd.readouterr().err
        assert "never retrieved" not in err and "Traceback" not in err, err
    finally:
        stop_leftover_cluster(state)
        for proc in using(state / "ipython"):
            with contextlib.suppress(psutil.Error):
                proc.kill()
