"""SSH for engines started on other hosts: the ssh command opf uses, asking each host before
anything starts whether it can run an engine (:func:`probe_host`), and ending the engines a
killed run left on its hosts (:func:`end_engines`)."""

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


#: Python run on a host to end an engine that a killed run left there: the process, if it is
#: still an engine of that cluster (its environment says so, so a reused process id is left
#: alone), gets SIGTERM and, if it is still there after 5 s, SIGKILL. Its steps end with it
#: (the engine's lifeline ends their process groups). Then ipyparallel's folder of the
#: cluster on that host goes.
_END_ENGINE = """\
import os, shutil, signal, time
pid, mark, folder = {pid}, {mark!r}, {folder!r}
def alive():
    try:
        with open('/proc/%d/stat' % pid, 'rb') as f:
            return f.read().rsplit(b')', 1)[1].split()[0] != b'Z'
    except (OSError, IndexError):
        return False
try:
    with open('/proc/%d/environ' % pid, 'rb') as f:
        ours = mark.encode() in f.read().split(b'\\0')
except OSError:
    ours = False
if ours:
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.time() + 5
        while alive() and time.time() < deadline:
            time.sleep(0.1)
        if alive():
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    print('__opf_ended=1')
if folder.startswith('/tmp/opf-'):
    shutil.rmtree(folder, ignore_errors=True)
"""


def engine_record(launcher: Any, cluster_id: str, folder: str) -> dict[str, Any] | None:
    """What :func:`end_engines` needs to end the engine an ipyparallel SSH launcher started
    (the ssh command it used, the Python, the process id there, the cluster's ``folder``
    there), or None without a pid."""
    pid = getattr(launcher, "pid", None)
    if not isinstance(pid, int) or pid <= 0:
        return None
    return {"ssh": [*launcher.ssh_cmd, *launcher.ssh_args, launcher.location],
            "python": launcher.remote_python, "pid": pid, "cluster_id": cluster_id,
            "folder": folder}


def end_engines(records: Iterable[dict[str, Any]], timeout: float = 20.0) -> int:
    """End the engines a killed run recorded (:func:`engine_record`), all hosts at once;
    how many were still there. A host that cannot be reached is passed over: its engines stop
    by themselves once they miss their controller's heartbeat for a minute."""
    def end(rec: dict[str, Any]) -> bool:
        code = _END_ENGINE.format(pid=int(rec["pid"]),
                                  mark=f"IPP_CLUSTER_ID={rec['cluster_id']}",
                                  folder=str(rec.get("folder") or ""))
        cmd = [*map(str, rec["ssh"]), shlex.quote(str(rec["python"])), "-"]
        with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError):
            proc = subprocess.run(cmd, input=code, capture_output=True, text=True,
                                  timeout=timeout)
            return "__opf_ended=1" in proc.stdout
        return False

    found = [r for r in records if isinstance(r, dict) and {"ssh", "python", "pid",
                                                            "cluster_id"} <= r.keys()]
    if not found:
        return 0
    with ThreadPoolExecutor(min(16, len(found))) as pool:
        return sum(pool.map(end, found))


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
