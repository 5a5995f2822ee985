"""Tiles from LAS/LAZ headers: the grid behind ``for tile in tiles(GLOB, size = S, ...)``.

Two parts, apart so that each can be tested on its own:

* :func:`read_box` reads one file's header — its bounding box, point count and CRS record —
  with laspy's header reader, which stops where the points begin (it never reads a point);
* :func:`plan_tiles` lays the grid over the boxes: squares of side ``size`` whose edges lie on
  ``origin + k * size``. A tile's core is half-open, ``[xmin, xmax) x [ymin, ymax)``, so every
  point of the plane lies in exactly one core; the boxes are closed. There is a tile for each
  core that meets at least one box, in order of ``(ymin, xmin)``, and each tile lists the
  files whose box meets its core grown by ``buffer`` on every side (``[xmin - B, xmax + B) x
  [ymin - B, ymax + B)``), in the order the files were given.

The edges of tile ``(i, j)`` are computed once, as ``origin + i * size``, and a neighbour's
shared edge is that same number, so the cores are disjoint and leave no gap in floating point
too. Which tiles a box meets is found from the edges themselves, not from a division that
could round the other way.

:class:`~opals_dsl.lang.expand.Expander` turns the tiles into a job's task values and reports
:class:`HeaderError` and :class:`TooManyTiles` at the source's place in the pipeline file.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

#: the most tiles one ``tiles(...)`` source may make
MAX_TILES = 1_000_000

#: laspy's VLR record ids of a CRS: OGC WKT, and GeoTIFF's key directory and its parameters
_WKT_RECORD = 2112
_GEOKEY_RECORDS = (34735, 34736, 34737)
#: GeoTIFF keys that name an EPSG CRS: projected, geographic
_EPSG_KEYS = (3072, 2048)
_WKT_NAME = re.compile(r'^\s*[A-Z_]+\[\s*"([^"]*)"')
_WKT_ID = re.compile(r'\s*(?:AUTHORITY|ID)\s*[\[(]\s*"EPSG"\s*,\s*"?(\d+)"?\s*[\])]', re.I)

Number = int | float


@dataclass(frozen=True, slots=True)
class Box:
    """What a file's header says: its bounding box (closed), point count and CRS.

    ``crs`` is the CRS record as read (None: the file has none), compared by :func:`same_crs`;
    ``crs_name`` says it in words."""

    path: str
    xmin: float
    ymin: float
    xmax: float
    ymax: float
    points: int = 1
    crs: object = None
    crs_name: str = "no CRS record"


@dataclass(frozen=True, slots=True)
class Tile:
    """One tile: its core ``[xmin, xmax) x [ymin, ymax)``, the buffer and the files whose box
    meets the buffered core."""

    xmin: Number
    ymin: Number
    xmax: Number
    ymax: Number
    buffer: Number
    files: tuple[str, ...]

    @property
    def id(self) -> str:
        """``{xmin}_{ymin}`` of the core, numbers as Python prints them."""
        return f"{self.xmin}_{self.ymin}"

    def __str__(self) -> str:
        return self.id

    def attr(self, name: str) -> Number | str | tuple[str, ...]:
        """The value of ``{tile.NAME}``."""
        return getattr(self, name)


#: what to do about a file that is not LAS/LAZ at all
NOT_LAS = "tiles(...) reads LAS and LAZ files only: make the pattern match only those"
#: ... about one that begins as LAS/LAZ does, but whose header is cut short or damaged
DAMAGED = ("replace it with a whole, good copy (is it still being copied?), or move it out of "
           "the pattern's reach")


class HeaderError(Exception):
    """A matched file whose header cannot be read as a LAS/LAZ header: why, and what to do."""

    def __init__(self, path: str, reason: str, hint: str = NOT_LAS) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
        self.hint = hint


class TooManyTiles(Exception):
    """The grid would have more than ``limit`` tiles; ``count`` is how many."""

    def __init__(self, count: int, limit: int) -> None:
        super().__init__(f"{count} tiles")
        self.count = count
        self.limit = limit


def read_box(path: str, shown: str | None = None) -> Box:
    """A LAS/LAZ file's header as a :class:`Box` (``shown``: the path as the box names it).

    Reads the public header block and the VLRs only — never a point. Raises
    :class:`HeaderError` for a file that is not LAS/LAZ or whose bounding box is not finite."""
    name = path if shown is None else shown
    try:
        with open(path, "rb") as fh:
            signature = fh.read(4)
            if not signature:
                raise HeaderError(name, "is empty", DAMAGED)
            if signature != b"LASF":
                raise HeaderError(name, "is not a LAS/LAZ file (it does not begin with the "
                                  "signature LASF)")
            fh.seek(0)
            header = _header_class().read_from(fh)
            size = os.fstat(fh.fileno()).st_size
    except HeaderError:
        raise
    except OSError as exc:
        raise HeaderError(name, f"cannot be read: {exc.strerror or exc}",
                          "make it readable for opf, or move it out of the pattern's reach"
                          ) from None
    except Exception as exc:  # laspy's errors on a damaged header are of many kinds
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HeaderError(name, f"begins as a LAS/LAZ file does, but its header cannot be read "
                          f"({reason}): it is damaged or cut short", DAMAGED) from None
    lo, hi = header.mins, header.maxs
    values = [float(v) for v in (lo[0], lo[1], hi[0], hi[1])]
    points = int(header.point_count)
    if points and (not all(map(math.isfinite, values)) or lo[0] > hi[0] or lo[1] > hi[1]):
        raise HeaderError(name, "has a header whose bounding box is not a box "
                          f"(min {values[0]}, {values[1]}; max {values[2]}, {values[3]})",
                          DAMAGED)
    if not header.are_points_compressed:  # a LAS file's size says whether all points are there
        held = max(size - header.offset_to_point_data, 0) // header.point_format.size
        if held < points:
            raise HeaderError(name, f"is cut short: its header says {points} points, the file "
                              f"holds {held}", DAMAGED)
    crs, crs_name = _crs_record(header.vlrs)
    return Box(name, *values, points=points, crs=crs, crs_name=crs_name)


@functools.cache
def _header_class() -> type:
    """laspy's header class, made to start from a point format made once.

    ``LasHeader.read_from`` first makes an empty header, whose ``__init__`` deep-copies the
    default point format — more than half the time of reading a header — and then replaces
    that format with the file's own. Starting from one shared format instead halves the time
    to read 10,000 headers; the file's format still replaces it, so nothing read changes."""
    import laspy  # not every pipeline needs it: imported on first use
    from laspy.point.format import PointFormat

    start = PointFormat(laspy.LasHeader.DEFAULT_POINT_FORMAT.id)
    version = laspy.LasHeader.DEFAULT_VERSION

    class HeaderOnly(laspy.LasHeader):
        def __init__(self) -> None:
            super().__init__(version=version, point_format=start)

    return HeaderOnly


def _crs_record(vlrs: Iterable[object]) -> tuple[object, str]:
    """The CRS records of a header (as comparable data) and the CRS's name."""
    wkt = None
    keys: list[tuple[int, bytes]] = []
    epsg = None
    for vlr in vlrs:
        record = getattr(vlr, "record_id", None)
        if record == _WKT_RECORD and getattr(vlr, "string", None):
            wkt = vlr.string.strip("\0 \t\r\n")
        elif record in _GEOKEY_RECORDS:
            keys.append((record, bytes(vlr.record_data_bytes())))
            for entry in getattr(vlr, "geo_keys", ()):
                if entry.id in _EPSG_KEYS and entry.tiff_tag_location == 0 and (
                    0 < entry.value_offset < 32767
                ):
                    epsg = epsg or f"EPSG:{entry.value_offset}"
    if wkt:
        match = _WKT_NAME.match(wkt)
        code = _wkt_epsg(wkt)
        name = f"'{match.group(1)}'" if match else "a WKT CRS"
        return ("wkt", wkt), f"{code} {name}" if code else name
    if keys:
        return ("geotiff", tuple(sorted(keys))), epsg or "a GeoTIFF-keys CRS"
    return None, "no CRS record"


def same_crs(a: Box, b: Box) -> bool:
    """Whether two files' CRS records name one CRS: the same record, or two records that pyproj
    (where it is installed) finds equal — an ESRI WKT and the EPSG keys of one projection."""
    if a.crs == b.crs:
        return True
    if a.crs is None or b.crs is None:
        return False
    one, two = _as_pyproj(a.crs, a.crs_name), _as_pyproj(b.crs, b.crs_name)
    return one is not None and two is not None and one.equals(two, ignore_axis_order=True)


def can_compare_crs() -> bool:
    """Whether :func:`same_crs` can tell two records of one CRS (pyproj is installed)."""
    return importlib.util.find_spec("pyproj") is not None


@functools.lru_cache(maxsize=64)
def _as_pyproj(record: object, name: str) -> Any:
    """A CRS record as a ``pyproj.CRS``; None without pyproj, or for a record it cannot read."""
    if not can_compare_crs():
        return None
    import pyproj

    kind, data = record  # type: ignore[misc]
    try:
        if kind == "wkt":
            return pyproj.CRS.from_wkt(data)
        if name.startswith("EPSG:"):  # GeoTIFF keys naming an EPSG CRS
            return pyproj.CRS.from_user_input(name)
    except pyproj.exceptions.CRSError:
        return None
    return None


def _wkt_epsg(wkt: str) -> str | None:
    """The EPSG code a WKT CRS names itself by (``EPSG:n``): its own ``AUTHORITY["EPSG","n"]``
    (WKT 1) or ``ID["EPSG",n]`` (WKT 2), a child of the outermost element — not the id of a
    unit or datum inside it."""
    depth, quoted, item = 0, False, 0
    for i, ch in enumerate(wkt):
        if ch == '"':
            quoted = not quoted  # a quote inside a name is written twice: the state is kept
        elif quoted:
            continue
        elif ch in "[(":
            depth += 1
            if depth == 2:
                match = _WKT_ID.match(wkt, item)
                if match:
                    return f"EPSG:{match.group(1)}"
        elif ch in "])":
            depth -= 1
        elif ch == "," and depth == 1:
            item = i + 1
    return None


def _core_range(lo: float, hi: float, origin: Number, size: Number) -> tuple[int, int]:
    """The first and last k whose core ``[origin + k*size, origin + (k+1)*size)`` meets the
    closed ``[lo, hi]``: the cores that hold ``lo`` and ``hi``."""

    def holding(v: float) -> int:
        k = math.floor((v - origin) / size)
        while origin + k * size > v:
            k -= 1
        while origin + (k + 1) * size <= v:
            k += 1
        return k

    return holding(lo), holding(hi)


def _union_count(ranges: Sequence[tuple[int, int, int, int]]) -> int:
    """How many grid cells the index rectangles ``(i0, i1, j0, j1)`` (inclusive) cover together.

    A sweep over columns: the rows covered in each band of columns, merged."""
    import numpy as np

    r = np.array(ranges, dtype=np.int64)
    i0, i1, j0, j1 = r[:, 0], r[:, 1] + 1, r[:, 2], r[:, 3] + 1
    edges = np.unique(np.concatenate([i0, i1]))
    total = 0
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        cover = (i0 <= a) & (i1 > a)
        if not cover.any():
            continue
        order = np.argsort(j0[cover], kind="stable")
        starts, ends = j0[cover][order], j1[cover][order]
        reach = np.maximum.accumulate(ends)
        before = np.concatenate([[starts[0]], reach[:-1]])
        rows = int(np.clip(ends - np.maximum(starts, before), 0, None).sum())
        total += rows * int(b - a)
    return total


def plan_tiles(
    boxes: Sequence[Box], size: Number, buffer: Number = 0, origin: tuple[Number, Number] = (0, 0),
    limit: int = MAX_TILES,
) -> list[Tile]:
    """The tiles of side ``size`` (edges on ``origin + k * size``) whose core meets a box, in
    order of ``(ymin, xmin)``, each with the boxes' paths that meet its core grown by
    ``buffer``. Boxes of files without points are left out. Raises :class:`TooManyTiles`."""
    if not size > 0 or not buffer >= 0:
        raise ValueError("size must be positive and buffer not negative")
    ox, oy = origin
    boxes = [b for b in boxes if b.points > 0]
    ranges = [(*_core_range(b.xmin, b.xmax, ox, size), *_core_range(b.ymin, b.ymax, oy, size))
              for b in boxes]
    if sum((i1 - i0 + 1) * (j1 - j0 + 1) for i0, i1, j0, j1 in ranges) > limit:
        count = _union_count(ranges)
        if count > limit:
            raise TooManyTiles(count, limit)
    cells: set[tuple[int, int]] = set()
    for i0, i1, j0, j1 in ranges:
        cells.update((j, i) for j in range(j0, j1 + 1) for i in range(i0, i1 + 1))
    files: dict[tuple[int, int], list[str]] = {cell: [] for cell in cells}
    for box in boxes:
        for cell in _buffered_cells(box, size, buffer, ox, oy):
            found = files.get(cell)
            if found is not None:
                found.append(box.path)
    return [
        Tile(ox + i * size, oy + j * size, ox + (i + 1) * size, oy + (j + 1) * size, buffer,
             tuple(files[(j, i)]))
        for j, i in sorted(cells)
    ]


def _buffered_cells(box: Box, size: Number, buffer: Number, ox: Number, oy: Number
                    ) -> Iterable[tuple[int, int]]:
    """The cells ``(j, i)`` whose core grown by ``buffer`` meets the box."""
    cols = _near(box.xmin, box.xmax, ox, size, buffer)
    rows = _near(box.ymin, box.ymax, oy, size, buffer)
    return ((j, i) for j in rows for i in cols)


def _near(lo: float, hi: float, origin: Number, size: Number, buffer: Number) -> list[int]:
    """The k whose grown core ``[origin + k*size - buffer, origin + (k+1)*size + buffer)``
    meets the closed ``[lo, hi]``: candidates from a division, kept by the edges' test."""
    first = math.floor((lo - buffer - origin) / size) - 1
    last = math.floor((hi + buffer - origin) / size) + 1
    return [
        k for k in range(first, last + 1)
        if origin + k * size - buffer <= hi and origin + (k + 1) * size + buffer > lo
    ]
