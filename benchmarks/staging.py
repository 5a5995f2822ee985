"""How fast opf moves data, against ``cp`` moving the same files the same way.

A "shared drive" folder gets about 1 GiB of input: a few large files and many small ones. Each
task of the pipeline stages one file into its task folder, renames it (``run mv``, no data
moved) and copies it back: every byte crosses two hops, shared drive → scratch → shared drive,
and the copy back is flushed to disk (``fsync``) before it is renamed into place.

The baseline does the same two hops with ``cp`` (as many ``cp`` streams at once as there are
engines), then ``sync`` so that its copies are on disk too. Both run on one embedded cluster in
the same process, alternately, ``--repeat`` times, taking turns at going first; the best times
are compared, and so are the medians. Going first matters on a disk where creating a file costs
more after many deletions (ext4 without a journal skips inodes freed in the last minutes): each
round leaves the other one's deletions behind.

``--step call`` renames with a ``call`` step (a Python function in the engine) instead of
``run mv``: no process is started for the step, so what is left is opf moving the data and
keeping its books.

    python benchmarks/staging.py                     # 4 × 192 MiB + 256 × 1 MiB
    python benchmarks/staging.py --step call
    python benchmarks/staging.py --big 2 --big-mib 64 --small 64 --small-kib 256
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import median

from opals_dsl.api import compile_file
from opals_dsl.runtime import session
from opals_dsl.runtime.cluster import ClusterOptions
from opals_dsl.runtime.connect import open_cluster

#: one job per kind of input file (``big``, ``small``); a kind with no files has no job
JOB = """
job {kind} for f in "data/{kind}/*.bin" {{
    output "results/{kind}" flat
    step keep {{
        out o = "{{f.stem}}.out"
        run mv {{f}} {{o}}
    }}
}}
"""

#: the step of JOB as a ``call``, and the module it calls
CALL_STEP = "call keep:move(src = f, dst = o)"
KEEP_MODULE = "import os\n\n\ndef move(src, dst):\n    os.rename(src, dst)\n"

MIB = 1 << 20


def make_inputs(shared: Path, big: int, big_mib: int, small: int, small_kib: int) -> int:
    block = os.urandom(16 * MIB)
    total = 0
    for kind, count, size in (("big", big, big_mib * MIB), ("small", small, small_kib * 1024)):
        folder = shared / "data" / kind
        folder.mkdir(parents=True)
        for i in range(count):
            with open(folder / f"{kind}{i:04d}.bin", "wb") as f:
                left = size
                while left:
                    chunk = block[: min(left, len(block))]
                    f.write(chunk)
                    left -= len(chunk)
            total += size
    os.sync()
    return total


def cp_two_hops(shared: Path, scratch: Path, jobs: int) -> float:
    files = sorted((shared / "data").rglob("*.bin"))

    def one(src: Path) -> None:
        kind = src.parent.name
        local = scratch / kind / src.name
        local.parent.mkdir(parents=True, exist_ok=True)
        dest = shared / "cp-results" / kind / f"{src.stem}.out"
        dest.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", str(src), str(local)], check=True)
        subprocess.run(["cp", str(local), str(dest)], check=True)
        local.unlink()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, files))
    os.sync()
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--big", type=int, default=4)
    parser.add_argument("--big-mib", type=int, default=192)
    parser.add_argument("--small", type=int, default=256)
    parser.add_argument("--small-kib", type=int, default=1024)
    parser.add_argument("--engines", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--step", choices=("run", "call"), default="run",
                        help="the step that renames the file: run mv (a process) or a call")
    parser.add_argument("--dir", help="where to put the data (default: the temp folder)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="opf-staging-", dir=args.dir) as tmp:
        root = Path(tmp)
        shared = root / "shared"
        t0 = time.perf_counter()
        total = make_inputs(shared, args.big, args.big_mib, args.small, args.small_kib)
        print(f"inputs: {args.big} × {args.big_mib} MiB + {args.small} × {args.small_kib} KiB "
              f"= {total / MIB:.0f} MiB, written in {time.perf_counter() - t0:.1f} s")
        kinds = [kind for kind, count in (("big", args.big), ("small", args.small)) if count]
        pipeline = "pipeline staging\n" + "".join(JOB.format(kind=kind) for kind in kinds)
        if args.step == "call":
            pipeline = pipeline.replace("run mv {f} {o}", CALL_STEP)
            (shared / "keep.py").write_text(KEEP_MODULE)
        (shared / "staging.opf").write_text(pipeline)
        plan = compile_file(shared / "staging.opf")
        scratch = root / "scratch"
        state = root / "state"
        cp_times: list[float] = []
        opf_times: list[float] = []
        with open_cluster(ClusterOptions(engines=args.engines), state,
                          scratch=str(scratch)) as executor:
            for rnd in range(args.repeat):
                cp_s = opf_s = 0.0
                for turn in (("cp", "opf") if rnd % 2 == 0 else ("opf", "cp")):
                    if turn == "cp":
                        cp_s = cp_two_hops(shared, root / "cp-scratch", args.engines)
                        shutil.rmtree(shared / "cp-results")
                        continue
                    t0 = time.perf_counter()
                    summary = session.run(plan, executor=executor, state_dir=state, resume=False)
                    os.sync()  # opf already flushed its copies; this makes the two timings alike
                    opf_s = time.perf_counter() - t0
                    assert summary.exit_code == 0, summary.failures[:1]
                    moved = summary.bytes_staged + summary.bytes_copied
                    shutil.rmtree(shared / "results")
                print(f"round {rnd + 1}: cp {2 * total / MIB / cp_s:,.0f} MiB/s ({cp_s:.2f} s), "
                      f"opf {moved / MIB / opf_s:,.0f} MiB/s ({opf_s:.2f} s, "
                      f"{summary.done} tasks, {moved / MIB:.0f} MiB moved)")
                cp_times.append(cp_s)
                opf_times.append(opf_s)
        for label, cp_s, opf_s in (("best", min(cp_times), min(opf_times)),
                                   ("median", median(cp_times), median(opf_times))):
            print(f"{label}: cp {cp_s:.2f} s, opf {opf_s:.2f} s; opf speed / cp speed = "
                  f"{cp_s / opf_s:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
