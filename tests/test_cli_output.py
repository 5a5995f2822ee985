"""What ``opf compile`` writes: whole or not at all, whatever the file names, and a reader that
goes away early ends it quietly.

* ``-o FILE`` is written to a temporary beside FILE and renamed into place, so FILE is never
  seen cut off, also when the disk refuses the write half-way (here: a file size limit);
* a file name that is not UTF-8 (Python holds its bytes as lone surrogates) is written as the
  JSON escape ``\\udcff``, which a JSON reader turns back into that very name;
* ``--json`` is written while the plan is planned, yet a mistake found late (after thousands
  of nodes were written) leaves stdout empty and ``-o FILE`` as it was; only a terminal shows
  the text as it comes;
* ``opf compile --json | head`` ends with the status of a program that SIGPIPE ended (141, as
  ``yes | head``), and prints nothing.

Every case runs ``opf`` as a child process, on real files.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

OPF = [sys.executable, "-m", "opals_dsl"]

GLOB = """\
    job j for f in "data/*.txt" {
        output "results" flat
        step s {
            out o = "{f.stem}.out"
            run cp {f} {o}
        }
    }
"""

MANY = """\
    job tiles for i in range(20000) {
        output "results" flat
        step cut {
            out tif = "{i}.tif"
            run cut {i} {tif}
        }
    }
"""


def pipeline(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "p.opf"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_a_file_name_that_is_not_utf8_is_written_as_json_that_reads_back_to_it(tmp_path: Path):
    path = pipeline(tmp_path, GLOB)
    data = os.fsencode(tmp_path / "data")
    os.mkdir(data)
    for name in (b"a.txt", b"\xff\xfe.txt"):
        with open(os.path.join(data, name), "wb") as f:
            f.write(b"x")
    proc = subprocess.run([*OPF, "compile", "--json", "-o", "plan.json", path.name],
                          cwd=tmp_path, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert b"Traceback" not in proc.stderr
    written = (tmp_path / "plan.json").read_bytes()
    plan = json.loads(written.decode("utf-8"))  # valid UTF-8 text
    files = {os.fsencode(dest) for node in plan["nodes"] if node["kind"] == "copyback"
             for _, dest in node["files"]}
    assert files == {b"results/a.out", b"results/\xff\xfe.out"}

    proc = subprocess.run([*OPF, "compile", "--json", path.name], cwd=tmp_path,
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == written


@pytest.mark.slow
def test_an_output_file_is_complete_or_left_as_it_was(tmp_path: Path):
    path = pipeline(tmp_path, MANY)
    target = tmp_path / "plan.json"
    target.write_text("the plan of yesterday\n")

    def small_files() -> None:  # the disk refuses a file beyond 64 KiB: EFBIG, no signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))

    for fmt in ("--json", "--dot"):
        proc = subprocess.run([*OPF, "compile", fmt, "-o", target.name, path.name],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300,
                              preexec_fn=small_files)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr == "opf: error: cannot write plan.json: File too large; it is left " \
            "as it was\n"
        assert target.read_text() == "the plan of yesterday\n"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["p.opf", "plan.json"]

    proc = subprocess.run([*OPF, "compile", "--json", "-o", target.name, path.name],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(target.read_text())["nodes"]) == 1 + 3 * 20000
    proc = subprocess.run([*OPF, "compile", "--dot", "-o", "no/such/folder/p.dot", path.name],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr == ("opf: error: cannot write no/such/folder/p.dot: No such file or "
                           "directory; it was not written\n")


LATE_CLASH = MANY + """\
    job last for i in range(1) {
        output "results" flat
        step cut {
            out tif = "19999.tif"
            run cut {i} {tif}
        }
    }
"""


def test_a_plan_found_wrong_late_writes_no_json_at_all(tmp_path: Path):
    path = pipeline(tmp_path, LATE_CLASH)
    target = tmp_path / "plan.json"
    target.write_text("the plan of yesterday\n")
    for out in ([], ["-o", target.name]):
        proc = subprocess.run([*OPF, "compile", "--json", *out, path.name], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert "would be copied back to 'results/19999.tif'" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert proc.stdout == ""
        assert target.read_text() == "the plan of yesterday\n"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["p.opf", "plan.json"]


def test_a_terminal_gets_the_json_as_it_is_planned(tmp_path: Path):
    """A terminal keeps nothing a cut text could mislead: it is not spooled, so the plan shows
    as it is planned (here cut by the late mistake, which follows on stderr)."""
    path = pipeline(tmp_path, LATE_CLASH)
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen([*OPF, "compile", "--json", path.name], cwd=tmp_path,
                                stdout=follower, stderr=subprocess.PIPE, text=True)
        os.close(follower)
        shown = b""
        with contextlib.suppress(OSError):  # EIO once the child has closed the terminal
            while chunk := os.read(leader, 1 << 16):
                shown += chunk
        err = proc.communicate(timeout=300)[1]
    finally:
        os.close(leader)
    assert proc.returncode == 2
    assert shown.startswith(b'{"directed":true,"multigraph":false,"graph":{"pipeline":"p"')
    assert b'"id":"stage:tiles/0"' in shown and not shown.rstrip().endswith(b"]}")
    assert "would be copied back to 'results/19999.tif'" in err


def test_a_reader_that_goes_away_ends_opf_quietly(tmp_path: Path):
    path = pipeline(tmp_path, MANY)
    proc = subprocess.Popen([*OPF, "compile", "--json", path.name], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.read(1000).startswith(b'{"directed":true')
        proc.stdout.close()  # as `head -c 1000` does
        err = proc.stderr.read()
        assert proc.wait(timeout=300) == 128 + signal.SIGPIPE
        assert err == b""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_an_output_that_is_a_pipe_or_a_link_is_written_into_not_replaced(tmp_path: Path):
    """``-o`` naming a device or pipe (``/dev/null``, a FIFO, ``/dev/stdout`` on a pipe) writes
    into it: renaming a temporary over it would turn the device into a plain file for every
    program on the machine. A link stays a link; the file it names gets the plan."""
    import threading

    path = pipeline(tmp_path, GLOB.replace('"data/*.txt"', '["a", "b"]').replace("{f}", "{f}.in"))
    fifo = tmp_path / "plan.fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    proc = subprocess.run([*OPF, "compile", "--json", "-o", str(fifo), path.name],
                          cwd=tmp_path, capture_output=True, timeout=120)
    reader.join(timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert fifo.is_fifo(), "the named pipe was replaced by a file"
    assert json.loads(got[0])["graph"]["pipeline"] == "p"
    assert not [p for p in tmp_path.iterdir() if ".opf-tmp-" in p.name]
    if os.path.exists("/dev/stdout"):  # standard output, here a pipe, as a file name
        proc = subprocess.run([*OPF, "compile", "--json", "-o", "/dev/stdout", path.name],
                              cwd=tmp_path, capture_output=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["graph"]["pipeline"] == "p"

    (tmp_path / "real.json").write_text("old")
    (tmp_path / "link.json").symlink_to("real.json")
    proc = subprocess.run([*OPF, "compile", "--json", "-o", "link.json", path.name],
                          cwd=tmp_path, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "link.json").is_symlink()
    assert json.loads((tmp_path / "real.json").read_text())["graph"]["pipeline"] == "p"


# opf with a spool that goes to a temporary file at once, and a file size limit of 100 kB
SMALL_TEMP = textwrap.dedent("""
    import resource, signal, sys
    from opals_dsl.cli import command, main
    command.SPOOL_MEMORY = 1000
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
    sys.exit(main(sys.argv[1:]))
""")


def test_a_temporary_folder_without_room_for_the_text_is_named_with_the_way_out(tmp_path: Path):
    """The JSON for a pipe is held until it is complete; when the temporary folder has no room
    for it, the error says so and how to do without it (-o FILE), and nothing is written."""
    path = pipeline(tmp_path, MANY)
    proc = subprocess.run([sys.executable, "-c", SMALL_TEMP, "compile", "--json", path.name],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("opf: error: the text is held in a temporary file until it is "
                                  "complete, and there is no room for it in ")
    assert ("File too large (the temp folder's disk is full, or a quota or file size limit "
            "was reached); nothing was written." in proc.stderr)
    assert "Write it to a file with -o FILE, or set TMPDIR to a folder with room" in proc.stderr
