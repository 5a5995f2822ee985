"""Resuming a task from a later step: when only a later step's command changed (a ``--param``
that only it uses), the task runs again from that step, its earlier steps' published outputs
staged from their destinations instead of made again; where such an output is ``temp``, the
whole task runs, and the reason says why.

Steps append a line to a ledger file, so the tests see which steps really ran. Runs go through
:func:`opals_dsl.runtime.session.run` with the in-process executor (real files, real step
processes) and through ``opf`` on the session cluster (tests/conftest.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import read_json_lines, write_pipeline

from opals_dsl.api import compile_file
from opals_dsl.runtime import session
from opals_dsl.runtime.executor import LocalExecutor
from opals_dsl.runtime.journal import Journal
from opals_dsl.runtime.resume import Resume

STEPTOOL = """
import sys
ledger, step, src, dst, *extra = sys.argv[1:]
with open(ledger, "a") as f:
    f.write(f"{step} {src}\\n")
with open(dst, "w") as f:
    f.write(open(src).read() + step + " " + " ".join(extra) + "\\n")
"""

PIPELINE = """
pipeline resume
param azimuth = 315
param cell = 1.0

job dem for s in "data/*.txt" {
    shared tool = "steptool.py"
    output "results" by step
    step import {
        out a = "{s.stem}.a" TEMP
        run python {tool} LEDGER import {s} {a}
    }
    step grid {
        out g = "{s.stem}.g"
        run python {tool} LEDGER grid {import.a} {g} {cell}
    }
    step shade {
        out h = "{s.stem}.h"
        run python {tool} LEDGER shade {grid.g} {h} {azimuth}
    }
}
"""


def project(folder: Path, temp: bool = False) -> tuple[Path, Path]:
    ledger = folder / "ledger.txt"
    text = PIPELINE.replace("LEDGER", str(ledger)).replace(" TEMP", " temp" if temp else "")
    path = write_pipeline(folder, text, inputs=2)
    (folder / "steptool.py").write_text(STEPTOOL)
    return path, ledger


def run(path: Path, params: dict[str, str] | None = None):
    plan = compile_file(path, params)
    return session.run(plan, executor=LocalExecutor([str(path.parent / "scratch")]),
                       state_dir=path.parent / ".opf")


def decisions(path: Path, params: dict[str, str] | None = None) -> dict[str, str]:
    plan = compile_file(path, params)
    found = Resume(Journal.read(path.parent / ".opf", plan)).decide()
    return {d.task.name: (d.reason if d.run else "skip") for d in found}


def ran(ledger: Path) -> list[str]:
    """The steps run since the last look, and empty the ledger."""
    lines = ledger.read_text().splitlines() if ledger.exists() else []
    ledger.write_text("")
    return sorted(lines)


def test_a_param_of_the_last_step_reruns_only_that_step(tmp_path):
    path, ledger = project(tmp_path)
    results = tmp_path / "results"
    assert run(path).done == 2
    assert ran(ledger) == ["grid s1.a", "grid s2.a", "import s1.txt", "import s2.txt",
                           "shade s1.g", "shade s2.g"]
    earlier = {p: p.stat().st_mtime_ns for p in results.glob("[ig]*/*")}

    assert decisions(path, {"azimuth": "45"}) == {
        "dem/s1": "from step shade: param azimuth changed",
        "dem/s2": "from step shade: param azimuth changed"}
    summary = run(path, {"azimuth": "45"})
    assert (summary.done, summary.failed) == (2, 0)
    assert ran(ledger) == ["shade s1.g", "shade s2.g"]  # import and grid did not run
    # staged: only what shade reads, the grids; not the strips, which only import reads
    assert summary.bytes_staged == sum(p.stat().st_size for p in results.glob("grid/*.g"))
    assert (results / "shade" / "s1.h").read_text() == (
        "strip 1\nimport \ngrid 1.0\nshade 45\n")
    assert {p: p.stat().st_mtime_ns for p in earlier} == earlier  # left as they were
    assert set(decisions(path, {"azimuth": "45"}).values()) == {"skip"}

    # a middle step: it and the steps after it run, on the first step's published output
    assert decisions(path, {"azimuth": "45", "cell": "0.5"})["dem/s1"] == (
        "from step grid: param cell changed")
    assert run(path, {"azimuth": "45", "cell": "0.5"}).done == 2
    assert ran(ledger) == ["grid s1.a", "grid s2.a", "shade s1.g", "shade s2.g"]
    assert (results / "shade" / "s2.h").read_text() == (
        "strip 2\nimport \ngrid 0.5\nshade 45\n")

    # an earlier output that is not as recorded: the task runs from the step that made it
    (results / "grid" / "s1.g").write_text("edited by hand")
    got = decisions(path, {"azimuth": "30", "cell": "0.5"})
    assert got == {"dem/s1": "from step grid: output changed: results/grid/s1.g",
                   "dem/s2": "from step shade: param azimuth changed"}
    assert run(path, {"azimuth": "30", "cell": "0.5"}).done == 2
    assert ran(ledger) == ["grid s1.a", "shade s1.g", "shade s2.g"]
    assert (results / "grid" / "s1.g").read_text() == "strip 1\nimport \ngrid 0.5\n"


def test_a_missing_output_reruns_the_task_from_the_step_that_made_it(tmp_path):
    path, ledger = project(tmp_path)
    results = tmp_path / "results"
    assert run(path).done == 2
    ran(ledger)
    shade = results / "shade" / "s1.h"
    want = shade.read_text()
    earlier = {p: p.stat().st_mtime_ns for p in results.glob("[ig]*/*")}

    shade.unlink()
    assert decisions(path) == {"dem/s1": "from step shade: output missing: results/shade/s1.h",
                               "dem/s2": "skip"}
    assert run(path).done == 1
    assert ran(ledger) == ["shade s1.g"]
    assert shade.read_text() == want
    assert {p: p.stat().st_mtime_ns for p in earlier} == earlier  # left as they were

    # two missing: from the earlier of their steps
    (results / "shade" / "s2.h").unlink()
    (results / "grid" / "s2.g").unlink()
    assert decisions(path)["dem/s2"] == "from step grid: output missing: results/grid/s2.g"
    assert run(path).done == 1
    assert ran(ledger) == ["grid s2.a", "shade s2.g"]

    # the first step's output: the whole task
    (results / "import" / "s1.a").unlink()
    assert decisions(path)["dem/s1"] == "output missing: results/import/s1.a"
    assert run(path).done == 1
    assert ran(ledger) == ["grid s1.a", "import s1.txt", "shade s1.g"]
    assert set(decisions(path).values()) == {"skip"}


def test_an_earlier_temp_output_makes_the_whole_task_run_and_says_why(tmp_path):
    path, ledger = project(tmp_path, temp=True)
    assert run(path).done == 2
    ran(ledger)
    # shade reads grid's published output: it alone runs again
    assert decisions(path, {"azimuth": "45"})["dem/s1"] == (
        "from step shade: param azimuth changed")
    # grid reads import's temp output, which is gone: everything runs
    assert decisions(path, {"cell": "2.0"})["dem/s1"] == (
        "param cell changed; step grid reads s1.a, a temp output of step import (never copied "
        "back), so the whole task runs")
    assert run(path, {"cell": "2.0"}).done == 2
    assert ran(ledger) == ["grid s1.a", "grid s2.a", "import s1.txt", "import s2.txt",
                           "shade s1.g", "shade s2.g"]
    # the same for a missing output of a step that reads a temp output
    (tmp_path / "results" / "grid" / "s1.g").unlink()
    assert decisions(path, {"cell": "2.0"})["dem/s1"] == (
        "output missing: results/grid/s1.g; step grid reads s1.a, a temp output of step import "
        "(never copied back), so the whole task runs")
    (tmp_path / "results" / "grid" / "s2.g").write_text("edited")
    (tmp_path / "results" / "shade" / "s2.h").unlink()  # the earliest step's output is named
    assert decisions(path, {"cell": "2.0"})["dem/s2"].startswith(
        "output changed: results/grid/s2.g; step grid reads s2.a")


def opf(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "opals_dsl", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=180)


def test_cli_dry_run_names_the_step_and_the_run_on_engines_stages_the_rest(cluster, tmp_path):
    path, ledger = project(tmp_path)
    on = ["--cluster-file", str(cluster.client_file)]
    proc = opf("run", str(path), *on, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    ran(ledger)
    proc = opf("run", str(path), "--dry-run", "--param", "azimuth=45", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].split(None, 2) == [
        "run", "dem/s1", "from step shade: param azimuth changed"]
    proc = opf("run", str(path), "--param", "azimuth=45", *on, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert ran(ledger) == ["shade s1.g", "shade s2.g"]
    assert (tmp_path / "results" / "shade" / "s1.h").read_text().endswith("shade 45\n")
    traces = sorted((tmp_path / ".opf").rglob("trace.jsonl"), key=lambda p: p.stat().st_mtime)
    rows = read_json_lines(traces[-1])
    status = {r["node"]: r["status"] for r in rows if r["task"] == "s1"}
    assert status["exec:dem/s1/import"] == status["exec:dem/s1/grid"] == "reused"
    assert status["exec:dem/s1/shade"] == status["copyback:dem/s1"] == "done"
