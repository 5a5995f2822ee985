"""Tests of the example processing tool (examples/tools/lidar.py) and its data.

The tool is run as users' pipelines run it: `python lidar.py SUBCOMMAND ...` in a subprocess, on
the shipped LAS/LAZ files in examples/data/ and on small point clouds and rasters written here
with laspy and rasterio. Results are checked against numbers computed here directly from the
points or the rasters, never with the tool's own functions.
"""

from __future__ import annotations

import math
import struct
import subprocess
import sys
from pathlib import Path

import laspy
import numpy as np
import pyproj
import pytest
import rasterio

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TOOL = EXAMPLES / "tools" / "lidar.py"
DATA = EXAMPLES / "data"
STRIPS = [f"strip{n}" for n in range(7326, 7335)]


def run_tool(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def run_all(commands: list[list[str | Path]], cwd: Path) -> None:
    """Run tool commands side by side and require every one to succeed."""
    procs = [subprocess.Popen([sys.executable, str(TOOL), *map(str, args)], cwd=cwd,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for args in commands]
    for args, proc in zip(commands, procs, strict=True):
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{args}: {err}"


def write_las(path: Path, x, y, z, classification, crs: str | None = None) -> None:
    """A LAS 1.2 file (point format 3, 1 cm resolution) with these points."""
    header = laspy.LasHeader(version="1.2", point_format=3)
    header.scales = np.array([0.01, 0.01, 0.01])
    header.offsets = np.array([0.0, 0.0, 0.0])
    if crs:
        header.add_crs(pyproj.CRS.from_user_input(crs))
    las = laspy.LasData(header)
    las.x, las.y, las.z = x, y, z
    las.classification = classification
    las.write(path)


def from_origin(left: float, top: float, xsize: float, ysize: float) -> rasterio.Affine:
    """The transform of a north-up grid whose top-left corner is (left, top)."""
    return rasterio.Affine(xsize, 0.0, left, 0.0, -ysize, top)


def write_dem(path: Path, values: np.ndarray, left: float, top: float, cell: float,
              crs: str | None = "EPSG:2994") -> None:
    """A float32 GeoTIFF, NaN written as nodata -9999."""
    data = np.where(np.isnan(values), -9999, values).astype("float32")
    with rasterio.open(path, "w", driver="GTiff", width=values.shape[1], height=values.shape[0],
                       count=1, dtype="float32", crs=crs, nodata=-9999,
                       transform=from_origin(left, top, cell, cell)) as dst:
        dst.write(data, 1)


def read_dem(path: Path) -> tuple[np.ndarray, rasterio.io.DatasetReader]:
    with rasterio.open(path) as src:
        values = src.read(1).astype(np.float64)
        values[values == src.nodata] = np.nan
        return values, src


# --- import ---------------------------------------------------------------------------------

def test_import_keeps_the_ground_points_and_gives_them_the_crs(tmp_path: Path) -> None:
    proc = run_tool("import", "--ground", "--crs", "EPSG:2994", DATA / "strip7328.las",
                    "ground.laz", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    source = laspy.read(DATA / "strip7328.las")
    ground = source.points[source.classification == 2]
    with laspy.open(tmp_path / "ground.laz") as reader:
        assert reader.header.are_points_compressed  # LAZ, not LAS
        assert reader.header.parse_crs().equals(pyproj.CRS.from_epsg(2994))
        out = reader.read()
    assert len(out.points) == len(ground) == 37
    for dim in ("X", "Y", "Z", "classification", "point_source_id", "gps_time", "intensity"):
        assert np.array_equal(out.points[dim], ground[dim]), dim
    assert proc.stdout == "ground.laz: 37 points\n"


def test_import_keeps_every_point_and_the_files_own_crs(tmp_path: Path) -> None:
    proc = run_tool("import", DATA / "autzen_trim.laz", "all.laz", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    source, out = laspy.read(DATA / "autzen_trim.laz"), laspy.read(tmp_path / "all.laz")
    assert len(out.points) == 110_000
    assert np.array_equal(out.points["X"], source.points["X"])
    assert np.array_equal(out.points["Z"], source.points["Z"])
    assert out.header.parse_crs().equals(source.header.parse_crs())


def test_import_refuses_a_crs_that_contradicts_the_file(tmp_path: Path) -> None:
    proc = run_tool("import", "--crs", "EPSG:32610", DATA / "autzen_trim.laz", "x.laz",
                    cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"lidar.py import: error: {DATA / 'autzen_trim.laz'}: ")
    assert "NAD83(HARN) / Oregon GIC Lambert (ft) (EPSG:2994)" in proc.stderr
    assert "WGS 84 / UTM zone 10N (EPSG:32610)" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_import_reads_a_copc_file_and_writes_plain_laz(tmp_path: Path) -> None:
    copc = Path(__file__).parent / "data" / "simple.copc.laz"  # LAS 1.4, point format 7
    proc = run_tool("import", "--ground", copc, "ground.laz", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    source, out = laspy.read(copc), laspy.read(tmp_path / "ground.laz")
    ground = source.points[source.classification == 2]
    assert len(out.points) == len(ground) == 276
    assert np.array_equal(out.points["X"], ground["X"])
    assert out.header.parse_crs().equals(source.header.parse_crs())
    assert "copc" not in {v.user_id for v in out.header.vlrs}


@pytest.mark.parametrize(("content", "message"), [
    (b"x y z\n1 2 3\n", "not a LAS/LAZ file laspy can read"),
    ((DATA / "strip7328.las").read_bytes()[:3000], "the file is cut short: its header says "
     "147 points, it holds 81"),
    ((DATA / "autzen_trim.laz").read_bytes()[:300_000], "begins as a LAS/LAZ file does, but "
     "its points cannot be read: it is damaged or cut short ("),
    (None, "No such file or directory"),
])
def test_import_reports_unreadable_input_on_one_line(tmp_path: Path, content: bytes | None,
                                                      message: str) -> None:
    if content is not None:
        (tmp_path / "points.las").write_bytes(content)
    proc = run_tool("import", "points.las", "out.laz", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("lidar.py import: error: points.las") and message in proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "out.laz").exists()


# --- grid -----------------------------------------------------------------------------------

def holed_cloud() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Ground points in the cells of a 20 x 20 grid of 2 m cells at (100, 200), two per cell,
    except a 12 x 12 hole; above every ground point a non-ground point 30 m higher."""
    rows, cols = np.mgrid[0:20, 0:20]
    hole = (rows >= 4) & (rows < 16) & (cols >= 5) & (cols < 17)
    r, c = rows[~hole], cols[~hole]
    heights = np.random.default_rng(7).uniform(100.0, 200.0, (2, len(r))).round(2)
    x = np.concatenate([100 + 2 * c + 0.5, 100 + 2 * c + 1.5])
    y = np.concatenate([200 + 2 * (19 - r) + 0.5, 200 + 2 * (19 - r) + 1.25])
    z = np.concatenate([heights[0], heights[1]])
    x, y = np.concatenate([x, x]), np.concatenate([y, y])
    cls = np.concatenate([np.full(len(z), 2), np.full(len(z), 1)])
    z = np.concatenate([z, z + 30])
    means = np.full((20, 20), np.nan)
    means[r, c] = heights.mean(axis=0)
    return x, y, z, cls, means


def test_grid_is_the_mean_of_ground_points_filled_up_to_the_limit(tmp_path: Path) -> None:
    x, y, z, cls, means = holed_cloud()
    write_las(tmp_path / "holed.las", x, y, z, cls, crs="EPSG:32633")
    proc = run_tool("grid", "--ground", "--cell", "2", "--fill", "3", "holed.las", "dem.tif",
                    cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    values, src = read_dem(tmp_path / "dem.tif")
    assert src.transform == from_origin(100, 240, 2, 2) and src.crs.to_epsg() == 32633
    assert src.nodata == -9999 and values.shape == (20, 20)
    known = ~np.isnan(means)
    np.testing.assert_allclose(values[known], means[known], atol=1e-4)
    data = np.argwhere(known)
    for r, c in np.argwhere(~known):
        d2 = ((data - (r, c)) ** 2).sum(axis=1)
        if d2.min() > 9:  # farther than 3 cells from any cell with points: nodata
            assert np.isnan(values[r, c]), (r, c)
        else:  # the nearest; on a tie the northern, then the western one
            nr, nc = min(map(tuple, data[d2 == d2.min()]))
            assert values[r, c] == pytest.approx(means[nr, nc], abs=1e-4), (r, c)
    assert np.isnan(values).sum() == 36  # the 6 x 6 middle of the 12 x 12 hole
    assert proc.stdout == ("dem.tif: 20 x 20 cells of 2 metre from 512 points in WGS 84 / UTM "
                           "zone 33N (EPSG:32633): 256 with points, 108 filled, 36 nodata\n")


def test_grid_without_ground_option_takes_every_point(tmp_path: Path) -> None:
    x, y, z, cls, means = holed_cloud()
    write_las(tmp_path / "holed.las", x, y, z, cls, crs="EPSG:32633")
    run_all([["grid", "--cell", "2", "holed.las", "dem.tif"]], tmp_path)
    values, _ = read_dem(tmp_path / "dem.tif")
    known = ~np.isnan(means)
    np.testing.assert_allclose(values[known], means[known] + 15, atol=1e-4)
    assert np.isnan(values[~known]).all()  # the default 'fill' is 0: no filling


def test_grid_needs_a_crs_for_files_without_one(tmp_path: Path) -> None:
    proc = run_tool("grid", "--cell", "100", DATA / "strip7326.las", "dem.tif", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == (f"lidar.py grid: error: {DATA / 'strip7326.las'} carries no "
                           "coordinate reference system; give it with --crs, e.g. "
                           "--crs EPSG:2994\n")
    assert list(tmp_path.iterdir()) == []


def test_grid_of_files_in_different_crss_names_both(tmp_path: Path) -> None:
    x, y, z, cls, _ = holed_cloud()
    write_las(tmp_path / "a.las", x, y, z, cls, crs="EPSG:32633")
    write_las(tmp_path / "b.las", x, y, z, cls, crs="EPSG:25833")
    proc = run_tool("grid", "a.las", "b.las", "dem.tif", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == ("lidar.py grid: error: a.las and b.las are in different coordinate "
                           "reference systems: WGS 84 / UTM zone 33N (EPSG:32633) and "
                           "ETRS89 / UTM zone 33N (EPSG:25833); reproject one of them first\n")
    assert not (tmp_path / "dem.tif").exists()


def test_a_tile_of_a_file_whose_header_box_misses_points_is_refused(tmp_path: Path) -> None:
    """A header whose bounding box is smaller than its points (stale after an edit) makes tiles
    laid from it miss the points in tiles the box does not reach: a tile's grid refuses such a
    file, counting them; points outside the box in a tile it reaches count for nothing, and a
    DEM of the whole file is still made."""
    x, y, z, cls, _ = holed_cloud()  # x 100.5 to 139.5, y 200.5 to 239.25

    def with_max_x(value: float) -> None:
        write_las(tmp_path / "a.las", x, y, z, cls, crs="EPSG:32633")
        with open(tmp_path / "a.las", "r+b") as f:  # the header's max X (LAS 1.2: byte 179)
            f.seek(179)
            f.write(struct.pack("<d", value))
        assert laspy.read(tmp_path / "a.las").header.maxs[0] == value

    def tile() -> subprocess.CompletedProcess[str]:
        return run_tool("grid", "--cell", "2", "--core", "100", "200", "120", "220", "a.las",
                        "dem.tif", cwd=tmp_path)

    with_max_x(115.0)  # tiles of 20 from x = 100: the box reaches [100, 120), not [120, 140)
    proc = tile()
    assert proc.returncode == 2
    assert proc.stderr.startswith(
        f"lidar.py grid: error: a.las: {int((x >= 120).sum())} of its {len(x)} points lie "
        f"outside the bounding box its header gives, in tiles that box does not reach (the "
        f"header: x 100.50 to 115.00, y 200.50 to 239.25; the points: x 100.50 to 139.50, y "
        f"200.50 to 239.25). Tiles are laid from headers")
    assert not (tmp_path / "dem.tif").exists()
    with_max_x(139.49)  # short of the points by a hundredth, in the tile the box reaches
    assert tile().returncode == 0
    assert run_tool("grid", "--cell", "2", "a.las", "whole.tif", cwd=tmp_path).returncode == 0


def test_check_reads_every_cell_and_refuses_a_dem_cut_short(tmp_path: Path) -> None:
    """``check`` says a DEM's size, cell, CRS and cells with data; a copy cut anywhere in its
    cells is an error (exit 2, one line), not a DEM of fewer cells."""
    values = np.arange(12.0).reshape(3, 4)
    values[0, 0] = np.nan
    write_dem(tmp_path / "dem.tif", values, left=1000, top=2000, cell=5)
    proc = run_tool("check", "dem.tif", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ("dem.tif: 4 x 3 cells of 5 foot in NAD83(HARN) / Oregon GIC Lambert "
                           "(ft) (EPSG:2994): 11 with data, 1 nodata\n")
    data = (tmp_path / "dem.tif").read_bytes()
    with rasterio.open(tmp_path / "dem.tif") as src:  # where the cells begin
        first = min(int(src.get_tag_item("BLOCK_OFFSET_0_0", "TIFF", bidx=1) or len(data)),
                    len(data) - 1)
    (tmp_path / "cut.tif").write_bytes(data[:first + (len(data) - first) // 2])
    proc = run_tool("check", "cut.tif", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("lidar.py check: error: cut.tif: its cells cannot be read: "
                                  "the file is cut short or damaged (")
    assert proc.stderr.count("\n") == 1


def test_grid_settings_from_config_and_options(tmp_path: Path) -> None:
    x, y, z, cls, means = holed_cloud()
    write_las(tmp_path / "holed.las", x, y, z, cls, crs="EPSG:32633")
    (tmp_path / "grid.cfg").write_text("# coarse\ncell = 4   # metres\nfill = 0\nnodata = -1\n")
    run_all([["grid", "--config", "grid.cfg", "--ground", "holed.las", "coarse.tif"],
             ["grid", "--config", "grid.cfg", "--cell", "2", "--ground", "holed.las", "fine.tif"]],
            tmp_path)
    coarse, src = read_dem(tmp_path / "coarse.tif")
    assert src.nodata == -1 and src.transform == from_origin(100, 240, 4, 4)
    # a 4 m cell is the mean of the ground points of its four 2 m cells (two points in each)
    blocks = means.reshape(10, 2, 10, 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = np.nansum(blocks, axis=(1, 3)) / (~np.isnan(blocks)).sum(axis=(1, 3))
    np.testing.assert_allclose(coarse, expected, atol=1e-4, equal_nan=True)
    fine, src = read_dem(tmp_path / "fine.tif")
    assert src.transform == from_origin(100, 240, 2, 2)
    np.testing.assert_allclose(fine, means, atol=1e-4, equal_nan=True)


@pytest.mark.parametrize(("config", "message"), [
    ("cell = 1\n# sizes\ncellsize = 2\n", "grid.cfg:3: unknown key 'cellsize' (known: cell, "
     "fill, nodata)"),
    ("cell = -1\n", "grid.cfg:1: cell must be greater than 0, found -1"),
    ("fill = 1.5\n", "grid.cfg:1: fill must be a whole number, found '1.5'"),
    ("fill = -2\n", "grid.cfg:1: fill must be 0 or more cells, found -2"),
    ("cell 2\n", "grid.cfg:1: expected 'key = value', found 'cell 2'"),
])
def test_grid_reports_a_bad_config(tmp_path: Path, config: str, message: str) -> None:
    (tmp_path / "grid.cfg").write_text(config)
    proc = run_tool("grid", "--config", "grid.cfg", "--crs", "EPSG:2994",
                    DATA / "strip7326.las", "dem.tif", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == f"lidar.py grid: error: {message}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.cfg"]


# --- mosaic, hillshade, slope ---------------------------------------------------------------

def test_mosaic_is_the_mean_where_dems_overlap_and_nodata_elsewhere(tmp_path: Path) -> None:
    a = np.arange(12, dtype=float).reshape(3, 4) + 400
    a[0, 0] = np.nan
    b = np.full((2, 3), 500.0)
    write_dem(tmp_path / "a.tif", a, left=1000, top=2030, cell=10)  # cells x 100..103, y 200..202
    write_dem(tmp_path / "b.tif", b, left=1020, top=2010, cell=10)  # cells x 102..104, y 199..200
    run_all([["mosaic", "-o", "m.tif", "a.tif", "b.tif"]], tmp_path)
    values, src = read_dem(tmp_path / "m.tif")
    assert src.transform == from_origin(1000, 2030, 10, 10) and src.crs.to_epsg() == 2994
    expected = np.full((4, 5), np.nan)
    expected[:3, :4] = a
    expected[2, 2:4] = (a[2, 2:4] + 500) / 2
    expected[2, 4] = expected[3, 2] = expected[3, 3] = expected[3, 4] = 500
    np.testing.assert_allclose(values, expected, atol=1e-4, equal_nan=True)


@pytest.mark.parametrize(("second", "message"), [
    ({"crs": "EPSG:32610"}, "a.tif and b.tif are in different coordinate reference systems: "
     "NAD83(HARN) / Oregon GIC Lambert (ft) (EPSG:2994) and WGS 84 / UTM zone 10N "
     "(EPSG:32610); reproject one of them first"),
    ({"cell": 5}, "a.tif and b.tif have different cell sizes, 10 and 5; grid them with one "
     "cell size"),
    ({"left": 1003}, "b.tif: its corner is not on a multiple of the cell size 10, so it is not "
     "on the grid of the others"),
])
def test_mosaic_refuses_dems_that_do_not_share_a_grid(tmp_path: Path, second: dict,
                                                      message: str) -> None:
    write_dem(tmp_path / "a.tif", np.ones((2, 2)), left=1000, top=2000, cell=10)
    write_dem(tmp_path / "b.tif", np.ones((2, 2)), **{"left": 1000, "top": 2000, "cell": 10,
                                                      **second})
    proc = run_tool("mosaic", "-o", "m.tif", "a.tif", "b.tif", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == f"lidar.py mosaic: error: {message}\n"
    assert not (tmp_path / "m.tif").exists()


@pytest.mark.parametrize(("dzdx", "dzdy"), [(0.0, 0.0), (0.5, 0.0), (0.0, 0.5), (-0.3, -0.4)])
def test_slope_and_hillshade_of_a_plane(tmp_path: Path, dzdx: float, dzdy: float) -> None:
    ys = 10.0 + 2.0 * np.arange(6)[::-1] + 1.0  # cell centres, top row first
    xs = 20.0 + 2.0 * np.arange(5) + 1.0
    plane = 100.0 + dzdx * xs[None, :] + dzdy * ys[:, None]
    plane[0, 0] = np.nan  # a nodata cell: it and its neighbours have no slope
    write_dem(tmp_path / "plane.tif", plane, left=20, top=22, cell=2)
    run_all([["slope", "plane.tif", "slope.tif"],
             ["hillshade", "--azimuth", "315", "plane.tif", "shade.tif"]], tmp_path)
    away = np.ones(plane.shape, bool)
    away[:2, :2] = False
    slope, src = read_dem(tmp_path / "slope.tif")
    assert src.transform == from_origin(20, 22, 2, 2) and src.crs.to_epsg() == 2994
    assert np.isnan(slope[0, 0]) and np.isnan(slope[0, 1]) and np.isnan(slope[1, 0])
    expected = math.degrees(math.atan(math.hypot(dzdx, dzdy)))
    np.testing.assert_allclose(slope[away], expected, atol=1e-3)  # float32 heights
    # sunlight from the north-west, 45 degrees up; the plane's upward normal is (-dzdx, -dzdy, 1)
    light = np.array([-0.5, 0.5, math.sqrt(0.5)])
    normal = np.array([-dzdx, -dzdy, 1.0]) / math.sqrt(dzdx**2 + dzdy**2 + 1)
    with rasterio.open(tmp_path / "shade.tif") as src:
        assert src.dtypes == ("uint8",) and src.nodata == 0
        shade = src.read(1)
    assert shade[0, 0] == shade[0, 1] == shade[1, 0] == 0
    assert np.all(shade[away] == round(1 + 254 * max(0.0, normal @ light)))


def test_slope_compares_heights_in_feet_with_metres_across(tmp_path: Path) -> None:
    # NAD83 / UTM 10N (metres) + NAVD88 height (US survey feet): heights rise 1 ft per metre
    xs = 500_000.0 + 2.0 * np.arange(5) + 1.0
    plane = np.tile(100.0 + xs - xs[0], (4, 1))
    write_dem(tmp_path / "plane.tif", plane, left=500_000, top=5_000_008, cell=2,
              crs="EPSG:26910+6360")
    run_all([["slope", "plane.tif", "slope.tif"]], tmp_path)
    slope, src = read_dem(tmp_path / "slope.tif")
    assert "NAVD88 height (ftUS)" in src.crs.to_wkt()  # the compound CRS is kept
    rise = 1200 / 3937  # one US survey foot in metres
    np.testing.assert_allclose(slope, math.degrees(math.atan(rise)), atol=1e-3)


# --- the data -------------------------------------------------------------------------------

def test_make_data_splits_simple_las_into_identical_strip_files(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(EXAMPLES / "make_data.py"), "--out", tmp_path],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    made = sorted(p.name for p in tmp_path.iterdir())
    assert made == [f"{s}.las" for s in STRIPS] == sorted(p.name for p in DATA.glob("strip*"))
    for name in made:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name
    source = laspy.read(DATA / "simple.las")
    total = 0
    for s in STRIPS:
        strip = laspy.read(DATA / f"{s}.las")
        assert set(strip.point_source_id) == {int(s[5:])}
        mask = source.point_source_id == int(s[5:])
        assert np.array_equal(strip.points.array, source.points.array[mask])
        total += len(strip.points)
    assert total == len(source.points) == 1065


def test_a_bad_crs_is_a_usage_error_without_a_traceback(tmp_path: Path) -> None:
    proc = run_tool("import", "--crs", "EPSG:99999", "in.las", "out.laz", cwd=tmp_path)
    assert proc.returncode == 2
    assert "argument --crs: 'EPSG:99999' is not a coordinate reference system" in proc.stderr
    assert "Traceback" not in proc.stderr
