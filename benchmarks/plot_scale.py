"""Draw how ``opf compile`` and Snakemake's dry run grow with the number of tasks.

The figures are those of ``benchmarks/compile_scale.py`` (``--json``): for each source (a glob
over N files, a ``lines()`` list of N values) and N from 1,000 to 1,000,000, the processor time,
wall time and peak resident memory of ``opf compile --json`` and of ``snakemake -n`` over the
same two-step shape. They are kept in ``benchmarks/scale.json``; the picture is
``benchmarks/scale.png`` (log-log: time against tasks above, memory against tasks below, one
column a source).

Without ``--measure`` nothing is measured: the picture is redrawn from the saved figures, so
restyling it costs a second. ``--measure`` runs compile_scale.py and merges what it printed into
the saved figures: a point measured again replaces the old one, the others stay, each run keeps
its own date, commit and load average (shown under the picture). ``--tools opf`` measures opf
alone and keeps Snakemake's points (Snakemake's do not change with opf's code, and take long).
A Snakemake dry run still going after ``--snakemake-timeout`` seconds is stopped and left out of
the picture, which says so.

    python benchmarks/plot_scale.py                                  # redraw from scale.json
    python benchmarks/plot_scale.py --table                          # ... and print a table
    python benchmarks/plot_scale.py --measure                        # measure all, then draw
    python benchmarks/plot_scale.py --measure --tools opf --repeat 3 # opf again, best of 3
    python benchmarks/plot_scale.py --measure --sizes 1000,10000 \\
        --data /tmp/scale.json --out /tmp/scale.png                  # a quick try elsewhere

Needs matplotlib (and Snakemake for its side): ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZES = "1000,10000,100000,1000000"
#: what is drawn: (key in a row of compile_scale's JSON, label, colour)
TOOLS = (("opf_cli", "opf compile --json", "tab:blue"),
         ("snakemake", "snakemake -n", "tab:orange"))


def measure(args: argparse.Namespace) -> dict:
    """Run compile_scale.py (its table shows as it goes) and return the JSON it wrote."""
    with tempfile.TemporaryDirectory(prefix="opf-plot-scale-") as tmp:
        out = Path(tmp) / "scale.json"
        argv = [sys.executable, str(HERE / "compile_scale.py"), "--sizes", args.sizes,
                "--kinds", args.kinds, "--tools", args.tools, "--repeat", str(args.repeat),
                "--snakemake-timeout", str(args.snakemake_timeout), "--json", str(out)]
        if args.workdir:
            argv += ["--workdir", args.workdir]
        status = subprocess.run(argv, check=False).returncode
        if not out.exists():
            raise SystemExit(f"compile_scale.py measured nothing (exit {status})")
        run = json.loads(out.read_text(encoding="utf-8"))
    run["tools"] = [t for t, _, _ in TOOLS if any(t in row for row in run["rows"])]
    return run


def points(runs: list[dict]) -> dict[tuple[str, str, int], tuple[int, dict]]:
    """Each (tool, source, tasks) with the index of the latest run that measured it, and its
    figures (a later run replaces an earlier one's point)."""
    latest: dict[tuple[str, str, int], tuple[int, dict]] = {}
    for index, run in enumerate(runs):
        for row in run["rows"]:
            for tool in run.get("tools", [t for t, _, _ in TOOLS]):
                if row.get(tool):
                    latest[(tool, row["source"], row["tasks"])] = (index, row[tool])
    return latest


def merge(saved: dict, run: dict) -> dict:
    """The saved figures with ``run`` added; runs none of whose points are still drawn go."""
    runs = [*saved.get("runs", []), run]
    used = {index for index, _ in points(runs).values()}
    return {"runs": [r for i, r in enumerate(runs) if i in used]}


def describe(run: dict) -> str:
    load = "/".join(f"{x:g}" for x in run["load_before"][:1] + run.get("load_after", [])[:1])
    what = " and ".join(
        f"opf {run['opf_commit']}" if t == "opf_cli" else f"Snakemake {run['snakemake_version']}"
        for t in run.get("tools", []))
    best = f", best of {run['repeat']}" if run.get("repeat", 1) > 1 and "opf_cli" in run.get(
        "tools", []) else ""
    return (f"{run['started'][:16].replace('T', ' ')} UTC: {what}{best}; {run['cores']} cores, "
            f"{run['memory_gib']:g} GiB, Python {run['python']}, load average {load} (start/end)")


def count(value: float, _pos: object = None) -> str:
    """1000 → 1k, 1000000 → 1M: an axis of task counts."""
    for size, suffix in ((1e6, "M"), (1e3, "k")):
        if value >= size:
            return f"{value / size:g}{suffix}"
    return f"{value:g}"


def draw(saved: dict, out: Path, dpi: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    latest = points(saved["runs"])
    sources = sorted({source for _, source, _ in latest}, key=["glob", "lines"].index)
    fig, axes = plt.subplots(2, len(sources), figsize=(5 * len(sources), 7.6), sharex=True,
                             sharey="row", squeeze=False)
    left_out = []
    for col, source in enumerate(sources):
        time_ax, mem_ax = axes[0][col], axes[1][col]
        for tool, label, colour in TOOLS:
            got = sorted((n, fig_) for (t, s, n), (_, fig_) in latest.items()
                         if t == tool and s == source)
            done = [(n, f) for n, f in got if f.get("status", "ok") == "ok" and f.get("ok", True)]
            left_out += [(label, source, n, f) for n, f in got if (n, f) not in done]
            if not done:
                continue
            tasks = [n for n, _ in done]
            time_ax.plot(tasks, [f["cpu_s"] for _, f in done], "o-", color=colour,
                         label=f"{label}: processor time (user + system)")
            time_ax.plot(tasks, [f["wall_s"] for _, f in done], "s--", color=colour,
                         alpha=0.6, mfc="none", label=f"{label}: wall time")
            mem_ax.plot(tasks, [f["peak_mb"] for _, f in done], "o-", color=colour)
            for n, f in done[-1:]:
                time_ax.annotate(f"{f['cpu_s']:.3g} s", (n, f["cpu_s"]), xytext=(4, -10),
                                 textcoords="offset points", fontsize=8, color=colour)
                mem_ax.annotate(f"{f['peak_mb']:,.0f} MB", (n, f["peak_mb"]), xytext=(4, -10),
                                textcoords="offset points", fontsize=8, color=colour)
        time_ax.set_title("glob over N files" if source == "glob" else "lines(): N values")
        mem_ax.set_xlabel("tasks")
        for ax in (time_ax, mem_ax):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(count))
            ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.margins(x=0.12)
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.grid(True, which="major", alpha=0.4)
            ax.grid(True, which="minor", alpha=0.15)
    axes[0][0].set_ylabel("compile time (s)")
    axes[1][0].set_ylabel("peak resident memory (MB)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=2, fontsize=8,
               bbox_to_anchor=(0.5, 0.96), frameon=False)
    notes = [describe(run) for run in saved["runs"]]
    for label, source, n, f in left_out:
        if f.get("status") == "timeout":
            why = (f"unfinished after {f['wall_s']:.0f} s, stopped, having used "
                   f"{f['cpu_s']:.0f} CPU s and {f['peak_mb']:,.0f} MB")
        else:
            why = "failed"
        notes.append(f"Left out: {label}, {source}, {n:,} tasks ({why}).")
    fig.suptitle("Planning a pipeline of two steps a task: time and peak memory")
    fig.text(0.01, 0.01, "\n".join(notes), fontsize=7, va="bottom", ha="left")
    fig.tight_layout(rect=(0, 0.02 + 0.02 * len(notes), 1, 0.93))
    fig.savefig(out, dpi=dpi)
    plt.close(fig)


def table(saved: dict) -> str:
    """The drawn figures as a Markdown table, one row a source and size."""
    latest = points(saved["runs"])
    lines = ["| tasks | source | opf wall s | opf CPU s | opf peak MB | snakemake -n wall s "
             "| snakemake CPU s | snakemake peak MB |", "|--:|---|--:|--:|--:|--:|--:|--:|"]
    for n, source in sorted({(n, s) for _, s, n in latest}):
        cells = [f"{n:,}", source]
        for tool in ("opf_cli", "snakemake"):
            f = latest.get((tool, source, n), (0, None))[1]
            if f is None:
                cells += ["—"] * 3
            elif f.get("status", "ok") == "timeout":
                cells += [f"> {f['wall_s']:.0f} (stopped)", f"{f['cpu_s']:.0f} so far",
                          f"{f['peak_mb']:,.0f} so far"]
            else:
                cells += [f"{f['wall_s']:.2f}", f"{f['cpu_s']:.2f}", f"{f['peak_mb']:,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--measure", action="store_true",
                    help="run compile_scale.py first (else redraw from --data)")
    ap.add_argument("--sizes", default=SIZES, help="task counts to measure (default: %(default)s)")
    ap.add_argument("--kinds", default="glob,lines", help="sources to measure: glob, lines")
    ap.add_argument("--tools", default="opf,snakemake", help="opf, snakemake or both")
    ap.add_argument("--repeat", type=int, default=1, help="opf runs per figure; the best counts")
    ap.add_argument("--snakemake-timeout", type=float, default=600.0, metavar="S",
                    help="leave out a longer Snakemake dry run (default: %(default)g)")
    ap.add_argument("--workdir", help="keep the pipeline folders here and reuse them (the "
                    "1,000,000 files of the largest glob take minutes to write)")
    ap.add_argument("--data", type=Path, default=HERE / "scale.json",
                    help="the saved figures (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=HERE / "scale.png",
                    help="the picture (default: %(default)s)")
    ap.add_argument("--dpi", type=int, default=100)
    ap.add_argument("--table", action="store_true",
                    help="also print the figures as a Markdown table")
    args = ap.parse_args(argv)

    saved = json.loads(args.data.read_text(encoding="utf-8")) if args.data.exists() else {}
    if args.measure:
        saved = merge(saved, measure(args))
        tmp = args.data.with_name(args.data.name + ".tmp")
        tmp.write_text(json.dumps(saved, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, args.data)
    if not saved.get("runs"):
        raise SystemExit(f"no figures in {args.data}: run with --measure first")
    draw(saved, args.out, args.dpi)
    print(f"wrote {args.out}")
    if args.table:
        print(table(saved))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
