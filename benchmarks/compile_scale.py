"""How long `opf compile` takes, and how much memory it needs, as the number of tasks grows.

For each N (1,000, 10,000 and 100,000 tasks; 1,000,000 with ``--huge``) and each kind of
source — a glob over N real small files, and a ``lines()`` list of N values — this writes a
two-step pipeline (import, then grid, over one shared configuration file) into a scratch folder
and runs ``opf compile --json -o /dev/null`` on it in a child process, reporting the child's
wall time, processor time (user + system: what the wall time would be on an idle machine) and
peak resident memory (``os.wait4`` gives the rusage of that one child). A second child does the
same through the library — ``compile_file`` and ``opals_dsl.plan.write_json``, the streaming
JSON writer — so the planner's own figures show whatever the command line writes JSON with.

Where ``snakemake`` is on PATH, the same shape (two rules over the same N inputs) is dry-run
with ``snakemake -n`` and the time ratio is printed.

    python benchmarks/compile_scale.py [--sizes 1000,10000] [--huge] [--kinds glob,lines]
                                       [--repeat N] [--workdir DIR] [--keep]

Each figure is the best of ``--repeat`` runs (default 1): on a shared machine other processes
only ever make a run slower.

Targets: 100,000 tasks in at most 5 s and 1 GB; 1,000,000 tasks in at most 60 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PIPELINE = """\
pipeline scale

param cell = 1.0

job tiles for tile in {source} {{
    shared cfg = "grid.cfg"
    output "results" by step

    step import {{
        out odm = "{{{stem}}}.odm"
        run prog import --config {{cfg}} {{tile}} {{odm}}
    }}
    step grid {{
        out dem = "{{{stem}}}_dem.tif"
        run prog grid --cell {{cell}} {{import.odm}} {{dem}}
    }}
}}
"""

SNAKEFILE = """\
IDS = {ids}

rule all:
    input: expand("results/grid/{{id}}_dem.tif", id=IDS)

rule import_:
    input: tile={input}, cfg="grid.cfg"
    output: "results/import/{{id}}.odm"
    shell: "prog import --config {{input.cfg}} {{input.tile}} {{output}}"

rule grid:
    input: "results/import/{{id}}.odm"
    output: "results/grid/{{id}}_dem.tif"
    shell: "prog grid --cell 1.0 {{input}} {{output}}"
"""


def make_folder(root: Path, kind: str, n: int) -> Path:
    """A pipeline folder for ``n`` tasks over a ``kind`` source; returns the pipeline file."""
    folder = root / f"{kind}-{n}"
    pipeline = folder / "scale.opf"
    if pipeline.exists():
        return pipeline
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "grid.cfg").write_text("cell 1.0\n", encoding="utf-8")
    width = len(str(n))
    names = [f"tile_{i:0{width}d}" for i in range(n)]
    if kind == "glob":
        data = folder / "data"
        data.mkdir(exist_ok=True)
        for name in names:
            with open(data / f"{name}.xyz", "w", encoding="utf-8") as fh:
                fh.write("0 0 0\n")
        source, stem = '"data/*.xyz"', "tile.stem"
    else:
        (folder / "tiles.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
        source, stem = 'lines("tiles.txt")', "tile"
    pipeline.write_text(PIPELINE.format(source=source, stem=stem), encoding="utf-8")
    return pipeline


# in a function, as in the command: the plan is freed when it returns, not left to the
# collector's last pass at exit (which walks every object once more: a second at 100,000 tasks)
LIBRARY = (
    "import os, sys\n"
    "from opals_dsl.api import compile_file\n"
    "from opals_dsl.plan.graph import write_json\n"
    "def main(path):\n"
    "    graph = compile_file(path)\n"
    "    with open(os.devnull, 'w', encoding='utf-8') as fh:\n"
    "        write_json(graph, fh)\n"
    "main(sys.argv[1])\n"
)


def run_child(argv: list[str], cwd: Path) -> tuple[float, float, float, int]:
    """Run a command; its wall time (s), processor time (s), peak resident memory (MB) and
    exit status."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.stderr:
        proc.stderr.close()
    if proc.returncode != 0:
        print(f"  {' '.join(argv)} failed ({proc.returncode}):\n{err}", file=sys.stderr)
    cpu = usage.ru_utime + usage.ru_stime
    return wall, cpu, usage.ru_maxrss / 1024, proc.returncode  # ru_maxrss: KiB on Linux


def snakemake_dry_run(snakemake: str, pipeline: Path, kind: str, n: int) -> float | None:
    folder = pipeline.parent
    if kind == "glob":
        text = SNAKEFILE.format(ids='glob_wildcards("data/{id}.xyz").id',
                                input='"data/{id}.xyz"')
    else:
        text = SNAKEFILE.format(ids='[l.strip() for l in open("tiles.txt") if l.strip()]',
                                input='"tiles.txt"')
    (folder / "Snakefile").write_text(text, encoding="utf-8")
    wall, _, _, status = run_child([snakemake, "-n", "-q", "--cores", "1"], folder)
    return wall if status == 0 else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,10000,100000",
                    help="comma-separated task counts (default: %(default)s)")
    ap.add_argument("--huge", action="store_true", help="also measure 1,000,000 tasks")
    ap.add_argument("--kinds", default="glob,lines", help="sources to measure: glob, lines")
    ap.add_argument("--repeat", type=int, default=1, help="runs per figure; the best is shown")
    ap.add_argument("--workdir", help="where to build the pipeline folders (default: a temp "
                    "folder, removed at the end unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the pipeline folders")
    args = ap.parse_args(argv)

    sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.huge and 1_000_000 not in sizes:
        sizes.append(1_000_000)
    kinds = [k for k in args.kinds.split(",") if k]
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="opf-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    opf = [sys.executable, "-m", "opals_dsl"]
    snakemake = shutil.which("snakemake")

    print(f"{'':<17} {'opf compile --json':^26} {'compile_file + write_json':^26}")
    print(f"{'source':<7} {'tasks':>9} " + f"{'wall s':>8} {'cpu s':>8} {'peak MB':>8} " * 2
          + (f"{'snakemake -n s':>15} {'ratio':>6}" if snakemake else ""))
    try:
        for n in sizes:
            for kind in kinds:
                pipeline = make_folder(root, kind, n)
                line = f"{kind:<7} {n:>9,} "
                flag = ""
                for argv in (
                    [*opf, "compile", str(pipeline), "--json", "-o", os.devnull],
                    [sys.executable, "-c", LIBRARY, str(pipeline)],
                ):
                    runs = [run_child(argv, pipeline.parent) for _ in range(max(1, args.repeat))]
                    wall = min(r[0] for r in runs)
                    cpu = min(r[1] for r in runs)
                    peak = max(r[2] for r in runs)
                    status = max(r[3] for r in runs)
                    line += f"{wall:>8.2f} {cpu:>8.2f} {peak:>8.0f} "
                    flag += "" if status == 0 else "  FAILED"
                if snakemake:
                    snake = snakemake_dry_run(snakemake, pipeline, kind, n)
                    line += (f"{snake:>15.2f} {snake / wall:>6.1f}" if snake is not None
                             else f"{'failed':>15}")
                print(line + flag, flush=True)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    if not snakemake:
        print("(snakemake is not on PATH: no comparison)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
