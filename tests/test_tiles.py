"""``tiles(GLOB, size, buffer, origin)``: the grid the planner lays from LAS/LAZ headers.

Property tests, each over generated bounding boxes given to the grid planner
(:func:`~opals_dsl.lang.tiles.plan_tiles`, the boxes of the header reader's type) and over small
LAS files written with laspy and planned by ``opf compile`` (headers read by
:func:`~opals_dsl.lang.tiles.read_box`, the plan read back from its nodes):

1. tile cores are disjoint, aligned to the origin, of side S;
2. every point of every file lies in the core of exactly one task, and every task's core
   meets a file's bounding box;
3. each task's files are exactly the files whose bounding box meets its buffered core;
4. ids and order are deterministic: the same input plans the same tiles, in (ymin, xmin)
   order, with unique ids.

Coordinates are generated on a quarter grid and sizes, buffers and origins too, so that boxes
and points fall exactly on tile edges, where a closed core or a forgotten buffer shows.
"""

from __future__ import annotations

import itertools
import math
import shutil
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

import laspy
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opals_dsl.api import compile_file
from opals_dsl.errors import PipelineError
from opals_dsl.lang.tiles import MAX_TILES, Box, HeaderError, TooManyTiles, plan_tiles, read_box
from opals_dsl.plan import model

EXAMPLES_DATA = Path(__file__).resolve().parents[1] / "examples" / "data"

QUARTER = st.integers(-60, 60).map(lambda k: k / 4)
SIZES = st.sampled_from([0.5, 1, 2.5, 3, 10, 12.75, 40])
BUFFERS = st.sampled_from([0, 0.25, 1, 2.5, 7])
HALF = st.integers(-8, 8).map(lambda k: k / 2)
ORIGINS = st.tuples(HALF, HALF)


@dataclass(frozen=True)
class Core:
    """A planned tile as the properties see it: core, buffer, files, id."""

    id: str
    xmin: float
    ymin: float
    xmax: float
    ymax: float
    buffer: float
    files: tuple[str, ...]

    def holds(self, x: float, y: float) -> bool:
        return self.xmin <= x < self.xmax and self.ymin <= y < self.ymax

    def meets(self, b: Box, grow: float = 0) -> bool:
        """Does the core, grown by ``grow`` (half-open), meet the closed box?"""
        return (b.xmin < self.xmax + grow and b.xmax >= self.xmin - grow
                and b.ymin < self.ymax + grow and b.ymax >= self.ymin - grow)


@st.composite
def boxes(draw, max_files: int = 6) -> list[Box]:
    out = []
    for k in range(draw(st.integers(1, max_files))):
        x0, x1 = sorted((draw(QUARTER), draw(QUARTER)))
        y0, y1 = sorted((draw(QUARTER), draw(QUARTER)))
        out.append(Box(f"data/f{k}.las", x0, y0, x1, y1))
    return out


def points_of(b: Box, extra: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points of a box: its corners, the middles of its edges, and ``extra`` moved inside."""
    xs, ys = (b.xmin, (b.xmin + b.xmax) / 2, b.xmax), (b.ymin, (b.ymin + b.ymax) / 2, b.ymax)
    inside = [(min(max(x, b.xmin), b.xmax), min(max(y, b.ymin), b.ymax)) for x, y in extra]
    return list(itertools.product(xs, ys)) + inside


def assert_properties(cores: list[Core], files: list[Box], points: dict[str, list],
                      size: float, buffer: float, origin: tuple[float, float]) -> None:
    x0, y0, x1, y1 = (np.array([getattr(c, a) for c in cores], dtype=float)
                      for a in ("xmin", "ymin", "xmax", "ymax"))
    # (1) cores disjoint, aligned to the origin, side S
    for c in cores:
        assert math.isclose(c.xmax - c.xmin, size) and math.isclose(c.ymax - c.ymin, size), c
        for edge, o in ((c.xmin, origin[0]), (c.ymin, origin[1])):
            k = (edge - o) / size
            assert math.isclose(k, round(k), abs_tol=1e-9), (c, "not on the origin's grid")
        assert c.buffer == buffer
    for k, c in enumerate(cores):
        overlap = (c.xmin < x1) & (x0 < c.xmax) & (c.ymin < y1) & (y0 < c.ymax)
        assert np.flatnonzero(overlap).tolist() == [k], f"the core of {c.id} overlaps others"
    # (2) every point in exactly one task's core; no task without a file's box in its core
    for path, pts in points.items():
        for x, y in pts:
            holders = np.flatnonzero((x0 <= x) & (x < x1) & (y0 <= y) & (y < y1))
            assert len(holders) == 1, (
                f"point ({x}, {y}) of {path} is in tiles {[cores[h].id for h in holders]}")
    for c in cores:
        assert any(c.meets(b) for b in files), f"tile {c.id} meets no file's box"
    # (3) a task's files: exactly those whose box meets its buffered core, in the given order
    for c in cores:
        expected = tuple(b.path for b in files if c.meets(b, buffer))
        assert c.files == expected, (c.id, c.files, expected)
    # (4) ordered by (ymin, xmin), ids unique
    assert [(c.ymin, c.xmin) for c in cores] == sorted((c.ymin, c.xmin) for c in cores)
    assert len({c.id for c in cores}) == len(cores)


def cores_of(tiles) -> list[Core]:
    return [Core(t.id, t.xmin, t.ymin, t.xmax, t.ymax, t.buffer, t.files) for t in tiles]


# -- generated bounding boxes --------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(files=boxes(), size=SIZES, buffer=BUFFERS, origin=ORIGINS,
       extra=st.lists(st.tuples(QUARTER, QUARTER), max_size=8))
def test_generated_boxes_give_disjoint_aligned_cores_holding_each_point_once_with_buffered_files(
    files: list[Box], size: float, buffer: float, origin: tuple[float, float],
    extra: list[tuple[float, float]],
) -> None:
    """Properties (1)-(4) over generated boxes: see the module docstring."""
    tiles = plan_tiles(files, size, buffer, origin)
    points = {b.path: points_of(b, extra) for b in files}
    assert_properties(cores_of(tiles), files, points, size, buffer, origin)
    # (4) the same boxes plan the same tiles, ids and files
    assert plan_tiles(list(files), size, buffer, origin) == tiles


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(files=boxes(max_files=3), size=st.floats(0.5, 1000),
       buffer=st.floats(0, 100), ox=st.floats(-1e4, 1e4), oy=st.floats(-1e4, 1e4),
       shift=st.floats(-1e6, 1e6))
def test_float_grids_still_hold_each_box_corner_in_exactly_one_core(
    files: list[Box], size: float, buffer: float, ox: float, oy: float, shift: float
) -> None:
    """Properties (1)-(3) where sizes and origins are arbitrary floats and the boxes far from
    the origin: a neighbour's edge is the same number, so rounding makes no gap or overlap."""
    moved = [Box(b.path, b.xmin + shift, b.ymin - shift, b.xmax + shift, b.ymax - shift)
             for b in files]
    tiles = plan_tiles(moved, size, buffer, (ox, oy))
    points = {b.path: points_of(b, []) for b in moved}
    cores = cores_of(tiles)
    for path, pts in points.items():
        for x, y in pts:
            assert len([c for c in cores if c.holds(x, y)]) == 1, (path, x, y)
    for c in cores:
        assert any(c.meets(b) for b in moved)
        assert c.files == tuple(b.path for b in moved if c.meets(b, buffer))
    for a, b in itertools.combinations(cores, 2):
        assert a.xmax <= b.xmin or b.xmax <= a.xmin or a.ymax <= b.ymin or b.ymax <= a.ymin


def test_files_without_points_make_no_tile_and_join_no_tile() -> None:
    full = Box("a.las", 0, 0, 5, 5)
    empty = Box("b.las", 0, 0, 0, 0, points=0)  # laspy writes a zero box for no points
    tiles = plan_tiles([full, empty], 10, 20)
    assert [t.files for t in tiles] == [("a.las",)]


def test_more_tiles_than_the_limit_are_counted_not_listed() -> None:
    # two boxes overlapping by half: the count is of the tiles of both, once each
    a, b = Box("a.las", 0, 0, 99.5, 99.5), Box("b.las", 50, 50, 149.5, 149.5)
    with pytest.raises(TooManyTiles) as caught:
        plan_tiles([a, b], 1, limit=17_499)
    assert caught.value.count == 100 * 100 * 2 - 50 * 50
    assert len(plan_tiles([a, b], 1, limit=17_500)) == 17_500
    assert MAX_TILES == 1_000_000


# -- small LAS files, planned by opf compile -----------------------------------------------

PIPELINE = textwrap.dedent("""\
    param size = {size!r}
    param b = {buffer!r}
    job dem for tile in tiles("data/*.las", size = size, buffer = b, origin = [{ox!r}, {oy!r}]) {{
        step grid {{
            out dem = "{{tile.id}}.txt"
            run python -c pass {{tile.xmin}} {{tile.ymin}} {{tile.xmax}} {{tile.ymax}} \\
                {{tile.buffer}} {{tile.id}} {{dem}} {{tile.files}}
        }}
    }}
""")


def write_las(path: Path, xy: list[tuple[float, float]]) -> None:
    header = laspy.LasHeader(point_format=3, version="1.2")
    header.scales = np.array([0.25, 0.25, 0.01])  # quarter coordinates are stored exactly
    header.offsets = np.array([0.0, 0.0, 0.0])
    las = laspy.LasData(header)
    las.x = np.array([p[0] for p in xy])
    las.y = np.array([p[1] for p in xy])
    las.z = np.zeros(len(xy))
    las.write(path)


def planned_tiles(pipeline: Path) -> list[Core]:
    """The tiles of a compiled plan, from its exec nodes' commands and its stages' files."""
    g = compile_file(pipeline)
    cores = []
    for chain in model.tasks(g).tasks:
        stage = model.node(g, chain.task_stage)
        (exec_id,) = chain.execs
        argv = model.node(g, exec_id).argv
        x0, y0, x1, y1, buffer = (float(v) for v in argv[3:8])
        assert argv[8] == chain.task  # {tile.id} is the task id
        staged = dict((local, src) for src, local in stage.files)
        files = tuple(staged[local] for local in argv[10:])
        cores.append(Core(chain.task, x0, y0, x1, y1, buffer, files))
    return cores


LAS_POINTS = st.lists(st.tuples(QUARTER, QUARTER), min_size=1, max_size=12)


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clouds=st.lists(LAS_POINTS, min_size=1, max_size=4), size=SIZES, buffer=BUFFERS,
       origin=ORIGINS)
def test_las_files_give_disjoint_aligned_cores_holding_each_point_once_with_buffered_files(
    clouds: list[list[tuple[float, float]]], size: float, buffer: float,
    origin: tuple[float, float],
) -> None:
    """Properties (1)-(4) over LAS files written with laspy, planned by ``opf compile``: every
    point laspy reads back lies in exactly one task's core, and the staged files are those
    whose header box meets the buffered core."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "data").mkdir()
        for k, xy in enumerate(clouds):
            write_las(folder / "data" / f"c{k:02d}.las", xy)
        pipeline = folder / "tiles.opf"
        pipeline.write_text(PIPELINE.format(size=size, buffer=buffer, ox=origin[0],
                                            oy=origin[1]), encoding="utf-8")
        cores = planned_tiles(pipeline)
        files, points = [], {}
        for path in sorted((folder / "data").glob("*.las")):
            rel = f"data/{path.name}"
            files.append(read_box(str(path), rel))
            las = laspy.read(path)
            points[rel] = list(zip(np.asarray(las.x), np.asarray(las.y), strict=True))
        assert_properties(cores, files, points, size, buffer, origin)
        assert planned_tiles(pipeline) == cores  # (4): compiled again, the same tiles


def test_the_header_reader_reads_no_point(tmp_path: Path) -> None:
    """A LAZ file whose compressed points are garbage still has its box read: no point is read
    (laspy cannot read one of them)."""
    path = tmp_path / "big.laz"
    write_las(path, [(0.0, 0.0), (10.0, 20.0)] * 1000)
    header_end = laspy.open(path).header.offset_to_point_data
    data = path.read_bytes()
    path.write_bytes(data[:header_end] + b"\xff" * (len(data) - header_end))
    with pytest.raises(Exception):  # noqa: B017 - lazrs and laspy raise errors of many kinds
        laspy.read(path)
    box = read_box(str(path))
    assert (box.xmin, box.ymin, box.xmax, box.ymax, box.points) == (0, 0, 10, 20, 2000)


def test_a_las_file_cut_short_in_its_points_is_refused_by_its_size(tmp_path: Path) -> None:
    """A LAS file (points not compressed) shorter than its header's point count needs is cut
    short: said with both counts, without reading a point."""
    path = tmp_path / "cut.las"
    write_las(path, [(0.0, 0.0), (10.0, 20.0)] * 1000)
    header = laspy.open(path).header
    keep = header.offset_to_point_data + 1500 * header.point_format.size + 7
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(HeaderError) as err:
        read_box(str(path))
    assert err.value.reason == "is cut short: its header says 2000 points, the file holds 1500"


# -- a tile's values in commands -----------------------------------------------------------

@pytest.mark.parametrize(("wkt", "code"), [
    ('PROJCS["NAD83(HARN) / Oregon GIC Lambert (ft)",GEOGCS["NAD83(HARN)",'
     'AUTHORITY["EPSG","4152"]],UNIT["foot",0.3048,AUTHORITY["EPSG","9002"]],'
     'AUTHORITY["EPSG","2994"]]', "EPSG:2994"),
    ('PROJCRS["WGS 84 / UTM zone 33N",BASEGEOGCRS["WGS 84",ID["EPSG",4326]],'
     'ID["EPSG",32633]]', "EPSG:32633"),
    # only ids of what is inside (its unit, its datum): the CRS itself has no code
    ('PROJCS["NAD_1983_HARN_Lambert_Conformal_Conic",GEOGCS["GCS",AUTHORITY["EPSG","4152"]],'
     'UNIT["foot",0.3048,AUTHORITY["EPSG","9002"]]]', None),
    # an id-like text inside a quoted name is a name, not an id
    ('PROJCS["a ""b"" ,AUTHORITY[""EPSG"",""1""]",UNIT["m",1]]', None),
])
def test_a_wkt_crs_is_named_by_its_own_epsg_code_never_by_one_inside_it(wkt: str,
                                                                         code: str | None):
    """Invariant: the EPSG code shown for a WKT CRS is the id of the CRS itself (a child of the
    outermost element), not the id of its unit or datum, nor text inside a quoted name."""
    from opals_dsl.lang.tiles import _wkt_epsg
    assert _wkt_epsg(wkt) == code


def test_files_whose_crs_records_differ_but_name_one_crs_share_a_grid(tmp_path: Path):
    """An ESRI WKT of Oregon's Lambert projection (autzen_trim.laz's record) and the EPSG keys of
    EPSG:2994 name one CRS: one grid takes both. EPSG:2994 and EPSG:6557 (the same projection
    on another datum realisation) stay two CRSs, and an error."""
    import pyproj

    folder = tmp_path / "p"
    (folder / "data").mkdir(parents=True)
    shutil.copy(EXAMPLES_DATA / "autzen_trim.laz", folder / "data" / "autzen_trim.laz")

    def keyed(name: str, epsg: int) -> None:
        header = laspy.LasHeader(point_format=3, version="1.2")
        header.scales, header.offsets = np.array([0.01] * 3), np.zeros(3)
        header.add_crs(pyproj.CRS.from_epsg(epsg))
        las = laspy.LasData(header)
        las.x, las.y, las.z = [636100.0, 636200.0], [849100.0, 849200.0], [1.0, 2.0]
        las.write(folder / "data" / name)

    keyed("strip.las", 2994)
    path = folder / "p.opf"
    path.write_text('job dem for tile in tiles("data/*.la[sz]", size = 500) {\n'
                    '    step grid {\n        out dem = "{tile.id}.txt"\n'
                    '        run python -c pass {tile.files} {dem}\n    }\n}\n')
    tiles = model.tasks(compile_file(path)).tasks
    assert len(tiles) > 1
    keyed("other.las", 6557)
    with pytest.raises(PipelineError) as err:
        compile_file(path)
    assert ("are in different coordinate reference systems ('NAD_1983_HARN_Lambert_Conformal"
            "_Conic' and EPSG:6557)") in str(err.value)


def test_a_tiles_files_are_staged_and_given_to_run_sh_and_call_one_item_each(tmp_path: Path):
    (tmp_path / "data").mkdir()
    write_las(tmp_path / "data" / "a.las", [(0.0, 0.0), (8.0, 8.0)])  # 1 short of 10_0's buffer
    write_las(tmp_path / "data" / "b.las", [(10.5, 0.0), (19.0, 9.0)])
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "qc.py").write_text("def f(**kw):\n    pass\n", encoding="utf-8")
    (tmp_path / "p.opf").write_text(textwrap.dedent("""\
        job dem for tile in tiles("data/*.las", size = 10, buffer = 1) {
            output "out/{tile.id}"
            step count {
                out n = "n.txt"
                run sh "cat {tile.files} | wc -c > {n}"
            }
            step check {
                out r = "r.json"
                in tile.files
                call tools.qc:f(files = tile.files, xmin = tile.xmin, id = tile.id, out = r)
            }
        }
    """), encoding="utf-8")
    g = compile_file(tmp_path / "p.opf")
    chains = model.tasks(g).tasks
    assert [c.task for c in chains] == ["0_0", "10_0"]
    for chain, files in zip(chains, [["a.las", "b.las"], ["b.las"]], strict=True):
        staged = model.node(g, chain.task_stage).files
        assert [list(f) for f in staged] == [[f"data/{f}", f] for f in files]
        count, check = (model.node(g, e) for e in chain.execs)
        params = " ".join(f'"${k + 1}"' for k in range(len(files)))
        assert list(count.argv) == ["/bin/sh", "-c", f'cat {params} | wc -c > "${len(files) + 1}"',
                                    "sh", *files, "n.txt"]
        assert check.call.kwargs == {"files": files, "xmin": int(chain.task.split("_")[0]),
                                     "id": chain.task, "out": "r.json"}


def test_two_files_of_one_name_for_one_tile_are_an_error(tmp_path: Path):
    for folder in ("north", "south"):
        (tmp_path / folder).mkdir()
        write_las(tmp_path / folder / "strip.las", [(0.0, 0.0), (5.0, 5.0)])
    (tmp_path / "p.opf").write_text(textwrap.dedent("""\
        job dem for tile in tiles("*/strip.las", size = 100) {
            step grid {
                out dem = "{tile.id}.tif"
                run grid {tile.files} {dem}
            }
        }
    """), encoding="utf-8")
    with pytest.raises(PipelineError) as caught:
        compile_file(tmp_path / "p.opf")
    assert ("tile '0_0' reads two files named 'strip.las' ('north/strip.las' and "
            "'south/strip.las')") in str(caught.value)
