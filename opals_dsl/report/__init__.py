"""``opf report``: a run's trace → one self-contained HTML page (timeline, summary, plan).

In: a run's state folder (``trace.jsonl``, one row per plan node as the scheduler wrote it, and
the step logs under ``logs/``), and optionally the plan (``networkx.DiGraph``,
docs/plan-format.md) the run executed. Out: an HTML file that opens offline — its style sheet,
its script and its data are inside it, nothing is fetched.

The page holds
    * a summary: wall time (first node start to last node end), tasks run / skipped / failed /
      retried / not run, bytes staged and copied back;
    * a timeline: one lane per engine, lanes grouped by machine, one bar per node that ran,
      coloured by kind (machine stage, task stage, exec, copy-back); failed nodes are drawn in
      red, nodes of a retry attempt carry a dark band; hovering a bar shows its task, step,
      times, bytes, attempt and exit status and outlines the other nodes of its task;
    * where the time went: engine time per phase (staging and copy-back versus computing),
      busy time per engine, the slowest tasks, every step's run times, and how often each
      machine really ran a job's machine stage (``done``) rather than finding it ready
      (``cached``);
    * the plan at job level (:func:`opals_dsl.plan.dot.to_job_dot`, drawn by Graphviz's ``dot`` and
      inlined as SVG) when a plan is given and Graphviz is installed;
    * why the tasks ran (``why.jsonl`` of the run's records, as the journal decided): how many
      for each kind of reason, and each slowest task's own;
    * every failed node, with the last lines of the step's log for a task's last attempt.

:func:`~opals_dsl.report.analyse.analyse` turns trace rows into plain data (what the page
shows, also embedded in it as JSON, ``<script id="opf-data">``);
:func:`~opals_dsl.report.render.render` writes the page from the package's ``page.html``,
``page.css`` and ``page.js``; :func:`write_report` does both for a state folder. The timeline is
drawn by the page's own small script from that JSON, so a run of many thousands of nodes stays a
compact file; when the script has run it sets ``data-opf-ready`` (the number of bars drawn) on
the ``<html>`` element, or ``data-opf-error``.

A trace cut short (a killed run) is read up to its last complete row. Times are the engines'
clocks (``time.time()``), so lanes of different machines are only as aligned as their clocks.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ReportError
from ..plan.trace import TRACE_FILE, read_trace
from .analyse import analyse
from .render import plan_svg, render

if TYPE_CHECKING:
    import networkx as nx

# -- the page of a state folder --------------------------------------------------------------


def page(state_dir: str | Path, plan: nx.DiGraph | None = None,
         run: Mapping[str, Any] | None = None, links_from: str | Path | None = None) -> str:
    """The report page of the run whose state is in ``state_dir``.

    ``plan`` (the plan that ran) adds the pipeline's name and the job-level plan drawing;
    ``run`` the run's ``number`` and ``status`` as its records tell them (``killed`` for a run
    whose process is gone without ending it); ``links_from`` the folder the page goes to, which
    its links to logs are relative to (absolute without it).
    Raises :class:`ReportError` when ``state_dir`` holds no trace.
    """
    state = Path(state_dir)
    trace = state / TRACE_FILE
    if not trace.is_file():
        raise ReportError(f"there is no trace of a run in {state} (no trace.jsonl); "
                          f"run the pipeline with 'opf run' first")
    rows, bad = read_trace(trace)
    data = analyse(rows, plan, state)
    data["unreadable"] = bad
    data["run"] = dict(run) if run else None
    data["link_base"] = os.path.abspath(links_from) if links_from is not None else None
    if plan is None:
        svg, note = None, ("Give the pipeline file (opf report FILE) to draw its plan here.")
    else:
        svg = plan_svg(plan)
        note = None if svg else ("Graphviz's 'dot' program is not installed, so the plan is "
                                 "not drawn (apt-get install graphviz).")
    return render(data, svg=svg, source=str(trace), plan_note=note)
