"""docs/errors.md shows what opf really prints: every example output in it is produced again
here and compared, character for character.

The examples are read from the Markdown: each ``text`` block is the output of the block before
it —

* an ``opf-error NAME.opf`` block: the pipeline, written as NAME.opf into a copy of
  ``examples/`` and checked with ``opf check NAME.opf``;
* an ``sh`` block: the commands, run with ``bash`` in a copy of ``examples/`` (its
  ``strips.opf`` and data), with this ``opf`` first on ``PATH`` and an empty ``IPYTHONDIR``
  (no cluster profile exists); what they print on standard output and error is the example.

The copy's folder is shown as ``/data/als``, as the page says. The few outputs that need what
no test here has (a failing run's timings, SSH hosts, a batch system, another run holding the
state folder) are listed in :data:`NOT_REPRODUCED` with the reason; a new example must be
one of the kinds above or be added there, so none goes unchecked by accident.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_docs import ROOT, Block, blocks, copy_examples, shown_as_in_docs

ERRORS = ROOT / "docs" / "errors.md"

#: the IPython folder (profiles) as the page shows it
IPYTHON_SHOWN = "/home/anna/.ipython"

#: the first line of each example output that is not produced here, and why
NOT_REPRODUCED = {
    "strip_dems: 10 tasks on 2 engines (1 machine)":
        "a failing run on a cluster: its timings and engine order differ from run to run",
    "opf: error: the ipyparallel cluster of profile 'lidar' has no engines (waited 30 s)":
        "needs a running controller without engines, waited for 30 s",
    "opf: error: cannot reach node03 over SSH:": "needs an SSH host that does not answer",
    "opf: error: the Python on node02 (/opt/opf/bin/python) cannot import":
        "needs an SSH host without opf",
    "opf: error: could not start engines with slurm: sbatch":
        "needs a Slurm cluster refusing the partition",
    "opf: error: could not start engines with slurm: no engine registered":
        "needs a Slurm cluster whose partition is down",
    "opf: error: step dem/grid needs 4 threads":
        "names the machines of a cluster (host and scratch folder), which differ on every host",
    "opf: error: another opf run (process 81234)":
        "needs a second run holding the state folder; its process id differs every time",
}


def examples() -> list[tuple[Block, Block]]:
    """(the block that makes it, the text block it prints) for every example output."""
    found = blocks(ERRORS)
    return [(before, text) for before, text in zip(found, found[1:], strict=False)
            if text.lang == "text"]


def _not_reproduced(text: Block) -> str | None:
    first = text.text.splitlines()[0] if text.text.strip() else ""
    return next((k for k in NOT_REPRODUCED if first.startswith(k)), None)


def _cases() -> list:
    return [pytest.param(before, text, id=f"line {text.line}") for before, text in examples()
            if _not_reproduced(text) is None]


def test_every_example_output_is_reproduced_or_said_why_not() -> None:
    kinds = {}
    for before, text in examples():
        kinds[text.line] = ("not reproduced" if _not_reproduced(text)
                            else before.lang if before.lang in ("opf-error", "sh") else None)
    unmade = [line for line, kind in kinds.items() if kind is None]
    assert not unmade, f"docs/errors.md: text blocks at lines {unmade} follow no opf-error or " \
                       "sh block; add the block that makes them, or list them in NOT_REPRODUCED"
    stale = [k for k in NOT_REPRODUCED
             if not any(_not_reproduced(t) == k for _, t in examples())]
    assert not stale, f"NOT_REPRODUCED names outputs the page no longer shows: {stale}"
    assert sum(kind == "sh" for kind in kinds.values()) >= 3
    assert sum(kind == "opf-error" for kind in kinds.values()) >= 20


def run_example(before: Block, folder: Path) -> str:
    """What the block before an example output prints, as the page shows it."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "IPYTHONDIR": str(folder.parent / "ipython"), "NO_COLOR": "1", "COLUMNS": "200"}
    if before.lang == "opf-error":
        words = before.info.split()
        name = words[1] if len(words) > 1 else "pipeline.opf"
        (folder / name).write_text(before.text, encoding="utf-8")
        command = ["opf", "check", name]
    else:
        (folder / "strips.opf").write_bytes((ROOT / "examples" / "strips.opf").read_bytes())
        command = ["bash", "-c", before.text]
    done = subprocess.run(command, cwd=folder, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    ipython = folder.parent / "ipython"
    shown = done.stdout.replace(str(ipython.resolve()), IPYTHON_SHOWN)
    return shown_as_in_docs(shown.replace(str(ipython), IPYTHON_SHOWN), folder)


@pytest.mark.parametrize(("before", "text"), _cases())
def test_the_example_output_is_what_opf_prints(before: Block, text: Block,
                                               tmp_path: Path) -> None:
    folder = copy_examples(tmp_path / "als")
    printed = run_example(before, folder)
    assert printed.rstrip("\n") == text.text.rstrip("\n"), (
        f"docs/errors.md:{text.line} shows another output than opf prints; rewrite it with "
        "python tests/test_errors_doc.py --update")


def update() -> bool:
    """Rewrite every reproduced example output of docs/errors.md with what opf prints now."""
    import tempfile

    lines = ERRORS.read_text(encoding="utf-8").split("\n")
    changes = []
    for before, text in examples():
        if _not_reproduced(text) is not None or before.lang not in ("opf-error", "sh"):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            printed = run_example(before, copy_examples(Path(tmp) / "als")).rstrip("\n")
        old = text.text.rstrip("\n").split("\n") if text.text.strip() else []
        # the block's body is lines text.line .. text.line + len(old) - 1 (0-based), after
        # the fence on line text.line (1-based)
        changes.append((text.line, len(old), printed.split("\n")))
    for start, count, new in reversed(changes):
        lines[start:start + count] = new
    text = "\n".join(lines)
    if text != ERRORS.read_text(encoding="utf-8"):
        ERRORS.write_text(text, encoding="utf-8")
        return True
    return False


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit("usage: python tests/test_errors_doc.py --update")
    print("updated docs/errors.md" if update() else "docs/errors.md is up to date")
