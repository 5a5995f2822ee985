"""The task folder's lock, on an engine: an exclusive ``flock`` that waits for the holder,
except a holder that has been stopped (SIGSTOP, a debugger) for :data:`STOPPED_HOLDER_WAIT`
seconds, which is reported instead of waited for forever (:class:`HeldByStopped`).

:func:`remove_abandoned` clears the task folders whose lock file outlived its holder: an engine
killed (``kill -9``, its machine lost) while it ran the task.

Standard library only: engines import it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterable, Iterator

from .fsatomic import same_file
from .paths import is_component, remove_tree

#: seconds a task waits for its task folder's lock while the holder is a stopped process
STOPPED_HOLDER_WAIT = 10.0

#: seconds between two tries of a task folder's lock that another process holds
LOCK_POLL = 0.1


class HeldByStopped(Exception):
    """A task folder's lock is held by a process of this machine that stays stopped."""

    def __init__(self, pid: int, waited: float) -> None:
        super().__init__(f"held by stopped process {pid}")
        self.pid = pid
        self.waited = waited


def lock(path: str) -> tuple[str, int]:
    """Hold an exclusive lock on the file ``path`` (created if need be), waiting for it.

    A waiter polls; if the holder (found in ``/proc/locks``) is a process of this machine that
    stays stopped (``kill -STOP``: an engine taken for lost, frozen) for
    :data:`STOPPED_HOLDER_WAIT` seconds, it gives up with :class:`HeldByStopped` rather than
    wait for ever. A holder that runs is waited for, however long it takes.
    """
    stopped_since: float | None = None
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    pass
                holder = _holder(fd)
                if holder is not None and _is_stopped(holder):
                    now = time.monotonic()
                    stopped_since = stopped_since if stopped_since is not None else now
                    if now - stopped_since >= STOPPED_HOLDER_WAIT:
                        raise HeldByStopped(holder, now - stopped_since)
                else:
                    stopped_since = None
                time.sleep(LOCK_POLL)
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return path, fd
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the file was removed by its last holder: lock the new one


def _holder(fd: int) -> int | None:
    """The process that holds the flock on the file of ``fd``, from ``/proc/locks`` (Linux;
    elsewhere None). Read only while waiting: the holder writes nothing, so taking a lock
    costs no write (a write makes ext4 flush the file when it is closed)."""
    try:
        st = os.fstat(fd)
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    ino = f":{st.st_ino} "
    found: dict[str, int] = {}
    for line in lines:
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF"; waiters have "->" after the id
        if len(parts) >= 6 and parts[1] == "FLOCK" and ino in f"{parts[5]} ":
            with contextlib.suppress(ValueError):
                found[parts[5]] = int(parts[4])
    exact = found.get(f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}")
    if exact is not None:
        return exact
    return next(iter(found.values())) if len(found) == 1 else None  # st_dev may differ


def _is_stopped(pid: int) -> bool:
    """True if process ``pid`` of this machine is stopped (Linux; elsewhere always False)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    state = data[data.rfind(b")") + 2:][:1]
    return state in (b"T", b"t")


def unlock(path: str, fd: int) -> None:
    with contextlib.suppress(OSError):  # removed while held, so that none piles up
        os.unlink(path)
    os.close(fd)


def unheld(folder: str, names: Iterable[str]) -> Iterator[str]:
    """The lock files ``folder/NAME`` (for each of ``names``) that nobody holds, each yielded
    while this process holds it exclusively and let go once the caller goes on: the caller
    removes what the lock guards, then the lock file. One that another process holds, or that
    is gone or replaced meanwhile, is skipped."""
    for name in names:
        path = os.path.join(folder, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held: in use
                continue
            if same_file(path, fd):
                yield path
        finally:
            os.close(fd)


def remove_abandoned(locks: str, folders: str) -> list[str]:
    """Remove the task folders of ``folders`` whose lock file in ``locks`` nobody holds; return
    their names.

    A task that ends removes its lock file while it still holds it, so a lock file that can be
    taken at once was left by a holder that was killed: its task folder (staged inputs, partial
    outputs) serves nobody. The folder goes while its lock is held, then the lock file, so a
    task waiting for that lock starts in an empty place (:func:`lock` takes the new file). A
    held lock (a task running, a holder stopped) is left alone, and so is a task folder without a
    lock file: one kept after a failure.
    """
    try:
        names = sorted(name for name in os.listdir(locks) if is_component(name))
    except OSError:
        return []
    removed = []
    for path in unheld(locks, names):
        name = os.path.basename(path)
        try:
            remove_tree(os.path.join(folders, name))
            os.unlink(path)
        except OSError:  # it cannot be removed: leave it
            continue
        removed.append(name)
    return removed
