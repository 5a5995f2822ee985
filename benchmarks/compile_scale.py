"""How long `opf compile` takes, and how much memory it needs, as the number of tasks grows.

For each N (1,000, 10,000 and 100,000 tasks; 1,000,000 with ``--huge``) and each kind of
source — a glob over N real small files, and a ``lines()`` list of N values — this writes a
two-step pipeline (import, then grid, over one shared configuration file) into a scratch folder
and runs ``opf compile --json`` on it in a child process whose standard output (where the JSON
goes) is ``/dev/null``, reporting the child's wall time, processor time (user + system: what the
wall time would be on an idle machine) and peak resident memory (``os.wait4`` gives the rusage
of that one child). A second child does the same through the library — ``compile_file`` and
``opals_dsl.plan.write_json``, the streaming JSON writer — so the planner's own figures show
whatever the command line writes JSON with.

Where ``snakemake`` is found (on PATH, beside this Python, or given with ``--snakemake``), the
same shape (two rules over the same N inputs) is dry-run once with ``snakemake -n`` and the
ratio of its wall time to opf's is printed. A dry run still going after ``--snakemake-timeout``
seconds (default 600) is stopped and shown as ``> 600 s``. ``--tools`` measures one side only
(``--tools snakemake`` shows opf's columns as ``-``).

    python benchmarks/compile_scale.py [--sizes 1000,10000] [--huge] [--kinds glob,lines]
                                       [--repeat N] [--workdir DIR] [--keep] [--json FILE]
                                       [--tools opf,snakemake] [--snakemake-timeout S]

Each opf figure is the best of ``--repeat`` runs (default 1): on a shared machine other
processes only ever make a run slower. ``--json FILE`` writes every figure as well (Snakemake's
processor time and peak memory too, which the table leaves out) with the load average before
and after; the file is rewritten after each row, so a long run cut short keeps what it measured.
``benchmarks/plot_scale.py`` draws it.

Targets for planning: 100,000 tasks in at most 4 s; 1,000,000 tasks in at most 30 s and 2 GB.
benchmarks/README.md has the latest figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
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



def run_child(argv: list[str], cwd: Path,
              timeout: float | None = None) -> tuple[float, float, float, int | None]:
    """Run a command; its wall time (s), processor time (s), peak resident memory (MB) and
    exit status (None: still running after ``timeout`` seconds, so stopped with its children)."""
    with tempfile.TemporaryFile() as err_file:  # a file, not a pipe: a chatty child never blocks
        start = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err_file,
                                start_new_session=timeout is not None)
        if timeout is None:
            _, status, usage = os.wait4(proc.pid, 0)
        else:
            status, usage = wait_until(proc.pid, start + timeout)
        wall = time.perf_counter() - start
        code = None if status is None else os.waitstatus_to_exitcode(status)
        proc.returncode = -signal.SIGKILL if code is None else code  # reaped: Popen must know
        if code not in (0, None):
            err_file.seek(0)
            err = err_file.read().decode(errors="replace")
            print(f"  {' '.join(argv)} failed ({code}):\n{err[-4000:]}", file=sys.stderr)
    cpu = usage.ru_utime + usage.ru_stime
    return wall, cpu, usage.ru_maxrss / 1024, code  # ru_maxrss: KiB on Linux


def wait_until(pid: int, deadline: float) -> tuple[int | None, os.struct_rusage]:
    """Wait for ``pid`` until ``deadline`` (``time.perf_counter``); past it, kill its process
    group and give no status. Polls at most 50 ms apart, so the wall time is at most that late."""
    pause = 0.001
    while time.perf_counter() < deadline:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            return status, usage
        time.sleep(min(pause, max(0.0, deadline - time.perf_counter())))
        pause = min(pause * 2, 0.05)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _, _, usage = os.wait4(pid, 0)
    return None, usage


def find_snakemake(given: str | None) -> str | None:
    """``--snakemake``, else ``snakemake`` on PATH, else beside this Python (the scripts folder
    of a virtual environment that is not activated)."""
    return given or shutil.which("snakemake") or shutil.which(
        "snakemake", path=sysconfig.get_path("scripts"))


def snakemake_dry_run(snakemake: str, pipeline: Path, kind: str, timeout: float) -> dict:
    folder = pipeline.parent
    if kind == "glob":
        text = SNAKEFILE.format(ids='glob_wildcards("data/{id}.xyz").id',
                                input='"data/{id}.xyz"')
    else:
        text = SNAKEFILE.format(ids='[l.strip() for l in open("tiles.txt") if l.strip()]',
                                input='"tiles.txt"')
    (folder / "Snakefile").write_text(text, encoding="utf-8")
    wall, cpu, peak, status = run_child([snakemake, "-n", "-q", "--cores", "1"], folder,
                                        timeout=timeout)
    state = "timeout" if status is None else "ok" if status == 0 else "failed"
    return {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "peak_mb": round(peak, 1),
            "status": state, "runs": 1}


def output_of(argv: list[str]) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def opf_commit() -> str | None:
    """The commit of the opf checkout measured, with ``+`` when its code (the package or the
    grammar) differs from it."""
    top = str(Path(__file__).resolve().parent.parent)
    commit = output_of(["git", "-C", top, "rev-parse", "--short", "HEAD"])
    changed = output_of(["git", "-C", top, "status", "--porcelain", "--untracked-files=no",
                         "--", "opals_dsl", "grammar"])
    return None if commit is None else commit + ("+" if changed else "")


def write_json(path: Path, record: dict) -> None:
    """Write ``record`` to ``path`` whole: a temporary beside it, renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def best(runs: list[tuple[float, float, float, int | None]]) -> dict:
    """The best of several runs: the least time, the most memory (which load cannot raise)."""
    return {"wall_s": round(min(r[0] for r in runs), 3), "cpu_s": round(min(r[1] for r in runs), 3),
            "peak_mb": round(max(r[2] for r in runs), 1), "ok": all(r[3] == 0 for r in runs),
            "runs": len(runs)}


def snake_cell(snake: dict, opf_wall: float | None, timeout: float) -> str:
    if snake["status"] == "ok":
        ratio = f"{snake['wall_s'] / opf_wall:>6.1f}" if opf_wall else f"{'-':>6}"
        return f"{snake['wall_s']:>15.2f} {ratio}"
    return f"{'> ' + format(timeout, 'g') + ' s':>15}" if snake["status"] == "timeout" \
        else f"{'failed':>15}"


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
    ap.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    ap.add_argument("--tools", default="opf,snakemake",
                    help="what to measure: opf, snakemake or both (default: %(default)s)")
    ap.add_argument("--snakemake", metavar="PATH",
                    help="the snakemake command (default: on PATH, else beside this Python)")
    ap.add_argument("--snakemake-timeout", type=float, default=600.0, metavar="S",
                    help="stop a Snakemake dry run after S seconds (default: %(default)g)")
    args = ap.parse_args(argv)

    sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.huge and 1_000_000 not in sizes:
        sizes.append(1_000_000)
    kinds = [k for k in args.kinds.split(",") if k]
    tools = {t for t in args.tools.split(",") if t}
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="opf-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    opf = [sys.executable, "-m", "opals_dsl"]
    snakemake = find_snakemake(args.snakemake) if "snakemake" in tools else None
    record: dict = {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": sys.version.split()[0],
        "opf_commit": opf_commit() if "opf" in tools else None,
        "snakemake_version": output_of([snakemake, "--version"]) if snakemake else None,
        "snakemake_timeout_s": args.snakemake_timeout,
        "repeat": max(1, args.repeat),
        "load_before": [round(x, 2) for x in os.getloadavg()],
        "rows": [],
    }

    print(f"{'':<17} {'opf compile --json':^26} {'compile_file + write_json':^26}")
    print(f"{'source':<7} {'tasks':>9} " + f"{'wall s':>8} {'cpu s':>8} {'peak MB':>8} " * 2
          + (f"{'snakemake -n s':>15} {'ratio':>6}" if snakemake else ""))
    try:
        for n in sizes:
            for kind in kinds:
                pipeline = make_folder(root, kind, n)
                line = f"{kind:<7} {n:>9,} "
                flag = ""
                row: dict = {"source": kind, "tasks": n}
                for name, child in (
                    ("opf_cli", [*opf, "compile", str(pipeline), "--json"]),
                    ("opf_library", [sys.executable, "-c", LIBRARY, str(pipeline)]),
                ):
                    if "opf" not in tools:
                        line += f"{'-':>8} {'-':>8} {'-':>8} "
                        continue
                    runs = [run_child(child, pipeline.parent)
                            for _ in range(max(1, args.repeat))]
                    row[name] = fig = best(runs)
                    line += f"{fig['wall_s']:>8.2f} {fig['cpu_s']:>8.2f} {fig['peak_mb']:>8.0f} "
                    flag += "" if fig["ok"] else "  FAILED"
                if snakemake:
                    row["snakemake"] = snakemake_dry_run(snakemake, pipeline, kind,
                                                         args.snakemake_timeout)
                    opf_wall = row["opf_cli"]["wall_s"] if "opf_cli" in row else None
                    line += snake_cell(row["snakemake"], opf_wall, args.snakemake_timeout)
                print(line + flag, flush=True)
                record["rows"].append(row)
                if args.json:
                    record["load_after"] = [round(x, 2) for x in os.getloadavg()]
                    write_json(Path(args.json), record)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    if "snakemake" in tools and not snakemake:
        print("(snakemake is not on PATH: no comparison)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
