"""Tests of the Python API (``import opals_dsl as opf``): load, plan, draw and run from Python
on a cluster the caller already has — and the notebook ``docs/notebook.ipynb``, executed for
real by nbclient in a Jupyter kernel."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import time

import pytest
from conftest import REPO, write_pipeline

import opals_dsl as opf
from opals_dsl.runtime.events import RunListener

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

job all {
    shared tool = "tool.py"
    output "results" flat
    step merge {
        out m = "all.txt"
        run python {tool} merge {m} {up.copy.a}
    }
}
"""


def test_the_package_gives_the_api_and_opf_run_stays_the_function():
    code = ("import sys, opals_dsl as opf\n"
            "heavy = sorted(m for m in ('networkx', 'lark', 'ipyparallel') if m in sys.modules)\n"
            "import opals_dsl.runtime.session, opals_dsl.runtime.engine\n"
            "print(heavy, opf.run.__module__, opf.load.__module__, "
            "issubclass(opf.PipelineError, Exception))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["[]", "opals_dsl.api", "opals_dsl.lang.compile", "True"]


def test_load_raises_every_finding_and_plan_gives_the_graph(tmp_path):
    path = write_pipeline(tmp_path, PIPELINE.replace("{up.copy.a}", "{up.copy.b} {nosuch}"))
    with pytest.raises(opf.PipelineError) as caught:
        opf.load(path)
    messages = [d.message for d in caught.value.diagnostics]
    assert len(messages) == 2, messages
    pipeline = opf.load(write_pipeline(tmp_path / "ok", PIPELINE))
    plan = pipeline.plan()
    # values as Python has them: a number for a number, True for a boolean
    typed = write_pipeline(tmp_path / "typed", PIPELINE.replace(
        "pipeline p\n", "pipeline p\nparam cell = 1.0\nparam fill = false\n").replace(
        "{s} {a}", "{s} {a} {cell} {fill}"))
    assert opf.load(typed, params={"cell": 55, "fill": True}).params == {
        "cell": 55.0, "fill": True}
    assert plan.graph["jobs"] == ["up", "all"] and len(plan) == 14
    assert "digraph" in str(opf.draw(pipeline, level="job"))


def test_a_notebook_shows_a_loaded_pipeline_in_a_line_and_a_drawing_as_dot_without_graphviz(
        tmp_path):
    from IPython.lib.pretty import pretty
    pipeline = opf.load(write_pipeline(tmp_path, PIPELINE))
    shown = repr(pipeline)
    assert shown.startswith("<Loaded pipeline 'p' from ") and "2 jobs" in shown, shown
    assert "\n" not in shown and "job up" not in shown  # not the text, not the tree
    drawing = opf.draw(pipeline, level="job")
    assert pretty(drawing) == drawing.source == str(drawing)  # the text a notebook shows


def test_list_params_from_python_are_lists_and_what_cannot_be_one_is_refused(tmp_path):
    path = write_pipeline(tmp_path, PIPELINE.replace(
        "pipeline p\n", 'pipeline p\nparam tags = ["a", "b"]\nparam sizes = [1, 2]\n').replace(
        "{s} {a}", "{s} {a} {tags} {sizes}"))
    assert opf.load(path, params={"tags": ["x", "y z"], "sizes": (3,)}).params == {
        "tags": ("x", "y z"), "sizes": (3,)}
    assert opf.load(path, params={"tags": []}).params["tags"] == ()
    for bad, says in (({"tags": ["a,b"]}, "the item 'a,b' holds a comma"),
                      ({"tags": [["a"]]}, "not lists"),
                      ({"tags": None}, "not NoneType")):
        with pytest.raises(opf.UsageError, match=says):
            opf.load(path, params=bad)
    with pytest.raises(opf.PipelineError, match="'q' is not one"):
        opf.load(path, params={"sizes": ["q"]})


class Seen(RunListener):
    def __init__(self) -> None:
        self.done: list[str] = []

    def task_done(self, task, result, engine) -> None:
        self.done.append(task.name)


def test_run_on_the_callers_client_leaves_the_cluster_as_it_was(cluster, tmp_path):
    path = write_pipeline(tmp_path, PIPELINE)
    client = cluster.client()
    try:
        before = client[:].apply_sync(os.getpid)
        seen = Seen()
        summary = opf.run(path, client=client, progress=seen, only=["up/s2"])
        assert (summary.exit_code, summary.done, summary.total) == (0, 1, 1)
        assert seen.done == ["up/s2"]
        assert sorted(p.name for p in (tmp_path / "results").rglob("*") if p.is_file()) == \
            ["s2.a"]
        summary = opf.run(opf.load(path), client=client, progress=False)
        assert (summary.exit_code, summary.done, summary.skipped) == (0, 3, 1)
        assert (tmp_path / "results" / "all.txt").read_text() == \
            "".join(f"copied:strip {i}\n" for i in (1, 2, 3))
        # the same engines, still answering on the same client
        assert client[:].apply_sync(os.getpid) == before
    finally:
        client.close()


def test_run_refuses_a_client_together_with_engines_to_start(cluster, tmp_path):
    path = write_pipeline(tmp_path, PIPELINE)
    with pytest.raises(opf.api.UsageError, match="a client or the engines to start"):
        opf.run(path, client=object(), n=2)


def test_run_refuses_unknown_options_and_no_engines_before_it_starts_anything(tmp_path):
    path = write_pipeline(tmp_path, PIPELINE)
    with pytest.raises(TypeError, match="unexpected option 'bogus'; its options are .*force"):
        opf.run(path, force=True, bogus=1)
    for n in (0, -1, True, 1.5):
        with pytest.raises(opf.UsageError, match="n is a number of engines, 1 or more"):
            opf.run(path, n=n)
    assert not (tmp_path / ".opf").exists()  # no run was begun, no cluster started
    plan = opf.load(path).plan()
    assert set(opf.select(plan, "up")) == set(opf.select(plan, ["up"]))  # one target, a string


def test_progress_false_shows_nothing_and_warnings_show_as_opf_run_shows_them(
        cluster, tmp_path, capfd):
    failing = PIPELINE.replace("run python {tool} merge {m} {up.copy.a}",
                               "run python {tool} nosuchcommand {m} {up.copy.a} > x")
    path = write_pipeline(tmp_path, failing)
    client = cluster.client()
    try:
        summary = opf.run(path, client=client, progress=False)
        assert summary.exit_code == 1 and summary.failures
        out, err = capfd.readouterr()
        assert (out, err) == ("", "")
        opf.run(path, client=client)
        err = capfd.readouterr().err
        assert "FAILED all/0" in err
        assert f"opf: warning: {path}:" in err and "'>'" in err
    finally:
        client.close()


def _marked(token: str) -> list:
    import psutil

    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.environ().get("OPF_NOTEBOOK_TEST") == token:
                found.append(proc)
    return found


@pytest.mark.slow
def test_the_notebook_runs_the_example_on_its_own_cluster_and_stops_it(tmp_path):
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    shutil.copytree(REPO / "examples", tmp_path / "examples",
                    ignore=shutil.ignore_patterns(".opf", "results*"))
    (tmp_path / "docs").mkdir()
    notebook = nbformat.read(REPO / "docs" / "notebook.ipynb", as_version=4)
    token = secrets.token_hex(8)
    env = dict(os.environ, OPF_NOTEBOOK_TEST=token, IPYTHONDIR=str(tmp_path / "ipython"))
    env.pop("OPF_SCRATCH", None)
    runner = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path / "docs")}})
    try:
        runner.execute(env=env)
    finally:
        deadline = time.monotonic() + 30
        while _marked(token) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _marked(token)
        for proc in left:
            with contextlib.suppress(Exception):
                proc.kill()
    assert not left, f"the notebook left processes running: {left}"
    outputs = {i: cell.get("outputs", []) for i, cell in enumerate(notebook.cells)
               if cell.cell_type == "code"}
    errors = [o for out in outputs.values() for o in out if o.get("output_type") == "error"]
    assert not errors, errors
    text = "\n".join(str(o.get("text", "")) + str(o.get("data", {}))
                     for out in outputs.values() for o in out)
    assert "--param cell=fine: expected a number" in text
    assert "<th style='text-align:left'>run</th><td style='text-align:left'>10</td>" in text
    assert "(0, 10, 0, 0)" in text  # exit status, done, skipped, failed
    assert "EPSG:2994" in text
    widgets = [o for out in outputs.values() for o in out
               if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert widgets, "the run's progress was not shown as a widget"
    assert (tmp_path / "examples" / "results_50" / "mosaic_hillshade.tif").is_file()
    assert not (tmp_path / "examples" / "results").exists()  # the quick start's stay as they are


def test_run_refuses_an_output_in_a_scratch_root_the_callers_engines_report(cluster, tmp_path):
    """As ``opf run --cluster-file`` does: the engines are asked where they work before
    anything is submitted, and an output bound for one of their opf folders stops the run."""
    machine = cluster.scratches[2].resolve()
    folder = machine / "opf" / "kept"
    path = write_pipeline(tmp_path, PIPELINE.replace('output "results/up" flat',
                                                     'output "{results}" flat')
                          .replace("pipeline p\n", 'pipeline p\nparam results = "results/up"\n'))
    client = cluster.client()
    try:
        with pytest.raises(opf.PlanError, match="where the engines keep their job and task"):
            opf.run(path, client=client, progress=False, params={"results": str(folder)})
        assert not folder.exists()
        assert opf.run(path, client=client, progress=False).exit_code == 0
    finally:
        client.close()
