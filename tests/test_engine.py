"""Tests of opals_dsl.runtime.engine: staging, steps, copy-back and failures, with real files
and processes.

``run_tasks`` is called in this process and in separate Python processes (several of them racing
on one machine stage); steps are real programs (``python``, ``cp``, a shared shell script) and
real ``call`` functions written into a temporary pipeline folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import process_gone

from opals_dsl.plan import wire
from opals_dsl.runtime import engine, locks
from opals_dsl.runtime.engine import identify, run_tasks
from opals_dsl.runtime.fsatomic import atomic_copy, is_temp_name

REPO = Path(engine.__file__).resolve().parents[1]

TOOL = textwrap.dedent(
    """
    import sys
    mode, cfg, src, dst = sys.argv[1:5]
    cell = open(cfg).read().split("=")[1].strip()
    data = open(src).read()
    print("tool", mode, "cell", cell)
    with open(dst, "w") as f:
        f.write(f"{mode}:{cell}:{data}")
    """
)


# -- helpers -----------------------------------------------------------------------------------


def argv_step(job: str, task: str, step: str, argv: list[str], outputs: tuple[str, ...] = (),
              temp: tuple[str, ...] = ()) -> wire.Step:
    return wire.Step(f"exec:{job}/{task}/{step}", step, tuple(argv), outputs=tuple(outputs),
                     temp=tuple(temp))


def call_step(job: str, task: str, step: str, function: str, kwargs: dict[str, Any],
              outputs: tuple[str, ...] = ()) -> wire.Step:
    return wire.Step(f"exec:{job}/{task}/{step}", step, None, function, kwargs,
                     outputs=tuple(outputs))


class Project:
    """A pipeline folder, a scratch root and a state folder under one tmp_path."""

    def __init__(self, base: Path) -> None:
        self.root = base / "project"
        self.scratch = base / "scratch"
        self.state = base / "state"
        self.root.mkdir()
        (self.root / "cfg").mkdir()
        (self.root / "cfg" / "grid.cfg").write_text("cell = 0.5\n")
        (self.root / "tools").mkdir()
        (self.root / "tools" / "tool.py").write_text(TOOL)
        (self.root / "data").mkdir()
        for name in ("strip11", "strip12"):
            (self.root / "data" / f"{name}.xyz").write_text(f"points of {name}\n")

    def request(self, task: str = "strip11", *, job: str = "dem", pipeline: str = "strips",
                shared: list[list[str]] | None = None, inputs: list[list[str]] | None = None,
                execs: list[wire.Step] | None = None,
                copyback: list[list[str]] | None = None, scratch: Any = "default",
                attempt: int = 0, run_id: str | None = None) -> dict[str, Any]:
        """A task request as the driver sends it (plain data)."""
        return wire.TaskRequest(
            pipeline=pipeline, root=str(self.root), job=job, task=task,
            machine_stage=wire.Stage(f"stage:{job}", tuple(map(tuple, shared or ()))),
            task_stage=wire.Stage(f"stage:{job}/{task}", tuple(map(tuple, inputs or ()))),
            steps=tuple(execs or ()),
            copyback=wire.Stage(f"copyback:{job}/{task}", tuple(map(tuple, copyback or ()))),
            attempt=attempt, scratch=str(self.scratch) if scratch == "default" else scratch,
            logs=str(self.state / "logs" / job), run_id=run_id,
        ).to_wire()

    def job_dir(self, job: str = "dem", pipeline: str = "strips",
                shared: list[list[str]] | None = None) -> Path:
        """The job folder for these shared files as they are now (one per content)."""
        req = self.request(job=job, pipeline=pipeline, shared=shared)
        return Path(engine.job_folder(req))

    def task_dir(self, task: str = "strip11", job: str = "dem",
                 shared: list[list[str]] | None = None) -> Path:
        return self.job_dir(job, shared=shared) / task


@pytest.fixture
def project(tmp_path: Path) -> Project:
    return Project(tmp_path)


@pytest.fixture
def fresh_imports(monkeypatch: pytest.MonkeyPatch):
    """Keep sys.path and sys.modules as they were after a test that imports pipeline modules."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        del sys.modules[name]


def only(results: list[dict[str, Any]]) -> dict[str, Any]:
    assert len(results) == 1
    return results[0]


def statuses(result: dict[str, Any]) -> list[tuple[str, str]]:
    return [(row["node"], row["status"]) for row in result["trace"]]


def run_python(code: str, *args: str, env: dict[str, str] | None = None,
               timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter that imports opals_dsl from this repository."""
    full_env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, check=False)


GRID_SHARED = [["cfg/grid.cfg", "grid.cfg"], ["tools/tool.py", "tool.py"]]


def grid_request(project: Project, task: str = "strip11") -> dict[str, Any]:
    """The two-step task used by several tests: a python step and a cp step."""
    return project.request(
        task,
        shared=GRID_SHARED,
        inputs=[[f"data/{task}.xyz", f"{task}.xyz"]],
        execs=[
            argv_step("dem", task, "grid",
                      ["python", "../tool.py", "grid", "../grid.cfg", f"{task}.xyz",
                       f"{task}_dem.asc"], outputs=(f"{task}_dem.asc",)),
            argv_step("dem", task, "copy", ["cp", f"{task}_dem.asc", f"{task}_copy.asc"],
                      outputs=(f"{task}_copy.asc",)),
        ],
        copyback=[[f"{task}_dem.asc", f"results/grid/{task}_dem.asc"],
                  [f"{task}_copy.asc", f"results/copy/{task}_copy.asc"]],
    )


# -- identity and names ------------------------------------------------------------------------


def test_identify_resolves_scratch_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    monkeypatch.setenv("OPF_SCRATCH", str(link))
    ident = identify(None)
    assert ident["scratch"] == str(real)
    assert ident["machine"] == f"{ident['host']}:{real}"
    assert ident["pid"] == os.getpid()
    assert ident["python"] == sys.executable
    other = tmp_path / "explicit"
    assert identify(str(other))["scratch"] == str(other)  # the argument wins over the variable
    monkeypatch.delenv("OPF_SCRATCH")
    assert identify(None)["scratch"] == os.path.realpath(tempfile.gettempdir())
    monkeypatch.chdir(tmp_path)
    assert identify("rel")["scratch"] == str(real.parent / "rel")


def test_is_temp_name():
    assert is_temp_name(".dem.asc.opf-tmp-0123abcd")
    assert is_temp_name("/some/folder/.dem.asc.opf-tmp-ff")
    assert not is_temp_name("dem.asc")
    assert not is_temp_name(".dem.asc")
    assert not is_temp_name("dem.asc.opf-tmp-0123")  # not hidden
    assert not is_temp_name(".dem.asc.opf-tmp-")  # no random part
    assert not is_temp_name(".dem.asc.opf-tmp-xyz")


# -- the whole task ----------------------------------------------------------------------------


def test_stage_exec_copyback_end_to_end(project: Project):
    result = only(run_tasks([grid_request(project)]))
    assert result["ok"], result["failure"]
    assert result["failure"] is None
    assert (result["job"], result["task"], result["attempt"]) == ("dem", "strip11", 0)
    scratch = os.path.realpath(project.scratch)
    assert result["scratch"] == scratch
    assert result["machine"] == f"{result['host']}:{scratch}"
    assert result["pid"] == os.getpid()

    dem = project.root / "results" / "grid" / "strip11_dem.asc"
    copy = project.root / "results" / "copy" / "strip11_copy.asc"
    assert dem.read_text() == "grid:0.5:points of strip11\n"
    assert copy.read_text() == dem.read_text()
    assert result["bytes_copied"] == 2 * dem.stat().st_size
    shared_bytes = sum((project.root / p).stat().st_size for p in ("cfg/grid.cfg",
                                                                   "tools/tool.py"))
    input_bytes = (project.root / "data" / "strip11.xyz").stat().st_size
    assert result["bytes_staged"] == shared_bytes + input_bytes

    assert statuses(result) == [
        ("stage:dem", "done"), ("stage:dem/strip11", "done"), ("exec:dem/strip11/grid", "done"),
        ("exec:dem/strip11/copy", "done"), ("copyback:dem/strip11", "done"),
    ]
    kinds = [row["kind"] for row in result["trace"]]
    assert kinds == ["stage", "stage", "exec", "exec", "copyback"]
    bytes_of = {row["node"]: row["bytes"] for row in result["trace"]}
    assert bytes_of["stage:dem"] == shared_bytes
    assert bytes_of["stage:dem/strip11"] == input_bytes
    assert bytes_of["exec:dem/strip11/grid"] == dem.stat().st_size
    assert bytes_of["copyback:dem/strip11"] == result["bytes_copied"]
    for row in result["trace"]:
        assert row["start"] <= row["end"]
    starts = [row["start"] for row in result["trace"]]
    assert starts == sorted(starts)

    # the task folder is emptied; the job folder keeps the shared files for the next task
    job = project.job_dir(shared=GRID_SHARED)
    assert job.parent == Path(os.path.realpath(project.scratch)) / "opf" / "strips" / "dem"
    assert not (job / "strip11").exists()
    assert (job / "grid.cfg").read_text() == "cell = 0.5\n"
    assert (job / ".opf-staged").is_file()

    log = project.state / "logs" / "dem" / "grid" / "strip11.log"
    lines = log.read_text().splitlines()
    assert lines[0].startswith("$ ") and "../tool.py grid ../grid.cfg strip11.xyz" in lines[0]
    assert "tool grid cell 0.5" in lines
    assert (project.state / "logs" / "dem" / "copy" / "strip11.log").read_text().startswith("$ ")
    assert not [p for p in project.root.rglob("*") if is_temp_name(p.name)]


def test_batch_returns_one_result_per_request_in_order(project: Project):
    results = run_tasks([grid_request(project, "strip11"), grid_request(project, "strip12")])
    assert [r["task"] for r in results] == ["strip11", "strip12"]
    # one log folder per step, made by the first task; one file per task in it
    logs = project.state / "logs" / "dem"
    assert sorted(str(p.relative_to(logs)) for p in logs.rglob("*")) == [
        "copy", "copy/strip11.log", "copy/strip12.log",
        "grid", "grid/strip11.log", "grid/strip12.log"]
    assert all(r["ok"] for r in results)
    assert statuses(results[1])[0] == ("stage:dem", "cached")
    assert results[1]["bytes_staged"] == (project.root / "data/strip12.xyz").stat().st_size
    assert (project.root / "results/grid/strip12_dem.asc").read_text().endswith("strip12\n")


def test_subfolder_locals_are_created(project: Project):
    req = project.request(
        "mosaic",
        inputs=[["data/strip11.xyz", "dem/strip11/x.asc"],
                ["data/strip12.xyz", "dem/strip12/x.asc"]],
        execs=[argv_step("dem", "mosaic", "merge",
                         ["python", "-c",
                          "import sys; open('m.txt','w').write(open(sys.argv[1]).read()"
                          " + open(sys.argv[2]).read())",
                          "dem/strip11/x.asc", "dem/strip12/x.asc"], outputs=("m.txt",))],
        copyback=[["m.txt", "out/m.txt"]],
    )
    result = only(run_tasks([req]))
    assert result["ok"], result["failure"]
    assert (project.root / "out" / "m.txt").read_text() == (
        "points of strip11\npoints of strip12\n")


def test_argv_words_arrive_intact(project: Project):
    words = ["two words", "it's", '"quoted"', "a; touch INJECTED", f"$(touch {project.root}/SUB)",
             f"`touch {project.root}/TICK`", "*", "ünïcødé ✓", "", "back\\slash", "> redirect",
             "--flag=x y", "$HOME"]
    script = "import json, sys; json.dump(sys.argv[1:], open('argv.json', 'w'))"
    req = project.request(
        execs=[argv_step("dem", "strip11", "echo", ["python", "-c", script, *words],
                         outputs=("argv.json",))],
        copyback=[["argv.json", "argv.json"]],
    )
    result = only(run_tasks([req]))
    assert result["ok"], result["failure"]
    assert json.loads((project.root / "argv.json").read_text()) == words
    assert not (project.root / "SUB").exists()
    assert not (project.root / "TICK").exists()
    assert not list(project.root.glob("INJECTED"))


def test_step_environment_and_stdin(project: Project):
    script = ("import json, os, sys; json.dump([os.environ['OPF_TASK'], os.environ['OPF_JOB'],"
              " os.environ.get('KEEP_ME'), sys.stdin.read(), os.getcwd()], open('env.json','w'))")
    req = project.request(
        "t-7",
        execs=[argv_step("dem", "t-7", "env", ["python", "-c", script], outputs=("env.json",))],
        copyback=[["env.json", "env.json"]],
    )
    os.environ["KEEP_ME"] = "inherited"
    try:
        result = only(run_tasks([req]))
    finally:
        del os.environ["KEEP_ME"]
    assert result["ok"], result["failure"]
    task, job, keep, stdin, cwd = json.loads((project.root / "env.json").read_text())
    assert (task, job, keep, stdin) == ("t-7", "dem", "inherited", "")
    assert cwd == str(project.task_dir("t-7"))
    assert "OPF_TASK" not in os.environ


def test_program_given_as_path_relative_to_task_folder(project: Project):
    script = project.root / "tools" / "mark.sh"
    script.write_text('#!/bin/sh\necho "marked $1" > "$2"\n')
    script.chmod(0o755)
    req = project.request(
        shared=[["tools/mark.sh", "mark.sh"]],
        execs=[argv_step("dem", "strip11", "mark", ["../mark.sh", "a b", "m.txt"],
                         outputs=("m.txt",))],
        copyback=[["m.txt", "m.txt"]],
    )
    result = only(run_tasks([req]))
    assert result["ok"], result["failure"]
    assert (project.root / "m.txt").read_text() == "marked a b\n"
    assert os.access(project.job_dir(shared=[["tools/mark.sh", "mark.sh"]]) / "mark.sh",
                     os.X_OK)  # permission bits travel


def test_temp_outputs_feed_later_steps(project: Project):
    req = project.request(
        execs=[
            argv_step("dem", "strip11", "a", ["python", "-c", "open('t.tmp','w').write('x')"],
                      outputs=("t.tmp",), temp=("t.tmp",)),
            argv_step("dem", "strip11", "b", ["cp", "t.tmp", "final.txt"],
                      outputs=("final.txt",)),
        ],
        copyback=[["final.txt", "final.txt"]],
    )
    result = only(run_tasks([req]))
    assert result["ok"], result["failure"]
    assert (project.root / "final.txt").read_text() == "x"
    assert not (project.root / "t.tmp").exists()


def test_leftover_task_folder_is_replaced(project: Project):
    leftover = project.task_dir()
    (leftover / "sub").mkdir(parents=True)
    (leftover / "junk.txt").write_text("from an earlier attempt")
    (leftover / "sub" / "more").write_text("x")
    script = "import json, os; json.dump(sorted(os.listdir('.')), open('ls.json', 'w'))"
    req = project.request(
        inputs=[["data/strip11.xyz", "strip11.xyz"]],
        execs=[argv_step("dem", "strip11", "ls", ["python", "-c", script], outputs=("ls.json",))],
        copyback=[["ls.json", "ls.json"]], attempt=1,
    )
    result = only(run_tasks([req]))
    assert result["ok"], result["failure"]
    assert result["attempt"] == 1
    assert json.loads((project.root / "ls.json").read_text()) == ["strip11.xyz"]


def test_leftover_task_symlink_is_removed_not_followed(project: Project, tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    project.job_dir().mkdir(parents=True)
    project.task_dir().symlink_to(outside, target_is_directory=True)
    result = only(run_tasks([project.request(
        execs=[argv_step("dem", "strip11", "t", ["python", "-c", "open('x', 'w')"])])]))
    assert result["ok"], result["failure"]
    assert (outside / "precious.txt").read_text() == "keep me"
    assert not (outside / "x").exists()
    assert not project.task_dir().exists()


# -- machine stage -----------------------------------------------------------------------------


def test_machine_stage_cached_restaged_on_change_and_after_removal(project: Project):
    shared = [["cfg/grid.cfg", "grid.cfg"]]
    read_cfg = ["python", "-c", "open('c.txt','w').write(open('../grid.cfg').read())"]

    def once(task: str) -> dict[str, Any]:
        req = project.request(task, shared=shared,
                              execs=[argv_step("dem", task, "r", read_cfg, outputs=("c.txt",))],
                              copyback=[["c.txt", f"{task}.txt"]])
        return only(run_tasks([req]))

    first, second = once("a"), once("b")
    assert statuses(first)[0] == ("stage:dem", "done")
    assert statuses(second)[0] == ("stage:dem", "cached")
    assert second["trace"][0]["bytes"] == 0

    cfg = project.root / "cfg" / "grid.cfg"
    cfg.write_text("cell = 2.0\n")
    os.utime(cfg, ns=(time.time_ns(), time.time_ns() + 10_000_000))
    third = once("c")
    assert statuses(third)[0] == ("stage:dem", "done")
    assert (project.root / "c.txt").read_text() == "cell = 2.0\n"

    shutil.rmtree(project.job_dir(shared=shared))  # e.g. scratch cleaned between two runs
    fourth = once("d")
    assert statuses(fourth)[0] == ("stage:dem", "done")
    assert fourth["ok"], fourth["failure"]


def run_elsewhere(req: dict[str, Any]) -> dict[str, Any]:
    """Run one request in another process: another engine of the same machine."""
    code = (f"import json; from opals_dsl.runtime.engine import run_tasks; "
            f"print(json.dumps(run_tasks([json.loads({json.dumps(json.dumps(req))})])))")
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    return only(json.loads(proc.stdout))


def test_job_folder_per_content_removed_only_when_no_engine_holds_it(project: Project):
    """Each content of the shared files gets its own job folder; staging a new content removes
    the job's other folders, but only those no engine holds (an engine holds the folder of its
    last task of the job)."""
    shared = [["cfg/grid.cfg", "grid.cfg"]]
    cfg = project.root / "cfg" / "grid.cfg"
    read_cfg = ["python", "-c", "open('c.txt','w').write(open('../grid.cfg').read())"]

    def req(task: str) -> dict[str, Any]:
        return project.request(task, shared=shared,
                               execs=[argv_step("dem", task, "r", read_cfg, outputs=("c.txt",))],
                               copyback=[["c.txt", f"{task}.txt"]])

    def change(text: str, later: int) -> Path:
        cfg.write_text(text)
        os.utime(cfg, ns=(time.time_ns(), time.time_ns() + later * 10_000_000))
        return project.job_dir(shared=shared)

    one = project.job_dir(shared=shared)
    assert statuses(only(run_tasks([req("a")])))[0] == ("stage:dem", "done")  # held here
    two = change("cell = 2.0\n", 1)
    assert two != one and two.parent == one.parent
    assert run_elsewhere(req("b"))["ok"]
    assert (one / "grid.cfg").read_text() == "cell = 0.5\n"  # still held by this process
    assert (two / "grid.cfg").read_text() == "cell = 2.0\n"
    assert (project.root / "a.txt").read_text() == "cell = 0.5\n"
    assert (project.root / "b.txt").read_text() == "cell = 2.0\n"

    third = only(run_tasks([req("c")]))  # this process moves on to content two: one is free
    assert statuses(third)[0] == ("stage:dem", "cached")
    three = change("cell = 3.0\n", 2)
    assert run_elsewhere(req("d"))["ok"]
    assert not one.exists() and not (one.parent / f".{one.name}.lock").exists()
    assert (two / ".opf-staged").is_file()  # held by this process
    assert (three / "grid.cfg").read_text() == "cell = 3.0\n"
    assert (project.root / "d.txt").read_text() == "cell = 3.0\n"


def test_machine_stage_marker_is_seen_by_another_process(project: Project):
    req = grid_request(project)
    assert only(run_tasks([req]))["ok"]
    code = (f"import json; from opals_dsl.runtime.engine import run_tasks; "
            f"print(json.dumps(run_tasks([json.loads({json.dumps(json.dumps(req))})])))")
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    other = only(json.loads(proc.stdout))
    assert other["ok"], other["failure"]
    assert other["pid"] != os.getpid()
    assert statuses(other)[0] == ("stage:dem", "cached")


def test_interrupted_machine_stage_is_redone(project: Project):
    job = project.job_dir(shared=GRID_SHARED)
    job.mkdir(parents=True)
    (job / "grid.cfg").write_text("cell = half-writ")  # no marker: the stage never finished
    (job / ".grid.cfg.opf-tmp-0badc0de").write_text("cell")
    result = only(run_tasks([grid_request(project)]))
    assert result["ok"], result["failure"]
    assert statuses(result)[0] == ("stage:dem", "done")
    assert (job / "grid.cfg").read_text() == "cell = 0.5\n"
    assert not [p for p in job.iterdir() if is_temp_name(p.name)]


RACER = textwrap.dedent(
    """
    import json, os, sys, time
    from opals_dsl.runtime.engine import run_tasks
    request, go = json.loads(sys.argv[1]), sys.argv[2]
    while not os.path.exists(go):
        time.sleep(0.001)
    print(json.dumps(run_tasks([request])))
    """
)


def test_concurrent_engines_stage_a_machine_once(project: Project):
    big = project.root / "cfg" / "big.bin"
    big.write_bytes(os.urandom(1 << 20) * 24)  # slow enough that racers overlap
    size = big.stat().st_size
    check = f"import os; assert os.path.getsize('../big.bin') == {size}; open('ok','w').close()"
    go = project.root.parent / "go"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    racers = []
    for n in range(4):
        task = f"t{n}"
        req = project.request(task, shared=[["cfg/big.bin", "big.bin"],
                                            ["cfg/grid.cfg", "grid.cfg"]],
                              execs=[argv_step("dem", task, "check", ["python", "-c", check],
                                               outputs=("ok",))],
                              copyback=[["ok", f"ok/{task}"]])
        racers.append(subprocess.Popen(
            [sys.executable, "-c", RACER, json.dumps(req), str(go)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    time.sleep(0.3)  # let every racer start its interpreter and wait at the line
    go.touch()
    results = []
    for racer in racers:
        out, err = racer.communicate(timeout=120)
        assert racer.returncode == 0, err
        results.append(only(json.loads(out)))
    assert all(r["ok"] for r in results), [r["failure"] for r in results]
    stage_status = sorted(r["trace"][0]["status"] for r in results)
    assert stage_status == ["cached", "cached", "cached", "done"]
    assert sum(r["bytes_staged"] for r in results) == size + len("cell = 0.5\n")
    assert len({r["pid"] for r in results}) == 4
    assert sorted(p.name for p in (project.root / "ok").iterdir()) == ["t0", "t1", "t2", "t3"]
    job = project.job_dir(shared=[["cfg/big.bin", "big.bin"], ["cfg/grid.cfg", "grid.cfg"]])
    assert (job / "big.bin").read_bytes() == big.read_bytes()


def test_scratch_from_environment_in_an_engine_process(project: Project, tmp_path: Path):
    scratch = tmp_path / "env-scratch"
    req = project.request(scratch=None, inputs=[["data/strip11.xyz", "in.xyz"]],
                          execs=[argv_step("dem", "strip11", "c", ["cp", "in.xyz", "o.xyz"],
                                           outputs=("o.xyz",))],
                          copyback=[["o.xyz", "o.xyz"]])
    code = (f"import json; from opals_dsl.runtime.engine import run_tasks; "
            f"print(json.dumps(run_tasks([json.loads({json.dumps(json.dumps(req))})])))")
    proc = run_python(code, env={"OPF_SCRATCH": str(scratch)})
    assert proc.returncode == 0, proc.stderr
    result = only(json.loads(proc.stdout))
    assert result["ok"], result["failure"]
    assert result["scratch"] == str(scratch)
    assert len(list((scratch / "opf" / "strips" / "dem").glob("*/.opf-staged"))) == 1
    assert not project.scratch.exists()


# -- call steps --------------------------------------------------------------------------------


def write_module(project: Project, body: str) -> str:
    """A package with one module in the pipeline folder; returns the module's dotted name."""
    package = f"pkg_{uuid.uuid4().hex[:8]}"
    (project.root / package).mkdir()
    (project.root / package / "__init__.py").write_text("")
    (project.root / package / "steps.py").write_text(textwrap.dedent(body))
    return f"{package}.steps"


STEPS = """
    import os, subprocess, sys

    def grid(src, dst, cell, tags):
        print("python print", cell, tags)
        sys.stdout.flush()
        subprocess.run(["echo", "child process output"], check=True)
        with open(dst, "w") as f:
            f.write(f"{open(src).read().strip()}|{cell}|{','.join(tags)}|{os.getcwd()}"
                    f"|{os.environ['OPF_TASK']}")

    def bad(cell):
        raise ValueError(f"cell must be positive, got {cell}")

    def leave(code):
        sys.exit(code)

    def nothing():
        pass
"""


def test_call_step_runs_in_task_folder_and_logs(project: Project, fresh_imports,
                                                capfd: pytest.CaptureFixture[str]):
    module = write_module(project, STEPS)
    cwd, out, err = os.getcwd(), sys.stdout, sys.stderr
    req = project.request(
        inputs=[["data/strip11.xyz", "dem/in.xyz"]],
        execs=[call_step("dem", "strip11", "grid", f"{module}:grid",
                         {"src": "dem/in.xyz", "dst": "out.txt", "cell": 0.5,
                          "tags": ["a", "b"]}, outputs=("out.txt",))],
        copyback=[["out.txt", "out.txt"]],
    )
    result = only(run_tasks([req]))
    assert result["ok"], result["failure"]
    assert (os.getcwd(), sys.stdout, sys.stderr) == (cwd, out, err)
    assert "OPF_TASK" not in os.environ
    assert (project.root / "out.txt").read_text() == (
        f"points of strip11|0.5|a,b|{project.task_dir()}|strip11")
    log = (project.state / "logs" / "dem" / "grid" / "strip11.log").read_text().splitlines()
    assert log[0].startswith(f"$ call {module}:grid(")
    assert "python print 0.5 ['a', 'b']" in log
    assert "child process output" in log
    captured = capfd.readouterr()
    assert "child process output" not in captured.out
    assert "python print" not in captured.out


def test_call_root_added_to_sys_path_once(project: Project, fresh_imports):
    module = write_module(project, STEPS)
    for task in ("a", "b", "c"):
        req = project.request(task, execs=[call_step("dem", task, "n", f"{module}:nothing", {})])
        assert only(run_tasks([req]))["ok"]
    assert sys.path.count(str(project.root)) == 1


def test_call_that_raises(project: Project, fresh_imports):
    module = write_module(project, STEPS)
    cwd, out, err = os.getcwd(), sys.stdout, sys.stderr
    req = project.request(
        execs=[call_step("dem", "strip11", "check", f"{module}:bad", {"cell": -1}),
               call_step("dem", "strip11", "after", f"{module}:nothing", {})],
    )
    result = only(run_tasks([req]))
    assert (os.getcwd(), sys.stdout, sys.stderr) == (cwd, out, err)
    assert not result["ok"]
    failure = result["failure"]
    assert failure["kind"] == "exception"
    assert failure["node"] == "exec:dem/strip11/check"
    assert failure["step"] == "check"
    assert failure["returncode"] is None
    assert "ValueError" in failure["message"] and "got -1" in failure["message"]
    log = Path(failure["log"])
    assert log == project.state / "logs" / "dem" / "check" / "strip11.log"
    text = log.read_text()
    assert "Traceback" in text and 'raise ValueError(f"cell must be positive' in text
    assert failure["tail"][-1] == "ValueError: cell must be positive, got -1"
    assert statuses(result)[-1] == ("exec:dem/strip11/check", "failed")
    assert "exec:dem/strip11/after" not in dict(statuses(result))
    assert Path(failure["task_dir"]) == project.task_dir()
    assert project.task_dir().is_dir()


def test_call_sys_exit_and_unknown_function(project: Project, fresh_imports):
    module = write_module(project, STEPS)
    exits = only(run_tasks([project.request(
        "x", execs=[call_step("dem", "x", "leave", f"{module}:leave", {"code": 4})])]))
    assert exits["failure"]["kind"] == "exit"
    assert exits["failure"]["returncode"] == 4
    zero = only(run_tasks([project.request(
        "z", execs=[call_step("dem", "z", "leave", f"{module}:leave", {"code": 0})])]))
    assert zero["ok"], zero["failure"]
    for function in (f"{module}:missing", "no_such_package_zz.mod:fn", "no colon"):
        result = only(run_tasks([project.request(
            "u", execs=[call_step("dem", "u", "s", function, {})])]))
        assert result["failure"]["kind"] == "exception", function
        assert function in result["failure"]["message"]
        assert result["failure"]["tail"]


# -- failing steps -----------------------------------------------------------------------------


def test_exit_nonzero_reports_tail_keeps_folder_copies_nothing(project: Project):
    failing = ("import sys\nfor i in range(30): print('line', i)\n"
               "sys.stdout.flush(); sys.stderr.write('grid: bad cell\\n'); sys.exit(3)")
    req = project.request(
        inputs=[["data/strip11.xyz", "strip11.xyz"]],
        execs=[argv_step("dem", "strip11", "first", ["cp", "strip11.xyz", "first.txt"],
                         outputs=("first.txt",)),
               argv_step("dem", "strip11", "grid", ["python", "-c", failing],
                         outputs=("dem.asc",)),
               argv_step("dem", "strip11", "never", ["cp", "first.txt", "never.txt"])],
        copyback=[["first.txt", "results/first.txt"], ["dem.asc", "results/dem.asc"]],
    )
    result = only(run_tasks([req]))
    assert not result["ok"]
    failure = result["failure"]
    assert failure["kind"] == "exit"
    assert failure["returncode"] == 3
    assert failure["node"] == "exec:dem/strip11/grid" and failure["step"] == "grid"
    assert "3" in failure["message"]
    assert len(failure["tail"]) == 20
    assert failure["tail"][-1] == "grid: bad cell"
    assert failure["tail"][0] == "line 11"
    assert failure["log"] == str(project.state / "logs" / "dem" / "grid" / "strip11.log")
    assert failure["task_dir"] == str(project.task_dir())
    assert (project.task_dir() / "first.txt").is_file()  # kept for inspection
    assert not (project.root / "results").exists()
    assert statuses(result) == [
        ("stage:dem", "done"), ("stage:dem/strip11", "done"), ("exec:dem/strip11/first", "done"),
        ("exec:dem/strip11/grid", "failed"),
    ]
    assert result["bytes_copied"] == 0


def test_killed_step_names_the_signal(project: Project):
    req = project.request(execs=[argv_step("dem", "strip11", "die", [
        "python", "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])])
    failure = only(run_tasks([req]))["failure"]
    assert failure["kind"] == "exit"
    assert failure["returncode"] == -9
    assert "SIGKILL" in failure["message"]


def test_log_tail_replaces_undecodable_bytes(project: Project):
    code = "import sys; sys.stdout.buffer.write(b'bad \\xff\\xfe bytes\\n'); sys.exit(1)"
    failure = only(run_tasks([project.request(
        execs=[argv_step("dem", "strip11", "b", ["python", "-c", code])])]))["failure"]
    assert failure["tail"][-1] == "bad \ufffd\ufffd bytes"


def test_log_tail_reads_back_past_a_very_long_last_line_and_shortens_it(project: Project):
    """The last lines of a log whose last line is longer than what is first read of its end
    (64 KiB) are still there, the long one shortened to its start."""
    code = ("import sys; print('line one'); print('error: real cause here'); "
            "sys.stdout.write('y' * 70000); sys.exit(4)")
    failure = only(run_tasks([project.request(
        execs=[argv_step("dem", "strip11", "b", ["python", "-c", code])])]))["failure"]
    assert failure["tail"][-3:] == ["line one", "error: real cause here",
                                    "y" * 500 + " … (69,500 more characters)"]


def test_missing_output(project: Project):
    req = project.request(
        execs=[argv_step("dem", "strip11", "grid",
                         ["python", "-c", "open('one.asc', 'w').close()"],
                         outputs=("one.asc", "two.asc", "sub/three.asc"))],
        copyback=[["one.asc", "one.asc"]],
    )
    result = only(run_tasks([req]))
    failure = result["failure"]
    assert failure["kind"] == "missing-output"
    assert failure["returncode"] == 0
    assert "two.asc" in failure["message"] and "sub/three.asc" in failure["message"]
    assert "one.asc," not in failure["message"]
    assert not (project.root / "one.asc").exists()
    assert (project.task_dir() / "one.asc").is_file()


def test_output_that_is_a_folder_is_missing(project: Project):
    req = project.request(execs=[argv_step("dem", "strip11", "d", ["mkdir", "out.asc"],
                                           outputs=("out.asc",))])
    assert only(run_tasks([req]))["failure"]["kind"] == "missing-output"


def test_program_not_found(project: Project):
    req = project.request(execs=[argv_step("dem", "strip11", "grid",
                                           ["opf-no-such-program-q7", "x"])])
    result = only(run_tasks([req]))
    failure = result["failure"]
    assert failure["kind"] == "not-found"
    assert "opf-no-such-program-q7" in failure["message"]
    assert os.environ["PATH"] in failure["message"]
    assert failure["returncode"] is None
    assert any("opf-no-such-program-q7" in line for line in failure["tail"])
    assert project.task_dir().is_dir()
    relative = only(run_tasks([project.request(
        "r", execs=[argv_step("dem", "r", "s", ["./nothing-here.sh"])])]))
    assert relative["failure"]["kind"] == "not-found"


def test_missing_input_is_a_stage_failure(project: Project):
    result = only(run_tasks([project.request(inputs=[["data/absent.xyz", "absent.xyz"]])]))
    failure = result["failure"]
    assert failure["kind"] == "stage"
    assert failure["node"] == "stage:dem/strip11"
    assert "data/absent.xyz" in failure["message"]
    shared = only(run_tasks([project.request("s", shared=[["cfg/absent.cfg", "a.cfg"]])]))
    assert shared["failure"]["kind"] == "stage"
    assert shared["failure"]["node"] == "stage:dem"
    assert statuses(shared) == [("stage:dem", "failed")]


# -- the path guard ----------------------------------------------------------------------------


@pytest.mark.parametrize("change", [
    {"inputs": [["data/strip11.xyz", "../escape.xyz"]]},
    {"inputs": [["data/strip11.xyz", "a/../../escape.xyz"]]},
    {"inputs": [["data/strip11.xyz", "/tmp/opf-escape.xyz"]]},
    {"inputs": [["data/strip11.xyz", "."]]},
    {"outputs": ["../out.asc"]},
    {"copyback": [["../../../cfg/grid.cfg", "stolen.cfg"]]},
    {"task": ".."},
    {"task": "a/b"},
    {"task": ""},
    {"task": "grid.cfg"},
    {"task": ".opf-staged"},
    {"shared": [["cfg/grid.cfg", "../../grid.cfg"]]},
    {"shared": [["cfg/grid.cfg", "./.opf-staged"]]},
    {"job": "../dem"},
])
def test_path_guard_refuses_paths_outside_their_folder(project: Project, change: dict[str, Any]):
    task = change.get("task", "strip11")
    job = change.get("job", "dem")
    marker = project.root / "ran"
    req = project.request(
        task, job=job,
        shared=change.get("shared", [["cfg/grid.cfg", "grid.cfg"]]),
        inputs=change.get("inputs", []),
        execs=[argv_step(job, task, "s", ["python", "-c", f"open({str(marker)!r}, 'w')"],
                         outputs=tuple(change.get("outputs", ())))],
        copyback=change.get("copyback", []),
    )
    result = only(run_tasks([req]))
    assert not result["ok"]
    assert result["failure"]["kind"] == "stage"
    assert not marker.exists()
    assert not (project.root / "stolen.cfg").exists()
    assert not list(Path(os.path.realpath(project.scratch)).rglob("*escape*"))
    assert not Path("/tmp/opf-escape.xyz").exists()


# -- cleanup -----------------------------------------------------------------------------------


def test_cleanup_removes_read_only_folders_left_by_a_step(project: Project):
    code = "import os; os.makedirs('ro/inner'); open('ro/inner/f','w'); os.chmod('ro', 0o500)"
    req = project.request(execs=[argv_step("dem", "strip11", "ro", ["python", "-c", code])])
    result = only(run_tasks([req]))
    assert result["ok"], result["failure"]
    assert not project.task_dir().exists()


# -- atomic copies -----------------------------------------------------------------------------


def test_atomic_copy_creates_folders_and_replaces(tmp_path: Path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"new content" * 1000)
    dst = tmp_path / "a" / "b" / "dst.bin"
    assert atomic_copy(str(src), str(dst)) == 11_000
    assert dst.read_bytes() == src.read_bytes()
    src.write_bytes(b"second")
    assert atomic_copy(str(src), str(dst)) == 6
    assert dst.read_bytes() == b"second"
    assert [p.name for p in dst.parent.iterdir()] == ["dst.bin"]


def test_atomic_copy_into_a_file_parent_fails_cleanly(tmp_path: Path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 100)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    with pytest.raises(OSError):
        atomic_copy(str(src), str(blocker / "dst.bin"))
    assert blocker.read_text() == "a file, not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "src.bin"]
    with pytest.raises(IsADirectoryError):
        atomic_copy(str(tmp_path), str(tmp_path / "copy"))
    assert not (tmp_path / "copy").exists()
    assert not [p for p in tmp_path.iterdir() if is_temp_name(p.name)]


@pytest.mark.parametrize("path", ["kernel", "user space"])
def test_a_large_copy_is_handed_to_the_disk_chunk_by_chunk_while_it_is_copied(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str):
    """Invariant: a copy is asked to be written to disk one chunk at a time, each chunk right
    after it is copied and before the next one is (its flush before the rename then finds
    little left to write); every byte but a last part chunk is asked for once, in order, and
    the copy is whole. The advice runs for real; the seam only records what was in the file
    when it was given. Both ways of copying: in the kernel, and in user space where the kernel
    cannot copy between the two files."""
    from opals_dsl.runtime import fsatomic
    chunk = 1 << 20
    monkeypatch.setattr(fsatomic, "WRITEBACK_CHUNK", chunk)
    if path == "user space":
        def no_kernel_copy(infd: int, outfd: int) -> int:
            raise fsatomic._NoFastCopy()
        monkeypatch.setattr(fsatomic, "_kernel_copy", no_kernel_copy)
    advised: list[tuple[int, int, int]] = []
    real_advise = fsatomic._advise

    def advise(fd: int, offset: int, length: int, advice: int) -> None:
        advised.append((offset, length, os.fstat(fd).st_size))
        real_advise(fd, offset, length, advice)

    monkeypatch.setattr(fsatomic, "_advise", advise)
    src = tmp_path / "strip.las"
    src.write_bytes(os.urandom(3 * chunk + chunk // 2))
    dst = tmp_path / "results" / "strip.las"
    assert atomic_copy(str(src), str(dst)) == src.stat().st_size
    assert dst.read_bytes() == src.read_bytes()
    assert advised == [(0, chunk, chunk), (chunk, chunk, 2 * chunk),
                       (2 * chunk, chunk, 3 * chunk)]


# A file-size limit makes the write fail halfway (EFBIG), also for root, without any mount.
LIMITED = textwrap.dedent(
    """
    import json, os, resource, signal, sys
    from opals_dsl.runtime.engine import run_tasks
    from opals_dsl.runtime.fsatomic import atomic_copy
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
    what, arg = sys.argv[1], sys.argv[2]
    if what == "copy":
        src, dst = json.loads(arg)
        try:
            atomic_copy(src, dst)
        except OSError as exc:
            print(json.dumps({"errno": exc.errno}))
        else:
            print(json.dumps({"errno": None}))
    else:
        print(json.dumps(run_tasks([json.loads(arg)])))
    """
)


def test_atomic_copy_failing_midway_leaves_destination_as_before(tmp_path: Path):
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 << 20))
    folder = tmp_path / "out"
    folder.mkdir()
    dst = folder / "dst.bin"
    dst.write_bytes(b"the previous complete file")
    proc = run_python(LIMITED, "copy", json.dumps([str(big), str(dst)]))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["errno"] is not None
    assert [p.name for p in folder.iterdir()] == ["dst.bin"]
    assert dst.read_bytes() == b"the previous complete file"


def test_copyback_failure_is_reported_and_leaves_no_partial_file(project: Project):
    big = project.root / "big.bin"
    big.write_bytes(os.urandom(3 << 20))
    dest = project.root / "results" / "big.bin"
    dest.parent.mkdir()
    dest.write_bytes(b"from the last run")
    link = f"import os; os.symlink({str(big)!r}, 'big.out')"
    req = project.request(
        execs=[argv_step("dem", "strip11", "make", ["python", "-c", link],
                         outputs=("big.out",))],
        copyback=[["big.out", "results/big.bin"]],
    )
    proc = run_python(LIMITED, "task", json.dumps(req))
    assert proc.returncode == 0, proc.stderr
    result = only(json.loads(proc.stdout))
    failure = result["failure"]
    assert failure["kind"] == "copyback"
    assert failure["node"] == "copyback:dem/strip11"
    assert str(dest) in failure["message"]
    assert os.strerror(27) in failure["message"]  # EFBIG, "File too large"
    assert dest.read_bytes() == b"from the last run"
    assert [p.name for p in dest.parent.iterdir()] == ["big.bin"]
    assert project.task_dir().is_dir()
    assert statuses(result)[-1] == ("copyback:dem/strip11", "failed")


def test_copyback_into_a_file_parent_in_process(project: Project):
    (project.root / "results").write_text("a file where a folder should be")
    req = project.request(
        execs=[argv_step("dem", "strip11", "w", ["python", "-c", "open('o.txt','w')"],
                         outputs=("o.txt",))],
        copyback=[["o.txt", "results/o.txt"]],
    )
    failure = only(run_tasks([req]))["failure"]
    assert failure["kind"] == "copyback"
    assert str(project.root / "results" / "o.txt") in failure["message"]
    assert "Not a directory" in failure["message"] or "File exists" in failure["message"]
    assert (project.task_dir() / "o.txt").is_file()


def test_malformed_request_gets_a_result():
    result = only(run_tasks([{"task": "x"}]))
    assert not result["ok"]
    assert result["failure"]["kind"] == "stage"
    assert result["task"] == "x"


# -- processes, locks and the state folder -------------------------------------------------------


def _kill(pid: int) -> None:
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)


def test_a_step_runs_in_a_process_group_of_its_own_that_ends_with_it(project: Project):
    """What a step leaves running in its group (a background job) ends with the step; the
    step's processes carry the run's id."""
    script = ("sleep 1001 & echo $! > sleep.pid; echo $OPF_RUN_ID > run.txt; "
              "ps -o pgid= -p $$ > pgid.txt; ps -o sid= -p $$ > sid.txt")
    req = project.request(execs=[argv_step("dem", "strip11", "bg", ["sh", "-c", script],
                                           outputs=("sleep.pid", "run.txt"))],
                          copyback=[["sleep.pid", "sleep.pid"], ["run.txt", "run.txt"],
                                    ["pgid.txt", "pgid.txt"], ["sid.txt", "sid.txt"]],
                          run_id="run-42")
    result = only(run_tasks([req]))
    sleeper = int((project.root / "sleep.pid").read_text())
    try:
        assert result["ok"], result["failure"]
        assert (project.root / "run.txt").read_text() == "run-42\n"
        pgid = int((project.root / "pgid.txt").read_text())
        assert pgid != os.getpgrp()
        assert int((project.root / "sid.txt").read_text()) == pgid  # a session of its own
        assert process_gone(sleeper), "the step's background sleep outlived the step"
    finally:
        _kill(sleeper)


def test_an_interrupted_step_ends_with_its_whole_group(project: Project, tmp_path: Path):
    """Ctrl-C reaching an engine (SIGINT) ends the step and everything it started."""
    marks = tmp_path / "marks"
    marks.mkdir()
    req = project.request(execs=[argv_step("dem", "strip11", "wait", [
        "sh", "-c", f"sleep 1001 & echo $! > {marks}/sleep; wait"])])
    code = ("import json, sys; from opals_dsl.runtime.engine import run_tasks\n"
            "try:\n    run_tasks([json.loads(sys.argv[1])])\n"
            "except KeyboardInterrupt:\n    sys.exit(42)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(req)],
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    sleeper = None
    try:
        deadline = time.monotonic() + 60
        while not (marks / "sleep").is_file() or not (marks / "sleep").read_text().strip():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        sleeper = int((marks / "sleep").read_text())
        assert project.task_dir().is_dir()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 42
        assert process_gone(sleeper), "the step's sleep outlived the interrupted step"
        # nothing of an interrupted task is kept: its folder holds no failure to look at
        assert not project.task_dir().exists(), "the interrupted task's folder was left"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if sleeper is not None:
            _kill(sleeper)


def test_the_task_folder_of_a_killed_engine_is_removed_by_the_next_engine_there(
        project: Project, tmp_path: Path):
    """A task folder whose lock file outlived its engine (kill -9) is removed by the next engine
    that uses the job folder; a folder kept after a failure, and a running task's, stay."""
    marks = tmp_path / "marks"
    marks.mkdir()
    kept = only(run_tasks([project.request("strip12", execs=[
        argv_step("dem", "strip12", "fail", ["sh", "-c", "echo partial > p.txt; exit 3"])])]))
    assert not kept["ok"] and kept["failure"]["task_dir"] == str(project.task_dir("strip12"))
    script = "echo partial > p.txt; sleep 1001 & echo $! > {marks}/{task}; wait"
    code = ("import json, sys; from opals_dsl.runtime.engine import run_tasks; "
            "run_tasks([json.loads(sys.argv[1])])")
    procs: dict[str, subprocess.Popen] = {}
    sleepers: list[int] = []
    try:
        for task in ("strip11", "strip13"):  # strip11's engine is killed, strip13's runs on
            req = project.request(task, execs=[argv_step(
                "dem", task, "wait", ["sh", "-c", script.format(marks=marks, task=task)])])
            procs[task] = subprocess.Popen([sys.executable, "-c", code, json.dumps(req)],
                                           env=dict(os.environ, PYTHONPATH=str(REPO)))
            deadline = time.monotonic() + 60
            while not (marks / task).is_file() or not (marks / task).read_text().strip():
                assert time.monotonic() < deadline and procs[task].poll() is None
                time.sleep(0.05)
            sleepers.append(int((marks / task).read_text()))
        procs["strip11"].kill()
        procs["strip11"].wait()
        locks = project.job_dir().parent / f".{project.job_dir().name}.tasks"
        assert (project.task_dir() / "p.txt").is_file() and (locks / "strip11").is_file()

        # the next engine process to use the job folder (a task of its own) clears what is left
        after = run_python(code, json.dumps(project.request("strip14")))
        assert after.returncode == 0, after.stderr
        assert not project.task_dir().exists(), "the killed engine's task folder was left"
        assert not (locks / "strip11").exists()
        assert (project.task_dir("strip12") / "p.txt").is_file(), "a failed task's folder went"
        assert (project.task_dir("strip13") / "p.txt").is_file(), "a running task's folder went"
        assert procs["strip13"].poll() is None
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for pid in sleepers:
            _kill(pid)


def test_the_steps_of_a_killed_engine_end_with_it(project: Project, tmp_path: Path):
    """kill -9 of the process that runs steps: its lifeline ends their process groups."""
    marks = tmp_path / "marks"
    marks.mkdir()
    req = project.request(execs=[argv_step("dem", "strip11", "wait", [
        "sh", "-c", f"sleep 1001 & echo $! > {marks}/sleep; wait; echo late > {marks}/late"])])
    code = ("import json, sys; from opals_dsl.runtime.engine import run_tasks; "
            "run_tasks([json.loads(sys.argv[1])])")
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(req)],
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    sleeper = None
    try:
        deadline = time.monotonic() + 60
        while not (marks / "sleep").is_file() or not (marks / "sleep").read_text().strip():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        sleeper = int((marks / "sleep").read_text())
        proc.kill()
        proc.wait()
        assert process_gone(sleeper), "the killed engine's step went on"
        time.sleep(0.3)
        assert not (marks / "late").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if sleeper is not None:
            _kill(sleeper)


def test_a_task_folder_held_by_a_stopped_process_fails_in_bounded_time(
        project: Project, monkeypatch: pytest.MonkeyPatch):
    """An engine frozen with its task's lock (kill -STOP) is not waited for for ever."""
    monkeypatch.setattr(locks, "STOPPED_HOLDER_WAIT", 1.0)
    job_dir = project.job_dir()  # its tasks' locks are beside it, in .<its name>.tasks
    folder = job_dir.parent / f".{job_dir.name}.tasks"
    folder.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from opals_dsl.runtime.locks import lock; "
         "lock(sys.argv[1]); print('held', flush=True); time.sleep(600)",
         str(folder / "strip11")],
        env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE, text=True)
    results: list[Any] = []
    worker = None
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        os.kill(holder.pid, signal.SIGSTOP)
        req = project.request(execs=[argv_step("dem", "strip11", "s", ["true"])])
        worker = threading.Thread(target=lambda: results.extend(run_tasks([req])), daemon=True)
        worker.start()
        worker.join(timeout=30)
        assert not worker.is_alive(), "the task waited for the stopped holder for ever"
        failure = results[0]["failure"]
        assert failure["kind"] == "stage" and failure["node"] == "stage:dem/strip11"
        assert f"is held by process {holder.pid} on this machine" in failure["message"]
        assert "stopped" in failure["message"] and f"kill -CONT {holder.pid}" in failure["message"]
    finally:
        holder.kill()
        holder.wait()
        if worker is not None:
            worker.join(timeout=30)


def test_a_failure_before_the_task_folder_exists_names_no_kept_folder(project: Project):
    result = only(run_tasks([project.request(shared=[["cfg/absent.cfg", "a.cfg"]])]))
    assert result["failure"]["node"] == "stage:dem"
    assert result["failure"]["task_dir"] is None
    assert not project.task_dir().exists()


@pytest.mark.parametrize("kind", ["argv", "call"])
def test_a_log_that_cannot_be_written_names_the_state_folder_s_disk(project: Project, kind,
                                                                    fresh_imports):
    """A full disk under the run's state folder is not the step's fault, and says so."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    logs = project.state / "logs" / "dem" / "s"
    logs.mkdir(parents=True)
    (logs / "strip11.log").symlink_to("/dev/full")  # every write there: No space left on device
    if kind == "argv":
        step = argv_step("dem", "strip11", "s", ["true"])
    else:
        (project.root / "noop.py").write_text("def run():\n    pass\n")
        step = call_step("dem", "strip11", "s", "noop:run", {})
    failure = only(run_tasks([project.request(execs=[step])]))["failure"]
    assert failure["kind"] == "log" and failure["step"] == "s"
    assert failure["message"] == (
        f"cannot write the log of step s ({logs / 'strip11.log'}): No space left on device (the "
        f"disk of the run's state folder is full, or a quota or file size limit was reached)")


def test_a_log_folder_that_cannot_be_made_fails_the_step_naming_it(project: Project):
    """The job's log folder is a file: the step fails as a problem of the state folder."""
    (project.state / "logs").mkdir(parents=True)
    (project.state / "logs" / "dem").write_text("in the way\n")
    step = argv_step("dem", "strip11", "s", ["true"])
    failure = only(run_tasks([project.request(execs=[step])]))["failure"]
    assert failure["kind"] == "log" and failure["step"] == "s"
    assert failure["message"].startswith(
        f"cannot create the log folder {project.state / 'logs' / 'dem' / 's'} for step s: ")


WRITE_THREE = ("import os\n"
               "for name, size in (('a.bin', 70_000), ('b.bin', 5), ('c.bin', 300_000)):\n"
               "    open(name, 'wb').write(os.urandom(size))\n")


def test_copyback_renames_no_destination_before_every_temporary_is_flushed(
        project: Project, monkeypatch: pytest.MonkeyPatch):
    """Invariant: a copy-back renames a temporary into place only after its data was flushed to
    disk, and no destination appears before the flush phase of its task is over. The flushes and
    renames run for real on real files; the seam only records them, with the file each one
    touches (device and inode) and which destinations exist at that moment."""
    from opals_dsl.runtime import fsatomic
    dests = [project.root / "results" / "a.bin", project.root / "results" / "b.bin",
             project.root / "other" / "c.bin"]
    events: list[tuple[str, tuple[int, int], list[bool]]] = []
    lock = threading.Lock()
    real_flush, real_rename = fsatomic._flush, fsatomic._rename

    def flush(fd: int) -> None:
        st = os.fstat(fd)
        real_flush(fd)
        with lock:
            events.append(("flushed", (st.st_dev, st.st_ino), [d.exists() for d in dests]))

    def rename(src: str, dst: str) -> None:
        st = os.stat(src)
        with lock:
            events.append(("rename", (st.st_dev, st.st_ino), [d.exists() for d in dests]))
        real_rename(src, dst)

    monkeypatch.setattr(fsatomic, "_flush", flush)
    monkeypatch.setattr(fsatomic, "_rename", rename)
    req = project.request(
        execs=[argv_step("dem", "strip11", "w", ["python", "-c", WRITE_THREE],
                         outputs=("a.bin", "b.bin", "c.bin"))],
        copyback=[["a.bin", "results/a.bin"], ["b.bin", "results/b.bin"],
                  ["c.bin", "other/c.bin"]])
    task = project.task_dir()
    result = only(run_tasks([req]))
    assert result["ok"], result["failure"]
    kinds = [kind for kind, _, _ in events]
    assert kinds == ["flushed"] * 3 + ["rename"] * 3, events
    flushed = {inode for kind, inode, _ in events if kind == "flushed"}
    assert {inode for kind, inode, _ in events if kind == "rename"} == flushed
    assert all(not any(seen) for kind, _, seen in events if kind == "flushed")
    assert not task.exists()
    assert [d.stat().st_size for d in dests] == [70_000, 5, 300_000]
    assert not [p for d in dests for p in d.parent.iterdir() if is_temp_name(p.name)]


def test_a_batch_flushes_each_destination_folder_once_after_its_renames(
        project: Project, monkeypatch: pytest.MonkeyPatch):
    """Invariant: the folders a batch's copy-backs renamed into are each flushed to disk once,
    after every rename into them and before the batch answers; a folder that cannot be
    flushed fails exactly the tasks that copied into it (their copy-back rows too), and only
    the tasks whose results are on disk get a receipt."""
    from opals_dsl.runtime import fsatomic, landing
    events: list[tuple[str, str]] = []
    real_rename, real_folder = fsatomic._rename, landing.fsync_folder

    def rename(src: str, dst: str) -> None:
        events.append(("rename", os.path.dirname(dst)))
        real_rename(src, dst)

    def flush_folder(folder: str) -> None:
        events.append(("folder", folder))
        real_folder(folder)

    monkeypatch.setattr(fsatomic, "_rename", rename)
    monkeypatch.setattr(landing, "fsync_folder", flush_folder)
    receipts = project.root / "receipts"

    def req(task: str, folder: str, run: str) -> dict[str, Any]:
        data = project.request(task, execs=[argv_step(
            "dem", task, "w", ["python", "-c", "open('o.txt', 'w').write('x')"],
            outputs=("o.txt",))], copyback=[["o.txt", f"{folder}/{task}.txt"]])
        data["receipt"] = {"folder": str(receipts), "run": run, "record": {"task": task}}
        return data

    def receipted(run: str) -> list[str]:
        return [json.loads(line)["task"] for path in sorted(receipts.glob(f"{run}-*"))
                for line in path.read_text().splitlines()]

    batch = [req("strip11", "a", "one"), req("strip12", "a", "one"), req("strip13", "b", "one")]
    results = run_tasks(batch)
    assert [r["ok"] for r in results] == [True] * 3, results
    a, b = str(project.root / "a"), str(project.root / "b")
    assert events == [("rename", a), ("rename", a), ("rename", b), ("folder", a), ("folder", b)]
    assert receipted("one") == ["strip11", "strip12", "strip13"]

    def failing(folder: str) -> None:
        if folder == a:
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(landing, "fsync_folder", failing)
    batch = [req("strip11", "a", "two"), req("strip12", "a", "two"), req("strip13", "b", "two")]
    results = run_tasks(batch)
    assert [r["ok"] for r in results] == [False, False, True]
    message = f"cannot flush the folder {a} to disk: Input/output error"
    for r in results[:2]:
        assert r["failure"]["kind"] == "copyback"
        assert r["failure"]["message"] == message
        assert r["failure"]["node"] == f"copyback:dem/{r['task']}"
        row = next(row for row in r["trace"] if row["kind"] == "copyback")
        assert (row["status"], row["message"]) == ("failed", message)
    assert receipted("two") == ["strip13"]


def test_a_task_s_copies_are_flushed_while_the_next_task_of_the_batch_runs(
        project: Project, monkeypatch: pytest.MonkeyPatch):
    """Invariant: a task's copies start going to disk as soon as the task has ended, not when
    the batch is over; still none is renamed into place before the batch's flushes are all
    done. The second task's step waits (up to 10 s) for the first task's copy to be flushed
    and writes what it saw; each flush leaves a mark file behind for it."""
    from opals_dsl.runtime import fsatomic
    marks = project.root / "flushed"
    marks.mkdir()
    real_flush = fsatomic._flush

    def flush(fd: int) -> None:
        real_flush(fd)
        dest = os.readlink(f"/proc/self/fd/{fd}")
        (marks / os.path.basename(os.path.dirname(dest))).touch()

    monkeypatch.setattr(fsatomic, "_flush", flush)
    first_mark, first_dest = str(marks / "a"), str(project.root / "a" / "strip11.txt")
    wait_for_first = textwrap.dedent(f"""
        import os, time
        deadline = time.monotonic() + 10
        while not os.path.exists({first_mark!r}) and time.monotonic() < deadline:
            time.sleep(0.01)
        seen = "flushed" if os.path.exists({first_mark!r}) else "not flushed yet"
        placed = "in place" if os.path.exists({first_dest!r}) else "not in place"
        open("o.txt", "w").write(seen + ", " + placed)
    """)
    second = project.request("strip12", execs=[argv_step(
        "dem", "strip12", "w", ["python", "-c", wait_for_first], outputs=("o.txt",))],
        copyback=[["o.txt", "b/strip12.txt"]])
    results = run_tasks([_writing_request(project, "strip11", "a"), second])
    assert [r["ok"] for r in results] == [True, True], results
    assert (project.root / "b" / "strip12.txt").read_text() == "flushed, not in place"
    assert (project.root / "a" / "strip11.txt").read_text() == "x"


def _writing_request(project: Project, task: str, folder: str) -> dict[str, Any]:
    return project.request(task, execs=[argv_step(
        "dem", task, "w", ["python", "-c", "open('o.txt', 'w').write('x')"],
        outputs=("o.txt",))], copyback=[["o.txt", f"{folder}/{task}.txt"]])


def test_a_batch_flushes_every_task_s_copies_before_it_puts_any_in_place(
        project: Project, monkeypatch: pytest.MonkeyPatch):
    """Invariant: the copies of all the tasks of a batch are flushed to disk in one phase,
    before the first of them is renamed into place; a copy that cannot be flushed fails its
    own task only, which leaves neither its destination nor a temporary behind."""
    from opals_dsl.runtime import fsatomic
    events: list[tuple[str, str]] = []
    lock = threading.Lock()
    real_flush, real_rename = fsatomic._flush, fsatomic._rename

    def flush(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if "strip12" in path and broken:
            raise OSError(errno.EIO, "Input/output error")
        real_flush(fd)
        with lock:
            events.append(("flushed", os.path.basename(path)))

    def rename(src: str, dst: str) -> None:
        events.append(("rename", os.path.basename(dst)))
        real_rename(src, dst)

    monkeypatch.setattr(fsatomic, "_flush", flush)
    monkeypatch.setattr(fsatomic, "_rename", rename)
    tasks = ["strip11", "strip12", "strip13"]
    broken = False
    results = run_tasks([_writing_request(project, t, "a") for t in tasks])
    assert [r["ok"] for r in results] == [True] * 3, results
    assert [kind for kind, _ in events] == ["flushed"] * 3 + ["rename"] * 3, events
    assert [name for kind, name in events if kind == "rename"] == [f"{t}.txt" for t in tasks]
    for r in results:  # the result names each destination as it is on disk
        st = (project.root / "a" / f"{r['task']}.txt").stat()
        assert r["outputs"] == {f"a/{r['task']}.txt": [st.st_size, st.st_mtime_ns]}

    events.clear()
    broken = True
    results = run_tasks([_writing_request(project, t, "b") for t in tasks])
    assert [r["ok"] for r in results] == [True, False, True]
    failure = results[1]["failure"]
    assert failure["kind"] == "copyback" and failure["node"] == "copyback:dem/strip12"
    assert failure["message"] == (f"cannot copy o.txt back to {project.root / 'b' / 'strip12.txt'}"
                                  f": Input/output error")
    row = next(row for row in results[1]["trace"] if row["kind"] == "copyback")
    assert row["status"] == "failed"
    assert sorted(p.name for p in (project.root / "b").iterdir()) == ["strip11.txt",
                                                                      "strip13.txt"]


def test_a_copy_that_cannot_be_renamed_into_place_fails_its_own_task_only(project: Project):
    """A destination that is a folder takes the temporary's write but not its rename: that
    task fails naming the destination, the other lands, and no temporary stays."""
    (project.root / "a" / "strip12.txt" / "x").mkdir(parents=True)
    results = run_tasks([_writing_request(project, t, "a") for t in ("strip11", "strip12")])
    assert [r["ok"] for r in results] == [True, False]
    failure = results[1]["failure"]
    assert failure["kind"] == "copyback"
    assert failure["message"].startswith(
        f"cannot copy o.txt back to {project.root / 'a' / 'strip12.txt'}: ")
    assert sorted(p.name for p in (project.root / "a").iterdir()) == ["strip11.txt",
                                                                      "strip12.txt"]
    assert (project.root / "a" / "strip11.txt").read_text() == "x"


def test_an_interrupted_batch_puts_none_of_its_waiting_copies_in_place(
        project: Project, fresh_imports):
    """Invariant: when a batch is interrupted (Ctrl-C reaching the engine), the copies of its
    tasks that ended before are not renamed into place, and no temporary stays."""
    (project.root / "stop.py").write_text("def now():\n    raise KeyboardInterrupt\n")
    batch = [_writing_request(project, "strip11", "a"), _writing_request(project, "strip12", "a"),
             project.request("strip13", execs=[call_step("dem", "strip13", "s", "stop:now", {})])]
    with pytest.raises(KeyboardInterrupt):
        run_tasks(batch)
    assert list((project.root / "a").iterdir()) == []


def test_copyback_failing_on_one_file_replaces_none_of_the_task_s_destinations(
        project: Project):
    """Invariant: when one file of a copy-back cannot be written, every destination of the task
    stays as it was (no mix of this run's and the last run's results), and no temporary stays."""
    big = project.root / "big.bin"
    big.write_bytes(os.urandom(3 << 20))
    results = project.root / "results"
    results.mkdir()
    (results / "small.bin").write_bytes(b"small, from the last run")
    (results / "big.bin").write_bytes(b"big, from the last run")
    make = (f"import os; open('small.out', 'wb').write(b'new'); "
            f"os.symlink({str(big)!r}, 'big.out')")
    req = project.request(
        execs=[argv_step("dem", "strip11", "make", ["python", "-c", make],
                         outputs=("small.out", "big.out"))],
        copyback=[["small.out", "results/small.bin"], ["big.out", "results/big.bin"]],
    )
    proc = run_python(LIMITED, "task", json.dumps(req))
    assert proc.returncode == 0, proc.stderr
    failure = only(json.loads(proc.stdout))["failure"]
    assert failure["kind"] == "copyback"
    assert str(results / "big.bin") in failure["message"]
    assert (results / "small.bin").read_bytes() == b"small, from the last run"
    assert (results / "big.bin").read_bytes() == b"big, from the last run"
    assert sorted(p.name for p in results.iterdir()) == ["big.bin", "small.bin"]


def test_atomic_copies_in_turns_names_the_failing_pair_and_keeps_its_turn_unplaced(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Invariant: atomic_copies holds at most BATCH temporaries open; a failure names the pair
    that failed, the turns before it are in place complete, and no destination of its own turn
    is replaced."""
    from opals_dsl.runtime import fsatomic
    monkeypatch.setattr(fsatomic, "BATCH", 2)
    srcs = []
    for i in range(5):
        src = tmp_path / f"s{i}.bin"
        src.write_bytes(os.urandom(1000 * (i + 1)))
        srcs.append(src)
    out = tmp_path / "out"
    pairs = [(str(s), str(out / f"d{i}.bin")) for i, s in enumerate(srcs)]
    assert fsatomic.atomic_copies(pairs) == [1000, 2000, 3000, 4000, 5000]
    assert [(out / f"d{i}.bin").read_bytes() for i in range(5)] == [s.read_bytes() for s in srcs]
    shutil.rmtree(out)
    pairs[3] = (str(tmp_path), str(out / "d3.bin"))  # a folder cannot be copied
    with pytest.raises(fsatomic.CopyError) as failed:
        fsatomic.atomic_copies(pairs)
    assert failed.value.index == 3
    assert isinstance(failed.value.error, IsADirectoryError)
    assert sorted(p.name for p in out.iterdir()) == ["d0.bin", "d1.bin"]


ADOPTING = textwrap.dedent(
    """
    import json, sys
    from opals_dsl.runtime.engine import run_tasks
    from opals_dsl.runtime.steps import adopt_orphans
    adopting = adopt_orphans()
    results = run_tasks([json.loads(sys.argv[1])])
    print(json.dumps({"adopting": adopting, "results": results}), flush=True)
    sys.stdin.read()  # alive until the test has looked: its orphans would go to init then
    """
)

STRAYS = (
    "import subprocess\n"
    "def spawn(pidfile):\n"
    "    proc = subprocess.Popen(['sleep', '1001'])\n"
    "    open(pidfile, 'w').write(str(proc.pid))\n"
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="orphans are adopted on Linux")
@pytest.mark.parametrize("how", ["setsid", "setsid past the timeout", "call"])
def test_what_a_step_leaves_running_outside_its_group_ends_with_the_step(
        project: Project, tmp_path: Path, how: str):
    """A process a step started that left the step's process group (setsid), also when the
    step is stopped at its timeout, and one a call step started in the engine's own group,
    end with the step, while the engine that ran it (an engine adopts orphans) still runs."""
    pidfile = tmp_path / "stray.pid"
    if how == "call":
        (project.root / "strays.py").write_text(STRAYS)
        step = call_step("dem", "strip11", "s", "strays:spawn", {"pidfile": str(pidfile)})
    else:
        # the stray writes its pid once it has left the group; the step waits for that
        script = (f"setsid sh -c 'echo $$ > {pidfile}; exec sleep 1001' & "
                  f"while [ ! -s {pidfile} ]; do sleep 0.01; done")
        if how.endswith("timeout"):
            script += "; sleep 1002"
        step = dataclasses.replace(argv_step("dem", "strip11", "s", ["sh", "-c", script]),
                                   timeout=1.0 if how.endswith("timeout") else 60.0)
    proc = subprocess.Popen([sys.executable, "-c", ADOPTING, json.dumps(project.request(
        execs=[step]))], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)))
    stray = None
    try:
        answer = json.loads(proc.stdout.readline())
        stray = int(pidfile.read_text())
        assert answer["adopting"]
        result = only(answer["results"])
        if how.endswith("timeout"):
            assert result["failure"]["kind"] == "timeout"
        else:
            assert result["ok"], result["failure"]
        assert proc.poll() is None  # the engine still runs: it ended the stray itself
        assert process_gone(stray), f"{how}: the step's stray process outlived the step"
    finally:
        proc.communicate(timeout=30)
        if stray is not None:
            _kill(stray)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc holds the marks")
def test_what_a_step_left_outside_its_group_ends_when_its_engine_is_killed(
        project: Project, tmp_path: Path):
    """kill -9 of an engine while its step runs: the engine's lifeline ends the step's group
    and also the process the step started outside it (setsid), which carries the engine's
    mark; a process with another engine's mark is left alone."""
    marks = tmp_path / "marks"
    marks.mkdir()
    script = (f"setsid sh -c 'echo $$ > {marks}/stray; exec sleep 1001' & "
              f"sleep 1001 & echo $! > {marks}/sleep; wait")
    code = ("import json, sys\n"
            "from opals_dsl.runtime.engine import run_tasks\n"
            "from opals_dsl.runtime.executor import prepare_engine\n"
            "prepare_engine(None)\n"
            "run_tasks([json.loads(sys.argv[1])])\n")
    req = project.request(execs=[argv_step("dem", "strip11", "wait", ["sh", "-c", script])])
    # a bystander marked by another engine
    other = subprocess.Popen(["sleep", "1001"], env=dict(os.environ, OPF_ENGINE_MARK="1-beef"))
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(req)],
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    pids: list[int] = []
    try:
        for name in ("stray", "sleep"):
            deadline = time.monotonic() + 60
            while not (marks / name).is_file() or not (marks / name).read_text().strip():
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
            pids.append(int((marks / name).read_text()))
        stray, sleeper = pids
        assert os.getsid(stray) == stray != os.getsid(sleeper)  # it left the step's session
        proc.kill()
        proc.wait()
        assert process_gone(sleeper), "the killed engine's step went on"
        assert process_gone(stray), "what the step started outside its group outlived the engine"
        assert other.poll() is None, "a process of another engine was ended"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in pids:
            _kill(pid)
        other.kill()
        other.wait()
