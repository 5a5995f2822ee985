"""Outputs may not destroy the pipeline or its state: no copy-back into the run's state folder
or into the ``opf`` folder of a scratch root, checked against the defaults by ``opf check`` and
against the actual ``--state``, ``--scratch`` and the engines' reported scratch roots by
``opf run`` — before anything is copied, with exit status 2 and a message at the output's
declaration. (The pipeline file, the default ``.opf`` and the files the pipeline reads are
golden cases: tests/golden/errors/output_*.opf.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_pipeline

from opals_dsl.api import compile_file
from opals_dsl.errors import PipelineError

PIPELINE = """\
    param results = "results"
    job copy for s in "data/*.txt" {
        shared tool = "tool.py"
        output "{results}" flat
        step copy {
            out a = "{s.stem}.a"
            run python {tool} copy {s} {a}
        }
    }
"""


def opf(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "opals_dsl", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=300)


def refused_at_the_output(proc: subprocess.CompletedProcess[str], dest: str, why: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    first = proc.stderr.splitlines()[0]
    assert first == (f"p.opf:6:17: error: output 'a' of step 'copy' (job 'copy') would be copied "
                     f"back to '{dest}', {why}; choose another output folder or file name")


def test_check_refuses_the_opf_folder_of_the_default_scratch_root(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    scratch = tmp_path / "scratch"
    monkeypatch.setenv("OPF_SCRATCH", str(scratch))
    path = write_pipeline(tmp_path / "p", PIPELINE)
    with pytest.raises(PipelineError) as info:
        compile_file(path, {"results": f"{scratch}/opf/p/copy"})
    assert [str(d.span) for d in info.value.diagnostics] == [f"{path}:6:17"]
    assert info.value.first.message == (
        f"output 'a' of step 'copy' (job 'copy') would be copied back to "
        f"'{scratch}/opf/p/copy/s1.a', inside '{scratch}/opf', where the engines keep their job "
        "and task folders (a task's folder is emptied after its copy-back); choose another "
        "output folder or file name")
    # the rest of a scratch root is not opf's: results may go there
    assert compile_file(path, {"results": f"{scratch}/kept"})


def test_a_link_does_not_hide_the_state_folder(tmp_path: Path):
    path = write_pipeline(tmp_path / "p", PIPELINE)
    (path.parent / ".opf").mkdir()
    (path.parent / "results").symlink_to(".opf")
    with pytest.raises(PipelineError) as info:
        compile_file(path)
    assert "would be copied back to 'results/s1.a', inside the run's state folder '.opf'" in (
        info.value.first.message)


def test_run_refuses_an_output_in_its_state_folder(tmp_path: Path):
    path = write_pipeline(tmp_path / "p", PIPELINE)
    state = tmp_path / "state"
    proc = opf("run", "p.opf", "--state", str(state), "--param", f"results={state}/results",
               "-n", "1", cwd=path.parent)
    refused_at_the_output(proc, f"{state}/results/s1.a",
                          f"inside the run's state folder '{state}' (its journal, logs and trace)")
    assert not state.exists()  # refused before anything was started or written
    # with its own state folder elsewhere, `.opf` beside the pipeline is an ordinary folder
    proc = opf("run", "p.opf", "--state", str(state), "--param", "results=.opf/results",
               "--dry-run", cwd=path.parent)
    assert proc.returncode == 0, proc.stderr


def test_run_refuses_an_output_in_the_opf_folder_of_its_scratch_root(tmp_path: Path):
    path = write_pipeline(tmp_path / "p", PIPELINE)
    scratch = tmp_path / "scratch"
    proc = opf("run", "p.opf", "--scratch", str(scratch), "--param",
               f"results={scratch}/opf/p/copy/s1", "-n", "1", cwd=path.parent)
    refused_at_the_output(
        proc, f"{scratch}/opf/p/copy/s1/s1.a",
        f"inside '{scratch}/opf', where the engines keep their job and task folders (a task's "
        "folder is emptied after its copy-back)")
    assert not scratch.exists() and not (path.parent / ".opf").exists()


def test_run_refuses_an_output_in_a_scratch_root_an_engine_reports(cluster, tmp_path: Path):
    """The engines of an existing cluster say where they work only when asked: opf asks them
    before submitting anything, and stops (exit 2) if an output would be copied back into one
    of their opf folders. The cluster is left running."""
    path = write_pipeline(tmp_path / "p", PIPELINE)
    machine = cluster.scratches[2].resolve()
    folder = machine / "opf" / "kept"
    proc = opf("run", "p.opf", "--cluster-file", str(cluster.client_file), "--param",
               f"results={folder}", cwd=path.parent)
    refused_at_the_output(
        proc, f"{folder}/s1.a",
        f"inside '{machine}/opf', where the engines keep their job and task folders (a task's "
        "folder is emptied after its copy-back)")
    assert not folder.exists()
    assert not list((path.parent / ".opf").rglob("trace.jsonl"))  # no task was submitted
    # the same pipeline with its results elsewhere runs on that cluster
    proc = opf("run", "p.opf", "--cluster-file", str(cluster.client_file), cwd=path.parent)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(path.parent / "results")) == ["s1.a", "s2.a", "s3.a"]



def test_a_link_does_not_hide_an_input(tmp_path: Path):
    path = write_pipeline(tmp_path / "p", PIPELINE.replace('"{s.stem}.a"', '"{s.name}"'))
    (path.parent / "results").symlink_to("data")
    with pytest.raises(PipelineError) as info:
        compile_file(path)
    # (each task also names its output like its input: that is reported on its own)
    assert [d.message for d in info.value.diagnostics if "link" in d.message] == [
        f"output 'a' of task 's{i}' (job 'copy') would be copied back to 'results/s{i}.txt', "
        f"which is 'data/s{i}.txt' through a link, a file read by task 's{i}' of job 'copy'; a "
        "copy-back must not overwrite an input: give the output another name or output folder"
        for i in (1, 2, 3)
    ]
