"""Failures at run time, on real engines: retries, stopping, Ctrl-C, a lost engine, bad input
(a program not found, a step that fails or writes nothing, an input deleted or changed after
the plan was made, a destination that cannot be written, a full disk) and hostile names.

Every case checks the message a person reads and that nothing else was harmed: outputs of
other tasks complete, earlier results untouched, no temporary left where results go. Most runs
are ``opf run`` subprocesses on the session cluster (tests/conftest.py); the full-disk cases
use a cluster of their own whose engine has a file size limit (as a full disk, it makes writes
fail halfway, also for root), and a small tmpfs where one can be mounted.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import (
    EngineCluster,
    files_under,
    process_gone,
    trace_rows,
    write_pipeline,
)

from opals_dsl.api import compile_file
from opals_dsl.runtime import session
from opals_dsl.runtime.executor import IPyParallelExecutor
from opals_dsl.runtime.fsatomic import is_temp_name
from opals_dsl.runtime.journal import Journal
from opals_dsl.runtime.resume import Resume

#: a second tool for the steps here (the first, tool.py, comes from conftest)
EXTRA = """
import json, os, resource, sys

cmd, args = sys.argv[1], sys.argv[2:]
if cmd == "argv":        # argv OUT WORD...: OUT = the words as JSON
    with open(args[0], "w", encoding="utf-8") as f:
        json.dump(args[1:], f, ensure_ascii=False)
elif cmd == "big":       # big N OUT: N bytes, within the file size limit of the process
    with open(args[1], "wb") as f:
        f.write(b"x" * int(args[0]))
elif cmd == "bigfree":   # bigfree N OUT: N bytes, lifting the soft file size limit first
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    with open(args[1], "wb") as f:
        f.write(b"x" * int(args[0]))
elif cmd == "stray":     # stray PIDFILE OUT: leave a sleep running in a session of its own
    import subprocess
    proc = subprocess.Popen(["sleep", "1003"], start_new_session=True)
    open(args[0], "w").write(str(proc.pid))
    open(args[1], "w").write("left one")
elif cmd == "pattern":   # pattern N SRC OUT: N bytes made from SRC's text
    text = open(args[1], "rb").read()
    with open(args[2], "wb") as f:
        f.write((text * (int(args[0]) // len(text) + 1))[: int(args[0])])
else:
    sys.exit("unknown command " + cmd)
"""


def setup(tmp_path: Path, text: str, *, inputs: int = 3) -> Path:
    path = write_pipeline(tmp_path / "p", text, inputs=inputs)
    (path.parent / "extra.py").write_text(EXTRA)
    return path


def opf(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "opals_dsl", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def run_on(cluster: EngineCluster, path: Path, *args: str) -> subprocess.CompletedProcess:
    return opf("run", str(path), "--cluster-file", str(cluster.client_file), *args,
               cwd=path.parent)


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if is_temp_name(p.name)]


def records(path: Path, state: Path | None = None) -> dict[str, dict]:
    plan = compile_file(path)
    journal = Journal.read(state or path.parent / ".opf", plan)
    return {name: json.loads(line) for name, line in journal.records.items()}


def summary_value(out: str, label: str) -> str:
    """The value of a row of the summary at the end of ``opf run``'s output."""
    for line in out.splitlines():
        if line.startswith("  ") and line[2:].startswith(label + "  "):
            return line[2 + len(label):].strip()
    raise AssertionError(f"no summary row {label!r} in:\n{out}")


def wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


# -- retries and stopping ----------------------------------------------------------------------


STRAY = """
pipeline strays
param marks = "{marks}"
job leave for i in range(1) {{
    shared extra = "extra.py"
    output "results" flat
    step s {{
        out o = "o{{i}}.txt"
        run python {{extra}} stray {{marks}}/{{i}}.pid {{o}}
    }}
}}
"""


def test_a_process_a_step_left_in_a_session_of_its_own_ends_with_the_step(cluster, tmp_path):
    """On an ipyparallel engine (which adopts the orphans of its steps' processes), a process
    that a step started in a session of its own and left behind is ended with the step: it
    does not outlive the run, though no run of opf started this cluster."""
    marks = tmp_path / "marks"
    marks.mkdir()
    path = setup(tmp_path, STRAY.format(marks=marks), inputs=0)
    proc = run_on(cluster, path)
    pids = [int(p.read_text()) for p in marks.glob("*.pid")]
    try:
        assert proc.returncode == 0, proc.stderr
        assert len(pids) == 1
        assert process_gone(pids[0]), "the step's stray sleep outlived the run"
    finally:
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                if "sleep" in " ".join(psutil.Process(pid).cmdline()):
                    psutil.Process(pid).kill()



FLAKY = """
pipeline flaky
param marks = "{marks}"
job work for s in "data/*.txt" {{
    shared tool = "tool.py"
    output "results" flat
    retries {retries}
    step flaky {{
        out a = "{{s.stem}}.a"
        run python {{tool}} failonce {{marks}}/{{s.stem}} {{s}} {{a}}
    }}
}}
"""


@pytest.mark.parametrize("written, option, ok", [(0, "1", True), (1, "0", False),
                                                 (1, None, True), (0, None, False)])
def test_retries_from_the_job_or_the_command_line(cluster, tmp_path, written, option, ok):
    marks = tmp_path / "marks"
    marks.mkdir()
    path = setup(tmp_path, FLAKY.format(marks=marks, retries=written), inputs=2)
    proc = run_on(cluster, path, *(["--retries", option] if option is not None else []))
    if ok:
        assert proc.returncode == 0, proc.stderr
        assert "retrying work/s1 (attempt 2 of 2): step flaky exited with status 5" in (
            proc.stderr)
        assert summary_value(proc.stdout, "retried") == "2"
        got = sorted(p.name for p in (path.parent / "results").iterdir())
        assert got == ["s1.a", "s2.a"]
        assert sorted(p.name for p in marks.iterdir()) == ["s1", "s2"]
    else:
        assert proc.returncode == 1
        assert "FAILED work/s" in proc.stderr and "step flaky exited with status 5" in proc.stderr
        assert "| first attempt fails" in proc.stderr
        assert "retrying" not in proc.stderr
        assert summary_value(proc.stdout, "retried") == "0"


def test_retries_option_must_not_be_negative(tmp_path):
    path = setup(tmp_path, FLAKY.format(marks=tmp_path, retries=0), inputs=1)
    proc = opf("run", str(path), "--retries", "-1", cwd=tmp_path)
    assert proc.returncode == 2
    assert "--retries takes a number of retries, 0 or more" in proc.stderr


STOPPING = """
pipeline stopping
job work for s in "data/*.txt" {
    shared tool = "tool.py"
    output "results" flat
    step go {
        out a = "{s.stem}.a"
        run python {tool} failon s1 7 {s} {a}
    }
}
"""

FIRST_FAILURE = """
pipeline first
job work for s in "data/s1.txt" {
    shared tool = "tool.py"
    output "results/work" flat
    step go {
        out a = "{s.stem}.a"
        run python {tool} failon BAD 7 {s} {a}
    }
}
job slow for s in "data/*.txt" {
    shared tool = "tool.py"
    output "results/slow" flat
    step go {
        out a = "{s.stem}.a"
        run python {tool} slowon s 1.0 {s} {a}
    }
}
"""


def test_the_first_failure_stops_new_work_and_running_tasks_finish(cluster, tmp_path):
    path = setup(tmp_path, FIRST_FAILURE.replace("BAD", "s1"), inputs=6)
    state = tmp_path / "state"
    proc = run_on(cluster, path, "--state", str(state))
    assert proc.returncode == 1, proc.stderr
    assert "FAILED work/s1: step go" in proc.stderr
    assert ("stopping: task work/s1 failed; no more tasks are handed out; those already on "
            "engines finish") in proc.stderr
    rows = trace_rows(state)
    finished = {r["task"] for r in rows if r["job"] == "slow" and r["kind"] == "copyback"
                and r["status"] == "done"}
    not_run = {r["task"] for r in rows if r["job"] == "slow" and r["status"] == "not-run"}
    assert finished and not_run and not finished & not_run
    assert summary_value(proc.stdout, "not finished (run stopped)") == str(len(not_run))
    results = path.parent / "results" / "slow"
    for task in finished:  # what was running finished, completely, and is in the journal
        assert (results / f"{task}.a").read_text() == f"copied:strip {task[1:]}\n"
    assert {f"slow/{t}" for t in finished} <= set(records(path, state))
    assert sorted(p.stem for p in results.iterdir()) == sorted(finished)
    assert not temporaries(path.parent)
    # the next run (the failure mended) does only what is left
    path.write_text(FIRST_FAILURE.replace("BAD", "none"))
    proc = run_on(cluster, path, "--state", str(state))
    assert proc.returncode == 0, proc.stderr
    assert summary_value(proc.stdout, "skipped") == str(len(finished))
    assert sorted(p.name for p in results.iterdir()) == [f"s{i}.a" for i in range(1, 7)]


# -- bad input at run time ----------------------------------------------------------------------


BAD = """
pipeline bad

job notfound for s in "data/s1.txt" {
    output "results/{job.name}" flat
    step go {
        out a = "{s.stem}.a"
        run opf-no-such-program-q7 {s} {a}
    }
}

job exits for s in "data/*.txt" {
    shared tool = "tool.py"
    output "results/{job.name}" flat
    step go {
        out a = "{s.stem}.a"
        run python {tool} failon s2 3 {s} {a}
    }
}

job after for x in exits.go.a {
    shared tool = "tool.py"
    output "results/{job.name}" flat
    step go {
        out b = "{x.stem}.b"
        run python {tool} copy {x} {b}
    }
}

job noout for s in "data/s1.txt" {
    shared tool = "tool.py"
    output "results/{job.name}" flat
    step go {
        out a = "{s.stem}.a"
        run python {tool} copy {s} elsewhere.txt
    }
}

job blocked for s in "data/s1.txt" {
    shared tool = "tool.py"
    output "blocked/{job.name}" flat
    step go {
        out a = "{s.stem}.a"
        run python {tool} copy {s} {a}
    }
}

job dangling for s in "data/s1.txt" {
    output "dangling/{job.name}" flat
    step go {
        out a = "{s.stem}.a"
        run cp {s} {a}
    }
}

job good for s in "data/*.txt" {
    output "results/{job.name}"
    step go {
        out x = "deep/er/{s.stem}.txt"
        run cp {s} {x}
    }
}
"""


def test_bad_input_at_run_time_each_reported_and_nothing_else_harmed(cluster, tmp_path):
    path = setup(tmp_path, BAD, inputs=3)
    folder = path.parent
    results = folder / "results"
    earlier = {"notfound/s1.a": "earlier notfound\n", "exits/s2.a": "earlier exits\n",
               "noout/s1.a": "earlier noout\n"}
    for name, text in earlier.items():
        (results / name).parent.mkdir(parents=True, exist_ok=True)
        (results / name).write_text(text)
    (folder / "blocked").write_text("a file where the results' folder belongs\n")
    (folder / "dangling").symlink_to(folder / "gone")

    proc = run_on(cluster, path, "--keep-going")
    err = proc.stderr
    assert proc.returncode == 1, err
    assert "program 'opf-no-such-program-q7' of step go was not found on the engine's PATH" in err
    assert "FAILED exits/s2: step go\n  step go exited with status 3\n  engine: " in err
    assert "    | the input was unreadable" in err
    assert "step go finished but did not write s1.a" in err
    assert (f"cannot copy s1.a back to {folder / 'blocked' / 'blocked' / 's1.a'}: "
            in err)
    assert f"({folder / 'blocked'} is a file, not a folder)" in err
    assert (f"({folder / 'dangling'} is a symbolic link to {folder / 'gone'}, which does not "
            f"exist)" in err)
    # the summary, the run's result, is on standard output; the failures on standard error
    assert "not run because exits/s2 failed: after/s2" in proc.stdout
    assert summary_value(proc.stdout, "failed") == "5"
    assert summary_value(proc.stdout, "not run (upstream failed)") == "1"
    assert not (folder / "gone").exists()
    # the earlier results of the failed tasks are untouched; the others are all there
    for name, text in earlier.items():
        assert (results / name).read_text() == text
    assert (folder / "blocked").read_text() == "a file where the results' folder belongs\n"
    got = {p.relative_to(results).as_posix() for p in files_under(results)}
    assert got == set(earlier) | {"exits/s1.a", "exits/s3.a", "after/s1.b", "after/s3.b",
                                  "good/go/deep/er/s1.txt", "good/go/deep/er/s2.txt",
                                  "good/go/deep/er/s3.txt"}
    assert (results / "good/go/deep/er/s3.txt").read_text() == "strip 3\n"
    assert not temporaries(folder)

    # the trace row of each failed step says why
    rows = trace_rows(folder / ".opf")
    failed = {r["node"]: r for r in rows if r["status"] == "failed"}
    assert failed["exec:exits/s2/go"]["returncode"] == 3
    assert failed["exec:exits/s2/go"]["message"] == "step go exited with status 3"
    assert failed["exec:noout/s1/go"]["returncode"] == 0
    assert "did not write s1.a" in failed["exec:noout/s1/go"]["message"]
    assert failed["exec:notfound/s1/go"]["returncode"] is None
    assert "is a file, not a folder" in failed["copyback:blocked/s1"]["message"]
    assert "returncode" not in next(r for r in rows if r["node"] == "exec:good/s1/go")

    # the journal knows what failed; the next run does those (and what waits for them)
    recs = records(path)
    assert {n for n, r in recs.items() if r.get("failed")} == {
        "notfound/s1", "exits/s2", "noout/s1", "blocked/s1", "dangling/s1"}
    dry = opf("run", str(path), "--dry-run", cwd=tmp_path)
    table = {line.split()[1]: line.split(None, 2)[2] for line in dry.stdout.splitlines()[:-1]}
    assert table["exits/s2"] == "failed in the last run"
    assert table["after/s2"] == "new"  # it never ran: its upstream failed
    assert table["good/s1"] == "unchanged" and table["after/s1"] == "unchanged"


def test_an_input_deleted_or_changed_after_the_plan_was_made(cluster, tmp_path):
    path = setup(tmp_path, STOPPING.replace("failon s1 7", "failon none 7"), inputs=3)
    data = path.parent / "data"
    plan = compile_file(path)
    (data / "s2.txt").unlink()
    (data / "s3.txt").write_text("strip 3, corrected after compiling\n")
    state = tmp_path / "state"
    executor = IPyParallelExecutor(cluster.client(), timeout=30)
    try:
        summary = session.run(plan, executor=executor, state_dir=state, keep_going=True)
    finally:
        executor.close()
    assert (summary.done, summary.failed) == (2, 1)
    failure = summary.failures[0]
    assert (failure.task, failure.kind, failure.node) == ("s2", "stage", "stage:work/s2")
    assert failure.message == (f"input {data / 's2.txt'} does not exist (any more): it was "
                               f"deleted or renamed after the plan was made")
    results = path.parent / "results"
    assert sorted(p.name for p in results.iterdir()) == ["s1.a", "s3.a"]
    assert (results / "s3.a").read_text() == "copied:strip 3, corrected after compiling\n"
    # the journal holds what the engine copied: the next plan (without s2) has nothing to do
    decisions = Resume(Journal.read(state, compile_file(path))).decide()
    assert [(d.task.name, d.run) for d in decisions] == [("work/s1", False), ("work/s3", False)]


# -- a full disk ---------------------------------------------------------------------------------


FULL = """
pipeline full

job stagebig for s in "big/*.bin" {
    shared extra = "extra.py"
    output "results/{job.name}" flat
    step go {
        out a = "{s.stem}.out"
        run python {extra} big 10 {a} {s}
    }
}

job stepbig for s in "data/s1.txt" {
    shared extra = "extra.py"
    output "results/{job.name}" flat
    step go {
        out a = "{s.stem}.out"
        run python {extra} big 2000000 {a}
    }
}

job backbig for s in "data/s1.txt" {
    shared extra = "extra.py"
    output "results/{job.name}" flat
    step go {
        out a = "{s.stem}.out"
        run python {extra} bigfree 2000000 {a}
    }
}

job small for s in "data/*.txt" {
    shared tool = "tool.py"
    output "results/{job.name}" flat
    step go {
        out a = "{s.stem}.out"
        run python {tool} copy {s} {a}
    }
}
"""


def _limited() -> None:  # runs in the engine process before it starts
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes fail with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))


def test_a_full_disk_on_scratch_or_destination_never_leaves_a_truncated_file(tmp_path):
    small = EngineCluster(root=tmp_path / "c", profile_dir=tmp_path / "c" / "profile",
                          cluster_id="full",
                          env=dict(os.environ, IPYTHONDIR=str(tmp_path / "c" / "ipython")))
    small.root.mkdir()
    try:
        small.start_controller()
        scratch = tmp_path / "c" / "scratch"
        scratch.mkdir()
        engine = subprocess.Popen(
            [sys.executable, "-m", "ipyparallel.engine", f"--profile-dir={small.profile_dir}",
             f"--cluster-id={small.cluster_id}", "--log-level=WARN"],
            env=dict(small.env, OPF_SCRATCH=str(scratch)), cwd=small.root,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_limited,
            start_new_session=True,
        )
        small.engines.append(engine)
        small.wait_for_engines(1)

        path = setup(tmp_path, FULL, inputs=2)
        folder = path.parent
        (folder / "big").mkdir()
        (folder / "big" / "huge.bin").write_bytes(b"y" * 2_000_000)  # more than the limit
        before = folder / "results" / "backbig" / "s1.out"
        before.parent.mkdir(parents=True)
        before.write_text("the result of an earlier run\n")

        proc = opf("run", str(path), "--cluster-file", str(small.client_file), "--keep-going",
                   cwd=tmp_path)
        err = proc.stderr
        assert proc.returncode == 1, err
        limit = "(the scratch disk is full, or a quota or file size limit was reached)"
        assert f"cannot stage {folder / 'big' / 'huge.bin'} as huge.bin: File too large " \
               f"{limit}" in err
        assert "FAILED stepbig/s1: step go\n  step go exited with status 1" in err
        assert "File too large" in err.split("FAILED stepbig/s1")[1].split("FAILED")[0]
        assert (f"cannot copy s1.out back to {before}: File too large (the destination's disk "
                f"is full, or a quota or file size limit was reached)") in err
        results = folder / "results"
        assert before.read_text() == "the result of an earlier run\n"
        got = {p.relative_to(results).as_posix() for p in files_under(results)}
        assert got == {"backbig/s1.out", "small/s1.out", "small/s2.out"}
        assert (results / "small" / "s2.out").read_text() == "copied:strip 2\n"
        assert not temporaries(folder)
    finally:
        small.stop()


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                               str(where)], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def test_a_full_destination_disk_on_a_small_tmpfs(cluster, tmp_path):
    text = """
    pipeline tiny
    job fill for s in "data/*.txt" {
        shared extra = "extra.py"
        output "results" flat
        step go {
            out a = "{s.stem}.out"
            run python {extra} pattern 300000 {s} {a}
        }
    }
    """
    path = setup(tmp_path, text, inputs=6)
    results = path.parent / "results"
    if not _mount_tmpfs(results, "1m"):
        pytest.skip("cannot mount a tmpfs here")
    try:
        proc = run_on(cluster, path, "--keep-going")
        err = proc.stderr
        assert proc.returncode == 1, err
        assert ("No space left on device (the destination's disk is full, or a quota or file "
                "size limit was reached)") in err
        written = sorted(results.iterdir())
        assert 1 <= len(written) < 6
        for out in written:  # each file there is complete
            stem = out.stem
            unit = f"strip {stem[1:]}\n".encode()
            assert out.read_bytes() == (unit * (300000 // len(unit) + 1))[:300000]
        assert not temporaries(results)
        failed = {r["task"] for r in trace_rows(path.parent / ".opf")
                  if r["status"] == "failed"}
        assert failed == {f"s{i}" for i in range(1, 7)} - {p.stem for p in written}
    finally:
        subprocess.run(["umount", "-l", str(results)], capture_output=True, timeout=30)


# -- hostile names ---------------------------------------------------------------------------


HOSTILE_NAMES = ["a b", "it's", "x;rm -rf y", "$(touch pwned)", "star*", "Größe ñ", 'q"uote',
                 "back\\slash", "`id`"]

HOSTILE = """
pipeline hostile
param word = "{word}"
job w for s in "data/*.txt" {{
    shared extra = "extra.py"
    output "results" flat
    step dump {{
        out a = "{{s.stem}}.json"
        run python {{extra}} argv {{a}} {{s}} {{word}} "{{s.stem}} and {{word}}" '{{s.name}}'
    }}
    step shell {{
        out b = "{{s.stem}}.sh.txt"
        run sh "cat {{s}} {{dump.a}} > {{b}}; echo {{word}} >> {{b}}"
    }}
}}
"""


def test_hostile_names_and_values_are_single_words_and_nothing_escapes(cluster, tmp_path):
    canary = tmp_path / "canary"
    word = f"v a l;touch {canary} $(touch {canary}) `touch {canary}` * 'q' Grüße"
    text = HOSTILE.format(word=word.replace('"', '\\"'))
    path = setup(tmp_path, text, inputs=0)
    data = path.parent / "data"
    for name in HOSTILE_NAMES:
        (data / f"{name}.txt").write_text(f"input {name}\n")
    scratch = tmp_path / "scratch"
    before = {p.relative_to(path.parent).as_posix() for p in files_under(path.parent)}

    proc = run_on(cluster, path, "--scratch", str(scratch))
    assert proc.returncode == 0, proc.stderr
    results = path.parent / "results"
    for name in HOSTILE_NAMES:
        words = json.loads((results / f"{name}.json").read_text(encoding="utf-8"))
        assert words == [f"{name}.txt", word, f"{name} and {word}", f"{name}.txt"]
        shell = (results / f"{name}.sh.txt").read_text(encoding="utf-8")
        assert shell == (f"input {name}\n" + json.dumps([f"{name}.txt", word,
                         f"{name} and {word}", f"{name}.txt"], ensure_ascii=False)
                         + word + "\n")
    assert not canary.exists()
    # written: the declared destinations and the run's state, nothing else
    after = {p.relative_to(path.parent).as_posix() for p in files_under(path.parent)}
    new = after - before
    declared = {f"results/{n}.json" for n in HOSTILE_NAMES}
    declared |= {f"results/{n}.sh.txt" for n in HOSTILE_NAMES}
    assert {p for p in new if not p.startswith(".opf/")} == declared
    # in scratch: the job folder with its shared file; every task folder was emptied
    left = {p.relative_to(scratch).as_posix() for p in scratch.rglob("*")}
    key, = {p.parent.name for p in scratch.rglob(".opf-staged")}
    job = f"opf/hostile/w/{key}"
    assert left == {"opf", "opf/hostile", "opf/hostile/.w.lock", "opf/hostile/w",
                    f"opf/hostile/w/.{key}.lock", f"opf/hostile/w/.{key}.tasks", job,
                    f"{job}/extra.py", f"{job}/.opf-staged"}
    for where in (cluster.root, tmp_path):
        assert not list(where.rglob("pwned")) and not list(where.rglob("P"))


# -- a lost engine, and Ctrl-C -------------------------------------------------------------------


SLEEPY = """
pipeline {name}
param pids = "{pids}"
job quick for s in "data/*.txt" {{
    shared tool = "tool.py"
    output "results/quick" flat
    step go {{
        out a = "{{s.stem}}.a"
        run python {{tool}} copy {{s}} {{a}}
    }}
}}
job slow for s in "data/*.txt" {{
    shared tool = "tool.py"
    output "results/slow" flat
    step wait {{
        out a = "{{s.stem}}.a"
        run python {{tool}} pidfile {{pids}} {seconds} {{s}} {{a}}
    }}
}}
"""


@pytest.mark.slow
def test_cli_a_killed_engine_s_task_is_staged_again_elsewhere(cluster, tmp_path):
    victim = cluster.start_engine(cluster.root / "scratch" / "m4")
    try:
        cluster.wait_for_engines(4)
        victim_id = cluster.engine_ids_by_pid()[victim.pid]
        pids = tmp_path / "pids"
        pids.mkdir()
        text = SLEEPY.format(name="losing", pids=pids, seconds=1.5)
        text = text.split("job quick")[0] + "job slow" + text.split("job slow")[1]
        path = setup(tmp_path, text, inputs=4)

        def kill_when_busy() -> None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if (pids / str(victim.pid)).exists():
                    victim.send_signal(signal.SIGKILL)
                    return
                time.sleep(0.02)

        killer = threading.Thread(target=kill_when_busy)
        killer.start()
        proc = run_on(cluster, path)
        killer.join()
        assert victim.wait(timeout=10) == -signal.SIGKILL
        assert proc.returncode == 0, proc.stderr
        assert f"engine {victim_id} was lost; 1 task goes to other engines" in proc.stderr
        assert summary_value(proc.stdout, "engines lost") == "1 (1 task moved)"
        assert summary_value(proc.stdout, "retried") == "0"
        rows = trace_rows(path.parent / ".opf")
        lost = [r for r in rows if r["status"] == "lost"]
        assert len(lost) == 1 and lost[0]["engine"] == victim_id
        assert lost[0]["kind"] == "stage" and lost[0]["job"] == "slow"
        task = lost[0]["task"]
        again = [r for r in rows if r["node"] == f"stage:slow/{task}" and r["status"] == "done"]
        assert len(again) == 1 and again[0]["engine"] != victim_id
        assert again[0]["start"] >= lost[0]["end"] - 1
        assert again[0]["attempt"] == lost[0]["attempt"] == 0
        assert (path.parent / "results" / "slow" / f"{task}.a").read_text().startswith(
            "copied:strip")
    finally:
        if victim.poll() is None:
            victim.kill()


def _steps(pids: Path) -> list[psutil.Process]:
    found = []
    for p in pids.iterdir():
        if p.name.isdigit():
            with contextlib.suppress(psutil.Error, ValueError):
                found.append(psutil.Process(int(p.read_text())))
    return found


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_stops_keeps_results_consistent_and_writes_the_journal(cluster, tmp_path,
                                                                      presses):
    pids = tmp_path / "pids"
    pids.mkdir()
    path = setup(tmp_path, SLEEPY.format(name="ctrlc", pids=pids, seconds=30), inputs=2)
    driver = subprocess.Popen(
        [sys.executable, "-m", "opals_dsl", "run", str(path), "--cluster-file",
         str(cluster.client_file)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    steps: list[psutil.Process] = []
    try:
        wait_for(lambda: sum(p.name.isdigit() for p in pids.iterdir()) == 2)
        steps = _steps(pids)
        quick = path.parent / "results" / "quick"
        wait_for(lambda: quick.is_dir() and len(list(quick.iterdir())) == 2)
        time.sleep(0.3)  # the journal takes its records from the round that brings them
        t0 = time.monotonic()
        for _ in range(presses):
            driver.send_signal(signal.SIGINT)
            time.sleep(0.05)
        out, err = driver.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode == 130, err
    assert took < 20
    assert "Traceback" not in err
    if presses == 1:
        assert "interrupted: stopping the running tasks" in err
        assert "ctrlc: interrupted" in out
        for step in steps:  # the running steps were stopped
            wait_for(lambda step=step: not step.is_running()
                     or step.status() == psutil.STATUS_ZOMBIE, timeout=15)
        # the trace and the report say which engine held each slow task, and show its log
        assert "not finished (run stopped)  2 (2 of them on engines)" in out
        rows = trace_rows(path.parent / ".opf")
        held = [r for r in rows if r["status"] == "interrupted"]
        assert sorted(r["task"] for r in held) == ["s1", "s2"]
        assert len({r["engine"] for r in held}) == 2  # one slow task on each of two engines
        assert all(r["node"] == f"stage:slow/{r['task']}" and r["end"] > r["start"]
                   for r in held)
        report = opf("report", str(path), cwd=tmp_path)
        page = Path(report.stdout.split("report: ", 1)[1].strip()).read_text()
        section = page[page.index("<h2>Interrupted"):]
        for task in ("s1", "s2"):
            assert f"<b>slow/{task}</b>" in section
            assert f"logs/slow/wait/{task}.log" in section
        assert "step wait had begun" in section
    else:
        for step in steps:  # a second Ctrl-C does not wait for them; free the engines
            with contextlib.suppress(psutil.Error):
                step.kill()
    results = path.parent / "results"
    assert sorted(p.name for p in (results / "quick").iterdir()) == ["s1.a", "s2.a"]
    assert not (results / "slow").exists() or not list((results / "slow").iterdir())
    assert not temporaries(path.parent)
    recs = records(path)
    assert {"quick/s1", "quick/s2"} <= set(recs)
    assert not any(recs[name].get("cmd") for name in recs if name.startswith("slow/"))
    dry = opf("run", str(path), "--dry-run", cwd=tmp_path)
    assert "ctrlc: 2 of 4 tasks would run, 2 unchanged" in dry.stdout
    if presses == 1:  # the tasks the engines held are named as such, not as new ones
        assert sorted(ln.split() for ln in dry.stdout.splitlines() if "slow/" in ln) == [
            ["run", "slow/s1", "interrupted", "in", "the", "last", "run"],
            ["run", "slow/s2", "interrupted", "in", "the", "last", "run"]], dry.stdout


def _small_files() -> None:  # the driver may write files of at most 3,000 bytes
    resource.setrlimit(resource.RLIMIT_FSIZE, (3000, resource.RLIM_INFINITY))


def test_a_full_state_folder_does_not_stop_the_run(cluster, tmp_path):
    path = setup(tmp_path, STOPPING.replace("failon s1 7", "failon none 7"), inputs=12)
    # the engines cannot leave receipts there either, as on a really full disk (the limit
    # here is the driver's alone): a file stands where their folder would be
    receipts = path.parent / ".opf" / "journal" / "stopping.receipts"
    receipts.parent.mkdir(parents=True)
    receipts.write_text("")
    proc = subprocess.run(
        [sys.executable, "-m", "opals_dsl", "run", str(path), "--cluster-file",
         str(cluster.client_file)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, preexec_fn=_small_files)
    err = proc.stderr
    assert proc.returncode == 0, err
    journal = path.parent / ".opf" / "journal" / "stopping.jsonl"
    assert (f"opf: warning: cannot write the journal {journal}: File too large; tasks finished "
            f"since are not recorded and will run again") in err
    assert "opf: warning: cannot write the trace" in err
    results = path.parent / "results"
    assert sorted(p.name for p in results.iterdir()) == sorted(f"s{i}.a" for i in range(1, 13))
    assert not temporaries(path.parent)
    recorded = set(records(path))
    assert 0 < len(recorded) < 12
    # with room again, the next run does exactly what was not recorded
    proc = run_on(cluster, path)
    assert proc.returncode == 0, proc.stderr
    assert summary_value(proc.stdout, "skipped") == str(len(recorded))
    assert summary_value(proc.stdout, "run") == str(12 - len(recorded))
    assert "warning" not in proc.stderr


SLOW = """\
job slow for n in range(2) {
    step wait {
        out done = "{n}.txt"
        run python -c "import time, sys; time.sleep(60); open(sys.argv[1], 'w').close()" {done}
    }
}
"""


@pytest.mark.slow
def test_a_controller_that_dies_mid_run_ends_the_run_instead_of_waiting_forever(tmp_path):
    """A lost controller says nothing; opf must notice by itself and stop within its timeout."""
    lone = EngineCluster(root=tmp_path / "c", profile_dir=tmp_path / "c" / "profile",
                         cluster_id="lone",
                         env=dict(os.environ, IPYTHONDIR=str(tmp_path / "c" / "ipython")))
    lone.root.mkdir()
    driver = None
    try:
        lone.start_controller()
        lone.start_engine(tmp_path / "c" / "scratch")
        lone.wait_for_engines(1)
        path = tmp_path / "slow.opf"
        path.write_text(SLOW)
        driver = subprocess.Popen(
            [sys.executable, "-m", "opals_dsl", "run", str(path), "--cluster-file",
             str(lone.client_file), "--timeout", "3"],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        def sleeping() -> bool:
            for p in psutil.process_iter():
                with contextlib.suppress(psutil.Error):
                    if "time.sleep(60)" in " ".join(p.cmdline()):
                        return True
            return False

        wait_for(sleeping, 60)
        controller = psutil.Process(lone.controller.pid)
        for proc in [*controller.children(recursive=True), controller]:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        started = time.monotonic()
        _out, err = driver.communicate(timeout=50)
        assert time.monotonic() - started < 45
        assert driver.returncode == 3, err  # the cluster can no longer be reached
        assert "every engine of the cluster was lost" in err
        assert not (tmp_path / "results").exists()
    finally:
        if driver is not None and driver.poll() is None:  # it hung: don't leave it behind
            driver.kill()
        lone.stop()
