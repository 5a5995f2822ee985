"""kill -9 proof: ``opf run`` killed at random moments never leaves a half-written result, and
the runs after it finish the job, skipping what had finished, to the same bytes as a clean run.

A pipeline of 33 small tasks (a map, a two-step map over its results, a gather) is first run
cleanly on the session cluster to get the reference bytes. Then, in a second copy of the
pipeline, ``opf run`` is started and killed with SIGKILL four times: twice on the session
cluster (whose engines go on with what they were given — orphaned work that keeps writing), then
twice on its own embedded cluster: once the driver alone (the next run must stop the leftover
cluster, recorded in ``cluster.json``), once the driver with every process of its cluster and
their steps (a machine lost mid-copy, which leaves temporaries behind). After each kill:

* every result file is byte-identical to the clean run's (a file is absent or complete);
* every task the journal says finished has all its destinations in place;
* the temporaries present then are gone once the next run has started.

The last run goes to the end; its outputs equal the clean run's byte for byte, it skipped exactly
the tasks the journal held as finished (its summary says so), and nothing temporary is left.
``OPF_KILL_SEED`` replays the random moments of a failing run (the seed is in every message).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import EngineCluster, files_under, write_pipeline

from opals_dsl.api import compile_file
from opals_dsl.runtime.fsatomic import is_temp_name
from opals_dsl.runtime.journal import Journal, journal_path
from opals_dsl.runtime.resume import Resume

KILL_TOOL = """
import hashlib, sys, time

cmd, args = sys.argv[1], sys.argv[2:]
if cmd == "pattern":    # pattern N SECONDS SRC OUT: N bytes made from SRC, written slowly
    n, pause, src, out = int(args[0]), float(args[1]), args[2], args[3]
    text = open(src, "rb").read()
    data = (text * (n // len(text) + 1))[:n]
    with open(out, "wb") as f:
        for i in range(0, n, 65536):
            f.write(data[i:i + 65536])
    time.sleep(pause)
elif cmd == "digest":   # digest OUT FILE...: one SHA-256 a line
    with open(args[0], "w") as f:
        for path in args[1:]:
            f.write(hashlib.sha256(open(path, "rb").read()).hexdigest() + "\\n")
"""

PIPELINE = """
pipeline killing

job grow for s in "data/*.txt" {
    shared tool = "killtool.py"
    output "results/grow" flat
    step make {
        out a = "{s.stem}.bin"
        run python {tool} pattern 400000 0.3 {s} {a}
    }
}

job more for x in grow.make.a {
    shared tool = "killtool.py"
    output "results/more"
    step first {
        out b = "{x.stem}.first"
        run python {tool} pattern 300000 0.2 {x} {b}
    }
    step second {
        out c = "{x.stem}.second"
        run python {tool} pattern 200000 0.2 {first.b} {c}
    }
}

job total {
    shared tool = "killtool.py"
    output "results" flat
    step digest {
        out t = "total.txt"
        run python {tool} digest {t} {more.second.c}
    }
}
"""

INPUTS = 16
TASKS = 2 * INPUTS + 1


def make(folder: Path) -> Path:
    path = write_pipeline(folder, PIPELINE, inputs=INPUTS)
    (folder / "killtool.py").write_text(KILL_TOOL)
    return path


class Run:
    """``opf run`` as a process whose output (progress on standard error, the summary on
    standard output, merged) is read line by line as it comes."""

    def __init__(self, path: Path, *args: str) -> None:
        env = dict(os.environ)
        env.pop("OPF_SCRATCH", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "opals_dsl", "run", str(path), *args],
            cwd=path.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True,
        )
        self.lines: list[str] = []
        self.started = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if " tasks on " in line or "nothing to run" in line:
                self.started.set()

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def finish(self, timeout: float = 120) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code


def summary_value(err: str, label: str) -> str:
    """The value of a row of the summary at the end of ``opf run``'s output."""
    for line in err.splitlines():
        if line.startswith("  ") and line[2:].startswith(label + "  "):
            return line[2 + len(label):].strip()
    raise AssertionError(f"no summary row {label!r} in:\n{err}")


def results_of(folder: Path) -> dict[str, bytes]:
    results = folder / "results"
    return {p.relative_to(results).as_posix(): p.read_bytes()
            for p in files_under(results) if not is_temp_name(p.name)}


def temporaries(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if is_temp_name(p.name)}


def finished_records(path: Path) -> dict[str, dict]:
    journal = Journal.read(path.parent / ".opf", compile_file(path))
    found = {}
    for name, line in journal.records.items():
        rec = json.loads(line)
        if not rec.get("failed"):
            found[name] = rec
    return found


def wait_idle(cluster: EngineCluster, timeout: float = 60) -> None:
    """Until the session cluster's engines have nothing queued or running (orphaned work)."""
    client = cluster.client()
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = client.queue_status()
            alive = set(client.ids)  # the hub still lists engines lost earlier
            busy = sum(v.get("queue", 0) + v.get("tasks", 0)
                       for k, v in status.items() if k in alive and isinstance(v, dict))
            if not busy:
                return
            time.sleep(0.1)
        raise AssertionError(f"the session cluster stayed busy: {status} {client.ids}")
    finally:
        client.close()


def cluster_processes(state: Path) -> list[psutil.Process]:
    """The embedded cluster's recorded processes that still run, with their children."""
    try:
        record = json.loads((state / "cluster.json").read_text())
    except (OSError, ValueError):
        return []
    found: dict[int, psutil.Process] = {}
    for rec in record.get("processes") or []:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(rec["pid"])
            if abs(proc.create_time() - rec["created"]) < 0.01:
                found[proc.pid] = proc
                for child in proc.children(recursive=True):
                    found[child.pid] = child
    return list(found.values())


def stray_processes(ipython_dir: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.environ().get("IPYTHONDIR") == str(ipython_dir):
                found.append(proc)
    return found


@pytest.mark.slow
def test_kill_9_at_random_moments_loses_nothing_and_resumes(cluster, tmp_path):
    seed = int(os.environ.get("OPF_KILL_SEED") or random.randrange(1 << 30))
    rng = random.Random(seed)
    why = f"(OPF_KILL_SEED={seed})"

    clean = make(tmp_path / "clean")
    run = Run(clean, "--cluster-file", str(cluster.client_file))
    assert run.finish() == 0, run.text
    reference = results_of(clean.parent)
    assert len(reference) == INPUTS * 3 + 1

    path = make(tmp_path / "p")
    folder = path.parent
    state = folder / ".opf"
    session = ["--cluster-file", str(cluster.client_file)]
    embedded = ["-n", "2"]
    plans = [  # (cluster, how long after the start to kill, what else dies)
        (session, lambda: rng.uniform(0.2, 1.2), "driver"),
        (session, None, "driver"),  # once this run has recorded a few finished tasks
        (embedded, lambda: rng.uniform(0.3, 1.5), "driver"),
        (embedded, lambda: rng.uniform(0.2, 1.2), "machine"),
    ]
    leftovers: set[Path] = set()
    try:
        for k, (where, delay, victims) in enumerate(plans):
            if where is embedded and plans[k - 1][0] is session:
                wait_idle(cluster)  # the session's orphaned work is done
            leftovers |= temporaries(folder)
            recorded = cluster_processes(state)
            run = Run(path, *where)
            assert run.started.wait(60), f"run {k} did not start: {run.text} {why}"
            # the next run has cleared what the killed one left: its cluster, its temporaries
            assert not leftovers & temporaries(folder), f"run {k} {why}"
            for proc in recorded:
                with contextlib.suppress(psutil.Error):
                    assert not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE, \
                        f"run {k}: {proc} of the killed run's cluster still runs {why}"
            if delay is None:
                deadline = time.monotonic() + 30
                wanted = len(finished_records(path)) + 3
                while len(finished_records(path)) < wanted and time.monotonic() < deadline:
                    time.sleep(0.05)
                time.sleep(rng.uniform(0.0, 0.3))
            else:
                time.sleep(delay())
            doomed = cluster_processes(state) if victims == "machine" else []
            run.kill()
            for proc in doomed:  # the machine is gone: every process of the cluster, at once
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            assert run.proc.returncode == -signal.SIGKILL, f"run {k} ended by itself {why}"

            # nothing half-written: each result there is the clean run's, byte for byte
            for name, data in results_of(folder).items():
                assert data == reference[name], f"run {k}: {name} differs {why}"
            # a finished task in the journal has every destination in place
            for name, rec in finished_records(path).items():
                for dest, (size, _) in rec["out"].items():
                    assert (folder / dest).stat().st_size == size, f"{name} {dest} {why}"
            leftovers = temporaries(folder)

        # the last run goes to the end and does only what is left
        expected_skips = sum(1 for d in Resume(Journal.read(state, compile_file(path))).decide()
                             if not d.run)
        assert expected_skips > 0, why
        run = Run(path, *embedded)
        assert run.finish() == 0, f"{run.text} {why}"
        assert not leftovers & temporaries(folder), why
        text = run.text
        assert (f"killing: {expected_skips} of {TASKS} tasks unchanged since the last run; "
                f"{TASKS - expected_skips} to run") in text, f"{text} {why}"
        assert summary_value(text, "skipped") == str(expected_skips), f"{text} {why}"
        assert summary_value(text, "run") == str(TASKS - expected_skips), f"{text} {why}"
        assert results_of(folder) == reference, why
        assert not temporaries(folder), why
        assert len(finished_records(path)) == TASKS, why
        assert journal_path(state, "killing").is_file()
        assert not (state / "cluster.json").exists()
    finally:
        for proc in cluster_processes(state) + stray_processes(state / "ipython"):
            with contextlib.suppress(psutil.Error):
                proc.kill()
        shutil.rmtree(tmp_path / "clean", ignore_errors=True)
