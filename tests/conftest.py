"""Shared fixtures: a real ipyparallel cluster whose engines play separate machines, and
pipeline folders with a small tool for the steps to run.

The cluster (session scope) is one ``ipcontroller`` and three ``ipengine`` processes started
here, with a 100 ms heartbeat. Each engine gets its own ``OPF_SCRATCH``: engine processes 0 and
1 share scratch root ``m1`` (two engines on one machine), process 2 has ``m2``. Every process is
stopped at the end of the session — or, should pytest itself be killed, by the cluster's
lifeline (:mod:`opals_dsl.runtime.reaper`) a moment later.
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

REPO = Path(__file__).resolve().parents[1]

# Under CI (the CI variable set, as .ci/run and CI services do) each property test draws the
# same examples on every run, derived from the test itself: a commit's result does not depend
# on the run. Elsewhere every run draws new examples, and hypothesis's database replays the
# ones that failed before.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

#: the example pipelines: files only — running the demo leaves a state folder ``examples/.opf``
#: that a bare ``*.opf`` glob would also match
EXAMPLES = sorted(p for p in (REPO / "examples").glob("*.opf") if p.is_file())

#: the program the test pipelines' steps run (a shared file ``tool`` of each job)
TOOL = textwrap.dedent(
    """
    import os, sys, time

    def main(args):
        cmd = args[0]
        if cmd == "copy":            # copy SRC DST [TEMP...]: DST = "copied:" + SRC's text
            text = open(args[1]).read()
            with open(args[2], "w") as f:
                f.write("copied:" + text)
            for extra in args[3:]:
                with open(extra, "w") as f:
                    f.write("temp")
        elif cmd == "sleepcopy":     # sleepcopy SECONDS SRC DST
            time.sleep(float(args[1]))
            main(["copy", *args[2:]])
        elif cmd == "merge":         # merge OUT IN...: OUT = the inputs' texts, one a line
            with open(args[1], "w") as f:
                for path in args[2:]:
                    f.write(open(path).read().strip() + "\\n")
        elif cmd == "fail":          # fail CODE: print something and exit with CODE
            print("about to fail")
            print("the input was unreadable")
            sys.exit(int(args[1]))
        elif cmd == "failon":        # failon NAME CODE SRC DST: fail for inputs named NAME*
            if os.path.basename(args[3]).startswith(args[1]):
                main(["fail", args[2]])
            main(["copy", *args[3:]])
        elif cmd == "slowon":        # slowon NAME SECONDS SRC DST: sleep for inputs named NAME*
            if os.path.basename(args[3]).startswith(args[1]):
                time.sleep(float(args[2]))
            main(["copy", *args[3:]])
        elif cmd == "failonce":      # failonce MARKER SRC DST: fail unless MARKER exists
            if not os.path.exists(args[1]):
                open(args[1], "w").close()
                print("first attempt fails")
                sys.exit(5)
            main(["copy", *args[2:]])
        elif cmd == "pidfile":       # pidfile FOLDER SECONDS SRC DST: FOLDER/<engine pid>
            tmp = os.path.join(args[1], f".{os.getppid()}")
            with open(tmp, "w") as f:
                f.write(str(os.getpid()))  # holds the step's own pid
            os.replace(tmp, os.path.join(args[1], str(os.getppid())))
            time.sleep(float(args[2]))
            main(["copy", *args[3:]])
        else:
            sys.exit("unknown command " + cmd)

    main(sys.argv[1:])
    """
)


def write_pipeline(folder: Path, text: str, *, inputs: int = 3, name: str = "p.opf") -> Path:
    """A pipeline folder: ``tool.py``, ``data/s1.txt`` … and the pipeline file; its path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tool.py").write_text(TOOL, encoding="utf-8")
    data = folder / "data"
    data.mkdir(exist_ok=True)
    for i in range(1, inputs + 1):
        (data / f"s{i}.txt").write_text(f"strip {i}\n", encoding="utf-8")
    path = folder / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# -- a cluster of separate processes -----------------------------------------------------------


@dataclass
class EngineCluster:
    """A controller and engines started by the tests; ``client_file`` connects to it."""

    root: Path
    profile_dir: Path
    cluster_id: str
    env: dict[str, str]
    controller: subprocess.Popen | None = None
    engines: list[subprocess.Popen] = field(default_factory=list)
    scratches: list[Path] = field(default_factory=list)
    #: the lifeline that stops the cluster should pytest be killed
    reaper: subprocess.Popen | None = None

    def _file(self, kind: str) -> Path:
        middle = f"-{self.cluster_id}" if self.cluster_id else ""
        return self.profile_dir / "security" / f"ipcontroller{middle}-{kind}.json"

    @property
    def client_file(self) -> Path:
        return self._file("client")

    @property
    def engine_file(self) -> Path:
        return self._file("engine")

    def _id_args(self) -> list[str]:
        args = [f"--profile-dir={self.profile_dir}"]
        return args + ([f"--cluster-id={self.cluster_id}"] if self.cluster_id else [])

    def _lifeline(self, proc: subprocess.Popen) -> None:
        """Hand ``proc`` to the cluster's lifeline (:mod:`opals_dsl.runtime.reaper`), which
        ends it and its descendants should pytest die before :meth:`stop` (``kill -9``)."""
        import psutil

        if self.reaper is None:
            self.reaper = subprocess.Popen(
                [sys.executable, "-m", "opals_dsl.runtime.reaper", "run"],
                stdin=subprocess.PIPE, start_new_session=True)
        created = psutil.Process(proc.pid).create_time()
        self.reaper.stdin.write(json.dumps({"pid": proc.pid, "created": created}).encode()
                                + b"\n")
        self.reaper.stdin.flush()

    def start_controller(self) -> None:
        self.controller = subprocess.Popen(
            [sys.executable, "-m", "ipyparallel.controller", *self._id_args(), "--ip=127.0.0.1",
             "--HeartMonitor.period=100", "--log-level=WARN"],
            env=self.env, cwd=self.root, stdout=subprocess.DEVNULL,
            stderr=open(self.root / "controller.log", "ab"),  # noqa: SIM115
            start_new_session=True,
        )
        self._lifeline(self.controller)
        deadline = time.monotonic() + 30
        while not (self.client_file.exists() and self.engine_file.exists()):
            if self.controller.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the test controller did not start: "
                                   + (self.root / "controller.log").read_text())
            time.sleep(0.05)

    def start_engine(self, scratch: Path) -> subprocess.Popen:
        """Start one engine whose scratch root (its "machine") is ``scratch``."""
        scratch.mkdir(parents=True, exist_ok=True)
        env = dict(self.env, OPF_SCRATCH=str(scratch))
        proc = subprocess.Popen(
            [sys.executable, "-m", "ipyparallel.engine", *self._id_args(), "--log-level=WARN"],
            env=env, cwd=self.root, stdout=subprocess.DEVNULL,
            stderr=open(self.root / f"engine-{len(self.engines)}.log", "ab"),  # noqa: SIM115
            start_new_session=True,
        )
        self._lifeline(proc)
        self.engines.append(proc)
        self.scratches.append(scratch)
        return proc

    def client(self):
        import ipyparallel as ipp

        return ipp.Client(str(self.client_file), timeout=30)

    def wait_for_engines(self, n: int) -> None:
        client = self.client()
        try:
            client.wait_for_engines(n, timeout=60)
        finally:
            client.close()

    def engine_ids_by_pid(self) -> dict[int, int]:
        client = self.client()
        try:
            pids = client[:].apply_sync(os.getpid)
            return dict(zip(pids, client.ids, strict=True))
        finally:
            client.close()

    def stop(self) -> None:
        procs = [p for p in self.engines if p.poll() is None]
        if self.controller is not None and self.controller.poll() is None:
            procs.append(self.controller)
        import psutil

        children = []
        for proc in procs:  # the engines' nannies and the controller's schedulers
            with contextlib.suppress(psutil.Error):
                children += psutil.Process(proc.pid).children(recursive=True)
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.kill()
        if self.reaper is not None:  # everything is stopped: the lifeline ends quietly
            with contextlib.suppress(OSError):
                self.reaper.stdin.write(b"done\n")
                self.reaper.stdin.close()
            self.reaper.wait()
            self.reaper = None


@contextlib.contextmanager
def engines_on_machines(root: Path, profile: str,
                        machines: Sequence[str]) -> Iterator[EngineCluster]:
    """A controller and an engine per entry of ``machines``, the name of its scratch root
    under ``<root>/scratch`` (engines of one name play one machine); the profile ``profile``
    in ``<root>/ipython`` (``IPYTHONDIR``). Stopped at the end, also when the start fails."""
    env = dict(os.environ, IPYTHONDIR=str(root / "ipython"))
    env.pop("OPF_SCRATCH", None)
    tc = EngineCluster(root=root, profile_dir=root / "ipython" / f"profile_{profile}",
                       cluster_id="", env=env)
    try:
        tc.start_controller()
        for name in machines:
            tc.start_engine(root / "scratch" / name)
        tc.wait_for_engines(len(machines))
        yield tc
    finally:
        tc.stop()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineCluster]:
    """Three engines: two share the scratch root ``m1`` (one machine), one has ``m2``.

    The profile is ``opftest`` in ``<root>/ipython`` (``IPYTHONDIR``), so ``--profile opftest``
    finds it as well as ``--cluster-file``.
    """
    with engines_on_machines(tmp_path_factory.mktemp("cluster"), "opftest",
                             ("m1", "m1", "m2")) as tc:
        yield tc


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def read_json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def last_run(state: Path) -> Path:
    """The records folder of the run that started last in a state folder (any pipeline):
    ``runs/<pipeline>/<N>/``."""
    folders = [p for p in (state / "runs").glob("*/*") if p.name.isdigit()]
    assert folders, f"no run recorded in {state}"
    return max(folders, key=lambda p: (
        json.loads((p / "run.json").read_text(encoding="utf-8"))["started"], int(p.name)))


def trace_rows(state: Path) -> list[dict]:
    """The trace of the last run recorded in a state folder."""
    return read_json_lines(last_run(state) / "trace.jsonl")


def process_gone(pid: int, wait: float = 15.0) -> bool:
    """True once process ``pid`` has ended (a zombie counts as ended) within ``wait`` s."""
    import psutil

    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def launch_lifeline(driver: subprocess.Popen) -> Any:
    """The lifeline (psutil) of the cluster an ``opf run`` launched elsewhere: its child that
    runs :func:`opals_dsl.runtime.batch.lifeline_main`."""
    import psutil

    found = [child for child in psutil.Process(driver.pid).children()
             if "lifeline_main" in " ".join(child.cmdline())]
    assert len(found) == 1, f"opf run {driver.pid} has {len(found)} launch lifelines"
    return found[0]


def kill_run_and_its_lifeline(driver: subprocess.Popen) -> None:
    """``kill -9`` of an ``opf run`` and of its launched cluster's lifeline (first, so that it
    never sees its run die): what a crash of the machine opf runs on leaves behind."""
    try:
        lifeline = launch_lifeline(driver)
        lifeline.kill()
        assert process_gone(lifeline.pid)  # a zombie until opf reaps it or dies
    finally:
        driver.kill()
        driver.wait()
