r"""Expanding a job: its values (one task per glob match, list item, ``range`` number, line of a
``lines()`` file, or upstream task) and what a value looks like in a template.

:class:`Expander` is the part of the planner (:class:`opals_dsl.lang.lower.Planner`) that
turns a job's source into its :class:`TaskValue`\ s, reading the files a source names and
reporting what cannot be expanded (a glob that matches nothing, a missing or unreadable list
file, more tasks than :data:`MAX_TASKS`). It shares the planner's state — the collected
diagnostics, the root, the params, the jobs expanded so far — which is why it is a base class of
the planner rather than a function of its own; each method is one step with its inputs as
arguments.
"""

from __future__ import annotations

import fnmatch
import glob as globmod
import hashlib
import os
import posixpath
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath

from ..source import Span
from . import nodes as n
from .scope import ResolveError, Scope
from .tiles import Box, HeaderError, TooManyTiles, can_compare_crs, plan_tiles, read_box, same_crs

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


_WILDCARDS = re.compile(r"[*?\[]")


#: the most tasks a job, and a whole pipeline, may have: ten times what the planner is built
#: for, so that a slip (``range(1000000000)``, a huge ``--param``) is a message, not an
#: exhausted memory
MAX_TASKS = 10_000_000


#: the largest file ``lines(...)`` reads (MAX_TASKS lines of about 25 characters)
MAX_LIST_FILE_BYTES = 256 * 1024 * 1024


def format_value(value: object) -> str:
    """A value as templates show it: numbers as Python prints them, booleans true/false."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | list):
        return ",".join(format_value(v) for v in value)
    return str(value)


def safe_id(text: str) -> str:
    """``text`` made safe as a folder name: characters outside ``A-Za-z0-9._-`` become ``_``."""
    out = _UNSAFE.sub("_", text) or "_"
    if set(out) == {"."}:
        out = "_" * len(out)
    return out


#: the longest task id: its log (``<id>.log``) and its folder must fit a file name's 255 bytes,
#: with an index in front on a clash
MAX_ID = 200


def fitting_id(text: str) -> str:
    """A safe id (:func:`safe_id`, ASCII) of at most :data:`MAX_ID` characters: a longer one
    keeps its start, and ends with a hash of the whole, so that it stays stable and apart."""
    if len(text) <= MAX_ID:
        return text
    digest = hashlib.sha256(text.encode("ascii")).hexdigest()[:16]
    return f"{text[:MAX_ID - 17]}-{digest}"


def task_ids(labels: list[str]) -> list[str]:
    """Readable, stable task ids; on a clash (ignoring case) every id gets its index in front."""
    ids = [fitting_id(safe_id(label)) for label in labels]
    if len({i.lower() for i in ids}) != len(ids):
        width = len(str(len(ids) - 1))
        ids = [f"{k:0{width}d}-{i}" for k, i in enumerate(ids)]
    return ids


def leaves(norm: str) -> bool:
    """Does a normalised relative path climb out of its folder (``..`` or ``../x``)?"""
    return norm == ".." or norm.startswith("../")


def path_attr(path: str, attr: str) -> str:
    """``.name``, ``.stem``, ``.suffix`` or ``.parent`` of a path, as :class:`PurePosixPath`
    gives them; plain string slicing for the usual normalised path (it runs once per task)."""
    if not path or path == "." or "//" in path or path.endswith("/") or "/./" in path or (
        path.startswith("./") or path.endswith("/.")
    ):
        p = PurePosixPath(path)
        return str(p.parent) if attr == "parent" else getattr(p, attr)
    slash = path.rfind("/")
    if attr == "parent":
        return "." if slash < 0 else (path[:slash] or "/")
    name = path[slash + 1 :]
    if attr == "name":
        return name
    dot = name.rfind(".")
    if 0 < dot < len(name) - 1:
        return name[:dot] if attr == "stem" else name[dot:]
    return name if attr == "stem" else ""


@dataclass(slots=True)
class TaskValue:
    """The loop value of one task: ``file`` is its path (shared drive, plan form) if a file."""

    value: object
    file: str | None = None
    upstream: str | None = None  # upstream task id, for a map over another job


def glob_files(pattern: str, root: str) -> list[str]:
    """The files (not folders) a glob pattern matches, as :func:`glob.glob` writes them
    (relative to ``root`` unless the pattern is absolute).

    A pattern whose wildcards are all in its last part (``data/*.xyz``) is matched from one
    folder listing, which knows which entries are files without a ``stat`` per match."""
    folder, _, last = pattern.rpartition("/")
    if globmod.has_magic(folder) or "**" in last or not last:
        found = globmod.glob(pattern, root_dir=None if os.path.isabs(pattern) else root,
                             recursive=True)
        return [f for f in found if os.path.isfile(os.path.join(root, f))]
    match = re.compile(fnmatch.translate(last)).match
    hidden = last.startswith(".")
    if not folder and pattern.startswith("/"):
        folder = "/"
    prefix = folder if folder.endswith("/") else folder + "/" if folder else ""
    try:
        with os.scandir(os.path.join(root, folder)) as entries:
            return [
                prefix + e.name for e in entries
                if match(e.name) and (hidden or e.name[0] != ".") and e.is_file()
            ]
    except OSError:
        return []


def why_not_a_file(path: str) -> str:
    """What is at ``path``, which is not a file to read: the end of an error message."""
    if os.path.isdir(path):
        return "is a folder, not a file"
    if os.path.islink(path):
        return f"is a symbolic link to '{os.readlink(path)}', which does not exist"
    if os.path.exists(path):
        return "is not a regular file"
    return "does not exist"


def tiles_numbers(
    src: n.TilesSource, params: Mapping[str, object]
) -> tuple[float, float, tuple[float, float]] | None:
    """``size``, ``buffer`` and ``origin`` of a tiles source, params read; None when one is
    not a number (the checker reports it)."""

    def number(v: object) -> object:
        if isinstance(v, n.Ref):
            return params.get(v.parts[0]) if len(v.parts) == 1 else None
        return v.value if isinstance(v, n.Literal) else None

    size = number(src.size)
    buffer = 0 if src.buffer is None else number(src.buffer)
    origin: object = (0, 0)
    if isinstance(src.origin, n.ValueList):
        origin = tuple(number(i) for i in src.origin.items)
    elif src.origin is not None:
        origin = number(src.origin)
    if not isinstance(origin, tuple) or len(origin) != 2:
        return None
    values = [size, buffer, *origin]
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return None
    if not size > 0 or not buffer >= 0:  # type: ignore[operator]
        return None
    return size, buffer, origin  # type: ignore[return-value]


class Expander:
    """The job-expanding steps of the planner; see the module docstring."""

    def plan_path(self, path: str) -> str:
        """A shared-drive path in plan form: relative to the root if inside it, else absolute."""
        path = path.replace("\\", "/") if os.sep == "\\" else path
        if not (
            path.startswith(("/", "."))
            or "/." in path
            or "//" in path
            or path.endswith("/")
            or not path
        ):
            return path  # already normal, and relative to the root
        if posixpath.isabs(path):
            norm = posixpath.normpath(path)
            rel = posixpath.relpath(norm, self.root) if norm.startswith(self.root) else None
            return rel if rel is not None and not leaves(rel) else norm
        norm = posixpath.normpath(path)
        if leaves(norm):
            return posixpath.normpath(posixpath.join(self.root, norm))
        return norm

    def abspath(self, path: str) -> str:
        return os.path.join(self.root, path)

    def check_in_file(self, rel: str, span: Span | None, task: str | None) -> None:
        """Report an ``in`` file that is not a file; each is looked at, and reported, once per
        plan. ``task``: the task whose names made the path (None: every task names it)."""
        if rel in self.in_checked:
            return
        path = self.abspath(rel)
        why = self.in_checked[rel] = None if os.path.isfile(path) else why_not_a_file(path)
        if why is not None:
            whose = "" if task is None else f" (task '{task}')"
            self.c.error(span, f"the input file '{rel}'{whose} {why}")

    def task_values(self, job: n.Job, scope: Scope) -> list[TaskValue] | None:
        src = job.source
        jname = job.name.value
        if src is None:
            return [TaskValue(None)]
        if isinstance(src, n.GlobSource):
            pattern = self.job_template(src.pattern, scope, jname)
            return self.glob(pattern, src)
        if isinstance(src, n.ListSource):
            if not src.items:
                self.c.error(src.span, "this list is empty, so the job would have no task")
                return None
            if not self.room_for(len(src.items), src.span, "this list"):
                return None
            return [TaskValue(i.value) for i in src.items]
        if isinstance(src, n.RangeSource):
            args = [
                a.value if isinstance(a, n.Literal) else self.params.get(a.parts[0])
                for a in src.args
            ]
            if not all(isinstance(a, int) and not isinstance(a, bool) for a in args):
                raise ResolveError("range takes whole numbers")  # lenient: checked already
            if not 1 <= len(args) <= 2:
                raise ResolveError("range takes one or two numbers")  # checked already
            values = range(*args)  # type: ignore[arg-type]
            shown = f"range({', '.join(map(str, args))})"
            if not values:
                self.c.error(src.span, f"{shown} is empty, so the job would have no task")
                return None
            try:
                count = len(values)
            except OverflowError:  # more than sys.maxsize; the step is 1
                count = values.stop - values.start
            if not self.room_for(count, src.span, shown):
                return None
            return [TaskValue(v) for v in values]
        if isinstance(src, n.TilesSource):
            return self.tiles(src, scope, jname)
        if isinstance(src, n.LinesSource):
            rel = self.plan_path(self.job_template(src.path, scope, jname))
            self.read(rel, jname, None, src.path.span, src, what="its list file")
            lines = self.list_file(rel, src.path.span)
            if lines is None:
                return None
            if not lines:
                self.c.error(src.path.span, f"the list file '{rel}' has no lines, so the job "
                             "would have no task")
                return None
            return [TaskValue(v) for v in lines]
        assert isinstance(src, n.UpstreamSource)
        b = scope.resolve_upstream(src.ref)
        tasks, dests = self.published(b.job, b.step, b.name)
        if not self.room_for(len(dests), src.span, f"job '{b.job}'"):
            return None
        return [
            TaskValue(d, file=d, upstream=tid) for tid, d in zip(tasks, dests, strict=True)
        ]

    def glob(self, pattern: str, src: n.GlobSource | n.TilesSource) -> list[TaskValue] | None:
        if not _WILDCARDS.search(pattern):
            rel = self.plan_path(pattern)
            if not os.path.isfile(self.abspath(rel)):
                self.c.error(src.pattern.span,
                             f"the input file '{rel}' {why_not_a_file(self.abspath(rel))}")
                return None
            return [TaskValue(rel, file=rel)]
        files = sorted(self.plan_path(f) for f in glob_files(pattern, self.root))
        if not files:
            self.c.error(
                src.pattern.span,
                f"the pattern '{pattern}' matches no file (in {self.root}); check the folder "
                "and the spelling",
            )
            return None
        if not self.room_for(len(files), src.pattern.span, f"the pattern '{pattern}'"):
            return None
        return [TaskValue(f, file=f) for f in files]

    def tiles(self, src: n.TilesSource, scope: Scope, jname: str) -> list[TaskValue] | None:
        """One task per tile of ``tiles(...)``, laid over the matched files' headers; each
        file's header is read once (never its points)."""
        numbers = tiles_numbers(src, self.params)
        pattern = self.job_template(src.pattern, scope, jname)
        matched = self.glob(pattern, src)
        if matched is None or numbers is None:
            return None
        self.task_count -= len(matched)  # glob counted the files as tasks; the tiles are
        size, buffer, origin = numbers
        boxes, crs_first, failed = [], None, 0
        for value in matched:
            try:
                box = read_box(self.abspath(value.file), value.file)
            except HeaderError as exc:
                failed += 1
                if failed <= 3:
                    self.c.error(src.pattern.span,
                                 f"the file '{exc.path}' {exc.reason}; {exc.hint}")
                continue
            if crs_first is None:
                crs_first = box
            elif failed == 0 and not same_crs(crs_first, box):
                failed += 1
                self.c.error(src.pattern.span, f"the files '{crs_first.path}' and '{box.path}' "
                             "are in different coordinate reference systems "
                             f"({crs_first.crs_name} and {box.crs_name}); one grid of tiles "
                             f"needs one CRS: {_one_crs(crs_first, box)}")
            boxes.append(box)
        if failed:
            return None
        try:
            tiles = plan_tiles(boxes, size, buffer, origin)
        except TooManyTiles as exc:
            self.c.error(src.span, f"this grid would have {exc.count:,} tiles, more than the "
                         f"{exc.limit:,} one tiles(...) may make; choose a larger size")
            return None
        if not tiles:
            self.c.error(src.pattern.span, f"the files '{pattern}' matches hold no points, so "
                         "there is no tile")
            return None
        if not self.room_for(len(tiles), src.span, "these tiles"):
            return None
        return [TaskValue(t) for t in tiles]

    def room_for(self, count: int, span: Span | None, what: str) -> bool:
        """Count ``count`` more tasks, or report (at ``span``) that they are more than
        :data:`MAX_TASKS` for the job or the pipeline and return False."""
        if count > MAX_TASKS:
            self.c.error(span, f"{what} would make {count:,} tasks; a job may have at most "
                         f"{MAX_TASKS:,}")
            return False
        if self.task_count + count > MAX_TASKS:
            total = self.task_count + count
            self.c.error(span, f"{what} would make {count:,} more tasks, {total:,} in all; a "
                         f"pipeline may have at most {MAX_TASKS:,}")
            return False
        self.task_count += count
        return True

    def list_file(self, rel: str, span: Span | None) -> list[str] | None:
        """The values of a ``lines(...)`` file: its lines, stripped, without blank ones and
        ``#`` comments; None (reported) when it is not a regular file of at most
        :data:`MAX_LIST_FILE_BYTES`, not UTF-8, holds a NUL, or has too many lines."""
        path = self.abspath(rel)
        try:
            # not blocking on a named pipe without a writer: its type is refused below
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            self.c.error(span, f"the list file '{rel}' {why_not_a_file(path)}")
            return None
        except OSError as exc:
            self.c.error(span, f"the list file '{rel}' cannot be read: {exc.strerror or exc}")
            return None
        room = MAX_TASKS - self.task_count
        values: list[str] = []
        try:
            with open(fd, encoding="utf-8-sig", closefd=True) as fh:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode):
                    self.c.error(span, f"the list file '{rel}' is not a regular file (a device or "
                                 "named pipe would be read for ever); name an ordinary file")
                    return None
                if info.st_size > MAX_LIST_FILE_BYTES:
                    self.c.error(span, f"the list file '{rel}' is {info.st_size:,} bytes, more "
                                 f"than the {MAX_LIST_FILE_BYTES:,} a list file may have")
                    return None
                for number, line in enumerate(fh, 1):
                    value = line.strip()
                    if not value or value.startswith("#"):
                        continue
                    if "\0" in value:
                        self.c.error(span, f"line {number} of the list file '{rel}' holds a NUL "
                                     "character, which no file name or command word can hold; "
                                     "is it a text file?")
                        return None
                    if len(values) >= room:
                        self.c.error(span, f"the list file '{rel}' has more than {room:,} lines; "
                                     f"a job and a pipeline may have at most {MAX_TASKS:,} tasks")
                        return None
                    values.append(value)
        except UnicodeDecodeError as exc:
            self.c.error(span, f"the list file '{rel}' is not UTF-8 text ({exc.reason} at byte "
                         f"{exc.start:,}); save it as UTF-8")
            return None
        except IsADirectoryError:
            self.c.error(span, f"the list file '{rel}' {why_not_a_file(path)}")
            return None
        except OSError as exc:
            self.c.error(span, f"the list file '{rel}' cannot be read: {exc.strerror or exc}")
            return None
        self.task_count += len(values)
        return values


def _one_crs(a: Box, b: Box) -> str:
    """How to give two files of one grid one CRS: a file without a CRS record needs the CRS it
    is in written into its header (its coordinates stay); others need reprojecting."""
    if (a.crs is None) != (b.crs is None):
        bare, other = (a, b) if a.crs is None else (b, a)
        return (f"if the coordinates of '{bare.path}' are in {other.crs_name}, write that CRS "
                f"into its header (assign it: the coordinates stay as they are); else reproject "
                f"it, or tile the files in separate jobs")
    unsure = ("" if can_compare_crs() else " (pyproj is not installed, so their CRS records "
              "are compared as written: with pyproj, two records of one CRS count as one)")
    return f"reproject the files into one, or tile them in separate jobs{unsure}"
