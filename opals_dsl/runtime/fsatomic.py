"""Files that only ever appear complete: the one atomic-write mechanism of opf.

:func:`atomic_copy` and :func:`write_atomic` write to ``<folder>/.<name>.opf-tmp-<hex>`` beside
the destination (the hex digits name the writer's host and process), flush it to disk, rename it
over the destination and flush the folder: a destination is either as before or complete, never
truncated. :func:`atomic_copies` does the same for many files with one flush phase: all temporaries
written, then flushed together, then renamed; its phases are there one by one
(:func:`write_temporaries`, :func:`flush_each` or :func:`flush_soon` in the background,
:func:`place`) for a caller that flushes the copies of many tasks together. On any error the
temporary is removed and the error raised again. The writer holds a lock on the temporary while it
writes.
:func:`is_temp_name` recognises such temporaries; :func:`remove_abandoned_temporaries` removes
those of a folder whose writer is provably gone (nobody holds the lock, and a writer of this
host no longer runs; one of another host must also be unchanged for :data:`FOREIGN_GRACE`
seconds), never one that is still being written.

Standard library only: engines import it (copy-back, shared files), as do the journal, the
cluster record, ``opf fmt`` and ``opf report``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import secrets
import socket
import stat
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

# this host's tag in temporary names, computed once
_HOST_TAG: list[str] = []

#: a temporary file's name starts with this prefix ...
TEMP_PREFIX = "."

#: ... and holds this tag, followed by hex digits: its writer's host (8), process id (8) and
#: 8 random ones
TEMP_TAG = ".opf-tmp-"

#: a temporary written on another host is removed only when nobody holds its lock and it has
#: not changed for this long (seconds): a shared drive may not show one host's locks to another
FOREIGN_GRACE = 3600.0

_TEMP_RE = re.compile(r"\..+\.opf-tmp-[0-9a-f]+\Z", re.DOTALL)


_OWNER_RE = re.compile(r"\.opf-tmp-([0-9a-f]{8})([0-9a-f]{8})[0-9a-f]{8}\Z")

_NAME_MAX = 255  # bytes in a file name, where the file system does not say


def is_temp_name(name: str) -> bool:
    """True if ``name`` (a base name or a path) is a temporary written by :func:`atomic_copy`."""
    return _TEMP_RE.match(os.path.basename(name)) is not None


def atomic_copy(src: str, dst: str) -> int:
    """Copy ``src`` to ``dst`` so that ``dst`` only ever appears complete; return the bytes copied.

    Missing folders of ``dst`` are created. The data goes to a temporary beside ``dst``, is
    flushed to disk and renamed into place; the folder is flushed too. On any error the temporary
    is removed and the error re-raised, leaving ``dst`` as it was.
    """
    try:
        return atomic_copies([(src, dst)])[0]
    except CopyError as exc:
        raise exc.error from None


class CopyError(Exception):
    """:func:`atomic_copies` failed on its pair number ``index`` with the OSError ``error``."""

    def __init__(self, index: int, error: OSError) -> None:
        super().__init__(index, error)
        self.index, self.error = index, error


# the flush and the rename of atomic_copies, and the advice that starts writing a copy out, by
# name so that a test can watch their order
_flush = os.fsync
_advise = getattr(os, "posix_fadvise", None)
_rename = os.replace


#: at most this many temporaries of :func:`atomic_copies` are open at once (each holds a
#: descriptor, for its lock)
BATCH = 256


def atomic_copies(pairs: Sequence[tuple[str, str]],
                  folders: set[str] | None = None) -> list[int]:
    """Copy each ``(src, dst)`` pair as :func:`atomic_copy` does; return the bytes of each.

    In three phases, so that one flush phase serves them all: every temporary is written (the
    bytes moved by the kernel, ``copy_file_range``), then all are flushed to disk at once (one
    ``fsync`` each, issued together), then renamed into place; each folder is flushed once at the
    end. No destination is renamed before every temporary is flushed. A failure raises
    :class:`CopyError`; the temporaries not yet renamed are removed, so a failure before the
    renames leaves every destination as it was. More than :data:`BATCH` pairs go in turns of
    that many (each turn's destinations are in place before the next turn starts).

    Given ``folders``, the destination folders are added to it instead of being flushed: the
    caller flushes them (:func:`fsync_folder`), once for the copies of many calls. Until then a
    crash may undo a rename — leaving the destination as it was before, never incomplete.
    """
    made: set[str] = set()
    sizes: list[int] = []
    for first in range(0, len(pairs), BATCH):
        sizes += _copy_turn(pairs[first:first + BATCH], first, made)
    if folders is not None:
        folders.update(made)
        return sizes
    for folder in sorted(made):
        fsync_folder(folder)
    return sizes


def _copy_turn(pairs: Sequence[tuple[str, str]], first: int, made: set[str]) -> list[int]:
    """The three phases of :func:`atomic_copies` for ``pairs``, number ``first`` and on; adds
    the destination folders to ``made``."""
    temps = write_temporaries(pairs, first, made)
    try:
        _flush_all([t.fd for t in temps], first)
    except BaseException:
        discard(temps)
        raise
    place(temps, first)
    return [t.size for t in temps]


class Temporary:
    """A copy written beside its destination ``dst`` as ``tmp``, still open (and locked) as
    ``fd``, ``size`` bytes; not yet flushed, not yet in place."""

    __slots__ = ("tmp", "fd", "dst", "size")

    def __init__(self, tmp: str, fd: int, dst: str) -> None:
        self.tmp, self.fd, self.dst, self.size = tmp, fd, dst, 0


def write_temporaries(pairs: Sequence[tuple[str, str]], first: int = 0,
                      made: set[str] | None = None) -> list[Temporary]:
    """The first phase of :func:`atomic_copies`: each ``(src, dst)`` pair copied into a new
    temporary beside ``dst`` (missing folders created, each added to ``made``). The caller
    flushes them (:func:`flush_each`) and puts them in place (:func:`place`), or drops them
    (:func:`discard`). A failure raises :class:`CopyError` (pairs numbered from ``first``) and
    leaves no temporary behind."""
    made = set() if made is None else made
    temps: list[Temporary] = []
    try:
        for i, (src, dst) in enumerate(pairs, first):
            try:
                dst = os.path.abspath(dst)
                folder, name = os.path.split(dst)
                if folder not in made:
                    os.makedirs(folder, exist_ok=True)
                    made.add(folder)
                temp = Temporary(*_create_temporary(folder, name, 0o666), dst)
                temps.append(temp)
                temp.size = _copy_into(src, temp.fd)
            except OSError as exc:
                raise CopyError(i, exc) from exc
    except BaseException:
        discard(temps)
        raise
    return temps


def place(temps: Sequence[Temporary], first: int = 0) -> None:
    """Rename each flushed temporary over its destination, in order; the descriptors are
    closed (the locks let go) once each has its final name. A rename that fails raises
    :class:`CopyError` (numbered from ``first``); the temporaries after it are removed, those
    before it stay in place."""
    renamed = 0
    try:
        for temp in temps:
            try:
                _rename(temp.tmp, temp.dst)
            except OSError as exc:
                raise CopyError(first + renamed, exc) from exc
            renamed += 1
    finally:
        for temp in temps[:renamed]:
            os.close(temp.fd)
        discard(temps[renamed:])


def discard(temps: Sequence[Temporary]) -> None:
    """Remove temporaries that will not be put in place, and close them."""
    for temp in temps:
        with contextlib.suppress(OSError):
            os.unlink(temp.tmp)
        with contextlib.suppress(OSError):
            os.close(temp.fd)


def _flush_all(fds: list[int], first: int) -> None:
    """Flush every descriptor to disk (:func:`flush_each`); raise :class:`CopyError` (numbered
    from ``first``) for the first that fails."""
    for i, exc in enumerate(flush_each(fds), first):
        if exc is not None:
            raise CopyError(i, exc) from exc


def flush_each(fds: Sequence[int]) -> list[OSError | None]:
    """Flush every descriptor to disk, the flushes issued together (a file system can then
    commit them as one); the error of each, or None."""
    if len(fds) < 2:
        return [_flush_one(fd) for fd in fds]
    with ThreadPoolExecutor(min(len(fds), 8)) as pool:
        return list(pool.map(_flush_one, fds))


#: the threads of :func:`flush_soon`, started when first needed; they live as long as the process
_FLUSHER: list[ThreadPoolExecutor] = []


def flush_soon(fds: Sequence[int]) -> list[Future[OSError | None]]:
    """Start flushing each descriptor to disk in the background, while the caller goes on; a
    future per descriptor gives its error, or None. The caller keeps each descriptor open until
    its future is done (:func:`concurrent.futures.wait`), and cancels those not started yet
    before it gives up on them."""
    if not _FLUSHER:
        _FLUSHER.append(ThreadPoolExecutor(8, thread_name_prefix="opf-flush"))
    return [_FLUSHER[0].submit(_flush_one, fd) for fd in fds]


def _flush_one(fd: int) -> OSError | None:
    try:
        _flush(fd)
    except OSError as exc:
        return exc
    return None


def _copy_into(src: str, fd: int) -> int:
    """Copy the file ``src`` into the empty file open as ``fd`` (data and permission bits)
    inside the kernel where it can; return the bytes copied."""
    with open(src, "rb") as fin:
        st = os.fstat(fin.fileno())
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), src)
        copied = 0
        with contextlib.suppress(_NoFastCopy):
            copied = _kernel_copy(fin.fileno(), fd)
        if copied == 0:  # nothing done in the kernel: the same in user space
            fin.seek(0)
            written = 0  # the bytes handed to the disk so far
            while chunk := fin.read(1 << 20):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
                copied += len(chunk)
                written = _write_out(fd, written, copied)
    with contextlib.suppress(OSError):  # some shared drives refuse chmod; data matters
        os.fchmod(fd, stat.S_IMODE(st.st_mode))
    return copied


def _write_out(fd: int, written: int, copied: int) -> int:
    """Once a copy into ``fd`` has :data:`WRITEBACK_CHUNK` bytes or more past the ``written``
    ones (of ``copied``), have the kernel start writing them to disk, without waiting for it;
    return the bytes handed to the disk so far.

    A large copy is so written out while the rest is copied, and its flush before the rename
    finds little left to write instead of all of it (the flush is what makes the file durable;
    this only starts it early). Linux starts the writeback on ``POSIX_FADV_DONTNEED`` (and drops
    the pages of the range that are clean already, which the copy does not read again); where
    that advice is not known or not taken, nothing happens."""
    if copied - written < WRITEBACK_CHUNK:
        return written
    if _advise is not None:
        with contextlib.suppress(OSError):
            _advise(fd, written, copied - written, os.POSIX_FADV_DONTNEED)
    return copied


class _NoFastCopy(Exception):
    """The kernel cannot copy between these two files; nothing was copied."""


_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF,
                   errno.ETXTBSY, errno.EPERM}


#: bytes of a copy that are handed to the disk together (:func:`_write_out`)
WRITEBACK_CHUNK = 16 << 20


def _kernel_copy(infd: int, outfd: int) -> int:
    """Copy all of ``infd`` to ``outfd`` with ``copy_file_range`` (else ``sendfile``), in
    chunks of :data:`WRITEBACK_CHUNK` bytes, each handed to the disk once it is copied."""
    copied = written = 0
    for call in (os.copy_file_range, os.sendfile):
        try:
            while n := (call(infd, outfd, WRITEBACK_CHUNK) if call is os.copy_file_range
                        else os.sendfile(outfd, infd, None, WRITEBACK_CHUNK)):
                copied += n
                written = _write_out(outfd, written, copied)
            return copied
        except OSError as exc:
            if copied or exc.errno not in _NO_KERNEL_COPY:
                raise
    raise _NoFastCopy


def remove_abandoned_temporaries(folder: str) -> list[str]:
    """Remove the temporaries in ``folder`` whose writer is provably gone; return their paths.

    A temporary is abandoned when nobody holds its lock (its writer holds one until the rename)
    and, for one written on this host, its writer's process is gone; for one written on another
    host, when nobody holds its lock and it has not changed for :data:`FOREIGN_GRACE` seconds.
    Temporaries that name no writer (older versions of opf) go when nobody holds their lock.
    Everything else, and every file that is not a temporary, stays.
    """
    try:
        with os.scandir(folder) as entries:
            found = [e.path for e in entries
                     if is_temp_name(e.name) and e.is_file(follow_symlinks=False)]
    except OSError:
        return []
    return [path for path in sorted(found) if _remove_if_abandoned(path)]


@contextlib.contextmanager
def replacing(dst: str, mode: int = 0o666) -> Iterator[str]:
    """A temporary path beside ``dst``: what the block writes there (flushed by the block) is
    renamed into place when it ends and the folder is flushed; on any error the temporary is
    removed instead and ``dst`` stays as it was.

    The temporary exists (empty, created with ``mode``) when the block starts, and this process
    holds an exclusive ``flock`` on it until after the rename: that lock is what tells
    :func:`remove_abandoned_temporaries` that it is still being written.
    """
    folder, name = os.path.split(dst)
    tmp, fd = _create_temporary(folder, name, mode)
    try:
        try:
            yield tmp
            os.replace(tmp, dst)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    finally:
        os.close(fd)  # releases the lock, once the temporary has its final name (or none)
    fsync_folder(folder)


def _temp_path(folder: str, name: str) -> str:
    """A fresh temporary name for ``name`` in ``folder``: ``.<name>.opf-tmp-<owner><random>``,
    the name cut short (by bytes) where the whole would not fit the file system's name limit."""
    tag = f"{TEMP_TAG}{_host_tag()}{os.getpid() & 0xFFFFFFFF:08x}{secrets.token_hex(4)}"
    raw = os.fsencode(name)
    room = _name_max(folder) - len(os.fsencode(TEMP_PREFIX + tag))
    if len(raw) > room:
        raw = raw[:max(room, 1)]
    return os.path.join(folder, TEMP_PREFIX + os.fsdecode(raw) + tag)


def _create_temporary(folder: str, name: str, mode: int) -> tuple[str, int]:
    """Create a new temporary for ``name`` in ``folder`` and lock it; its path and descriptor."""
    while True:
        tmp = _temp_path(folder, name)
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        except FileExistsError:  # the random part repeated: draw again
            continue
        try:
            # only a sweeper looking at it can hold it now, for a moment; where the file
            # system cannot lock, the owner in the name is what proves it alive
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX)
            if same_file(tmp, fd):
                return tmp, fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # a sweeper took it for abandoned before the lock: take another name


def _remove_if_abandoned(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:  # its writer holds it
            return False
        except OSError:  # this file system cannot lock
            locked = False
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) and same_file(path, fd)):
            return False
        if not _abandoned(os.path.basename(path), locked, st.st_mtime):
            return False
        os.unlink(path)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _abandoned(name: str, locked: bool, mtime: float) -> bool:
    """Is the temporary ``name`` proven abandoned? ``locked``: this process holds its lock
    (False where the file system cannot lock; a temporary whose lock is held by another process
    never gets here)."""
    owner = _OWNER_RE.search(name)
    if owner is None:  # written before temporaries named their writer
        return locked
    if owner.group(1) == _host_tag():  # nobody holds it, and its writer is gone
        return not _alive_since(int(owner.group(2), 16), mtime)
    return locked and time.time() - mtime > FOREIGN_GRACE


def _alive_since(pid: int, mtime: float) -> bool:
    """Might process ``pid`` of this host be the one that last wrote a file at ``mtime``?

    False when no such process runs, when it is a zombie, or when it started after the file
    was last written (its id was reused); True when it cannot be told."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, owned by another user
        pass
    info = _process_start(pid)
    if info is None:
        return True
    state, started = info
    if state in ("Z", "X"):
        return False
    return started is None or started <= mtime + 2.0  # the start time is known to ~1 s


def _process_start(pid: int) -> tuple[str, float | None] | None:
    """A process's state letter and start time (seconds since the epoch), from ``/proc``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        state, ticks = fields[0].decode(), int(fields[19])
    except (OSError, IndexError, ValueError):
        return None
    try:
        with open("/proc/stat", "rb") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith(b"btime "))
        return state, boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, ValueError, IndexError):
        return state, None


def same_file(path: str, fd: int) -> bool:
    """Does ``path`` still name the file open as ``fd``?"""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def _host_tag() -> str:
    """8 hex digits for this host in temporaries' names."""
    if not _HOST_TAG:
        _HOST_TAG.append(hashlib.sha256(socket.gethostname().encode(
            "utf-8", "surrogateescape")).hexdigest()[:8])
    return _HOST_TAG[0]


def _name_max(folder: str) -> int:
    try:
        return min(int(os.pathconf(folder, "PC_NAME_MAX")), _NAME_MAX)
    except (OSError, ValueError, TypeError):
        return _NAME_MAX


def output_target(path: str) -> tuple[str, bool]:
    """Where a file the user named for writing (``-o PATH``) really is, and whether it is to be
    replaced atomically: a link is followed (the file it names is written, the link stays), and
    an existing device, pipe or socket (``/dev/null``, ``/dev/stdout``, a FIFO) is written into
    as it is — renaming a temporary over it would replace the device with a plain file.
    ``/dev/stdout`` on a pipe is such a one: its link names no path (``pipe:[...]``), so the
    name given is opened as it is."""
    real = os.path.realpath(path)
    try:
        st = os.stat(path)
    except OSError:
        return real, True
    if not stat.S_ISREG(st.st_mode):
        return (real if os.path.exists(real) else path), False
    return real, True


def write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that it only ever appears complete (as :func:`atomic_copy`
    does): a temporary beside it, flushed to disk, renamed into place."""
    with replacing(path, 0o644) as tmp:
        fd = os.open(tmp, os.O_WRONLY)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems cannot sync a folder; the rename is done
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)
