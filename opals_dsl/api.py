"""opf as a Python library, for scripts and notebooks: load and check a pipeline file, plan it,
draw it, run it — through the same stages as ``opf check``, ``opf compile`` and ``opf run``::

    import opals_dsl as opf

    pipeline = opf.load("strips.opf", params={"cell": "50"})  # PipelineError: every finding
    pipeline.warnings                                         # likely mistakes; strict=True
    plan = pipeline.plan()                                    # the networkx plan
    opf.draw(plan, level="job")                               # shown as a picture in a notebook
    summary = opf.run(pipeline, client=rc)                    # on engines you already have

:func:`run` goes through :func:`opals_dsl.runtime.session.run`, the one place a run is wired. Given
``client`` (an ``ipyparallel.Client``) it runs on that cluster's engines and leaves the cluster
as it found it; otherwise it starts an embedded cluster of ``n`` engines for the run and stops
it after. The state folder defaults to ``.opf`` beside the pipeline file, as ``opf run``'s.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx

from .errors import OpfError, PipelineError, PlanError, UsageError
from .lang.compile import Loaded, check_scratch, compile_file, load, plan, plan_table
from .lang.protect import STATE_FOLDER, Protected, default_state_dir
from .plan import model
from .plan.dot import to_dot, to_job_dot
from .plan.select import select, targets_of
from .runtime import session
from .runtime.cluster import ClusterOptions
from .runtime.events import RunListener, RunSummary
from .runtime.executor import IPyParallelExecutor
from .runtime.notebook import in_kernel, widget_progress
from .runtime.progress import Progress


def run(pipeline: Loaded | nx.DiGraph | str | Path, *,
        params: Mapping[str, str] | None = None, client: Any = None, n: int | None = None,
        only: Sequence[str] | None = None, state_dir: str | Path | None = None,
        cluster: ClusterOptions | None = None, progress: bool | RunListener = True,
        scratch: str | None = None, **options: Any) -> RunSummary:
    """Run a pipeline — a :func:`load`-ed one, a plan, or a pipeline file (compiled with
    ``params``) — and return its summary.

    ``client``: an ``ipyparallel.Client`` whose engines run the tasks; the cluster is neither
    started nor stopped here. Without it an embedded cluster of ``n`` engines (default: one per
    core), or the one ``cluster`` describes, is started and stopped. ``only``: the targets of
    ``opf run --only`` (``JOB`` or ``JOB/TASK``). ``progress``: True shows the run (a widget in a
    notebook when ipywidgets is installed, else lines), False shows nothing, or a listener of
    your own. Further options are :func:`opals_dsl.runtime.session.run`'s (``force``,
    ``keep_going``, ``retries``, ``checksum``, ...).

    A run interrupted (Ctrl-C, an interrupted kernel, SIGTERM) is stopped as ``opf run`` stops
    it, then raises ``KeyboardInterrupt`` with the run's summary as its ``summary``: a script
    or a loop of runs stops there, as at any other Ctrl-C (a script not catching it ends as
    one ended by Ctrl-C does, status 130 in a shell)."""
    with _summary_if_interrupted():
        return _run(pipeline, params, client, n, only, state_dir, cluster, progress, scratch,
                    options)


@contextlib.contextmanager
def _summary_if_interrupted() -> Iterator[None]:
    """A run interrupted before it began (while its pipeline was compiled) raises a
    KeyboardInterrupt with a summary too: of no task."""
    began = time.time()
    try:
        yield
    except KeyboardInterrupt as stopped:
        if getattr(stopped, "summary", None) is None:
            stopped.summary = RunSummary(  # type: ignore[attr-defined]
                started=began, finished=time.time(), interrupted=True)
        raise


def _run(pipeline: Loaded | nx.DiGraph | str | Path, params: Mapping[str, str] | None,
         client: Any, n: int | None, only: Sequence[str] | None,
         state_dir: str | Path | None, cluster: ClusterOptions | None,
         progress: bool | RunListener, scratch: str | None,
         options: dict[str, Any]) -> RunSummary:
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:  # before anything is compiled or started
        raise TypeError(f"run() got an unexpected option {unknown[0]!r}; its options are "
                        f"{', '.join(sorted(_OPTIONS))}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise UsageError(f"n is a number of engines, 1 or more, not {n!r} (None: one per core)")
    if client is not None and (n is not None or cluster is not None):
        raise UsageError("run takes a client or the engines to start (n, cluster), not both")
    graph, default_state, loaded = _plan_of(pipeline, params, whole=not only)
    if only:
        graph = select(graph, only)
        if options.get("force") is True:  # as opf run --only --force: the targets
            options = {**options, "force": targets_of(only)}
    if n is not None:
        cluster = ClusterOptions(engines=n)
    executor = None
    if client is not None:
        executor = IPyParallelExecutor(client, scratch=scratch)
    listener = _listener(progress, model.info(graph).pipeline)
    for warning in loaded.warnings if loaded is not None else ():  # as opf run shows them
        listener.warning(f"{warning.span}: {warning.message}" if warning.span
                         else warning.message)
    # no output may be copied back into the opf folder of a scratch root the engines report
    guard = None if loaded is None else functools.partial(check_scratch, loaded, graph)
    summary = session.run(graph, state_dir=state_dir or default_state, cluster=cluster,
                          executor=executor, scratch=scratch, listener=listener, guard=guard,
                          end_after_interrupt=False, **options)
    if summary.interrupted:
        # exactly KeyboardInterrupt: Python then ends an uncaught one as killed by SIGINT
        stopped = KeyboardInterrupt(f"the run was interrupted: {summary.done} of "
                                    f"{summary.total} tasks done; the journal keeps what "
                                    f"finished")
        stopped.summary = summary  # type: ignore[attr-defined]
        raise stopped
    return summary


def _plan_of(pipeline: Loaded | nx.DiGraph | str | Path, params: Mapping[str, str] | None,
             whole: bool = False) -> tuple[nx.DiGraph, Path, Loaded | None]:
    """The plan, the default state folder, and the checked pipeline when there is one;
    ``whole``: a plan made here is only run as a whole, and made as the compact table
    ``opf run`` runs (:mod:`opals_dsl.plan.table`)."""
    if isinstance(pipeline, nx.DiGraph):
        return pipeline, Path(model.info(pipeline).root) / STATE_FOLDER, None
    if isinstance(pipeline, Loaded):
        if params:
            raise UsageError("a loaded pipeline has its parameters: give params to load()")
        loaded = pipeline
    else:
        loaded = load(pipeline, params)
    made = plan_table(loaded) if whole else loaded.plan()
    return made, default_state_dir(loaded.path.resolve()), loaded


#: what ``run`` passes on to :func:`opals_dsl.runtime.session.run` (and its scheduler)
_OPTIONS = frozenset({"force", "keep_going", "retries", "checksum", "resume", "skip",
                      "depth", "batch_seconds", "max_batch", "engine_wait", "interrupt_wait",
                      "run_id"})


def _listener(progress: bool | RunListener, title: str) -> RunListener:
    if isinstance(progress, RunListener):
        return progress
    if not progress:
        return RunListener()  # nothing shown: the summary says what happened
    widget = widget_progress(title)
    if widget is not None:
        return widget
    # in a notebook without widgets the lines go to the cell's output, else to standard error
    stream = sys.stdout if in_kernel() else sys.stderr
    return Progress(stream=stream, title=title, interactive=False)


@dataclass(frozen=True)
class Drawing:
    """A plan drawn with Graphviz: ``source`` is its DOT text; a notebook shows it as a picture
    when Graphviz's ``dot`` program is installed, and as the DOT text otherwise."""

    source: str

    def svg(self) -> str | None:
        """The drawing as SVG, or None without Graphviz."""
        exe = shutil.which("dot")
        if exe is None:
            return None
        done = subprocess.run([exe, "-Tsvg"], input=self.source, capture_output=True,
                              text=True, check=False)
        return done.stdout if done.returncode == 0 else None

    def _repr_svg_(self) -> str | None:
        return self.svg()

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # without Graphviz: the text
        printer.text(self.source)

    def __str__(self) -> str:
        return self.source


def draw(pipeline: Loaded | nx.DiGraph, level: str = "task") -> Drawing:
    """The plan drawn as ``opf compile --dot`` draws it: every task (``level="task"``) or one
    node per job step (``level="job"``, for large plans)."""
    graph = pipeline.plan() if isinstance(pipeline, Loaded) else pipeline
    if level not in ("task", "job"):
        raise UsageError(f"level is 'task' or 'job', not {level!r}")
    return Drawing(to_job_dot(graph) if level == "job" else to_dot(graph))


__all__ = ["Loaded", "load", "plan", "draw", "Drawing", "compile_file", "run", "select",
           "OpfError", "PipelineError", "PlanError", "UsageError", "Protected", "RunSummary",
           "ClusterOptions"]
