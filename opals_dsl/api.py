"""The front end and planner in one call: pipeline file → checked plan.

:func:`load` parses and checks a file (every mistake collected); :func:`compile_file` also
lowers it to the plan graph. Both raise a :class:`~opals_dsl.errors.PipelineError` whose
``render()`` is what ``opf`` prints.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import networkx as nx

from . import nodes as n
from .check import check
from .errors import OpfCheckError, PipelineError, PlanError
from .parse import parse
from .plan import build_plan
from .source import SourceFile


@dataclass(frozen=True, slots=True)
class Loaded:
    """A parsed and checked pipeline file."""

    path: Path
    source: SourceFile
    pipeline: n.Pipeline
    params: dict[str, object]

    @property
    def name(self) -> str:
        return self.pipeline.name.value if self.pipeline.name else self.path.stem


def load(path: str | Path, params: Mapping[str, str] | None = None) -> Loaded:
    """Parse and check a pipeline file; raises with every mistake found."""
    path = Path(path)
    source = SourceFile.read(path)
    pipeline = parse(source)
    values, diagnostics = check(pipeline, source, params or {})
    if diagnostics:
        raise OpfCheckError(diagnostics)
    return Loaded(path, source, pipeline, values)


def plan(loaded: Loaded) -> nx.DiGraph:
    """Lower a checked pipeline to its plan graph."""
    graph = build_plan(
        loaded.pipeline, loaded.source, str(loaded.path.parent.resolve()), loaded.params,
        loaded.name,
    )
    graph.graph["source"] = loaded.path.name
    return graph


def compile_file(path: str | Path, params: Mapping[str, str] | None = None) -> nx.DiGraph:
    """Parse, check and plan a pipeline file: the plan, or a :class:`PipelineError`."""
    return plan(load(path, params))


__all__ = ["Loaded", "load", "plan", "compile_file", "PipelineError", "PlanError"]
