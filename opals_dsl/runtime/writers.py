"""Which runs are copying back into which folders, across pipelines and state folders.

Two runs that copy back into the same folder would overwrite each other's results, whichever
pipeline they come from. Each run therefore registers the folders its copy-backs write into
(their real paths: a folder reached through a symbolic link is the folder it points to) in a
registry of this user's: ``$XDG_CACHE_HOME/opf/writing/`` (``~/.cache/opf/writing/`` without
it), one file a run, which the run holds an ``flock`` on and removes when it ends. A run whose
folders meet those of a registered run that still holds its file is refused; the file of a
run that died is taken for what it is (nobody holds it) and removed. Checking and registering
happen under the registry's own lock, so two runs starting at once cannot both get through.

The registry is on this machine, or on every machine that shares the home folder. Where it
cannot be written, runs go on without it.

Standard library only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import socket
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import UsageError


def registry() -> Path:
    """This user's registry of runs that copy back."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "opf" / "writing"


def real_folders(folders: Iterable[str]) -> list[str]:
    """The real paths of absolute ``folders``, sorted: symbolic links among them and their
    parents resolved, parts that do not exist yet kept as they are. One ``lstat`` a folder
    and a parent (none below one that does not exist), each parent looked at once."""
    memo: dict[str, tuple[str, bool]] = {}  # path -> (its real path, whether it exists)

    def real(path: str) -> tuple[str, bool]:
        found = memo.get(path)
        if found is not None:
            return found
        parent, name = os.path.split(path)
        if not name or parent == path:
            found = (path, True)
        else:
            where, exists = real(parent)
            full = os.path.join(where, name)
            if exists:
                try:
                    mode = os.lstat(full).st_mode
                except OSError:
                    exists = False
                else:
                    if stat.S_ISLNK(mode):
                        full = os.path.realpath(full)
                        exists = os.path.exists(full)
            found = (full, exists)
        memo[path] = found
        return found

    return sorted({real(os.path.normpath(folder))[0] for folder in folders})


@contextlib.contextmanager
def registered(folders: Sequence[str], about: dict[str, Any],
               refused: Callable[[dict[str, Any], list[str]], str]) -> Iterator[None]:
    """Register this run as copying back into ``folders`` (absolute) for the block; ``about``
    goes with them (the state folder, the pipeline). Raise :class:`UsageError` with ``refused``
    of the other run's ``about`` and the folders both write into when a registered run that is
    still going writes into any of them."""
    if not folders:
        yield
        return
    real = real_folders(folders)
    folder = registry()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        guard = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        yield
        return
    mine: tuple[Path, int] | None = None
    try:
        try:
            fcntl.flock(guard, fcntl.LOCK_EX)
            clash = _clash(folder, set(real))
            if clash is not None:
                raise UsageError(refused(*clash))
            mine = _register(folder, dict(about, folders=real))
        except OSError:
            pass
        finally:
            os.close(guard)  # lets the registry's lock go
        yield
    finally:
        if mine is not None:
            with contextlib.suppress(OSError):
                os.unlink(mine[0])
            os.close(mine[1])


def _register(folder: Path, data: dict[str, Any]) -> tuple[Path, int]:
    name = folder / f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}.json"
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, json.dumps(dict(data, pid=os.getpid(), host=socket.gethostname()))
                 .encode("utf-8"))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        os.close(fd)
        raise
    return name, fd


def _clash(folder: Path, mine: set[str]) -> tuple[dict[str, Any], list[str]] | None:
    """The first registered run still going that writes into any of ``mine``, and the folders
    it shares with them; the files of runs that ended without removing theirs are removed."""
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not entry.name.endswith(".json"):
            continue
        try:
            fd = os.open(entry.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # its run is going on
                data = _read(entry.path)
                common = sorted(mine.intersection(data.get("folders") or ()))
                if common:
                    return data, common
                continue
            except OSError:  # cannot tell (a file system without locks): not in the way
                continue
            with contextlib.suppress(OSError):
                os.unlink(entry.path)  # nobody holds it: its run died
        finally:
            os.close(fd)
    return None


def _read(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_bytes())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
