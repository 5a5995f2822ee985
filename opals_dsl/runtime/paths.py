"""Paths and operating-system errors on an engine: whether a name is one folder name, whether a
path lies inside a folder, an OS error said in words (a full disk named as such), and a copy
into scratch space that notices a source being written meanwhile.

Standard library only: engines import it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
from typing import Any


def is_component(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name


def first_part(name: str) -> str:
    return os.path.normpath(name).split("/", 1)[0]


def inside(base: str, rel: str) -> str | None:
    """``base/rel`` normalised, or None when it would not lie strictly inside ``base``."""
    if not isinstance(rel, str) or not rel or "\0" in rel or os.path.isabs(rel):
        return None
    path = os.path.normpath(os.path.join(base, rel))
    if not path.startswith(base + os.sep):
        return None
    return path


def file_in_the_way(folder: str) -> str | None:
    """What stands where a part of ``folder``'s path should be a folder, in words (the first
    part that exists but is not one: a file, or a symbolic link to nothing), if anything."""
    path = os.path.abspath(folder)
    while True:
        if os.path.isdir(path):
            return None
        if os.path.islink(path):
            try:
                target = os.path.join(os.path.dirname(path), os.readlink(path))
            except OSError:
                target = "?"
            if not os.path.lexists(target):
                return f"{path} is a symbolic link to {target}, which does not exist"
        if os.path.lexists(path):
            return f"{path} is a file, not a folder"
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent


def module_files(module: str) -> tuple[str, str]:
    """Where a ``call``'s module ``pkg.mod`` may lie in the pipeline folder, relative to it:
    ``pkg/mod.py``, then ``pkg/mod/__init__.py`` (as the planner looks for it)."""
    base = module.replace(".", "/")
    return f"{base}.py", f"{base}/__init__.py"


#: errors that mean "no room": the disk, a quota, or the process's file size limit
NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def os_reason(exc: OSError, disk: str | None = None) -> str:
    """The reason of an OS error, in words; ``disk`` names the disk written to (``scratch``,
    ``destination``, ``state`` or ``temp``) so that a full disk is called one."""
    reason = exc.strerror or str(exc)
    if disk is not None and exc.errno in NO_ROOM:
        what = {"scratch": "the scratch disk", "destination": "the destination's disk",
                "state": "the disk of the run's state folder",
                "temp": "the temp folder's disk"}.get(disk, "the disk")
        reason += f" ({what} is full, or a quota or file size limit was reached)"
    return reason


def disk_full(folder: str) -> bool:
    """True if the file system of ``folder`` has no free block left for this user."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_blocks > 0 and st.f_bavail == 0


def remove_tree(path: str) -> None:
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


class Changing(Exception):
    """A source file changed while it was being copied."""


def copy_in(src: str, dst: str, checksum: bool = False) -> list[Any]:
    """Copy into scratch space (data and permission bits); returns ``[size, mtime_ns]`` of the
    source as copied, plus its SHA-256 if ``checksum``. Raises :class:`Changing` when the source
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
        raise Changing(f"{st.st_size} bytes when the copy began, {after.st_size} after it; "
                        f"{copied} copied")
    with contextlib.suppress(OSError):
        os.chmod(dst, stat.S_IMODE(st.st_mode))
    stats: list[Any] = [st.st_size, st.st_mtime_ns]
    if digest is not None:
        stats.append(digest)
    return stats
