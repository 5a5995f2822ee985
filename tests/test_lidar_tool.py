"""Tests of the example processing tool (examples/tools/lidar.py) and its data.

The tool is run as users' pipelines run it: `python lidar.py SUBCOMMAND ...` in a subprocess,
on the shipped strips in examples/data/. Results are checked against numbers computed here
independently (plain numpy over the point files), not with the tool's own functions, except in
the test that shows the importable functions reproduce what the command line wrote.
"""

from __future__ import annotations

import importlib.util
import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TOOL = EXAMPLES / "tools" / "lidar.py"
DATA = EXAMPLES / "data"
CONFIG = EXAMPLES / "cfg" / "grid.cfg"
STRIPS = ["strip11", "strip12", "strip21", "strip22", "strip31", "strip32"]
ROUNDING = 0.0005 + 1e-9  # heights are written with 3 decimals


def run_tool(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def run_all(commands: list[list[str | Path]], cwd: Path) -> None:
    """Run tool commands side by side and require every one to succeed."""
    procs = [subprocess.Popen([sys.executable, str(TOOL), *map(str, args)], cwd=cwd,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for args in commands]
    for args, proc in zip(commands, procs, strict=True):
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, f"{args}: {err}"


def load_points(name: str) -> np.ndarray:
    return np.loadtxt(DATA / f"{name}.xyz", comments="#")


def parse_asc(path: Path) -> tuple[list[tuple[str, float]], np.ndarray]:
    """The six header entries in file order, and the cells with nodata as NaN."""
    lines = path.read_text().splitlines()
    header = [(line.split()[0], float(line.split()[1])) for line in lines[:6]]
    values = np.array([[float(v) for v in line.split()] for line in lines[6:]])
    values[values == header[5][1]] = np.nan
    return header, values


def cell_members(points: np.ndarray, xll: float, yll: float, cell: float,
                 nrows: int, ncols: int) -> dict[tuple[int, int], np.ndarray]:
    """Heights of the points in each cell (row 0 at the top), by comparing with cell edges."""
    members: dict[tuple[int, int], list[float]] = {}
    for row in range(nrows):
        top = yll + (nrows - row) * cell
        in_row = points[(points[:, 1] >= top - cell) & (points[:, 1] < top)]
        for col in range(ncols):
            left = xll + col * cell
            z = in_row[(in_row[:, 0] >= left) & (in_row[:, 0] < left + cell), 2]
            if len(z):
                members[row, col] = z
    return members


@pytest.fixture(scope="module")
def processed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with every strip imported (NAME.odm) and gridded (NAME_dem.asc) by the tool."""
    folder = tmp_path_factory.mktemp("lidar")
    run_all([["import", DATA / f"{s}.xyz", f"{s}.odm"] for s in STRIPS], folder)
    run_all([["grid", "--config", CONFIG, "--cell", "1.0", f"{s}.odm", f"{s}_dem.asc"]
             for s in STRIPS], folder)
    return folder


def test_import_writes_header_and_all_points(processed: Path) -> None:
    points = load_points("strip21")
    data = (processed / "strip21.odm").read_bytes()
    magic, count, *bbox = struct.unpack_from("<8sQ6d", data)
    assert magic == b"LIDARODM"
    assert count == len(points) == 3000
    assert bbox == [*points.min(axis=0), *points.max(axis=0)]
    stored = np.frombuffer(data, dtype="<f8", offset=64).reshape(-1, 3)
    assert np.array_equal(stored, points)


def test_grid_header_is_aligned_esri_ascii(processed: Path) -> None:
    points = load_points("strip32")
    header, values = parse_asc(processed / "strip32_dem.asc")
    keys = [key for key, _ in header]
    assert keys == ["ncols", "nrows", "xllcorner", "yllcorner", "cellsize", "NODATA_value"]
    ncols, nrows, xll, yll, cell, nodata = (value for _, value in header)
    assert (cell, nodata) == (1.0, -9999)
    assert xll == math.floor(points[:, 0].min()) and yll == math.floor(points[:, 1].min())
    assert xll + ncols * cell > points[:, 0].max() >= xll + (ncols - 1) * cell
    assert yll + nrows * cell > points[:, 1].max() >= yll + (nrows - 1) * cell
    assert values.shape == (nrows, ncols)


def test_grid_cell_is_mean_of_its_points(processed: Path) -> None:
    points = load_points("strip11")
    header, values = parse_asc(processed / "strip11_dem.asc")
    ncols, nrows, xll, yll, cell, _ = (value for _, value in header)
    members = cell_members(points, xll, yll, cell, int(nrows), int(ncols))
    assert sum(len(z) for z in members.values()) == len(points)
    assert len(members) > 0.7 * nrows * ncols
    for (row, col), z in members.items():
        assert abs(values[row, col] - z.mean()) <= ROUNDING, (row, col)


def test_grid_fills_empty_cells_from_nearest_cell(processed: Path) -> None:
    points = load_points("strip22")
    header, values = parse_asc(processed / "strip22_dem.asc")
    ncols, nrows, xll, yll, cell, _ = (value for _, value in header)
    members = cell_members(points, xll, yll, cell, int(nrows), int(ncols))
    assert not np.isnan(values).any()
    full = np.array(sorted(members))
    empty = [(r, c) for r in range(int(nrows)) for c in range(int(ncols)) if (r, c) not in members]
    assert len(empty) > 50
    for r, c in empty:
        d2 = ((full - (r, c)) ** 2).sum(axis=1)
        nearest = [members[tuple(rc)].mean() for rc in full[d2 == d2.min()]]
        assert any(abs(values[r, c] - z) <= ROUNDING for z in nearest), (r, c)


def test_grid_fills_a_wide_gap_from_nearest_cell(tmp_path: Path) -> None:
    # one point in the middle of each cell of a 100 x 100 m square, except a 50 x 50 m hole
    rows, cols = np.mgrid[0:100, 0:100]
    hole = (rows >= 25) & (rows < 75) & (cols >= 30) & (cols < 80)
    heights = np.random.default_rng(7).uniform(100.0, 200.0, rows.shape).round(3)
    lines = [f"{c + 0.5} {99 - r + 0.5} {heights[r, c]:.3f}"
             for r, c in zip(rows[~hole], cols[~hole], strict=True)]
    (tmp_path / "holed.xyz").write_text("\n".join(lines) + "\n")
    run_all([["import", "holed.xyz", "holed.odm"]], tmp_path)
    run_all([["grid", "--cell", "1", "holed.odm", "holed.asc"]], tmp_path)
    header, values = parse_asc(tmp_path / "holed.asc")
    assert [v for _, v in header][:4] == [100, 100, 0, 0]
    assert np.array_equal(values[~hole], heights[~hole])
    known = np.argwhere(~hole)
    for r, c in np.argwhere(hole):
        d2 = ((known - (r, c)) ** 2).sum(axis=1)
        nearest = heights[tuple(known[d2 == d2.min()].T)]
        assert values[r, c] in nearest, (r, c)


def test_cell_option_overrides_config(processed: Path, tmp_path: Path) -> None:
    result = run_tool("grid", "--config", CONFIG, "--cell", "2", processed / "strip12.odm",
                      "dem2.asc", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    header, values = parse_asc(tmp_path / "dem2.asc")
    ncols, nrows, xll, yll, cell, _ = (value for _, value in header)
    assert cell == 2.0 and xll % 2 == 0 and yll % 2 == 0
    members = cell_members(load_points("strip12"), xll, yll, cell, int(nrows), int(ncols))
    assert len(members) == nrows * ncols  # 2 m cells hold about 9 points each: none is empty
    for (row, col), z in members.items():
        assert abs(values[row, col] - z.mean()) <= ROUNDING


def test_config_settings_max_no_fill_and_nodata(processed: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "max.cfg"
    cfg.write_text("# highest point, gaps left open\ninterpolation = max\n"
                   "fill = none   # no filling\nnodata = -1\ndecimals = 2\n")
    result = run_tool("grid", "--config", cfg, processed / "strip31.odm", "max.asc", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    header, values = parse_asc(tmp_path / "max.asc")
    ncols, nrows, xll, yll, cell, nodata = (value for _, value in header)
    assert (cell, nodata) == (1.0, -1)
    members = cell_members(load_points("strip31"), xll, yll, cell, int(nrows), int(ncols))
    assert np.isnan(values).sum() == nrows * ncols - len(members) > 0
    for (row, col), z in members.items():
        assert abs(values[row, col] - z.max()) <= 0.005 + 1e-9


def test_mosaic_is_mean_where_dems_overlap(processed: Path) -> None:
    dems = [processed / f"{s}_dem.asc" for s in STRIPS]
    result = run_tool("mosaic", "-o", "mosaic.asc", *dems, cwd=processed)
    assert result.returncode == 0, result.stderr
    header, values = parse_asc(processed / "mosaic.asc")
    ncols, nrows, xll, yll, cell, _ = (int(value) for _, value in header)
    total, count = np.zeros((nrows, ncols)), np.zeros((nrows, ncols))
    for dem in dems:
        dem_header, dem_values = parse_asc(dem)
        dcols, drows, dxll, dyll = (int(value) for _, value in dem_header[:4])
        top = yll + nrows - (dyll + drows)  # the DEM's first row in the mosaic
        window = np.s_[top:top + drows, dxll - xll:dxll - xll + dcols]
        total[window] += dem_values
        count[window] += 1
    assert (xll, yll, ncols, nrows) == (1000, 2000, 100, 65)
    assert {1, 2, 4} <= set(np.unique(count))  # single, double and fourfold overlap all occur
    assert np.all(np.abs(values - total / count) <= ROUNDING)


def test_mosaic_has_nodata_where_no_dem_covers(processed: Path) -> None:
    result = run_tool("mosaic", "-o", "corners.asc", "strip11_dem.asc", "strip32_dem.asc",
                      cwd=processed)
    assert result.returncode == 0, result.stderr
    header, values = parse_asc(processed / "corners.asc")
    _, d11 = parse_asc(processed / "strip11_dem.asc")
    _, d32 = parse_asc(processed / "strip32_dem.asc")
    assert [v for _, v in header][:4] == [100, 65, 1000, 2000]
    assert np.array_equal(values[-25:, :55], d11)  # strip11: south-west corner
    assert np.array_equal(values[:25, -55:], d32)  # strip32: north-east corner
    assert np.isnan(values[:25, :45]).all() and np.isnan(values[-25:, -45:]).all()
    assert np.isnan(values[25:40]).all()


def test_mosaic_rejects_different_cell_sizes(processed: Path, tmp_path: Path) -> None:
    run_all([["grid", "--cell", "2.0", processed / "strip12.odm", "coarse.asc"]], tmp_path)
    result = run_tool("mosaic", "-o", "m.asc", processed / "strip11_dem.asc", "coarse.asc",
                      cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == ("lidar.py mosaic: error: the grids must have the same cell size, "
                             "found 1, 2\n")
    assert not (tmp_path / "m.asc").exists()


@pytest.mark.parametrize(("text", "message"), [
    ("# two columns\n1 2 3\n\n4 5\n", "bad.xyz:4: expected 3 numbers (x y z), found 2"),
    ("1 2 3\n4 5 6 7 # four\n", "bad.xyz:2: expected 3 numbers (x y z), found 4"),
    ("1 2 3\n1 2,5 3\n", "bad.xyz:2: '2,5' is not a number"),
    ("1 2 nan\n", "bad.xyz:1: coordinates must be finite numbers"),
    ("# only a comment\n\n", "bad.xyz: no points in the file"),
    ("1 2 3\n\xff\n", None),
])
def test_import_reports_malformed_input(tmp_path: Path, text: str, message: str | None) -> None:
    (tmp_path / "bad.xyz").write_bytes(text.encode("latin-1"))
    result = run_tool("import", "bad.xyz", "out.odm", cwd=tmp_path)
    assert result.returncode == 2
    expected = message or "bad.xyz: not a text file (it is not UTF-8)"
    assert result.stderr == f"lidar.py import: error: {expected}\n"
    assert not (tmp_path / "out.odm").exists()


def test_grid_reports_bad_config_and_missing_input(processed: Path, tmp_path: Path) -> None:
    (tmp_path / "bad.cfg").write_text("cell = 1\n# sizes\ncellsize = 2\n")
    result = run_tool("grid", "--config", "bad.cfg", processed / "strip11.odm", "d.asc",
                      cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("lidar.py grid: error: bad.cfg:3: unknown key 'cellsize'")
    (tmp_path / "bad.cfg").write_text("cell = -1\n")
    result = run_tool("grid", "--config", "bad.cfg", processed / "strip11.odm", "d.asc",
                      cwd=tmp_path)
    assert result.stderr == "lidar.py grid: error: bad.cfg:1: cell must be greater than 0\n"
    result = run_tool("grid", "missing.odm", "d.asc", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == ("lidar.py grid: error: missing.odm: No such file or directory\n")
    result = run_tool("grid", DATA / "strip11.xyz", "d.asc", cwd=tmp_path)
    assert result.returncode == 2 and "not a point file" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "d.asc").exists()


def plane_asc(path: Path, dzdx: float, dzdy: float) -> None:
    """A 6 x 5 grid of 2 m cells sampling the plane z = 100 + dzdx * x + dzdy * y."""
    ys = 10.0 + 2.0 * np.arange(6)[::-1] + 1.0  # cell centres, top row first
    xs = 20.0 + 2.0 * np.arange(5) + 1.0
    z = 100.0 + dzdx * xs[None, :] + dzdy * ys[:, None]
    rows = "\n".join(" ".join(f"{v:.6f}" for v in row) for row in z)
    path.write_text("ncols 5\nnrows 6\nxllcorner 20\nyllcorner 10\ncellsize 2\n"
                    f"NODATA_value -9999\n{rows}\n")


@pytest.mark.parametrize(("dzdx", "dzdy"), [(0.0, 0.0), (0.5, 0.0), (0.0, 0.5), (-0.3, -0.4)])
def test_slope_and_hillshade_of_a_plane(tmp_path: Path, dzdx: float, dzdy: float) -> None:
    plane_asc(tmp_path / "plane.asc", dzdx, dzdy)
    run_all([["slope", "plane.asc", "slope.asc"],
             ["hillshade", "--azimuth", "315", "plane.asc", "shade.asc"]], tmp_path)
    # sunlight from the north-west, 45 degrees up; the plane's upward normal is (-dzdx, -dzdy, 1)
    light = np.array([-0.5, 0.5, math.sqrt(0.5)])
    normal = np.array([-dzdx, -dzdy, 1.0]) / math.sqrt(dzdx**2 + dzdy**2 + 1)
    header, slope = parse_asc(tmp_path / "slope.asc")
    assert [v for _, v in header][:5] == [5, 6, 20, 10, 2]
    assert np.all(np.abs(slope - math.degrees(math.atan(math.hypot(dzdx, dzdy)))) <= 0.005)
    _, shade = parse_asc(tmp_path / "shade.asc")
    assert np.all(np.abs(shade - 255 * max(0.0, normal @ light)) <= 0.05)


def test_functions_reproduce_the_command_line_results(processed: Path, tmp_path: Path) -> None:
    dems = [processed / f"{s}_dem.asc" for s in STRIPS]
    result = run_tool("mosaic", "-o", "mosaic.asc", *dems, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    spec = importlib.util.spec_from_file_location("lidar_example", TOOL)
    assert spec and spec.loader
    lidar = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = lidar
    spec.loader.exec_module(lidar)
    try:
        config = lidar.read_config(CONFIG)
        grids = []
        for strip in STRIPS:
            points = lidar.read_xyz(DATA / f"{strip}.xyz")
            assert np.array_equal(points, lidar.read_odm(processed / f"{strip}.odm"))
            grid = lidar.grid_points(points, config["cell"], config["interpolation"],
                                     config["fill"], config["nodata"])
            written = lidar.read_asc(processed / f"{strip}_dem.asc")
            assert (grid.xll, grid.yll, grid.cell) == (written.xll, written.yll, written.cell)
            assert np.all(np.abs(grid.values - written.values) <= ROUNDING)
            grids.append(written)
        merged = lidar.mosaic(grids)
        lidar.write_asc(merged, tmp_path / "again.asc")
        assert (tmp_path / "again.asc").read_bytes() == (tmp_path / "mosaic.asc").read_bytes()
    finally:
        del sys.modules[spec.name]


def test_make_data_regenerates_identical_files(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(EXAMPLES / "make_data.py"), "--out", tmp_path],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    made = sorted(p.name for p in tmp_path.iterdir())
    assert made == [f"{s}.xyz" for s in STRIPS] == sorted(p.name for p in DATA.glob("*.xyz"))
    for name in made:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name
    assert sum((DATA / name).stat().st_size for name in made) < 600_000
