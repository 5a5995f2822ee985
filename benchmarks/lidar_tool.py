"""How fast the example tool turns LAS/LAZ points into a DEM, against a direct script.

The tool runs as a pipeline runs it: two processes, ``lidar.py import --ground IN OUT.laz``
then ``lidar.py grid --cell C --fill F OUT.laz DEM.tif``. The baseline is a direct script
that does the same work with laspy, numpy and rasterio in one process of its own: read the
LAZ, keep the ground points, write them as LAZ, read them back, average them per cell, fill
empty cells from the nearest cell up to F cells away, write a Cloud-Optimized GeoTIFF (DEFLATE,
tiles of 256, overviews) as the tool does. Both run in this run, alternately, ``--repeat``
times on the same input; the best wall time of each counts, as input points per second, and
the best processor time (user + system, of the child processes) beside it, which a busy
machine disturbs less. The time to start Python and import laspy, numpy, pyproj and rasterio
is measured too, so the last column compares the wall times without it (the tool starts
twice, the script once).

The inputs are examples/data/autzen_trim.laz (110,000 points) as shipped, and the same points
repeated ``--copies`` times side by side (shifted east by the file's width) in one LAZ file, so
that the fixed cost of starting Python and importing laspy and rasterio is seen apart from the
cost per point.

    python benchmarks/lidar_tool.py                    # autzen_trim.laz, and 20 copies of it
    python benchmarks/lidar_tool.py --copies 20 --repeat 5
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import laspy
import numpy as np

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "examples" / "tools" / "lidar.py"
AUTZEN = REPO / "examples" / "data" / "autzen_trim.laz"

#: the baseline: the same work as import + grid, written directly, in one process
DIRECT = r"""
import sys
import laspy, numpy as np, rasterio
src, ground_laz, dem_tif = sys.argv[1:4]
cell, fill = float(sys.argv[4]), int(sys.argv[5])
las = laspy.read(src)
las.points = las.points[las.classification == 2].copy()
las.write(ground_laz)
las = laspy.read(ground_laz)
crs = las.header.parse_crs()
x, y, z = np.asarray(las.x), np.asarray(las.y), np.asarray(las.z)
ix, iy = np.floor(x / cell).astype(np.int64), np.floor(y / cell).astype(np.int64)
ncols, nrows = int(ix.max() - ix.min()) + 1, int(iy.max() - iy.min()) + 1
flat = (iy.max() - iy) * ncols + (ix - ix.min())
with np.errstate(invalid="ignore", divide="ignore"):
    dem = np.bincount(flat, z, nrows * ncols) / np.bincount(flat, None, nrows * ncols)
dem = dem.reshape(nrows, ncols)
out, todo = dem.copy(), np.isnan(dem)
padded = np.pad(dem, fill, constant_values=np.nan)
for _, dr, dc in sorted((dr * dr + dc * dc, dr, dc) for dr in range(-fill, fill + 1)
                        for dc in range(-fill, fill + 1) if 0 < dr * dr + dc * dc <= fill * fill):
    near = padded[fill + dr:fill + dr + nrows, fill + dc:fill + dc + ncols]
    take = todo & ~np.isnan(near)
    out[take], todo = near[take], todo & ~take
transform = rasterio.Affine(cell, 0, ix.min() * cell, 0, -cell, (iy.max() + 1) * cell)
with rasterio.open(dem_tif, "w", driver="COG", width=ncols, height=nrows, count=1,
                   dtype="float32", crs=crs.to_wkt() if crs else None, transform=transform,
                   nodata=-9999, compress="deflate", predictor=3, blocksize=256) as dst:
    dst.write(np.where(np.isnan(out), -9999, out).astype("float32"), 1)
"""


def make_copies(folder: Path, copies: int) -> Path:
    """autzen_trim.laz's points `copies` times side by side, in one LAZ file."""
    las = laspy.read(AUTZEN)
    width = float(las.header.maxs[0] - las.header.mins[0]) + 10.0
    xs = np.concatenate([np.asarray(las.x) + k * width for k in range(copies)])
    points = np.concatenate([las.points.array] * copies)
    out = laspy.LasData(las.header.copy())
    out.points = laspy.ScaleAwarePointRecord(points, las.header.point_format, las.header.scales,
                                             las.header.offsets)
    out.x = xs
    path = folder / f"autzen_x{copies}.laz"
    out.write(path)
    return path


def timed(argv: list[str], cwd: Path) -> tuple[float, float]:
    """Wall time and processor time (user + system) of running `argv`."""
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run(argv, cwd=cwd, check=True, capture_output=True)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def measure(source: Path, work: Path, cell: float, fill: int, repeat: int) -> dict[str, float]:
    py = sys.executable
    tool = [[py, str(TOOL), "import", "--ground", str(source), "ground.laz"],
            [py, str(TOOL), "grid", "--cell", str(cell), "--fill", str(fill), "ground.laz",
             "dem.tif"]]
    direct = [py, "-c", DIRECT, str(source), "direct.laz", "direct.tif", str(cell), str(fill)]
    start = [py, "-c", "import laspy, numpy, pyproj, rasterio"]
    best = dict.fromkeys(["tool", "direct", "start", "tool cpu", "direct cpu"], float("inf"))
    for _ in range(repeat):
        runs = [timed(argv, work) for argv in tool]
        best["tool"] = min(best["tool"], sum(wall for wall, _ in runs))
        best["tool cpu"] = min(best["tool cpu"], sum(cpu for _, cpu in runs))
        wall, cpu = timed(direct, work)
        best["direct"], best["direct cpu"] = min(best["direct"], wall), min(best["direct cpu"], cpu)
        best["start"] = min(best["start"], timed(start, work)[0])
    import rasterio  # the two DEMs must agree, or the comparison means nothing

    with rasterio.open(work / "dem.tif") as a, rasterio.open(work / "direct.tif") as b:
        assert a.transform == b.transform and np.array_equal(a.read(1), b.read(1))
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=20, help="copies of autzen_trim.laz")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each; the best counts")
    parser.add_argument("--cell", type=float, default=5.0, help="cell size (feet)")
    parser.add_argument("--fill", type=int, default=3, help="fill limit (cells)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="opf-lidar-bench-") as tmp:
        work = Path(tmp)
        sources = [AUTZEN, make_copies(work, args.copies)]
        print(f"{'input':<20} {'points':>10} {'tool s':>7} {'direct s':>8} {'tool pts/s':>11} "
              f"{'direct pts/s':>12} {'tool/direct':>11} {'cpu s tool/direct':>18} "
              f"{'start s':>7} {'less start-up':>13}")
        for source in sources:
            points = laspy.open(source).header.point_count
            best = measure(source, work, args.cell, args.fill, args.repeat)
            # the tool starts Python twice (import, grid), the direct script once
            tool_work = max(best["tool"] - 2 * best["start"], 1e-9)
            direct_work = max(best["direct"] - best["start"], 1e-9)
            cpu = f"{best['tool cpu']:.2f}/{best['direct cpu']:.2f}"
            print(f"{source.name:<20} {points:>10,} {best['tool']:>7.2f} {best['direct']:>8.2f} "
                  f"{points / best['tool']:>11,.0f} {points / best['direct']:>12,.0f} "
                  f"{best['tool'] / best['direct']:>11.2f} {cpu:>18} {best['start']:>7.2f} "
                  f"{tool_work / direct_work:>13.2f}")

if __name__ == "__main__":
    main()
