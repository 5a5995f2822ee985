"""A small airborne laser scanning toolkit, standing in for OPALS modules in the examples.

LAS/LAZ point clouds in, GeoTIFF rasters out, in the data's coordinate reference system (CRS).
Each subcommand reads files and writes one file, so a pipeline step can run it:

    python lidar.py import [--ground] [--crs CRS] IN.las OUT.laz     a strip's points, as LAZ
    python lidar.py grid [--config CFG] [--cell C] [--fill N] [--ground] [--crs CRS]
                         [--core XMIN YMIN XMAX YMAX [--buffer B]]
                         IN.laz [IN2.laz ...] OUT.tif                 points -> DEM
    python lidar.py mosaic -o OUT.tif IN1.tif IN2.tif ...            DEMs -> one DEM
    python lidar.py hillshade [--azimuth A] [--altitude H] IN.tif OUT.tif   shaded relief
    python lidar.py slope IN.tif OUT.tif                             slope in degrees
    python lidar.py check IN.tif [IN2.tif ...]                       read rasters whole

- **import** reads an ASPRS LAS 1.0-1.4 file, LAZ-compressed or not (a COPC file is LAZ; its
  octree index is not kept), keeps all points or with `--ground` only the ground class (2),
  and writes them as LAZ with the input's header, CRS included. `--crs` (EPSG code, WKT or
  PROJ string) gives a CRS to a file that carries none; a file whose own CRS differs from
  `--crs` is an error.
- **grid** makes a DEM: the mean height of each cell's points (with `--ground`, of its ground
  points). Cell edges lie on multiples of the cell size, so DEMs of overlapping strips share one
  grid. An empty cell takes the value of the nearest cell with points when that cell is at most
  `fill` cells away (centre to centre), and is nodata beyond. The DEM is a Cloud-Optimized
  GeoTIFF (tiled, DEFLATE-compressed, float32) with the points' CRS (`header.parse_crs()`), the
  transform of the grid and the nodata value; a CRS that equals an EPSG CRS is written as
  that EPSG CRS, so GIS shows its name and code. Inputs with different CRSs are an error, and
  so are inputs without a CRS when `--crs` gives none. With `--core`, the DEM of one tile:
  the cells within `--buffer` of the core (whole cells) are gridded from the points in them,
  so that cells near the core's edges are filled from their neighbours as in one DEM of
  everything, and the DEM keeps exactly the core, `[XMIN, XMAX) x [YMIN, YMAX)`, whose edges
  must lie on multiples of the cell size. Tiles' DEMs then join without seams: their mosaic
  is the DEM of all points gridded over the tiles' area, cell for cell, when the buffer is
  at least `fill` cells. A file with points outside its header's bounding box, in tiles
  that box does not reach, is then an error: tiles laid from that header miss them.
- **mosaic** merges DEMs of one CRS and cell size, aligned to one grid: the mean where they
  overlap, nodata where none has data.
- **hillshade** (0 = nodata, 1-255 = shade, as `gdaldem hillshade`) and **slope** (degrees)
  of a DEM; a cell next to nodata is nodata.
- **check** reads each raster whole, every cell, and says its size, cell size and unit, CRS
  and cells with data; a file cut short or damaged is an error. As the last step of a task it
  keeps a damaged result from being published.

Units are never converted: a CRS in feet gives cell sizes, coordinates and heights in feet.
Slope and hillshade take heights to be in the CRS's horizontal unit, as LAS files in a
projected CRS have them, unless a compound CRS gives the heights a unit of their own (metres
east and north, US survey feet up): then they compare like with like.

The computations are plain functions (`read_points`, `import_points`, `grid_points`,
`grid_core`, `fill_nearest`, `read_raster`, `write_raster`, `mosaic`, `hillshade`, `slope`)
so they can be imported. Errors in the input are reported on one line (`FILE: what is
wrong`) with exit status 2. Needs laspy (with lazrs for LAZ), numpy, pyproj and rasterio
(GDAL in its wheel); `pip install 'opals_dsl[examples]'` brings them.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyproj
from affine import Affine  # rasterio's transform type

if TYPE_CHECKING:
    import laspy

# laspy and rasterio are imported where they are used, so that a step loads only what its
# subcommand needs: starting Python with all of them takes a second or more on a busy machine

GROUND = 2  # ASPRS LAS classification code of ground points
CONFIG_DEFAULTS: dict[str, float] = {"cell": 1.0, "fill": 0, "nodata": -9999.0}
GEOTIFF = {"driver": "COG", "compress": "deflate", "predictor": 3, "blocksize": 256}


class LidarError(Exception):
    """A problem with the input, reported to the user as one line."""


@dataclass
class Points:
    """Coordinates (float64 arrays, in the CRS's units) and the CRS (None: the file has none)."""

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    crs: pyproj.CRS | None


@dataclass
class Grid:
    """A raster: `values[row, col]`, row 0 at the top (north); NaN where there is no data."""

    values: np.ndarray
    xll: float  # x of the lower-left corner of the lower-left cell
    yll: float
    cell: float
    crs: pyproj.CRS | None = None
    nodata: float = -9999.0
    counts: dict[str, int] = field(default_factory=dict)  # what grid_points did, for the log

    @property
    def transform(self) -> Affine:
        top = self.yll + self.values.shape[0] * self.cell
        return Affine(self.cell, 0.0, self.xll, 0.0, -self.cell, top)


# --- coordinate reference systems ---------------------------------------------------------

def parse_crs(text: str) -> pyproj.CRS:
    """A CRS from the command line: `EPSG:2994`, WKT, a PROJ string, ... (argparse reports a
    bad one as a usage error, without a traceback)."""
    try:
        return pyproj.CRS.from_user_input(text)
    except pyproj.exceptions.CRSError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a coordinate reference system (give e.g. EPSG:2994, a WKT "
            "string or a PROJ string)") from None


def epsg_code(crs: pyproj.CRS) -> int | None:
    """The EPSG code of a CRS that equals an EPSG CRS, even where its WKT names no authority.

    LAS files often carry ESRI-flavoured WKT without one (autzen_trim.laz does); read as ESRI's
    dialect, GDAL matches it to its EPSG code, and pyproj confirms the EPSG CRS equals the file's.
    """
    return _epsg_of_wkt(crs.to_wkt())


@functools.lru_cache(maxsize=16)
def _epsg_of_wkt(wkt: str) -> int | None:
    crs = pyproj.CRS.from_wkt(wkt)
    ident = crs.to_json_dict().get("id", {})
    if ident.get("authority") == "EPSG":  # says so itself: no search needed
        return int(ident["code"])
    import rasterio.crs
    import rasterio.errors

    try:  # the search takes about half a second, hence the cache
        code = rasterio.crs.CRS.from_wkt(crs.to_wkt("WKT1_ESRI"),
                                         morph_from_esri_dialect=True).to_epsg()
        return code if code is not None and pyproj.CRS.from_epsg(code).equals(crs) else None
    except (pyproj.exceptions.CRSError, rasterio.errors.CRSError):
        return None


def crs_name(crs: pyproj.CRS | None) -> str:
    if crs is None:
        return "no CRS"
    code = epsg_code(crs)
    return f"{pyproj.CRS.from_epsg(code).name} (EPSG:{code})" if code else crs.name


def same_crs(a: pyproj.CRS | None, b: pyproj.CRS | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.equals(b)


def one_crs(named: list[tuple[str, pyproj.CRS | None]], given: pyproj.CRS | None,
            what: str = "file") -> pyproj.CRS | None:
    """The one CRS of several files: the files' own, or `given` for files that carry none.

    Two files with different CRSs, or a file whose CRS is not `given`, are an error naming them.
    """
    found: list[tuple[str, pyproj.CRS]] = []
    for name, crs in named:
        if crs is not None and given is not None and not same_crs(crs, given):
            raise LidarError(f"{name}: the {what} is in {crs_name(crs)}, not in the CRS given "
                             f"with --crs, {crs_name(given)}; leave out --crs for files that "
                             "carry a CRS")
        if crs is not None:
            found.append((name, crs))
    for name, crs in found[1:]:
        first, first_crs = found[0]
        if not same_crs(crs, first_crs):
            raise LidarError(f"{first} and {name} are in different coordinate reference "
                             f"systems: {crs_name(first_crs)} and {crs_name(crs)}; reproject "
                             "one of them first")
    if given is not None:
        return given
    missing = [name for name, crs in named if crs is None]
    if missing and found:
        raise LidarError(f"{missing[0]} carries no coordinate reference system but "
                         f"{found[0][0]} is in {crs_name(found[0][1])}; give the CRS of "
                         "the files that carry none with --crs")
    return found[0][1] if found else None


# --- points -------------------------------------------------------------------------------

def _open_las(path: str | Path) -> laspy.LasData:
    import laspy

    try:
        with laspy.open(path) as reader:
            header = reader.header
            if not header.are_points_compressed:  # a LAS file cut short: say so plainly
                size, start = os.path.getsize(path), header.offset_to_point_data
                held = max(size - start, 0) // header.point_format.size
                if held < header.point_count:
                    raise LidarError(f"{path}: the file is cut short: its header says "
                                     f"{header.point_count} points, it holds {held}")
            return reader.read()
    except (LidarError, OSError):
        raise
    except Exception as exc:  # laspy's and lazrs' errors on broken files are of many kinds
        with open(path, "rb") as f:
            las_like = f.read(4) == b"LASF"
        what = ("begins as a LAS/LAZ file does, but its points cannot be read: it is damaged or "
                "cut short" if las_like else "not a LAS/LAZ file laspy can read")
        raise LidarError(f"{path}: {what} ({exc})") from None


def _header_crs(path: str | Path, header: laspy.LasHeader) -> pyproj.CRS | None:
    try:
        return header.parse_crs()
    except Exception as exc:  # a CRS record that pyproj cannot read
        raise LidarError(f"{path}: its coordinate reference system record cannot be read "
                         f"({exc})") from None


def read_points(paths: list[str | Path], crs: pyproj.CRS | None = None,
                ground: bool = False,
                core: tuple[float, float, float, float] | None = None) -> Points:
    """The points of LAS/LAZ files (with `ground`, of class 2 only) and their one CRS. Given a
    tile's `core`, a file with points that tiles laid from its header miss is an error."""
    xs, ys, zs, named = [], [], [], []
    for path in paths:
        las = _open_las(path)
        named.append((str(path), _header_crs(path, las.header)))
        if core is not None:
            _check_box(path, las, core)
        keep = las.classification == GROUND if ground else slice(None)
        xs.append(np.asarray(las.x)[keep])
        ys.append(np.asarray(las.y)[keep])
        zs.append(np.asarray(las.z)[keep])
    points = Points(np.concatenate(xs), np.concatenate(ys), np.concatenate(zs),
                    one_crs(named, crs))
    if len(points.x) == 0:
        kind = "ground points (class 2)" if ground else "points"
        raise LidarError(f"{', '.join(map(str, paths))}: no {kind} to grid")
    return points


def _check_box(path: str | Path, las: laspy.LasData,
               core: tuple[float, float, float, float]) -> None:
    """Refuse a file with points outside its header's bounding box in tiles that box does not
    reach: a grid laid from the header (squares as wide as `core`, aligned to it) gives those
    tiles no copy of the file, or has no such tile, so the points reach no DEM."""
    size = core[2] - core[0]
    if not len(las.points) or size <= 0:  # a core that is not one is grid_core's to refuse
        return
    x, y = np.asarray(las.x), np.asarray(las.y)
    (lx, ly), (hx, hy) = las.header.mins[:2], las.header.maxs[:2]

    def reached(v: np.ndarray, origin: float, lo: float, hi: float) -> np.ndarray:
        left = origin + np.floor((v - origin) / size) * size  # the core [left, left + size)
        return (left <= hi) & (left + size > lo)

    lost = int((~(reached(x, core[0], lx, hx) & reached(y, core[1], ly, hy))).sum())
    if lost:
        digits = max(0, math.ceil(-math.log10(min(las.header.scales[:2]))))

        def span(lo: float, hi: float) -> str:
            return f"{lo:.{digits}f} to {hi:.{digits}f}"

        raise LidarError(
            f"{path}: {lost} of its {len(x)} points lie outside the bounding box its header "
            f"gives, in tiles that box does not reach (the header: x {span(lx, hx)}, y "
            f"{span(ly, hy)}; the points: x {span(x.min(), x.max())}, y "
            f"{span(y.min(), y.max())}). Tiles are laid from headers, so no tile reads this file "
            f"for them: write the points' true bounds into the header (PDAL, LAStools and laspy "
            f"can), then run again")


def import_points(source: str | Path, dest: str | Path, crs: pyproj.CRS | None = None,
                  ground: bool = False) -> int:
    """Copy a LAS/LAZ file's points (with `ground`, class 2 only) to `dest`; return their count.

    The header, CRS record included, is kept; `crs` is written into it when the file has none.
    """
    las = _open_las(source)
    own = _header_crs(source, las.header)
    one_crs([(str(source), own)], crs)
    if ground:
        las.points = las.points[las.classification == GROUND].copy()
        if len(las.points) == 0:
            raise LidarError(f"{source}: no ground points (class 2)")
    if own is None and crs is not None:
        las.header.add_crs(crs)
    # a COPC file's octree index describes its own point order; laspy cannot write it, and the
    # points written here are a plain LAZ file
    las.header.vlrs[:] = [v for v in las.header.vlrs if v.user_id != "copc"]
    if las.header.evlrs is not None:
        las.header.evlrs[:] = [v for v in las.header.evlrs if v.user_id != "copc"]
    with _replacing(dest) as tmp:
        las.write(tmp, do_compress=Path(dest).suffix.lower() == ".laz")
    return len(las.points)


@contextmanager
def _replacing(dest: str | Path):
    """A hidden temporary path beside `dest`, renamed to `dest` when the block succeeds.

    So a reader never sees a half-written file, and a failed write leaves no file behind.
    """
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.stem}.{os.getpid()}.part{dest.suffix}")
    try:
        yield str(tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


# --- gridding -----------------------------------------------------------------------------

def read_config(path: str | Path) -> dict[str, float]:
    """Read `key = value` lines (`#` comments) over the defaults in CONFIG_DEFAULTS."""
    config = dict(CONFIG_DEFAULTS)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LidarError(f"{path}: not a text file (it is not UTF-8)") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        key, eq, value = (part.strip() for part in line.partition("="))
        where = f"{path}:{lineno}"
        if not eq or not key or not value:
            raise LidarError(f"{where}: expected 'key = value', found {line!r}")
        if key not in CONFIG_DEFAULTS:
            raise LidarError(f"{where}: unknown key {key!r} (known: {', '.join(CONFIG_DEFAULTS)})")
        try:
            config[key] = int(value) if key == "fill" else float(value)
        except ValueError:
            kind = "a whole number" if key == "fill" else "a number"
            raise LidarError(f"{where}: {key} must be {kind}, found {value!r}") from None
        _check_setting(key, config[key], where)
    return config


def _check_setting(key: str, value: float, where: str) -> None:
    if key == "cell" and not value > 0:
        raise LidarError(f"{where}: cell must be greater than 0, found {value:g}")
    if key == "fill" and value < 0:
        raise LidarError(f"{where}: fill must be 0 or more cells, found {value:g}")


def grid_points(points: Points, cell: float, fill: int = 0, nodata: float = -9999.0,
                window: tuple[int, int, int, int] | None = None) -> Grid:
    """Grid points to a DEM: per cell the mean height of its points.

    Cell edges lie on multiples of `cell`, so grids of overlapping strips share cell
    boundaries; a cell holds the points with `left <= x < right` and `bottom <= y < top`.
    Empty cells take the value of the nearest cell with points at most `fill` cells away.
    The DEM covers the cells of the points, or the cells `window` names (left, bottom,
    right, top, in cells: columns left..right-1, rows bottom..top-1; points outside it are
    left out).
    """
    ix = np.floor(points.x / cell).astype(np.int64)
    iy = np.floor(points.y / cell).astype(np.int64)
    if window is None:
        window = (int(ix.min()), int(iy.min()), int(ix.max()) + 1, int(iy.max()) + 1)
    left, bottom, right, top = window
    inside = (ix >= left) & (ix < right) & (iy >= bottom) & (iy < top)
    ix, iy, z = ix[inside], iy[inside], points.z[inside]
    ncols, nrows = right - left, top - bottom
    flat = (top - 1 - iy) * ncols + (ix - left)  # row 0 is the top (north) row
    total = np.bincount(flat, weights=z, minlength=nrows * ncols)
    count = np.bincount(flat, minlength=nrows * ncols)
    with np.errstate(invalid="ignore", divide="ignore"):
        values = (total / count).reshape(nrows, ncols)  # NaN where a cell holds no point
    filled = fill_nearest(values, fill)
    counts = {"cells": values.size, "with points": int((count > 0).sum()),
              "filled": int(np.isnan(values).sum() - np.isnan(filled).sum()),
              "nodata": int(np.isnan(filled).sum()), "points": len(z)}
    return Grid(filled, float(left * cell), float(bottom * cell), float(cell),
                points.crs, nodata, counts)


def grid_core(points: Points, core: tuple[float, float, float, float], buffer: float,
              cell: float, fill: int = 0, nodata: float = -9999.0) -> Grid:
    """The DEM of one tile: the points of the cells within `buffer` of the core gridded as by
    `grid_points` on those cells, then cut to exactly the core's cells.

    A cell near the core's edge is filled from the cells around it as in one DEM of all
    points, when those cells lie within the buffer (`buffer >= fill * cell`)."""
    edges = [v / cell for v in core]
    if any(abs(e - round(e)) > 1e-9 for e in edges) or not (core[0] < core[2]
                                                            and core[1] < core[3]):
        raise LidarError(f"--core {' '.join(f'{v:g}' for v in core)}: the core's edges must "
                         f"lie on multiples of the cell size {cell:g}")
    if buffer < 0:
        raise LidarError(f"--buffer must be 0 or more, found {buffer:g}")
    left, bottom, right, top = (round(e) for e in edges)
    grow = math.floor(buffer / cell + 1e-9)  # whole cells only: all their points are here
    grid = grid_points(points, cell, fill, nodata,
                       (left - grow, bottom - grow, right + grow, top + grow))
    values = grid.values[grow:grow + top - bottom, grow:grow + right - left]
    counts = {"cells": values.size, "with points": int((~np.isnan(values)).sum()),
              "nodata": int(np.isnan(values).sum()), "points": grid.counts["points"]}
    return Grid(values, left * cell, bottom * cell, cell, points.crs, nodata, counts)


def fill_nearest(values: np.ndarray, max_cells: int) -> np.ndarray:
    """Give each NaN cell the value of the nearest non-NaN cell at most `max_cells` away.

    Distances are between cell centres, in cells. Neighbours are tried in order of distance
    (on a tie: the northern one first, then the western one), so the first one with data is
    the nearest; cells with no data within `max_cells` stay NaN. The work grows with
    `max_cells` squared, which is fine for the few cells a DEM should be filled over.
    """
    out = values.copy()
    todo = np.isnan(values)
    if max_cells <= 0 or not todo.any() or todo.all():
        return out
    r = int(max_cells)
    offsets = sorted((dr * dr + dc * dc, dr, dc) for dr in range(-r, r + 1)
                     for dc in range(-r, r + 1) if 0 < dr * dr + dc * dc <= max_cells ** 2)
    nrows, ncols = values.shape
    padded = np.full((nrows + 2 * r, ncols + 2 * r), np.nan)
    padded[r:r + nrows, r:r + ncols] = values
    for _, dr, dc in offsets:
        neighbour = padded[r + dr:r + dr + nrows, r + dc:r + dc + ncols]
        take = todo & ~np.isnan(neighbour)
        out[take] = neighbour[take]
        todo &= ~take
        if not todo.any():
            break
    return out


# --- rasters ------------------------------------------------------------------------------

def read_raster(path: str | Path) -> Grid:
    """Read a north-up single-band raster (a DEM); cells equal to its nodata become NaN."""
    import rasterio
    import rasterio.errors

    try:
        with rasterio.open(path) as src:
            t, crs, nodata = src.transform, src.crs, src.nodata
            try:
                values = src.read(1, masked=True).astype(np.float64).filled(np.nan)
            except rasterio.errors.RasterioIOError as exc:
                cause = exc.__cause__ or exc.__context__ or exc  # GDAL's own words
                raise LidarError(f"{path}: its cells cannot be read: the file is cut short or "
                                 f"damaged ({cause})") from None
    except rasterio.errors.RasterioIOError as exc:
        raise LidarError(f"{path}: not a raster GDAL can read ({exc})") from None
    if t.b != 0 or t.d != 0 or t.e >= 0 or not math.isclose(t.a, -t.e):
        raise LidarError(f"{path}: only north-up rasters with square cells are supported")
    crs = pyproj.CRS.from_wkt(crs.to_wkt()) if crs else None
    return Grid(values, t.c, t.f + values.shape[0] * t.e, t.a, crs,
                -9999.0 if nodata is None else nodata)


def write_raster(grid: Grid, path: str | Path, dtype: str = "float32") -> None:
    """Write a Cloud-Optimized GeoTIFF with the grid's CRS, transform and nodata (NaN cells)."""
    import rasterio
    import rasterio.crs

    nrows, ncols = grid.values.shape
    values = np.where(np.isnan(grid.values), grid.nodata, grid.values).astype(dtype)
    crs = None
    if grid.crs is not None:  # written by its EPSG code where it has one, so GIS names it
        code = epsg_code(grid.crs)
        crs = rasterio.crs.CRS.from_epsg(code) if code else rasterio.crs.CRS.from_wkt(
            grid.crs.to_wkt())
    options = dict(GEOTIFF, predictor=3 if dtype.startswith("float") else 2)
    with _replacing(path) as tmp:
        with rasterio.open(tmp, "w", width=ncols, height=nrows, count=1, dtype=dtype, crs=crs,
                           transform=grid.transform, nodata=grid.nodata, **options) as dst:
            dst.write(values, 1)


def mosaic(grids: list[Grid], names: list[str] | None = None) -> Grid:
    """Merge grids of one CRS and cell size onto one grid: the mean where they overlap."""
    names = names or [f"grid {i + 1}" for i in range(len(grids))]
    crs = one_crs([(n, g.crs) for n, g in zip(names, grids, strict=True)], None, "DEM")
    cell = grids[0].cell
    for name, g in zip(names, grids, strict=True):
        if not math.isclose(g.cell, cell, rel_tol=1e-9):
            raise LidarError(f"{names[0]} and {name} have different cell sizes, "
                             f"{cell:g} and {g.cell:g}; grid them with one cell size")
    # position of each grid's lower-left corner in cells; it must fall on a cell boundary
    corners = [(g.xll / cell, g.yll / cell) for g in grids]
    for name, corner in zip(names, corners, strict=True):
        if any(abs(c - round(c)) > 1e-6 for c in corner):
            raise LidarError(f"{name}: its corner is not on a multiple of the cell size {cell:g}, "
                             "so it is not on the grid of the others")
    left = [round(cx) for cx, _ in corners]
    bottom = [round(cy) for _, cy in corners]
    right = [lx + g.values.shape[1] for lx, g in zip(left, grids, strict=True)]
    top = [by + g.values.shape[0] for by, g in zip(bottom, grids, strict=True)]
    x0, y1 = min(left), max(top)
    total = np.zeros((y1 - min(bottom), max(right) - x0))
    count = np.zeros(total.shape)
    for g, lx, ty in zip(grids, left, top, strict=True):
        r, c = y1 - ty, lx - x0
        window = (slice(r, r + g.values.shape[0]), slice(c, c + g.values.shape[1]))
        has = ~np.isnan(g.values)
        total[window] += np.where(has, g.values, 0.0)
        count[window] += has
    with np.errstate(invalid="ignore", divide="ignore"):
        values = total / count
    return Grid(values, x0 * cell, min(bottom) * cell, cell, crs, grids[0].nodata)


def height_scale(crs: pyproj.CRS | None) -> float:
    """Length of the CRS's vertical unit in its horizontal unit (1 unless it says otherwise).

    A compound CRS may have heights in another unit than its coordinates (metres east and
    north, US survey feet up); slopes must compare like with like. The DEM keeps its heights.
    """
    if crs is None:
        return 1.0
    across = [a for a in crs.axis_info if a.direction in ("east", "north")]
    up = [a for a in crs.axis_info if a.direction == "up"]
    if not across or not up:
        return 1.0
    return up[0].unit_conversion_factor / across[0].unit_conversion_factor


def _surface_normal(grid: Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # heights rise to the east along columns and to the south along rows (row 0 is north)
    dz_south, dz_east = np.gradient(grid.values * height_scale(grid.crs), grid.cell)
    nx, ny, nz = -dz_east, dz_south, np.ones_like(dz_east)
    length = np.sqrt(nx**2 + ny**2 + nz**2)
    return nx / length, ny / length, nz / length


def hillshade(grid: Grid, azimuth: float = 315.0, altitude: float = 45.0) -> Grid:
    """Shade the DEM as lit from `azimuth` (degrees clockwise from north) and `altitude`.

    Values are 1 + 254 * cos(angle between the surface normal and the light), at least 1 and
    rounded to whole numbers, as `gdaldem hillshade` writes them; NaN where the DEM or a
    neighbour has no data.
    """
    nx, ny, nz = _surface_normal(grid)
    az, alt = math.radians(azimuth), math.radians(altitude)
    light = (math.sin(az) * math.cos(alt), math.cos(az) * math.cos(alt), math.sin(alt))
    shade = 1.0 + 254.0 * np.clip(nx * light[0] + ny * light[1] + nz * light[2], 0.0, None)
    return Grid(np.rint(shade), grid.xll, grid.yll, grid.cell, grid.crs, 0)


def slope(grid: Grid) -> Grid:
    """Slope of the DEM in degrees (0 = flat); NaN where the DEM or a neighbour has no data."""
    _, _, nz = _surface_normal(grid)
    return Grid(np.degrees(np.arccos(nz)), grid.xll, grid.yll, grid.cell, grid.crs, grid.nodata)


# --- command line -------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lidar.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    crs_help = "CRS of input files that carry none, e.g. EPSG:2994"
    p = sub.add_parser("import", help="a LAS/LAZ file's points (all or ground) as LAZ")
    p.add_argument("--ground", action="store_true", help="keep only ground points (class 2)")
    p.add_argument("--crs", type=parse_crs, help=crs_help)
    p.add_argument("input")
    p.add_argument("output")
    p = sub.add_parser("grid", help="grid LAS/LAZ points to a DEM (GeoTIFF)")
    p.add_argument("--config", help="file of 'key = value' gridding settings")
    p.add_argument("--cell", type=float, help="cell size, in the CRS's unit; overrides 'cell'")
    p.add_argument("--fill", type=int, help="fill empty cells from data at most this many cells "
                   "away; overrides 'fill'")
    p.add_argument("--ground", action="store_true", help="grid only ground points (class 2)")
    p.add_argument("--crs", type=parse_crs, help=crs_help)
    p.add_argument("--core", type=float, nargs=4, metavar=("XMIN", "YMIN", "XMAX", "YMAX"),
                   help="grid one tile: the DEM covers exactly this core")
    p.add_argument("--buffer", type=float, default=0.0, help="with --core: also grid the "
                   "points this far around the core (default 0)")
    p.add_argument("inputs", nargs="+", metavar="input")
    p.add_argument("output")
    p = sub.add_parser("mosaic", help="merge DEMs on one grid, the mean where they overlap")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("inputs", nargs="+", metavar="input")
    p = sub.add_parser("hillshade", help="shaded relief of a DEM, 1-255 (0: nodata)")
    p.add_argument("--azimuth", type=float, default=315.0, help="degrees clockwise from north")
    p.add_argument("--altitude", type=float, default=45.0, help="degrees above the horizon")
    p.add_argument("input")
    p.add_argument("output")
    p = sub.add_parser("slope", help="slope of a DEM in degrees")
    p.add_argument("input")
    p.add_argument("output")
    p = sub.add_parser("check", help="read rasters whole; a damaged one is an error")
    p.add_argument("inputs", nargs="+", metavar="input")
    return parser


def _unit(crs: pyproj.CRS | None) -> str:
    """The name of a CRS's horizontal unit ("" without a CRS)."""
    return crs.axis_info[0].unit_name if crs is not None and crs.axis_info else ""


def _check(path: str) -> str:
    grid = read_raster(path)
    nrows, ncols = grid.values.shape
    unit = _unit(grid.crs)
    data = int((~np.isnan(grid.values)).sum())
    return (f"{path}: {ncols} x {nrows} cells of {grid.cell:g} {unit}".rstrip()
            + f" in {crs_name(grid.crs)}: {data} with data, {grid.values.size - data} nodata")


def _grid(args: argparse.Namespace) -> str:
    config = read_config(args.config) if args.config else dict(CONFIG_DEFAULTS)
    for key in ("cell", "fill"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
            _check_setting(key, config[key], f"--{key}")
    points = read_points(args.inputs, args.crs, args.ground,
                         tuple(args.core) if args.core is not None else None)
    if points.crs is None:
        raise LidarError(f"{args.inputs[0]} carries no coordinate reference system; give it "
                         "with --crs, e.g. --crs EPSG:2994")
    if args.core is not None:
        grid = grid_core(points, tuple(args.core), args.buffer, config["cell"],
                         int(config["fill"]), config["nodata"])
    else:
        grid = grid_points(points, config["cell"], int(config["fill"]), config["nodata"])
    write_raster(grid, args.output)
    nrows, ncols = grid.values.shape
    unit = _unit(grid.crs)
    c = grid.counts
    if args.core is not None:
        return (f"{args.output}: the core's {ncols} x {nrows} cells of {grid.cell:g} {unit} "
                f"from {c['points']} points within {args.buffer:g} of it: "
                f"{c['with points']} with data, {c['nodata']} nodata")
    return (f"{args.output}: {ncols} x {nrows} cells of {grid.cell:g} {unit}".rstrip()
            + f" from {c['points']} points in {crs_name(grid.crs)}: {c['with points']} with "
            f"points, {c['filled']} filled, {c['nodata']} nodata")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "import":
            n = import_points(args.input, args.output, args.crs, args.ground)
            print(f"{args.output}: {n} points")
        elif args.command == "grid":
            print(_grid(args))
        elif args.command == "mosaic":
            grids = [read_raster(path) for path in args.inputs]
            write_raster(mosaic(grids, args.inputs), args.output)
        elif args.command == "check":
            for path in args.inputs:
                print(_check(path))
        elif args.command == "hillshade":
            shade = hillshade(read_raster(args.input), args.azimuth, args.altitude)
            write_raster(shade, args.output, dtype="uint8")
        else:
            write_raster(slope(read_raster(args.input)), args.output)
    except LidarError as exc:
        print(f"lidar.py {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"lidar.py {args.command}: error: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
