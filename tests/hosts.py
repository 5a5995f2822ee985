"""Hosts of their own for the tests: "computers" on this machine, each a set of Linux
namespaces, reachable only over private links.

Each host is

- a **network namespace** joined to the test's side by one veth link: the test's end has
  ``198.18.0.1``, the host's end ``198.18.0.<1 + i>`` (198.18.0.0/15 is the benchmarking range,
  used by no real network). The host's only route leads to ``198.18.0.1``; on the test's side an
  ``unreachable 198.18.0.0/15`` route (made for the session, removed after it) keeps packets
  for a host whose link is gone from ever taking the default route. IP forwarding is not
  touched, so a host's traffic never leaves its link;
- a **UTS namespace** with its own host name (``opfhost1`` ...), so ``socket.gethostname()``
  on an engine there names the host;
- a **mount namespace** with its own ``/tmp`` and ``/run`` (tmpfs), so its scratch disk is its
  own; everything else (the project folder with its ``.venv``) is the shared drive, at the same
  path as here;
- optionally an **sshd** (Debian's openssh-server) listening on the host's address only, with
  host and user keys made for the session; ``ssh_config`` names each host, so
  ``ssh -F ssh_config opfhost1`` logs in as root.

A namespace lives as long as its *holder* (``unshare ... sleep infinity``) or any process in it;
:meth:`Host.kill_all` kills every process whose ``/proc/PID/ns/net`` is the host's, the holder
last, and the kernel then removes the namespace and its veth link. Every holder (and every
daemon started in a host) carries ``OPF_TEST_HOST=<name>:<pid of the test session>`` in its
environment: a session first kills the hosts of an earlier session that was killed before it
could (:func:`clean_leftovers`); SIGTERM is turned into KeyboardInterrupt while hosts exist, so
that pytest's teardown runs, and an ``atexit`` hook stops what is left. A lock file
(:data:`LOCK_FILE`, taken once per process) keeps two test sessions from making hosts at the
same time: they would share names and addresses.

Needs root, ``unshare``, ``nsenter`` and ``ip``, and for sshd ``/usr/sbin/sshd`` and
``ssh-keygen``; :func:`missing` says what is absent. Try it by hand:
``python tests/hosts.py FOLDER`` starts three hosts, prints the ssh config's path, and stops
them on Enter.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

MARKER = "OPF_TEST_HOST"
#: the test's end of every link
GATEWAY = "198.18.0.1"
#: the whole range: unreachable from here but through a host's link
RANGE = "198.18.0.0/15"
LOCK_FILE = "/run/lock/opf-test-hosts.lock"
#: test-side link names: opfv1, opfv2, ...
LINK_PREFIX = "opfv"
NAMES = ("opfhost1", "opfhost2", "opfhost3")
#: the project folder, every host's shared drive
_REPO = str(Path(__file__).resolve().parents[1])


def missing(sshd: bool = True) -> str | None:
    """Why hosts cannot be made here, or None."""
    if sys.platform != "linux":
        return "hosts in network namespaces need Linux"
    if os.geteuid() != 0:
        return "hosts in network namespaces need root (CI runs as root)"
    tools = ["unshare", "nsenter", "ip"] + (["ssh", "ssh-keygen"] if sshd else [])
    for tool in tools:
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if sshd and not Path("/usr/sbin/sshd").exists():
        return "sshd is not installed (Debian: apt-get install openssh-server)"
    return None


# -- processes and namespaces ------------------------------------------------------------------


def _netns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    env = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def pids_in_netns(ns: str) -> list[int]:
    """Every process whose network namespace is ``ns`` (a ``net:[inode]`` link text)."""
    return [pid for pid in _pids() if pid != os.getpid() and _netns(pid) == ns]


def _kill_netns(ns: str, holder: int | None) -> None:
    """SIGKILL every process in the namespace until none is left (children forked meanwhile
    are caught by the next round); the holder goes last. Never the test's own namespace."""
    if ns == _netns(os.getpid()):
        raise RuntimeError("refusing to kill the processes of this machine's own namespace")
    for _ in range(100):
        pids = [p for p in pids_in_netns(ns) if p != holder]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    if holder is not None:
        with contextlib.suppress(OSError):
            os.kill(holder, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


def clean_leftovers() -> list[str]:
    """Kill the hosts of test sessions that are gone; the names of those killed."""
    own = _netns(os.getpid())
    killed = []
    for pid in _pids():
        tag = _environ(pid).get(MARKER)
        if not tag:
            continue
        name, _, owner = tag.partition(":")
        if owner.isdigit() and (int(owner) == os.getpid() or _alive(int(owner))):
            continue
        ns = _netns(pid)
        if ns is None:
            continue
        if ns == own:  # a marked process outside any host: only itself
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        else:
            _kill_netns(ns, None)
        killed.append(name)
    return killed


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kwargs)


# -- the session lock and the guard route -------------------------------------------------------

_lock_fd: int | None = None
_lock_users = 0
_saved_sigterm = None


def _sigterm(signum, frame):  # pytest's teardown runs on KeyboardInterrupt, not on SIGTERM
    raise KeyboardInterrupt


def acquire() -> None:
    """Take the machine-wide lock for making hosts (once per process), clean leftovers of
    killed sessions, and route the whole range nowhere."""
    global _lock_fd, _lock_users, _saved_sigterm
    _lock_users += 1
    if _lock_fd is not None:
        return
    Path(LOCK_FILE).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    _lock_fd = fd
    clean_leftovers()
    _run(["ip", "route", "replace", "unreachable", RANGE])
    atexit.register(_release_all)
    with contextlib.suppress(ValueError):  # not the main thread
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            _saved_sigterm = signal.signal(signal.SIGTERM, _sigterm)


def release() -> None:
    global _lock_users
    _lock_users = max(0, _lock_users - 1)
    if _lock_users == 0:
        _release_all()


def _release_all() -> None:
    global _lock_fd, _lock_users, _saved_sigterm
    for hosts in list(_live_sets):
        hosts.stop()
    _lock_users = 0
    if _lock_fd is None:
        return
    with contextlib.suppress(subprocess.CalledProcessError):
        _run(["ip", "route", "del", "unreachable", RANGE])
    if _saved_sigterm is not None:
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGTERM, _saved_sigterm)
        _saved_sigterm = None
    os.close(_lock_fd)
    _lock_fd = None


_live_sets: list[Hosts] = []


# -- hosts ---------------------------------------------------------------------------------------


@dataclass
class Host:
    """One namespace host: its name, address, test-side link and holder process."""

    name: str
    index: int
    address: str
    link: str
    holder: subprocess.Popen
    ns: str = ""
    daemons: list[subprocess.Popen] = field(default_factory=list)

    def nsenter(self, *cmd: str) -> list[str]:
        return ["nsenter", "-t", str(self.holder.pid), "-n", "-u", "-m", "--", *cmd]

    def run(self, *cmd: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        """Run a command inside the host (not over SSH) and wait for it."""
        return subprocess.run(self.nsenter(*cmd), check=check, capture_output=True, text=True,
                              **kwargs)

    def start_daemon(self, cmd: list[str], log: Path, env: dict[str, str] | None = None
                     ) -> subprocess.Popen:
        """Start a long-running process inside the host, its output to ``log``."""
        full = dict(env or os.environ, **{MARKER: f"{self.name}:{os.getpid()}"})
        with open(log, "ab") as out:
            proc = subprocess.Popen(self.nsenter(*cmd), env=full, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=out, start_new_session=True)
        self.daemons.append(proc)
        return proc

    def pids(self) -> list[int]:
        """Every process in the host but its holder."""
        return [p for p in pids_in_netns(self.ns) if p != self.holder.pid]

    def processes(self) -> list[tuple[int, str]]:
        """(pid, command line) of every process in the host but its holder and its daemons."""
        skip = {self.holder.pid, *(d.pid for d in self.daemons)}
        found = []
        for pid in self.pids():
            if pid in skip:
                continue
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                found.append((pid, cmd.decode(errors="replace").strip()))
        return found

    def link_down(self) -> None:
        """Cut the host off as a machine that vanished would be: its end of the link goes
        down, packets to it are dropped without an answer."""
        self.run("ip", "link", "set", "eth0", "down")

    def kill_all(self) -> None:
        """Kill every process in the host, the holder last: the host is gone."""
        if self.ns:
            _kill_netns(self.ns, self.holder.pid)
        else:
            self.holder.kill()
        for proc in [self.holder, *self.daemons]:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)


@dataclass
class Hosts:
    """Namespace hosts sharing ``folder`` (which must not be under /tmp: each host has its own
    /tmp) for keys, configuration and logs. Host ``i`` (from ``first``) has address
    ``198.18.0.<1 + i>`` and test-side link ``opfv<i>``."""

    folder: Path
    names: tuple[str, ...] = NAMES
    first: int = 1
    sshd: bool = True
    hosts: list[Host] = field(default_factory=list)

    @property
    def ssh_config(self) -> Path:
        return self.folder / "ssh_config"

    def __getitem__(self, name: str) -> Host:
        return next(h for h in self.hosts if h.name == name)

    def start(self) -> Hosts:
        self.folder.mkdir(parents=True, exist_ok=True)
        acquire()
        _live_sets.append(self)
        try:
            for i, name in enumerate(self.names, start=self.first):
                self._make(i, name)
            if self.sshd:
                self._keys()
                for host in self.hosts:
                    self._start_sshd(host)
                self._write_ssh_config()
                for host in self.hosts:
                    self._wait_ssh(host)
        except BaseException:
            self.stop()
            raise
        return self

    def _make(self, i: int, name: str) -> Host:
        address = f"198.18.0.{1 + i}"
        link = f"{LINK_PREFIX}{i}"
        # the project folder is the shared drive; where it lies under /tmp (a clone in /tmp),
        # the host's own tmpfs would hide it: it is bound aside in the host's new /run first,
        # then moved back onto its path in the new /tmp (a bind must come from this namespace)
        keep = park = ""
        if _REPO.startswith("/tmp/"):
            here = shlex.quote(_REPO)
            park = f" && mkdir -p /run/opf-keep && mount --bind {here} /run/opf-keep"
            keep = (f" && mkdir -p {here} && mount --move /run/opf-keep {here}"
                    " && rmdir /run/opf-keep")
        setup = (
            f"hostname {name}"
            " && mount -t tmpfs -o mode=755,size=16m opf-run /run"
            f"{park}"
            " && mount -t tmpfs -o mode=1777,size=1g opf-tmp /tmp"
            f"{keep}"
            " && mkdir -p /run/sshd /run/lock"
            " && ip link set lo up"
            " && echo ready && exec sleep infinity"
        )
        env = dict(os.environ, **{MARKER: f"{name}:{os.getpid()}"})
        holder = subprocess.Popen(
            ["unshare", "--net", "--uts", "--mount", "--propagation", "private", "--",
             "sh", "-c", setup],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, start_new_session=True,
        )
        host = Host(name=name, index=i, address=address, link=link, holder=holder)
        self.hosts.append(host)  # stopped with the others if what follows fails
        line = holder.stdout.readline().strip() if holder.stdout else ""
        if line != "ready":
            err = holder.stderr.read() if holder.stderr else ""
            raise RuntimeError(f"could not make host {name}: {err.strip() or line}")
        host.ns = _netns(holder.pid) or ""
        if not host.ns or host.ns == _netns(os.getpid()):
            raise RuntimeError(f"host {name} has no network namespace of its own")
        with contextlib.suppress(subprocess.CalledProcessError):
            _run(["ip", "link", "del", link])  # of a session killed while making its hosts
        _run(["ip", "link", "add", link, "type", "veth", "peer", "name", "eth0",
              "netns", str(holder.pid)])
        _run(["ip", "addr", "add", f"{GATEWAY}/32", "dev", link])
        _run(["ip", "link", "set", link, "up"])
        _run(["ip", "route", "add", f"{address}/32", "dev", link, "src", GATEWAY])
        host.run("ip", "addr", "add", f"{address}/32", "dev", "eth0")
        host.run("ip", "link", "set", "eth0", "up")
        host.run("ip", "route", "add", f"{GATEWAY}/32", "dev", "eth0", "src", address)
        return host

    def _keys(self) -> None:
        for key in ("host_key", "user_key"):
            path = self.folder / key
            if not path.exists():
                _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"opf-test-{key}",
                      "-f", str(path)])
        (self.folder / "authorized_keys").write_text(
            (self.folder / "user_key.pub").read_text())

    def _start_sshd(self, host: Host) -> None:
        config = self.folder / f"sshd_{host.name}.conf"
        config.write_text(
            f"ListenAddress {host.address}\n"
            "Port 22\n"
            f"HostKey {self.folder / 'host_key'}\n"
            f"AuthorizedKeysFile {self.folder / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "StrictModes no\n"
            "PidFile none\n"
            "MaxStartups 100:30:200\n"
            "MaxSessions 100\n"
            "LogLevel ERROR\n"
        )
        host.start_daemon(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
                          self.folder / f"sshd_{host.name}.log")

    def _write_ssh_config(self) -> None:
        kind, key = (self.folder / "host_key.pub").read_text().split()[:2]
        (self.folder / "known_hosts").write_text(
            "".join(f"{h.address} {kind} {key}\n" for h in self.hosts))
        blocks = [f"Host {h.name}\n    HostName {h.address}\n" for h in self.hosts]
        blocks.append(
            "Host opfhost*\n"
            "    User root\n"
            f"    IdentityFile {self.folder / 'user_key'}\n"
            "    IdentitiesOnly yes\n"
            f"    UserKnownHostsFile {self.folder / 'known_hosts'}\n"
            "    GlobalKnownHostsFile /dev/null\n"
            "    StrictHostKeyChecking yes\n"
            "    CheckHostIP no\n"
            "    BatchMode yes\n"
            "    ConnectTimeout 5\n"
            "    LogLevel ERROR\n"
        )
        self.ssh_config.write_text("\n".join(blocks))

    def _wait_ssh(self, host: Host, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            proc = self.ssh(host.name, "hostname", timeout=timeout)
            if proc.returncode == 0 and proc.stdout.strip() == host.name:
                return
            if time.monotonic() > deadline or any(d.poll() is not None for d in host.daemons):
                log = (self.folder / f"sshd_{host.name}.log").read_text(errors="replace")
                raise RuntimeError(f"sshd on {host.name} does not answer: "
                                   f"{proc.stderr.strip()} {log.strip()}")
            time.sleep(0.2)

    def ssh(self, name: str, *cmd: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(["ssh", "-F", str(self.ssh_config), name, *cmd],
                              capture_output=True, text=True, **kwargs)

    def stop(self) -> None:
        for host in self.hosts:
            host.kill_all()
        self.hosts.clear()
        if self in _live_sets:
            _live_sets.remove(self)
            release()


@contextlib.contextmanager
def hosts_in(folder: Path, **kwargs) -> Iterator[Hosts]:
    hosts = Hosts(folder, **kwargs).start()
    try:
        yield hosts
    finally:
        hosts.stop()


if __name__ == "__main__":
    why = missing()
    if why:
        sys.exit(why)
    with hosts_in(Path(sys.argv[1]).resolve()) as made:
        print(made.ssh_config, flush=True)
        for h in made.hosts:
            print(h.name, h.address, h.holder.pid, flush=True)
        with contextlib.suppress(EOFError, KeyboardInterrupt):
            input()
