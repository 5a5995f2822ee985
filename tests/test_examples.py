"""The example pipelines, run for real: strips → DEMs → mosaic, checked by numbers.

``strips.opf`` runs on an embedded cluster exactly as the README's demo command runs it; the
mosaic it produces is compared with (a) the same tool functions called directly over all points,
and (b) an independent per-cell computation from the raw points wherever every strip covering a
cell has points in it. ``strips_flat.opf`` and ``tiles.opf`` run on the session cluster and are
checked for their folder layouts.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
STRIPS = ["strip11", "strip12", "strip21", "strip22", "strip31", "strip32"]


def _lidar():
    spec = importlib.util.spec_from_file_location("lidar_tool", EXAMPLES / "tools" / "lidar.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["lidar_tool"] = module
    spec.loader.exec_module(module)
    return module


lidar = _lidar()


@pytest.fixture()
def examples(tmp_path: Path) -> Path:
    """A fresh copy of examples/ (no results, no state), as on a new clone."""
    folder = tmp_path / "examples"
    shutil.copytree(
        EXAMPLES, folder,
        ignore=shutil.ignore_patterns("results*", ".opf", "__pycache__", "*.html"),
    )
    return folder


def opf(*args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "opals_dsl", *args], cwd=cwd, capture_output=True, text=True,
        timeout=timeout,
    )


def relative_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_strips_demo_on_embedded_cluster_matches_direct_computation(examples: Path):
    proc = opf("run", "strips.opf", "-n", "2", "--param", "cell=2.0", cwd=examples)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = examples / "results"
    assert relative_files(results) == sorted(
        [f"import/{s}.odm" for s in STRIPS] + [f"grid/{s}_dem.asc" for s in STRIPS]
        + ["mosaic.asc"]
    )
    assert not [p for p in results.rglob(".*")], "no temporary may be left at a destination"

    config = lidar.read_config(examples / "cfg" / "grid.cfg")
    points = {s: lidar.read_xyz(examples / "data" / f"{s}.xyz") for s in STRIPS}

    # (a) every DEM and the mosaic equal the tool's own functions applied directly
    direct = {}
    for s in STRIPS:
        direct[s] = lidar.grid_points(
            points[s], 2.0, config["interpolation"], config["fill"], config["nodata"]
        )
        got = lidar.read_asc(results / "grid" / f"{s}_dem.asc")
        assert (got.xll, got.yll, got.cell) == (direct[s].xll, direct[s].yll, 2.0)
        np.testing.assert_allclose(got.values, direct[s].values, atol=6e-4)
    expected = lidar.mosaic(list(direct.values()))
    mosaic = lidar.read_asc(results / "mosaic.asc")
    assert mosaic.values.shape == expected.values.shape
    assert (mosaic.xll, mosaic.yll) == (expected.xll, expected.yll)
    np.testing.assert_allclose(mosaic.values, expected.values, atol=1.2e-3, equal_nan=True)

    # (b) independently from the raw points: where every strip whose grid covers a cell has
    # points in that cell, the mosaic is the mean over those strips of their points' mean height
    cell = 2.0
    sums: dict[tuple[int, int], list[float]] = {}
    covering: dict[tuple[int, int], int] = {}
    for s in STRIPS:
        p = points[s]
        ix = np.floor(p[:, 0] / cell).astype(int)
        iy = np.floor(p[:, 1] / cell).astype(int)
        for cx in range(ix.min(), ix.max() + 1):
            for cy in range(iy.min(), iy.max() + 1):
                covering[(cx, cy)] = covering.get((cx, cy), 0) + 1
        per_cell: dict[tuple[int, int], list[float]] = {}
        for x, y, z in zip(ix, iy, p[:, 2], strict=True):
            per_cell.setdefault((int(x), int(y)), []).append(float(z))
        for key, zs in per_cell.items():
            sums.setdefault(key, []).append(sum(zs) / len(zs))
    x0 = round(mosaic.xll / cell)
    top = round(mosaic.yll / cell) + mosaic.values.shape[0] - 1
    checked = 0
    for (cx, cy), means in sums.items():
        if len(means) != covering[(cx, cy)]:
            continue  # some covering strip has no point here: its value there is a fill
        value = mosaic.values[top - cy, cx - x0]
        assert value == pytest.approx(sum(means) / len(means), abs=1.2e-3), (cx, cy)
        checked += 1
    assert checked > 0.8 * mosaic.values.size


def test_flat_layout_puts_every_result_in_one_folder(examples: Path, cluster):
    proc = opf("run", "strips_flat.opf", "--cluster-file", str(cluster.client_file),
               "--report", "flat.html", cwd=examples)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = (examples / "flat.html").read_text(encoding="utf-8")
    assert "strip_dems_flat" in report and "mosaic/0" in report
    assert relative_files(examples / "results_flat") == sorted(
        [f"{s}.odm" for s in STRIPS] + [f"{s}_dem.asc" for s in STRIPS] + ["mosaic.asc"]
    )


def test_tiles_map_layout_and_temp_outputs_stay_out(examples: Path, cluster):
    proc = opf("run", "tiles.opf", "--cluster-file", str(cluster.client_file), cwd=examples)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = relative_files(examples / "results_tiles")
    assert got == sorted(
        [f"grid/{s}_dem.asc" for s in STRIPS]
        + [f"shade/{s}_dem_shade.asc" for s in STRIPS]
        + [f"shade/{s}_dem_slope.asc" for s in STRIPS]
    )
    # each hillshade is the tool's hillshade of that strip's own DEM (written to 1 decimal)
    for s in STRIPS:
        dem = lidar.read_asc(examples / "results_tiles" / "grid" / f"{s}_dem.asc")
        shade = lidar.read_asc(examples / "results_tiles" / "shade" / f"{s}_dem_shade.asc")
        np.testing.assert_allclose(
            shade.values, lidar.hillshade(dem, 315.0).values, atol=0.051, equal_nan=True
        )
