"""Split examples/data/simple.las into its flight strips, data/strip7326.las ... strip7334.las.

simple.las (from laspy 2.7.0's test data, see data/ATTRIBUTION.md) holds 1,065 points of an
airborne laser scan over Autzen Stadium, Eugene, Oregon, flown in nine overlapping east-west
flight lines. Each point records the flight line it was measured on as its point source id
(7326 ... 7334); this script writes the points of each id to `strip<ID>.las`, a LAS 1.2 file
with the header of simple.las (point format, scales, offsets, no CRS record), its own point
count and bounds, and the points in their original order, every attribute unchanged.

Nothing else goes into the files (no host name, and a fixed creation date: laspy writes a date
into every header, today's unless told, and simple.las has none), so running this again gives
byte-identical files on any day; tests/test_lidar_tool.py checks that.

    python examples/make_data.py [--source LAS] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import laspy
import numpy as np

DATA = Path(__file__).resolve().parent / "data"

#: the creation date in every strip's header: the day the strips were first made
CREATED = datetime.date(2026, 11, 27)


def split_by_source_id(source: Path, out: Path) -> list[Path]:
    """Write one LAS file per point source id of `source` into `out`; return their paths."""
    las = laspy.read(source)
    written = []
    for source_id in np.unique(las.point_source_id):
        strip = laspy.LasData(las.header.copy())
        strip.header.creation_date = CREATED
        strip.points = las.points[las.point_source_id == source_id].copy()
        path = out / f"strip{source_id}.las"
        strip.write(path)  # laspy sets the point count and bounds from the points
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DATA / "simple.las",
                        help="the LAS file to split (default: examples/data/simple.las)")
    parser.add_argument("--out", type=Path, default=DATA,
                        help="output folder (default: examples/data)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for path in split_by_source_id(args.source, args.out):
        print(path)


if __name__ == "__main__":
    main()
