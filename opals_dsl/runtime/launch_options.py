"""What ``--engines`` asks for, when opf starts the engines itself elsewhere: SSH hosts, or a
number of engines through Slurm, PBS or MPI (:class:`LaunchOptions`), read from the command line
(:func:`add_arguments`, :func:`launch_options`) and checked before anything starts."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import UsageError

#: what ``--engines`` takes besides a number
KINDS = ("ssh", "slurm", "pbs", "mpi")


#: ``--timeout`` when opf starts engines elsewhere (seconds)
DEFAULT_TIMEOUT = 120.0


#: engines started at once on one host over SSH
PER_HOST = 4


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


#: the time limits Slurm's ``--time`` takes
_SLURM_TIME = re.compile(r"\d+-\d+(:\d+){0,2}|\d+(:\d+){0,2}|(?i:unlimited|infinite)")

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
    limit = given["time_limit"]
    if limit is not None and not _SLURM_TIME.fullmatch(limit.strip()):
        raise LaunchUsageError(f"--time-limit {limit}: Slurm takes minutes, MM:SS, HH:MM:SS, "
                               f"D-HH, D-HH:MM, D-HH:MM:SS or UNLIMITED (e.g. 12:00:00)")
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


def check_hint(kind: str) -> str:
    """What to check when engines of launcher ``kind`` did not start."""
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
