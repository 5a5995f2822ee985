"""Runs that share a machine's scratch root or an output folder keep out of each other's way.

* Two ``opf run`` at once of one pipeline with different params (each with its own state
  folder, on one scratch root), or of two projects that use the same pipeline name, each get
  the shared files they asked for: a job folder holds one content of the shared files, and is
  not changed or removed while another run uses it.
* A run removes only temporaries whose writer is provably gone: one that another process is
  still writing stays, one left by a killed process goes; an engine killed in the middle of a
  copy-back leaves nothing behind once the run is over.
* Destination names up to the file system's limit can be copied back (the temporary's name is
  cut to fit).

Everything runs real ``opf run`` processes with embedded clusters or the session cluster, real
helper processes holding real temporaries, and real kills.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from conftest import files_under

from opals_dsl.runtime import engine, fsatomic
from opals_dsl.runtime.fsatomic import atomic_copy, is_temp_name
from opals_dsl.runtime.journal import journal_path

REPO = Path(engine.__file__).resolve().parents[1]


def opf_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("OPF_SCRATCH", None)
    return env


def start_opf(*args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "opals_dsl", *args], cwd=cwd, env=opf_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen[str], timeout: float = 240) -> tuple[int, str, str]:
    """Wait for ``proc``: its exit status, standard output and standard error."""
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def stop(procs: list[subprocess.Popen[str]]) -> None:
    """Kill what a failed test left running: the processes and everything they started."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def wait_for(path: Path, procs: list[subprocess.Popen[str]], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        for proc in procs:
            assert proc.poll() is None, f"{proc.args} ended early:\n{proc.communicate()}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


# -- two runs on one machine -------------------------------------------------------------------

# Every task but the first waits for the gate file: the other run's first result, so that the
# other run has staged its shared files by the time these tasks read theirs.
VARIANTS = """
pipeline variants
param variant = "A"
param gate = "/"
job a for i in range(6) {
    shared cfg = "{variant}/grid.cfg"
    output "results/{variant}" flat
    step s {
        out o = "r{i}.txt"
        run sh "[ {i} = 0 ] || while [ ! -e {gate} ]; do sleep 0.05; done; cat {cfg} > {o}"
    }
}
"""


def variant_project(folder: Path, configs: dict[str, str]) -> Path:
    folder.mkdir(parents=True)
    for variant, text in configs.items():
        (folder / variant).mkdir()
        (folder / variant / "grid.cfg").write_text(text)
    path = folder / "p.opf"
    path.write_text(VARIANTS)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("sharing", ["params", "projects"])
def test_two_runs_at_once_each_get_their_own_shared_files(tmp_path, sharing):
    """Run 1 stages its shared files and finishes a task; run 2 (other params, or another
    project with the same pipeline name) stages its own on the same scratch root while run 1
    still has tasks to do. Each result holds only its own run's config, both runs exit 0, and
    each journal records exactly its own results, unchanged for the next run."""
    scratch = tmp_path / "scratch"
    if sharing == "params":
        path = variant_project(tmp_path / "p", {"A": "config A\n", "B": "config B\n"})
        runs = [(path, "A", "config A\n"), (path, "B", "config B\n")]
    else:
        one = variant_project(tmp_path / "one", {"A": "config of one\n"})
        two = variant_project(tmp_path / "two", {"A": "config of two\n"})
        runs = [(one, "A", "config of one\n"), (two, "A", "config of two\n")]
    states = [tmp_path / "state1", tmp_path / "state2"]
    firsts = [p.parent / "results" / v / "r0.txt" for p, v, _ in runs]
    gates = [firsts[1], Path("/")]  # run 1 waits for run 2's first result; run 2 never waits

    def args(k: int) -> list[str]:
        path, variant, _ = runs[k]
        return [str(path), "-n", "1", "--scratch", str(scratch), "--state", str(states[k]),
                "-p", f"variant={variant}", "-p", f"gate={gates[k]}"]

    procs: list[subprocess.Popen[str]] = []
    try:
        procs.append(start_opf("run", *args(0), cwd=tmp_path))
        wait_for(firsts[0], procs)  # run 1 has staged and used its job folder
        procs.append(start_opf("run", *args(1), cwd=tmp_path))
        outcomes = [finish(proc) for proc in procs]
    finally:
        stop(procs)
    for code, _, err in outcomes:
        assert code == 0, err

    for k, (path, variant, text) in enumerate(runs):
        results = path.parent / "results" / variant
        got = {p.name: p.read_text() for p in files_under(results)}
        assert got == {f"r{i}.txt": text for i in range(6)}, f"run {k + 1}"
        journal = [json.loads(line) for line in
                   journal_path(states[k], "variants").read_text().splitlines()[1:]]
        assert sorted(r["task"] for r in journal) == [f"a/{i}" for i in range(6)]
        cfg = path.parent / variant / "grid.cfg"
        for rec in journal:
            assert rec["in"] == {f"{variant}/grid.cfg": [cfg.stat().st_size,
                                                         cfg.stat().st_mtime_ns]}
            for dest, (size, _) in rec["out"].items():
                assert (path.parent / dest).stat().st_size == size
        code, out, err = finish(start_opf("run", *args(k), "--dry-run", cwd=tmp_path))
        assert code == 0, err
        assert "6 unchanged" in out, out

    # on the machine: one job folder per content, each complete with its own config
    folders = sorted((scratch / "opf" / "variants" / "a").glob("*/.opf-staged"))
    contents = {(m.parent / "grid.cfg").read_text() for m in folders}
    assert contents <= {text for _, _, text in runs}


# -- temporaries -------------------------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import os, sys, time
    from opals_dsl.runtime import fsatomic
    dst, ready, go = sys.argv[1:4]
    with fsatomic.replacing(dst) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(fd, b"the first half")
        with open(ready + ".part", "w") as f:
            f.write(tmp)
        os.replace(ready + ".part", ready)
        while not os.path.exists(go):
            time.sleep(0.01)
        os.write(fd, b" and the rest")
        os.fsync(fd)
        os.close(fd)
    """
)

ONE_OUTPUT = """
pipeline second
job w {
    output "results" flat
    step s {
        out o = "b.txt"
        run sh "echo second > {o}"
    }
}
"""


def start_writer(dst: Path, ready: Path, go: Path) -> subprocess.Popen[str]:
    """A process copying into ``dst``: its temporary is there (half written) once ``ready``
    names it, and it completes the file when ``go`` exists."""
    return subprocess.Popen([sys.executable, "-c", WRITER, str(dst), str(ready), str(go)],
                            env=opf_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def test_a_run_removes_abandoned_temporaries_but_not_live_ones(cluster, tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    path = folder / "p.opf"
    path.write_text(ONE_OUTPUT)
    results = folder / "results"
    results.mkdir()
    go = tmp_path / "go"
    procs: list[subprocess.Popen[str]] = []
    try:
        live = start_writer(results / "a_live.bin", tmp_path / "live", go)
        dead = start_writer(results / "a_dead.bin", tmp_path / "dead", go)
        procs += [live, dead]
        wait_for(tmp_path / "live", [live])
        wait_for(tmp_path / "dead", [dead])
        live_tmp = Path((tmp_path / "live").read_text())
        dead_tmp = Path((tmp_path / "dead").read_text())
        dead.kill()  # killed in the middle of its copy
        dead.wait(timeout=30)
        assert live_tmp.exists() and dead_tmp.exists()

        run = start_opf("run", str(path), "--cluster-file", str(cluster.client_file),
                        cwd=folder)
        procs.append(run)
        code, _, err = finish(run)
        assert code == 0, err
        assert (results / "b.txt").read_text() == "second\n"
        assert live_tmp.exists(), "the run removed a temporary that is still being written"
        assert not dead_tmp.exists(), "the run left the temporary of a killed writer"

        go.touch()
        out, err = live.communicate(timeout=60)
        assert live.returncode == 0, err
        assert (results / "a_live.bin").read_bytes() == b"the first half and the rest"
        assert not (results / "a_dead.bin").exists()
        assert not [p for p in results.iterdir() if is_temp_name(p.name)]
    finally:
        go.touch()
        stop(procs)


def test_which_temporaries_are_proven_abandoned(tmp_path):
    """Removed: one whose writer was killed, one of an older opf that names no writer, one of
    another host unchanged for longer than the grace period. Kept: one another process of this
    host holds the lock of, one whose writer (on this host) still runs even though it holds no
    lock, one of another host changed recently, and files that are not temporaries."""
    go = tmp_path / "go"
    folder = tmp_path / "out"
    folder.mkdir()
    live = start_writer(folder / "live.bin", tmp_path / "live", go)
    dead = start_writer(folder / "dead.bin", tmp_path / "dead", go)
    try:
        wait_for(tmp_path / "live", [live])
        wait_for(tmp_path / "dead", [dead])
        dead.kill()
        dead.wait(timeout=30)
        here = fsatomic._host_tag()
        other = "0" * 8 if here != "0" * 8 else "1" * 8
        mine = f"{os.getpid():08x}"  # this process runs, and holds no lock on these
        names = {
            "legacy": ".old.bin.opf-tmp-0123456789abcdef",
            "unlocked_but_running": f".run.bin.opf-tmp-{here}{mine}00000001",
            "foreign_old": f".far.bin.opf-tmp-{other}{mine}00000002",
            "foreign_new": f".near.bin.opf-tmp-{other}{mine}00000003",
            "not_ours": ".far.bin.opf-tmp",
        }
        for name in names.values():
            (folder / name).write_text("partial")
        old = time.time() - fsatomic.FOREIGN_GRACE - 60
        os.utime(folder / names["foreign_old"], (old, old))
        live_tmp = Path((tmp_path / "live").read_text())
        dead_tmp = Path((tmp_path / "dead").read_text())

        removed = fsatomic.remove_abandoned_temporaries(str(folder))
        assert sorted(removed) == sorted([str(dead_tmp), str(folder / names["legacy"]),
                                          str(folder / names["foreign_old"])])
        left = {p.name for p in folder.iterdir()}
        assert left == {live_tmp.name, names["unlocked_but_running"], names["foreign_new"],
                        names["not_ours"]}
    finally:
        go.touch()
        stop([live, dead])


@pytest.mark.parametrize("name", ["n" * 240 + ".asc", "ä" * 127 + "x", "x" * 255],
                         ids=["244-chars", "255-bytes-utf8", "255-chars"])
def test_long_destination_names_are_copied_atomically(tmp_path, name):
    """A destination name of up to 255 bytes (NAME_MAX) is copied; its temporary's name is cut
    to fit and is still recognised as a temporary."""
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload" * 1000)
    out = tmp_path / "out"
    assert atomic_copy(str(src), str(out / name)) == 7000
    assert (out / name).read_bytes() == src.read_bytes()
    assert os.listdir(out) == [name]
    tmp = fsatomic._temp_path(str(out), name)
    assert len(os.fsencode(os.path.basename(tmp))) <= 255
    assert is_temp_name(tmp)


LONG = """
pipeline longnames
job w {
    output "results" flat
    step s {
        out o = "NAME"
        run sh "echo long > {o}"
    }
}
"""


def test_copy_back_of_a_240_character_output_name(tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    name = "dem_" + "x" * 232 + ".asc"
    assert len(name) == 240
    path = folder / "p.opf"
    path.write_text(LONG.replace("NAME", name))
    code, _, err = finish(start_opf("run", str(path), "-n", "1", "--scratch",
                                 str(tmp_path / "scratch"), cwd=folder))
    assert code == 0, err
    assert (folder / "results" / name).read_text() == "long\n"
    assert not [p for p in (folder / "results").iterdir() if is_temp_name(p.name)]


# -- an engine killed during a copy-back --------------------------------------------------------

BIG = """
pipeline bigcopy
job big for i in range(8) {
    output "results" flat
    step make {
        out o = "big{i}.bin"
        run python -c "import sys; open(sys.argv[1], 'wb').truncate(SIZE)" {o}
    }
}
"""


@pytest.mark.slow
def test_engine_killed_in_a_copy_back_leaves_no_temporary(tmp_path):
    """Each time a copy-back's temporary shows up, the run's processes are frozen; if it is
    still being written, its writer is killed. The run goes on with its other engine and ends
    well, every result is complete, and the killed copy's temporary is gone."""
    size = 32 << 20
    folder = tmp_path / "p"
    folder.mkdir()
    path = folder / "p.opf"
    path.write_text(BIG.replace("SIZE", str(size)))
    results = folder / "results"
    run = start_opf("run", str(path), "-n", "2", "--scratch", str(tmp_path / "scratch"),
                    cwd=folder)
    killed: Path | None = None
    try:
        while killed is None and run.poll() is None:
            try:
                temps = [results / n for n in os.listdir(results) if is_temp_name(n)]
            except FileNotFoundError:
                temps = []
            if not temps:
                time.sleep(0.001)
                continue
            procs = psutil.Process(run.pid).children(recursive=True)
            for proc in procs:
                with contextlib.suppress(psutil.Error):
                    proc.suspend()
            try:
                for proc in procs:
                    with contextlib.suppress(psutil.Error):
                        if any(is_temp_name(f.path) and Path(f.path).parent == results
                               for f in proc.open_files()):
                            killed = next(Path(f.path) for f in proc.open_files()
                                          if is_temp_name(f.path))
                            proc.kill()
                            break
            finally:
                for proc in procs:
                    with contextlib.suppress(psutil.Error):
                        proc.resume()
        assert killed is not None, "no copy-back was caught in the middle"
        code, _, err = finish(run)
    finally:
        stop([run])
    assert code == 0, err
    assert "lost" in err
    assert not killed.exists()
    assert not [p for p in results.iterdir() if is_temp_name(p.name)]
    assert {p.name: p.stat().st_size for p in results.iterdir()} == {
        f"big{i}.bin": size for i in range(8)}
