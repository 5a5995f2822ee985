"""How well the scheduler packs steps of different widths onto a machine's engine slots.

Starts one embedded cluster (one machine, ``--engines`` engines, default 2), then runs a mixed
pipeline through :func:`opals_dsl.runtime.session.run`: ``--narrow`` tasks whose step takes one
slot and sleeps ``--narrow-seconds``, and ``--wide`` tasks whose step says ``threads 2`` (or
``--threads``) and sleeps ``--wide-seconds``. The steps are ``call`` steps (a ``time.sleep`` in
the engine), so their length is known.

The baseline is the ideal packing bound: the total thread-seconds divided by the slots (no
schedule can finish sooner). Printed: the run's wall time, the bound from the steps' written
lengths and from their lengths as measured in the trace, and wall time / bound as a ratio
(1.00 is perfect packing; what is above it is idle slots plus the runtime's own overhead).

    python benchmarks/packing.py
    python benchmarks/packing.py --engines 4 --narrow 40 --wide 10 --threads 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from opals_dsl.api import compile_file
from opals_dsl.plan import trace
from opals_dsl.runtime import session
from opals_dsl.runtime.cluster import ClusterOptions
from opals_dsl.runtime.connect import open_cluster

PIPELINE = """
pipeline packing
job wide for i in range({wide}) {{
    threads {threads}
    step s {{
        call sleeper:sleep(seconds = {wide_seconds})
    }}
}}
job narrow for i in range({narrow}) {{
    step s {{
        call sleeper:sleep(seconds = {narrow_seconds})
    }}
}}
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", type=int, default=2)
    parser.add_argument("--narrow", type=int, default=16)
    parser.add_argument("--narrow-seconds", type=float, default=0.4)
    parser.add_argument("--wide", type=int, default=4)
    parser.add_argument("--wide-seconds", type=float, default=0.8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="opf-packing-") as tmp:
        folder = Path(tmp)
        (folder / "sleeper.py").write_text("import time\n\n\ndef sleep(seconds):\n"
                                           "    time.sleep(seconds)\n")
        (folder / "packing.opf").write_text(PIPELINE.format(
            wide=args.wide, threads=args.threads, wide_seconds=args.wide_seconds,
            narrow=args.narrow, narrow_seconds=args.narrow_seconds))
        plan = compile_file(folder / "packing.opf")
        state = folder / ".opf"
        thread_seconds = (args.narrow * args.narrow_seconds
                          + args.wide * args.threads * args.wide_seconds)
        bound = thread_seconds / args.engines
        with open_cluster(ClusterOptions(engines=args.engines), state,
                          scratch=str(folder / "scratch")) as executor:
            executor.client[:].apply_sync(time.time)  # engines warm
            t0 = time.perf_counter()
            summary = session.run(plan, executor=executor, state_dir=state, resume=False)
            wall = time.perf_counter() - t0
        assert summary.exit_code == 0, summary.failures[:1]
        measured = 0.0
        # the trace lies in this run's records: runs/<pipeline>/<N>/ of the state folder
        records = trace.runs_folder(state, "packing")
        rows, _ = trace.read_trace(
            records / str(trace.run_numbers(state, "packing")[-1]) / trace.TRACE_FILE)
        for row in rows:
            if row["kind"] == "exec" and row["start"] is not None:
                width = args.threads if row["job"] == "wide" else 1
                measured += (row["end"] - row["start"]) * width
        measured_bound = measured / args.engines
        print(f"{args.narrow} tasks of 1 thread x {args.narrow_seconds} s and {args.wide} of "
              f"{args.threads} threads x {args.wide_seconds} s on {args.engines} engines")
        print(f"wall time: {wall:.2f} s")
        print(f"ideal packing bound: {bound:.2f} s (written lengths), "
              f"{measured_bound:.2f} s (lengths measured in the trace)")
        print(f"packing ratio wall / bound: {wall / bound:.2f}x "
              f"(against the measured lengths: {wall / measured_bound:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
