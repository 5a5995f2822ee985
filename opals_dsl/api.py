"""opf as a Python library: load and check a pipeline file, plan it, run it — the same stages
``opf check``, ``opf compile`` and ``opf run`` go through::

    from opals_dsl import api as opf

    pipeline = opf.load("strips.opf", {"cell": "50"})  # PipelineError with every finding
    plan = opf.plan(pipeline)                          # the networkx plan
    summary = opf.run(plan)                            # as `opf run strips.opf` does

:func:`run` is :func:`opals_dsl.run.session.run`, the one place a run is wired; with a
pipeline file instead of a plan it compiles the file first, and its state folder defaults to
``.opf`` beside the file, as ``opf run``'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import networkx as nx

from .errors import PipelineError, PlanError
from .lang.compile import Loaded, compile_file, load, plan
from .lang.protect import STATE_FOLDER, Protected, default_state_dir
from .plan import model
from .run import session
from .run.cluster import ClusterOptions
from .run.events import RunSummary


def run(pipeline: nx.DiGraph | str | Path, *, params: Mapping[str, str] | None = None,
        state_dir: str | Path | None = None, cluster: ClusterOptions | None = None,
        **options: Any) -> RunSummary:
    """Run a plan, or the pipeline file ``pipeline`` (compiled with ``params``); see
    :func:`opals_dsl.run.session.run` for ``cluster``, ``executor`` and the other options.
    The state folder defaults to ``.opf`` beside the pipeline file."""
    if isinstance(pipeline, nx.DiGraph):
        graph = pipeline
        if state_dir is None:
            state_dir = Path(model.info(graph).root) / STATE_FOLDER
    else:
        graph = compile_file(pipeline, params)
        if state_dir is None:
            state_dir = default_state_dir(Path(pipeline).resolve())
    return session.run(graph, state_dir=state_dir, cluster=cluster, **options)


__all__ = ["Loaded", "load", "plan", "compile_file", "run", "PipelineError", "PlanError",
           "Protected", "RunSummary", "ClusterOptions"]
