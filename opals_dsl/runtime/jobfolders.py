"""The Job Prephase on an engine: the job folder, staged once per machine.

A job's shared files live in the *job folder* ``<scratch>/opf/<pipeline>/<job>/<key>/``, where
``<key>`` is 16 hex digits of a hash of what is in it (the pipeline folder, and each shared
file's source path, size, modification time and name): one folder per content, so runs that
stage different shared files (other params, another project with the same pipeline name) never
share one.

The key of the shared file set picks the job folder. The engine takes a shared ``flock`` on
``<scratch>/opf/<pipeline>/<job>/.<key>.lock`` and keeps it until it needs another job folder of
this job or ends, so a folder is never removed while an engine uses it. If the marker file
``<job folder>/.opf-staged`` holds the (full) key, there is nothing to do: status ``cached``.
Otherwise, under an exclusive lock on ``<scratch>/opf/<pipeline>/.<job>.lock`` (and if the
marker still does not hold the key), the marker is removed, temporaries of a killed stage are
cleared, each shared file is copied in through a temporary name and renamed into place (a source
that changes while it is copied fails the stage), and the marker is written last, so an
interrupted stage never looks finished; status ``done``. Concurrent engines of a machine
therefore copy once: the first does the work, the others wait on the lock and find the marker.
After staging, the job's other job folders that no engine holds (their lock can be taken
exclusively at once) are removed, their marker first.

The first time an engine takes a job folder's lock, it also removes the task folders there that
an engine killed mid-task left behind: those whose lock file nobody holds
(:func:`.locks.remove_abandoned`).

:class:`JobPrephase` is the part of an engine's task (:mod:`.engine`) that does this; it shares
the task's state (its folders, its trace row, its failure), so it is a base class of the task.
Standard library only: engines import it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import time

from ..plan.wire import Stage
from .fsatomic import atomic_copy, is_temp_name, same_file, write_atomic
from .locks import remove_abandoned, unheld
from .paths import inside, is_component, module_files, os_reason, remove_tree

#: the file in a job folder that says its shared files are complete, and for which file set
MARKER = ".opf-staged"


_KEY_LEN = 16  # hex digits of the shared files' key in a job folder's name


_KEY_LOCK_RE = re.compile(rf"\.([0-9a-f]{{{_KEY_LEN}}})\.lock\Z")


# a job's folder of folders -> (short key, descriptor) of the job folder this process holds a
# shared lock on (see _Task.use_job_folder), the most recently used last; at most _HOLD_MAX
_HELD: dict[str, tuple[str, int]] = {}


_HOLD_MAX = 64


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
        names = sorted(name for name in os.listdir(jobs_dir)
                       if (m := _KEY_LOCK_RE.match(name)) and m.group(1) != keep)
    except OSError:
        return []
    removed = []
    for path in unheld(jobs_dir, names):
        key = _KEY_LOCK_RE.match(os.path.basename(path)).group(1)  # type: ignore[union-attr]
        folder = os.path.join(jobs_dir, key)
        try:
            with contextlib.suppress(FileNotFoundError):  # first: it no longer looks complete
                os.unlink(os.path.join(folder, MARKER))
            remove_tree(folder)
            remove_tree(os.path.join(jobs_dir, f".{key}.tasks"))
            os.unlink(path)
        except OSError:  # it cannot be removed: leave it
            continue
        removed.append(folder)
    return removed


def remove_job_folders(pipeline_dir: str) -> list[str]:
    """Empty a pipeline's scratch folder (``opf clean --scratch-folder``) as far as no engine
    uses it: remove each job folder (with the task folders kept in it) whose lock no engine
    holds, and the whole folder once none is held. Returns the job folders left because an
    engine holds them."""
    try:
        jobs = sorted(e.path for e in os.scandir(pipeline_dir)
                      if e.is_dir(follow_symlinks=False) and not e.name.startswith("."))
    except OSError:
        return []
    in_use: list[str] = []
    for jobs_dir in jobs:
        _remove_unused_job_folders(jobs_dir, keep="")
        with contextlib.suppress(OSError):
            in_use += [os.path.join(jobs_dir, m.group(1)) for name in sorted(os.listdir(jobs_dir))
                       if (m := _KEY_LOCK_RE.match(name))]
    if not in_use:
        remove_tree(pipeline_dir)
    return in_use


class JobPrephase:
    """The machine stage of a task; see the module docstring."""

    def machine_stage(self) -> None:
        spec = self.req.machine_stage
        node = spec.node
        row = self.open_row(node, "stage")
        pairs, key = self.pick_job_folder(node, spec)
        try:
            status, nbytes = self.use_job_folder(node, pairs, key)
        except OSError as exc:
            raise self.fail(node, "stage", f"cannot prepare the job folder {self.job_dir}: "
                                           f"{os_reason(exc, 'scratch')}") from exc
        self.bytes_staged += nbytes
        self.close_row(row, status, nbytes)

    def pick_job_folder(self, node: str, spec: Stage) -> tuple[list[tuple[str, str]], str]:
        """Set ``job_dir`` and ``task_dir`` to the folders for this content of the shared files;
        the ``(source, destination)`` pairs to stage and the content's key."""
        for what, name in (("pipeline", self.pipeline), ("job", self.job)):
            if not is_component(name):
                raise self.fail(node, "stage", f"the {what} name {name!r} cannot be a folder name")
        names: list[tuple[str, str, str]] = []  # (plan source, absolute source, name)
        for src, name in spec.files:
            dst = inside(self.jobs_dir, name)
            if dst is None or dst == os.path.join(self.jobs_dir, MARKER) or is_temp_name(name):
                raise self.fail(
                    node, "stage",
                    f"shared file name {name!r} does not lie inside the job folder {self.jobs_dir}",
                )
            names.append((src, os.path.join(self.root, src), dst[len(self.jobs_dir) + 1:]))
        key = self.shared_key(node, names)
        short = key[:_KEY_LEN]
        self.job_dir = os.path.join(self.jobs_dir, short)
        self.task_dir = os.path.join(self.job_dir, self.task)
        return [(src, os.path.join(self.job_dir, name)) for _, src, name in names], key

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
        if held is not None and (held[0] != short or not same_file(lock_path, held[1])):
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
                if same_file(lock_path, fd):
                    break
                os.close(fd)  # the folder was removed meanwhile: lock the new one
            _HELD[self.jobs_dir] = (short, fd)
            # this engine's first task here: clear the task folders of engines killed mid-task
            remove_abandoned(os.path.join(self.jobs_dir, f".{short}.tasks"), self.job_dir)
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

    def shared_key(self, node: str, names: list[tuple[str, str, str]]) -> str:
        """What a job folder holds: the pipeline folder, and each shared file's source, its
        size and modification time, and its name in the job folder. A shared file that is not
        as the run first saw it (the request's ``shared``) fails the stage: one run, one
        version of each."""
        parts = ["opf-stage-2", self.root]
        self.shared = {}
        for plan_src, src, name in names:
            try:
                st = os.stat(src)
            except OSError as exc:
                raise self.fail(node, "stage",
                                f"shared file {src} cannot be read: {os_reason(exc)}") from exc
            first = self.req.shared.get(plan_src)
            if first is not None and list(first[:2]) != [st.st_size, st.st_mtime_ns]:
                raise self.fail(node, "stage", _changed_since_start("shared file", src, first, st))
            parts.append(f"{src}\0{name}\0{st.st_size}\0{st.st_mtime_ns}")
            self.shared[plan_src] = [st.st_size, st.st_mtime_ns]
        return hashlib.sha256("\n".join(parts).encode("utf-8", "surrogateescape")).hexdigest()

    def module_changed(self, module: str) -> str | None:
        """Why the file of a ``call``'s module in the pipeline folder is not as the run first
        saw it (the request's ``shared``), if it is not."""
        for rel in module_files(module):
            first = self.req.shared.get(rel)
            if first is None:
                continue
            path = os.path.join(self.root, rel)
            try:
                st = os.stat(path)
            except OSError:
                return None  # the import says what is wrong
            if list(first[:2]) != [st.st_size, st.st_mtime_ns]:
                return _changed_since_start("the module file", path, first, st)
        return None

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
                                           f"{os_reason(exc)}") from exc
        nbytes = 0
        for (src, dst), (size, mtime_ns) in zip(pairs, self.shared.values(), strict=True):
            try:
                nbytes += atomic_copy(src, dst)
                after = os.stat(src)
            except OSError as exc:
                raise self.fail(node, "stage", f"cannot copy shared file {src} to {dst}: "
                                               f"{os_reason(exc, 'scratch')}") from exc
            if (after.st_size, after.st_mtime_ns) != (size, mtime_ns):
                raise self.fail(node, "stage", f"shared file {src} changed while it was being "
                                               f"copied; it is probably still being written. "
                                               f"Run again when it is complete")
        try:
            write_atomic(marker, key.encode())
        except OSError as exc:
            raise self.fail(node, "stage", f"cannot write {marker}: {os_reason(exc)}") from exc
        return nbytes


def _changed_since_start(what: str, path: str, first: list[int], now: os.stat_result) -> str:
    def version(size: int, mtime_ns: int) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(mtime_ns / 1e9))
        return f"{size:,} bytes, modified {when}"

    return (f"{what} {path} changed after the run started (then {version(*first[:2])}; now "
            f"{version(now.st_size, now.st_mtime_ns)}): the run's tasks use the version it had "
            f"at the start. Run again once it is complete: the tasks that used the earlier "
            f"version run again too")
