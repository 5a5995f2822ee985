"""The example pipelines, run for real on real airborne laser scanning data, checked by numbers.

``strips.opf`` runs on an embedded cluster exactly as the README's first command runs it. Every
DEM and the mosaic it writes are compared cell by cell with DEMs computed here from the raw LAS
points (laspy + numpy, nothing of the example tool); their CRS, transform and nodata are read
back with rasterio, and with ``gdalinfo`` where GDAL's command-line tools are installed.
``autzen.opf``'s DEM (a LAZ file with its own CRS) is checked the same way; ``strips_flat.opf``
and ``per_strip.opf`` run on the session cluster and are checked for their folder layouts;
``tiles.opf``'s mosaic of buffered tiles is compared with one DEM of the whole area.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import laspy
import numpy as np
import pyproj
import pytest
import rasterio

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
STRIPS = [f"strip{n}" for n in range(7326, 7335)]
EPSG_2994 = pyproj.CRS.from_epsg(2994)  # NAD83(HARN) / Oregon GIC Lambert (ft)
GDALINFO = shutil.which("gdalinfo")
FLOAT32 = 1e-3  # heights of a few hundred feet, stored as float32


@pytest.fixture()
def examples(tmp_path: Path) -> Path:
    """A fresh copy of examples/ (no results, no state), as on a new clone."""
    folder = tmp_path / "examples"
    shutil.copytree(
        EXAMPLES, folder,
        ignore=shutil.ignore_patterns("results*", ".opf", "__pycache__", "*.html"),
    )
    return folder


def opf(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "opals_dsl", *args], cwd=cwd, capture_output=True, text=True,
        timeout=timeout,
    )


def relative_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# --- the independent computation -----------------------------------------------------------

class Expected:
    """A DEM computed from raw points: `values` (NaN = nodata), row 0 at cell row `top`."""

    def __init__(self, values: np.ndarray, left: int, top: int, cell: float) -> None:
        self.values, self.left, self.top, self.cell = values, left, top, cell

    @property
    def transform(self) -> rasterio.Affine:
        return rasterio.Affine(self.cell, 0.0, self.left * self.cell,
                               0.0, -self.cell, (self.top + 1) * self.cell)


def expected_dem(las_path: Path, cell: float, fill: int,
                 window: tuple[int, int, int, int] | None = None) -> Expected:
    """The ground DEM of a LAS/LAZ file as the examples document it, computed directly.

    Mean height of the ground points (class 2) per cell, cells on multiples of `cell`; an empty
    cell takes the value of the nearest cell with points (centre to centre, in cells; on a tie
    the northern, then the western one) when that is at most `fill` cells away. The DEM covers
    the points' cells, or the cells of `window` (left, bottom, right, top, in cells).
    """
    las = laspy.read(las_path)
    ground = np.asarray(las.classification) == 2
    x, y, z = (np.asarray(v, dtype=np.float64)[ground] for v in (las.x, las.y, las.z))
    cx, cy = np.floor(x / cell).astype(np.int64), np.floor(y / cell).astype(np.int64)
    if window is None:
        window = (int(cx.min()), int(cy.min()), int(cx.max()) + 1, int(cy.max()) + 1)
    inside = (cx >= window[0]) & (cx < window[2]) & (cy >= window[1]) & (cy < window[3])
    cx, cy, z = cx[inside], cy[inside], z[inside]
    left, top = window[0], window[3] - 1
    nrows, ncols = window[3] - window[1], window[2] - window[0]
    # per-cell mean: sort the points by cell and average each run of equal cells
    key = (top - cy) * ncols + (cx - left)
    order = np.argsort(key, kind="stable")
    cells, starts = np.unique(key[order], return_index=True)
    means = np.add.reduceat(z[order], starts) / np.diff(np.append(starts, len(order)))
    values = np.full(nrows * ncols, np.nan)
    values[cells] = means
    values = values.reshape(nrows, ncols)
    # fill by brute force, a band of rows at a time: every data cell near the band is a candidate
    data = np.argwhere(~np.isnan(values))
    filled = values.copy()
    band = 16
    for r0 in range(0, nrows, band):
        empty = np.argwhere(np.isnan(values[r0:r0 + band])) + (r0, 0)
        near = data[(data[:, 0] >= r0 - fill) & (data[:, 0] < r0 + band + fill)]
        if len(empty) == 0 or len(near) == 0:
            continue
        d2 = ((empty[:, None, :] - near[None, :, :]) ** 2).sum(axis=2)
        # nearest first; among equals the smallest (row, col): north, then west
        rank = d2 * (nrows * ncols) + (near[:, 0] * ncols + near[:, 1])[None, :]
        best = rank.argmin(axis=1)
        ok = d2[np.arange(len(empty)), best] <= fill**2
        src = near[best[ok]]
        filled[empty[ok, 0], empty[ok, 1]] = values[src[:, 0], src[:, 1]]
    return Expected(filled, left, top, cell)


def expected_mosaic(dems: list[Expected]) -> Expected:
    """The mean of the DEMs' data where they overlap, NaN where none has data."""
    cell = dems[0].cell
    left, top = min(d.left for d in dems), max(d.top for d in dems)
    right = max(d.left + d.values.shape[1] for d in dems)
    bottom = min(d.top - d.values.shape[0] for d in dems)
    stack = np.full((len(dems), top - bottom, right - left), np.nan)
    for k, d in enumerate(dems):
        r, c = top - d.top, d.left - left
        stack[k, r:r + d.values.shape[0], c:c + d.values.shape[1]] = d.values
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "mean of empty slice": no DEM there
        values = np.nanmean(stack, axis=0)
    return Expected(values, left, top, cell)


def assert_geotiff(path: Path, expected: Expected, crs: pyproj.CRS) -> None:
    """The file is a GeoTIFF with the CRS, transform and nodata of `expected`, and its values."""
    with rasterio.open(path) as src:
        assert src.driver == "GTiff" and src.count == 1 and src.dtypes == ("float32",)
        assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert src.profile["tiled"] and src.compression.name == "deflate"
        assert pyproj.CRS.from_wkt(src.crs.to_wkt()).equals(crs), src.crs
        assert src.crs.to_epsg() == 2994 and src.crs.linear_units == "foot"
        assert src.transform == expected.transform
        assert src.nodata == -9999
        values = src.read(1)
    assert values.shape == expected.values.shape
    assert np.array_equal(values == -9999, np.isnan(expected.values)), path.name
    has = ~np.isnan(expected.values)
    np.testing.assert_allclose(values[has], expected.values[has], rtol=0, atol=FLOAT32)


def assert_gdalinfo(path: Path, expected: Expected) -> None:
    """GDAL's own command-line reader sees the same CRS, transform and nodata."""
    proc = subprocess.run([GDALINFO, "-json", str(path)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert "Oregon GIC Lambert (ft)" in info["coordinateSystem"]["wkt"]
    assert 'ID["EPSG",2994]' in info["coordinateSystem"]["wkt"]
    assert info["geoTransform"] == list(expected.transform.to_gdal())
    assert info["size"] == [expected.values.shape[1], expected.values.shape[0]]
    assert info["bands"][0]["noDataValue"] == -9999


# --- the examples --------------------------------------------------------------------------

@pytest.mark.slow
def test_strips_demo_on_embedded_cluster_matches_independent_dems(examples: Path) -> None:
    proc = opf("run", "strips.opf", "-n", "2", cwd=examples)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = examples / "results"
    assert relative_files(results) == sorted(
        [f"import/{s}.laz" for s in STRIPS] + [f"grid/{s}_dem.tif" for s in STRIPS]
        + ["mosaic.tif", "mosaic_hillshade.tif"]
    )
    assert not [p for p in results.rglob(".*")], "no temporary may be left at a destination"

    # the example's settings: cell from the pipeline's param, fill from cfg/grid.cfg
    assert "param cell    = 100.0" in (examples / "strips.opf").read_text()
    assert "\nfill = 3\n" in (examples / "cfg" / "grid.cfg").read_text()
    dems = {s: expected_dem(examples / "data" / f"{s}.las", 100.0, 3) for s in STRIPS}
    for s in STRIPS:
        assert_geotiff(results / "grid" / f"{s}_dem.tif", dems[s], EPSG_2994)
        imported = laspy.read(results / "import" / f"{s}.laz")
        assert imported.header.parse_crs().equals(EPSG_2994)
        assert set(np.unique(imported.classification)) == {2}
    mosaic = expected_mosaic(list(dems.values()))
    assert_geotiff(results / "mosaic.tif", mosaic, EPSG_2994)
    # the strips overlap: some cells of the mosaic are means of two or three DEMs
    assert np.isnan(mosaic.values).sum() < 0.1 * mosaic.values.size

    with rasterio.open(results / "mosaic_hillshade.tif") as src:
        assert src.dtypes == ("uint8",) and src.nodata == 0
        assert src.transform == mosaic.transform and src.crs.to_epsg() == 2994
        shade = src.read(1)
    assert shade[~np.isnan(mosaic.values)].mean() > 100  # mostly lit, the ground is flat
    if GDALINFO:
        for path in [results / "grid" / f"{STRIPS[0]}_dem.tif", results / "mosaic.tif"]:
            assert_gdalinfo(path, mosaic if path.name == "mosaic.tif" else dems[STRIPS[0]])


def test_autzen_dem_keeps_the_laz_files_crs_and_feet(examples: Path, cluster) -> None:
    proc = opf("run", "autzen.opf", "--cluster-file", str(cluster.client_file), cwd=examples)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = examples / "results_autzen"
    names = ["autzen_trim_dem.tif", "autzen_trim_ground.laz", "autzen_trim_hillshade.tif",
             "autzen_trim_slope.tif"]
    assert relative_files(results) == names
    source_crs = laspy.open(examples / "data" / "autzen_trim.laz").header.parse_crs()
    dem = expected_dem(examples / "data" / "autzen_trim.laz", 5.0, 3)
    assert_geotiff(results / "autzen_trim_dem.tif", dem, source_crs)
    # feet stay feet: 5 ft cells, heights of the Willamette valley floor in feet (about 420)
    assert dem.transform.a == 5.0
    assert 400 < np.nanmedian(dem.values) < 450
    for name in ("autzen_trim_hillshade.tif", "autzen_trim_slope.tif"):
        with rasterio.open(results / name) as src:
            assert src.transform == dem.transform and src.crs.to_epsg() == 2994
    if GDALINFO:
        assert_gdalinfo(results / "autzen_trim_dem.tif", dem)


@pytest.mark.slow
def test_flat_layout_puts_every_result_in_one_folder(examples: Path, cluster) -> None:
    proc = opf("run", "strips_flat.opf", "--cluster-file", str(cluster.client_file),
               "--report", "flat.html", cwd=examples)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = (examples / "flat.html").read_text(encoding="utf-8")
    assert "strip_dems_flat" in report and "mosaic/0" in report
    assert relative_files(examples / "results_flat") == sorted(
        [f"{s}.laz" for s in STRIPS] + [f"{s}_dem.tif" for s in STRIPS] + ["mosaic.tif"]
    )


#: a tool that writes half its file and still exits 0, for strip 7327 only
CUT_SHORT = """import os, sys
if "strip7327" in sys.argv[1]:
    os.truncate(sys.argv[1], os.path.getsize(sys.argv[1]) // 2)
"""

CHECKED = """pipeline checked
param crs = "EPSG:2994"
job dem for strip in "data/strip732[67].las" {
    shared tool = "tools/lidar.py"
    shared cut = "cut.py"
    output "results_checked" flat
    step grid {
        out dem = "{strip.stem}_dem.tif"
        run python {tool} grid --crs {crs} --cell 50 {strip} {dem}
    }
    step damage {
        run python {cut} {grid.dem}
    }
    step check {
        run python {tool} check {grid.dem}
    }
}
"""


def test_a_last_step_that_checks_a_dem_keeps_a_half_written_one_from_being_published(
        examples: Path, cluster) -> None:
    """A step that exits 0 after writing half a DEM is caught by the task's last step (the
    example tool's ``check``, docs/language.md): that task fails, naming the check and why,
    and publishes nothing; the other task's DEM is published whole."""
    (examples / "cut.py").write_text(CUT_SHORT)
    (examples / "checked.opf").write_text(CHECKED)
    proc = opf("run", "checked.opf", "--cluster-file", str(cluster.client_file), "--keep-going",
               cwd=examples)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    said = proc.stdout + proc.stderr
    assert "dem/strip7327" in said and "step check" in said
    assert "strip7327_dem.tif: its cells cannot be read: the file is cut short or damaged" in said
    assert relative_files(examples / "results_checked") == ["strip7326_dem.tif"]
    with rasterio.open(examples / "results_checked" / "strip7326_dem.tif") as src:
        assert src.read(1).size == src.width * src.height > 0


@pytest.mark.slow
def test_per_strip_map_layout_and_temp_outputs_stay_out(examples: Path, cluster) -> None:
    proc = opf("run", "per_strip.opf", "--cluster-file", str(cluster.client_file),
               cwd=examples)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = relative_files(examples / "results_per_strip")
    assert got == sorted(
        [f"grid/{s}_dem.tif" for s in STRIPS]
        + [f"shade/{s}_dem_shade.tif" for s in STRIPS]
        + [f"shade/{s}_dem_slope.tif" for s in STRIPS]
    )
    # each hillshade is on its own strip's DEM grid
    for s in STRIPS:
        with rasterio.open(examples / "results_per_strip" / "grid" / f"{s}_dem.tif") as dem, \
                rasterio.open(examples / "results_per_strip" / "shade" / f"{s}_dem_shade.tif") \
                as sh:
            assert sh.transform == dem.transform and sh.shape == dem.shape
            assert sh.crs == dem.crs


# tiles.opf: 500 ft tiles of autzen_trim.laz, 5 ft cells filled from at most 3 cells away
TILE, CELL, FILL = 500, 5.0, 3
AUTZEN_TILES = [f"{x}_{y}" for y in (848500, 849000) for x in (636000, 636500, 637000)]


def tiles_area() -> tuple[int, int, int, int]:
    """The cells of the tiles' area, the union of their cores (left, bottom, right, top)."""
    per_tile = int(TILE / CELL)
    xs = [int(t.split("_")[0]) for t in AUTZEN_TILES]
    ys = [int(t.split("_")[1]) for t in AUTZEN_TILES]
    return (int(min(xs) / CELL), int(min(ys) / CELL), int(max(xs) / CELL) + per_tile,
            int(max(ys) / CELL) + per_tile)


def read_dem(path: Path) -> tuple[np.ndarray, rasterio.Affine]:
    with rasterio.open(path) as src:
        values = src.read(1).astype(np.float64)
        values[values == src.nodata] = np.nan
        return values, src.transform


def differing_cells(mosaic: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """The cells where the two DEMs differ: in data or nodata, or by more than float32 does."""
    nodata = np.isnan(mosaic) != np.isnan(expected)
    with np.errstate(invalid="ignore"):
        values = np.abs(mosaic - expected) > FLOAT32
    return nodata | values


@pytest.mark.slow
def test_tiles_with_a_buffer_mosaic_to_the_dem_of_the_whole_area_cell_for_cell(
    examples: Path, cluster
) -> None:
    """Tiles planned from the LAZ file's header, each gridded from its buffered points and cut
    to its core: their mosaic equals the DEM of all points over the tiles' area, every cell;
    without the buffer it differs, along the tiles' edges only."""
    client = ["--cluster-file", str(cluster.client_file)]
    proc = opf("run", "tiles.opf", *client, cwd=examples)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = examples / "results_tiles"
    assert relative_files(results) == sorted(
        [f"grid/{t}.tif" for t in AUTZEN_TILES] + ["mosaic.tif"])
    area = tiles_area()
    expected = expected_dem(examples / "data" / "autzen_trim.laz", CELL, FILL, area)
    mosaic, transform = read_dem(results / "mosaic.tif")
    assert transform == expected.transform and mosaic.shape == expected.values.shape
    assert not differing_cells(mosaic, expected.values).any()
    assert np.count_nonzero(~np.isnan(mosaic)) > 0.5 * 113 * 236  # the data's box, in cells
    for t in AUTZEN_TILES:  # each tile's DEM is exactly its core
        values, tt = read_dem(results / "grid" / f"{t}.tif")
        x, y = (int(v) for v in t.split("_"))
        assert values.shape == (TILE / CELL, TILE / CELL)
        assert (tt.c, tt.f) == (x, y + TILE)

    # without a buffer the tiles' DEMs lack their neighbours' cells: seams along the edges
    proc = opf("run", "tiles.opf", *client, "--param", "buffer=0", "--force", cwd=examples)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seams, _ = read_dem(results / "mosaic.tif")
    bad = np.argwhere(differing_cells(seams, expected.values))
    assert len(bad) > 0, "without a buffer the mosaic should differ near the tiles' edges"
    per_tile = TILE / CELL
    # distance of each differing cell to the nearest inner tile edge, in cells
    rows, cols = bad[:, 0] % per_tile, bad[:, 1] % per_tile
    to_edge = np.minimum.reduce([rows, per_tile - 1 - rows, cols, per_tile - 1 - cols])
    assert to_edge.max() < FILL, "a cell far from every tile edge differs"
