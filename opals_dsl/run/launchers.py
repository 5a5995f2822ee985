"""Engines that ``opf run`` starts elsewhere: over SSH, or through Slurm, PBS or MPI.

In: ``--engines ssh:HOST[:N],...`` / ``slurm`` / ``pbs`` / ``mpi`` with ``-n N`` and the options
a launcher needs (:func:`add_arguments`, :func:`launch_options`). Out: the ipyparallel client of
a cluster this run owns — a controller here and engines there — which
:func:`opals_dsl.cluster.open_cluster` hands to its executor like any other (:func:`launched`).

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
    the stop is done. A run killed with ``kill -9`` leaves ``<state>/launched.json``; the next run
    in that state folder stops the controller and cancels the batch job recorded there; the
    engines over SSH stop by themselves within a minute once their controller is gone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import inspect
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import ClusterError, UsageError
from .cluster import (
    ENGINE_HEARTBEAT_MISSES,
    HEARTBEAT_MISSES,
    HEARTBEAT_MS,
    ClusterOptions,
    IPyParallelExecutor,
    _ipython_dir,
    _kill,
    _live,
    _proc_record,
)
from .executor import describe_error
from .fsatomic import write_atomic
from .reaper import end_run

#: what ``--engines`` takes besides a number
KINDS = ("ssh", "slurm", "pbs", "mpi")
#: ``--timeout`` when opf starts engines elsewhere (seconds)
DEFAULT_TIMEOUT = 120.0
#: engines started at once on one host over SSH
PER_HOST = 4
#: longest wait for one SSH connection to be set up (seconds)
SSH_CONNECT_TIMEOUT = 10
#: how long a cancelled batch job may take to leave the queue (seconds)
BATCH_GONE_WAIT = 30.0
#: the record of a launched cluster in the state folder
RECORD = "launched.json"
#: the commands a launcher needs on this machine
_TOOLS = {"ssh": ("ssh",), "slurm": ("sbatch", "squeue", "scancel"),
          "pbs": ("qsub", "qstat", "qdel"), "mpi": ("mpiexec",)}

#: Python run on each host before engines start there: its cores, whether the engines'
#: imports work, and ipyparallel's profile folder made quietly (the launcher would announce it)
_PROBE = """\
import os, subprocess, sys
try:
    import ipyparallel, opals_dsl
except Exception as e:
    print('__opf_import=' + type(e).__name__ + ': ' + str(e).replace('\\n', ' '))
    sys.exit(0)
if {profile!r}:
    subprocess.run([sys.executable, '-m', 'IPython', 'profile', 'create', '--profile-dir',
                    {profile!r}], capture_output=True)
cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
print('__opf_cores=%d' % cores)
"""

log = logging.getLogger(__name__)


class LaunchUsageError(UsageError):
    """A bad ``--engines`` or launcher option (exit 2)."""


@dataclass(frozen=True, slots=True)
class LaunchOptions:
    """How to start engines elsewhere: ``kind`` (one of :data:`KINDS`), ``hosts`` for SSH
    (name, engines or None for one per core), ``n`` engines for a batch system or MPI, and the
    launcher's settings."""

    kind: str
    hosts: tuple[tuple[str, int | None], ...] = ()
    n: int | None = None
    controller_ip: str | None = None
    python: str | None = None
    ssh_config: str | None = None
    partition: str | None = None
    account: str | None = None
    time_limit: str | None = None
    config_file: str | None = None
    quiet: bool = False

    def describe(self) -> str:
        if self.kind == "ssh":
            return "ssh:" + ",".join(h if n is None else f"{h}:{n}" for h, n in self.hosts)
        return self.kind


# -- the command line ----------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The launcher options of ``opf run``."""
    g = p.add_argument_group(
        "engines started by opf elsewhere (--engines ssh:HOST[:N],... | slurm | pbs | mpi)")
    g.add_argument(
        "--controller-ip", metavar="ADDR",
        help="address the controller listens on and the engines connect to (default: over "
        "SSH this machine's address towards the hosts; else every interface, with this "
        "machine's name)",
    )
    g.add_argument(
        "--remote-python", metavar="PATH",
        help="the engines' Python, with ipyparallel and opf installed (default: the path "
        "of the Python running opf, right for a virtual environment on the shared drive)",
    )
    g.add_argument(
        "--ssh-config", metavar="FILE",
        help="ssh configuration file for host names, users, keys and ports (ssh -F FILE)",
    )
    g.add_argument("--partition", metavar="NAME", help="Slurm partition or PBS queue")
    g.add_argument("--account", metavar="NAME", help="Slurm account to charge")
    g.add_argument("--time-limit", metavar="TIME",
                   help="Slurm time limit of the engines' job, e.g. 2:00:00")
    g.add_argument(
        "--launcher-config", metavar="FILE",
        help="ipyparallel configuration file (ipcluster_config.py or .json) with any other "
        "launcher setting; the flags above win over it",
    )


_HOST_RE = re.compile(r"^(?:[A-Za-z0-9._-]+@)?[A-Za-z0-9._-]+$")


def parse_engines(text: str | int) -> int | LaunchOptions:
    """``--engines`` → a number of local engines (0: ``local``, as many as there are cores),
    or what to start elsewhere (without the launcher's settings). Raises
    :class:`LaunchUsageError`."""
    value = str(text).strip()
    if value.isdigit():
        n = int(value)
        if n < 1:
            raise LaunchUsageError("--engines takes a number of engines, 1 or more")
        return n
    kind, sep, rest = value.partition(":")
    kind = kind.lower()
    if kind == "local" and not sep:
        return 0
    if kind in ("slurm", "pbs", "mpi") and not sep:
        return LaunchOptions(kind=kind)
    if kind == "ssh":
        return LaunchOptions(kind="ssh", hosts=_parse_hosts(rest))
    raise LaunchUsageError(
        f"--engines takes a number of local engines, ssh:HOST[:N][,HOST[:N]...], "
        f"slurm, pbs or mpi; not '{text}'"
    )


def _parse_hosts(text: str) -> tuple[tuple[str, int | None], ...]:
    hosts: list[tuple[str, int | None]] = []
    seen: set[str] = set()
    for item in text.split(","):
        item = item.strip()
        host, sep, count = item.partition(":")
        if not item or not _HOST_RE.match(host) or (sep and not count.isdigit()):
            raise LaunchUsageError(
                f"--engines ssh: takes HOST or HOST:N, separated by commas "
                f"(e.g. ssh:node1:8,node2); '{item}' is not one"
            )
        n = int(count) if sep else None
        if n is not None and n < 1:
            raise LaunchUsageError(f"--engines ssh: {item} asks for no engine; "
                                   f"give 1 or more, or leave the host out")
        if host in seen:
            raise LaunchUsageError(f"--engines ssh: names {host} twice; give it "
                                   f"once, with its number of engines (HOST:N)")
        seen.add(host)
        hosts.append((host, n))
    return tuple(hosts)


_LAUNCH_FLAGS = {
    "controller_ip": ("--controller-ip", KINDS),
    "remote_python": ("--remote-python", KINDS),
    "ssh_config": ("--ssh-config", ("ssh",)),
    "partition": ("--partition", ("slurm", "pbs")),
    "account": ("--account", ("slurm",)),
    "time_limit": ("--time-limit", ("slurm",)),
    "launcher_config": ("--launcher-config", KINDS),
}


def launch_options(args: argparse.Namespace) -> tuple[int | None, LaunchOptions | None]:
    """From ``opf run``'s arguments: (local engines or None, what to start elsewhere or None).
    Raises :class:`LaunchUsageError` for a combination that cannot work."""
    n = getattr(args, "n", None)
    spec = getattr(args, "engines", None)
    if n is not None and n < 1:
        raise LaunchUsageError("-n takes a number of engines, 1 or more")
    parsed = parse_engines(spec) if spec is not None else None
    given = {name: getattr(args, name, None) for name in _LAUNCH_FLAGS}
    if not isinstance(parsed, LaunchOptions):
        for name, value in given.items():
            if value is not None:
                flag, kinds = _LAUNCH_FLAGS[name]
                raise LaunchUsageError(
                    f"{flag} is for engines that opf starts elsewhere: use it with "
                    f"--engines {' or '.join('ssh:HOST' if k == 'ssh' else k for k in kinds)}")
        if isinstance(parsed, int) and parsed > 0:
            if n is not None and n != parsed:
                raise LaunchUsageError(f"-n {n} and --engines {parsed} ask for "
                                       f"different numbers of engines; give one of them")
            n = parsed
        return n, None
    for name, value in given.items():
        flag, kinds = _LAUNCH_FLAGS[name]
        if value is not None and parsed.kind not in kinds:
            raise LaunchUsageError(f"{flag} does not apply to --engines "
                                   f"{parsed.kind}")
    if getattr(args, "profile", None) is not None or getattr(args, "cluster_file", None):
        raise LaunchUsageError("--engines starts a cluster of its own; it cannot be "
                               "combined with --profile or --cluster-file")
    if parsed.kind == "ssh":
        if n is not None:
            raise LaunchUsageError(
                "-n does not apply to --engines ssh:; give each host its number "
                "of engines, e.g. --engines ssh:node1:4,node2:4 (a host without one gets one "
                "engine per core)")
    elif n is None and parsed.kind in ("slurm", "pbs"):
        raise LaunchUsageError(f"--engines {parsed.kind} needs the number of "
                               f"engines to submit: add -n N")
    files = {}
    for name in ("ssh_config", "launcher_config"):
        if given[name] is not None:
            path = Path(given[name]).expanduser()
            if not path.is_file():
                flag = _LAUNCH_FLAGS[name][0]
                raise LaunchUsageError(f"{flag} {given[name]}: no such file")
            files[name] = str(path.resolve())
    if "launcher_config" in files and not files["launcher_config"].endswith((".py", ".json")):
        raise LaunchUsageError("--launcher-config takes an ipyparallel "
                               "configuration file ending in .py or .json")
    return None, replace(
        parsed, n=n, controller_ip=given["controller_ip"], python=given["remote_python"],
        ssh_config=files.get("ssh_config"), partition=given["partition"],
        account=given["account"], time_limit=given["time_limit"],
        config_file=files.get("launcher_config"), quiet=bool(getattr(args, "quiet", False)),
    )


# -- SSH: asking the hosts before starting -------------------------------------------------


def ssh_base(options: LaunchOptions, timeout: float) -> list[str]:
    """The options opf gives ssh and scp: the user's config file, no password prompts, bounded
    connection set-up, and a dead connection noticed within about 15 s."""
    args = ["-F", options.ssh_config] if options.ssh_config else []
    return args + [
        "-o", "BatchMode=yes",
        "-o", f"ConnectTimeout={max(1, min(SSH_CONNECT_TIMEOUT, int(timeout)))}",
        "-o", "ServerAliveInterval=5",
        "-o", "ServerAliveCountMax=3",
    ]


@dataclass
class HostProbe:
    host: str
    cores: int | None = None
    problem: str | None = None


def _ssh_hint(options: LaunchOptions, host: str) -> str:
    cfg = f"-F {options.ssh_config} " if options.ssh_config else ""
    return (f"check that 'ssh {cfg}{host} true' logs in without a password or a question (opf "
            f"runs ssh in batch mode), or leave {host} out of --engines")


def probe_host(host: str, options: LaunchOptions, python: str, timeout: float,
               profile_dir: str = "") -> HostProbe:
    """Ask ``host`` over SSH for its cores, importing ipyparallel and opf with ``python`` (and
    make ipyparallel's ``profile_dir`` there)."""
    cmd = ["ssh", *ssh_base(options, timeout), host, shlex.quote(python), "-"]
    try:
        proc = subprocess.run(cmd, input=_PROBE.format(profile=profile_dir),
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return HostProbe(host, problem=f"{host} did not answer over SSH within {timeout:g} s; "
                                       f"{_ssh_hint(options, host)}")
    out = dict(re.findall(r"__opf_(\w+)=(.*)", proc.stdout))
    said = _last_lines(proc.stderr)
    if proc.returncode == 255:
        return HostProbe(host, problem=f"cannot reach {host} over SSH: {said or 'ssh failed'}; "
                                       f"{_ssh_hint(options, host)}")
    if "import" in out:
        return HostProbe(host, problem=f"the Python on {host} ({python}) cannot import "
                                       f"ipyparallel and opf: {out['import']}; install opf "
                                       f"there, or name another Python with --remote-python")
    if proc.returncode != 0 or "cores" not in out:
        return HostProbe(host, problem=f"{host} cannot run {python}: "
                                       f"{said or f'exit status {proc.returncode}'}; "
                                       f"name the engines' Python there with --remote-python")
    return HostProbe(host, cores=max(1, int(out["cores"])))


def _last_lines(text: str, lines: int = 3) -> str:
    return " / ".join(ln.strip() for ln in text.strip().splitlines()[-lines:] if ln.strip())


def ssh_address(host: str, options: LaunchOptions) -> str | None:
    """The address ssh connects to for ``host`` (its config's HostName, resolved)."""
    name = host.rpartition("@")[2]
    cmd = ["ssh", *(["-F", options.ssh_config] if options.ssh_config else []), "-G", host]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        for line in proc.stdout.splitlines():
            key, _, value = line.partition(" ")
            if key == "hostname" and value.strip():
                name = value.strip()
                break
    with contextlib.suppress(OSError):
        return socket.getaddrinfo(name, 22, type=socket.SOCK_DGRAM)[0][4][0]
    return None


def source_address(address: str) -> str | None:
    """This machine's address that packets to ``address`` would leave from (nothing is sent:
    connecting a UDP socket only asks the kernel for a route)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((address, 9))
        return s.getsockname()[0]
    return None


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
    cluster: Any = None
    client: Any = None
    cluster_id: str = ""
    expected: int = 0
    started_in: float | None = None
    _procs: list[dict[str, Any]] = field(default_factory=list)
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
        with ThreadPoolExecutor(max_workers=min(16, len(opts.hosts))) as pool:
            probes = list(pool.map(
                lambda h: probe_host(h[0], opts, self.python, wait, self.remote_dir),
                opts.hosts))
        self._hosts = [p.host for p in probes if not p.problem]  # their folders go at the end
        problems = [p.problem for p in probes if p.problem]
        if problems:
            raise ClusterError("\n".join(problems))
        return {host: n if n is not None else (probe.cores or 1)
                for (host, n), probe in zip(opts.hosts, probes, strict=True)}

    def _controller_address(self) -> tuple[str, str]:
        opts = self.options
        if opts.controller_ip:
            if opts.controller_ip == "*":
                return "*", socket.getfqdn()
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
        return "*", socket.getfqdn()

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

                start.future = self._pool.submit(run)
                self._starts.append(start)

    def _start_set(self, n: int) -> None:
        kind = self.options.kind
        try:
            with _stderr_captured(kind in ("slurm", "pbs")) as caught:
                set_id = self.cluster.start_engines_sync(n, engine_set_id=kind)
        except subprocess.CalledProcessError as exc:
            out = exc.output.decode(errors="replace") if isinstance(exc.output, bytes) \
                else (exc.output or "")
            said = _last_lines("".join(caught) + "\n" + out, 8)
            raise ClusterError(
                f"could not start engines with {kind}: {shlex.join(map(str, exc.cmd))} "
                f"failed with exit status {exc.returncode}"
                + (f": {said}" if said else "") + f".\nCheck: {_hint(kind)}.") from exc
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
                state = _batch_state(self._job)
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
        raise ClusterError(self._failed(
            f"no engine registered within {self.timeout:g} s (--timeout)"
            + (f"; {self._job['kind']} job {self._job['id']} is {job_state}"
               if self._job and job_state else "")))

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
                    what += f": {_last_lines(said)}"
            else:
                what = describe_error(exc)
            host = start.what.rpartition(" on ")[2]
            raise ClusterError(self._failed(
                f"the SSH launcher could not start {start.what}: {what}",
                hint=_ssh_hint(self.options, host)
                + f"; and that {self.python} runs there with ipyparallel and opf"))

    def _failed(self, what: str, hint: str | None = None) -> str:
        kind = self.options.kind
        text = f"could not start engines with {self.options.describe()}: {what}\n"
        text += f"Check: {hint or _hint(kind)}."
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
        for proc in procs:
            rec = _proc_record(proc)
            if rec is not None:
                self._procs.append(rec)
        data = {"cluster_id": self.cluster_id, "kind": self.options.kind,
                "driver": os.getpid(), "processes": self._procs, "batch_job": self._job}
        write_atomic(str(self.record), json.dumps(data, indent=1).encode("utf-8"))

    # stopping

    def stop(self) -> None:
        with _signals_held():
            self._stop()

    def _stop(self) -> None:
        self._cancelled.set()
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
        parts += [functools.partial(self._remove_remote_dir, host) for host in self._hosts]
        if parts:
            with ThreadPoolExecutor(max_workers=min(16, len(parts)),
                                    thread_name_prefix="opf-stop") as pool:
                for part in parts:
                    pool.submit(_quietly, part)
        if self._job is not None:
            _quietly(subprocess.run, self._job["delete"], capture_output=True, timeout=30)
            _wait_batch_gone(self._job, BATCH_GONE_WAIT)
        _kill(_live(self._procs))
        _kill(_our_ssh_children(self._t0))
        with contextlib.suppress(OSError):
            self.record.unlink()
        self._remove_logs()
        self.cluster = None

    def _remove_remote_dir(self, host: str) -> None:
        subprocess.run(["ssh", *ssh_base(self.options, 10), host,
                        f"rm -rf {shlex.quote(self.remote_dir)}"], capture_output=True, timeout=20)

    def _remove_logs(self) -> None:
        folder = self.profile_dir / "log"
        with contextlib.suppress(OSError):
            for entry in os.scandir(folder):
                if self.cluster_id in entry.name:
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
        for suffix in (".sbatch", ".pbs"):
            with contextlib.suppress(OSError):
                (self.ipython_dir / f"{self.cluster_id}{suffix}").unlink()


@contextlib.contextmanager
def _stderr_captured(on: bool) -> Iterator[list[str]]:
    """Catch what the launcher's commands write to standard error (ipyparallel keeps only
    their standard output): ``sbatch: error: ...`` belongs in opf's message, not above it.
    Yields a list that holds what was caught once the block is left; it is written out again
    unless an error is propagating (the error quotes it)."""
    caught: list[str] = []
    if not on:
        yield caught
        return
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        ok = False
        try:
            yield caught
            ok = True
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            caught.append(tmp.read().decode(errors="replace"))
            if ok and caught[0]:
                sys.stderr.write(caught[0])


def _indent(text: str, lines: int) -> str:
    return "\n".join("  | " + ln for ln in text.splitlines()[-lines:])


def _hint(kind: str) -> str:
    return {
        "ssh": "that each host logs in over SSH without a password and reaches this machine "
               "at the controller's address (--controller-ip)",
        "slurm": "'sinfo' and 'squeue', the partition (--partition) and account (--account), "
                 "and that the compute nodes reach this machine at the controller's address "
                 "(--controller-ip)",
        "pbs": "'qstat -q', the queue (--partition), and that the compute nodes reach this "
               "machine at the controller's address (--controller-ip)",
        "mpi": "that mpiexec is on PATH and that mpi4py is installed in the engines' Python",
    }.get(kind, "the launcher's settings")


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


# -- batch jobs --------------------------------------------------------------------------------


def _batch_state(job: dict[str, Any]) -> str | None:
    """The job's state as its queue shows it ("" when the queue no longer has it; None if the
    queue cannot be asked)."""
    if job["kind"] == "slurm":
        cmd = ["squeue", "-h", "-j", str(job["id"]), "-o", "%T %R"]
    elif job["kind"] == "pbs":
        cmd = ["qstat", str(job["id"])]
    else:
        return None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if job["kind"] == "slurm":
        if proc.returncode != 0:
            return "" if "Invalid job id" in proc.stderr else None
        state, _, reason = proc.stdout.strip().partition(" ")
        if not state:
            return ""
        return state if reason in ("", "None", "(None)") or state == "RUNNING" \
            else f"{state} {reason}"
    if proc.returncode != 0:
        return ""
    lines = proc.stdout.strip().splitlines()
    return lines[-1].split()[4] if lines and len(lines[-1].split()) > 4 else None


def _wait_batch_gone(job: dict[str, Any], wait: float) -> bool:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if _batch_state(job) in ("", None):
            return True
        time.sleep(0.5)
    return False


def stop_leftover_launch(state_dir: str | Path) -> bool:
    """Stop what a killed run recorded in ``<state>/launched.json``: its controller and its
    batch job. True if anything was still there."""
    record = Path(state_dir) / RECORD
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        data = {}
    if not isinstance(data, dict):
        data = {}
    procs = end_run(data.get("processes") or [], None, grace=3.0)
    job = data.get("batch_job")
    found = bool(procs)
    if isinstance(job, dict) and job.get("delete"):
        if _batch_state(job):
            found = True
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run([str(w) for w in job["delete"]], capture_output=True, timeout=30)
        _wait_batch_gone(job, BATCH_GONE_WAIT)
    with contextlib.suppress(OSError):
        record.unlink()
    return found


# -- opening -----------------------------------------------------------------------------------


def _say(quiet: bool) -> Callable[[str], None]:
    def say(text: str) -> None:
        if not quiet or text.startswith("warning"):
            print(f"opf: {text}", file=sys.stderr, flush=True)

    return say


@contextlib.contextmanager
def _quiet_ssh_waits() -> Iterator[None]:
    """ipyparallel's SSH launcher watches each remote engine from a thread (``wait(host=...)``)
    that dies with a traceback when its host stops answering; the engine's loss is opf's to
    report (the hub notices it), so those tracebacks go to the debug log instead."""
    previous = threading.excepthook

    def hook(args: Any) -> None:
        name = getattr(args.thread, "name", "") or ""
        if name.startswith("wait(host="):
            log.debug("%s ended: %s", name, describe_error(args.exc_value))
            return
        previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        if threading.excepthook is hook:
            threading.excepthook = previous


def launched(options: ClusterOptions, state: Path,
             scratch: str | None) -> Iterator[IPyParallelExecutor]:
    """Start the engines ``options.launch`` names, yield an executor for them, and stop
    everything at the end (a generator for :func:`opals_dsl.cluster.open_cluster`)."""
    launch: LaunchOptions = options.launch
    cluster = LaunchedCluster(launch, state, options.timeout, _say(launch.quiet))
    with _ipython_dir(cluster.ipython_dir), _quiet_ssh_waits():
        try:
            stop_leftover_launch(state)
            try:
                client = cluster.start()
                executor = IPyParallelExecutor(client, scratch=scratch, timeout=options.timeout)
            except ClusterError:
                raise
            except Exception as exc:
                said = cluster.output_tail()
                raise ClusterError(
                    f"could not start engines with {launch.describe()}: {describe_error(exc)}\n"
                    f"Check: {_hint(launch.kind)}." + (f"\n{said}" if said else "")
                ) from exc
            machines = len({info.machine for info in executor.engines().values()})
            cluster.say(f"{cluster._count(len(executor.engines()))} on {machines} machine"
                        f"{'s' if machines != 1 else ''} ready in {cluster.started_in:.1f} s")
            yield executor
        finally:
            cluster.stop()
