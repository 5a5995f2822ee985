"""Tests of the scheduler (opals_dsl.runtime.runtime) on real engines and real pipeline files.

Most tests run on the session's cluster (tests/conftest.py): three ``ipengine`` processes, two
sharing one scratch root, so they are two "machines". Plans come from real ``.opf`` files through
``compile_file``; steps run a small Python tool. A few tests of the policy (skipping, blocking,
batching) use the in-process :class:`LocalExecutor`; the CLI is run as a real subprocess.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from conftest import (
    EngineCluster,
    files_under,
    last_run,
    trace_rows,
    write_pipeline,
)

from opals_dsl.api import compile_file
from opals_dsl.plan import model
from opals_dsl.runtime import session
from opals_dsl.runtime.events import RunListener
from opals_dsl.runtime.executor import IPyParallelExecutor, LocalExecutor
from opals_dsl.runtime.fsatomic import is_temp_name
from opals_dsl.runtime.progress import Progress
from opals_dsl.runtime.scheduler import Scheduler
from opals_dsl.runtime.session import remove_stale_temporaries
from opals_dsl.units import format_bytes, format_duration

CHAIN = """
pipeline {name}

job up for s in "data/*.txt" {{
    shared tool = "tool.py"
    output "results/up" flat
    step copy {{
        out a = "{{s.stem}}.a"
        out t = "{{s.stem}}.scratchpad" temp
        run python {{tool}} copy {{s}} {{a}} {{t}}
    }}
}}

job down for x in up.copy.a {{
    shared tool = "tool.py"
    output "results/down"
    step first {{
        out b = "{{x.stem}}.b"
        run python {{tool}} copy {{x}} {{b}}
    }}
    step second {{
        out c = "{{x.stem}}.c"
        run python {{tool}} copy {{first.b}} {{c}}
    }}
}}

job all {{
    shared tool = "tool.py"
    output "results/all" flat
    step merge {{
        out m = "all.txt"
        run python {{tool}} merge {{m}} {{down.second.c}}
    }}
}}
"""


def run_plan(plan, executor, *, state_dir, **kwargs):
    """The session, on ``executor``, without a journal: every task runs (or those ``skip``
    lets run)."""
    return session.run(plan, executor=executor, state_dir=state_dir, resume=False, **kwargs)


def executor_for(cluster: EngineCluster) -> IPyParallelExecutor:
    return IPyParallelExecutor(cluster.client(), timeout=30)


def run_on(cluster: EngineCluster, plan, state: Path, **kwargs):
    executor = executor_for(cluster)
    try:
        return run_plan(plan, executor, state_dir=state, **kwargs)
    finally:
        executor.close()


def opf(*args: str, cwd: Path, env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "opals_dsl", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


# -- on the cluster ----------------------------------------------------------------------------


def test_chain_map_and_gather_deliver_outputs_flat_and_by_step(cluster, tmp_path):
    path = write_pipeline(tmp_path / "p", CHAIN.format(name="chain"), inputs=6)
    plan = compile_file(path)
    state = tmp_path / "state"
    summary = run_on(cluster, plan, state)

    assert summary.exit_code == 0, summary.failures
    assert (summary.done, summary.failed, summary.not_run) == (13, 0, 0)
    results = tmp_path / "p" / "results"
    got = {p.relative_to(results).as_posix() for p in files_under(results)}
    want = {f"up/s{i}.a" for i in range(1, 7)}
    want |= {f"down/first/s{i}.b" for i in range(1, 7)}
    want |= {f"down/second/s{i}.c" for i in range(1, 7)}
    want |= {"all/all.txt"}
    assert got == want  # flat, by step, and no temp output nor temporary anywhere
    assert (results / "up" / "s4.a").read_text() == "copied:strip 4\n"
    assert (results / "down" / "second" / "s4.c").read_text() == "copied:copied:copied:strip 4\n"
    merged = (results / "all" / "all.txt").read_text().splitlines()
    assert merged == [f"copied:copied:copied:strip {i}" for i in range(1, 7)]
    for i in range(1, 7):
        assert (last_run(state) / "logs" / "down" / "second" / f"s{i}.log").is_file()

    rows = trace_rows(state)
    assert {r["status"] for r in rows} <= {"done", "cached"}
    # every node of the plan has a row, with the fields of the trace
    assert {r["node"] for r in rows} == set(plan.nodes)
    assert set(rows[0]) == {"node", "kind", "job", "task", "step", "engine", "machine", "start",
                            "end", "status", "bytes", "attempt"}
    # all nodes of a task ran on one engine
    engines_of_task = defaultdict(set)
    for r in rows:
        if r["task"] is not None:
            engines_of_task[(r["job"], r["task"])].add(r["engine"])
    assert len(engines_of_task) == 13
    assert all(len(engines) == 1 for engines in engines_of_task.values())
    # the six tasks of `up` were spread over all three engines, i.e. both machines
    up_engines = {r["engine"] for r in rows if r["job"] == "up" and r["task"]}
    assert len(up_engines) == 3
    # the machine stage ran exactly once on each machine that ran a task of the job, even on
    # the machine whose two engines raced for it; the other tasks found it cached
    for job in ("up", "down", "all"):
        machines = {r["machine"] for r in rows if r["job"] == job and r["task"]}
        stage_rows = [r for r in rows if r["node"] == f"stage:{job}"]
        done = Counter(r["machine"] for r in stage_rows if r["status"] == "done")
        assert done == dict.fromkeys(machines, 1), (job, stage_rows)
        copybacks = [r for r in rows if r["job"] == job and r["kind"] == "copyback"]
        assert len(stage_rows) == len(copybacks)
    assert len({r["machine"] for r in rows if r["job"] == "up"}) == 2
    # the copy-back of an upstream task finished before its downstream task was staged
    end = {r["node"]: r["end"] for r in rows}
    start = {r["node"]: r["start"] for r in rows if r["task"]}
    for i in range(1, 7):
        assert start[f"stage:down/s{i}"] >= end[f"copyback:up/s{i}"]
        assert start["stage:all/0"] >= end[f"copyback:down/s{i}"]


STREAM = """
pipeline stream

job up for s in "data/*.txt" {
    shared tool = "tool.py"
    output "results/up" flat
    step work {
        out a = "{s.stem}.a"
        run python {tool} slowon s2 1.5 {s} {a}
    }
}

job down for x in up.work.a {
    shared tool = "tool.py"
    output "results/down" flat
    step copy {
        out b = "{x.stem}.b"
        run python {tool} copy {x} {b}
    }
}

job all {
    shared tool = "tool.py"
    output "results/all" flat
    step merge {
        out m = "all.txt"
        run python {tool} merge {m} {up.work.a}
    }
}
"""


def test_a_map_task_starts_when_its_own_upstream_task_is_done(cluster, tmp_path):
    path = write_pipeline(tmp_path / "p", STREAM, inputs=2)
    state = tmp_path / "state"
    summary = run_on(cluster, compile_file(path), state)
    assert summary.exit_code == 0, summary.failures
    rows = trace_rows(state)
    start = {r["node"]: r["start"] for r in rows if r["task"]}
    end = {r["node"]: r["end"] for r in rows}
    # up/s2 sleeps 1.5 s; down/s1 needs only up/s1, so it ran meanwhile
    assert start["stage:down/s1"] < end["exec:up/s2/work"]
    assert end["copyback:down/s1"] < end["exec:up/s2/work"]
    # the gather waited for every upstream task
    assert start["stage:all/0"] >= max(end["copyback:up/s1"], end["copyback:up/s2"])
    assert start["stage:down/s2"] >= end["copyback:up/s2"]


RETRY = """
pipeline retrying
param marks = "{marks}"

job work for s in "data/*.txt" {{
    shared tool = "tool.py"
    output "results" flat
    retries 1
    step flaky {{
        out a = "{{s.stem}}.a"
        run python {{tool}} failonce {{marks}}/{{s.stem}} {{s}} {{a}}
    }}
}}
"""


def test_a_failed_attempt_is_retried_from_its_task_stage(cluster, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    path = write_pipeline(tmp_path / "p", RETRY.format(marks=marks), inputs=2)
    state = tmp_path / "state"
    retried = []

    class Spy(RunListener):
        def task_retrying(self, task, failure):
            retried.append((task.name, failure.kind, failure.returncode))

    summary = run_on(cluster, compile_file(path), state, listener=Spy())
    assert summary.exit_code == 0, summary.failures
    assert (summary.done, summary.failed, summary.retried) == (2, 0, 2)
    assert sorted(retried) == [("work/s1", "exit", 5), ("work/s2", "exit", 5)]
    rows = trace_rows(state)
    flaky = sorted((r["task"], r["attempt"], r["status"]) for r in rows if r["kind"] == "exec")
    assert flaky == [("s1", 0, "failed"), ("s1", 1, "done"), ("s2", 0, "failed"), ("s2", 1, "done")]
    stages = sorted((r["task"], r["attempt"]) for r in rows if r["node"].startswith("stage:work/"))
    assert stages == [("s1", 0), ("s1", 1), ("s2", 0), ("s2", 1)]
    assert (tmp_path / "p" / "results" / "s2.a").read_text() == "copied:strip 2\n"


FAILING = """
pipeline failing

job work for s in "data/*.txt" {
    shared tool = "tool.py"
    output "results" flat
    step convert {
        out a = "{s.stem}.a"
        run python {tool} failon s2 3 {s} {a}
    }
}

job after for x in work.convert.a {
    shared tool = "tool.py"
    output "results/after" flat
    step copy {
        out b = "{x.stem}.b"
        run python {tool} copy {x} {b}
    }
}
"""


def test_cli_failing_step_exits_1_and_reports_it(cluster, tmp_path):
    path = write_pipeline(tmp_path / "p", FAILING, inputs=3)
    results = tmp_path / "p" / "results"
    results.mkdir()
    (results / "s2.a").write_text("from an earlier run\n")
    (results / f".s1.a.opf-tmp-{'ab' * 8}").write_text("half a file of a killed run")
    state = tmp_path / "state"

    proc = opf("run", str(path), "--cluster-file", str(cluster.client_file), "--state",
               str(state), cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    err = proc.stderr
    assert "FAILED work/s2: step convert" in err
    assert "exited with status 3" in err and "exit status:" not in err
    assert "| the input was unreadable" in err
    log = last_run(state) / "logs" / "work" / "convert" / "s2.log"
    assert f"full log: {log}" in err
    assert "about to fail" in log.read_text()
    kept = err.split("task folder kept: ")[1].splitlines()[0]
    assert Path(kept, "s2.txt").is_file()  # the failed task's folder is there to inspect
    # the earlier output was not touched, nothing half-written remains, the temporary a
    # killed run left behind is gone
    assert (results / "s2.a").read_text() == "from an earlier run\n"
    assert not any(is_temp_name(p.name) for p in files_under(tmp_path / "p"))
    assert "all tasks done" not in proc.stdout
    rows = trace_rows(state)
    assert any(r["node"] == "exec:work/s2/convert" and r["status"] == "failed" for r in rows)
    assert not any(r["node"] == "stage:after/s2" and r["status"] == "done" for r in rows)
    for r in rows:  # what ran completed
        if r["node"].startswith("copyback:") and r["status"] == "done":
            task = r["task"]
            dest = results / (f"{task}.a" if r["job"] == "work" else f"after/{task}.b")
            assert dest.read_text().startswith("copied:")


def test_cli_keep_going_runs_everything_not_depending_on_the_failure(cluster, tmp_path):
    path = write_pipeline(tmp_path / "p", FAILING, inputs=3)
    state = tmp_path / "state"
    proc = opf("run", str(path), "--cluster-file", str(cluster.client_file), "--state",
               str(state), "--keep-going", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    results = tmp_path / "p" / "results"
    got = {p.relative_to(results).as_posix() for p in files_under(results)}
    assert got == {"s1.a", "s3.a", "after/s1.b", "after/s3.b"}
    assert "FAILED work/s2" in proc.stderr
    assert "not run (upstream failed)  1" in proc.stdout
    rows = trace_rows(state)
    assert {r["status"] for r in rows if r["task"] == "s2" and r["job"] == "after"} == {"blocked"}


def test_cli_success_on_cluster_file_and_scratch_option(cluster, tmp_path):
    path = write_pipeline(tmp_path / "p", STREAM.replace("1.5", "0"), inputs=2)
    scratch = tmp_path / "scratch"
    proc = opf("run", str(path), "--cluster-file", str(cluster.client_file), "--scratch",
               str(scratch), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "stream: all tasks done" in proc.stdout
    assert "done down/s2 on engine" in proc.stderr
    state = tmp_path / "p" / ".opf"  # the default state folder, beside the pipeline file
    rows = trace_rows(state)
    assert {r["machine"].split(":", 1)[1] for r in rows} == {str(scratch.resolve())}
    job, = (scratch / "opf" / "stream" / "up").glob("*/.opf-staged")  # the job folder
    assert (job.parent / "tool.py").is_file()
    assert not (job.parent / "s1").exists()  # task folders emptied
    assert (tmp_path / "p" / "results" / "all" / "all.txt").is_file()
    # the cluster was left running
    client = cluster.client()
    try:
        assert len(client.ids) >= 3
    finally:
        client.close()


def test_cli_a_file_named_like_an_option_is_copied_as_a_file(cluster, tmp_path):
    path = write_pipeline(tmp_path / "p", """
        job j for x in "data/*.txt" {
            output "results" flat
            step copy {
                out o = "{x.stem}.copy"
                run cp {x} {o}
            }
            step sh {
                out b = "{x.stem}.both"
                run sh "cat {x} {copy.o} > {b}"
            }
        }
    """, inputs=1)
    (tmp_path / "p" / "data" / "-n.txt").write_text("dash\n", encoding="utf-8")
    proc = opf("run", str(path), "--cluster-file", str(cluster.client_file), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = tmp_path / "p" / "results"
    assert (results / "-n.copy").read_text() == "dash\n"
    assert (results / "-n.both").read_text() == "dash\ndash\n"
    assert (results / "s1.both").read_text() == "strip 1\nstrip 1\n"
    logs = last_run(tmp_path / "p" / ".opf") / "logs" / "j"
    assert (logs / "copy" / "-n.log").read_text().startswith("$ cp ./-n.txt ./-n.copy\n")
    # the script names the values; they follow it as the shell's arguments
    assert (logs / "sh" / "-n.log").read_text().startswith(
        """$ /bin/sh -c 'cat "$1" "$2" > "$3"' sh ./-n.txt ./-n.copy ./-n.both\n""")


def test_cli_unreachable_cluster_exits_3(cluster, tmp_path):
    path = write_pipeline(tmp_path / "p", STREAM, inputs=1)
    proc = opf("run", str(path), "--cluster-file", str(tmp_path / "nowhere.json"), cwd=tmp_path)
    assert proc.returncode == 3
    assert "nowhere.json does not exist" in proc.stderr
    # a connection file whose controller is gone: nothing listens on its ports
    info = json.loads(cluster.client_file.read_text())

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    info["registration"] = free
    dead = tmp_path / "dead.json"
    dead.write_text(json.dumps(info))
    t0 = time.monotonic()
    proc = opf("run", str(path), "--cluster-file", str(dead), "--timeout", "1", cwd=tmp_path)
    assert proc.returncode == 3
    assert "cannot reach the ipyparallel controller" in proc.stderr
    assert time.monotonic() - t0 < 20
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "p" / "results").exists()


def test_a_lost_engine_s_tasks_run_elsewhere_without_using_retries(cluster, tmp_path):
    victim = cluster.start_engine(cluster.root / "scratch" / "m3")
    try:
        cluster.wait_for_engines(4)
        pids = tmp_path / "pids"
        pids.mkdir()
        text = f"""
        pipeline losing
        param pids = "{pids}"
        job work for s in "data/*.txt" {{
            shared tool = "tool.py"
            output "results" flat
            step slow {{
                out a = "{{s.stem}}.a"
                run python {{tool}} pidfile {{pids}} 1.0 {{s}} {{a}}
            }}
        }}
        """
        path = write_pipeline(tmp_path / "p", text, inputs=4)
        lost = []

        class Spy(RunListener):
            def engine_lost(self, engine, tasks):
                lost.append((engine, [t.name for t in tasks]))

        def kill_when_busy() -> None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if (pids / str(victim.pid)).exists():
                    victim.send_signal(signal.SIGKILL)
                    return
                time.sleep(0.02)

        killer = threading.Thread(target=kill_when_busy)
        killer.start()
        summary = run_on(cluster, compile_file(path), tmp_path / "state", listener=Spy())
        killer.join()
        assert victim.wait(timeout=10) == -signal.SIGKILL
        assert summary.exit_code == 0, summary.failures
        assert (summary.done, summary.retried, summary.engines_lost) == (4, 0, 1)
        assert len(lost) == 1 and len(lost[0][1]) == 1
        assert summary.resubmitted == 1
        got = sorted(p.name for p in files_under(tmp_path / "p" / "results"))
        assert got == ["s1.a", "s2.a", "s3.a", "s4.a"]
    finally:
        if victim.poll() is None:
            victim.kill()


def test_no_engine_left_ends_the_run_with_exit_3(tmp_path):
    small = EngineCluster(root=tmp_path / "c", profile_dir=tmp_path / "c" / "profile",
                          cluster_id="lonely",
                          env=dict(os.environ, IPYTHONDIR=str(tmp_path / "c" / "ipython")))
    small.root.mkdir()
    try:
        small.start_controller()
        only = small.start_engine(tmp_path / "c" / "scratch")
        small.wait_for_engines(1)
        pids = tmp_path / "pids"
        pids.mkdir()
        text = f"""
        pipeline lonely
        param pids = "{pids}"
        job work for s in "data/*.txt" {{
            shared tool = "tool.py"
            output "results" flat
            step slow {{
                out a = "{{s.stem}}.a"
                run python {{tool}} pidfile {{pids}} 5 {{s}} {{a}}
            }}
        }}
        """
        path = write_pipeline(tmp_path / "p", text, inputs=2)

        def kill_when_busy() -> None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not (pids / str(only.pid)).exists():
                time.sleep(0.02)
            only.send_signal(signal.SIGKILL)

        killer = threading.Thread(target=kill_when_busy)
        killer.start()
        executor = IPyParallelExecutor(small.client(), timeout=30)
        try:
            summary = run_plan(compile_file(path), executor, state_dir=tmp_path / "state")
        finally:
            executor.close()
            killer.join()
        assert summary.no_engines
        assert summary.exit_code == 3
        assert (summary.done, summary.failed, summary.not_run) == (0, 0, 2)
    finally:
        small.stop()


def test_consumed_results_are_dropped_from_the_client(cluster, tmp_path):
    text = """
    pipeline many
    job noop for i in range(600) {
        output "results" flat
        step touch {
            run true
        }
    }
    """
    path = write_pipeline(tmp_path / "p", text, inputs=0)
    executor = executor_for(cluster)
    client = executor.client
    try:
        summary = run_plan(compile_file(path), executor, state_dir=tmp_path / "state")
        assert summary.exit_code == 0, summary.failures[:1]
        assert summary.done == 600
        assert len(client.results) < 50
        assert len(client.metadata) < 50
        assert len(client._futures) < 50
        # batching: far fewer messages than tasks
        rows = trace_rows(tmp_path / "state")
        assert len({r["engine"] for r in rows}) >= 2
    finally:
        executor.close()


# -- the policy, on the in-process executor ------------------------------------------------------


def test_plan_tasks_follow_plan_order_and_dependencies(tmp_path):
    path = write_pipeline(tmp_path / "p", CHAIN.format(name="order"), inputs=3)
    found = model.tasks(compile_file(path))
    tasks = found.tasks
    assert [t.name for t in tasks] == ["up/s1", "up/s2", "up/s3", "down/s1", "down/s2",
                                       "down/s3", "all/0"]
    assert found.upstream == ((), (), (), (0,), (1,), (2,), (3, 4, 5))
    assert tasks[3].execs == ("exec:down/s1/first", "exec:down/s1/second")
    assert tasks[3].nodes[0] == "stage:down"


def test_the_collector_skips_the_plan_while_a_run_schedules_and_is_left_as_found(tmp_path):
    """While the tasks run, what lives through the run (the plan, its tasks) is frozen for the
    cyclic garbage collector, so that the cycles each batch leaves are collected as they come
    and not only once the plan's size in new objects was made; afterwards the collector is as
    it was — also when it was off, which the run leaves alone."""
    import gc

    path = write_pipeline(tmp_path / "p", CHAIN.format(name="frozen"), inputs=2)
    plan = compile_file(path)
    tasks = model.tasks(plan)
    seen = []

    class Watch(RunListener):
        def task_done(self, task, result, engine):
            seen.append((gc.isenabled(), gc.get_freeze_count()))

    assert gc.get_freeze_count() == 0
    summary = run_plan(plan, LocalExecutor([str(tmp_path / "m")]), state_dir=tmp_path / "s",
                       listener=Watch())
    assert summary.exit_code == 0 and len(seen) == len(tasks)
    assert all(enabled and frozen > len(tasks) for enabled, frozen in seen)
    assert gc.isenabled() and gc.get_freeze_count() == 0

    seen.clear()
    gc.disable()
    try:
        summary = run_plan(plan, LocalExecutor([str(tmp_path / "m")]),
                           state_dir=tmp_path / "s2", listener=Watch())
    finally:
        off = not gc.isenabled()
        gc.enable()
    assert summary.exit_code == 0 and off
    assert seen and all(not enabled and frozen == 0 for enabled, frozen in seen)


def test_skipped_tasks_count_as_finished_downstream(tmp_path):
    path = write_pipeline(tmp_path / "p", CHAIN.format(name="skipping"), inputs=3)
    plan = compile_file(path)
    asked = []

    def skip(task) -> bool:
        asked.append(task.name)
        return task.job == "up"

    summary = run_plan(plan, LocalExecutor([str(tmp_path / "m")]), state_dir=tmp_path / "s",
                       skip=skip)
    # `up` was skipped: its outputs do not exist, so `down` fails at its task stage
    assert summary.skipped == 3
    assert asked[:3] == ["up/s1", "up/s2", "up/s3"]
    assert summary.failed >= 1
    assert summary.failures[0].kind == "stage"
    rows = trace_rows(tmp_path / "s")
    assert {r["status"] for r in rows if r["job"] == "up"} == {"skipped"}


def test_keep_going_blocks_only_the_dependents_of_a_failure(tmp_path):
    path = write_pipeline(tmp_path / "p", FAILING, inputs=3)
    summary = run_plan(compile_file(path), LocalExecutor([str(tmp_path / "m")]),
                       state_dir=tmp_path / "s", keep_going=True)
    assert (summary.done, summary.failed, summary.blocked, summary.not_run) == (4, 1, 1, 0)
    assert summary.exit_code == 1
    failure = summary.failures[0]
    assert (failure.job, failure.task, failure.step, failure.returncode) == (
        "work", "s2", "convert", 3)


def test_without_keep_going_nothing_new_starts_after_a_failure(tmp_path):
    path = write_pipeline(tmp_path / "p", FAILING, inputs=3)
    plan = compile_file(path)
    summary = run_plan(plan, LocalExecutor([str(tmp_path / "m")]), state_dir=tmp_path / "s",
                       depth=1, max_batch=1)
    # one engine, one task at a time: s1 done, s2 fails, nothing after it is submitted; what
    # waits for s2 could never have run, the rest was stopped
    assert (summary.done, summary.failed, summary.blocked, summary.not_run) == (1, 1, 1, 3)
    assert summary.exit_code == 1


def test_batches_grow_for_short_tasks_and_stay_single_for_long_ones(tmp_path):
    text = """
    pipeline batching
    job noop for i in range(200) {
        output "results" flat
        step touch {
            run true
        }
    }
    """
    path = write_pipeline(tmp_path / "p", text, inputs=0)
    sizes = []

    class Spy(RunListener):
        def tasks_submitted(self, tasks, engine):
            sizes.append(len(tasks))

    scheduler = Scheduler(compile_file(path), LocalExecutor([str(tmp_path / "m")] * 2),
                          state_dir=tmp_path / "s", listener=Spy(), batch_seconds=0.5)
    summary = scheduler.run()
    assert summary.done == 200
    assert sizes[:4] == [1, 1, 1, 1]  # nothing measured yet: one task a batch
    assert max(sizes) > 4  # then several a message
    # a long batch target cannot take more than a fair share of the ready tasks
    assert max(sizes) <= 100


def test_stale_temporaries_in_destination_folders_are_removed(tmp_path):
    path = write_pipeline(tmp_path / "p", CHAIN.format(name="stale"), inputs=1)
    up = tmp_path / "p" / "results" / "up"
    up.mkdir(parents=True)
    stale = up / f".s1.a.opf-tmp-{'0f' * 8}"
    stale.write_text("partial")
    keep = up / ".hidden-but-not-ours"
    keep.write_text("x")
    removed = remove_stale_temporaries(compile_file(path))
    assert removed == [str(stale)]
    assert not stale.exists() and keep.exists()


@pytest.mark.parametrize("bad", [["-n", "0"], ["-n", "2", "--profile", "x"]])
def test_cli_bad_cluster_options_exit_2(tmp_path, bad):
    path = write_pipeline(tmp_path / "p", STREAM, inputs=1)
    proc = opf("run", str(path), *bad, cwd=tmp_path)
    assert proc.returncode == 2
    assert "opf: error:" in proc.stderr
    assert not (tmp_path / "p" / ".opf").exists()


# -- what the user sees ------------------------------------------------------------------------


def test_progress_lines_off_a_terminal(tmp_path):
    path = write_pipeline(tmp_path / "p", FAILING, inputs=3)
    out = io.StringIO()
    progress = Progress(stream=out, title="failing")
    summary = run_plan(compile_file(path), LocalExecutor([str(tmp_path / "m")]),
                       state_dir=tmp_path / "s", keep_going=True, listener=progress)
    text = out.getvalue()
    assert text.startswith("failing: 6 tasks on 1 engine (1 machine)\n")
    assert "done work/s1 on engine 0" in text and "done after/s3 on engine 0" in text
    assert "FAILED work/s2: step convert\n  step convert exited with status 3\n" in text
    assert "    | about to fail\n    | the input was unreadable\n" in text
    log = last_run(tmp_path / "s") / "logs" / "work" / "convert" / "s2.log"
    assert f"  full log: {log}\n" in text
    assert "  task folder kept: " in text
    assert ("kept the failed task's folder on its engine's scratch, with the inputs it staged, "
            "for a look: the task's next run replaces it; 'opf clean FILE --scratch-folder' "
            "removes it on this machine, with the pipeline's job folders there and the records "
            "of all but its last runs\n") in text
    assert "failing: 1 task failed\n" in text
    assert "  not run (upstream failed)  1\n" in text
    assert "\x1b[" not in text
    assert summary.exit_code == 1


def test_progress_many_tasks_rate_limited_and_quiet(tmp_path):
    text = """
    pipeline lots
    job noop for i in range(150) {
        output "results" flat
        step touch {
            run true
        }
    }
    """
    path = write_pipeline(tmp_path / "p", text, inputs=0)
    plan = compile_file(path)
    out = io.StringIO()
    run_plan(plan, LocalExecutor([str(tmp_path / "m")]), state_dir=tmp_path / "s",
             listener=Progress(stream=out, title="lots", interval=3600))
    lines = out.getvalue().splitlines()
    assert not any(line.startswith("done ") for line in lines)  # no line per task
    assert sum("finished," in line for line in lines) == 1  # one status line an interval
    assert "lots: all tasks done" in lines
    quiet = io.StringIO()
    run_plan(plan, LocalExecutor([str(tmp_path / "m")]), state_dir=tmp_path / "s",
             listener=Progress(stream=quiet, quiet=True))
    assert quiet.getvalue() == ""


def test_progress_on_a_terminal_draws_a_table(tmp_path):
    path = write_pipeline(tmp_path / "p", STREAM.replace("1.5", "0"), inputs=2)
    out = io.StringIO()
    run_plan(compile_file(path), LocalExecutor([str(tmp_path / "m")]),
             state_dir=tmp_path / "s", listener=Progress(stream=out, interactive=True))
    text = out.getvalue()
    assert "opf run: all tasks done" in text
    for label in ("tasks", "run", "skipped", "failed", "retried", "wall time", "staged",
                  "copied back"):
        assert f" {label} " in text


def test_formats():
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 * 1024**3) == "3.0 GiB"
    assert format_duration(1.234) == "1.23 s"
    assert format_duration(75.2) == "1 min 15 s"
    assert format_duration(7300) == "2 h 1 min"
