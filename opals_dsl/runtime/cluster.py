"""Clusters: the ipyparallel side of ``opf run`` — finding engines, and talking to them.

In: how the user wants to run (:class:`ClusterOptions`: an embedded cluster of ``engines``
engines, or an existing one by ``profile`` or connection file) and the run's state folder. Out:
an :class:`~opals_dsl.runtime.executor.IPyParallelExecutor`, the executor the scheduler submits
batches of task requests to, one engine at a time (:mod:`.connect` opens one of each kind).

Embedded cluster
    ``ipp.Cluster`` with one controller and N local engines. ipyparallel's files (IPYTHONDIR,
    the profile, connection files and logs) live in ``<state>/ipython``, never in the user's
    home. The engines are launched together with the controller and wait for its connection
    files themselves (ipyparallel would launch them only once the files exist, half a second
    and more later). The hub's heartbeat runs every 100 ms (start-up waits for the first
    beats, so this is what makes a cold start take about a second rather than six); it
    declares an engine lost after 5 s without an answer. The engines tolerate a silent hub for
    a minute. Every process
    of the cluster carries the run's id in its environment (``OPF_RUN_ID``, as the steps do).
    The processes of the cluster (with their creation times, which rules out a reused process
    id) are written to ``<state>/cluster.json`` while it runs, and told to the run's lifeline
    (:mod:`opals_dsl.runtime.reaper`), which ends the cluster within seconds if this process dies
    without stopping it (``kill -9``); a run that finds the file — its run and its lifeline
    were killed — stops those processes, and every process carrying that run's id, first. A
    start that is interrupted (Ctrl-C) stops between two of ipyparallel's steps, never inside
    its event loop. On the way out, steps still running (an interrupted run gives them a few
    seconds after SIGINT) are killed with their process groups, and then every process of the
    run at once — ipyparallel's own stop, which waits for one process after the other, took
    half a second and more, and the cluster keeps nothing worth a goodbye; its connection
    files and logs are removed. The start and the stop are marked on a
    :class:`~opals_dsl.runtime.timeline.Timeline` (``opf run -v``).

Engines started elsewhere (``--engines ssh:HOST[:N],...``, ``slurm``, ``pbs``, ``mpi``)
    A controller here and engines started by ipyparallel's launchers: :mod:`.launchers`.

Existing cluster (``--profile NAME`` or ``--cluster-file PATH``)
    Only a client is opened (the connection file is passed positionally: ipyparallel ignores
    ``url_file=``); the controller and engines are left running at the end.

Engines
    Before work starts every engine runs :func:`prepare_engine` once: ANSI colours are turned
    off in its tracebacks, :mod:`opals_dsl.runtime.engine` is imported and the engine says who and
    where it is (host, scratch root, machine). Work is sent to one engine through its own
    DirectView, so the scheduler chooses the engine. The function shipped is :data:`RUN_TASKS`, an
    :class:`EngineCall` that pickles *by name* (≈300 bytes per message, 6 µs to pack); a
    module-level function would travel as its code object (≈1.6 kB, 60 µs), and would run the
    driver's copy of the code rather than the engine's installed one.

Lost engines
    :meth:`IPyParallelExecutor.discard` kills a lost engine that still runs on this machine (same
    process id and creation time as when it was identified), unless the controller itself is
    out of reach. Replies to requests the client no longer waits for (an engine taken for lost
    that comes back) are dropped, rather than printed by ipyparallel as "stale results".

Memory
    A consumed result is dropped from the client's caches at once; every few hundred messages
    the client's and the views' history lists are cleared and the hub is asked to forget the
    results it still keeps, so a run of 100,000 tasks keeps a flat footprint.

Failures to start or reach a cluster raise :class:`opals_dsl.errors.ClusterError` (exit 3).
Engines import this module to unpickle an :class:`EngineCall`, so at the top it imports only the
standard library and opf modules that do the same (ipyparallel and psutil are imported where
used).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .batch import stop_leftover_launch
from .fsatomic import write_atomic
from .reaper import MARKER, end_run, live_processes
from .steps import environment
from .timeline import NoTimeline, Timeline

#: heartbeat of the embedded controller (ms); start-up takes a few beats
HEARTBEAT_MS = 100
#: beats an engine may miss before the hub drops it (50 × 100 ms = 5 s)
HEARTBEAT_MISSES = 50
#: checks without a ping from the hub after which an engine shuts itself down: an engine
#: checks every heartbeat + 500 ms (ipyparallel's rule), so 100 × 600 ms = 1 min
ENGINE_HEARTBEAT_MISSES = 60_000 // (HEARTBEAT_MS + 500)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ClusterOptions:
    """Where to run: an embedded cluster of ``engines`` engines (None: one per core), or an
    existing cluster named by ``profile`` or by its client connection file ``cluster_file``,
    or engines that opf starts elsewhere (``launch``,
    :class:`~opals_dsl.runtime.launch_options.LaunchOptions`).
    ``timeout`` bounds connecting and waiting for engines (seconds)."""

    engines: int | None = None
    profile: str | None = None
    cluster_file: str | None = None
    timeout: float = 30.0
    launch: Any = None

    @property
    def embedded(self) -> bool:
        return self.profile is None and self.cluster_file is None


# -- the embedded cluster --------------------------------------------------------------------


def process_record(proc: Any) -> dict[str, Any] | None:
    try:
        return {"pid": proc.pid, "created": proc.create_time()}
    except Exception:
        return None


def kill_processes(procs: list[Any]) -> None:
    import psutil

    for proc in procs:  # SIGKILL is not refused; no need to wait for the zombies' reaping
        with contextlib.suppress(psutil.Error):
            proc.kill()


def stop_leftover_cluster(state_dir: str | Path) -> bool:
    """Stop the embedded cluster an earlier, killed run recorded in ``state_dir``; True if any
    of its processes were still running (and the same for engines it started elsewhere)."""
    launched = stop_leftover_launch(state_dir)
    record = Path(state_dir) / "cluster.json"
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return launched
    except (OSError, ValueError):
        data = {}
    if not isinstance(data, dict):
        data = {}
    procs = end_run(data.get("processes") or [], data.get("run_id"), grace=3.0)
    profile_dir = data.get("profile_dir")
    cluster_id = data.get("cluster_id")
    if profile_dir and cluster_id:
        security = Path(profile_dir) / "security"
        for name in (f"cluster-{cluster_id}.json", f"ipcontroller-{cluster_id}-client.json",
                     f"ipcontroller-{cluster_id}-engine.json"):
            with contextlib.suppress(OSError):
                (security / name).unlink()
    with contextlib.suppress(OSError):
        record.unlink()
    return bool(procs) or launched


@contextlib.contextmanager
def using_ipython_dir(path: Path | None) -> Iterator[None]:
    """Point IPYTHONDIR at ``path`` for the duration (ipyparallel and its children read it)."""
    if path is None:
        yield
        return
    path.mkdir(parents=True, exist_ok=True)
    with environment({"IPYTHONDIR": str(path)}):
        yield


class EmbeddedCluster:
    """A controller and ``n`` engines on this machine, owned by this run.

    Every process of the cluster carries the run's ``run_id`` in its environment
    (``OPF_RUN_ID``, which the run's steps carry too), and is told to the run's lifeline
    (:mod:`opals_dsl.runtime.reaper`): a small process that ends them all should this process die
    without stopping them. ``interrupted`` is asked while the cluster starts; when it says
    True, the start stops with KeyboardInterrupt (raised here, never inside ipyparallel's event
    loop). ``count``, if given, is asked for the number of engines once the controller is
    launched (it may wait for the run's decision of what is to run).
    """

    def __init__(self, state_dir: Path, n: int, timeout: float, run_id: str | None = None,
                 interrupted: Callable[[], bool] | None = None,
                 timeline: Timeline | None = None,
                 count: Callable[[], int] | None = None) -> None:
        self.state_dir = state_dir
        #: asked, once the controller is launched, how many engines to start (instead of n)
        self.count = count
        self.timeline = timeline or NoTimeline()
        #: when the controller and the engines were launched (the timeline's clock)
        self.launched_at = 0.0
        self.n = n
        self.timeout = timeout
        self.run_id = run_id
        self.interrupted = interrupted
        self.ipython_dir = state_dir / "ipython"
        self.profile_dir = self.ipython_dir / "profile_opf"
        self.record = state_dir / "cluster.json"
        self.cluster: Any = None
        self.client: Any = None
        self._procs: list[dict[str, Any]] = []
        self._lifeline: subprocess.Popen | None = None

    def _check(self) -> None:
        if self.interrupted is not None and self.interrupted():
            raise KeyboardInterrupt

    def start(self) -> Any:
        began = self.timeline.now()
        import ipyparallel as ipp
        import psutil

        stop_leftover_cluster(self.state_dir)
        self._check()
        self._start_lifeline()
        cluster_id = f"opf-{os.getpid()}-{secrets.token_hex(3)}"
        logger = logging.getLogger(f"{__name__}.ipyparallel")
        logger.propagate = False
        if not logger.handlers:
            logger.addHandler(logging.NullHandler())
        self.cluster = ipp.Cluster(
            n=self.n, profile_dir=str(self.profile_dir), cluster_id=cluster_id, delay=0,
            controller_args=[
                "--ip=127.0.0.1", "--log-level=WARN",
                f"--HeartMonitor.period={HEARTBEAT_MS}",
                f"--HeartMonitor.max_heartmonitor_misses={HEARTBEAT_MISSES}",
            ],
            engine_timeout=int(max(1, self.timeout)), log=logger, load_profile=False,
            send_engines_connection_env=False, shutdown_atexit=False,
        )
        self.cluster.start_controller_sync()
        self._remember(cluster_id, [self.cluster.controller.process])
        self._check()
        if self.count is not None:
            self.n = self.count()
            self.cluster.n = self.n
        # the engines' arguments go to their launcher (ipp.Cluster ignores engine_args=)
        self.cluster.start_engines_sync(self.n, engine_args=[
            "--log-level=WARN", f"--IPEngine.max_heartbeat_misses={ENGINE_HEARTBEAT_MISSES}",
            f"--IPEngine.wait_for_url_file={max(1.0, self.timeout)}"])
        engines = [launcher.process for es in self.cluster.engines.values()
                   for launcher in es.launchers.values()]
        self._remember(cluster_id, engines)
        self.launched_at = self.timeline.now()
        self.timeline.mark("cluster start", began, self.launched_at,
                           f"lifeline, controller and {self.n} engine"
                           f"{'s' if self.n != 1 else ''} launched")
        self._check()
        self.client = self.cluster.connect_client_sync()
        waiting = self.client.wait_for_engines(self.n, timeout=self.timeout, block=False)
        while True:
            self._check()
            try:
                waiting.result(timeout=0.1)
                break
            except TimeoutError:
                if waiting.done():
                    raise
        tree = []
        for proc in [self.cluster.controller.process, *engines]:
            with contextlib.suppress(psutil.Error):
                tree.extend(proc.children(recursive=True))
        self._remember(cluster_id, tree)
        return self.client

    def _start_lifeline(self) -> None:
        """The run's lifeline: ends the cluster if this process dies without stopping it."""
        env = {k: v for k, v in os.environ.items() if k != MARKER}
        reaper = Path(__file__).with_name("reaper.py")
        try:
            self._lifeline = subprocess.Popen(
                [sys.executable, str(reaper), "run"], stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                start_new_session=True,
            )
        except OSError:
            self._lifeline = None
            return
        if self.run_id:
            self._tell({"marker": self.run_id})

    def _tell(self, item: dict[str, Any] | None) -> None:
        proc = self._lifeline
        if proc is None or proc.stdin is None:
            return
        try:
            proc.stdin.write((json.dumps(item) + "\n" if item is not None else "done\n")
                             .encode())
            proc.stdin.flush()
        except OSError:
            pass

    def output_tail(self, lines: int = 8) -> str:
        """The last lines the controller and the engines wrote (for a failed start)."""
        if self.cluster is None:
            return ""
        launchers = [("controller", self.cluster.controller)]
        for es in self.cluster.engines.values():
            launchers += [(f"engine {i}", la) for i, la in getattr(es, "launchers", {}).items()]
        parts = []
        for name, launcher in launchers:
            with contextlib.suppress(Exception):
                text = (launcher.get_output() or "").strip()
                if text:
                    tail = "\n".join("  | " + ln for ln in text.splitlines()[-lines:])
                    parts.append(f"{name} said:\n{tail}")
        return "\n".join(parts)

    def _remember(self, cluster_id: str, procs: Iterable[Any]) -> None:
        for proc in procs:
            rec = process_record(proc)
            if rec is not None:
                self._procs.append(rec)
                self._tell(rec)
        data = {"cluster_id": cluster_id, "profile_dir": str(self.profile_dir),
                "driver": os.getpid(), "run_id": self.run_id, "processes": self._procs}
        write_atomic(str(self.record), json.dumps(data, indent=1).encode("utf-8"))

    def stop(self) -> None:
        # steps still running (an interrupt that did not reach them in time) are children of
        # the engines, each leading a process group: end them first, so that the engines are
        # free to exit when told
        ours = {rec["pid"] for rec in self._procs}
        leftovers = [p for p in live_processes(self._procs) if p.pid not in ours]
        for proc in leftovers:
            with contextlib.suppress(OSError):
                if os.getpgid(proc.pid) == proc.pid:
                    os.killpg(proc.pid, 9)
        kill_processes(leftovers)
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close(linger=0)
            self.client = None
        # the cluster keeps no state worth a goodbye (its hub's records live in memory), and
        # ipyparallel's own stop waits for each process to exit in turn (half a second and
        # more): every process of the run — controller, engines, their nannies and
        # lifelines, steps a busy engine was running — is ended at once instead
        end_run(self._procs, self.run_id, grace=0.0)
        with contextlib.suppress(OSError):
            self.record.unlink()
        if self.cluster is not None:
            self._remove_files(self.cluster.cluster_id)
        self.cluster = None
        if self._lifeline is not None:
            self._tell(None)  # done: nothing for it to end
            with contextlib.suppress(OSError):
                if self._lifeline.stdin is not None:
                    self._lifeline.stdin.close()
            try:
                self._lifeline.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._lifeline.kill()
                self._lifeline.wait()
            self._lifeline = None

    def _remove_files(self, cluster_id: str) -> None:
        """ipyparallel's files of the cluster: its connection files and logs."""
        security = self.profile_dir / "security"
        for name in (f"cluster-{cluster_id}.json", f"ipcontroller-{cluster_id}-client.json",
                     f"ipcontroller-{cluster_id}-engine.json"):
            with contextlib.suppress(OSError):
                (security / name).unlink()
        folder = self.profile_dir / "log"
        with contextlib.suppress(OSError):
            for entry in os.scandir(folder):
                if cluster_id in entry.name or entry.name.startswith("engines"):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
