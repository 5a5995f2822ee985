"""SSH for engines started on other hosts: the ssh command opf uses, asking each host before
anything starts whether it can run an engine (:func:`probe_host`), and ending the engines a
killed run left on its hosts (:func:`end_engines`), and what a stopped cluster left
(:func:`end_cluster_on`)."""

from __future__ import annotations

import contextlib
import logging
import re
import shlex
import socket
import subprocess
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..errors import ClusterError
from .launch_options import LaunchOptions

log = logging.getLogger(__name__)

#: longest wait for one SSH connection to be set up (seconds)
SSH_CONNECT_TIMEOUT = 10


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


def ssh_hint(options: LaunchOptions, host: str) -> str:
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
                                       f"{ssh_hint(options, host)}")
    out = dict(re.findall(r"__opf_(\w+)=(.*)", proc.stdout))
    said = last_lines(proc.stderr).rstrip(".")  # ssh ends some sentences with one
    if proc.returncode == 255:
        return HostProbe(host, problem=f"cannot reach {host} over SSH: {said or 'ssh failed'}; "
                                       f"{ssh_hint(options, host)}")
    if "import" in out:
        return HostProbe(host, problem=f"the Python on {host} ({python}) cannot import "
                                       f"ipyparallel and opf: {out['import']}; install opf "
                                       f"there, or name another Python with --remote-python")
    if proc.returncode != 0 or "cores" not in out:
        return HostProbe(host, problem=f"{host} cannot run {python}: "
                                       f"{said or f'exit status {proc.returncode}'}; "
                                       f"name the engines' Python there with --remote-python")
    return HostProbe(host, cores=max(1, int(out["cores"])))


def last_lines(text: str, lines: int = 3) -> str:
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


def machine_name() -> str:
    """This machine's name as other machines may know it: its fully qualified name, unless
    that is only ``localhost`` (a host file that maps the name to the loopback address)."""
    fqdn = socket.getfqdn()
    return socket.gethostname() if fqdn.split(".")[0] == "localhost" else fqdn


def check_local_address(address: str) -> None:
    """Refuse a ``--controller-ip`` that is not an address of this machine: the controller
    could not listen there."""
    try:
        infos = socket.getaddrinfo(address, 0, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as probe:
            probe.bind(infos[0][4])
    except OSError as exc:
        raise ClusterError(
            f"--controller-ip {address} is not an address of this machine "
            f"({exc.strerror or exc}): the controller listens there and the engines connect "
            f"to it; give one of this machine's addresses that the hosts reach, or '*'") \
            from exc


#: Python run on a host to end what a cluster left there: every process of this user whose
#: environment names the cluster (``IPP_CLUSTER_ID``: its engines, and the nanny each engine
#: starts in a session of its own) gets SIGTERM, and SIGKILL if it is still there after 5 s; a
#: reused process id is never taken for one. Their steps end with them (an engine's lifeline
#: ends their process groups). Then ipyparallel's folder of the cluster on that host goes.
_END_CLUSTER = """\
import os, shutil, signal, time
mark, folder, me = {mark!r}.encode(), {folder!r}, os.getpid()
def ours():
    found = []
    for name in os.listdir('/proc'):
        if not name.isdigit() or int(name) in (me, os.getppid()):
            continue
        try:
            with open('/proc/%s/environ' % name, 'rb') as f:
                if mark in f.read().split(b'\\0'):
                    found.append(int(name))
        except OSError:
            pass
    return found
def alive(pid):
    try:
        with open('/proc/%d/stat' % pid, 'rb') as f:
            return f.read().rsplit(b')', 1)[1].split()[0] != b'Z'
    except (OSError, IndexError):
        return False
found = ours()
for pid in found:
    try:
        os.kill(pid, signal.SIGTERM)
    except OSError:
        pass
deadline = time.time() + 5
while any(alive(pid) for pid in found) and time.time() < deadline:
    time.sleep(0.05)
for pid in found:
    if alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
print('__opf_ended=%d' % len(found))
if folder.startswith('/tmp/opf-'):
    shutil.rmtree(folder, ignore_errors=True)
"""


def engine_record(launcher: Any, cluster_id: str, folder: str) -> dict[str, Any] | None:
    """What :func:`end_engines` needs to end the engine an ipyparallel SSH launcher started
    (the ssh command it used, the Python, the cluster's ``folder`` there) and its process id
    there, or None while it has none (not started)."""
    pid = getattr(launcher, "pid", None)
    if not isinstance(pid, int) or pid <= 0:
        return None
    return {"ssh": [*launcher.ssh_cmd, *launcher.ssh_args, launcher.location],
            "python": launcher.remote_python, "pid": pid, "cluster_id": cluster_id,
            "folder": folder}


def end_cluster_on(ssh: list[str], python: str, cluster_id: str, folder: str,
                   timeout: float = 20.0) -> int:
    """End every process of ipyparallel cluster ``cluster_id`` on the host that ``ssh`` (the
    command up to and with the host) reaches, waiting until they are gone, and remove the
    cluster's ``folder`` there; how many processes there were (0 if the host cannot be
    reached: its engines stop by themselves once they miss their controller's heartbeat for a
    minute)."""
    code = _END_CLUSTER.format(mark=f"IPP_CLUSTER_ID={cluster_id}", folder=folder)
    with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError):
        proc = subprocess.run([*ssh, shlex.quote(python), "-"], input=code,
                              capture_output=True, text=True, timeout=timeout)
        m = re.search(r"__opf_ended=(\d+)", proc.stdout)
        return int(m.group(1)) if m else 0
    return 0


def end_engines(records: Iterable[dict[str, Any]], timeout: float = 20.0) -> int:
    """End the engines a killed run recorded (:func:`engine_record`), with every other process
    of their cluster on their hosts, one ssh call a host, all hosts at once; how many processes
    were still there."""
    needs = {"ssh", "python", "cluster_id"}
    hosts = {(tuple(map(str, r["ssh"])), str(r["python"]), str(r["cluster_id"]),
              str(r.get("folder") or ""))
             for r in records if isinstance(r, dict) and needs <= r.keys()}
    if not hosts:
        return 0
    with ThreadPoolExecutor(min(16, len(hosts))) as pool:
        return sum(pool.map(lambda k: end_cluster_on(list(k[0]), k[1], k[2], k[3], timeout),
                            hosts))


def quiet_ssh_waits() -> None:
    """ipyparallel's SSH launcher watches each remote engine from a thread (``wait(host=...)``)
    that dies with a traceback when its host stops answering; the engine's loss is opf's to
    report (the hub notices it), so those tracebacks go to the debug log instead.

    Installed once for the process and never taken back: a watcher blocked on an unreachable
    host fails only when its ssh gives up, which may be after the cluster has been stopped."""
    previous = threading.excepthook
    if getattr(previous, "opf_quiet_ssh_waits", False):
        return

    def hook(args: Any) -> None:
        name = getattr(args.thread, "name", "") or ""
        if name.startswith("wait(host="):
            log.debug("%s ended: %s: %s", name, type(args.exc_value).__name__, args.exc_value)
            return
        previous(args)

    hook.opf_quiet_ssh_waits = True  # type: ignore[attr-defined]
    threading.excepthook = hook
