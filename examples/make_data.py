"""Generate the example laser scanning strips in examples/data/.

Six strips sample one smooth synthetic terrain: three east-west flight lines (strip1*, strip2*,
strip3*), each flown in two overlapping pieces (strip*1 west, strip*2 east). Neighbouring flight
lines overlap by 5 m, the two pieces of a line by 10 m, so the DEMs overlap in the mosaic.
Each strip is an ASCII file of `x y z` lines (metres, local coordinates) after a comment header.

The output is deterministic: a fixed seed per strip and fixed-precision printing, so running
this again gives byte-identical files.

    python examples/make_data.py [--out DIR] [--points N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

SEED = 20240611
X0, Y0 = 1000.0, 2000.0  # south-west corner of the survey area
LINE_WIDTH, LINE_STEP = 25.0, 20.0  # flight lines: 25 m wide swaths every 20 m (5 m overlap)
PIECES = ((0.0, 55.0), (45.0, 100.0))  # x ranges of the two pieces of a line (10 m overlap)
NOISE = 0.03  # standard deviation of the measured heights, metres


def terrain(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The synthetic ground height (metres) at local coordinates x, y."""
    u, v = x - X0, y - Y0
    return (250.0 + 0.08 * u + 0.05 * v
            + 6.0 * np.sin(u / 16.0) * np.cos(v / 13.0)
            + 3.0 * np.exp(-((u - 60.0) ** 2 + (v - 35.0) ** 2) / 300.0))


def make_strip(line: int, piece: int, points: int) -> np.ndarray:
    """Points (N x 3) of flight line `line` (1-3), piece `piece` (1-2)."""
    rng = np.random.default_rng([SEED, line, piece])
    (left, right), bottom = PIECES[piece - 1], (line - 1) * LINE_STEP
    # whole centimetres, so the printed coordinates are exactly the generated ones
    x = X0 + rng.integers(round(left * 100), round(right * 100), points) / 100
    y = Y0 + rng.integers(round(bottom * 100), round((bottom + LINE_WIDTH) * 100), points) / 100
    z = terrain(x, y) + rng.normal(0.0, NOISE, points)
    return np.column_stack([x, y, z])


def write_xyz(path: Path, name: str, xyz: np.ndarray) -> None:
    lines = [f"# {name}: synthetic airborne laser scanning strip, {len(xyz)} points\n",
             "# x y z (metres)\n"]
    lines += [f"{x:.2f} {y:.2f} {z:.3f}\n" for x, y, z in xyz]
    path.write_text("".join(lines), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data",
                        help="output folder (default: examples/data next to this script)")
    parser.add_argument("--points", type=int, default=3000, help="points per strip")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for line in (1, 2, 3):
        for piece in (1, 2):
            name = f"strip{line}{piece}"
            write_xyz(args.out / f"{name}.xyz", name, make_strip(line, piece, args.points))


if __name__ == "__main__":
    main()
