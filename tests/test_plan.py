"""The planner, by example: node ids, task ids, local paths, destinations, edges, commands,
sources, ``--param`` overrides and the mistakes only the planner can see.

Every test writes a real pipeline folder and compiles it with :func:`compile_file`, the same
call ``opf compile`` makes; the ``run sh`` test runs the planned script with ``/bin/sh``.
"""

from __future__ import annotations

import gc
import glob
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path, PurePosixPath

import networkx as nx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opals_dsl.api import compile_file
from opals_dsl.errors import PipelineError, PlanError
from opals_dsl.lang.expand import glob_files as _glob_files
from opals_dsl.lang.expand import path_attr as _attr
from opals_dsl.lang.expand import safe_id, task_ids
from opals_dsl.plan.graph import to_json, write_json


def write(folder: Path, files: dict[str, str]) -> None:
    for rel, content in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")


def plan_of(
    folder: Path, text: str, files: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
) -> nx.DiGraph:
    write(folder, files or {})
    (folder / "p.opf").write_text(textwrap.dedent(text), encoding="utf-8")
    return compile_file(folder / "p.opf", params or {})


def error_of(
    folder: Path, text: str, files: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
) -> PipelineError:
    with pytest.raises(PipelineError) as info:
        plan_of(folder, text, files, params)
    return info.value


def tasks(g: nx.DiGraph, job: str) -> list[str]:
    stages = [a for _, a in g.nodes(data=True) if a["kind"] == "stage" and a["job"] == job
              and a["scope"] == "task"]
    return [a["task"] for a in sorted(stages, key=lambda a: a["index"])]


STRIPS = {f"data/{s}.xyz": f"{s}\n" for s in ("strip11", "strip12", "strip21")} | {
    "cfg/grid.cfg": "cell 1\n",
    "tools/lidar.py": "print()\n",
}

STRIPS_OPF = """\
    pipeline dems
    param cell = 1.0
    job dem for strip in "data/strip*.xyz" {
        shared cfg = "cfg/grid.cfg"
        shared tool = "tools/lidar.py"
        step import {
            out odm = "{strip.stem}.odm"
            run python {tool} import {strip} {odm}
        }
        step grid {
            out dem = "{strip.stem}_dem.asc"
            run python {tool} grid --config {cfg} --cell {cell} {import.odm} {dem}
        }
    }
    job mosaic {
        shared tool = "tools/lidar.py"
        output "results" flat
        step merge {
            out mosaic = "mosaic.asc"
            run python {tool} mosaic -o {mosaic} {dem.grid.dem}
        }
    }
"""


# -- node ids and the chain ----------------------------------------------------------------


def test_node_ids_and_the_task_chain(tmp_path: Path) -> None:
    g = plan_of(tmp_path, STRIPS_OPF, STRIPS)
    assert list(g.nodes) == [
        "stage:dem",
        "stage:dem/strip11", "exec:dem/strip11/import", "exec:dem/strip11/grid",
        "copyback:dem/strip11",
        "stage:dem/strip12", "exec:dem/strip12/import", "exec:dem/strip12/grid",
        "copyback:dem/strip12",
        "stage:dem/strip21", "exec:dem/strip21/import", "exec:dem/strip21/grid",
        "copyback:dem/strip21",
        "stage:mosaic", "stage:mosaic/0", "exec:mosaic/0/merge", "copyback:mosaic/0",
    ]
    assert list(g.successors("stage:dem/strip12")) == ["exec:dem/strip12/import"]
    assert list(g.successors("exec:dem/strip12/import")) == ["exec:dem/strip12/grid"]
    assert list(g.successors("exec:dem/strip12/grid")) == ["copyback:dem/strip12"]
    assert set(g.predecessors("stage:mosaic/0")) == {
        "stage:mosaic", "copyback:dem/strip11", "copyback:dem/strip12", "copyback:dem/strip21"
    }
    a = g.nodes["exec:dem/strip12/grid"]
    assert (a["kind"], a["job"], a["task"], a["step"], a["index"]) == (
        "exec", "dem", "strip12", "grid", 1
    )
    assert a["affinity"] == ("dem", "strip12")
    assert g.nodes["stage:dem"]["affinity"] is None and g.nodes["stage:dem"]["task"] is None
    assert g.graph["pipeline"] == "dems" and g.graph["jobs"] == ["dem", "mosaic"]
    assert g.graph["params"] == {"cell": 1.0} and g.graph["root"] == str(tmp_path.resolve())
    assert g.graph["source"] == "p.opf"


def test_the_plan_is_an_ordinary_networkx_graph(tmp_path: Path) -> None:
    """Nodes and edges are written into the graph directly: it must behave like one built
    with add_node/add_edge."""
    g = plan_of(tmp_path, STRIPS_OPF, STRIPS)
    rebuilt = nx.DiGraph()
    rebuilt.graph.update(g.graph)
    for nid, attrs in g.nodes(data=True):
        rebuilt.add_node(nid, **attrs)
    rebuilt.add_edges_from(g.edges(data=True))
    assert nx.utils.graphs_equal(g, rebuilt)
    assert list(nx.topological_sort(g))[0] == "stage:dem"
    copy = g.copy()
    copy.remove_node("exec:dem/strip11/grid")
    assert "exec:dem/strip11/grid" in g and g.number_of_edges() == rebuilt.number_of_edges()
    assert g.in_degree("copyback:dem/strip11") == 1
    assert nx.node_link_graph(nx.node_link_data(g, edges="edges"), edges="edges").edges == g.edges


# -- task ids ------------------------------------------------------------------------------


def test_task_ids_are_made_safe_and_prefixed_on_a_clash() -> None:
    assert safe_id("a b/c$(x);é") == "a_b_c__x___"
    assert safe_id("strip.11-x_y") == "strip.11-x_y"
    assert safe_id(".") == "_" and safe_id("..") == "__" and safe_id("") == "_"
    assert task_ids(["b", "a"]) == ["b", "a"]
    assert task_ids(["A", "a", "c"]) == ["0-A", "1-a", "2-c"]
    assert task_ids(["a b", "a_b"]) == ["0-a_b", "1-a_b"]
    labels = [f"x{k}" for k in range(10)] + ["X0"]
    assert task_ids(labels)[:2] == ["00-x0", "01-x1"] and task_ids(labels)[-1] == "10-X0"


def test_task_ids_in_a_plan(tmp_path: Path) -> None:
    files = {"d/Strip1.las": "", "d/strip1.xyz": "", "d/b 2.xyz": ""}
    g = plan_of(tmp_path, """\
        job one {
            step s {
                run prog
            }
        }
        job files for f in "d/*" {
            step s {
                out o = "{task.id}.out"
                run prog {f} {o}
            }
        }
        job values for v in ["a/b", "$(rm -rf)", "ok"] {
            step s {
                run prog {v}
            }
        }
        job numbers for i in range(-1, 2) {
            step s {
                run prog {i}
            }
        }
    """, files)
    assert tasks(g, "one") == ["0"]
    # sorted by code point: "b 2.xyz" < "Strip1.las"? no: 'S' (83) < 'b' (98)
    assert tasks(g, "files") == ["0-Strip1", "1-b_2", "2-strip1"]
    assert tasks(g, "values") == ["a_b", "__rm_-rf_", "ok"]
    assert tasks(g, "numbers") == ["-1", "0", "1"]
    cb = g.nodes["copyback:files/1-b_2"]["files"]
    assert cb == [["1-b_2.out", "results/files/s/1-b_2.out"]]


def test_a_task_over_upstream_outputs_keeps_the_upstream_task_id(tmp_path: Path) -> None:
    """Every campaign writes density.txt: the downstream tasks are named after the campaigns,
    not numbered in front of the file's stem ('0-density')."""
    g = plan_of(tmp_path, """\
        job camp for c in ["2019", "2023 spring"] {
            output "results/{task.id}"
            step density {
                out report = "density.txt"
                run prog {c} {report}
            }
        }
        job summary for r in camp.density.report {
            output "summaries" flat
            step sum {
                out s = "{task.id}.csv"
                run prog {r} {s}
            }
        }
    """)
    assert tasks(g, "camp") == ["2019", "2023_spring"]
    assert tasks(g, "summary") == ["2019", "2023_spring"]
    assert set(g.predecessors("stage:summary/2023_spring")) == {
        "stage:summary", "copyback:camp/2023_spring"}
    assert g.nodes["copyback:summary/2019"]["files"] == [["2019.csv", "summaries/2019.csv"]]


# -- local paths and destinations ------------------------------------------------------------


def test_local_paths_shared_inputs_and_gathers(tmp_path: Path) -> None:
    files = STRIPS | {"aux/strip11.prj": "", "aux/strip12.prj": "", "aux/strip21.prj": ""}
    text = STRIPS_OPF.replace(
        "run python {tool} import {strip} {odm}",
        'in "aux/{strip.stem}.prj"\n            run python {tool} import {strip} {odm}',
    )
    g = plan_of(tmp_path, text, files)
    assert g.nodes["stage:dem"]["files"] == [
        ["cfg/grid.cfg", "grid.cfg"], ["tools/lidar.py", "lidar.py"]
    ]
    assert g.nodes["stage:dem/strip12"]["files"] == [
        ["data/strip12.xyz", "strip12.xyz"], ["aux/strip12.prj", "strip12.prj"]
    ]
    imp = g.nodes["exec:dem/strip12/import"]
    assert imp["argv"] == ["python", "../lidar.py", "import", "strip12.xyz", "strip12.odm"]
    assert imp["inputs"] == ["../lidar.py", "strip12.xyz", "strip12.prj"]
    assert imp["outputs"] == ["strip12.odm"] and imp["temp"] == []
    grid = g.nodes["exec:dem/strip12/grid"]
    assert grid["argv"] == [
        "python", "../lidar.py", "grid", "--config", "../grid.cfg", "--cell", "1.0",
        "strip12.odm", "strip12_dem.asc",
    ]
    assert grid["inputs"] == ["../lidar.py", "../grid.cfg", "strip12.odm"]
    merge = g.nodes["exec:mosaic/0/merge"]
    gathered = [f"dem/{s}/{s}_dem.asc" for s in ("strip11", "strip12", "strip21")]
    assert merge["argv"] == ["python", "../lidar.py", "mosaic", "-o", "mosaic.asc", *gathered]
    assert g.nodes["stage:mosaic/0"]["files"] == [
        [f"results/dem/grid/{s}_dem.asc", f"dem/{s}/{s}_dem.asc"]
        for s in ("strip11", "strip12", "strip21")
    ]


def test_flat_by_step_default_and_per_task_destinations(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    (tmp_path / "p").mkdir()
    g = plan_of(tmp_path / "p", f"""\
        param out = "res"
        job default for x in ["a"] {{
            step one {{
                out o = "{{x}}.1"
                out t = "{{x}}.tmp" temp
                run prog {{o}} {{t}}
            }}
            step two {{
                out o = "sub/{{x}}.2"
                run prog {{one.t}} {{o}}
            }}
        }}
        job flat for x in ["a"] {{
            output "{{out}}/flat" flat
            step one {{
                out o = "{{x}}.f1"
                run prog {{o}}
            }}
            step two {{
                out o = "sub/{{x}}.f2"
                run prog {{o}}
            }}
        }}
        job bystep for x in ["a"] {{
            output "{{out}}" by step
            step one {{
                out o = "{{x}}.b"
                run prog {{o}}
            }}
        }}
        job pertask for x in ["a", "b"] {{
            output "per/{{task.id}}/{{job.name}}" flat
            step one {{
                out o = "same.txt"
                run prog {{o}}
            }}
        }}
        job away for x in ["a"] {{
            output "{outside}" flat
            step one {{
                out o = "{{x}}.far"
                run prog {{o}}
            }}
        }}
        job up for x in ["a"] {{
            output "../up" flat
            step one {{
                out o = "{{x}}.up"
                run prog {{o}}
            }}
        }}
    """)
    files = {j: g.nodes[f"copyback:{j}/a"]["files"]
             for j in ("default", "flat", "bystep", "pertask", "away", "up")}
    assert files["default"] == [["a.1", "results/default/one/a.1"],
                                ["sub/a.2", "results/default/two/sub/a.2"]]
    assert files["flat"] == [["a.f1", "res/flat/a.f1"], ["sub/a.f2", "res/flat/sub/a.f2"]]
    assert files["bystep"] == [["a.b", "res/one/a.b"]]
    assert files["pertask"] == [["same.txt", "per/a/pertask/same.txt"]]
    assert g.nodes["copyback:pertask/b"]["files"] == [["same.txt", "per/b/pertask/same.txt"]]
    assert files["away"] == [["a.far", f"{outside}/a.far"]]
    assert files["up"] == [["a.up", f"{tmp_path.resolve()}/up/a.up"]]
    # temp outputs: declared, never copied back
    one = g.nodes["exec:default/a/one"]
    assert one["outputs"] == ["a.1", "a.tmp"] and one["temp"] == ["a.tmp"]
    assert g.nodes["exec:default/a/two"]["inputs"] == ["a.tmp"]


def test_an_output_name_starting_with_two_dots_stays_in_the_task_folder(tmp_path: Path) -> None:
    g = plan_of(tmp_path, """\
        job j for x in ["..a"] {
            output "..results" flat
            step s {
                out o = "{x}.out"
                run prog {o}
            }
        }
    """)
    assert g.nodes["copyback:j/..a"]["files"] == [["..a.out", "..results/..a.out"]]


# -- edges: map and gather -----------------------------------------------------------------


def test_map_waits_for_one_upstream_task_and_gather_for_all(tmp_path: Path) -> None:
    g = plan_of(tmp_path, """\
        job shade for dem in dem.grid.dem {
            step hill {
                out shade = "{dem.stem}_shade.asc"
                run prog {dem} {shade}
            }
        }
        job dem for x in range(3) {
            step grid {
                out dem = "t{x}.asc"
                run prog {dem}
            }
        }
        job all {
            step merge {
                out m = "m.asc"
                run prog {m} {shade.hill.shade}
            }
        }
    """)
    for k in range(3):
        stage = f"stage:shade/{k}"
        assert set(g.predecessors(stage)) == {"stage:shade", f"copyback:dem/{k}"}
        assert g.nodes[stage]["files"] == [[f"results/dem/grid/t{k}.asc", f"t{k}.asc"]]
        assert g.nodes[f"exec:shade/{k}/hill"]["argv"] == ["prog", f"t{k}.asc",
                                                           f"t{k}_shade.asc"]
    assert set(g.predecessors("stage:all/0")) == {
        "stage:all", "copyback:shade/0", "copyback:shade/1", "copyback:shade/2"
    }
    assert tasks(g, "shade") == ["0", "1", "2"]  # the ids of the dem tasks
    # a job written before its upstream is planned after it
    assert list(g.nodes).index("stage:dem") < list(g.nodes).index("stage:shade")


def test_a_map_that_also_gathers_gets_each_edge_once(tmp_path: Path) -> None:
    g = plan_of(tmp_path, """\
        job up for x in range(2) {
            step s {
                out o = "u{x}.txt"
                run prog {o}
            }
        }
        job down for f in up.s.o {
            step s {
                out o = "{f.stem}.d"
                run prog {f} {up.s.o} {o}
            }
        }
    """)
    assert sorted(g.predecessors("stage:down/1")) == [
        "copyback:up/0", "copyback:up/1", "stage:down"
    ]
    assert g.nodes["stage:down/1"]["files"] == [
        ["results/up/s/u1.txt", "u1.txt"],
        ["results/up/s/u0.txt", "up/0/u0.txt"],
        ["results/up/s/u1.txt", "up/1/u1.txt"],
    ]


# -- commands ------------------------------------------------------------------------------


NASTY = ["a b", "x;echo INJECTED", "$(echo INJECTED)", "it's", '"q"', "`id`", "-n", "*"]


def test_run_sh_quotes_every_value_so_nothing_can_inject(tmp_path: Path) -> None:
    values = ", ".join('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in NASTY)
    g = plan_of(tmp_path, f"""\
        job up for v in [{values}] {{
            step s {{
                out o = "{{task.id}}.txt"
                run prog {{o}}
            }}
        }}
        job j for v in [{values}] {{
            step s {{
                run sh "printf '%s\\n' {{v}} {{up.s.o}} | cat"
            }}
        }}
    """)
    ids = tasks(g, "up")
    for tid, value in zip(tasks(g, "j"), NASTY, strict=True):
        argv = g.nodes[f"exec:j/{tid}/s"]["argv"]
        assert argv[:2] == ["/bin/sh", "-c"]
        out = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=tmp_path)
        # one line per value: nothing ran but printf, no value was split or expanded
        assert out.stdout.splitlines() == [value] + [f"up/{i}/{i}.txt" for i in ids]


def test_a_task_file_starting_with_a_dash_goes_as_dot_slash_so_it_is_no_option(
    tmp_path: Path,
) -> None:
    g = plan_of(tmp_path, """\
        job j for x in "data/*.txt" {
            step s {
                out o = "{x.stem}.out"
                run cp {x} {o} {x}.bak --in={x} pre{o} {x.name}
            }
            step t {
                out u = "{x.stem}.u"
                run sh "cat {x} {s.o} > {u}; echo {x}.bak --in={x} >> {u}"
            }
        }
        job k for v in ["-n"] {
            step s {
                run echo {v}
            }
        }
    """, {"data/-n.txt": "x\n"})
    tid = tasks(g, "j")[0]
    s = g.nodes[f"exec:j/{tid}/s"]
    # at the start of a word: ./; inside a word no option can start; an attribute is a text
    assert s["argv"] == ["cp", "./-n.txt", "./-n.out", "./-n.txt.bak", "--in=-n.txt",
                         "pre-n.out", "-n.txt"]
    assert s["inputs"] == ["-n.txt"] and s["outputs"] == ["-n.out"]
    assert g.nodes[f"stage:j/{tid}"]["files"] == [["data/-n.txt", "-n.txt"]]
    t = g.nodes[f"exec:j/{tid}/t"]["argv"]
    assert t[2] == 'cat "$1" "$2" > "$3"; echo "$1".bak --in="$4" >> "$3"'
    assert t[4:] == ["./-n.txt", "./-n.out", "./-n.u", "-n.txt"]
    # a value is not a file: it goes as it is
    assert g.nodes[f"exec:k/{tasks(g, 'k')[0]}/s"]["argv"] == ["echo", "-n"]


def test_run_words_are_never_split(tmp_path: Path) -> None:
    g = plan_of(tmp_path, """\
        param names = ["a b", "c"]
        job j for v in ["x y;z"] {
            step s {
                run prog {v} pre{v}post {names} "{v}" > out.txt
            }
        }
    """)
    assert g.nodes["exec:j/x_y_z/s"]["argv"] == [
        "prog", "x y;z", "prex y;zpost", "a b", "c", "x y;z", ">", "out.txt"
    ]


def test_call_kwargs_keep_their_types(tmp_path: Path) -> None:
    g = plan_of(tmp_path, """\
        param n = 3
        param f = 0.5
        param b = true
        param txt = "text"
        param l = [1, 2]
        job up for x in ["u1", "u2"] {
            step s {
                out o = "{x}.txt"
                run prog {o}
            }
        }
        job j for i in range(2) {
            shared cfg = "c.cfg"
            step s {
                out o = "{i}.out"
                call tools.mod:fn(i = i, n = n, f = f, b = b, s = txt, l = l, cfg = cfg, o = o,
                                  up = up.s.o, id = task.id, lit = [1, "a"], t = false,
                                  stem = cfg.stem)
            }
        }
    """, {"c.cfg": ""})
    call = g.nodes["exec:j/1/s"]["call"]
    assert g.nodes["exec:j/1/s"]["argv"] is None
    assert call["function"] == "tools.mod:fn"
    assert call["kwargs"] == {
        "i": 1, "n": 3, "f": 0.5, "b": True, "s": "text", "l": [1, 2], "cfg": "../c.cfg",
        "o": "1.out", "up": ["up/u1/u1.txt", "up/u2/u2.txt"], "id": "1", "lit": [1, "a"],
        "t": False, "stem": "c",
    }
    assert [type(v) for v in call["kwargs"].values()][:6] == [int, int, float, bool, str, list]
    assert g.nodes["exec:j/1/s"]["inputs"] == ["../c.cfg", "up/u1/u1.txt", "up/u2/u2.txt"]


def test_values_and_attributes_in_templates(tmp_path: Path) -> None:
    g = plan_of(tmp_path, """\
        pipeline pipe
        param cell = 0.25
        param big = 10000000000
        param flag = false
        param path = "a/b.tar.gz"
        job j for f in "d/x.y.las" {
            step s {
                out o = "{f.stem}-{task.id}.out"
                run prog {cell} {big} {flag} {path.stem} {path.suffix} {path.parent} \\
                    {f.name} {f.parent} {f.suffix} {job.name} {pipeline.name} {o.stem}
            }
        }
    """, {"d/x.y.las": ""})
    assert g.nodes["exec:j/x.y/s"]["argv"] == [
        "prog", "0.25", "10000000000", "false", "b.tar", ".gz", "a", "x.y.las", "d", ".las",
        "j", "pipe", "x.y-x.y",
    ]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab./_ ", max_size=10))
def test_path_attributes_match_pathlib(path: str) -> None:
    p = PurePosixPath(path)
    assert _attr(path, "name") == p.name
    assert _attr(path, "stem") == p.stem
    assert _attr(path, "suffix") == p.suffix
    assert _attr(path, "parent") == str(p.parent)


# -- sources -------------------------------------------------------------------------------


def test_lines_source(tmp_path: Path) -> None:
    text = "\ufeffalpha\r\n\r\n  # a comment\r\n  beta gamma  \r\n#x\r\n\tdelta\r\n"
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "tiles.txt").write_bytes(text.encode("utf-8"))
    g = plan_of(tmp_path, """\
        param list = "lists/tiles.txt"
        job j for t in lines("{list}") {
            step s {
                run prog {t}
            }
        }
    """)
    assert tasks(g, "j") == ["alpha", "beta_gamma", "delta"]
    assert g.nodes["exec:j/beta_gamma/s"]["argv"] == ["prog", "beta gamma"]
    assert g.nodes["stage:j/alpha"]["files"] == []


def test_range_with_params_and_overrides(tmp_path: Path) -> None:
    text = """\
        param first = 2
        param last = 5
        job a for i in range(first, last) {
            step s {
                run prog {i}
            }
        }
        job b for i in range(last) {
            step s {
                run prog {i}
            }
        }
    """
    g = plan_of(tmp_path, text)
    assert tasks(g, "a") == ["2", "3", "4"] and tasks(g, "b") == ["0", "1", "2", "3", "4"]
    g = plan_of(tmp_path, text, params={"first": "-1", "last": "1"})
    assert tasks(g, "a") == ["-1", "0"] and tasks(g, "b") == ["0"]
    assert g.graph["params"] == {"first": -1, "last": 1}
    err = error_of(tmp_path, text, params={"last": "0"})
    assert isinstance(err, PlanError) and "range(0) is empty" in err.render()


def test_param_overrides_of_every_type(tmp_path: Path) -> None:
    text = """\
        param i = 1
        param f = 1.5
        param b = false
        param s = "x"
        param l = ["a", "b"]
        param n = [1, 2]
        job j {
            step run {
                run prog {i} {f} {b} {s} {l} {n}
            }
        }
    """
    g = plan_of(tmp_path, text)
    assert g.nodes["exec:j/0/run"]["argv"] == [
        "prog", "1", "1.5", "false", "x", "a", "b", "1", "2"
    ]
    g = plan_of(tmp_path, text, params={"i": "7", "f": "2", "b": "true", "s": "y z",
                                         "l": "p, q,r", "n": "5"})
    assert g.nodes["exec:j/0/run"]["argv"] == [
        "prog", "7", "2.0", "true", "y z", "p", "q", "r", "5"
    ]
    assert g.graph["params"] == {"i": 7, "f": 2.0, "b": True, "s": "y z", "l": ["p", "q", "r"],
                                 "n": [5]}
    for bad in ({"i": "1.5"}, {"f": "x"}, {"b": "yes"}, {"n": "a"}, {"nope": "1"}):
        err = error_of(tmp_path, text, params=bad)
        assert err.first.span is None, bad
        assert f"--param {next(iter(bad))}=" in err.first.message, (bad, err.first.message)


def test_param_override_on_the_command_line(tmp_path: Path) -> None:
    write(tmp_path, STRIPS)
    (tmp_path / "p.opf").write_text(textwrap.dedent(STRIPS_OPF), encoding="utf-8")
    cmd = [sys.executable, "-m", "opals_dsl", "compile", "p.opf", "--json"]
    out = subprocess.run([*cmd, "--param", "cell=0.5"], cwd=tmp_path, capture_output=True,
                         text=True, check=True)
    nodes = {nd["id"]: nd for nd in json.loads(out.stdout)["nodes"]}
    assert nodes["exec:dem/strip11/grid"]["argv"][6] == "0.5"
    bad = subprocess.run([*cmd, "--param", "cell=fine"], cwd=tmp_path, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and bad.stdout == ""
    assert "--param cell=fine" in bad.stderr and "Traceback" not in bad.stderr


def test_fast_glob_matches_the_glob_module(tmp_path: Path) -> None:
    write(tmp_path, {n: "" for n in (
        "d/a.xyz", "d/b.xyz", "d/.hidden.xyz", "d/c.XYZ", "d/[x].xyz", "d/e f.xyz",
        "d/sub/g.xyz", "d/dir.xyz/inner.xyz", "top.xyz",
    )})
    os.symlink(tmp_path / "d" / "a.xyz", tmp_path / "d" / "link.xyz")
    os.symlink(tmp_path / "d" / "missing", tmp_path / "d" / "broken.xyz")
    patterns = ["d/*.xyz", "d/?.xyz", "d/[ab].xyz", "d/.*", "d/*", "*.xyz", "d/**/*.xyz",
                "d/*/*.xyz", "nowhere/*.xyz", "d/[[]x].xyz", f"{tmp_path}/d/*.xyz", "/*",
                f"{tmp_path}//d/*.xyz", "d//*.xyz", "./d/*.xyz"]
    for pattern in patterns:
        expected = [
            f for f in glob.glob(pattern, root_dir=None if pattern.startswith("/") else tmp_path,
                                 recursive=True)
            if os.path.isfile(os.path.join(tmp_path, f))
        ]
        assert sorted(_glob_files(pattern, str(tmp_path))) == sorted(expected), pattern
    assert sorted(_glob_files("d/*.xyz", str(tmp_path))) == [
        "d/[x].xyz", "d/a.xyz", "d/b.xyz", "d/e f.xyz", "d/link.xyz"
    ]


# -- JSON ----------------------------------------------------------------------------------


def test_streamed_json_is_networkx_node_link_json(tmp_path: Path) -> None:
    g = plan_of(tmp_path, STRIPS_OPF.replace("param cell = 1.0", 'param cell = "1 ünit"'),
                STRIPS)
    expected = json.dumps(nx.node_link_data(g, edges="edges"), separators=(",", ":"),
                          ensure_ascii=False) + "\n"
    assert to_json(g) == expected
    # any graph: edge attributes, non-ASCII ids, more nodes than one batch
    h = nx.DiGraph(name="x")
    h.add_nodes_from((f"n{k}é", {"v": k}) for k in range(300))
    h.add_edge("n1é", "n2é", w=1.5)
    h.add_edge("n2é", "n3é")
    expected = json.dumps(nx.node_link_data(h, edges="edges"), separators=(",", ":"),
                          ensure_ascii=False) + "\n"
    assert to_json(h) == expected
    with open(tmp_path / "out.json", "w", encoding="utf-8") as fh:
        write_json(h, fh)
    assert (tmp_path / "out.json").read_text(encoding="utf-8") == expected
    assert gc.isenabled()


# -- what only the planner can see ---------------------------------------------------------


def _lines(err: PipelineError) -> list[int]:
    return [d.span.line if d.span else 0 for d in err.diagnostics]


def test_a_constant_output_name_in_a_job_with_many_tasks(tmp_path: Path) -> None:
    err = error_of(tmp_path, STRIPS_OPF.replace('"{strip.stem}_dem.asc"', '"dem.asc"'), STRIPS)
    assert isinstance(err, PlanError)
    assert _lines(err) == [11]  # every task collides alike: reported once, at the out line
    assert "tasks 'strip11' and 'strip12' of job 'dem' would both copy output 'dem' back to " \
        "'results/dem/grid/dem.asc'" in err.diagnostics[0].message
    assert '"{strip.stem}.asc"' in err.diagnostics[0].message


@pytest.mark.parametrize(
    ("source", "hint"),
    [
        ("range(3)", '"{i}.txt"'),
        ('["a", "b"]', '"{i}.txt"'),
        ('lines("list.txt")', '"{i}.txt"'),
        ('"data/*.xyz"', '"{i.stem}.txt"'),
        ('["a", "A"]', '"{task.id}.txt"'),  # the values tell the tasks apart only by case
        ('lines("paths.txt")', '"{task.id}.txt"'),  # a value with '/' is no file name
    ],
)
def test_a_clash_hint_names_what_tells_the_tasks_apart(
    tmp_path: Path, source: str, hint: str
) -> None:
    err = error_of(tmp_path, f"""\
        job j for i in {source} {{
            step s {{
                out o = "same.txt"
                run prog {{o}}
            }}
        }}
    """, {"list.txt": "north\nsouth\n", "paths.txt": "a/x\nb/x\n", "data/a.xyz": "",
          "data/b.xyz": ""})
    assert f"make the name differ per task, e.g. {hint}" in err.diagnostics[0].message


def test_an_input_that_is_no_file_is_called_what_it_is(tmp_path: Path) -> None:
    (tmp_path / "data" / "folder.xyz").mkdir(parents=True)
    (tmp_path / "data" / "real.xyz").write_text("1 2 3\n")
    (tmp_path / "data" / "gone.prj").symlink_to("missing.prj")
    (tmp_path / "data" / "list").mkdir()
    err = error_of(tmp_path, """\
        job a for f in "data/folder.xyz" {
            step s {
                run prog {f}
            }
        }
        job b for f in "data/real.xyz" {
            shared cfg = "data"
            step s {
                in "data/gone.prj"
                run prog {f} {cfg}
            }
        }
        job c for v in lines("data/list") {
            step s {
                run prog {v}
            }
        }
    """)
    assert [d.message for d in err.diagnostics] == [
        "the input file 'data/folder.xyz' is a folder, not a file",
        "the shared file 'data' is a folder, not a file",
        "the input file 'data/gone.prj' is a symbolic link to 'missing.prj', "
        "which does not exist",
        "the list file 'data/list' is a folder, not a file",
    ]


def test_two_jobs_copying_back_to_one_file(tmp_path: Path) -> None:
    err = error_of(tmp_path, """\
        job a {
            output "res" flat
            step s {
                out o = "x.txt"
                run prog {o}
            }
        }
        job b {
            output "res" flat
            step t {
                out p = "x.txt"
                run prog {p}
            }
        }
    """)
    assert _lines(err) == [11]
    assert "output 'p' of task '0' (job 'b') would be copied back to 'res/x.txt', where " \
        "output 'o' of task '0' (job 'a') goes too" in err.first.message


def test_two_outputs_of_a_task_with_one_local_name(tmp_path: Path) -> None:
    err = error_of(tmp_path, """\
        job a {
            step s {
                out o = "x.txt"
                run prog {o}
            }
            step t {
                out p = "x.txt" temp
                run prog {p}
            }
        }
    """)
    assert isinstance(err, PlanError) and _lines(err) == [7]
    assert "outputs 's.o' and 't.p' are both the file 'x.txt'" in err.first.message


def test_an_output_overwriting_an_input_of_its_task(tmp_path: Path) -> None:
    err = error_of(tmp_path, """\
        job a for f in "d/*.txt" {
            step s {
                out o = "{f.name}"
                run prog {f} {o}
            }
        }
    """, {"d/x.txt": ""})
    assert "the input 'x.txt' would be overwritten by an output" in err.first.message


def test_reading_a_file_that_another_task_copies_back_without_waiting(tmp_path: Path) -> None:
    # a glob that matches the outputs of an earlier run of another job
    files = {"data/a.xyz": "", "data/a_out.xyz": ""}
    err = error_of(tmp_path, """\
        job make for f in "data/a.xyz" {
            output "data" flat
            step s {
                out o = "{f.stem}_out.xyz"
                run prog {f} {o}
            }
        }
        job use for f in "data/*_out.xyz" {
            step s {
                run prog {f}
            }
        }
    """, files)
    assert isinstance(err, PlanError) and _lines(err) == [8]
    assert "the input 'data/a_out.xyz' of task 'a_out' is where output 'o' of task 'a' (job " \
        "'make') is copied back, but nothing makes this task wait for it; name the output " \
        "as {make.s.o}" in err.first.message
    # an `in` file, named as its destination, read by a job planned first
    err = error_of(tmp_path, """\
        job use {
            step s {
                in "results/make/s/out.txt"
                run prog
            }
        }
        job make {
            step s {
                out o = "out.txt"
                run prog {o}
            }
        }
    """, {"results/make/s/out.txt": ""})
    assert _lines(err) == [9]
    assert "a file that task '0' of job 'use' reads as an input" in err.first.message
    # a job's own outputs copied back over its inputs
    err = error_of(tmp_path, """\
        job j for f in "data/*.xyz" {
            output "data" flat
            step s {
                out o = "{f.stem}.out"
                run prog {f} {o}
            }
        }
        job k for f in "data/*.out" {
            output "data" flat
            step s {
                out o = "{f.name}"
                run prog {f} {o}
            }
        }
    """, files | {"data/b.out": ""})
    assert _lines(err) == [8, 11]
    assert "in task 'b' the input 'b.out' would be overwritten" in err.diagnostics[0].message
    assert "output 'o' of task 'b' (job 'k') would be copied back to 'data/b.out', a file that " \
        "task 'b' of job 'k' reads as an input" in err.diagnostics[1].message
    # naming the output makes it fine
    g = plan_of(tmp_path, """\
        job make {
            step s {
                out o = "out.txt"
                run prog {o}
            }
        }
        job use {
            step s {
                in "results/make/s/out.txt"
                run prog {make.s.o}
            }
        }
    """)
    assert "copyback:make/0" in g.predecessors("stage:use/0")


def test_missing_files_and_clashing_local_names(tmp_path: Path) -> None:
    err = error_of(tmp_path, """\
        job j for f in "data/*.xyz" {
            shared a = "cfg/grid.cfg"
            shared b = "other/grid.cfg"
            shared c = "cfg/none.cfg"
            step s {
                in "aux/{f.stem}.prj", "aux2/{f.stem}.prj"
                run prog {f}
            }
        }
        job k for f in "nothing/*.xyz" {
            step s {
                run prog {f}
            }
        }
        job m for x in lines("none.txt") {
            step s {
                run prog {x}
            }
        }
    """, {"data/a.xyz": "", "cfg/grid.cfg": "", "other/grid.cfg": "", "aux/a.prj": "",
          "aux2/a.prj": ""})
    assert isinstance(err, PlanError)
    shown = {(d.span.line, d.message.split(";")[0].split(",")[0]) for d in err.diagnostics}
    assert shown == {
        (3, "shared files 'a' and 'b' have the same file name 'grid.cfg'"),
        (4, "the shared file 'cfg/none.cfg' does not exist"),
        (6, "in task 'a' two inputs have the file name 'a.prj' ('aux/a.prj' and 'aux2/a.prj')"),
        (10, "the pattern 'nothing/*.xyz' matches no file (in " + str(tmp_path.resolve())
         + ")"),
        (15, "the list file 'none.txt' does not exist"),
    }


def test_the_collector_runs_again_after_planning(tmp_path: Path) -> None:
    assert gc.isenabled()
    error_of(tmp_path, 'job j for f in "none/*" {\n step s {\n run x\n }\n}\n')
    assert gc.isenabled()
    plan_of(tmp_path, STRIPS_OPF, STRIPS)
    assert gc.isenabled()


def test_every_task_of_a_gathering_job_may_read_the_gathered_destination(tmp_path: Path) -> None:
    """A task that gathers a job's outputs waits for their copy-backs, so naming one of their
    destinations as an `in` file is no race — for its last task as for its first."""
    text = """
        job a {
            output "results" flat
            step s {
                out x = "x.txt"
                run prog {x}
            }
        }
        job b for v in ["1", "2", "3"] {
            output "out/{v}" flat
            step s {
                out y = "y.txt"
                in "results/x.txt"
                run prog {a.s.x} {y}
            }
        }
    """
    g = plan_of(tmp_path, text, {"results/x.txt": "x"})
    for task in ("1", "2", "3"):
        assert g.has_edge("copyback:a/0", f"stage:b/{task}")
        assert ["results/x.txt", "x.txt"] in g.nodes[f"stage:b/{task}"]["files"]
