"""Engines that ``opf run`` starts elsewhere: over SSH, or through Slurm, PBS or MPI.

In: ``--engines ssh:HOST[:N],...`` / ``slurm`` / ``pbs`` / ``mpi`` with ``-n N`` and the options
a launcher needs (:func:`add_arguments`, :func:`launch_options`). Out: the ipyparallel client of
a cluster this run owns — a controller here and engines there — which
:func:`opals_dsl.runtime.connect.open_cluster` hands to its executor like any other
(:func:`launched`).

The engines are started by ipyparallel's own launchers (``ipyparallel.Cluster(engines=KIND)``
with ``SSHEngineSetLauncher``, ``SlurmEngineSetLauncher``, ``PBSEngineSetLauncher``,
``MPIEngineSetLauncher``); opf chooses their settings, starts them, waits, and stops them.

The controller
    runs here, with the embedded cluster's heartbeat (a lost engine is noticed within about five
    seconds). It listens on ``--controller-ip`` if given. Otherwise, for SSH, on this machine's
    address towards the hosts (the source address the kernel picks for each host's address, as
    ``ssh -G`` resolves it; if the hosts are reached from different addresses, on every
    interface, telling the engines this machine's name); for Slurm, PBS and MPI, on every
    interface, telling the engines this machine's fully qualified name. The engines get the
    connection (addresses, ports, key) in their environment (``$IPP_CONNECTION_INFO``), so no
    connection file has to travel.

SSH
    Before anything starts, every host is asked in parallel over SSH (``BatchMode=yes``, a
    connect timeout of at most 10 s) for its number of cores, with the engines' Python
    importing ipyparallel and opf: a host that cannot be reached, has no such Python or no opf,
    stops the run with exit 3 and names the host and what ssh or Python said. ``HOST`` without
    ``:N`` gets one engine per core it has. Engines are then started in parallel (at most
    :data:`PER_HOST` at once per host, so that sshd's limit on unauthenticated connections is
    never hit), each by ipyparallel's SSH launcher: one engine set per engine. ipyparallel's
    files on a host live in ``/tmp/<cluster id>`` (``opf-<pid>-<random>``), removed at the
    end. ``--ssh-config FILE``
    is passed to ssh and scp as ``-F FILE`` (host aliases, users, keys, ports); ``USER@HOST``
    works too. ``--remote-python`` (default: this Python's path, right for a venv on the shared
    drive) is the engines' interpreter.

Slurm and PBS
    One batch job of N engines (``--partition``, ``--account``, ``--time-limit``); its script is
    written to ``<state>/ipython/`` and its output to the profile's log folder. The job id is
    recorded at once, so that a later run stops a job a killed run left behind. At the end the
    job is cancelled and opf waits (up to :data:`BATCH_GONE_WAIT` s) until the queue no longer
    shows it.

MPI
    ``mpiexec -n N python -m ipyparallel.engine --mpi`` here (the engines need mpi4py);
    ``mpiexec``'s options (a host file) go into a ``--launcher-config`` file.

Any other launcher setting: ``--launcher-config FILE``, an ipyparallel configuration file
(``ipcluster_config.py`` or ``.json``: ``c.SlurmEngineSetLauncher.qos = "long"``,
``c.SSHEngineSetLauncher.environment = {...}``, ``c.MPIEngineSetLauncher.mpi_args = [...]``);
the flags above win over it.

Waiting
    for the engines to register, with a line of progress each time their number changes (and the
    batch job's state while it waits in the queue), until all N are there or ``--timeout``
    passes (default here: :data:`DEFAULT_TIMEOUT` s, since logins and queues take longer than a
    local start). At the timeout, a run with some engines goes on with them (the others join when
    they come); a run with none stops with exit 3, the launcher's output and what to check.

Stopping
    however the run ends (done, error, Ctrl-C, SIGTERM): starts still under way are awaited;
    the engine sets and the controller are stopped by their launchers and the remote folders
    removed, all at once; a batch job is cancelled; and what is left of the local processes
    (the controller, ssh sessions) is killed. Ctrl-C while stopping is held back until
    the stop is done. What the run started is recorded in ``<state>/launched.json`` as it
    starts (the engines over SSH, each with host, ssh command and process id; the controller;
    the batch job). A run killed with ``kill -9`` leaves it behind, and its lifeline
    (:func:`opals_dsl.runtime.batch.start_lifeline`) then ends those engines, stops the
    controller and cancels the job within seconds. Should the lifeline be gone too, the next
    run in that state folder does it, before it looks at what to run. An engine on a host
    neither can reach stops by itself once it has missed its controller's heartbeat for a
    minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ClusterError
from .batch import (
    BATCH_GONE_WAIT,
    RECORD,
    batch_state,
    end_lifeline,
    ended_early,
    remove_launch_files,
    start_lifeline,
    stop_leftover_launch,
    wait_batch_gone,
)
from .cluster import (
    ENGINE_HEARTBEAT_MISSES,
    HEARTBEAT_MISSES,
    HEARTBEAT_MS,
    ClusterOptions,
    kill_processes,
    process_record,
    using_ipython_dir,
)
from .executor import IPyParallelExecutor, describe_error
from .fsatomic import write_atomic
from .launch_options import PER_HOST, LaunchOptions, check_hint
from .reaper import live_processes
from .ssh import (
    check_local_address,
    end_cluster_on,
    engine_record,
    last_lines,
    machine_name,
    probe_host,
    quiet_ssh_waits,
    source_address,
    ssh_address,
    ssh_base,
    ssh_hint,
)
from .stderr import stderr_captured
from .timeline import Timeline

#: the commands a launcher needs on this machine
_TOOLS = {"ssh": ("ssh",), "slurm": ("sbatch", "squeue", "scancel"),
          "pbs": ("qsub", "qstat", "qdel"), "mpi": ("mpiexec",)}


log = logging.getLogger(__name__)


# -- the cluster ---------------------------------------------------------------------------


@dataclass
class _Start:
    """One engine set being started: its id, what it is (for messages), its future."""

    set_id: str
    what: str
    future: Future | None = None


@dataclass
class LaunchedCluster:
    """A controller here and engines elsewhere, owned by this run."""

    options: LaunchOptions
    state_dir: Path
    timeout: float
    say: Callable[[str], None]
    #: the engines the run needs, once known (a host without ``:N`` starts no more)
    needed: Callable[[], int | None] = lambda: None
    cluster: Any = None
    client: Any = None
    cluster_id: str = ""
    expected: int = 0
    started_in: float | None = None
    _procs: list[dict[str, Any]] = field(default_factory=list)
    _ssh_engines: list[dict[str, Any]] = field(default_factory=list)
    _recording: Any = field(default_factory=threading.RLock)
    _starts: list[_Start] = field(default_factory=list)
    _pool: ThreadPoolExecutor | None = None
    _cancelled: threading.Event = field(default_factory=threading.Event)
    _hosts: list[str] = field(default_factory=list)
    _job: dict[str, Any] | None = None
    _t0: float = 0.0

    @property
    def ipython_dir(self) -> Path:
        return self.state_dir / "ipython"

    @property
    def profile_dir(self) -> Path:
        return self.ipython_dir / "profile_opf"

    @property
    def record(self) -> Path:
        return self.state_dir / RECORD

    @property
    def python(self) -> str:
        return self.options.python or sys.executable

    @property
    def remote_dir(self) -> str:
        return f"/tmp/{self.cluster_id}"

    # starting

    def start(self) -> Any:
        import ipyparallel as ipp

        opts = self.options
        self._t0 = time.monotonic()
        deadline = self._t0 + self.timeout
        self.cluster_id = f"opf-{os.getpid()}-{secrets.token_hex(3)}"
        config = self._config()
        for tool in _TOOLS.get(opts.kind, ()):
            if shutil.which(tool) is None:
                raise ClusterError(
                    f"could not start engines with {opts.kind}: {tool} is not installed on "
                    f"this machine (or not on PATH); run opf where {opts.kind}'s commands "
                    f"work, e.g. on a login node")
        if opts.controller_ip and opts.controller_ip != "*":
            check_local_address(opts.controller_ip)  # before any host is asked
        engines: dict[str, int] = {}
        if opts.kind == "ssh":
            engines = self._probe_hosts(deadline)
        ip, location = self._controller_address()
        logger = logging.getLogger(f"{__name__}.ipyparallel")
        logger.propagate = False
        if not logger.handlers:
            logger.addHandler(logging.NullHandler())
        self.cluster = ipp.Cluster(
            engines=opts.kind, profile_dir=str(self.profile_dir), cluster_id=self.cluster_id,
            controller_ip=ip, controller_location=location, delay=0, cluster_file="",
            controller_args=[
                "--log-level=WARN",
                f"--HeartMonitor.period={HEARTBEAT_MS}",
                f"--HeartMonitor.max_heartmonitor_misses={HEARTBEAT_MISSES}",
            ],
            engine_timeout=int(max(1, self.timeout)), log=logger, load_profile=False,
            config=config, shutdown_atexit=False,
        )
        self.cluster.start_controller_sync()
        self._remember([self.cluster.controller.process])
        self.client = self.cluster.connect_client_sync()
        where = ip if ip != "*" else f"every interface (engines connect to {location})"
        if opts.kind == "ssh":
            self.expected = sum(engines.values())
            self.say(f"controller listening on {where}; starting {self._count(self.expected)} "
                     f"over SSH: " + ", ".join(f"{h} ({k})" for h, k in engines.items()))
            self._start_ssh(engines)
        else:
            self.expected = opts.n or os.cpu_count() or 1
            self.say(f"controller listening on {where}; starting "
                     f"{self._count(self.expected)} with {opts.kind}")
            self._start_set(self.expected)
        self._wait(deadline)
        return self.client

    @staticmethod
    def _count(n: int) -> str:
        return f"{n} engine{'s' if n != 1 else ''}"

    def _probe_hosts(self, deadline: float) -> dict[str, int]:
        opts = self.options
        wait = max(1.0, deadline - time.monotonic())
        names = [h for h, _ in opts.hosts]
        self.say(f"asking {', '.join(names) if len(names) <= 8 else f'{len(names)} hosts'} "
                 f"over SSH for their cores and the engines' Python")
        with ThreadPoolExecutor(max_workers=min(16, len(opts.hosts))) as pool:
            probes = list(pool.map(
                lambda h: probe_host(h[0], opts, self.python, wait, self.remote_dir),
                opts.hosts))
        self._hosts = [p.host for p in probes if not p.problem]  # their folders go at the end
        problems = [p.problem for p in probes if p.problem]
        if problems:
            raise ClusterError("\n".join(problems))
        need = self.needed()
        return {host: n if n is not None else min(probe.cores or 1, need or probe.cores or 1)
                for (host, n), probe in zip(opts.hosts, probes, strict=True)}

    def _controller_address(self) -> tuple[str, str]:
        opts = self.options
        if opts.controller_ip:
            if opts.controller_ip == "*":
                return "*", machine_name()
            return opts.controller_ip, opts.controller_ip
        if opts.kind == "ssh":
            sources = set()
            for host, _ in opts.hosts:
                address = ssh_address(host, opts)
                sources.add(source_address(address) if address else None)
            if len(sources) == 1 and None not in sources:
                only = sources.pop()
                assert only is not None
                return only, only
        return "*", machine_name()

    def _config(self) -> Any:
        from traitlets.config import Config

        opts = self.options
        config = Config()
        if opts.config_file:
            config.merge(_load_config(opts.config_file))
        flags = Config()
        flags.EngineLauncher.engine_args = [
            "--log-level=WARN", f"--IPEngine.max_heartbeat_misses={ENGINE_HEARTBEAT_MISSES}"]
        engine_cmd = [self.python, "-m", "ipyparallel.engine"]
        if opts.kind == "ssh":
            base = ssh_base(opts, self.timeout)
            flags.SSHEngineSetLauncher.remote_python = self.python
            flags.SSHEngineSetLauncher.engine_cmd = engine_cmd
            flags.SSHEngineSetLauncher.ssh_args = base
            flags.SSHEngineSetLauncher.scp_args = base
            flags.SSHEngineSetLauncher.remote_profile_dir = self.remote_dir
            # the connection travels in $IPP_CONNECTION_INFO: no file to copy
            flags.SSHEngineLauncher.to_send = []
        elif opts.kind == "slurm":
            s = flags.SlurmEngineSetLauncher
            s.engine_cmd = engine_cmd
            s.batch_file_name = str(self.ipython_dir / f"{self.cluster_id}.sbatch")
            if opts.partition:
                s.queue = opts.partition
            if opts.account:
                s.account = opts.account
            if opts.time_limit:
                s.timelimit = opts.time_limit
        elif opts.kind == "pbs":
            s = flags.PBSEngineSetLauncher
            s.engine_cmd = engine_cmd
            s.batch_file_name = str(self.ipython_dir / f"{self.cluster_id}.pbs")
            if opts.partition:
                s.queue = opts.partition
        elif opts.kind == "mpi":
            flags.MPIEngineSetLauncher.engine_cmd = engine_cmd
        config.merge(flags)
        return config

    def _start_ssh(self, engines: dict[str, int]) -> None:
        self._pool = ThreadPoolExecutor(max_workers=min(16, sum(engines.values())),
                                        thread_name_prefix="opf-ssh-start")
        limits = {host: threading.Semaphore(PER_HOST) for host in engines}
        k = 0
        for host, count in engines.items():
            for i in range(count):
                start = _Start(f"e{k}", f"engine {i + 1} on {host}")
                k += 1

                def run(start: _Start = start, host: str = host) -> None:
                    with limits[host]:
                        if self._cancelled.is_set():
                            return
                        self.cluster.start_engines_sync(1, engine_set_id=start.set_id,
                                                        engines={host: 1})
                        self._remember_engines(start.set_id)

                start.future = self._pool.submit(run)
                self._starts.append(start)

    def _start_set(self, n: int) -> None:
        kind = self.options.kind
        try:
            with stderr_captured(kind in ("slurm", "pbs")) as caught:
                set_id = self.cluster.start_engines_sync(n, engine_set_id=kind)
        except subprocess.CalledProcessError as exc:
            out = exc.output.decode(errors="replace") if isinstance(exc.output, bytes) \
                else (exc.output or "")
            said = last_lines("".join(caught) + "\n" + out, 8)
            raise ClusterError(
                f"could not start engines with {kind}: {shlex.join(map(str, exc.cmd))} "
                f"failed with exit status {exc.returncode}"
                + (f": {said}" if said else "") + f".\nCheck: {check_hint(kind)}.") from exc
        engine_set = self.cluster.engines[set_id]
        if kind in ("slurm", "pbs"):
            job = getattr(engine_set, "job_id", "")
            self._job = {"kind": kind, "id": job,
                         "delete": [*engine_set.delete_command, job]}
            self._remember([])
            self.say(f"{kind} job {job} submitted for {self._count(n)}")
        elif kind == "mpi":
            proc = getattr(engine_set, "process", None)
            self._remember([proc] if proc is not None else [])

    def _wait(self, deadline: float) -> None:
        last = -1
        job_state = ""
        next_poll = 0.0
        while True:
            ready = len(self.client.ids)
            now = time.monotonic()
            if ready != last:
                last = ready
                if ready:
                    self.say(f"{ready} of {self._count(self.expected)} ready "
                             f"({now - self._t0:.1f} s)")
            self._check_starts()
            if ready >= self.expected:
                self.started_in = now - self._t0
                return
            if self._job is not None and now >= next_poll:
                next_poll = now + 2.0
                state = batch_state(self._job)
                if state != job_state and state is not None:
                    job_state = state
                    if state:
                        self.say(f"{self._job['kind']} job {self._job['id']}: {state}")
                if state == "" and not ready and now - self._t0 > 5:
                    raise ClusterError(self._failed(
                        f"{self._job['kind']} job {self._job['id']} ended before any engine "
                        f"registered"))
            if now > deadline:
                break
            time.sleep(0.2)
        if ready:
            self.say(f"warning: only {ready} of {self._count(self.expected)} started within "
                     f"{self.timeout:g} s (--timeout); going on with them, the others join "
                     f"when they start")
            self.started_in = time.monotonic() - self._t0
            return
        # the hosts answered over SSH before: the engines may just need longer to start
        raise ClusterError(self._failed(
            f"no engine registered within {self.timeout:g} s (--timeout)"
            + (f"; {self._job['kind']} job {self._job['id']} is {job_state}"
               if self._job and job_state else ""),
            f"a longer --timeout (starting an engine over SSH takes 10-30 s), and "
            f"{check_hint('ssh')}" if self.options.kind == "ssh" else None))

    def _check_starts(self) -> None:
        for start in self._starts:
            fut = start.future
            if fut is None or not fut.done() or fut.exception() is None:
                continue
            exc = fut.exception()
            if isinstance(exc, subprocess.CalledProcessError):
                what = (f"{shlex.join(map(str, exc.cmd[:1]))} … failed with exit status "
                        f"{exc.returncode}")
                said = exc.output.decode(errors="replace") if isinstance(exc.output, bytes) \
                    else (exc.output or "")
                if said.strip():
                    what += f": {last_lines(said)}"
            else:
                what = describe_error(exc)
            host = start.what.rpartition(" on ")[2]
            raise ClusterError(self._failed(
                f"the SSH launcher could not start {start.what}: {what}",
                hint=ssh_hint(self.options, host)
                + f"; and that {self.python} runs there with ipyparallel and opf"))

    def _failed(self, what: str, hint: str | None = None) -> str:
        kind = self.options.kind
        text = f"could not start engines with {self.options.describe()}: {what}\n"
        text += f"Check: {hint or check_hint(kind)}."
        said = self.output_tail()
        return text + (f"\n{said}" if said else "")

    def output_tail(self, lines: int = 8) -> str:
        """The last lines the launchers' processes wrote (engine logs, batch output)."""
        if self.cluster is None:
            return ""
        parts = []
        with contextlib.suppress(Exception):
            controller = self.cluster.controller
            if controller.process.poll() is not None:  # a running one only says it started
                text = (controller.get_output() or "").strip()
                if text:
                    parts.append("controller said:\n" + _indent(text, lines))
        for set_id, es in list(self.cluster.engines.items()):
            if self.options.kind == "ssh":
                continue  # fetching remote logs takes ssh calls per engine; the error says enough
            with contextlib.suppress(Exception):
                text = (es.get_output() or "").strip()
                if text:
                    parts.append(f"engines ({set_id}) said:\n" + _indent(text, lines))
        return "\n".join(parts)

    def _remember(self, procs: list[Any]) -> None:
        with self._recording:  # engines over SSH are recorded from the threads starting them
            for proc in procs:
                rec = process_record(proc)
                if rec is not None:
                    self._procs.append(rec)
            data = {"cluster_id": self.cluster_id, "kind": self.options.kind,
                    "driver": os.getpid(), "processes": self._procs, "batch_job": self._job,
                    "ssh_engines": self._ssh_engines}
            write_atomic(str(self.record), json.dumps(data, indent=1).encode("utf-8"))

    def _remember_engines(self, set_id: str) -> None:
        """Record the engines of an SSH engine set as started (host, process id), so that the
        next run can end them if this one is killed."""
        engine_set = self.cluster.engines.get(set_id)
        launchers = getattr(engine_set, "launchers", {}) or {}
        recs = [engine_record(la, self.cluster_id, self.remote_dir) for la in launchers.values()]
        with self._recording:
            self._ssh_engines.extend(r for r in recs if r is not None)
        self._remember([])

    # stopping

    def stop(self) -> None:
        with _signals_held():
            self._stop()

    def _stop(self) -> None:
        self._cancelled.set()
        ended = ended_early(self._job) if self._job and self.started_in is not None else None
        if ended:  # asked before the engines are stopped, which cancels the job
            self.say(ended)
        # the controller's schedulers are processes of their own: taken now, while they are
        # still its children, they are ended below even when the controller exits first and
        # leaves them to init
        started = live_processes(self._procs)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close(linger=0)
            self.client = None
        # the engines (each SSH engine by its own launcher; their logs are not fetched, that is
        # three more ssh calls an engine: the remote folder goes as a whole), the controller
        # and the remote folders, all at once
        parts: list[Callable[[], Any]] = []
        cluster = self.cluster
        if cluster is not None:
            if self.options.kind == "ssh":
                parts += [functools.partial(_stop_launcher, es) for es in cluster.engines.values()]
            else:
                for set_id, engine_set in list(cluster.engines.items()):
                    if self.options.kind in ("slurm", "pbs") and not engine_set.job_id:
                        cluster.engines.pop(set_id)  # never submitted: nothing to cancel
                parts.append(cluster.stop_engines_sync)
            parts.append(cluster.stop_controller_sync)
        # on each host, whatever of the cluster outlives its engine's stop (the nanny an
        # engine starts in a session of its own notices its engine gone, then waits seconds
        # for the controller to hear of it) is ended and waited for, and the folder goes
        parts += [functools.partial(end_cluster_on, ["ssh", *ssh_base(self.options, 10), host],
                                    self.python, self.cluster_id, self.remote_dir)
                  for host in self._hosts]
        # what ssh passes on from the hosts while they stop (a Python traceback from
        # ipyparallel's kill of an engine that is gone already) is not opf's to show
        if parts:
            with stderr_captured(self.options.kind == "ssh", echo=False) as caught, \
                    ThreadPoolExecutor(max_workers=min(16, len(parts)),
                                       thread_name_prefix="opf-stop") as pool:
                for part in parts:
                    pool.submit(_quietly, part)
            if caught and caught[0].strip():
                log.debug("while stopping: %s", caught[0])
        if self._job is not None:
            _quietly(subprocess.run, self._job["delete"], capture_output=True, timeout=30)
            wait_batch_gone(self._job, BATCH_GONE_WAIT)
        kill_processes([*started, *live_processes(self._procs)])
        kill_processes(_our_ssh_children(self._t0))
        with contextlib.suppress(OSError):
            self.record.unlink()
        remove_launch_files(self.ipython_dir, self.cluster_id)
        self.cluster = None


def _indent(text: str, lines: int) -> str:
    return "\n".join("  | " + ln for ln in text.splitlines()[-lines:])


def _stop_launcher(launcher: Any) -> None:
    result = launcher.stop()
    if inspect.isawaitable(result):
        asyncio.run(_awaited(result))


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def _quietly(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # stopping goes on whatever one part says
        log.debug("while stopping: %s", describe_error(exc))
        return None


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold back SIGINT and SIGTERM while a cluster is stopped, so that a second Ctrl-C cannot
    leave half of it running; they go to the handlers they were meant for once it is done."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    saved = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError, OSError):
            saved[sig] = signal.signal(sig, lambda s, f: got.append(s))
    try:
        yield
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)
        for sig in dict.fromkeys(got):
            old = saved.get(sig)
            if callable(old):
                old(sig, None)
            elif old == signal.SIG_DFL:
                signal.raise_signal(sig)


def _our_ssh_children(since: float) -> list[Any]:
    """ssh and scp processes this process started since the cluster's start (the launchers'
    sessions that wait on remote engines)."""
    import psutil

    found = []
    started = time.time() - (time.monotonic() - since) - 1.0
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if child.name() in ("ssh", "scp") and child.create_time() >= started:
                    found.append(child)
    return found


def _load_config(path: str) -> Any:
    from traitlets.config.loader import JSONFileConfigLoader, PyFileConfigLoader

    folder, name = os.path.split(path)
    loader = (JSONFileConfigLoader if name.endswith(".json") else PyFileConfigLoader)(
        name, path=folder)
    try:
        return loader.load_config()
    except Exception as exc:
        raise ClusterError(f"cannot read the launcher configuration {path}: "
                           f"{describe_error(exc)}") from exc


# -- opening -----------------------------------------------------------------------------------


def _say(quiet: bool) -> Callable[[str], None]:
    def say(text: str) -> None:
        if not quiet or text.startswith("warning"):
            print(f"opf: {text}", file=sys.stderr, flush=True)

    return say


def launched(options: ClusterOptions, state: Path, scratch: str | None, timeline: Timeline,
             needed: Callable[[], int | None] = lambda: None) -> Iterator[IPyParallelExecutor]:
    """Start the engines ``options.launch`` names, yield an executor for them, and stop
    everything at the end (a generator for :func:`opals_dsl.runtime.connect.open_cluster`);
    the start (hosts asked, controller, engines until ready) and the stop are marked on
    ``timeline``; ``needed`` says, once the run knows it, how many engines it needs at most."""
    launch: LaunchOptions = options.launch
    cluster = LaunchedCluster(launch, state, options.timeout, _say(launch.quiet), needed)
    quiet_ssh_waits()
    with using_ipython_dir(cluster.ipython_dir):
        lifeline = None
        try:
            stop_leftover_launch(state)
            # should this process die without stopping the cluster, its lifeline does
            lifeline = start_lifeline(state)
            began = timeline.now()
            try:
                client = cluster.start()
                executor = IPyParallelExecutor(client, scratch=scratch, timeout=options.timeout)
            except ClusterError:
                raise
            except Exception as exc:
                said = cluster.output_tail()
                raise ClusterError(
                    f"could not start engines with {launch.describe()}: {describe_error(exc)}\n"
                    f"Check: {check_hint(launch.kind)}." + (f"\n{said}" if said else "")
                ) from exc
            machines = len({info.machine for info in executor.engines().values()})
            ready = (f"{cluster._count(len(executor.engines()))} on {machines} machine"
                     f"{'s' if machines != 1 else ''}")
            cluster.say(f"{ready} ready in {cluster.started_in:.1f} s")
            timeline.mark("engines ready", began, note=f"{launch.describe()}: {ready}")
            yield executor
        finally:
            with timeline.phase("stop"):
                cluster.stop()
            end_lifeline(lifeline)
