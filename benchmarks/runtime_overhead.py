"""How much the runtime costs per task, against raw ipyparallel on the same cluster.

Starts one embedded 2-engine cluster (as ``opf run -n 2`` does), then in the same run:

* the runtime: a pipeline of N one-step tasks whose step does nothing (``call`` of a no-op
  function by default, ``--step run`` for ``run true``, a process per task), compiled from a
  real ``.opf`` file into the plan table ``opf run`` uses (``--graph``: into the graph, as the
  library's ``compile_file`` gives it) and scheduled with :func:`opals_dsl.runtime.session.run`
  — each task still creates and removes its task folder and writes its step log;
* raw ipyparallel: N ``apply_async`` calls of a no-op function, one message each, round-robin
  over two DirectViews (the fastest one-at-a-time form measured here), then waiting for all.

Prints tasks/s for both and the ratio. ``--tasks 100000`` is the long run; it also prints the
driver's peak resident memory (``--no-raw`` skips the raw comparison). The journal records every
task, as ``opf run`` has it (``--no-journal``: without).

``--sizes 10000,100000`` is the scale check: on one cluster, after a warm-up of
:data:`WARM_UP` tasks that is not counted, for each size in turn, a fresh pipeline of that many
tasks is compiled and run (no raw comparison); printed per size are
tasks/s, its ratio to the smallest size's (1.00: no per-task cost that grows with the run), the
driver's peak resident memory while that size compiled and ran (the high-water mark is reset
before each size, where Linux allows it) and the growth of that peak per 100,000 tasks.

    python benchmarks/runtime_overhead.py                # 2,000 tasks
    python benchmarks/runtime_overhead.py --tasks 100000 --no-raw
    python benchmarks/runtime_overhead.py --sizes 10000,100000,300000
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import re
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from opals_dsl.api import compile_file
from opals_dsl.lang.compile import load, plan_table
from opals_dsl.runtime import session
from opals_dsl.runtime.cluster import ClusterOptions
from opals_dsl.runtime.connect import open_cluster
from opals_dsl.runtime.paths import remove_tree

PIPELINE = """
pipeline overhead
param n = {n}
job noop for i in range(n) {{
    output "results" flat
    step nothing {{
        {action}
    }}
}}
"""


#: tasks run on a fresh cluster before the sizes of ``--sizes``, not counted: the engines'
#: first tasks (imports, first folders) would make the smallest size look slow
WARM_UP = 1000


def noop() -> None:
    return None


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset this process's high-water mark of resident memory (Linux 4.0 and later)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_since_reset_mib() -> float:
    """The high-water mark of resident memory (VmHWM), or the process's peak if not readable."""
    with contextlib.suppress(OSError, AttributeError):
        with open("/proc/self/status") as f:
            found = re.search(r"VmHWM:\s+(\d+) kB", f.read())
        return int(found.group(1)) / 1024
    return peak_rss_mib()


def make_plan(path: Path, graph: bool) -> Any:
    """The plan of ``path`` as ``opf run`` holds it (the plan table), or with ``graph`` as the
    library's ``compile_file`` gives it."""
    return compile_file(path) if graph else plan_table(load(path))


def write_pipeline(folder: Path, tasks: int, step: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "noopmod.py").write_text("def nothing():\n    return None\n")
    action = "call noopmod:nothing()" if step == "call" else "run true"
    (folder / "overhead.opf").write_text(PIPELINE.format(n=tasks, action=action))
    return folder / "overhead.opf"


def scale(args: argparse.Namespace, sizes: list[int]) -> int:
    """Each size on one cluster: tasks/s, its ratio to the smallest size's, peak memory."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="opf-bench-") as tmp:
        base = Path(tmp)
        with open_cluster(ClusterOptions(engines=args.engines), base / ".opf-cluster",
                          scratch=str(base / "scratch")) as executor:
            executor.client[:].apply_sync(noop)
            for k, n in enumerate([WARM_UP, *sizes]):
                folder = base / f"n{n}"
                path = write_pipeline(folder, n, args.step)
                gc.collect()
                exact = reset_peak_rss()
                plan = make_plan(path, args.graph)
                t0 = time.perf_counter()
                summary = session.run(plan, executor=executor, state_dir=folder / ".opf",
                                      resume=args.journal)
                took = time.perf_counter() - t0
                assert summary.exit_code == 0, summary.failures[:1]
                peak = peak_rss_since_reset_mib() if exact else peak_rss_mib()
                del plan, summary
                if k == 0:
                    print(f"warm-up: {n:,} tasks at {n / took:,.0f} tasks/s (not counted)",
                          flush=True)
                else:
                    rows.append((n, n / took, peak))
                    print(f"{n:>9,} tasks in {took:8.1f} s = {n / took:7,.0f} tasks/s, "
                          f"driver peak RSS {peak:6.0f} MiB", flush=True)
                remove_tree(str(folder))
    first_n, first_rate, first_peak = rows[0]
    print(f"\n{'tasks':>9}  {'tasks/s':>8}  {'ratio':>5}  {'peak MiB':>8}  {'MiB/100k':>8}")
    for n, rate, peak in rows:
        slope = (f"{(peak - first_peak) / (n - first_n) * 100_000:8.1f}" if n != first_n
                 else f"{'':>8}")
        print(f"{n:>9,}  {rate:>8,.0f}  {rate / first_rate:5.2f}  {peak:8.0f}  {slope}")
    print(f"(plan as {'graph' if args.graph else 'table'}, "
          f"journal {'on' if args.journal else 'off'}, {args.engines} engines, "
          f"{args.step} step; ratio: tasks/s against {first_n:,} tasks; MiB/100k: growth "
          f"of the peak per 100,000 tasks from {first_n:,})")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--engines", type=int, default=2)
    parser.add_argument("--step", choices=("call", "run"), default="call")
    parser.add_argument("--no-raw", action="store_true", help="skip raw apply_async")
    parser.add_argument("--graph", action="store_true",
                        help="run the plan as a networkx graph (the library's compile_file) "
                        "instead of the compact table opf run uses")
    parser.add_argument("--journal", action=argparse.BooleanOptionalAction, default=True,
                        help="record finished tasks in the journal, as opf run does (default)")
    parser.add_argument("--sizes", help="comma-separated task counts, run one after the other "
                        "on one cluster: tasks/s and peak memory per size")
    args = parser.parse_args()
    if args.sizes:
        return scale(args, sorted(int(x) for x in args.sizes.split(",") if x.strip()))

    with tempfile.TemporaryDirectory(prefix="opf-bench-") as tmp:
        folder = Path(tmp)
        path = write_pipeline(folder, args.tasks, args.step)
        t0 = time.perf_counter()
        plan = make_plan(path, args.graph)
        compile_s = time.perf_counter() - t0
        rss_plan = peak_rss_mib()
        print(f"plan: {args.tasks} tasks, {len(plan.nodes)} nodes, compiled in "
              f"{compile_s:.2f} s; peak RSS so far {rss_plan:.0f} MiB")
        state = folder / ".opf"
        t0 = time.perf_counter()
        with open_cluster(ClusterOptions(engines=args.engines), state,
                          scratch=str(folder / "scratch")) as executor:
            print(f"cluster of {args.engines} engines up in {time.perf_counter() - t0:.2f} s")
            client = executor.client
            client[:].apply_sync(noop)  # engines warm (imports done) for both contenders

            t0 = time.perf_counter()
            summary = session.run(plan, executor=executor, state_dir=state,
                                  resume=args.journal)
            runtime_s = time.perf_counter() - t0
            assert summary.exit_code == 0, summary.failures[:1]
            runtime_rate = args.tasks / runtime_s
            print(f"runtime: {args.tasks} tasks in {runtime_s:.2f} s = {runtime_rate:,.0f} "
                  f"tasks/s ({args.step} step)")

            if not args.no_raw:
                views = [client[i] for i in client.ids]
                t0 = time.perf_counter()
                results = [views[i % len(views)].apply_async(noop) for i in range(args.tasks)]
                for ar in results:
                    ar.get()
                raw_s = time.perf_counter() - t0
                raw_rate = args.tasks / raw_s
                print(f"raw apply_async: {args.tasks} calls in {raw_s:.2f} s = "
                      f"{raw_rate:,.0f} calls/s")
                print(f"ratio runtime / raw: {runtime_rate / raw_rate:.2f}x")
        print(f"driver peak RSS: {peak_rss_mib():.0f} MiB (after compiling: {rss_plan:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
