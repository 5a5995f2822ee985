"""How long ``opf check`` takes, and how much memory it needs, as a pipeline file grows.

For each N (1,000, 10,000 and 100,000 by default) this writes a pipeline of N jobs — each a
single task with an output folder, one output and a ``run`` line that uses a param and the
output, about 120 bytes a job — and a pipeline of one job over a list literal of N items on one
line, and runs ``opf check`` on each in a child process. It reports the child's wall time,
processor time (user + system: what the wall time would be on an idle machine), the processor
time per job or item (flat when checking is linear in the file), and peak resident memory
(``os.wait4`` gives the rusage of that one child).

    python benchmarks/check_scale.py [--sizes 1000,10000,100000] [--kinds jobs,list]
                                     [--repeat N] [--workdir DIR] [--keep]

Each figure is the best of ``--repeat`` runs (default 1): on a shared machine other processes
only ever make a run slower.
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

JOB = """\
job j{i} {{
    output "results/{{job.name}}" flat
    step s {{
        out o = "o{i}.txt"
        run echo {{cell}} {{o}}
    }}
}}

"""

LIST = """\
job j for v in [{items}] {{
    output "results" flat
    step s {{
        out o = "{{v}}.txt"
        run echo {{cell}} {{v}} {{o}}
    }}
}}
"""


def make(root: Path, kind: str, n: int) -> Path:
    """The pipeline file of ``n`` jobs (``jobs``) or list items (``list``)."""
    path = root / f"{kind}-{n}.opf"
    if path.exists():
        return path
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(f"pipeline {kind}_{n}\n\nparam cell = 1.0\n\n")
        if kind == "jobs":
            for i in range(n):
                fh.write(JOB.format(i=i))
        else:
            fh.write(LIST.format(items=", ".join(f'"v{i}"' for i in range(n))))
    return path


def run_child(argv: list[str], cwd: Path) -> tuple[float, float, float, int, str]:
    """Wall time (s), processor time (s), peak resident memory (MB), exit status, stderr."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err = proc.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.stderr.close()
    cpu = usage.ru_utime + usage.ru_stime
    return wall, cpu, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status), err


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,10000,100000",
                    help="comma-separated numbers of jobs / list items (default: %(default)s)")
    ap.add_argument("--kinds", default="jobs,list", help="pipelines to measure: jobs, list")
    ap.add_argument("--repeat", type=int, default=1, help="runs per figure; the best is shown")
    ap.add_argument("--workdir", help="where to write the pipelines (default: a temp folder, "
                    "removed at the end unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the pipelines")
    args = ap.parse_args(argv)

    sizes = [int(s) for s in args.sizes.split(",") if s]
    kinds = [k for k in args.kinds.split(",") if k]
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="opf-check-"))
    root.mkdir(parents=True, exist_ok=True)
    opf = [sys.executable, "-m", "opals_dsl", "check"]
    print(f"{'pipeline':<6} {'N':>9} {'file MB':>8} {'wall s':>8} {'cpu s':>8} "
          f"{'cpu us/N':>9} {'peak MB':>8}")
    try:
        for kind in kinds:
            for n in sizes:
                path = make(root, kind, n)
                runs = [run_child([*opf, path.name], root) for _ in range(max(1, args.repeat))]
                wall = min(r[0] for r in runs)
                cpu = min(r[1] for r in runs)
                peak = max(r[2] for r in runs)
                failed = next((r for r in runs if r[3] != 0), None)
                size = path.stat().st_size / 1e6
                print(f"{kind:<6} {n:>9,} {size:>8.1f} {wall:>8.2f} {cpu:>8.2f} "
                      f"{cpu / n * 1e6:>9.0f} {peak:>8.0f}"
                      + (f"  FAILED ({failed[3]}): {failed[4].strip()[:200]}" if failed else ""),
                      flush=True)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
