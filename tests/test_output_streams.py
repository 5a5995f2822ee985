"""Where opf writes: results on standard output, progress and diagnostics on standard error.

A command's result — ``opf check``'s verdict (and its findings with ``--format``), ``opf
compile``'s plan, ``opf run --dry-run``'s decisions, the summary at the end of ``opf run``,
``opf fmt -``'s text — is on stdout, so it can be piped or saved; what is said along the way —
progress, warnings, errors, failure reports — is on stderr. Every case runs ``opf`` as a
program on real files; the runs use the test cluster's real engines. (``opf compile`` and
``opf fmt`` are held to it by tests/test_dot.py and tests/test_fmt.py.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import EngineCluster, write_pipeline

OPF = [sys.executable, "-m", "opals_dsl"]

COPY = """\
pipeline streams

job work for s in "data/*.txt" {
    shared tool = "tool.py"
    output "results" flat
    step copy {
        out a = "{s.stem}.a"
        run python {tool} copy {s} {a}
    }
}
"""

FAILING = COPY.replace("run python {tool} copy {s} {a}", "run python {tool} fail 3 {s} {a}")


def opf(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*OPF, *args], cwd=cwd, capture_output=True, text=True,
                          input=stdin, timeout=300)


def test_check_says_its_verdict_on_stdout_and_what_is_wrong_on_stderr(tmp_path: Path):
    path = write_pipeline(tmp_path, COPY, inputs=2)
    done = opf("check", path.name, cwd=tmp_path)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == "p.opf: ok — streams: 1 job, 2 tasks, 2 step runs\n"

    path.write_text(COPY.replace("{tool} copy", "tool.py copy"), encoding="utf-8")
    done = opf("check", path.name, cwd=tmp_path)
    assert done.returncode == 0
    assert done.stdout == "p.opf: ok — streams: 1 job, 2 tasks, 2 step runs\n"
    assert done.stderr.startswith("p.opf:8:20: warning: 'tool.py' is a file")

    path.write_text(COPY.replace("{a}\n", "{a} {celll}\n"), encoding="utf-8")
    done = opf("check", path.name, cwd=tmp_path)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith("p.opf:8:40: error: unknown name 'celll'")
    done = opf("check", path.name, "--format", "json", cwd=tmp_path)
    assert (done.returncode, done.stderr) == (2, "")
    assert json.loads(done.stdout)[0]["message"] == "unknown name 'celll'"


def test_a_run_shows_progress_on_stderr_and_its_summary_on_stdout(cluster: EngineCluster,
                                                                  tmp_path: Path):
    path = write_pipeline(tmp_path, COPY, inputs=2)
    done = opf("run", path.name, "--dry-run", cwd=tmp_path)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.splitlines() == ["run   work/s1  new", "run   work/s2  new",
                                        "streams: 2 of 2 tasks would run, 0 unchanged"]

    done = opf("run", path.name, "--cluster-file", str(cluster.client_file), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    progress, summary = done.stderr.splitlines(), done.stdout.splitlines()
    assert progress[0].startswith("streams: 2 tasks on 3 engines (2 machines)")
    assert sorted(line.split(" on engine")[0] for line in progress[1:]) == [
        "done work/s1", "done work/s2"]
    assert summary[0] == "streams: all tasks done"
    assert [line.split()[0] for line in summary[1:5]] == ["tasks", "run", "skipped", "failed"]
    assert summary[1].split() == ["tasks", "2"] and summary[2].split() == ["run", "2"]

    done = opf("run", path.name, "--dry-run", cwd=tmp_path)
    assert done.stdout.splitlines()[-1] == "streams: 0 of 2 tasks would run, 2 unchanged"


def test_a_failure_is_reported_on_stderr_and_counted_in_the_summary_on_stdout(
        cluster: EngineCluster, tmp_path: Path):
    path = write_pipeline(tmp_path, FAILING, inputs=1)
    done = opf("run", path.name, "--cluster-file", str(cluster.client_file), cwd=tmp_path)
    assert done.returncode == 1
    assert "FAILED work/s1: step copy" in done.stderr
    assert "FAILED" not in done.stdout
    assert done.stderr.splitlines()[-1].endswith(  # after the failures, what to do with them
        "'opf clean p.opf --scratch-folder' removes it on this machine, with the pipeline's "
        "job folders there and the records of all but its last runs")
    assert done.stdout.splitlines()[0] == "streams: 1 task failed"
    assert "  failed  " in done.stdout and "  failed  " not in done.stderr
