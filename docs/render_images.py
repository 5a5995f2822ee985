"""Draw the README's pictures of the examples' results from their GeoTIFFs.

Runs the two LiDAR examples (``opf run``, which skips what an earlier run already made), then
draws with matplotlib, reading every raster with rasterio:

- ``docs/images/strips-mosaic.png``: examples/results/mosaic_hillshade.tif, the hillshade of
  the mosaic of the nine strip DEMs of strips.opf (contrast stretched: the ground is flat),
  with each strip DEM's outline on top;
- ``docs/images/autzen-hillshade.png``: the hillshade of autzen.opf's DEM.

Axes are the rasters' own coordinates, in the unit of their CRS (feet for EPSG:2994).

    pip install -e '.[docs]'
    python docs/render_images.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import rasterio  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
IMAGES = ROOT / "docs" / "images"
#: no date or version in the PNG, so drawing the same rasters again gives the same file
PNG_METADATA = {"Software": None}
#: grey shades, and a pale blue for nodata cells so they never look like bright slopes
SHADES = matplotlib.colormaps["gray"].with_extremes(bad="#cfe0f0")


def run_example(name: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "opals_dsl", "run", name, "--quiet"],
                          cwd=EXAMPLES, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"opf run examples/{name} failed:\n{proc.stdout}{proc.stderr}")


def read(path: Path) -> tuple[np.ma.MaskedArray, tuple[float, float, float, float], str]:
    """The raster (nodata masked), its extent for imshow and the name of its CRS."""
    with rasterio.open(path) as src:
        b = src.bounds
        return (src.read(1, masked=True), (b.left, b.right, b.bottom, b.top),
                f"{src.crs.to_wkt().split(chr(34))[1]} (EPSG:{src.crs.to_epsg()})")


def axes_in(ax: plt.Axes, crs: str, unit: str = "ft") -> None:
    ax.set_xlabel(f"easting ({unit}) in {crs}", fontsize=8)
    ax.set_ylabel(f"northing ({unit})", fontsize=8)
    ax.ticklabel_format(style="plain", useOffset=False)
    ax.tick_params(labelsize=7)


def draw_strips_mosaic(out: Path) -> None:
    shade, extent, crs = read(EXAMPLES / "results" / "mosaic_hillshade.tif")
    fig, ax = plt.subplots(figsize=(6.0, 6.8), dpi=110)
    # the valley floor is flat and the DEM coarse: stretch the shades' 1st to 99th percentile
    low, high = np.percentile(shade.compressed(), [1, 99])
    ax.imshow(shade, cmap=SHADES, vmin=low, vmax=high, extent=extent, interpolation="nearest")
    colours = plt.get_cmap("tab10")
    for k, dem in enumerate(sorted((EXAMPLES / "results" / "grid").glob("*_dem.tif"))):
        with rasterio.open(dem) as src:
            b = src.bounds
        ax.add_patch(Rectangle((b.left, b.bottom), b.right - b.left, b.top - b.bottom,
                               fill=False, lw=1.0, ec=colours(k % 10), alpha=0.9))
        ax.text(b.right + 40, (b.bottom + b.top) / 2, dem.stem.removesuffix("_dem"),
                fontsize=6.5, va="center", color=colours(k % 10))
    ax.set_xlim(extent[0] - 100, extent[1] + 800)
    ax.set_title("strips.opf: hillshade of the mosaic of nine strip DEMs\n"
                 "(simple.las, Autzen Stadium, Oregon; ground points, 100 ft cells,\n"
                 "contrast stretched; blue: nodata)",
                 fontsize=9)
    axes_in(ax, crs)
    fig.tight_layout()
    fig.savefig(out, metadata=PNG_METADATA)
    plt.close(fig)


def draw_autzen(out: Path) -> None:
    shade, extent, crs = read(EXAMPLES / "results_autzen" / "autzen_trim_hillshade.tif")
    fig, ax = plt.subplots(figsize=(7.5, 4.4), dpi=110)
    ax.imshow(shade, cmap=SHADES, vmin=0, vmax=255, extent=extent, interpolation="nearest")
    ax.set_title("autzen.opf: hillshade of the ground DEM of autzen_trim.laz\n"
                 "(110,000 points, 5 ft cells; blue: no ground point within 15 ft)",
                 fontsize=9)
    axes_in(ax, crs)
    fig.tight_layout()
    fig.savefig(out, metadata=PNG_METADATA)
    plt.close(fig)


def main() -> None:
    for name in ("strips.opf", "autzen.opf"):
        run_example(name)
    IMAGES.mkdir(exist_ok=True)
    draw_strips_mosaic(IMAGES / "strips-mosaic.png")
    draw_autzen(IMAGES / "autzen-hillshade.png")
    for name in ("strips-mosaic.png", "autzen-hillshade.png"):
        print(IMAGES / name)


if __name__ == "__main__":
    main()
