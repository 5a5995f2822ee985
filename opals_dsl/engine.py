"""The engine side of ``opf run``: what one ipyparallel engine does with the tasks it is given.

The runtime (driver side) turns each task of the plan into a plain-dict *request* and ships
batches of them to :func:`run_tasks`, which runs inside the engine and answers with one plain-dict
*result* per request. This module imports only the standard library, so it is cheap to import on
an engine and carries no driver-side state.

Folders
    Every engine works below a scratch root: the request's ``scratch`` if given, else
    ``$OPF_SCRATCH`` on the engine, else the system temp folder, resolved to an absolute real path
    (:func:`identify` reports it). A job's shared files live in the *job folder*
    ``<scratch>/opf/<pipeline>/<job>/<key>/``, where ``<key>`` is 16 hex digits of a hash of
    what is in it (the pipeline folder, and each shared file's source path, size, modification
    time and name): one folder per content, so runs that stage different shared files (other
    params, another project with the same pipeline name) never share one. Each task works in
    ``<job folder>/<task id>/``, so a command sees the shared files as ``../<name>``. A machine
    is "host name + scratch root": engines with the same pair share job folders.

The four phases of a task, each a node of the plan with one row in the result's ``trace``
    1. *Machine stage* (``stage:JOB``, the Job Prephase). The key of the shared file set picks
       the job folder. The engine takes a shared ``flock`` on
       ``<scratch>/opf/<pipeline>/<job>/.<key>.lock`` and keeps it until it needs another job
       folder of this job or ends, so a folder is never removed while an engine uses it. If the
       marker file ``<job folder>/.opf-staged`` holds the (full) key, there is nothing to do:
       status ``cached``. Otherwise, under an exclusive lock on
       ``<scratch>/opf/<pipeline>/.<job>.lock`` (and if the marker still does not hold the key),
       the marker is removed, temporaries of a killed stage are cleared, each shared file is
       copied in through a temporary name and renamed into place (a source that changes while
       it is copied fails the stage), and the marker is written last, so an interrupted stage
       never looks finished; status ``done``. Concurrent engines of a machine therefore copy
       once: the first does the work, the others wait on the lock and find the marker. After
       staging, the job's other job folders that no engine holds (their lock can be taken
       exclusively at once) are removed, their marker first.
    2. *Task stage* (``stage:JOB/TASK``, the Task Prephase). Every path is checked first: the
       task folder must be one folder inside the job folder, and every ``local``, every declared
       output and every copy-back source must lie inside the task folder (shared names inside
       the job folder); a request that breaks this is refused with failure kind ``stage``. The
       task then takes an exclusive lock (``<pipeline>/<job>/.<key>.tasks/<task id>``, held
       until its copy-back is done): an engine of the same machine still running the same task
       — work a killed driver had handed out, or an engine taken for lost — is waited for, never
       run over; but a holder that stays stopped (``kill -STOP``) for
       :data:`STOPPED_HOLDER_WAIT` seconds fails the stage, naming it.
       A leftover task folder of an earlier attempt is removed, the folder is created and
       every input is copied to its ``local`` path (subfolders such as
       ``dem/strip11/`` are created). Each input is checked before and after its copy: one that
       changes meanwhile (still being written) fails the stage, so a step never reads a torn
       copy. The result's ``staged`` gives each input's ``[size, mtime_ns]`` as copied (plus its
       SHA-256 when the request says ``checksum``, computed while copying), ``shared`` the same
       for the shared files.
    3. *Exec* (``exec:JOB/TASK/STEP``, the Mainphase), one step after the other with the task
       folder as working directory; each step's output goes to ``<logs>/<step>.log``, which starts
       with the command line. An ``argv`` step runs without a shell, each word passed exactly as
       given, stdin from ``/dev/null``; the first word ``python`` means this engine's interpreter,
       a first word containing ``/`` is a path relative to the task folder, any other is looked up
       on the engine's PATH. The folders of the declared outputs (``out x = "sub/f.asc"``) are
       created before the step runs. The environment is the engine's plus ``OPF_TASK``,
       ``OPF_JOB`` and the request's ``run_id`` as ``OPF_RUN_ID``. The step runs in a session
       (and so a process group) of its own: when it ends, what it left running in its group is
       killed; when the engine is interrupted while it waits (SIGINT, an engine shutting down)
       the whole group gets SIGTERM, then SIGKILL after :data:`STOP_GRACE` seconds; and the
       engine's *lifeline* (:mod:`opals_dsl.reaper`, a small process started with the first
       step) ends every group still running should the engine die, ``kill -9`` included. A
       log that cannot be written fails the step with kind ``log``, naming the state folder's
       disk when it is full. A ``call`` step imports ``package.module`` with the pipeline's
       folder on ``sys.path`` and calls ``function(**kwargs)`` in this process, with the working
       directory, ``sys.stdout``/``sys.stderr`` and file descriptors 1 and 2 switched to the task
       folder and the log for the duration and restored afterwards, whatever happens. A module
       imported for a ``call`` is imported afresh when its file changed since, or when this
       pipeline's folder has a module of that name elsewhere (an engine serves many runs). After
       a step, each declared output must exist as a file.
    4. *Copy-back* (``copyback:JOB/TASK``, the Task Postphase). Each ``[local, destination]``
       pair is copied with :func:`atomic_copy` (the destination joined with the request's
       ``root``), then the task folder is removed. If anything before failed, nothing is copied
       back and the task folder is kept for inspection. The result's ``outputs`` gives each
       destination's ``[size, mtime_ns]`` once it is in place (a journal records them). When
       the request carries a ``receipt``, a line of JSON — the receipt's record plus
       ``staged``, ``shared``, ``outputs`` and ``landed`` — is then appended to
       ``<receipt folder>/<run>-<host>-<pid>.jsonl`` (:meth:`opals_dsl.journal.Journal.stamp`).

Failures
    :func:`run_tasks` does not raise for a task's own failure; the result's ``failure`` says which
    node failed, of what ``kind`` (``stage``, ``not-found``, ``exit``, ``exception``,
    ``missing-output``, ``log``, ``copyback``), the return code when there is one, a
    one-sentence message, the log file, its last lines (decoded as UTF-8, undecodable bytes
    replaced) and the task folder kept for inspection (None when there is none). Each trace
    row holds ``node``, ``kind``, ``start``/``end`` (``time.time()``),
    ``status`` (``done``, ``cached`` or ``failed``) and ``bytes`` (bytes copied by a stage or
    copy-back node, the size of the declared outputs for an exec node); the row of the node that
    failed also holds the failure's ``returncode`` and ``message``. A full disk (or quota, or file
    size limit) is named as such in the message, and so is a destination whose folder path runs
    into a file.

Atomic copies
    :func:`atomic_copy` writes to ``<folder>/.<name>.opf-tmp-<host><pid><random>`` beside the
    destination (8 hex digits each: a hash of the host name, the process id, random; ``name`` is
    cut short, by bytes, where the whole would exceed the folder's name limit, at most 255
    bytes), flushes it to disk, renames it over the destination and flushes the folder: a
    destination is either as before or complete, never truncated. The writer holds an exclusive
    ``flock`` on the temporary from its creation until after the rename. On any error the
    temporary is removed and the error raised again. :func:`is_temp_name` recognises such
    temporaries; :func:`remove_abandoned_temporaries` removes those of a folder whose writer is
    provably gone (nobody holds the lock, and a writer of this host no longer runs; one of
    another host must also be unchanged for :data:`FOREIGN_GRACE` seconds), never one that is
    still being written.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import importlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from typing import Any

#: a temporary file's name starts with this prefix ...
TEMP_PREFIX = "."
#: ... and holds this tag, followed by hex digits: its writer's host (8), process id (8) and
#: 8 random ones
TEMP_TAG = ".opf-tmp-"
#: a temporary written on another host is removed only when nobody holds its lock and it has
#: not changed for this long (seconds): a shared drive may not show one host's locks to another
FOREIGN_GRACE = 3600.0
#: the file in a job folder that says its shared files are complete, and for which file set
MARKER = ".opf-staged"
#: how many lines of a failed step's log are reported
TAIL_LINES = 20
#: seconds a step's process group gets between SIGTERM and SIGKILL when it is stopped
STOP_GRACE = 2.0
#: seconds a task waits for its task folder's lock while the holder is a stopped process
STOPPED_HOLDER_WAIT = 10.0
#: seconds between two tries of a task folder's lock that another process holds
LOCK_POLL = 0.1

_TEMP_RE = re.compile(r"\..+\.opf-tmp-[0-9a-f]+\Z", re.DOTALL)
_OWNER_RE = re.compile(r"\.opf-tmp-([0-9a-f]{8})([0-9a-f]{8})[0-9a-f]{8}\Z")
_NAME_MAX = 255  # bytes in a file name, where the file system does not say
_KEY_LEN = 16  # hex digits of the shared files' key in a job folder's name
_KEY_LOCK_RE = re.compile(rf"\.([0-9a-f]{{{_KEY_LEN}}})\.lock\Z")
_TAIL_BYTES = 64 * 1024

# a job's folder of folders -> (short key, descriptor) of the job folder this process holds a
# shared lock on (see _Task.use_job_folder), the most recently used last; at most _HOLD_MAX
_HELD: dict[str, tuple[str, int]] = {}
_HOLD_MAX = 64
# module imported for a call -> (its file, size, mtime_ns) when it was imported
_MODULES: dict[str, tuple[str, int, int]] = {}
# absolute scratch base as given -> resolved real path
_SCRATCH: dict[str, str] = {}
# the variables set for a task's steps, and their values in the engine's own environment
_TASK_VARS = ("OPF_TASK", "OPF_JOB", "OPF_RUN_ID")
_ENGINE_ENV = {name: os.environ.get(name) for name in _TASK_VARS}
# process groups of the steps running now, and the lifeline that ends them if this process dies
_GROUPS: set[int] = set()
_LIFELINE: subprocess.Popen | None = None


def identify(scratch: str | None = None) -> dict[str, Any]:
    """Who and where this engine is: host, process id, scratch root, machine id, interpreter."""
    root = _scratch_root(scratch)
    host = socket.gethostname()
    return {
        "host": host,
        "pid": os.getpid(),
        "scratch": root,
        "machine": f"{host}:{root}",
        "python": sys.executable,
    }


def job_folder(request: dict[str, Any]) -> str:
    """The job folder the task ``request`` would use on this engine, for its shared files as
    they are now (the folder need not exist)."""
    task = _Task(request, socket.gethostname())
    task.pick_job_folder(f"stage:{task.job}", request.get("machine_stage") or {})
    return task.job_dir


def is_temp_name(name: str) -> bool:
    """True if ``name`` (a base name or a path) is a temporary written by :func:`atomic_copy`."""
    return _TEMP_RE.match(os.path.basename(name)) is not None


def atomic_copy(src: str, dst: str) -> int:
    """Copy ``src`` to ``dst`` so that ``dst`` only ever appears complete; return the bytes copied.

    Missing folders of ``dst`` are created. The data goes to a temporary beside ``dst``, is
    flushed to disk and renamed into place; the folder is flushed too. On any error the temporary
    is removed and the error re-raised, leaving ``dst`` as it was.
    """
    dst = os.path.abspath(dst)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with _replacing(dst) as tmp:
        mode = stat.S_IMODE(os.stat(src).st_mode)
        shutil.copyfile(src, tmp)
        fd = os.open(tmp, os.O_WRONLY)
        try:
            os.fsync(fd)
            size = os.fstat(fd).st_size
            with contextlib.suppress(OSError):  # some shared drives refuse chmod; data matters
                os.fchmod(fd, mode)
        finally:
            os.close(fd)
    return size


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
def _replacing(dst: str, mode: int = 0o666) -> Iterator[str]:
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
    _fsync_folder(folder)


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
            if _same_file(tmp, fd):
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
        if not (stat.S_ISREG(st.st_mode) and _same_file(path, fd)):
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


def _same_file(path: str, fd: int) -> bool:
    """Does ``path`` still name the file open as ``fd``?"""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


_HOST_TAG: list[str] = []


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


def run_tasks(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run each task request in order and return one result per request.

    A task's own failure (a bad command, a missing output, a copy that fails, a ``call`` that
    raises ...) is reported in its result, never raised.
    """
    host = socket.gethostname()
    return [_run_one(request, host) for request in batch]


def _run_one(request: dict[str, Any], host: str) -> dict[str, Any]:
    try:
        task = _Task(request, host)
    except Exception as exc:  # a request without its essentials still gets an answer
        return _malformed(request, host, exc)
    return task.run()


def _malformed(request: Any, host: str, exc: Exception) -> dict[str, Any]:
    get = request.get if isinstance(request, dict) else (lambda key, default=None: default)
    scratch = identify(None)["scratch"]
    with contextlib.suppress(Exception):
        scratch = _scratch_root(get("scratch"))
    return {
        "job": get("job"), "task": get("task"), "attempt": get("attempt", 0), "ok": False,
        "host": host, "pid": os.getpid(), "scratch": scratch, "machine": f"{host}:{scratch}",
        "trace": [], "bytes_staged": 0, "bytes_copied": 0,
        "failure": {
            "node": None, "step": None, "kind": "stage", "returncode": None,
            "message": f"the task request cannot be read: {type(exc).__name__}: {exc}",
            "log": None, "tail": [], "task_dir": None,
        },
    }


class _Failed(Exception):
    """Ends a task: carries the result's ``failure`` dict."""

    def __init__(self, failure: dict[str, Any]) -> None:
        super().__init__(failure["message"])
        self.failure = failure


class _Task:
    def __init__(self, req: dict[str, Any], host: str) -> None:
        self.req = req
        self.pipeline = str(req["pipeline"])
        self.job = str(req["job"])
        self.task = str(req["task"])
        self.root = os.path.abspath(req.get("root") or os.getcwd())
        self.scratch = _scratch_root(req.get("scratch"))
        self.pipeline_dir = os.path.join(self.scratch, "opf", self.pipeline)
        # the job's folders, one per content of its shared files; the machine stage picks one
        self.jobs_dir = os.path.join(self.pipeline_dir, self.job)
        self.job_dir = self.jobs_dir
        self.task_dir = os.path.join(self.job_dir, self.task)
        logs = req.get("logs")
        self.logs = (
            os.path.abspath(logs)
            if logs
            else os.path.join(self.pipeline_dir, ".logs", self.job, self.task)
        )
        self.trace: list[dict[str, Any]] = []
        self.step: str | None = None
        self.logs_ready = False
        self.result: dict[str, Any] = {
            "job": req["job"],
            "task": req["task"],
            "attempt": req.get("attempt", 0),
            "ok": False,
            "host": host,
            "pid": os.getpid(),
            "scratch": self.scratch,
            "machine": f"{host}:{self.scratch}",
            "trace": self.trace,
            "bytes_staged": 0,
            "bytes_copied": 0,
            "failure": None,
            "shared": [],
            "staged": [],
            "outputs": [],
        }
        self.checksum = bool(req.get("checksum"))
        self.task_lock: tuple[str, int] | None = None

    # -- the task --------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        try:
            self.machine_stage()
            self.task_stage()
            env = {"OPF_TASK": self.task, "OPF_JOB": self.job}
            if self.req.get("run_id"):
                env["OPF_RUN_ID"] = str(self.req["run_id"])
            with _environment(env):
                for ex in self.req.get("execs") or ():
                    self.exec_step(ex)
            self.copyback()
            self.result["ok"] = True
            with contextlib.suppress(Exception):  # the results are in place, whatever happens
                self.write_receipt()
        except _Failed as failed:
            self.result["failure"] = failed.failure
        except Exception as exc:  # an unforeseen condition is still this task's failure
            self.result["failure"] = self.unexpected(exc)
        finally:
            if self.task_lock is not None:
                _unlock(*self.task_lock)
                self.task_lock = None
        if self.trace and self.trace[-1]["end"] is None:
            self.trace[-1]["end"] = time.time()
        return self.result

    def open_row(self, node: str, kind: str) -> dict[str, Any]:
        row = {"node": node, "kind": kind, "start": time.time(), "end": None,
               "status": "failed", "bytes": 0}
        self.trace.append(row)
        return row

    @staticmethod
    def close_row(row: dict[str, Any], status: str, nbytes: int = 0) -> None:
        row["end"] = time.time()
        row["status"] = status
        row["bytes"] = nbytes

    def fail(self, node: str, kind: str, message: str, *, step: str | None = None,
             returncode: int | None = None, log: str | None = None) -> _Failed:
        for row in reversed(self.trace):  # the failed node's trace row says why, too
            if row["node"] == node:
                row["returncode"] = returncode
                row["message"] = message
                break
        return _Failed({
            "node": node,
            "step": step,
            "kind": kind,
            "returncode": returncode,
            "message": message,
            "log": log,
            "tail": _tail(log) if log else [],
            "task_dir": self.task_dir if os.path.isdir(self.task_dir) else None,
        })

    def unexpected(self, exc: Exception) -> dict[str, Any]:
        row = self.trace[-1] if self.trace else {"node": f"stage:{self.job}", "kind": "stage"}
        kind = {"stage": "stage", "copyback": "copyback"}.get(row["kind"], "exception")
        step = log = None
        if row["kind"] == "exec":
            step = self.step
            log = os.path.join(self.logs, f"{step}.log")
            if not os.path.isfile(log):
                log = None
        message = f"{row['node']} failed unexpectedly: {type(exc).__name__}: {_first_line(exc)}"
        return self.fail(row["node"], kind, message, step=step, log=log).failure

    # -- 1. machine stage (Job Prephase) -----------------------------------------------------

    def machine_stage(self) -> None:
        spec = self.req.get("machine_stage") or {}
        node = spec.get("node") or f"stage:{self.job}"
        row = self.open_row(node, "stage")
        pairs, key = self.pick_job_folder(node, spec)
        try:
            status, nbytes = self.use_job_folder(node, pairs, key)
        except OSError as exc:
            raise self.fail(node, "stage", f"cannot prepare the job folder {self.job_dir}: "
                                           f"{_os_reason(exc, 'scratch')}") from exc
        self.result["bytes_staged"] += nbytes
        self.close_row(row, status, nbytes)

    def pick_job_folder(self, node: str, spec: dict[str, Any]
                        ) -> tuple[list[tuple[str, str]], str]:
        """Set ``job_dir`` and ``task_dir`` to the folders for this content of the shared files;
        the ``(source, destination)`` pairs to stage and the content's key."""
        for what, name in (("pipeline", self.pipeline), ("job", self.job)):
            if not _is_component(name):
                raise self.fail(node, "stage", f"the {what} name {name!r} cannot be a folder name")
        names: list[tuple[str, str]] = []
        for src, name in spec.get("files") or ():
            dst = _inside(self.jobs_dir, name)
            if dst is None or dst == os.path.join(self.jobs_dir, MARKER) or is_temp_name(name):
                raise self.fail(
                    node, "stage",
                    f"shared file name {name!r} does not lie inside the job folder {self.jobs_dir}",
                )
            names.append((os.path.join(self.root, src), dst[len(self.jobs_dir) + 1:]))
        key = self.shared_key(node, names)
        short = key[:_KEY_LEN]
        self.job_dir = os.path.join(self.jobs_dir, short)
        self.task_dir = os.path.join(self.job_dir, self.task)
        return [(src, os.path.join(self.job_dir, name)) for src, name in names], key

    def use_job_folder(self, node: str, pairs: list[tuple[str, str]],
                       key: str) -> tuple[str, int]:
        """Make sure this engine holds a shared lock on this content's job folder, staging the
        shared files first if they are not complete there; the status and bytes copied.

        ``<jobs>/.<short key>.lock`` is held shared by every engine that uses the folder, from
        its first task there until it needs another content of the job's shared files or ends;
        it is taken exclusively, and only without waiting, to remove the folder
        (:func:`_remove_unused_job_folders`). Staging itself is serialised by
        ``<pipeline>/.<job>.lock``. A folder's content does not change once its marker is
        written, so a task that saw the marker under the shared lock can use the files.
        """
        short = os.path.basename(self.job_dir)
        marker = os.path.join(self.job_dir, MARKER)
        lock_path = os.path.join(self.jobs_dir, f".{short}.lock")
        held = _HELD.pop(self.jobs_dir, None)
        if held is not None and (held[0] != short or not _same_file(lock_path, held[1])):
            os.close(held[1])  # other content now, or the scratch folder was cleared
            held = None
        if held is not None:
            _HELD[self.jobs_dir] = held  # the most recently used, last
        else:
            os.makedirs(self.jobs_dir, exist_ok=True)
            while True:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH)
                except BaseException:
                    os.close(fd)
                    raise
                if _same_file(lock_path, fd):
                    break
                os.close(fd)  # the folder was removed meanwhile: lock the new one
            _HELD[self.jobs_dir] = (short, fd)
            while len(_HELD) > _HOLD_MAX:  # an engine that served many jobs lets the oldest go
                os.close(_HELD.pop(next(iter(_HELD)))[1])
        if _marker_holds(marker, key):
            return "cached", 0
        nbytes = self.stage_shared(node, pairs, marker, key)
        if nbytes is None:
            return "cached", 0
        _remove_unused_job_folders(self.jobs_dir, short)
        return "done", nbytes

    def stage_shared(self, node: str, pairs: list[tuple[str, str]], marker: str,
                     key: str) -> int | None:
        """Copy the shared files in under the job's staging lock; None if another engine did it
        meanwhile."""
        lock = os.open(os.path.join(self.pipeline_dir, f".{self.job}.lock"),
                       os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if _marker_holds(marker, key):
                return None
            return self.copy_shared(node, pairs, marker, key)
        finally:
            os.close(lock)  # releases the lock

    def shared_key(self, node: str, names: list[tuple[str, str]]) -> str:
        """What a job folder holds: the pipeline folder, and each shared file's source, its
        size and modification time, and its name in the job folder."""
        parts = ["opf-stage-2", self.root]
        stats = self.result["shared"] = []
        for src, name in names:
            try:
                st = os.stat(src)
            except OSError as exc:
                raise self.fail(node, "stage",
                                f"shared file {src} cannot be read: {_os_reason(exc)}") from exc
            parts.append(f"{src}\0{name}\0{st.st_size}\0{st.st_mtime_ns}")
            stats.append([st.st_size, st.st_mtime_ns])
        return hashlib.sha256("\n".join(parts).encode("utf-8", "surrogateescape")).hexdigest()

    def copy_shared(self, node: str, pairs: list[tuple[str, str]], marker: str, key: str) -> int:
        try:
            os.makedirs(self.job_dir, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(marker)
            with os.scandir(self.job_dir) as entries:
                for entry in entries:  # temporaries of a stage that was killed
                    if is_temp_name(entry.name) and entry.is_file(follow_symlinks=False):
                        os.unlink(entry.path)
        except OSError as exc:
            raise self.fail(node, "stage", f"cannot prepare the job folder {self.job_dir}: "
                                           f"{_os_reason(exc)}") from exc
        nbytes = 0
        for (src, dst), (size, mtime_ns) in zip(pairs, self.result["shared"], strict=True):
            try:
                nbytes += atomic_copy(src, dst)
                after = os.stat(src)
            except OSError as exc:
                raise self.fail(node, "stage", f"cannot copy shared file {src} to {dst}: "
                                               f"{_os_reason(exc, 'scratch')}") from exc
            if (after.st_size, after.st_mtime_ns) != (size, mtime_ns):
                raise self.fail(node, "stage", f"shared file {src} changed while it was being "
                                               f"copied; it is probably still being written. "
                                               f"Run again when it is complete")
        try:
            write_atomic(marker, key.encode())
        except OSError as exc:
            raise self.fail(node, "stage", f"cannot write {marker}: {_os_reason(exc)}") from exc
        return nbytes

    # -- 2. task stage (Task Prephase) -------------------------------------------------------

    def task_stage(self) -> None:
        spec = self.req.get("task_stage") or {}
        node = spec.get("node") or f"stage:{self.job}/{self.task}"
        row = self.open_row(node, "stage")
        pairs = self.check_paths(node, spec)
        locks = os.path.join(self.jobs_dir, f".{os.path.basename(self.job_dir)}.tasks")
        try:
            os.makedirs(locks, exist_ok=True)
            self.task_lock = _lock(os.path.join(locks, self.task))
        except _HeldByStopped as held:
            raise self.fail(
                node, "stage",
                f"the task folder {self.task_dir} is held by process {held.pid} on this machine, "
                f"which has been stopped for {held.waited:.0f} s (kill -STOP, Ctrl-Z, a "
                f"debugger): most likely an engine that was taken for lost while it ran this "
                f"task. opf does not run over its work: resume it (kill -CONT {held.pid}) or end "
                f"it (kill {held.pid}), then run again") from None
        except OSError as exc:
            raise self.fail(node, "stage", f"cannot lock the task folder {self.task_dir}: "
                                           f"{_os_reason(exc, 'scratch')}") from exc
        made = {self.task_dir}
        nbytes = 0
        try:
            try:
                os.mkdir(self.task_dir)
            except FileExistsError:  # left over from an earlier attempt
                _remove_tree(self.task_dir)
                os.mkdir(self.task_dir)
        except OSError as exc:
            raise self.fail(node, "stage", f"cannot create the task folder {self.task_dir}: "
                                           f"{_os_reason(exc)}") from exc
        staged = self.result["staged"]
        for src, local, dst in pairs:
            try:
                folder = os.path.dirname(dst)
                if folder not in made:
                    os.makedirs(folder, exist_ok=True)
                    made.add(folder)
                stats = _copy_in(src, dst, self.checksum)
            except FileNotFoundError as exc:
                if os.path.exists(src):  # the file is there: its copy's folder is not
                    raise self.fail(node, "stage", f"cannot stage {src} as {local}: "
                                                   f"{_os_reason(exc, 'scratch')}") from exc
                raise self.fail(node, "stage", f"input {src} does not exist (any more): it was "
                                               f"deleted or renamed after the plan was "
                                               f"made") from exc
            except _Changing as exc:
                raise self.fail(node, "stage", f"input {src} changed while it was being copied "
                                               f"({exc}); it is probably still being written. "
                                               f"Run again when it is complete") from exc
            except OSError as exc:
                raise self.fail(node, "stage", f"cannot stage {src} as {local}: "
                                               f"{_os_reason(exc, 'scratch')}") from exc
            nbytes += stats[0]
            staged.append(stats)
        self.result["bytes_staged"] += nbytes
        self.close_row(row, "done", nbytes)

    def check_paths(self, node: str, spec: dict[str, Any]) -> list[tuple[str, str, str]]:
        """Refuse a request whose folders or files would lie outside where they belong."""
        shared = self.req.get("machine_stage") or {}
        taken = {MARKER} | {_first_part(name) for _, name in shared.get("files") or ()}
        if not _is_component(self.task) or self.task in taken or is_temp_name(self.task):
            raise self.fail(node, "stage", f"the task id {self.task!r} cannot name a folder of "
                                           f"its own inside the job folder {self.job_dir}")
        pairs = []
        for src, local in spec.get("files") or ():
            dst = self.local_path(node, local, "input")
            pairs.append((os.path.join(self.root, src), local, dst))
        for ex in self.req.get("execs") or ():
            step = str(ex.get("step"))
            if not _is_component(step):
                raise self.fail(node, "stage", f"the step name {step!r} cannot name a log file")
            for out in ex.get("outputs") or ():
                self.local_path(node, out, f"output of step {step}")
        for local, _ in (self.req.get("copyback") or {}).get("files") or ():
            self.local_path(node, local, "file to copy back")
        return pairs

    def local_path(self, node: str, local: str, what: str) -> str:
        path = _inside(self.task_dir, local)
        if path is None:
            raise self.fail(node, "stage", f"{what} {local!r} does not lie inside the task "
                                           f"folder {self.task_dir}")
        return path

    # -- 3. exec (Mainphase) -----------------------------------------------------------------

    def exec_step(self, ex: dict[str, Any]) -> None:
        step = self.step = str(ex["step"])
        node = ex.get("node") or f"exec:{self.job}/{self.task}/{step}"
        row = self.open_row(node, "exec")
        log = os.path.join(self.logs, f"{step}.log")
        if not self.logs_ready:
            try:
                os.makedirs(self.logs, exist_ok=True)
            except OSError as exc:
                raise self.fail(node, "log", f"cannot create the log folder {self.logs} for step "
                                             f"{step}: {_os_reason(exc, 'state')}",
                                step=step) from exc
            self.logs_ready = True
        for out in ex.get("outputs") or ():
            folder = os.path.dirname(os.path.join(self.task_dir, out))
            if folder != self.task_dir:
                try:
                    os.makedirs(folder, exist_ok=True)
                except OSError as exc:
                    raise self.fail(node, "exception", f"cannot create the folder of output "
                                                       f"{out} of step {step}: "
                                                       f"{_os_reason(exc, 'scratch')}",
                                    step=step) from exc
        if ex.get("argv") is not None:
            returncode: int | None = self.run_argv(node, step, list(ex["argv"]), log)
        elif ex.get("call"):
            returncode = self.run_call(node, step, ex["call"], log)
        else:
            raise self.fail(node, "exception", f"step {step} has neither a command nor a call",
                            step=step)
        missing = []
        nbytes = 0
        for out in ex.get("outputs") or ():
            try:
                st = os.stat(os.path.join(self.task_dir, out))
            except OSError:
                missing.append(out)
                continue
            if stat.S_ISREG(st.st_mode):
                nbytes += st.st_size
            else:
                missing.append(out)
        if missing:
            raise self.fail(node, "missing-output",
                            f"step {step} finished but did not write {', '.join(missing)}",
                            step=step, returncode=returncode, log=log)
        self.close_row(row, "done", nbytes)

    def open_log(self, node: str, step: str, log: str, header: str, *,
                 text: bool = False) -> Any:
        """The step's log, opened and begun with ``header`` (its command line). A log that
        cannot be written fails the step as a problem of the run's state folder, not of the
        step (a full disk there is named as such)."""
        out: Any = None
        try:
            if text:
                out = open(log, "w", buffering=1, encoding="utf-8",  # noqa: SIM115
                           errors="backslashreplace")
                out.write(header)
            else:
                out = open(log, "wb", buffering=0)  # noqa: SIM115
                _write(out, header)
        except OSError as exc:
            if out is not None:
                with contextlib.suppress(OSError):
                    out.close()
            raise self.fail(node, "log", f"cannot write the log of step {step} ({log}): "
                                         f"{_os_reason(exc, 'state')}", step=step) from exc
        return out

    def run_argv(self, node: str, step: str, argv: list[str], log: str) -> int:
        with self.open_log(node, step, log, "$ " + shlex.join(argv) + "\n") as out:
            program = argv[0] if argv else ""
            if program == "python":
                exe: str | None = sys.executable
            elif "/" in program:
                exe = os.path.normpath(os.path.join(self.task_dir, program))
                if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
                    exe = None
            else:
                exe = shutil.which(program) if program else None
            if exe is None:
                if "/" in program:
                    message = (f"program {program} of step {step} was not found as an "
                               f"executable file in the task folder {self.task_dir}")
                else:
                    message = (f"program {program!r} of step {step} was not found on the "
                               f"engine's PATH ({os.environ.get('PATH', '')})")
                with contextlib.suppress(OSError):
                    _write(out, f"opf: {message}\n")
                out.close()
                raise self.fail(node, "not-found", message, step=step, log=log)
            try:
                # a session of its own: the step and everything it starts form one process
                # group, which is ended as a whole (see _wait_step)
                proc = subprocess.Popen(
                    [exe, *argv[1:]], cwd=self.task_dir, stdin=subprocess.DEVNULL,
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                )
            except OSError as exc:
                message = f"program {exe} of step {step} could not be started: {_os_reason(exc)}"
                with contextlib.suppress(OSError):
                    _write(out, f"opf: {message}\n")
                out.close()
                raise self.fail(node, "not-found", message, step=step, log=log) from exc
            code = _wait_step(proc)
        if code != 0:
            if code < 0:
                try:
                    name = signal.Signals(-code).name
                except ValueError:
                    name = str(-code)
                message = f"step {step} was killed by signal {name}"
                if name == "SIGXFSZ":
                    message += (" (a file grew beyond the file size limit: is the scratch disk "
                                "or a quota full?)")
            else:
                message = f"step {step} exited with status {code}"
            if _disk_full(self.logs):
                message += (" (the disk of the run's state folder, which holds the step's log, "
                            "is full)")
            raise self.fail(node, "exit", message, step=step, returncode=code, log=log)
        return code

    def run_call(self, node: str, step: str, spec: dict[str, Any], log: str) -> None:
        function = str(spec.get("function", ""))
        kwargs = dict(spec.get("kwargs") or {})
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        with self.open_log(node, step, log, f"$ call {function}({args})\n", text=True) as out:
            try:
                fn = self.load(function)
            except Exception as exc:
                with contextlib.suppress(OSError):
                    out.write("".join(traceback.format_exception(exc)))
                with contextlib.suppress(OSError):
                    out.close()
                message = (f"step {step} could not load {function} (pipeline folder "
                           f"{self.root}): {type(exc).__name__}: {_first_line(exc)}")
                raise self.fail(node, "exception", message, step=step, log=log) from exc
            error = _call_redirected(fn, kwargs, out, self.task_dir)
        if isinstance(error, SystemExit):
            code = error.code if isinstance(error.code, int) else 1
            raise self.fail(node, "exit", f"step {step} called sys.exit({error.code!r})",
                            step=step, returncode=code, log=log)
        if error is not None:
            message = f"step {step} raised {type(error).__name__}: {_first_line(error)}"
            raise self.fail(node, "exception", message, step=step, log=log)

    def load(self, function: str) -> Any:
        module_name, sep, attr = function.partition(":")
        if not sep or not module_name or not attr:
            raise ValueError(f"{function!r} should be written package.module:function")
        if not sys.path or sys.path[0] != self.root:  # this pipeline's modules come first
            with contextlib.suppress(ValueError):
                sys.path.remove(self.root)
            sys.path.insert(0, self.root)
        _forget_stale_module(module_name, self.root)
        if module_name not in sys.modules:
            importlib.invalidate_caches()  # files written since the last import attempt
        obj: Any = importlib.import_module(module_name)
        _remember_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
        if not callable(obj):
            raise TypeError(f"{function} is not callable")
        return obj

    def write_receipt(self) -> None:
        """After a copy-back: append the task's receipt (what the journal would record) to this
        engine's receipt file in the run's state folder, so that a result that landed is
        recognised even if the driver never hears of it. Best effort: a receipt that cannot be
        written only means that the task runs again next time."""
        spec = self.req.get("receipt")
        if not isinstance(spec, dict) or not spec.get("folder"):
            return
        record = dict(spec.get("record") or {})
        record.update(staged=self.result["staged"], shared=self.result["shared"],
                      outputs=self.result["outputs"], landed=time.time())
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        folder = str(spec["folder"])
        name = f"{spec.get('run') or 'run'}-{self.result['host']}-{os.getpid()}.jsonl"
        with contextlib.suppress(OSError):
            os.makedirs(folder, exist_ok=True)
            fd = os.open(os.path.join(folder, name), os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                         0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)

    # -- 4. copy-back (Task Postphase) -------------------------------------------------------

    def copyback(self) -> None:
        spec = self.req.get("copyback") or {}
        node = spec.get("node") or f"copyback:{self.job}/{self.task}"
        row = self.open_row(node, "copyback")
        nbytes = 0
        outputs = self.result["outputs"]
        for local, dest in spec.get("files") or ():
            dst = os.path.join(self.root, dest)
            try:
                nbytes += atomic_copy(os.path.join(self.task_dir, local), dst)
                st = os.stat(dst)
            except OSError as exc:
                self.result["bytes_copied"] += nbytes
                blocker = _file_in_the_way(os.path.dirname(dst))
                reason = _os_reason(exc, "destination")
                if blocker is not None:
                    reason += f" ({blocker} is a file, not a folder)"
                raise self.fail(node, "copyback", f"cannot copy {local} back to {dst}: "
                                                  f"{reason}") from exc
            outputs.append([st.st_size, st.st_mtime_ns])
        self.result["bytes_copied"] += nbytes
        with contextlib.suppress(OSError):  # the outputs are safe; a stuck folder is no failure
            _remove_tree(self.task_dir)
        self.close_row(row, "done", nbytes)


# -- machinery --------------------------------------------------------------------------------


def _scratch_root(scratch: str | None) -> str:
    base = scratch if scratch is not None else (
        os.environ.get("OPF_SCRATCH") or tempfile.gettempdir())
    base = os.path.expanduser(base)
    if not os.path.isabs(base):  # relative to the engine's working directory, which may change
        return os.path.realpath(base)
    root = _SCRATCH.get(base)
    if root is None:
        root = _SCRATCH[base] = os.path.realpath(base)
    return root


def _is_component(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name


def _first_part(name: str) -> str:
    return os.path.normpath(name).split("/", 1)[0]


def _inside(base: str, rel: str) -> str | None:
    """``base/rel`` normalised, or None when it would not lie strictly inside ``base``."""
    if not isinstance(rel, str) or not rel or "\0" in rel or os.path.isabs(rel):
        return None
    path = os.path.normpath(os.path.join(base, rel))
    if not path.startswith(base + os.sep):
        return None
    return path


class _HeldByStopped(Exception):
    """A task folder's lock is held by a process of this machine that stays stopped."""

    def __init__(self, pid: int, waited: float) -> None:
        super().__init__(f"held by stopped process {pid}")
        self.pid = pid
        self.waited = waited


def _lock(path: str) -> tuple[str, int]:
    """Hold an exclusive lock on the file ``path`` (created if need be), waiting for it.

    A waiter polls; if the holder (found in ``/proc/locks``) is a process of this machine that
    stays stopped (``kill -STOP``: an engine taken for lost, frozen) for
    :data:`STOPPED_HOLDER_WAIT` seconds, it gives up with :class:`_HeldByStopped` rather than
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
                        raise _HeldByStopped(holder, now - stopped_since)
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


def _marker_holds(marker: str, key: str) -> bool:
    """Does the job folder's marker say it is complete for ``key``?"""
    try:
        fd = os.open(marker, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return os.read(fd, 256) == key.encode()
    except OSError:
        return False
    finally:
        os.close(fd)


def _remove_unused_job_folders(jobs_dir: str, keep: str) -> list[str]:
    """Remove the job folders in ``jobs_dir`` (other than ``keep``) that no engine uses: each
    one whose lock can be taken exclusively at once; return the removed folders."""
    try:
        names = sorted(os.listdir(jobs_dir))
    except OSError:
        return []
    removed = []
    for name in names:
        match = _KEY_LOCK_RE.match(name)
        if match is None or match.group(1) == keep:
            continue
        path = os.path.join(jobs_dir, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not _same_file(path, fd):
                continue
            folder = os.path.join(jobs_dir, match.group(1))
            with contextlib.suppress(FileNotFoundError):  # first: it no longer looks complete
                os.unlink(os.path.join(folder, MARKER))
            _remove_tree(folder)
            _remove_tree(os.path.join(jobs_dir, f".{match.group(1)}.tasks"))
            os.unlink(path)
            removed.append(folder)
        except OSError:  # in use (or it cannot be locked, or removed): leave it
            continue
        finally:
            os.close(fd)
    return removed


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


# -- steps' process groups ------------------------------------------------------------------


def _wait_step(proc: subprocess.Popen) -> int:
    """Wait for a step started in a session of its own; return its exit status.

    When the step's process ends, whatever it left running in its process group is killed
    (before the step is reaped, so that the group's id cannot have been reused). If the wait
    is interrupted (Ctrl-C reaching the engine, an engine shutting down), the whole group is
    ended first — SIGTERM, :data:`STOP_GRACE` seconds, SIGKILL — and the interruption goes on.
    While the step runs its group is known to this process's lifeline, which ends it should
    this process die.
    """
    pgid = proc.pid
    _watch(pgid)
    try:
        try:
            with contextlib.suppress(ChildProcessError):
                os.waitid(os.P_PID, pgid, os.WEXITED | os.WNOWAIT)
        except BaseException:
            _end_group(pgid)
            raise
        _killpg(pgid, signal.SIGKILL)
    finally:
        _unwatch(pgid)
        proc.wait()
    return proc.returncode


def _end_group(pgid: int) -> None:
    _killpg(pgid, signal.SIGTERM)
    _killpg(pgid, signal.SIGCONT)  # a stopped process sees SIGTERM only once it runs
    deadline = time.monotonic() + STOP_GRACE
    try:
        while time.monotonic() < deadline:
            try:
                if os.waitid(os.P_PID, pgid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
                    break
            except ChildProcessError:
                break
            time.sleep(0.02)
    except BaseException:  # a second interruption: no more grace
        pass
    _killpg(pgid, signal.SIGKILL)


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _watch(pgid: int) -> None:
    _GROUPS.add(pgid)
    _tell(f"+{pgid}\n")


def _unwatch(pgid: int) -> None:
    _GROUPS.discard(pgid)
    _tell(f"-{pgid}\n")


def _tell(line: str) -> None:
    """Tell this process's lifeline (:mod:`opals_dsl.reaper`, started when first needed and
    again if it died) about a step group."""
    global _LIFELINE
    proc = _LIFELINE
    if proc is not None and proc.poll() is None and proc.stdin is not None:
        try:
            proc.stdin.write(line.encode())
            proc.stdin.flush()
            return
        except OSError:
            pass
    _LIFELINE = proc = _start_lifeline()
    if proc is not None and proc.stdin is not None and _GROUPS:
        with contextlib.suppress(OSError):
            proc.stdin.write("".join(f"+{g}\n" for g in _GROUPS).encode())
            proc.stdin.flush()


def _start_lifeline() -> subprocess.Popen | None:
    # the engine's own environment, without the variables of the task running now: the
    # lifeline serves every task of this engine
    env = {k: v for k, v in os.environ.items() if k not in _TASK_VARS}
    env.update({k: v for k, v in _ENGINE_ENV.items() if v is not None})
    reaper = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reaper.py")
    try:
        return subprocess.Popen(
            [sys.executable, "-I", "-S", reaper, "groups"], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd="/",
            start_new_session=True,
        )
    except OSError:
        return None


def _unlock(path: str, fd: int) -> None:
    with contextlib.suppress(OSError):  # removed while held, so that none piles up
        os.unlink(path)
    os.close(fd)


class _Changing(Exception):
    """A source file changed while it was being copied."""


def _copy_in(src: str, dst: str, checksum: bool = False) -> list[Any]:
    """Copy into scratch space (data and permission bits); returns ``[size, mtime_ns]`` of the
    source as copied, plus its SHA-256 if ``checksum``. Raises :class:`_Changing` when the source
    changed during the copy."""
    st = os.stat(src)
    digest = None
    if checksum:
        h = hashlib.sha256()
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            while chunk := fin.read(1 << 20):
                h.update(chunk)
                fout.write(chunk)
        digest = h.hexdigest()
    else:
        shutil.copyfile(src, dst)
    after = os.stat(src)
    copied = os.stat(dst).st_size
    if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns) or copied != st.st_size:
        raise _Changing(f"{st.st_size} bytes when the copy began, {after.st_size} after it; "
                        f"{copied} copied")
    with contextlib.suppress(OSError):
        os.chmod(dst, stat.S_IMODE(st.st_mode))
    stats: list[Any] = [st.st_size, st.st_mtime_ns]
    if digest is not None:
        stats.append(digest)
    return stats


def _file_in_the_way(folder: str) -> str | None:
    """The first part of ``folder``'s path that exists but is not a folder, if any."""
    path = os.path.abspath(folder)
    while True:
        if os.path.isdir(path):
            return None
        if os.path.lexists(path):
            return path
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent


def output_target(path: str) -> tuple[str, bool]:
    """Where a file the user named for writing (``-o PATH``) really is, and whether it is to be
    replaced atomically: a link is followed (the file it names is written, the link stays), and
    an existing device, pipe or socket (``/dev/null``, ``/dev/stdout``, a FIFO) is written into
    as it is — renaming a temporary over it would replace the device with a plain file."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError:
        return real, True
    return real, stat.S_ISREG(st.st_mode)


def write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that it only ever appears complete (as :func:`atomic_copy`
    does): a temporary beside it, flushed to disk, renamed into place."""
    with _replacing(path, 0o644) as tmp:
        fd = os.open(tmp, os.O_WRONLY)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_folder(folder: str) -> None:
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


def _remove_tree(path: str) -> None:
    """Remove a folder (or a file in its place), also when a step left read-only folders."""
    try:
        shutil.rmtree(path)
        return
    except FileNotFoundError:
        return
    except OSError:
        if os.path.islink(path) or not os.path.isdir(path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
    for folder, _, _ in os.walk(path):
        with contextlib.suppress(OSError):
            os.chmod(folder, 0o700)
    shutil.rmtree(path)


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the steps of one task (children inherit them), then undo.

    Changing ``os.environ`` in place is much cheaper than building a fresh environment mapping
    for every task; an engine runs one task at a time.
    """
    old = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _call_redirected(fn: Any, kwargs: dict[str, Any], out: Any,
                     cwd: str) -> BaseException | None:
    """Call ``fn(**kwargs)`` in ``cwd`` with its output (Python and fd level) going to ``out``.

    Returns the exception it raised (its traceback written to ``out``), or None. The working
    directory, ``sys.stdout``/``sys.stderr`` and file descriptors 1 and 2 are restored in every
    case; KeyboardInterrupt passes through after the restore.
    """
    try:
        old_cwd: str | None = os.getcwd()
    except OSError:
        old_cwd = None
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved: list[tuple[int, int]] = []
    old_out, old_err = sys.stdout, sys.stderr
    error: BaseException | None = None
    try:
        for fd in (1, 2):
            try:
                saved.append((fd, os.dup(fd)))
            except OSError:  # the descriptor is closed: nothing to redirect
                continue
            os.dup2(out.fileno(), fd)
        sys.stdout = sys.stderr = out
        os.chdir(cwd)
        fn(**kwargs)
    except SystemExit as exc:
        if exc.code not in (None, 0):
            error = exc
    except Exception as exc:
        tb = exc.__traceback__
        out.write("".join(traceback.format_exception(type(exc), exc,
                                                     tb.tb_next if tb else None)))
        error = exc
    finally:
        with contextlib.suppress(Exception):
            out.flush()
        sys.stdout, sys.stderr = old_out, old_err
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)
        if old_cwd is not None:
            with contextlib.suppress(OSError):
                os.chdir(old_cwd)
    return error


def _module_stamp(path: str) -> tuple[str, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns)


def _remember_module(name: str) -> None:
    if name not in _MODULES:
        file = getattr(sys.modules.get(name), "__file__", None)
        stamp = _module_stamp(file) if file else None
        if stamp is not None:
            _MODULES[name] = stamp


def _forget_stale_module(name: str, root: str) -> None:
    """Drop a module a ``call`` imported earlier from ``sys.modules`` when its file changed
    since, or when the pipeline in ``root`` has a file of that name elsewhere (an engine serves
    many runs: each must run the code as it is now, from its own pipeline folder)."""
    old = _MODULES.get(name)
    if old is None or name not in sys.modules:
        return
    base = os.path.join(root, *name.split("."))
    here = next((p for p in (base + ".py", os.path.join(base, "__init__.py"))
                 if os.path.isfile(p)), None)
    now = _module_stamp(old[0])
    if now != old or (here is not None and os.path.realpath(here) != old[0]):
        del sys.modules[name]
        del _MODULES[name]


def _tail(log: str) -> list[str]:
    try:
        with open(log, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - _TAIL_BYTES))
            data = f.read()
    except OSError:
        return []
    lines = data.decode("utf-8", errors="replace").splitlines()
    if size > _TAIL_BYTES and lines:
        lines = lines[1:]  # the first one is probably cut
    return lines[-TAIL_LINES:]


def _write(out: Any, text: str) -> None:
    out.write(text.encode("utf-8", "backslashreplace"))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"


#: errors that mean "no room": the disk, a quota, or the process's file size limit
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _os_reason(exc: OSError, disk: str | None = None) -> str:
    """The reason of an OS error, in words; ``disk`` names the disk written to (``scratch``,
    ``destination`` or ``state``) so that a full disk is called one."""
    reason = exc.strerror or str(exc)
    if disk is not None and exc.errno in _FULL:
        what = {"scratch": "the scratch disk", "destination": "the destination's disk",
                "state": "the disk of the run's state folder"}.get(disk, "the disk")
        reason += f" ({what} is full, or a quota or file size limit was reached)"
    return reason


def _disk_full(folder: str) -> bool:
    """True if the file system of ``folder`` has no free block left for this user."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_blocks > 0 and st.f_bavail == 0
