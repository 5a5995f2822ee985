"""A small airborne laser scanning toolkit, standing in for OPALS modules in the examples.

Each subcommand reads files and writes one file, so a pipeline step can run it:

    python lidar.py import IN.xyz OUT.odm                  ASCII x y z -> binary point file
    python lidar.py grid [--config CFG] [--cell C] IN.odm OUT.asc     points -> DEM
    python lidar.py mosaic -o OUT.asc IN1.asc IN2.asc ...  DEMs -> one DEM
    python lidar.py hillshade [--azimuth A] [--altitude H] IN.asc OUT.asc   shaded relief
    python lidar.py slope IN.asc OUT.asc                   slope in degrees

The computations are plain functions (`read_xyz`, `write_odm`, `read_odm`, `read_config`,
`grid_points`, `read_asc`, `write_asc`, `mosaic`, `hillshade`, `slope`) so they can be
imported and checked directly. Rasters are `Grid` values whose `values` array holds NaN for
"no data" and whose first row is the northernmost one, as in an ESRI ASCII grid.

Errors in the input are reported on one line (`FILE:LINE: what is wrong`) with exit status 2.
Needs only numpy and the standard library.
"""

from __future__ import annotations

import argparse
import math
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ODM_MAGIC = b"LIDARODM"
# magic, point count, bounding box (xmin, ymin, zmin, xmax, ymax, zmax); then float64 x, y, z
ODM_HEADER = struct.Struct("<8sQ6d")
ASC_HEADER_KEYS = ("ncols", "nrows", "xllcorner", "yllcorner", "xllcenter", "yllcenter",
                   "cellsize", "nodata_value")
CONFIG_DEFAULTS: dict[str, object] = {
    "cell": 1.0, "interpolation": "mean", "fill": "nearest", "nodata": -9999.0, "decimals": 3,
}


class LidarError(Exception):
    """A problem with the input, reported to the user as one line."""


@dataclass
class Grid:
    """A raster: `values[row, col]`, row 0 at the top (north); NaN where there is no data."""

    values: np.ndarray
    xll: float  # x of the lower-left corner of the lower-left cell
    yll: float
    cell: float
    nodata: float = -9999.0


# --- points -------------------------------------------------------------------------------

def read_xyz(path: str | Path) -> np.ndarray:
    """Read an ASCII point file (`x y z` per line; `#` comments and blank lines allowed)."""
    rows = []
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) != 3:
            raise LidarError(f"{path}:{lineno}: expected 3 numbers (x y z), found {len(words)}")
        try:
            point = [float(w) for w in words]
        except ValueError:
            bad = next(w for w in words if not _is_number(w))
            raise LidarError(f"{path}:{lineno}: {bad!r} is not a number") from None
        if not all(math.isfinite(v) for v in point):
            raise LidarError(f"{path}:{lineno}: coordinates must be finite numbers")
        rows.append(point)
    if not rows:
        raise LidarError(f"{path}: no points in the file")
    return np.array(rows, dtype=np.float64)


def _read_text(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LidarError(f"{path}: not a text file (it is not UTF-8)") from None


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


def write_odm(points: np.ndarray, path: str | Path) -> None:
    """Write points (an N x 3 array) as a binary point file with a header."""
    points = np.ascontiguousarray(points, dtype="<f8")
    bbox = (*points.min(axis=0), *points.max(axis=0))
    with open(path, "wb") as f:
        f.write(ODM_HEADER.pack(ODM_MAGIC, len(points), *bbox))
        f.write(points.tobytes())


def read_odm(path: str | Path) -> np.ndarray:
    """Read a binary point file written by `write_odm`; returns an N x 3 array."""
    data = Path(path).read_bytes()
    if len(data) < ODM_HEADER.size or data[:8] != ODM_MAGIC:
        raise LidarError(f"{path}: not a point file written by 'lidar.py import'")
    count = ODM_HEADER.unpack_from(data)[1]
    if len(data) != ODM_HEADER.size + count * 24:
        raise LidarError(f"{path}: truncated point file (header says {count} points)")
    return np.frombuffer(data, dtype="<f8", offset=ODM_HEADER.size).reshape(count, 3)


# --- gridding -----------------------------------------------------------------------------

def read_config(path: str | Path) -> dict[str, object]:
    """Read `key = value` lines (`#` comments) over the defaults in CONFIG_DEFAULTS."""
    config = dict(CONFIG_DEFAULTS)
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        key, eq, value = (part.strip() for part in line.partition("="))
        where = f"{path}:{lineno}"
        if not eq or not key or not value:
            raise LidarError(f"{where}: expected 'key = value', found {line!r}")
        if key not in CONFIG_DEFAULTS:
            raise LidarError(f"{where}: unknown key {key!r} (known: {', '.join(CONFIG_DEFAULTS)})")
        config[key] = _config_value(key, value, where)
    return config


def _config_value(key: str, value: str, where: str) -> object:
    choices = {"interpolation": ("mean", "min", "max"), "fill": ("nearest", "none")}
    if key in choices:
        if value not in choices[key]:
            raise LidarError(f"{where}: {key} must be one of {', '.join(choices[key])}")
        return value
    try:
        number = int(value) if key == "decimals" else float(value)
    except ValueError:
        raise LidarError(f"{where}: {key} must be a number, found {value!r}") from None
    if key == "cell" and not number > 0:
        raise LidarError(f"{where}: cell must be greater than 0")
    if key == "decimals" and number < 0:
        raise LidarError(f"{where}: decimals must be 0 or more")
    return number


def grid_points(points: np.ndarray, cell: float, interpolation: str = "mean",
                fill: str = "nearest", nodata: float = -9999.0) -> Grid:
    """Grid points to a DEM: per cell the mean (or min, max) height of its points.

    Cell edges lie on multiples of `cell`, so grids of overlapping strips share cell
    boundaries; a cell holds the points with `left <= x < right` and `bottom <= y < top`.
    With `fill="nearest"` every empty cell takes the value of the nearest cell with points.
    """
    ix = np.floor(points[:, 0] / cell).astype(np.int64)
    iy = np.floor(points[:, 1] / cell).astype(np.int64)
    ncols = int(ix.max() - ix.min()) + 1
    nrows = int(iy.max() - iy.min()) + 1
    col = ix - ix.min()
    row = iy.max() - iy  # row 0 is the top (north) row
    flat = row * ncols + col
    z = points[:, 2]
    if interpolation == "mean":
        total = np.bincount(flat, weights=z, minlength=nrows * ncols)
        count = np.bincount(flat, minlength=nrows * ncols)
        with np.errstate(invalid="ignore", divide="ignore"):
            values = total / count  # NaN where a cell holds no point
    else:
        values = np.full(nrows * ncols, np.inf if interpolation == "min" else -np.inf)
        (np.minimum if interpolation == "min" else np.maximum).at(values, flat, z)
        values[np.isinf(values)] = np.nan
    values = values.reshape(nrows, ncols)
    if fill == "nearest":
        values = fill_nearest(values)
    return Grid(values, float(ix.min() * cell), float(iy.min() * cell), float(cell), nodata)


def fill_nearest(values: np.ndarray, tile: int = 32) -> np.ndarray:
    """Give each NaN cell the value of the nearest non-NaN cell (on a tie, the first in rows).

    The grid is searched tile by tile: the empty cells of a tile are compared with the data
    cells in a window around it, widened until every nearest cell found lies within the
    window's margin, which proves no cell outside the window is nearer.
    """
    out = values.copy()
    known = ~np.isnan(values)
    if known.all() or not known.any():
        return out
    nrows, ncols = values.shape
    for r0 in range(0, nrows, tile):
        for c0 in range(0, ncols, tile):
            empty = np.argwhere(~known[r0:r0 + tile, c0:c0 + tile]) + (r0, c0)
            if len(empty) == 0:
                continue
            margin = 1
            while True:
                rs, cs = max(r0 - margin, 0), max(c0 - margin, 0)
                window = known[rs:r0 + tile + margin, cs:c0 + tile + margin]
                found = np.argwhere(window) + (rs, cs)
                if len(found):
                    d2 = ((empty[:, None, :] - found[None, :, :]) ** 2).sum(axis=2)
                    whole_grid = window.shape == values.shape
                    if d2.min(axis=1).max() <= margin**2 or whole_grid:
                        break
                margin *= 2
            nearest = found[d2.argmin(axis=1)]
            out[empty[:, 0], empty[:, 1]] = values[nearest[:, 0], nearest[:, 1]]
    return out


# --- rasters ------------------------------------------------------------------------------

def read_asc(path: str | Path) -> Grid:
    """Read an ESRI ASCII grid; cells equal to NODATA_value become NaN."""
    words = _read_text(path).split()
    header: dict[str, float] = {}
    while words and words[0].lower() in ASC_HEADER_KEYS:
        if len(words) < 2:
            raise LidarError(f"{path}: header entry {words[0]!r} has no value")
        key, value = words[0].lower(), words[1]
        try:
            header[key] = float(value)
        except ValueError:
            raise LidarError(f"{path}: header {words[0]} must be a number, "
                             f"found {value!r}") from None
        words = words[2:]
    for key in ("ncols", "nrows", "cellsize"):
        if key not in header:
            raise LidarError(f"{path}: not an ESRI ASCII grid (no {key} in the header)")
    ncols, nrows, cell = int(header["ncols"]), int(header["nrows"]), header["cellsize"]
    half = cell / 2
    xll = header["xllcorner"] if "xllcorner" in header else header.get("xllcenter", half) - half
    yll = header["yllcorner"] if "yllcorner" in header else header.get("yllcenter", half) - half
    if len(words) != ncols * nrows:
        raise LidarError(f"{path}: expected {nrows} x {ncols} = {ncols * nrows} cell values, "
                         f"found {len(words)}")
    try:
        values = np.array(words, dtype=np.float64).reshape(nrows, ncols)
    except ValueError:
        raise LidarError(f"{path}: a cell value is not a number") from None
    nodata = header.get("nodata_value", -9999.0)
    values[values == nodata] = np.nan
    return Grid(values, xll, yll, cell, nodata)


def write_asc(grid: Grid, path: str | Path, decimals: int = 3) -> None:
    """Write an ESRI ASCII grid, NaN cells as the grid's nodata value."""
    nrows, ncols = grid.values.shape
    nodata = f"{grid.nodata:g}"
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"ncols {ncols}\nnrows {nrows}\nxllcorner {grid.xll!r}\nyllcorner {grid.yll!r}\n"
                f"cellsize {grid.cell!r}\nNODATA_value {nodata}\n")
        for row in grid.values:
            f.write(" ".join(nodata if np.isnan(v) else f"{v:.{decimals}f}" for v in row))
            f.write("\n")


def mosaic(grids: list[Grid]) -> Grid:
    """Merge grids of one cell size onto one grid: the mean where they overlap, NaN elsewhere."""
    cell = grids[0].cell
    if any(g.cell != cell for g in grids):
        sizes = ", ".join(sorted({f"{g.cell:g}" for g in grids}))
        raise LidarError(f"the grids must have the same cell size, found {sizes}")
    # position of each grid's lower-left corner in cells; it must fall on a cell boundary
    corners = [(g.xll / cell, g.yll / cell) for g in grids]
    if any(abs(c - round(c)) > 1e-6 for corner in corners for c in corner):
        raise LidarError("the grids' corners are not aligned to multiples of the cell size")
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
    return Grid(values, x0 * cell, min(bottom) * cell, cell, grids[0].nodata)


def _surface_normal(grid: Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # heights rise to the east along columns and to the south along rows (row 0 is north)
    dz_south, dz_east = np.gradient(grid.values, grid.cell)
    nx, ny, nz = -dz_east, dz_south, np.ones_like(dz_east)
    length = np.sqrt(nx**2 + ny**2 + nz**2)
    return nx / length, ny / length, nz / length


def hillshade(grid: Grid, azimuth: float = 315.0, altitude: float = 45.0) -> Grid:
    """Shade the DEM as lit from `azimuth` (degrees clockwise from north) and `altitude`: 0-255."""
    nx, ny, nz = _surface_normal(grid)
    az, alt = math.radians(azimuth), math.radians(altitude)
    light = (math.sin(az) * math.cos(alt), math.cos(az) * math.cos(alt), math.sin(alt))
    shade = 255.0 * np.clip(nx * light[0] + ny * light[1] + nz * light[2], 0.0, None)
    return Grid(shade, grid.xll, grid.yll, grid.cell, grid.nodata)


def slope(grid: Grid) -> Grid:
    """Slope of the DEM in degrees (0 = flat)."""
    _, _, nz = _surface_normal(grid)
    return Grid(np.degrees(np.arccos(nz)), grid.xll, grid.yll, grid.cell, grid.nodata)


# --- command line -------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lidar.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("import", help="convert an ASCII x y z file to a binary point file")
    p.add_argument("input")
    p.add_argument("output")
    p = sub.add_parser("grid", help="grid a point file to a DEM (ESRI ASCII grid)")
    p.add_argument("--config", help="file of 'key = value' gridding settings")
    p.add_argument("--cell", type=float, help="cell size; overrides the config's 'cell'")
    p.add_argument("input")
    p.add_argument("output")
    p = sub.add_parser("mosaic", help="merge DEMs of one cell size, the mean where they overlap")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("inputs", nargs="+")
    p = sub.add_parser("hillshade", help="shaded relief of a DEM, 0-255")
    p.add_argument("--azimuth", type=float, default=315.0, help="degrees clockwise from north")
    p.add_argument("--altitude", type=float, default=45.0, help="degrees above the horizon")
    p.add_argument("input")
    p.add_argument("output")
    p = sub.add_parser("slope", help="slope of a DEM in degrees")
    p.add_argument("input")
    p.add_argument("output")
    args = parser.parse_args(argv)
    try:
        if args.command == "import":
            write_odm(read_xyz(args.input), args.output)
        elif args.command == "grid":
            config = read_config(args.config) if args.config else dict(CONFIG_DEFAULTS)
            cell = args.cell if args.cell is not None else config["cell"]
            if not cell > 0:
                raise LidarError(f"the cell size must be greater than 0, found {cell:g}")
            grid = grid_points(read_odm(args.input), cell, config["interpolation"],
                               config["fill"], config["nodata"])
            write_asc(grid, args.output, config["decimals"])
        elif args.command == "mosaic":
            write_asc(mosaic([read_asc(path) for path in args.inputs]), args.output)
        elif args.command == "hillshade":
            shaded = hillshade(read_asc(args.input), args.azimuth, args.altitude)
            write_asc(shaded, args.output, decimals=1)
        else:
            write_asc(slope(read_asc(args.input)), args.output, decimals=2)
    except LidarError as exc:
        print(f"lidar.py {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"lidar.py {args.command}: error: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
