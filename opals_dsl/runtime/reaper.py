"""Lifelines: a small process that ends what a dead process leaves running.

A process that is killed outright (``kill -9``, the out-of-memory killer, ``os._exit`` in a
``call`` step) cannot clean up after itself, and what it started goes on without it. So the
processes of a run that start others keep a *lifeline*: a child process, in a session of its
own (a Ctrl-C or a hang-up of the terminal does not reach it), that reads a pipe from its
owner. The owner tells it what to end should it die; when the pipe reaches end of file without
the owner having said ``done`` — the owner died, however — the lifeline ends those processes and
exits. It does the same on SIGTERM; SIGINT and SIGHUP are ignored.

``python -m opals_dsl.runtime.reaper groups [NAME=VALUE]`` (an engine's lifeline; standard
library only)
    Lines ``+PGID`` and ``-PGID``: the process group of a step that starts and ends (every step
    runs in a session of its own, see :mod:`opals_dsl.runtime.engine`). At the end, every group
    still listed gets SIGTERM (and SIGCONT, so that a stopped one sees it), and SIGKILL after
    :data:`GRACE` seconds if any of it is left. Then so does every process whose environment
    holds ``NAME=VALUE``, the engine's mark (:func:`opals_dsl.runtime.steps.mark_engine`): what
    the steps started outside their groups (``setsid``, daemons), which the engine would have
    ended after the step.

``python -m opals_dsl.runtime.reaper run`` (the lifeline of ``opf run`` with an embedded cluster)
    Lines of JSON: ``{"marker": RUN_ID}`` once, then ``{"pid": P, "created": T}`` for each
    process of the cluster. At the end, :func:`end_run` ends those processes (a recorded pid
    counts only with its creation time, so a reused pid is never hit), their descendants, the
    process groups they lead, and every process whose environment carries ``OPF_RUN_ID=RUN_ID``
    (steps that left their parent's tree). So an embedded cluster dies with its driver within a
    few seconds, whatever killed the driver.

A cluster that ``opf run`` launches elsewhere (over SSH, through Slurm or PBS) has a lifeline of
its own, :func:`opals_dsl.runtime.batch.lifeline_main`, on the same pipe protocol (:func:`follow`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

#: the environment variable that marks every process a run starts (engines, steps)
MARKER = "OPF_RUN_ID"
#: seconds between SIGTERM and SIGKILL
GRACE = 2.0
#: looks at most for what a run left (what was ended may have started more)
ROUNDS = 5


class _Stop(Exception):
    pass


def _on_term(signum: int, frame: Any) -> None:
    raise _Stop


def follow(take: Callable[[bytes], None]) -> bool:
    """Pass each line of standard input to ``take`` until end of file or SIGTERM (True: the
    owner is gone, end what it left) or a line ``done`` (False: nothing to end)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_term)
    try:
        for line in sys.stdin.buffer:
            line = line.strip()
            if line == b"done":
                return False
            with contextlib.suppress(ValueError):
                take(line)
    except _Stop:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the clean-up finish
    return True


def end_groups(groups: Iterable[int], grace: float = GRACE) -> None:
    """SIGTERM (and SIGCONT) to each process group, SIGKILL to what is left after ``grace``."""
    def left(pgids: list[int]) -> list[int]:
        return [pgid for pgid in pgids if _signalled(os.killpg, pgid, 0)]

    _end([g for g in groups if g > 1 and g != os.getpgrp()], os.killpg, left, grace)


def _end(targets: list[int], send: Callable[[int, int], None],
         left: Callable[[list[int]], list[int]], grace: float) -> None:
    """SIGTERM and SIGCONT (so that a stopped one sees it) to each of ``targets`` with
    ``send`` (``os.kill`` or ``os.killpg``), then SIGKILL to those that ``left`` still finds
    after ``grace`` seconds."""
    sent = [t for t in targets
            if _signalled(send, t, signal.SIGTERM) and _signalled(send, t, signal.SIGCONT)]
    deadline = time.monotonic() + grace
    while sent and time.monotonic() < deadline:
        time.sleep(0.05)
        sent = left(sent)
    for target in sent:
        _signalled(send, target, signal.SIGKILL)


def _signalled(send: Callable[[int, int], None], target: int, sig: int) -> bool:
    """Send ``sig`` to ``target``; False if it is gone (or not this user's)."""
    try:
        send(target, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def marked_pids(name: str, value: str, among: Iterable[int] | None = None) -> list[int]:
    """The processes (of ``among``, else all) other than this one whose environment holds
    ``name=value``, read from ``/proc`` (Linux; elsewhere none). Standard library only, as a
    lifeline runs without site packages. A process that has ended (a zombie) has none."""
    needle = f"{name}={value}".encode("utf-8", "surrogateescape")
    me = os.getpid()
    if among is None:
        try:
            among = [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
        except OSError:
            return []
    found = []
    for pid in among:
        if pid == me:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(pid)
        except OSError:  # gone, or another user's
            continue
    return found


def end_marked(name: str, value: str, grace: float = GRACE) -> list[int]:
    """SIGTERM (and SIGCONT) to every process marked ``name=value``, SIGKILL to those still
    marked after ``grace`` seconds; their process ids. As :func:`end_run`, it looks again
    once they have ended, for what they started meanwhile (which carries the mark too)."""
    ended: list[int] = []
    for _ in range(ROUNDS):
        pids = marked_pids(name, value)
        if not pids:
            break
        _end(pids, os.kill, lambda left: marked_pids(name, value, left), grace)
        ended += [pid for pid in pids if pid not in ended]
    return ended


def marked(marker: str) -> list[Any]:
    """The processes (psutil) whose environment carries ``OPF_RUN_ID=marker``."""
    import psutil

    found = []
    for pid in marked_pids(MARKER, marker):
        with contextlib.suppress(psutil.Error):
            found.append(psutil.Process(pid))
    return found


def live_processes(records: Iterable[dict[str, Any]]) -> list[Any]:
    """The recorded processes (``{"pid", "created"}``) that still run — same pid *and*
    creation time, so a reused pid is not taken for one — with their descendants."""
    import psutil

    found: dict[int, Any] = {}
    for rec in records:
        try:
            proc = psutil.Process(int(rec["pid"]))
            if abs(proc.create_time() - float(rec["created"])) > 0.01:
                continue
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            found[proc.pid] = proc
        except (psutil.Error, KeyError, ValueError, TypeError):
            continue
    if not found:
        return []
    # the descendants, from one look at every process's parent (psutil's children() would
    # read them all again for each recorded process)
    kids: dict[int, list[Any]] = {}
    for proc in psutil.process_iter(["ppid"]):
        ppid = proc.info.get("ppid")
        if ppid:
            kids.setdefault(ppid, []).append(proc)
    todo = list(found)
    while todo:
        for child in kids.get(todo.pop(), ()):
            if child.pid not in found:
                found[child.pid] = child
                todo.append(child.pid)
    return list(found.values())


def end_run(records: Iterable[dict[str, Any]], marker: str | None,
            grace: float = GRACE) -> list[Any]:
    """End a run's processes: the recorded ones (``{"pid", "created"}``, checked against the
    creation time), their descendants, the process groups any of them leads, and every process
    marked with ``marker``. SIGTERM first, SIGKILL after ``grace``. Returns what was found.

    A process may start another while it is being ended (an engine starting its nanny, a step
    its tool): the look is taken again until it finds nothing, a few rounds at most."""
    records = list(records)
    ended: dict[int, Any] = {}
    for _ in range(ROUNDS):
        found = {proc.pid: proc for proc in live_processes(records)}
        if marker:
            for proc in marked(marker):
                found.setdefault(proc.pid, proc)
        for pid in (os.getpid(), os.getppid()):
            found.pop(pid, None)
        if not found:
            break
        _end_processes(list(found.values()), grace)
        ended.update(found)
    return list(ended.values())


def _end_processes(procs: list[Any], grace: float) -> None:
    import psutil

    groups = set()
    for proc in procs:
        with contextlib.suppress(OSError):
            if os.getpgid(proc.pid) == proc.pid:  # it leads a group: a step, an engine ...
                groups.add(proc.pid)
    groups.discard(os.getpgrp())
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
            os.killpg(pgid, signal.SIGCONT)
    alive = _wait_gone(procs, grace)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    _wait_gone(alive, max(grace, 0.5))


def _wait_gone(procs: list[Any], timeout: float) -> list[Any]:
    """Wait up to ``timeout`` seconds for ``procs`` to end; those still running. A zombie
    (ended, not yet reaped by its parent — which may be a slow init) counts as ended."""
    import psutil

    deadline = time.monotonic() + timeout
    alive = list(procs)
    while True:
        still = []
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    still.append(proc)
        alive = still
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.02)


def _groups_main(mark: str | None) -> int:
    groups: set[int] = set()

    def take(line: bytes) -> None:
        if line.startswith(b"+"):
            groups.add(int(line[1:]))
        elif line.startswith(b"-"):
            groups.discard(int(line[1:]))

    if follow(take):
        end_groups(groups)
        if mark and "=" in mark:
            end_marked(*mark.split("=", 1))
    return 0


def _run_main() -> int:
    marker: list[str] = []
    records: list[dict[str, Any]] = []

    def take(line: bytes) -> None:
        item = json.loads(line)
        if isinstance(item, dict) and "marker" in item:
            marker.append(str(item["marker"]))
        elif isinstance(item, dict):
            records.append(item)

    if follow(take):
        end_run(records, marker[-1] if marker else None)
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["groups"] and len(argv) <= 2:
        return _groups_main(argv[1] if len(argv) == 2 else None)
    if argv == ["run"]:
        return _run_main()
    print("usage: python -m opals_dsl.runtime.reaper groups [NAME=VALUE] | run",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
