"""Property tests of the planner: random valid pipelines, compiled, checked against the plan's
invariants (one test per invariant), and random broken pipelines, rejected at the right line.

A hypothesis strategy draws a *model* of a pipeline — jobs over globs, lists, ``range``,
``lines()`` files or another job's outputs, or without ``for``; shared files used by several
jobs; steps with temp and published outputs, ``in`` files and names, and ``run``, ``run sh`` and
``call`` actions that mention the loop value, shared files, earlier outputs, gathers of other
jobs, params and ``task.id``; flat, by-step and per-task output folders — renders it as ``.opf``
text with the files it needs, and compiles it in a fresh temporary folder. Jobs form a DAG in
the order they are drawn but are written in a shuffled order, so planning order is exercised.

Words that name files always end in one of :data:`FILE_EXTS`, and values never do, so the tests
can tell which words of a command are files without asking the planner.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shlex
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import networkx as nx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from opals_dsl.api import compile_file
from opals_dsl.cli import main as opf_main
from opals_dsl.errors import OpfCheckError, PipelineError, PlanError
from opals_dsl.plan.dot import to_dot
from opals_dsl.plan.graph import to_json as plan_json

FILE_EXTS = (".xyz", ".cfg", ".py", ".out", ".tmp", ".prj")
SETTINGS = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# shared files: distinct base names, so any subset can be staged together
SHARED_POOL = {
    "cfg": "cfg/grid.cfg",
    "tool": "tools/lidar.py",
    "norm": "cfg/normals.cfg",
    "helper": "tools/sub/helper.py",
}
# the loop variable, params and shared names never meet step or output names (see below)
PARAMS = {
    "cell": ("0.5", "0.25"),
    "label": ('"dem"', "mosaic"),
    "flag": ("true", "false"),
    "nums": ("[1, 2]", None),
    "results": ('"results"', None),
    "datadir": ('"data"', None),
}
STEP_NAMES = ["s0", "s1", "s2", "import", "flat", "temp"]
OUT_NAMES = ["o0", "o1", "in", "out"]
VALUE_CHARS = "abcXYZ019 _-.;$()&|*'"


def is_file_word(word: str) -> bool:
    return word.endswith(FILE_EXTS)


# ---------------------------------------------------------------------------------------------
# the model


@dataclass
class OutM:
    name: str
    template: str
    temp: bool
    line: int = 0


@dataclass
class StepM:
    name: str
    outs: list[OutM]
    action: str  # run | sh | call
    uses: list[tuple]  # what the command mentions
    ins: list[tuple]  # what `in` lines name
    lines: dict[str, int] = field(default_factory=dict)


@dataclass
class JobM:
    name: str
    index: int  # position in the DAG order (dependencies point to lower indices)
    var: str | None
    source: tuple  # ("none",) | ("glob", pattern, files) | ("list", values) | ...
    n_tasks: int
    shared: list[str]
    output: tuple | None  # (folder, flat) or None for the default
    retries: int | None
    steps: list[StepM]
    lines: dict[str, int] = field(default_factory=dict)

    @property
    def var_is_file(self) -> bool:
        return self.source[0] in ("glob", "map")

    def published(self) -> list[tuple[str, str]]:
        return [(s.name, o.name) for s in self.steps for o in s.outs if not o.temp]


@dataclass
class PipelineM:
    name: str | None
    params: list[str]
    jobs: list[JobM]  # in DAG order
    written: list[int]  # written order: indices into jobs
    overrides: dict[str, str]
    files: dict[str, str]
    text: str = ""

    def job(self, name: str) -> JobM:
        return next(j for j in self.jobs if j.name == name)


def _ref_text(use: tuple, var: str | None) -> str:
    kind = use[0]
    if kind in ("var", "value"):
        return var
    if kind == "attr":
        return f"{var}.{use[1]}"
    if kind in ("shared", "own", "param"):
        return use[1]
    if kind == "prev":
        return f"{use[1]}.{use[2]}"
    if kind == "gather":
        return f"{use[1]}.{use[2]}.{use[3]}"
    if kind == "taskid":
        return "task.id"
    raise AssertionError(use)


def _run_word(use: tuple, var: str | None, k: int) -> str:
    ref = "{" + _ref_text(use, var) + "}"
    kind = use[0]
    if kind in ("attr", "taskid"):
        return f"--w{k}={ref}+"  # a text, never taken for a file name
    if kind in ("shared", "param") and use[1] != "nums" and k % 2:
        return f"--w{k}={ref}"
    return ref


def render(p: PipelineM) -> str:
    """The pipeline as .opf text; records the line of every job, out, `in` and command."""
    lines: list[str] = []

    def add(text: str) -> int:
        lines.append(text)
        return len(lines)

    add("# generated pipeline")
    if p.name:
        add(f"pipeline {p.name}")
    for name in p.params:
        add(f"param {name} = {PARAMS[name][0]}")
    for ji in p.written:
        j = p.jobs[ji]
        add("")
        src = j.source
        head = f"job {j.name}"
        if src[0] == "glob":
            head += f' for {j.var} in "{src[1]}"'
        elif src[0] == "list":
            head += f" for {j.var} in [" + ", ".join(f'"{v}"' for v in src[1]) + "]"
        elif src[0] == "range":
            head += f" for {j.var} in range({', '.join(map(str, src[1]))})"
        elif src[0] == "lines":
            head += f' for {j.var} in lines("{src[1]}")'
        elif src[0] == "map":
            head += f" for {j.var} in {src[1]}.{src[2]}.{src[3]}"
        j.lines["job"] = add(head + " {")
        for s in j.shared:
            add(f'    shared {s} = "{SHARED_POOL[s]}"')
        if j.output is not None:
            folder, flat = j.output
            add(f'    output "{folder}"' + (" flat" if flat else (" by step" if ji % 2 else "")))
        if j.retries is not None:
            add(f"    retries {j.retries}")
        for st_ in j.steps:
            st_.lines["step"] = add(f"    step {st_.name} {{")
            for o in st_.outs:
                o.line = add(f'        out {o.name} = "{o.template}"' + (" temp" if o.temp else ""))
            for k, item in enumerate(st_.ins):
                if item[0] == "prj":
                    text = f'"aux/{{{j.var}.stem}}.prj"'
                else:
                    text = _ref_text(item, j.var)
                st_.lines[f"in{k}"] = add(f"        in {text}")
            st_.lines["action"] = add("        " + _action(j, st_))
            add("    }")
        add("}")
    return "\n".join(lines) + "\n"


def _action(j: JobM, s: StepM) -> str:
    if s.action == "call":
        kws = [f"k{k} = {_ref_text(u, j.var)}" for k, u in enumerate(s.uses)]
        kws.append('lit = "text"')
        return f"call tools.mod:fn({', '.join(kws)})"
    words = [_run_word(u, j.var, k) for k, u in enumerate(s.uses)]
    if s.action == "sh":
        return 'run sh "echo start && cat ' + " ".join(words) + ' | wc -l"'
    prog = ["python", "{tool}"] if "tool" in j.shared else ["prog"]
    return "run " + " ".join(prog + words)


# ---------------------------------------------------------------------------------------------
# the strategy

_values = st.text(alphabet=VALUE_CHARS, min_size=1, max_size=6).map(str.strip).filter(
    lambda v: v and not v.startswith("#") and not is_file_word(v)
)
_stems = st.sampled_from(["a1", "A1", "b2", "strip11", "strip12", "t_3", "x-y", "n.1", "c"])


@st.composite
def pipelines(draw: st.DrawFn) -> PipelineM:
    files: dict[str, str] = {name: f"{name}\n" for name in SHARED_POOL.values()}
    n_jobs = draw(st.integers(1, 4))
    params = sorted(draw(st.sets(st.sampled_from(sorted(PARAMS)))))
    jobs: list[JobM] = []
    for ji in range(n_jobs):
        name = f"j{ji}"
        var = draw(st.sampled_from(["x", "strip"]))
        upstream = [(u.name, s, o) for u in jobs for s, o in u.published()]
        kinds = ["none", "glob", "list", "range", "lines"] + (["map"] * 2 if upstream else [])
        kind = draw(st.sampled_from(kinds))
        unique_stems = False  # may the loop value's stem name outputs?
        if kind == "none":
            source, n_tasks, var = ("none",), 1, None
        elif kind == "glob":
            stems = draw(st.lists(_stems, min_size=1, max_size=4, unique=True))
            nested = draw(st.booleans()) and len(stems) > 1
            nested_clash = False
            paths = []
            for k, stem in enumerate(stems):
                sub = "deep/" if nested and k % 2 else ""
                paths.append(f"data/{name}/{sub}{stem}.xyz")
                files[f"aux/{stem}.prj"] = "prj\n"
            if nested and draw(st.booleans()):
                # the same stem in two folders: ids clash and get an index prefix
                paths.append(f"data/{name}/other/{stems[0]}.xyz")
                nested_clash = True
            for path in paths:
                files[path] = "1 2 3\n"
            unique_stems = not nested_clash and len(set(stems)) == len(stems)
            base = "{datadir}" if "datadir" in params else "data"
            if len(paths) == 1 and draw(st.booleans()):
                pattern = f"{base}/{name}/{stems[0]}.xyz"
            elif nested:
                pattern = f"{base}/{name}/**/*.xyz"
            else:
                pattern = f"{base}/{name}/*.xyz"
            source, n_tasks = ("glob", pattern, sorted(paths)), len(paths)
        elif kind == "list":
            values = draw(st.lists(_values, min_size=1, max_size=4))
            source, n_tasks = ("list", values), len(values)
        elif kind == "range":
            a = draw(st.integers(-2, 3))
            b = a + draw(st.integers(1, 4))
            args = (b - a,) if draw(st.booleans()) else (a, b)
            source, n_tasks = ("range", args), len(range(*args))
        elif kind == "lines":
            values = draw(st.lists(_values, min_size=1, max_size=4))
            body = []
            for v in values:
                body.append(v)
                body.extend(draw(st.sampled_from([[], [""], ["# a comment"], ["  "]])))
            files[f"lists/{name}.txt"] = "\n".join(body) + "\n"
            source, n_tasks = ("lines", f"lists/{name}.txt"), len(values)
        else:
            up, s, o = draw(st.sampled_from(upstream))
            upj = next(j for j in jobs if j.name == up)
            source, n_tasks = ("map", up, s, o), upj.n_tasks
            # the upstream files' stems differ per task only if their names do
            template = next(
                x.template for y in upj.steps for x in y.outs if (y.name, x.name) == (s, o)
            )
            unique_stems = "{" in template or upj.n_tasks == 1

        shared = draw(st.lists(st.sampled_from(sorted(SHARED_POOL)), max_size=3, unique=True))
        folder_kind = draw(st.sampled_from(["default", "results", "common", "per_task"]))
        output = {
            "default": None,
            "results": ("{results}" if "results" in params else "results", None),
            "common": ("common", True),
            "per_task": ("per_task/{task.id}", None),
        }[folder_kind]
        if output is not None and output[1] is None:
            output = (output[0], draw(st.booleans()))
        per_task_folder = folder_kind == "per_task"
        retries = draw(st.one_of(st.none(), st.integers(0, 3)))

        n_steps = draw(st.integers(1, 3))
        step_names = draw(
            st.lists(st.sampled_from(STEP_NAMES), min_size=n_steps, max_size=n_steps, unique=True)
        )
        steps: list[StepM] = []
        for sname in step_names:
            outs = []
            for oname in draw(st.lists(st.sampled_from(OUT_NAMES), max_size=2, unique=True)):
                temp = draw(st.booleans()) and draw(st.booleans())
                suffix = f"{name}_{sname}_{oname}" + (".tmp" if temp else ".out")
                sub = "sub/" if draw(st.booleans()) else ""
                if temp or n_tasks == 1 or per_task_folder:
                    prefix = draw(st.sampled_from(["", "{task.id}_"]))
                else:
                    choices = ["{task.id}_"]
                    if unique_stems:
                        choices.append(f"{{{var}.stem}}_")
                    if kind == "range":
                        choices.append(f"r{{{var}}}_")
                    prefix = draw(st.sampled_from(choices))
                if prefix == "{task.id}_" and n_tasks == 1 and var is None:
                    prefix = draw(st.sampled_from(["", "{task.id}_"]))
                outs.append(OutM(oname, sub + prefix + suffix, temp))
            pool: list[tuple] = []
            if var is not None:
                pool.append(("var",) if kind in ("glob", "map") else ("value",))
                pool.append(("attr", draw(st.sampled_from(["stem", "name", "suffix", "parent"]))))
            pool += [("shared", s) for s in shared]
            pool += [("own", o.name) for o in outs]
            pool += [("prev", p.name, o.name) for p in steps for o in p.outs]
            pool += [("gather", u, s, o) for u, s, o in upstream]
            pool += [("param", p) for p in params]
            pool.append(("taskid",))
            action = draw(st.sampled_from(["run", "run", "sh", "call"]))
            if action == "call":
                # a call passes a file's name or suffix as a text that looks like a file
                pool = [u for u in pool if u[0] != "attr" or u[1] in ("stem", "parent")]
            uses = draw(st.lists(st.sampled_from(pool), max_size=6, unique=True))
            in_pool: list[tuple] = [("shared", s) for s in shared]
            in_pool += [("prev", p.name, o.name) for p in steps for o in p.outs]
            in_pool += [("gather", u, s, o) for u, s, o in upstream]
            if kind == "glob":
                in_pool.append(("prj",))
            ins = [] if not in_pool else draw(
                st.lists(st.sampled_from(in_pool), max_size=2, unique=True))
            steps.append(StepM(sname, outs, action, uses, ins))
        jobs.append(
            JobM(name, ji, var, source, n_tasks, shared, output, retries, steps)
        )
    written = draw(st.permutations(range(n_jobs)))
    overrides = {}
    for p in params:
        if PARAMS[p][1] is not None and draw(st.booleans()):
            overrides[p] = PARAMS[p][1]
    name = draw(st.sampled_from([None, "gen", "my_pipe"]))
    model = PipelineM(name, params, jobs, list(written), overrides, files)
    model.text = render(model)
    return model


def write(model: PipelineM, folder: Path, text: str | None = None) -> Path:
    for rel, content in model.files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
    opf = folder / "gen.opf"
    opf.write_text(text if text is not None else model.text, encoding="utf-8")
    return opf


def compile_model(model: PipelineM) -> nx.DiGraph:
    with tempfile.TemporaryDirectory() as tmp:
        opf = write(model, Path(tmp))
        try:
            return compile_file(opf, model.overrides)
        except PipelineError as exc:  # show the pipeline with the error
            raise AssertionError(f"{exc.render()}\n\n{model.text}") from None


# ---------------------------------------------------------------------------------------------
# helpers over a plan


def tasks_of(g: nx.DiGraph) -> dict[tuple[str, str], dict]:
    """(job, task) -> {"stage": id, "execs": [ids by index], "copyback": id}."""
    out: dict[tuple[str, str], dict] = {}
    for nid, a in g.nodes(data=True):
        if a["task"] is None:
            continue
        t = out.setdefault((a["job"], a["task"]), {"execs": []})
        if a["kind"] == "stage":
            t["stage"] = nid
        elif a["kind"] == "exec":
            t["execs"].append(nid)
        else:
            t["copyback"] = nid
    for t in out.values():
        t["execs"].sort(key=lambda nid: g.nodes[nid]["index"])
    return out


def check_shape_against_model(g: nx.DiGraph, model: PipelineM) -> None:
    """The plan has the tasks and steps the model asks for (so the invariants are not vacuous)."""
    tasks = tasks_of(g)
    for j in model.jobs:
        mine = [k for k in tasks if k[0] == j.name]
        assert len(mine) == j.n_tasks, (j.name, mine)
        for key in mine:
            steps = [g.nodes[e]["step"] for e in tasks[key]["execs"]]
            assert steps == [s.name for s in j.steps]


# ---------------------------------------------------------------------------------------------
# the six invariants

KINDS = {("stage", "machine"), ("stage", "task"), ("exec", None), ("copyback", None)}


@SETTINGS
@given(pipelines())
def test_invariant_1_plan_is_acyclic_with_known_kinds(model: PipelineM) -> None:
    g = compile_model(model)
    assert nx.is_directed_acyclic_graph(g)
    for nid, a in g.nodes(data=True):
        kind = (a["kind"], a.get("scope") if a["kind"] == "stage" else None)
        assert kind in KINDS, (nid, kind)
        if kind == ("stage", "machine"):
            assert nid == f"stage:{a['job']}" and a["task"] is None
        elif kind == ("stage", "task"):
            assert nid == f"stage:{a['job']}/{a['task']}"
        elif kind == ("exec", None):
            assert nid == f"exec:{a['job']}/{a['task']}/{a['step']}"
        else:
            assert nid == f"copyback:{a['job']}/{a['task']}"
    assert {a["job"] for _, a in g.nodes(data=True)} == {j.name for j in model.jobs}
    check_shape_against_model(g, model)


@SETTINGS
@given(pipelines())
def test_invariant_2_each_task_is_the_chain(model: PipelineM) -> None:
    g = compile_model(model)
    check_shape_against_model(g, model)
    for (job, _task), t in tasks_of(g).items():
        machine = f"stage:{job}"
        chain = [machine, t["stage"], *t["execs"], t["copyback"]]
        for u, v in zip(chain, chain[1:], strict=False):
            assert g.has_edge(u, v), (u, v)
        # nothing else enters or leaves the inner links of the chain
        for prev, node in zip(chain[1:], chain[2:], strict=False):
            assert list(g.predecessors(node)) == [prev], node
        for node in chain[1:-1]:
            succ = list(g.successors(node))
            assert succ == [chain[chain.index(node) + 1]], node
        # the task stage waits for its machine stage and for other jobs' copybacks only
        for u in g.predecessors(t["stage"]):
            a = g.nodes[u]
            assert u == machine or (a["kind"] == "copyback" and a["job"] != job), u
        # a copyback lets only other jobs' task stages wait for it
        for v in g.successors(t["copyback"]):
            a = g.nodes[v]
            assert a["kind"] == "stage" and a["scope"] == "task" and a["job"] != job, v
    for nid, a in g.nodes(data=True):
        if a["kind"] == "stage" and a["scope"] == "machine":
            assert list(g.predecessors(nid)) == []
            assert {g.nodes[v]["job"] for v in g.successors(nid)} <= {a["job"]}
            assert all(g.nodes[v]["scope"] == "task" for v in g.successors(nid))


def _file_words(a: dict) -> list[str]:
    """Words of an exec node's command that name files (by their extension); a ``run sh``
    script's values follow it (``/bin/sh -c SCRIPT sh VALUE...``), and a file whose name starts
    with '-' is written ``./-name``."""
    if a["argv"] is not None:
        argv = a["argv"]
        if argv[:2] == ["/bin/sh", "-c"]:
            values = argv[4:]
            script = re.sub(r'"\$(\d)"|"\$\{(\d+)\}"',
                            lambda m: shlex.quote(values[int(m[1] or m[2]) - 1]), argv[2])
            words = shlex.split(script)
        else:
            words = argv[1:]
    else:
        words = []
        for v in a["call"]["kwargs"].values():
            words.extend(v if isinstance(v, list) else [v])
    found = []
    for w in words:
        if isinstance(w, str):
            w = w.split("=")[-1]
            w = w[2:] if w.startswith("./-") else w
            if is_file_word(w):
                found.append(w)
    return found


@SETTINGS
@given(pipelines())
def test_invariant_3_exec_inputs_are_staged_or_written_earlier(model: PipelineM) -> None:
    g = compile_model(model)
    check_shape_against_model(g, model)
    for (job, _task), t in tasks_of(g).items():
        shared = {"../" + name for _, name in g.nodes[f"stage:{job}"]["files"]}
        staged = {local for _, local in g.nodes[t["stage"]]["files"]}
        written: set[str] = set()
        jm = model.job(job)
        for k, e in enumerate(t["execs"]):
            a = g.nodes[e]
            for f in a["inputs"]:
                assert f in shared or f in staged or f in written, (e, f, shared, staged, written)
            # every file the command names is one it reads or one it writes
            for w in _file_words(a):
                assert w in a["inputs"] or w in a["outputs"], (e, w, a["inputs"])
            # every `in` file and name is read
            sm = jm.steps[k]
            prj = [f for f in a["inputs"] if f.endswith(".prj")]
            assert len(prj) == (1 if ("prj",) in sm.ins else 0), (e, a["inputs"])
            n_shared = len(
                {u[1] for u in sm.uses + sm.ins if u[0] == "shared"}
                | ({"tool"} if sm.action == "run" and "tool" in jm.shared else set())
            )
            assert len([f for f in a["inputs"] if f.startswith("../")]) == n_shared
            written.update(a["outputs"])


def _loop_files(g: nx.DiGraph, model: PipelineM, jm: JobM) -> list[str]:
    """The file of each task's loop value, in task order, as the model says: the glob's
    matches in sorted order, or task i of the upstream job's copy of the output mapped over."""
    if jm.source[0] == "glob":
        return list(jm.source[2])
    if jm.source[0] != "map":
        return []
    _, up, step, out = jm.source
    upm = model.job(up)
    k = [o.name for o in next(s for s in upm.steps if s.name == step).outs].index(out)
    files = []
    ups = sorted((t for key, t in tasks_of(g).items() if key[0] == up),
                 key=lambda t: g.nodes[t["stage"]]["index"])
    for t in ups:
        local = g.nodes[t["execs"][[s.name for s in upm.steps].index(step)]]["outputs"][k]
        files.append(dict(g.nodes[t["copyback"]]["files"])[local])
    return files


def _published(g: nx.DiGraph, model: PipelineM, up: str, step: str, out: str) -> set[tuple]:
    """(local name in a gathering task, destination) of every task's copy of an output."""
    upm = model.job(up)
    k = [o.name for o in next(s for s in upm.steps if s.name == step).outs].index(out)
    found = set()
    for (job, task), t in tasks_of(g).items():
        if job == up:
            local = g.nodes[t["execs"][[s.name for s in upm.steps].index(step)]]["outputs"][k]
            dest = dict(g.nodes[t["copyback"]]["files"])[local]
            found.add((f"{up}/{task}/{posixpath.basename(dest)}", dest))
    return found


@pytest.mark.slow
@SETTINGS
@given(pipelines())
def test_exec_commands_name_only_files_of_their_own_task(model: PipelineM) -> None:
    """Invariant 3 over values, not only structure: every file a step's command names is its
    own task's — its loop value's file (the one the model gives this task's index), its `in`
    sidecar, its job's shared files, the outputs of its own earlier steps, or the published
    copies of a job it gathers — and is staged from the source the model says."""
    g = compile_model(model)
    check_shape_against_model(g, model)
    for (job, _task), t in tasks_of(g).items():
        jm = model.job(job)
        index = g.nodes[t["stage"]]["index"]
        loop = _loop_files(g, model, jm)
        mine: set[tuple] = set()  # (local, source) this task may stage
        if loop:
            mine.add((posixpath.basename(loop[index]), loop[index]))
            if jm.source[0] == "glob":
                stem = posixpath.splitext(posixpath.basename(loop[index]))[0]
                mine.add((f"{stem}.prj", f"aux/{stem}.prj"))
        for s in jm.steps:
            for use in s.uses + s.ins:
                if use[0] == "gather":
                    mine |= _published(g, model, *use[1:])
        shared = {posixpath.basename(SHARED_POOL[name]): SHARED_POOL[name] for name in jm.shared}
        staged = {local: src for src, local in g.nodes[t["stage"]]["files"]}
        machine = {name: src for src, name in g.nodes[f"stage:{job}"]["files"]}
        written: set[str] = set()
        for e in t["execs"]:
            a = g.nodes[e]
            for w in _file_words(a):
                if w in a["outputs"] or w in written:
                    continue
                if w.startswith("../"):
                    name = w[3:]
                    assert machine.get(name) == shared.get(name) is not None, (e, w, machine)
                    continue
                src = staged.get(w)
                assert src is not None, (e, w, staged)
                assert (w, src) in mine, (e, w, src, mine)
            written.update(a["outputs"])


@SETTINGS
@given(pipelines())
def test_invariant_4_copyback_copies_every_published_output_once(model: PipelineM) -> None:
    """Each published output is copied back exactly once, to a destination of its own, and
    no destination is the folder of another (a path is a file or a folder, not both)."""
    g = compile_model(model)
    check_shape_against_model(g, model)
    destinations: list[str] = []
    for (job, _task), t in tasks_of(g).items():
        execs = [g.nodes[e] for e in t["execs"]]
        written = {o for a in execs for o in a["outputs"]}
        published = [o for a in execs for o in a["outputs"] if o not in a["temp"]]
        temps = {o for a in execs for o in a["temp"]}
        pairs = g.nodes[t["copyback"]]["files"]
        locals_ = [local for local, _ in pairs]
        for local in locals_:
            assert local in written and local not in temps, (t["copyback"], local)
        assert sorted(locals_) == sorted(published)
        assert len(set(locals_)) == len(locals_)
        jm = model.job(job)
        assert len(published) == sum(1 for s in jm.steps for o in s.outs if not o.temp)
        assert len(temps) == sum(1 for s in jm.steps for o in s.outs if o.temp)
        destinations.extend(dest for _, dest in pairs)
    assert len(destinations) == len(set(destinations))
    files = set(destinations)
    for dest in destinations:
        assert not any(str(up) in files for up in PurePosixPath(dest).parents), dest


@SETTINGS
@given(pipelines())
def test_invariant_5_staged_upstream_outputs_wait_for_their_copyback(model: PipelineM) -> None:
    g = compile_model(model)
    check_shape_against_model(g, model)
    producer: dict[str, str] = {}
    for nid, a in g.nodes(data=True):
        if a["kind"] == "copyback":
            for _, dest in a["files"]:
                producer[dest] = nid
    tasks = tasks_of(g)
    for (job, _task), t in tasks.items():
        stage = t["stage"]
        for src, _local in g.nodes[stage]["files"]:
            if src in producer:
                assert g.has_edge(producer[src], stage), (producer[src], stage, src)
        # the model's dependencies are all there: a map waits for its own upstream task, a
        # gather for every task of the upstream job
        jm = model.job(job)
        gathered = {u[1] for s in jm.steps for u in s.uses + s.ins if u[0] == "gather"}
        for up in gathered:
            for (ujob, _), ut in tasks.items():
                if ujob == up:
                    assert g.has_edge(ut["copyback"], stage), (ut["copyback"], stage)
        if jm.source[0] == "map":
            ups = [u for u in g.predecessors(stage) if g.nodes[u]["job"] == jm.source[1]]
            assert ups, stage
            if jm.source[1] not in gathered:
                index = g.nodes[stage]["index"]
                assert [g.nodes[u]["task"] for u in ups] == [
                    k[1] for k in tasks if k[0] == jm.source[1]
                ][index : index + 1]


def _normalised(text: str, root: str) -> str:
    """JSON text with the absolute root (the only place it appears) replaced."""
    data = json.loads(text)
    assert data["graph"]["root"] == root
    data["graph"]["root"] = "<root>"
    assert root not in json.dumps(data)
    return json.dumps(data)


@pytest.mark.slow
@SETTINGS
@given(pipelines())
def test_invariant_6_affinity_is_one_task_and_compile_is_deterministic(model: PipelineM) -> None:
    with tempfile.TemporaryDirectory() as one, tempfile.TemporaryDirectory() as two:
        roots = [str(Path(one).resolve()), str(Path(two).resolve())]
        outputs: list[dict[str, str]] = []
        graphs = []
        for root in (roots[0], roots[0], roots[1]):
            opf = write(model, Path(root))
            g = compile_file(opf, model.overrides)
            graphs.append(g)
            outputs.append({"--dot": to_dot(g), "--json": _normalised(plan_json(g), root)})
        # and what the command writes, from the second folder
        params = [f"--param={k}={v}" for k, v in model.overrides.items()]
        for flag in ("--dot", "--json"):
            target = Path(roots[1]) / f"plan{flag}"
            assert opf_main(["compile", str(opf), flag, *params, "-o", str(target)]) == 0
            text = target.read_text(encoding="utf-8")
            text = _normalised(text, roots[1]) if flag == "--json" else text
            assert text == outputs[2][flag]
    g = graphs[0]
    check_shape_against_model(g, model)
    groups: dict[tuple, set[str]] = {}
    for nid, a in g.nodes(data=True):
        if a["task"] is None:
            assert a["affinity"] is None, nid
        else:
            assert tuple(a["affinity"]) == (a["job"], a["task"]), nid
            groups.setdefault(tuple(a["affinity"]), set()).add(nid)
    # the nodes of one affinity are exactly one chain, walked along the edges from its task
    # stage (not read from their attributes): an affinity pins one task, and nothing else
    for key, members in groups.items():
        stages = [nid for nid in members if g.nodes[nid]["kind"] == "stage"]
        assert len(stages) == 1, (key, stages)
        walked = [stages[0]]
        while g.nodes[walked[-1]]["kind"] != "copyback":
            after = [v for v in g.successors(walked[-1])
                     if g.nodes[v]["kind"] in ("exec", "copyback")]
            assert len(after) == 1, (key, walked, after)
            walked.append(after[0])
        assert set(walked) == members, (key, walked, members)
    assert set(groups) == set(tasks_of(g))

    datas = [json.dumps(nx.node_link_data(h, edges="edges")) for h in graphs]
    assert _normalised(datas[0], roots[0]) == _normalised(datas[1], roots[0])
    assert _normalised(datas[0], roots[0]) == _normalised(datas[2], roots[1])
    assert list(graphs[0].nodes) == list(graphs[2].nodes)
    assert list(graphs[0].edges) == list(graphs[2].edges)
    assert outputs[0] == outputs[1] == outputs[2]


@pytest.mark.slow
def test_compile_output_is_independent_of_the_hash_seed(tmp_path: Path) -> None:
    """Two processes with different string hashing write the same plan, byte for byte."""
    import subprocess
    import sys

    (tmp_path / "data").mkdir()
    for stem in ("b", "a", "C", "c"):
        (tmp_path / "data" / f"{stem}.xyz").write_text("1\n")
    (tmp_path / "g.cfg").write_text("c\n")
    (tmp_path / "p.opf").write_text(
        "job a for x in \"data/*.xyz\" {\n"
        "    shared cfg = \"g.cfg\"\n"
        "    step s {\n"
        "        out o = \"{task.id}.out\"\n"
        "        out t = \"{task.id}.tmp\" temp\n"
        "        run prog {cfg} {x} {o} {t}\n"
        "    }\n"
        "}\n"
        "job b for y in a.s.o {\n"
        "    step s {\n"
        "        out o = \"{y.stem}.b\"\n"
        "        run prog {y} {a.s.o} {o}\n"
        "    }\n"
        "}\n"
    )
    outputs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        for flag in ("--json", "--dot"):
            proc = subprocess.run(
                [sys.executable, "-m", "opals_dsl", "compile", str(tmp_path / "p.opf"), flag],
                capture_output=True, text=True, env=env, check=True,
            )
            outputs.append(proc.stdout)
    assert outputs[0] == outputs[2] and outputs[1] == outputs[3]
    assert '"copyback:a/3-c"' in outputs[0] and '"stage:b/3-c"' in outputs[0]


# ---------------------------------------------------------------------------------------------
# pipelines that must be rejected


def compile_text(model: PipelineM, text: str) -> PipelineError:
    with tempfile.TemporaryDirectory() as tmp:
        opf = write(model, Path(tmp), text)
        with pytest.raises(PipelineError) as info:
            compile_file(opf, model.overrides)
        return info.value


@st.composite
def colliding(draw: st.DrawFn) -> tuple[PipelineM, set[int], str]:
    """A valid pipeline made to copy two outputs to one destination."""
    model = draw(pipelines())
    multi = [j for j in model.jobs if j.n_tasks > 1 and not (j.output and "{" in j.output[0])]
    if multi and draw(st.booleans()):
        # a constant output name in a job with many tasks
        j = draw(st.sampled_from(multi))
        step = draw(st.sampled_from(j.steps))
        out = OutM("clash", "clash.out", False)
        step.outs.insert(draw(st.integers(0, len(step.outs))), out)
        model.text = render(model)
        return model, {out.line}, "both copy output 'clash'"
    # two jobs, flat into one folder, one output name
    movable = [j for j in model.jobs if not (j.output and "{" in j.output[0])]
    assume(len(movable) >= 2)
    ia, ib = draw(st.lists(st.integers(0, len(movable) - 1), min_size=2, max_size=2, unique=True))
    a, b = movable[ia], movable[ib]
    added = []
    for j in (a, b):
        j.output = ("together", True)
        step = draw(st.sampled_from(j.steps))
        out = OutM("same", "same.out", False)
        step.outs.append(out)
        added.append(out)
    model.text = render(model)
    lines = {o.line for o in added}
    return model, lines, "same.out"


@pytest.mark.slow
@SETTINGS
@given(colliding())
def test_two_outputs_with_one_destination_are_rejected(case) -> None:
    model, lines, needle = case
    err = compile_text(model, model.text)
    assert isinstance(err, PlanError), err.render()
    found = {d.span.line for d in err.diagnostics}
    assert found and found <= lines, (found, lines, err.render())
    assert any(needle in d.message for d in err.diagnostics), err.render()
    for d in err.diagnostics:
        assert "back to" in d.message and "gen.opf" in d.span.file


def _job_deps(model: PipelineM) -> dict[str, list[tuple[str, int]]]:
    """job -> [(upstream job, line of the reference)] in the model."""
    deps: dict[str, list[tuple[str, int]]] = {}
    for j in model.jobs:
        refs = deps.setdefault(j.name, [])
        if j.source[0] == "map":
            refs.append((j.source[1], j.lines["job"]))
        for s in j.steps:
            for k, u in enumerate(s.ins):
                if u[0] == "gather":
                    refs.append((u[1], s.lines[f"in{k}"]))
            for u in s.uses:
                if u[0] == "gather":
                    refs.append((u[1], s.lines["action"]))
    return deps


@st.composite
def cyclic(draw: st.DrawFn) -> PipelineM:
    """A valid pipeline where a job also gathers from a job that (transitively) uses it."""
    model = draw(pipelines())
    dag = nx.DiGraph()
    dag.add_nodes_from(j.name for j in model.jobs)
    for down, refs in _job_deps(model).items():
        for up, _ in refs:
            dag.add_edge(up, down)
    pairs = [
        (a, b) for a in model.jobs for b in model.jobs
        if a is not b and nx.has_path(dag, a.name, b.name) and b.published()
    ]
    if not pairs:
        # make one: the last job gathers the first's output, then the first gathers it back
        first, last = model.jobs[0], model.jobs[-1]
        if first is last or not first.published() or not last.published():
            return draw(cyclic())
        s, o = first.published()[0]
        last.steps[0].ins.append(("gather", first.name, s, o))
        pairs = [(first, last)]
    a, b = draw(st.sampled_from(pairs))
    s, o = draw(st.sampled_from(b.published()))
    step = draw(st.sampled_from(a.steps))
    step.ins.append(("gather", b.name, s, o))
    model.text = render(model)
    return model


@pytest.mark.slow
@SETTINGS
@given(cyclic())
def test_job_cycles_through_gathers_are_rejected(model: PipelineM) -> None:
    err = compile_text(model, model.text)
    assert isinstance(err, OpfCheckError), err.render()
    deps = _job_deps(model)
    graph = nx.DiGraph()
    for down, refs in deps.items():
        for up, _ in refs:
            graph.add_edge(up, down)
    cycles = list(nx.simple_cycles(graph))
    assert cycles
    on_cycle_lines = set()
    for cycle in cycles:
        for k, down in enumerate(cycle):
            up = cycle[k - 1]
            on_cycle_lines |= {line for u, line in deps[down] if u == up}
    assert len(err.diagnostics) == len(cycles), err.render()
    for d in err.diagnostics:
        assert "cycle" in d.message, err.render()
        assert d.span.line in on_cycle_lines, (d.span.line, on_cycle_lines, err.render())


@st.composite
def self_or_later(draw: st.DrawFn) -> tuple[PipelineM, int, str]:
    model = draw(pipelines())
    candidates = [
        (j, k, m) for j in model.jobs for k in range(len(j.steps))
        for m in range(k, len(j.steps)) if j.steps[m].outs
    ]
    if not candidates:
        j = draw(st.sampled_from(model.jobs))
        j.steps[-1].outs.append(OutM("late", "late_{task.id}.tmp", True))
        k = m = len(j.steps) - 1
    else:
        j, k, m = draw(st.sampled_from(candidates))
    target = j.steps[m]
    o = draw(st.sampled_from(target.outs))
    step = j.steps[k]
    use = ("prev", target.name, o.name)
    where = draw(st.sampled_from(["in", "action"]))
    if where == "in":
        step.ins.append(use)
    else:
        step.uses.append(use)
    model.text = render(model)
    line = step.lines[f"in{len(step.ins) - 1}"] if where == "in" else step.lines["action"]
    return model, line, "its own output" if k == m else "later step"


@SETTINGS
@given(self_or_later())
def test_steps_naming_themselves_or_a_later_step_are_rejected(case) -> None:
    model, line, needle = case
    err = compile_text(model, model.text)
    assert isinstance(err, OpfCheckError), err.render()
    assert [d.span.line for d in err.diagnostics] == [line], err.render()
    assert needle in err.diagnostics[0].message, err.render()
