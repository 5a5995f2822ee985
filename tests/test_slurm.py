"""Slurm for real: ``opf run --engines slurm -n N`` submits its engines to a Slurm cluster.

The cluster (session scope) is Debian's slurm-wlm and munge on one compute node, ``opfslurm``:
a host of its own (:mod:`hosts`: network, UTS and mount namespaces, at 198.18.0.10) that runs
munged, slurmctld and slurmd, set up for a container (``ProctrackType=proctrack/linuxproc``,
``TaskPlugin=task/none``, no accounting, no cgroups). Every file (configuration, munge key and
socket, state, logs) is in ``<repo>/.opf-hosts/<pid>/slurm``; ``sbatch``, ``squeue`` and
``scancel`` run here with ``$SLURM_CONF`` pointing there, as on a login node. Killing the host
stops all of it. Two partitions: ``opf`` (the default) and ``held``, which is down, so that a
job there stays pending.

* the engines run as a Slurm job on the node, the run completes, and ``squeue`` is empty after;
* Ctrl-C while tasks run, and while the job waits in the queue: exit 130, ``squeue`` empty;
* a job Slurm refuses: exit 3 with sbatch's message; no engine within ``--timeout``: exit 3
  naming the job's state, and the job cancelled.

Root only, marked ``slurm``: ``.ci/run`` runs them after the README's ``pytest``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import (
    REPO,
    kill_run_and_its_lifeline,
    last_run,
    launch_lifeline,
    process_gone,
    write_pipeline,
)
from hosts import Hosts, missing


def _why() -> str | None:
    why = missing(sshd=False)
    if why:
        return why
    for tool in ("slurmctld", "slurmd", "munged", "sbatch", "squeue", "scancel", "sinfo"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} is not installed (Debian: apt-get install slurm-wlm munge)"
    return None


WHY = _why()
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(WHY is not None, reason=WHY or "")]

NODE = "opfslurm"
#: the node is host 9 of the namespace hosts: 198.18.0.10, link opfv9
NODE_INDEX = 9
CONTROLLER_IP = "198.18.0.1"

SLURM_CONF = """\
ClusterName=opftest
SlurmctldHost={node}({address})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={folder}/munge-socket/munge.socket
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
NodeName={node} NodeAddr={address} CPUs=2 State=UNKNOWN
PartitionName=opf Nodes={node} Default=YES MaxTime=INFINITE State=UP
PartitionName=held Nodes={node} MaxTime=INFINITE State=DOWN
"""

MARKED = """
pipeline onslurm
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

HOST_TOOL = """
import os, socket, sys, time

marks, seconds, src, dst = sys.argv[1:5]
name = os.path.basename(src) + "@" + socket.gethostname()
open(os.path.join(marks, name), "w").close()
time.sleep(float(seconds))
with open(dst, "w") as f:
    f.write("copied:" + open(src).read())
"""


@dataclass
class Slurm:
    folder: Path
    hosts: Hosts
    env: dict[str, str]

    def run(self, *cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=30)

    def queue(self) -> str:
        """``squeue``'s jobs, one a line (empty: none)."""
        proc = self.run("squeue", "-h", "-o", "%i %T %j")
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    def node_processes(self) -> list[tuple[int, str]]:
        """Processes on the node besides the daemons (munged, slurmctld and its slurmscriptd,
        slurmd): a job's slurmstepd, srun, engines and steps."""
        return [(pid, cmd) for pid, cmd in self.hosts[NODE].processes()
                if not re.match(r"(\S*/)?(munged|slurmctld|slurmd)\b|: slurmscriptd", cmd)]


def _start_slurm(folder: Path) -> Slurm:
    hosts = Hosts(folder / "host", names=(NODE,), first=NODE_INDEX, sshd=False).start()
    try:
        node = hosts[NODE]
        for sub in ("state", "spool"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        munge = folder / "munge"
        munge.mkdir(mode=0o700, exist_ok=True)
        sock = folder / "munge-socket"
        sock.mkdir(mode=0o755, exist_ok=True)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        conf = folder / "slurm.conf"
        conf.write_text(SLURM_CONF.format(node=NODE, address=node.address, folder=folder))
        env = dict(os.environ, SLURM_CONF=str(conf))
        node.start_daemon(
            ["munged", "-F", "--force", f"--socket={sock / 'munge.socket'}",
             f"--key-file={key}", f"--pid-file={munge / 'munged.pid'}",
             f"--log-file={munge / 'munged.log'}", f"--seed-file={munge / 'munged.seed'}"],
            folder / "munged.out", env)
        wait_for(lambda: (sock / "munge.socket").exists(), 30, "munged's socket")
        node.start_daemon(["slurmctld", "-D", "-i"], folder / "slurmctld.out", env)
        node.start_daemon(["slurmd", "-D", "-N", NODE], folder / "slurmd.out", env)
        slurm = Slurm(folder, hosts, env)

        def idle() -> bool:
            proc = slurm.run("sinfo", "-h", "-p", "opf", "-o", "%T")
            return proc.returncode == 0 and proc.stdout.strip() == "idle"

        try:
            wait_for(idle, 60, "the Slurm node to be idle")
        except AssertionError:
            logs = "\n".join(p.read_text(errors="replace")[-2000:]
                             for p in sorted(folder.glob("*.out")) + sorted(folder.glob("*.log")))
            raise AssertionError(f"Slurm did not start:\n{logs}") from None
        return slurm
    except BaseException:
        hosts.stop()
        raise


@pytest.fixture(scope="session")
def slurm() -> Iterator[Slurm]:
    folder = REPO / ".opf-hosts" / str(os.getpid()) / "slurm"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    started = _start_slurm(folder)
    try:
        yield started
    finally:
        started.hosts.stop()
        shutil.rmtree(folder, ignore_errors=True)
        for parent in (folder.parent, folder.parent.parent):
            if parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()


@pytest.fixture
def shared(slurm: Slurm, request: pytest.FixtureRequest) -> Path:
    folder = slurm.folder.parent / re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def opf(*args: str) -> list[str]:
    return [sys.executable, "-m", "opals_dsl", "run", *args]


def run_env(slurm: Slurm) -> dict[str, str]:
    env = dict(slurm.env)
    for name in ("IPYTHONDIR", "OPF_SCRATCH"):
        env.pop(name, None)
    return env


def pipeline(shared: Path, seconds: float, inputs: int) -> tuple[Path, Path]:
    marks = shared / "marks"
    marks.mkdir()
    path = write_pipeline(shared / "p", MARKED.format(marks=marks, seconds=seconds),
                          inputs=inputs)
    (shared / "p" / "hosttool.py").write_text(HOST_TOOL)
    return path, marks


def controllers() -> list[str]:
    """The controller processes (and their schedulers) of runs whose engines were Slurm's."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        words = proc.info["cmdline"] or []
        if "ipyparallel.controller" in words and f"--ip={CONTROLLER_IP}" in words:
            found.append(f"{proc.info['pid']}: {' '.join(words)}")
    return found


def nothing_left(slurm: Slurm, state: Path) -> None:
    assert slurm.queue() == ""
    wait_for(lambda: slurm.node_processes() == [], 30,
             f"the job's processes on the node to end: {slurm.node_processes()}")
    assert not (state / "launched.json").exists()
    # the run waited for its stop; a scheduler of the controller may take a moment to exit
    wait_for(lambda: controllers() == [], 10, f"the run's controller to end: {controllers()}")


def test_engines_run_as_a_slurm_job_and_the_queue_is_empty_after(slurm: Slurm, shared: Path):
    path, marks = pipeline(shared, 0.5, inputs=4)
    proc = subprocess.run(
        opf(str(path), "--engines", "slurm", "-n", "2", "--controller-ip", CONTROLLER_IP,
            "--timeout", "300"),
        cwd=shared, env=run_env(slurm), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert re.search(r"slurm job \d+ submitted for 2 engines", proc.stderr)
    assert "2 engines on 1 machine ready" in proc.stderr
    m = re.search(r"ready in ([\d.]+) s", proc.stderr)
    print(f"\n2 engines as a Slurm job ready in {m.group(1) if m else '?'} s")
    state = shared / "p" / ".opf"
    rows = [json.loads(line) for line in (last_run(state) / "trace.jsonl").read_text().splitlines()]
    assert {r["machine"].partition(":")[0] for r in rows} == {NODE}
    assert len({r["engine"] for r in rows}) == 2
    assert {p.name for p in marks.iterdir()} == {f"s{i}.txt@{NODE}" for i in range(1, 5)}
    assert {p.name: p.read_text() for p in (shared / "p" / "results").iterdir()} == {
        f"s{i}.a": f"copied:strip {i}\n" for i in range(1, 5)}
    nothing_left(slurm, state)


def while_two_tasks_run(slurm: Slurm, shared: Path, act: Callable[[subprocess.Popen, str], None],
                        end_within: float) -> tuple[int, str]:
    """Run two 120 s tasks on a job of two engines; once both run, ``act`` on opf's process
    and the job's id; opf must end within ``end_within`` seconds: its exit status and
    standard error."""
    path, marks = pipeline(shared, 120, inputs=2)
    driver = subprocess.Popen(
        opf(str(path), "--engines", "slurm", "-n", "2", "--controller-ip", CONTROLLER_IP,
            "--timeout", "300"),
        cwd=shared, env=run_env(slurm), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        wait_for(lambda: len(list(marks.iterdir())) == 2, 300, "both tasks to run")
        job = re.search(r"(\d+) RUNNING ipengine-opf-", slurm.queue())
        assert job, slurm.queue()
        act(driver, job.group(1))
        _out, err = driver.communicate(timeout=end_within)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    return driver.returncode, err


def test_ctrl_c_while_tasks_run_cancels_the_job(slurm: Slurm, shared: Path):
    status, err = while_two_tasks_run(
        slurm, shared, lambda driver, _job: driver.send_signal(signal.SIGINT), 120)
    assert status == 130, err
    assert "Traceback" not in err
    nothing_left(slurm, shared / "p" / ".opf")


def test_a_job_cancelled_under_the_run_is_named_as_the_cause(slurm: Slurm, shared: Path):
    """``scancel`` of the engines' job while tasks run: Slurm stops the steps (they look
    killed by SIGTERM) and the engines; the run says that the job ended before it did."""
    cancelled: list[str] = []

    def cancel(_driver: subprocess.Popen, job: str) -> None:
        assert slurm.run("scancel", job).returncode == 0
        cancelled.append(job)

    status, err = while_two_tasks_run(slurm, shared, cancel, 300)
    assert status in (1, 3), err
    assert "Traceback" not in err
    assert f"opf: warning: slurm job {cancelled[0]} ended before the run did" in err, err
    assert "it was cancelled, or ran out of its time limit (--time-limit)" in err
    nothing_left(slurm, shared / "p" / ".opf")


def test_ctrl_c_while_the_job_waits_in_the_queue_cancels_it(slurm: Slurm, shared: Path):
    path, _ = pipeline(shared, 1, inputs=1)
    driver = subprocess.Popen(
        opf(str(path), "--engines", "slurm", "-n", "1", "--partition", "held",
            "--controller-ip", CONTROLLER_IP, "--timeout", "300"),
        cwd=shared, env=run_env(slurm), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        wait_for(lambda: "PENDING" in slurm.queue(), 120, "the job to wait in the queue")
        driver.send_signal(signal.SIGINT)
        out, err = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode == 130, err
    assert "Traceback" not in err
    nothing_left(slurm, shared / "p" / ".opf")


def test_no_engine_within_the_timeout_exits_3_and_cancels_the_job(slurm: Slurm, shared: Path):
    path, _ = pipeline(shared, 1, inputs=1)
    proc = subprocess.run(
        opf(str(path), "--engines", "slurm", "-n", "1", "--partition", "held",
            "--controller-ip", CONTROLLER_IP, "--timeout", "8"),
        cwd=shared, env=run_env(slurm), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "no engine registered within 8 s (--timeout)" in proc.stderr
    assert re.search(r"slurm job \d+ is PENDING", proc.stderr)
    assert "Check: 'sinfo' and 'squeue', the partition (--partition)" in proc.stderr
    nothing_left(slurm, shared / "p" / ".opf")


def test_a_job_slurm_refuses_exits_3_with_sbatch_s_message(slurm: Slurm, shared: Path):
    path, _ = pipeline(shared, 1, inputs=1)
    proc = subprocess.run(
        opf(str(path), "--engines", "slurm", "-n", "1", "--partition", "nosuch",
            "--controller-ip", CONTROLLER_IP, "--timeout", "60"),
        cwd=shared, env=run_env(slurm), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "opf: error: could not start engines with slurm: sbatch" in proc.stderr
    assert "failed with exit status 1: sbatch: error: invalid partition specified: nosuch" \
        in proc.stderr
    assert "Check: 'sinfo' and 'squeue', the partition (--partition)" in proc.stderr
    nothing_left(slurm, shared / "p" / ".opf")


def held_job(slurm: Slurm, shared: Path, state: Path) -> tuple[Path, subprocess.Popen]:
    """An ``opf run`` of one task whose job waits in the queue (the ``held`` partition runs
    nothing): the pipeline and opf's process."""
    path, _ = pipeline(shared, 0, inputs=1)
    driver = subprocess.Popen(
        opf(str(path), "--engines", "slurm", "-n", "1", "--partition", "held",
            "--controller-ip", CONTROLLER_IP, "--timeout", "300", "--state", str(state)),
        cwd=shared, env=run_env(slurm), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: "PENDING" in slurm.queue(), 120, "the job to wait in the queue")
    except BaseException:
        driver.kill()
        driver.wait()
        raise
    return path, driver


def test_a_killed_run_s_lifeline_cancels_its_job_and_stops_its_controller(slurm: Slurm,
                                                                          shared: Path):
    """``kill -9`` of opf: its launched cluster's lifeline, a process of its own, cancels the
    batch job and stops the controller within seconds, without another run."""
    state = shared / "state"
    path, driver = held_job(slurm, shared, state)
    try:
        record = json.loads((state / "launched.json").read_text())
        lifeline = launch_lifeline(driver)
    finally:
        driver.kill()
        driver.wait()
    wait_for(lambda: slurm.queue() == "", 60, f"the lifeline to cancel the job: {slurm.queue()}")
    assert process_gone(lifeline.pid, 60)
    assert not (state / "launched.json").exists()
    wait_for(lambda: controllers() == [], 10, f"the controller to end: {controllers()}")
    leftovers = [p.name for p in (state / "ipython").rglob(f"*{record['cluster_id']}*")]
    assert leftovers == []

    proc = subprocess.run(opf(str(path), "-n", "1", "--state", str(state)), cwd=shared,
                          env=run_env(slurm), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_a_killed_run_s_job_and_controller_are_stopped_by_the_next_run(slurm: Slurm,
                                                                       shared: Path):
    """When opf's lifeline died with it (its machine crashed), the next run in the state
    folder cancels the job and stops the controller before anything else."""
    import psutil

    state = shared / "state"
    path, driver = held_job(slurm, shared, state)
    kill_run_and_its_lifeline(driver)  # no handler runs: job and controller are left behind
    record = json.loads((state / "launched.json").read_text())
    assert record["batch_job"]["kind"] == "slurm"
    assert str(record["batch_job"]["id"]) in slurm.queue()
    controller = [psutil.Process(p["pid"]) for p in record["processes"]]
    assert controller and all(p.is_running() for p in controller)

    proc = subprocess.run(opf(str(path), "-n", "1", "--state", str(state)), cwd=shared,
                          env=run_env(slurm), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert slurm.queue() == ""
    wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                             for p in controller), 30, "the old controller to stop")
    assert not (state / "launched.json").exists()
    wait_for(lambda: controllers() == [], 10, f"every controller to end: {controllers()}")
    assert [p.name for p in (state / "ipython").rglob(f"*{record['cluster_id']}*")] == []
