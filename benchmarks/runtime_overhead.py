"""How much the runtime costs per task, against raw ipyparallel on the same cluster.

Starts one embedded 2-engine cluster (as ``opf run -n 2`` does), then in the same run:

* the runtime: a pipeline of N one-step tasks whose step does nothing (``call`` of a no-op
  function by default, ``--step run`` for ``run true``, a process per task), compiled from a
  real ``.opf`` file and scheduled with :func:`opals_dsl.runtime.session.run` — each task still
  creates and removes its task folder and writes its step log;
* raw ipyparallel: N ``apply_async`` calls of a no-op function, one message each, round-robin
  over two DirectViews (the fastest one-at-a-time form measured here), then waiting for all.

Prints tasks/s for both and the ratio. ``--tasks 100000`` is the long run; it also prints the
driver's peak resident memory (``--no-raw`` skips the raw comparison).

    python benchmarks/runtime_overhead.py                # 2,000 tasks
    python benchmarks/runtime_overhead.py --tasks 100000 --no-raw
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

from opals_dsl.api import compile_file
from opals_dsl.runtime import session
from opals_dsl.runtime.cluster import ClusterOptions
from opals_dsl.runtime.connect import open_cluster

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


def noop() -> None:
    return None


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--engines", type=int, default=2)
    parser.add_argument("--step", choices=("call", "run"), default="call")
    parser.add_argument("--no-raw", action="store_true", help="skip raw apply_async")
    parser.add_argument("--journal", action="store_true",
                        help="record finished tasks in the journal, as opf run does")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="opf-bench-") as tmp:
        folder = Path(tmp)
        (folder / "noopmod.py").write_text("def nothing():\n    return None\n")
        action = "call noopmod:nothing()" if args.step == "call" else "run true"
        (folder / "overhead.opf").write_text(PIPELINE.format(n=args.tasks, action=action))
        t0 = time.perf_counter()
        plan = compile_file(folder / "overhead.opf")
        compile_s = time.perf_counter() - t0
        rss_plan = peak_rss_mib()
        print(f"plan: {args.tasks} tasks, {plan.number_of_nodes()} nodes, compiled in "
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
