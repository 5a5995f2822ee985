"""The documentation agrees with the code: its examples parse and check, its links resolve.

Every fenced code block in ``docs/*.md`` and ``README.md`` is tested by its info string:

``opf``
    a whole pipeline file; it must pass ``opf check`` when written into a copy of
    ``examples/`` (so it may use ``data/strip*.las``, ``cfg/grid.cfg``, ``tools/lidar.py``).
``opf-parse``
    a whole pipeline file that names files which do not exist here; it must parse.
``opf-job`` / ``opf-step``
    lines from inside a job / a step; they are wrapped in ``job example for strip in
    "data/strip*.las" { ... }`` (and ``step example { ... }``) and must parse.
``opf-error [NAME.opf]``
    a whole pipeline file that ``opf check`` must reject with exit status 2; it is written as
    NAME.opf (default ``pipeline.opf``) into a copy of ``examples/``. If the next block is a
    ``text`` block, it must be exactly what ``opf check NAME.opf`` prints, with the copy's folder
    shown as ``/data/als``. When a message changes on purpose, rewrite those blocks with
    ``python tests/test_docs.py --update`` and read the diff. (In ``docs/errors.md`` every
    example output is compared by ``tests/test_errors_doc.py``, which this test leaves it to.)
``python``
    must compile.
``sh``
    every line that runs ``opf`` must be accepted by opf's own argument parser (so the docs only
    name options that exist).

Every relative link (``[text](path)``, ``![alt](path)``) must point to an existing file, and a
``#fragment`` into a Markdown file must name one of its headings. Every plan picture in
``docs/images/`` must show the current plan of its example (the node ids in the SVG are the
node ids of ``opf compile``), so a picture cannot silently go stale.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from opals_dsl.api import compile_file
from opals_dsl.cli import build_parser
from opals_dsl.lang.parse import parse
from opals_dsl.source import SourceFile

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
SHOWN_ROOT = "/data/als"
OPF = [sys.executable, "-m", "opals_dsl"]


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int
    info: str
    text: str

    @property
    def lang(self) -> str:
        return self.info.split()[0] if self.info.split() else ""

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})(.*)$")


def blocks(doc: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, in order."""
    out: list[Block] = []
    lines = doc.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = m.group(1), m.group(2), m.group(3).strip()
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            line = lines[j]
            body.append(line[len(indent):] if line.startswith(indent) else line)
            j += 1
        out.append(Block(doc, i + 1, info, "\n".join(body) + "\n"))
        i = j + 1
    return out


ALL = [b for doc in DOCS if doc.exists() for b in blocks(doc)]


def _of(*langs: str) -> list:
    return [pytest.param(b, id=b.id) for b in ALL if b.lang in langs]


def copy_examples(dest: Path) -> Path:
    """A copy of examples/ (data, cfg, tools; no pipelines, no results) to write pipelines into."""
    shutil.copytree(EXAMPLES, dest, ignore=shutil.ignore_patterns(
        "results*", ".opf", "__pycache__", "*.opf"))
    return dest


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return copy_examples(tmp_path / "als")


def opf_check(folder: Path, name: str) -> subprocess.CompletedProcess:
    return subprocess.run([*OPF, "check", name], cwd=folder, capture_output=True, text=True,
                          timeout=120)


def shown_as_in_docs(text: str, folder: Path) -> str:
    """What opf printed, with the copy's folder written as the docs show it."""
    return text.replace(str(folder.resolve()), SHOWN_ROOT).replace(str(folder), SHOWN_ROOT)


def test_the_docs_have_examples_of_every_kind():
    langs = {b.lang for b in ALL}
    assert {"opf", "opf-parse", "opf-job", "opf-step", "opf-error"} <= langs
    unknown = {b.lang for b in ALL if b.lang.startswith("opf") and b.lang not in
               {"opf", "opf-parse", "opf-job", "opf-step", "opf-error"}}
    assert not unknown, f"code blocks with an unknown opf kind: {unknown}"


@pytest.mark.parametrize("block", _of("opf"))
def test_whole_pipelines_pass_opf_check(block: Block, project: Path):
    (project / "doc.opf").write_text(block.text, encoding="utf-8")
    done = opf_check(project, "doc.opf")
    assert done.returncode == 0, f"{block.id}:\n{block.text}\n{done.stderr}"


@pytest.mark.parametrize("block", _of("opf-parse"))
def test_pipelines_that_name_other_files_parse(block: Block):
    parse(SourceFile(block.id, block.text))


def wrap(block: Block) -> str:
    body = "".join("        " + line + "\n" for line in block.text.splitlines())
    if block.lang == "opf-step":
        return ('job example for strip in "data/strip*.las" {\n    step example {\n'
                f"{body}    }}\n}}\n")
    return f'job example for strip in "data/strip*.las" {{\n{body}}}\n'


@pytest.mark.parametrize("block", _of("opf-job", "opf-step"))
def test_fragments_parse_inside_a_job_or_step(block: Block):
    parse(SourceFile(block.id, wrap(block)))


def test_a_broken_fragment_fails_the_fragment_test():
    broken = Block(ROOT / "README.md", 1, "opf-step", "run awk '{print $1}'\n")
    with pytest.raises(Exception, match="not a name"):
        parse(SourceFile(broken.id, wrap(broken)))


def _error_cases() -> list:
    cases = []
    for doc in DOCS:
        if not doc.exists() or doc.name == "errors.md":  # see tests/test_errors_doc.py
            continue
        found = blocks(doc)
        for k, b in enumerate(found):
            if b.lang != "opf-error":
                continue
            words = b.info.split()
            name = words[1] if len(words) > 1 else "pipeline.opf"
            nxt = found[k + 1] if k + 1 < len(found) else None
            shown = nxt.text if nxt is not None and nxt.lang == "text" else None
            cases.append(pytest.param(b, name, shown, id=b.id))
    return cases


@pytest.mark.parametrize(("block", "name", "shown"), _error_cases())
def test_error_examples_fail_as_shown(block: Block, name: str, shown: str | None,
                                      project: Path):
    (project / name).write_text(block.text, encoding="utf-8")
    done = opf_check(project, name)
    assert done.returncode == 2, f"{block.id}: expected opf check to fail\n{done.stdout}"
    assert "Traceback" not in done.stderr
    if shown is not None:
        printed = shown_as_in_docs(done.stderr, project)
        assert printed.strip() == shown.strip(), f"{block.id}: the docs show another message"


@pytest.mark.parametrize("block", _of("python"))
def test_python_blocks_compile(block: Block):
    compile(block.text, block.id, "exec")


def _opf_commands(block: Block) -> list[list[str]]:
    """The arguments of every ``opf`` command in a shell block (also ``.venv/bin/opf``)."""
    text = re.sub(r"\\\n", " ", block.text)
    commands = []
    for line in text.splitlines():
        line = line.strip().removeprefix("$ ")
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        segment: list[str] = []
        for word in [*lexer, ";"]:
            if word and set(word) <= set("|&;<>()"):
                if segment and (segment[0] == "opf" or segment[0].endswith("/opf")):
                    commands.append(segment[1:])
                segment = []
            else:
                segment.append(word)
    return commands


def test_opf_commands_are_found_in_shell_lines():
    block = Block(ROOT / "README.md", 1, "sh", "python3 -m venv .venv && .venv/bin/opf run x.opf"
                  " -n 2 # two engines\nopf compile x.opf --dot | dot -Tsvg > x.svg\n"
                  "opf check \\\n   x.opf -p a=1\nipcluster start -n 2\n")
    assert _opf_commands(block) == [["run", "x.opf", "-n", "2"], ["compile", "x.opf", "--dot"],
                                    ["check", "x.opf", "-p", "a=1"]]


def test_an_option_that_does_not_exist_is_refused(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "x.opf", "--no-such-option"])


@pytest.mark.parametrize("block", _of("sh"))
def test_opf_commands_in_the_docs_exist(block: Block, capsys):
    parser = build_parser()
    for argv in _opf_commands(block):
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{block.id}: opf does not accept 'opf {shlex.join(argv)}':\n"
                        f"{capsys.readouterr().err}")


# -- links -----------------------------------------------------------------------------------

_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HTML_SRC = re.compile(r"""<(?:img|a)\s[^>]*(?:src|href)=["']([^"']+)["']""")


def _prose(doc: Path) -> str:
    """The Markdown text without fenced code blocks and inline code."""
    text = doc.read_text(encoding="utf-8")
    out, fence = [], None
    for line in text.splitlines():
        m = _FENCE.match(line)
        if m and (fence is None or line.strip().startswith(fence)):
            fence = None if fence else m.group(2)
            continue
        if fence is None:
            out.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(out)


def slug(heading: str) -> str:
    """A heading's anchor as GitHub and GitLab make it."""
    text = re.sub(r"[`*_]|<[^>]+>", "", heading.strip()).lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _raw_headings(doc: Path) -> set[str]:
    # headings keep their inline code for anchors: read them from the raw text
    seen: dict[str, int] = {}
    out = set()
    fence = None
    for line in doc.read_text(encoding="utf-8").splitlines():
        m = _FENCE.match(line)
        if m and (fence is None or line.strip().startswith(fence)):
            fence = None if fence else m.group(2)
            continue
        if fence is not None:
            continue
        h = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not h:
            continue
        base = slug(h.group(1))
        k = seen.get(base, 0)
        seen[base] = k + 1
        out.add(base if k == 0 else f"{base}-{k}")
    return out


def links(doc: Path) -> list[str]:
    text = _prose(doc)
    return _LINK.findall(text) + _HTML_SRC.findall(text)


@pytest.mark.parametrize("doc", [d for d in DOCS if d.exists()], ids=lambda d: d.name)
def test_relative_links_point_to_existing_files(doc: Path):
    bad = []
    for target in links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, mailto: ...
            continue
        path, _, fragment = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            bad.append(f"{target} (no such file)")
            continue
        if fragment and dest.suffix == ".md" and fragment not in _raw_headings(dest):
            bad.append(f"{target} (no heading with that anchor)")
    assert not bad, f"{doc.name}: broken links: {bad}"


def test_the_link_checker_finds_a_broken_link(tmp_path: Path):
    doc = tmp_path / "x.md"
    doc.write_text("# Title\n\nSee [a](missing.md), [b](#title), [c](#nope) and "
                   "`[d](ignored.md)`.\n", encoding="utf-8")
    assert links(doc) == ["missing.md", "#title", "#nope"]
    assert _raw_headings(doc) == {"title"}
    assert slug("`opf run`: running a plan") == "opf-run-running-a-plan"


# -- pictures --------------------------------------------------------------------------------

PICTURES = [
    ("strips-plan.svg", "strips.opf", "task"),
    ("strips-jobs.svg", "strips.opf", "job"),
    ("per_strip-plan.svg", "per_strip.opf", "task"),
    ("per_strip-jobs.svg", "per_strip.opf", "job"),
    ("tiles-plan.svg", "tiles.opf", "task"),
]


@pytest.mark.parametrize(("svg", "example", "level"), PICTURES)
def test_plan_pictures_show_the_current_plan(svg: str, example: str, level: str):
    path = ROOT / "docs" / "images" / svg
    titles = set(re.findall(r"<title>([^<]*)</title>", path.read_text(encoding="utf-8")))
    graph = compile_file(EXAMPLES / example)
    if level == "task":
        nodes = set(graph.nodes)
    else:
        nodes = {f"{a['job']}/{a['step']}" for _, a in graph.nodes(data=True)
                 if a["kind"] == "exec"}
    shown = {t for t in titles
             if "&#45;&gt;" not in t and not t.startswith("cluster_")
             and t != graph.graph["pipeline"]}
    command = (f"opf compile examples/{example} --svg"
               + (" --level job" if level == "job" else "") + f" -o docs/images/{svg}")
    assert shown == nodes, (
        f"docs/images/{svg} does not show the current plan (missing "
        f"{sorted(nodes - shown)[:3]}, extra {sorted(shown - nodes)[:3]}); render it again "
        f"with: {command}"
    )


def test_every_picture_is_tested():
    on_disk = {p.name for p in (ROOT / "docs" / "images").glob("*.svg")}
    assert on_disk == {svg for svg, _, _ in PICTURES}


def test_docs_do_not_show_paths_of_this_machine():
    for doc in DOCS:
        if doc.exists():
            assert str(ROOT) not in doc.read_text(encoding="utf-8"), doc.name


# -- what following the docs leaves behind --------------------------------------------------

#: the first-day pages, and the folder their commands run in
FIRST_DAY = {ROOT / "README.md": ROOT, ROOT / "docs" / "tutorial.md": EXAMPLES}


def _commands_of(doc: Path) -> list[list[str]]:
    """Every ``opf`` command of a page: in its ``sh`` blocks and its inline code."""
    commands = [argv for b in blocks(doc) if b.lang == "sh" for argv in _opf_commands(b)]
    for code in re.findall(r"`(opf [^`]*)`", _prose_with_code(doc)):
        commands += _opf_commands(Block(doc, 0, "sh", code + "\n"))
    return commands


def _prose_with_code(doc: Path) -> str:
    text = doc.read_text(encoding="utf-8")
    return "\n".join(line for line in text.splitlines() if not _FENCE.match(line))


def made_by(argv: list[str], cwd: Path) -> list[Path]:
    """The files and folders an ``opf`` command makes (relative ones only)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:  # a command named in passing ('opf run' in a sentence)
        return []
    made = []
    if getattr(args, "output", None):
        made.append(cwd / args.output)
    elif args.command == "report":
        made.append(cwd / "report.html")
    if args.command == "run" and (cwd / args.file).is_file():  # not 'opf run FILE'
        folder = (cwd / args.file).parent
        made += [folder / ".opf", folder / "results"]
        for item in args.param or []:
            name, _, value = item.partition("=")
            if name == "results":
                made.append(folder / value)
        if args.report:
            made.append(cwd / args.report)
        if args.state:
            made.append(cwd / args.state)
    return [p for p in made if not str(p).startswith(("/mnt", "/local", "~")) and
            ROOT in p.parents]


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                    reason="not a git clone")
def test_what_the_first_day_docs_make_is_ignored_by_git():
    """Following README.md and the tutorial leaves git status clean: every file or folder
    their commands make (plans drawn with -o, reports, results, the state folder) is in
    .gitignore."""
    made = sorted({p for doc, cwd in FIRST_DAY.items() for argv in _commands_of(doc)
                   for p in made_by(argv, cwd)})
    assert ROOT / "examples" / "plan.svg" in made and ROOT / "examples" / ".opf" in made
    # a file inside each: a folder is ignored when a pattern matches it or a parent
    paths = [str((p / "x" if not p.suffix else p).relative_to(ROOT)) for p in made]
    done = subprocess.run(["git", "check-ignore", "--no-index", "--stdin", "-v", "-n"],
                          input="\n".join(paths) + "\n", capture_output=True, text=True,
                          cwd=ROOT, check=False)
    not_ignored = [line.split("\t", 1)[1] for line in done.stdout.splitlines()
                   if line.startswith("::\t")]
    assert not not_ignored, f"not in .gitignore: {not_ignored}"


# -- the plan format -------------------------------------------------------------------------


def _table_keys(doc: Path, heading: str) -> set[str]:
    """The names in the first column of the table under a heading (``| `name` | ... |``)."""
    text = doc.read_text(encoding="utf-8")
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([^`]+)`", section, re.M))


def test_the_plan_format_names_every_key_of_the_json(tmp_path: Path):
    """docs/plan-format.md describes the JSON's top level (and the graph attributes in it):
    every key that ``opf compile --json`` writes, and no other."""
    import json

    from opals_dsl.cli import main

    out = tmp_path / "plan.json"
    assert main(["compile", str(EXAMPLES / "strips.opf"), "--json", "-o", str(out)]) == 0
    plan = json.loads(out.read_text(encoding="utf-8"))
    doc = ROOT / "docs" / "plan-format.md"
    assert _table_keys(doc, "The JSON") == set(plan)
    assert _table_keys(doc, "Graph attributes") == set(plan["graph"])
    assert {k for e in plan["edges"] for k in e} == {"source", "target"}


# -- keeping the error examples up to date ---------------------------------------------------

_ERROR_PAIR = re.compile(r"(```opf-error([^\n]*)\n)(.*?)(```\n\n```text\n)(.*?)(```)", re.S)


def update_error_outputs() -> list[Path]:
    """Rewrite the ``text`` block after every ``opf-error`` block with what opf prints now."""
    import tempfile

    changed = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = copy_examples(Path(tmp) / "als")

        def printed(m: re.Match) -> str:
            words = m.group(2).split()
            name = words[0] if words else "pipeline.opf"
            (folder / name).write_text(m.group(3), encoding="utf-8")
            out = shown_as_in_docs(opf_check(folder, name).stderr, folder)
            return m.group(1) + m.group(3) + m.group(4) + out.rstrip() + "\n" + m.group(6)

        for doc in DOCS:
            if not doc.exists():
                continue
            text = doc.read_text(encoding="utf-8")
            new = _ERROR_PAIR.sub(printed, text)
            if new != text:
                doc.write_text(new, encoding="utf-8")
                changed.append(doc)
    return changed


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit("usage: python tests/test_docs.py --update")
    for path in update_error_outputs():
        print(f"updated {path.relative_to(ROOT)}")
