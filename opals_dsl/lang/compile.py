"""The language's façade: pipeline file → parse → check → lower → plan.

:func:`load` parses and checks a file (every mistake collected; where there are check errors,
the planner's findings too, planned leniently around the unknown names); :func:`plan` lowers a
checked pipeline to the plan graph; :func:`compile_file` does both. They raise a
:class:`~opals_dsl.errors.PipelineError` whose ``render()`` is what ``opf`` prints.
"""

from __future__ import annotations

import gc
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import networkx as nx

from ..errors import OpfCheckError, OpfSyntaxError, PipelineError, PlanError
from ..plan import model
from ..source import SourceFile
from . import nodes as n
from .check import check
from .lower import build_plan
from .parse import parse
from .protect import Protected


@dataclass(frozen=True, slots=True)
class Loaded:
    """A parsed and checked pipeline file."""

    path: Path
    source: SourceFile
    pipeline: n.Pipeline
    params: dict[str, object]
    #: where no output may be copied back
    protected: Protected | None = None

    @property
    def name(self) -> str:
        return self.pipeline.name.value if self.pipeline.name else self.path.stem

    def plan(self) -> nx.DiGraph:
        """The pipeline lowered to its plan graph."""
        return plan(self)


def load(path: str | Path, params: Mapping[str, str] | None = None, *,
         protected: Protected | None = None) -> Loaded:
    """Parse and check a pipeline file; raises with every mistake found. ``protected``: where
    no output may be copied back (default: :meth:`Protected.for_pipeline`)."""
    path = Path(path)
    source = SourceFile.read(path)
    if protected is None:
        protected = Protected.for_pipeline(path)
    # the parse makes millions of small objects in a large file and frees none of them: the
    # cyclic collector would walk them again and again (half the time of a 100,000-job file)
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _load(path, source, params, protected)
    finally:
        if collecting:
            gc.enable()


def _load(path: Path, source: SourceFile, params: Mapping[str, str] | None,
          protected: Protected) -> Loaded:
    try:
        pipeline = parse(source)
    except OpfSyntaxError as exc:
        tree = getattr(exc, "pipeline", None)
        if tree is None:  # the parse stopped: nothing more can be said
            raise
        # a mistake inside a string or run line: the tree is whole, so check it too
        _values, more = check(tree, source, params or {})
        # a check error on the line of a syntax problem only repeats it
        lines = {d.span.line for d in exc.diagnostics if d.span is not None}
        more = [d for d in more if d.span is None or d.span.line not in lines]
        raise OpfSyntaxError([*exc.diagnostics, *more]) from None
    values, diagnostics = check(pipeline, source, params or {})
    if diagnostics:
        # the planner's findings, except at places a check error already explains
        seen = {(d.span.line, d.span.column) for d in diagnostics if d.span is not None}
        more = [
            d for d in _plan_diagnostics(path, source, pipeline, values, protected)
            if d.span is None or (d.span.line, d.span.column) not in seen
        ]
        raise OpfCheckError(diagnostics + more)
    return Loaded(path, source, pipeline, values, protected)


def _plan_diagnostics(
    path: Path, source: SourceFile, pipeline: n.Pipeline, values: dict[str, object],
    protected: Protected,
) -> list:
    """What the planner finds (missing files, clashing destinations) in a pipeline that also
    has check errors, so one run of ``opf check`` reports both. The planner plans leniently
    around unknown names, leaving out what they make impossible to plan."""
    try:
        build_plan(pipeline, source, str(path.parent.resolve()), values,
                   Loaded(path, source, pipeline, values).name, lenient=True,
                   protected=protected)
    except PlanError as exc:
        return list(exc.diagnostics)
    return []


def plan(loaded: Loaded) -> nx.DiGraph:
    """Lower a checked pipeline to its plan graph."""
    graph = build_plan(
        loaded.pipeline, loaded.source, str(loaded.path.parent.resolve()), loaded.params,
        loaded.name, protected=loaded.protected,
    )
    model.set_source(graph, loaded.path.name)
    return graph


def compile_file(path: str | Path, params: Mapping[str, str] | None = None, *,
                 protected: Protected | None = None) -> nx.DiGraph:
    """Parse, check and plan a pipeline file: the plan, or a :class:`PipelineError`.
    ``protected``: where no output may be copied back (default: the pipeline file, ``.opf``
    beside it, and opf's folder in the default scratch root)."""
    return plan(load(path, params, protected=protected))


__all__ = ["Loaded", "load", "plan", "compile_file", "PipelineError", "PlanError", "Protected"]
