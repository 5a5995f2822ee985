"""Tests of targets, ``--only JOB[/TASK]``: the part of a plan it names (the tasks and every
task they need, nothing else), on ``opf compile`` and ``opf run`` (also with ``--dry-run``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest
from conftest import write_pipeline
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opals_dsl.errors import UsageError
from opals_dsl.lang.compile import compile_file
from opals_dsl.plan import model
from opals_dsl.plan.select import select

#: up (3 tasks) → down (one per up task) → all (gathers down); side is on its own
PIPELINE = """
pipeline p

job up for s in "data/*.txt" {
    shared tool = "tool.py"
    output "results/up" flat
    step copy {
        out a = "{s.stem}.a"
        run python {tool} copy {s} {a}
    }
}

job down for x in up.copy.a {
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
        run python {tool} merge {m} {down.copy.b}
    }
}

job side for s in "data/*.txt" {
    shared tool = "tool.py"
    output "results/side" flat
    step copy {
        out c = "{s.stem}.c"
        run python {tool} copy {s} {c}
    }
}
"""


def opf(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "opals_dsl", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def plan(tmp_path_factory: pytest.TempPathFactory) -> nx.DiGraph:
    return compile_file(write_pipeline(tmp_path_factory.mktemp("targets"), PIPELINE))


def _targets(graph: nx.DiGraph) -> list[str]:
    names = [t.name for t in model.tasks(graph).tasks]
    return [*model.info(graph).jobs, *names]


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_only_keeps_the_targets_and_exactly_the_nodes_they_depend_on(plan, data):
    """Invariant: the selection's nodes are exactly the chains of the named tasks together with
    every node they depend on in the whole plan (networkx's ancestors as the oracle), with the
    whole plan's edges among them."""
    targets = data.draw(st.lists(st.sampled_from(_targets(plan)), min_size=1, max_size=4))
    part = select(plan, targets)
    named = {t for t in model.tasks(plan).tasks
             if t.job in targets or t.name in targets}
    expected: set[str] = set()
    for task in named:
        expected |= set(task.nodes) | nx.ancestors(plan, task.copyback)
    assert set(part.nodes) == expected
    assert set(part.edges) == set(plan.subgraph(expected).edges)
    assert list(part.graph["jobs"]) == [j for j in model.info(plan).jobs
                                        if model.machine_stage_id(j) in expected]
    model.tasks(part)  # still a plan: every chain whole


def test_an_unknown_job_or_task_is_refused_with_what_exists(plan):
    with pytest.raises(UsageError, match=r"no job 'dwon'; did you mean 'down'\?"):
        select(plan, ["dwon"])
    with pytest.raises(UsageError, match=r"job up has no task 's9'; its tasks: s1, s2, s3$"):
        select(plan, ["up/s9"])


def test_compile_only_writes_the_selected_plan(tmp_path):
    path = write_pipeline(tmp_path, PIPELINE)
    proc = opf("compile", str(path), "--json", "--only", "down/s2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    nodes = {n["id"] for n in json.loads(proc.stdout)["nodes"]}
    assert nodes == {"stage:up", "stage:up/s2", "exec:up/s2/copy", "copyback:up/s2",
                     "stage:down", "stage:down/s2", "exec:down/s2/copy", "copyback:down/s2"}
    proc = opf("compile", str(path), "--only", "side", "--only", "up/s1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "p: 2 jobs, 4 tasks, 4 step runs"
    proc = opf("compile", str(path), "--only", "nosuch/x", cwd=tmp_path)
    assert proc.returncode == 2
    assert "opf: error: --only nosuch/x: the pipeline has no job 'nosuch'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_run_only_runs_the_targets_and_what_they_need(cluster, tmp_path):
    path = write_pipeline(tmp_path, PIPELINE)
    run = ("run", str(path), "--cluster-file", str(cluster.client_file))
    proc = opf(*run, "--dry-run", "--only", "all", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "p: 7 of 7 tasks would run, 0 unchanged" in proc.stdout
    assert "side/" not in proc.stdout

    proc = opf(*run, "--only", "down/s2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    made = sorted(str(p.relative_to(tmp_path / "results")) for p in
                  (tmp_path / "results").rglob("*") if p.is_file())
    assert made == ["down/s2.b", "up/s2.a"]
    assert (tmp_path / "results/down/s2.b").read_text() == "copied:copied:strip 2\n"

    # the whole pipeline afterwards: what --only ran is unchanged, the rest runs
    proc = opf(*run, "--dry-run", cwd=tmp_path)
    assert "p: 8 of 10 tasks would run, 2 unchanged" in proc.stdout, proc.stdout

    # --force with --only runs the targets again, not what they need (it is done), as make -B
    # or snakemake -f do; a target's job forces all of its tasks
    proc = opf(*run, "--dry-run", "--only", "down/s2", "--force", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = {ln.split()[1]: ln.split(None, 2)[2] for ln in proc.stdout.splitlines()[:-1]}
    assert lines == {"up/s2": "unchanged", "down/s2": "forced"}, proc.stdout
    proc = opf(*run, "--dry-run", "--only", "down", "--only", "up/s1", "--force", cwd=tmp_path)
    lines = {ln.split()[1]: ln.split(None, 2)[2] for ln in proc.stdout.splitlines()[:-1]}
    assert lines == {"up/s1": "forced", "up/s2": "unchanged", "up/s3": "new",
                     "down/s1": "forced", "down/s2": "forced", "down/s3": "forced"}, proc.stdout
