"""What a cold ``opf run`` costs, against a bare ipyparallel cluster and an empty Python.

Each contender runs in a fresh process, several times, interleaved (so that a burst of load on
the machine hits all of them alike), and the medians are printed side by side as ratios:

* ``python -c pass``: the floor — starting an interpreter;
* bare ipyparallel: ``ipyparallel.Cluster(n=2)`` with its default settings, started, one
  call on every engine, stopped (``IPYTHONDIR`` in a temporary folder);
* ``opf run``: a one-task pipeline whose step writes a small file, in a folder that was never
  run (no journal: the task runs), with the embedded cluster (one engine per core, at most one
  per task to run).

``--baseline DIR`` adds ``opf run`` of another copy of opf (a checkout's folder that holds
``opals_dsl``, put first on ``PYTHONPATH``), e.g. the code before a change, measured in turn with
the others.

The load average (``uptime``) is printed before and after: the machine is shared, so compare
ratios measured in one run of this script, never figures of two runs.

    python benchmarks/cold_run.py               # 5 repeats of each
    python benchmarks/cold_run.py --repeats 9 --opf-args=-v
    git archive main opals_dsl grammar | tar -x -C /tmp/before
    python benchmarks/cold_run.py --baseline /tmp/before
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PIPELINE = """\
pipeline one

job hello {
    output "results" flat
    step write {
        out greeting = "hello.txt"
        run python -c "open('hello.txt', 'w').write('hello')"
    }
}
"""

BARE = """\
import ipyparallel as ipp
cluster = ipp.Cluster(n=2, log_level=40)
client = cluster.start_and_connect_sync()
client[:].apply_sync(lambda: 1)
cluster.stop_cluster_sync()
"""


def load() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def timed(argv: list[str], cwd: Path, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr}")
    if "-v" in argv:
        print(proc.stderr.rstrip(), file=sys.stderr)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--opf-args", default="", help="more arguments for opf run, e.g. -v")
    parser.add_argument("--no-bare", action="store_true", help="skip bare ipyparallel")
    parser.add_argument("--baseline", metavar="DIR",
                        help="also time opf run of the opals_dsl in DIR (e.g. before a change)")
    args = parser.parse_args()

    print(f"before: {load()}")
    times: dict[str, list[float]] = {"python -c pass": [], "bare ipyparallel": [],
                                      "opf run (cold)": []}
    if args.no_bare:
        del times["bare ipyparallel"]
    runs = {"opf run (cold)": None}
    if args.baseline:
        runs["opf run (baseline)"] = os.path.abspath(args.baseline)
        times["opf run (baseline)"] = []
    with tempfile.TemporaryDirectory(prefix="opf-cold-") as tmp:
        root = Path(tmp)
        env = dict(os.environ, IPYTHONDIR=str(root / "ipython"))
        env.pop("OPF_SCRATCH", None)
        for i in range(args.repeats):
            times["python -c pass"].append(timed([sys.executable, "-c", "pass"], root, env))
            if not args.no_bare:
                times["bare ipyparallel"].append(timed([sys.executable, "-c", BARE], root, env))
            for name, path in runs.items():
                folder = root / f"run{i}"
                folder.mkdir()
                (folder / "one.opf").write_text(PIPELINE)
                argv = [sys.executable, "-m", "opals_dsl", "run", "one.opf", "-q",
                        *args.opf_args.split()]
                run_env = dict(env, PYTHONPATH=path) if path else env
                times[name].append(timed(argv, folder, run_env))
                if not (folder / "results" / "hello.txt").is_file():
                    raise SystemExit("opf run did not write its result")
                shutil.rmtree(folder, ignore_errors=True)
    print(f"after:  {load()}")
    base = statistics.median(times["python -c pass"])
    bare = statistics.median(times["bare ipyparallel"]) if not args.no_bare else None
    print(f"\nmedian of {args.repeats} fresh processes each:")
    for name, values in times.items():
        med = statistics.median(values)
        line = (f"  {name:18} {med:6.2f} s  (min {min(values):.2f}, max {max(values):.2f})"
                f"  {med / base:6.1f}x python -c pass")
        if bare:
            line += f"  {med / bare:5.2f}x bare ipyparallel"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
