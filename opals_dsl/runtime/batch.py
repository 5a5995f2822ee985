"""Batch jobs (Slurm, PBS) that hold opf's engines — whether one is still queued or running,
waiting for it to be gone — and stopping what a killed run started elsewhere, as its record
(``<state>/launched.json``) says: by the run's lifeline as soon as the run dies
(:func:`start_lifeline`), else by the next run in that state folder."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .reaper import MARKER, end_run, follow
from .ssh import end_engines

#: how long a cancelled batch job may take to leave the queue (seconds)
BATCH_GONE_WAIT = 30.0


def batch_state(job: dict[str, Any]) -> str | None:
    """The job's state as its queue shows it ("" when the queue no longer has it; None if the
    queue cannot be asked)."""
    if job["kind"] == "slurm":
        cmd = ["squeue", "-h", "-j", str(job["id"]), "-o", "%T %R"]
    elif job["kind"] == "pbs":
        cmd = ["qstat", str(job["id"])]
    else:
        return None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if job["kind"] == "slurm":
        if proc.returncode != 0:
            return "" if "Invalid job id" in proc.stderr else None
        state, _, reason = proc.stdout.strip().partition(" ")
        if not state:
            return ""
        return state if reason in ("", "None", "(None)") or state == "RUNNING" \
            else f"{state} {reason}"
    if proc.returncode != 0:
        return ""
    lines = proc.stdout.strip().splitlines()
    return lines[-1].split()[4] if lines and len(lines[-1].split()) > 4 else None


def ended_early(job: dict[str, Any]) -> str | None:
    """A warning when a Slurm job whose engines the run still has is no longer running (it was
    cancelled, or ran out of its time limit), else None: Slurm stopped the steps then, and
    they look like steps killed by SIGTERM."""
    state = batch_state(job) if job["kind"] == "slurm" else None
    if state is None or state.startswith("RUNNING"):
        return None
    return (f"warning: slurm job {job['id']} ended before the run did "
            f"({state or 'no longer in the queue'}): it was cancelled, or ran out of its time "
            f"limit (--time-limit); the steps it stopped show as killed by SIGTERM")


def wait_batch_gone(job: dict[str, Any], wait: float) -> bool:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if batch_state(job) in ("", None):
            return True
        time.sleep(0.5)
    return False


#: the record of a launched cluster in the state folder
RECORD = "launched.json"

#: the state folder's lock, held by a run (:func:`opals_dsl.runtime.session.lock_state`)
RUN_LOCK = "run.lock"

#: what a lifeline writes into the state folder's lock while it stops what its run left; a
#: run started meanwhile waits for it instead of being refused
ENDING = "ending what a killed run left running"

#: seconds a lifeline tries to take the state folder's lock once its run died: the dead run
#: lets it go as its files are closed, which may come just after the lifeline's pipe
LOCK_TAKEN_WAIT = 5.0


def stop_leftover_launch(state_dir: str | Path) -> bool:
    """Stop what a killed run recorded in ``<state>/launched.json``: its engines over SSH,
    its controller and its batch job. True if anything was still there."""
    record = Path(state_dir) / RECORD
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        data = {}
    if not isinstance(data, dict):
        data = {}
    # the engines first, before this run looks at what is done: none of them may copy back
    # a task it still holds while this run decides and runs
    ended = end_engines(data.get("ssh_engines") or [])
    procs = end_run(data.get("processes") or [], None, grace=3.0)
    job = data.get("batch_job")
    found = bool(procs) or ended > 0
    if isinstance(job, dict) and job.get("delete"):
        if batch_state(job):
            found = True
        delete = [str(w) for w in job["delete"]]
        failed = "it could not be run"  # what the cancel said when it failed, else ""
        try:
            done = subprocess.run(delete, capture_output=True, text=True, timeout=30)
            lines = (done.stderr or done.stdout).strip().splitlines()
            failed = (lines[-1] if lines else f"exit status {done.returncode}") \
                if done.returncode else ""
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
        wait_batch_gone(job, BATCH_GONE_WAIT)
        if failed and batch_state(job) != "":  # not cancelled, and the queue does not say gone
            # said, and the record kept for the next run to try again
            print(f"opf: warning: the {job.get('kind')} job {job.get('id')} of a run that was "
                  f"killed could not be cancelled ({' '.join(delete)}: {failed}); its engines "
                  f"may still run tasks: cancel it yourself", file=sys.stderr, flush=True)
            return found
    with contextlib.suppress(OSError):
        record.unlink()
    if isinstance(data.get("cluster_id"), str):
        remove_launch_files(Path(state_dir) / "ipython", data["cluster_id"])
    return found


def remove_launch_files(ipython_dir: Path, cluster_id: str) -> None:
    """ipyparallel's files of a launched cluster in the state folder: its logs, its
    connection files and its batch script."""
    profile = ipython_dir / "profile_opf"
    for folder in (profile / "log", profile / "security"):
        with contextlib.suppress(OSError):
            for entry in os.scandir(folder):
                if cluster_id in entry.name:
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
    for suffix in (".sbatch", ".pbs"):
        with contextlib.suppress(OSError):
            (ipython_dir / f"{cluster_id}{suffix}").unlink()


def start_lifeline(state_dir: Path) -> subprocess.Popen | None:
    """The lifeline of a run that launches a cluster (:func:`lifeline_main`), in a session of
    its own; tell it ``done`` (:func:`end_lifeline`) once the cluster is stopped. None if it
    cannot be started: the next run then stops what a killed run left."""
    package = str(Path(__file__).resolve().parents[2])
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from opals_dsl.runtime.batch import lifeline_main; "
            "raise SystemExit(lifeline_main(sys.argv[2]))")
    env = {k: v for k, v in os.environ.items() if k != MARKER}
    try:
        return subprocess.Popen(
            [sys.executable, "-c", code, package, str(Path(state_dir).absolute())],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=env, cwd="/", start_new_session=True)
    except OSError:
        return None


def end_lifeline(proc: subprocess.Popen | None) -> None:
    """Tell a lifeline that its run stopped its cluster, and wait for it to go."""
    if proc is None:
        return
    with contextlib.suppress(OSError, ValueError):
        if proc.stdin is not None:
            proc.stdin.write(b"done\n")
            proc.stdin.close()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def lifeline_main(state_dir: str) -> int:
    """A launched cluster's lifeline: when the run that started it dies without saying
    ``done`` on standard input (``kill -9``, the out-of-memory killer), take the state folder's
    lock and stop what the run's record names: its engines over SSH, its controller, its batch
    job (:func:`stop_leftover_launch`). A run that holds the lock already (one started right
    after) does that itself."""
    if not follow(lambda line: None):
        return 0
    try:
        fd = os.open(Path(state_dir) / RUN_LOCK, os.O_RDWR)
    except OSError:
        return 0
    try:
        deadline = time.monotonic() + LOCK_TAKEN_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return 0
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}, {ENDING}\n".encode(), 0)
        stop_leftover_launch(state_dir)
    finally:
        os.close(fd)
    return 0
