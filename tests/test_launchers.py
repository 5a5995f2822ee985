"""Tests of opals_dsl.launchers that need no hosts of their own: what ``--engines`` accepts,
the option combinations refused with exit 2, ``--engines N`` as N local engines, and launchers
that fail before any engine starts (a host refusing SSH on this machine's loopback, a batch
system not installed, a launcher configuration that does not load): exit 3, a message that
names the cause, and nothing left running.

The launchers at work are tested in test_hosts.py (SSH) and test_slurm.py (Slurm).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from conftest import write_pipeline

from opals_dsl.runtime.launch_options import LaunchOptions, LaunchUsageError, parse_engines

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


def opf(*args: str, cwd: Path, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "opals_dsl", "run", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def clean_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, **extra)
    env.pop("IPYTHONDIR", None)
    env.pop("OPF_SCRATCH", None)
    return env


def no_process_uses(ipython_dir: Path) -> bool:
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("IPYTHONDIR") == str(ipython_dir) and \
                    proc.status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.Error:
            continue
    return True


@pytest.mark.parametrize(("text", "want"), [
    ("4", 4),
    ("local", 0),
    ("slurm", LaunchOptions(kind="slurm")),
    ("PBS", LaunchOptions(kind="pbs")),
    ("mpi", LaunchOptions(kind="mpi")),
    ("ssh:node1", LaunchOptions(kind="ssh", hosts=(("node1", None),))),
    ("ssh:node1:8,anna@node-2.lan,node3:1",
     LaunchOptions(kind="ssh", hosts=(("node1", 8), ("anna@node-2.lan", None), ("node3", 1)))),
])
def test_engines_spec_is_a_number_or_a_launcher(text, want):
    assert parse_engines(text) == want


@pytest.mark.parametrize(("text", "says"), [
    ("0", "1 or more"),
    ("cloud", "not 'cloud'"),
    ("ssh:", "'' is not one"),
    ("ssh:a,,b", "'' is not one"),
    ("ssh:a:x", "'a:x' is not one"),
    ("ssh:a:0", "asks for no engine"),
    ("ssh:a b", "'a b' is not one"),
    ("ssh:a,a:2", "names a twice"),
    ("slurm:4", "not 'slurm:4'"),
])
def test_a_bad_engines_spec_says_what_is_wrong(text, says):
    with pytest.raises(LaunchUsageError) as err:
        parse_engines(text)
    assert says in str(err.value)
    assert err.value.exit_code == 2


@pytest.mark.parametrize(("args", "says"), [
    (["--engines", "cloud"], "--engines takes a number of local engines, ssh:HOST"),
    (["--engines", "ssh:a", "-n", "2"], "-n does not apply to --engines ssh:"),
    (["--engines", "slurm"], "--engines slurm needs the number of engines to submit: add -n N"),
    (["--engines", "pbs"], "--engines pbs needs the number of engines"),
    (["--partition", "gpu"], "--partition is for engines that opf starts elsewhere"),
    (["-n", "2", "--ssh-config", "x"], "--ssh-config is for engines that opf starts elsewhere"),
    (["--engines", "ssh:a", "--partition", "gpu"], "--partition does not apply to --engines ssh"),
    (["--engines", "slurm", "-n", "2", "--ssh-config", "x"], "--ssh-config does not apply"),
    (["--engines", "ssh:a", "--profile", "x"], "--engines starts a cluster of its own; it cannot"),
    (["--engines", "3", "-n", "2"], "-n 2 and --engines 3 ask for different numbers"),
    (["--engines", "ssh:a", "--ssh-config", "no/such/file"], "--ssh-config no/such/file: no such"),
    (["--engines", "mpi", "--launcher-config", "p.opf"], "--launcher-config takes an ipyparallel"),
    (["--engines", "slurm", "-n", "2", "--time-limit", "banana"],
     "--time-limit banana: Slurm takes minutes, MM:SS, HH:MM:SS, D-HH"),
])
def test_launcher_options_that_cannot_work_exit_2(tmp_path, args, says):
    path = write_pipeline(tmp_path / "p", QUICK, inputs=1)
    proc = opf(str(path), *args, cwd=tmp_path / "p")
    assert proc.returncode == 2, proc.stderr
    assert f"opf: error: {says}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "p" / ".opf").exists()


def test_engines_n_is_n_engines_here(tmp_path):
    path = write_pipeline(tmp_path / "p", QUICK, inputs=2)
    proc = opf(str(path), "--engines", "1", cwd=tmp_path, env=clean_env())
    assert proc.returncode == 0, proc.stderr
    assert "quick: 2 tasks on 1 engine (1 machine)" in proc.stderr


@pytest.mark.skipif(shutil.which("ssh") is None, reason="the ssh client is not installed")
def test_a_host_that_refuses_ssh_exits_3_before_anything_starts(tmp_path):
    # nothing listens on port 9 of this machine's loopback: the connection is refused at once
    config = tmp_path / "ssh_config"
    config.write_text("Host deadhost\n    HostName 127.0.0.1\n    Port 9\n"
                      f"    UserKnownHostsFile {tmp_path / 'known_hosts'}\n")
    path = write_pipeline(tmp_path / "p", QUICK, inputs=1)
    proc = opf(str(path), "--engines", "ssh:deadhost:2", "--ssh-config", str(config),
               "--timeout", "30", cwd=tmp_path, env=clean_env())
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "opf: error: cannot reach deadhost over SSH: ssh: connect to host 127.0.0.1 port " \
           "9: Connection refused" in proc.stderr
    assert f"check that 'ssh -F {config} deadhost true' logs in without a password" \
        in proc.stderr
    assert "controller listening" not in proc.stderr  # nothing was started
    state = tmp_path / "p" / ".opf"
    assert not (state / "launched.json").exists()
    assert no_process_uses(state / "ipython")
    assert not (tmp_path / "p" / "results").exists()


def test_a_controller_ip_that_is_not_this_machine_s_exits_3_before_any_host_is_asked(tmp_path):
    config = tmp_path / "ssh_config"
    config.write_text("Host deadhost\n    HostName 127.0.0.1\n    Port 9\n")
    path = write_pipeline(tmp_path / "p", QUICK, inputs=1)
    # 192.0.2.0/24 is for documentation: never an address of this machine
    proc = opf(str(path), "--engines", "ssh:deadhost:1", "--ssh-config", str(config),
               "--controller-ip", "192.0.2.77", cwd=tmp_path, env=clean_env())
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    assert ("opf: error: --controller-ip 192.0.2.77 is not an address of this machine "
            "(Cannot assign requested address)") in proc.stderr
    assert "deadhost" not in proc.stderr  # no host was asked
    assert not (tmp_path / "p" / ".opf" / "launched.json").exists()


def test_what_ssh_says_of_a_refused_login_is_quoted_once_punctuated(tmp_path):
    """ssh's "Permission denied (publickey,password)." ends in a full stop; opf's sentence goes
    on after it without doubling the punctuation."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "ssh"
    fake.write_text("#!/bin/sh\necho 'anna@h1: Permission denied (publickey,password).' >&2\n"
                    "exit 255\n")
    fake.chmod(0o755)
    path = write_pipeline(tmp_path / "p", QUICK, inputs=1)
    proc = opf(str(path), "--engines", "ssh:h1:1", cwd=tmp_path,
               env=clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}"))
    assert proc.returncode == 3, proc.stderr
    assert ("cannot reach h1 over SSH: anna@h1: Permission denied (publickey,password); check "
            "that 'ssh h1 true' logs in") in proc.stderr


def test_a_batch_system_that_is_not_installed_exits_3(tmp_path):
    path = write_pipeline(tmp_path / "p", QUICK, inputs=1)
    empty = tmp_path / "bin"
    empty.mkdir()
    proc = opf(str(path), "--engines", "slurm", "-n", "2", cwd=tmp_path,
               env=clean_env(PATH=str(empty)))
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    assert ("opf: error: could not start engines with slurm: sbatch is not installed on this "
            "machine (or not on PATH)") in proc.stderr
    state = tmp_path / "p" / ".opf"
    assert not (state / "launched.json").exists()
    assert no_process_uses(state / "ipython")


def test_a_launcher_configuration_that_does_not_load_exits_3(tmp_path):
    path = write_pipeline(tmp_path / "p", QUICK, inputs=1)
    config = tmp_path / "ipcluster_config.py"
    config.write_text("c = get_config()  # noqa\nc.SlurmEngineSetLauncher.queue = \n")
    proc = opf(str(path), "--engines", "slurm", "-n", "2", "--launcher-config", str(config),
               cwd=tmp_path, env=clean_env())
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"opf: error: cannot read the launcher configuration {config}: SyntaxError" \
        in proc.stderr


WATCHERS = """
import sys, threading
from opals_dsl.runtime.ssh import quiet_ssh_waits

def fail():
    raise RuntimeError("failed in " + threading.current_thread().name)

quiet_ssh_waits()
quiet_ssh_waits()  # a second cluster in the same process installs nothing more
for name in ("wait(host=opfhost2, pid=27094)", "someone else's thread"):
    t = threading.Thread(target=fail, name=name)
    t.start()
    t.join()
print("done")
"""


def test_an_ssh_watcher_that_fails_after_the_cluster_stopped_prints_no_traceback():
    """ipyparallel watches each SSH engine from a thread that fails once ssh gives up on a lost
    host, possibly after opf stopped the cluster: that failure goes to the debug log, while any
    other thread's failure is still printed."""
    proc = subprocess.run([sys.executable, "-c", WATCHERS], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "done\n"
    assert proc.stderr.count("Traceback") == 1, proc.stderr
    assert "failed in someone else's thread" in proc.stderr
    assert "opfhost2" not in proc.stderr


def test_a_killed_runs_batch_job_that_cannot_be_cancelled_is_said_and_kept(tmp_path, capsys,
                                                                           monkeypatch):
    """The next run cancels the batch job a killed run left; when the cancel fails and the
    queue cannot say the job is gone (here: no Slurm to ask), a warning names the job and
    the record stays, for the run after to try again. One the queue says is gone is
    forgotten quietly."""
    import json

    from opals_dsl.runtime.batch import RECORD, stop_leftover_launch

    record = tmp_path / RECORD
    cancel = ["sh", "-c", "echo 'scancel: error: Unable to contact slurm controller' >&2; exit 1"]
    job = {"kind": "slurm", "id": 4242, "delete": cancel}
    record.write_text(json.dumps({"batch_job": job}))
    bin_dir = tmp_path / "bin"  # a squeue that cannot reach its controller, as scancel
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text("#!/bin/sh\necho 'squeue: error: Unable to contact slurm "
                                    "controller' >&2\nexit 1\n")
    (bin_dir / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    stop_leftover_launch(tmp_path)
    err = capsys.readouterr().err
    assert ("opf: warning: the slurm job 4242 of a run that was killed could not be "
            "cancelled (sh -c") in err
    assert "Unable to contact slurm controller); its engines may still run tasks" in err
    assert record.exists()
    # cancelled: forgotten, whatever the queue says
    record.write_text(json.dumps({"batch_job": {**job, "delete": ["true"]}}))
    stop_leftover_launch(tmp_path)
    assert capsys.readouterr().err == "" and not record.exists()
