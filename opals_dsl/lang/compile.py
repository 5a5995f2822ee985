"""The language's façade: pipeline file → parse → check → lower → plan.

:func:`load` parses and checks a file (every mistake collected; where there are check errors,
the planner's findings too, planned leniently around the unknown names); :func:`plan` lowers a
checked pipeline to the plan graph; :func:`compile_file` does both. They raise a
:class:`~opals_dsl.errors.PipelineError` whose ``render()`` is what ``opf`` prints.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import networkx as nx

from ..errors import (
    Diagnostic,
    OpfCheckError,
    OpfSyntaxError,
    PipelineError,
    PlanError,
    UsageError,
    plural,
)
from ..plan import model
from ..plan.graph import NodeLinkWriter, PlanSink
from ..plan.table import PlanTable
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
    #: the likely mistakes found (diagnostics of severity ``warning``), in the order of the file
    warnings: tuple[Diagnostic, ...] = ()

    @property
    def name(self) -> str:
        return self.pipeline.name.value if self.pipeline.name else self.path.stem

    def __repr__(self) -> str:  # not the whole text and tree: a screenful in a notebook
        return (f"<Loaded pipeline {self.name!r} from {str(self.path)!r}: "
                f"{plural(len(self.pipeline.jobs), 'job')}, params {self.params!r}, "
                f"{plural(len(self.warnings), 'warning')}>")

    def plan(self) -> nx.DiGraph:
        """The pipeline lowered to its plan graph."""
        return plan(self)


def pipeline_name(path: str | Path) -> str:
    """The name of the pipeline in a file (``pipeline NAME``, else the file's stem), read
    without checking the rest: what its runs' records are kept under."""
    path = Path(path)
    source = SourceFile.read(path)
    try:
        tree = parse(source)
    except OpfSyntaxError as exc:
        tree = getattr(exc, "pipeline", None)
        if tree is None:  # a file that does not parse still names its pipeline first
            name = _first_statement_name(source.text)
            if name is None:
                raise
            return name or path.stem
    return tree.name.value if tree.name else path.stem


_PIPELINE_LINE = re.compile(r"pipeline[ \t]+([A-Za-z_][A-Za-z0-9_]*)[ \t]*(#.*)?")


def _first_statement_name(text: str) -> str | None:
    """The name in a file's first statement if it is ``pipeline NAME``, "" if the first
    statement is another (no name: the file's stem), None if it starts as ``pipeline`` but
    is not one (the name cannot be told)."""
    for line in text.lstrip("\ufeff").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _PIPELINE_LINE.fullmatch(line)
        if match is not None:
            return match.group(1)
        return None if line.split(None, 1)[0] == "pipeline" else ""
    return ""


def load(path: str | Path, params: Mapping[str, object] | None = None, *,
         protected: Protected | None = None, strict: bool = False) -> Loaded:
    """Parse and check a pipeline file; raises with every mistake found (and carries the
    warnings). ``params``: values as ``--param`` gives them, or Python numbers and booleans
    (written as the pipeline would write them), or for a list param a list or tuple of those;
    ``protected``: where no output may be copied
    back (default: :meth:`Protected.for_pipeline`); ``strict``: warnings are errors."""
    path = Path(path)
    if params:
        params = {name: _param_text(name, value) for name, value in params.items()}
    source = SourceFile.read(path)
    if protected is None:
        protected = Protected.for_pipeline(path)
    # the parse makes millions of small objects in a large file and frees none of them: the
    # cyclic collector would walk them again and again (half the time of a 100,000-job file)
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _load(path, source, params, protected, strict)
    finally:
        if collecting:
            gc.enable()


def _param_text(name: str, value: object) -> str:
    """A parameter's value as the command line gives it: ``true``/``false`` for booleans, the
    items of a list or tuple joined by commas (an item that holds one cannot be given)."""
    if isinstance(value, list | tuple):
        items = []
        for item in value:
            if isinstance(item, list | tuple):
                raise UsageError(f"params[{name!r}]: a list param's items are strings, "
                                 f"numbers or booleans, not lists")
            text = _param_text(name, item)
            if "," in text:
                raise UsageError(f"params[{name!r}]: the item {text!r} holds a comma, which "
                                 f"separates a list param's items")
            items.append(text)
        return ",".join(items)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return str(value)
    raise UsageError(f"params[{name!r}]: a param's value is a string, a number, a boolean or a "
                     f"list of them, not {type(value).__name__}")


def _load(path: Path, source: SourceFile, params: Mapping[str, str] | None,
          protected: Protected, strict: bool) -> Loaded:
    root = str(path.parent.resolve())
    try:
        pipeline = parse(source)
    except OpfSyntaxError as exc:
        tree = getattr(exc, "pipeline", None)
        if tree is None:  # the parse stopped: nothing more can be said
            raise
        # a mistake inside a string or run line: the tree is whole, so check it too
        _values, more = check(tree, source, params or {}, root)
        # a check error on the line of a syntax problem only repeats it
        lines = {d.span.line for d in exc.diagnostics if d.span is not None}
        more = [d for d in more if d.span is None or d.span.line not in lines]
        # no warnings: what a syntax error leaves of a line (its words) would mislead them
        errors, _warnings = _split(more, strict=False)
        raise OpfSyntaxError([*exc.diagnostics, *errors]) from None
    values, found = check(pipeline, source, params or {}, root)
    diagnostics, warnings = _split(found, strict)
    if diagnostics:
        # the planner's findings, except at places a check error already explains
        seen = {(d.span.line, d.span.column) for d in diagnostics if d.span is not None}
        more = [
            d for d in _plan_diagnostics(path, source, pipeline, values, protected)
            if d.span is None or (d.span.line, d.span.column) not in seen
        ]
        raise OpfCheckError(diagnostics + more, warnings)
    return Loaded(path, source, pipeline, values, protected, tuple(warnings))


def _split(found: list[Diagnostic], strict: bool) -> tuple[list[Diagnostic], list[Diagnostic]]:
    """(errors, warnings); with ``strict`` every warning is an error."""
    errors = [d for d in found if d.severity == "error"]
    warnings = [d for d in found if d.severity != "error"]
    if strict:
        return errors + [w.as_error() for w in warnings], []
    return errors, warnings


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
    """Lower a checked pipeline to its plan graph; a :class:`PlanError` carries the pipeline's
    warnings too."""
    try:
        graph = build_plan(
            loaded.pipeline, loaded.source, str(loaded.path.parent.resolve()), loaded.params,
            loaded.name, protected=loaded.protected,
        )
    except PipelineError as exc:
        raise exc.with_warnings(loaded.warnings) from None
    model.set_source(graph, loaded.path.name)
    return graph


def write_plan(loaded: Loaded, out: TextIO) -> None:
    """Plan a checked pipeline straight into ``out`` as node-link JSON: the text
    :func:`~opals_dsl.plan.graph.write_json` writes for :func:`plan`'s graph, without ever
    holding the graph (a plan of a million tasks needs a fraction of the memory). Raises as
    :func:`plan` does; ``out`` then holds an incomplete text."""
    _plan_into(loaded, NodeLinkWriter(out))


def plan_table(loaded: Loaded) -> PlanTable:
    """Lower a checked pipeline to its plan held compactly for running it
    (:class:`~opals_dsl.plan.table.PlanTable`: what :func:`plan` gives, in a sixth of the
    memory, read through :mod:`~opals_dsl.plan.model`); raises as :func:`plan` does."""
    table = PlanTable()
    _plan_into(loaded, table)
    return table


def count_plan(loaded: Loaded) -> model.PlanCounts:
    """Plan a checked pipeline only to count its jobs, tasks and steps (``opf check``),
    without building the graph; raises as :func:`plan` does."""
    counts = model.PlanCounts()
    _plan_into(loaded, counts)
    return counts


def _plan_into(loaded: Loaded, sink: PlanSink) -> None:
    try:
        build_plan(
            loaded.pipeline, loaded.source, str(loaded.path.parent.resolve()), loaded.params,
            loaded.name, protected=loaded.protected, sink=sink, source_name=loaded.path.name,
        )
    except PipelineError as exc:
        raise exc.with_warnings(loaded.warnings) from None


def compile_file(path: str | Path, params: Mapping[str, str] | None = None, *,
                 protected: Protected | None = None, strict: bool = False) -> nx.DiGraph:
    """Parse, check and plan a pipeline file: the plan, or a :class:`PipelineError`.
    ``protected``: where no output may be copied back (default: the pipeline file, ``.opf``
    beside it, and opf's folder in the default scratch root); ``strict``: warnings are errors.
    The warnings of a pipeline that plans are in :func:`load`'s result."""
    return plan(load(path, params, protected=protected, strict=strict))


def check_scratch(loaded: Loaded, graph: nx.DiGraph, roots: Iterable[str]) -> None:
    """Raise the :class:`PlanError` of the pipeline if one of its outputs would be copied back
    into the opf folder of a scratch root that the engines reported (``roots``): checked once
    the engines are known, before anything is submitted.

    The plan's destinations are looked at first (cheap); only when one is refused is the
    pipeline planned again with those roots, for messages that name its declarations."""
    protected = loaded.protected or Protected.for_pipeline(loaded.path)
    roots = [r for r in dict.fromkeys(roots) if r not in protected.scratch]
    if not roots:
        return
    engines = Protected(scratch=tuple(roots))
    root = model.info(graph).root
    folders = model.destination_folders(graph)
    if any(engines.folder_refusal(Protected.forms(os.path.join(root, f))) for f in folders):
        plan(dataclasses.replace(loaded, protected=protected.with_scratch(roots)))


__all__ = ["Loaded", "load", "plan", "plan_table", "write_plan", "count_plan", "compile_file",
           "check_scratch", "PipelineError", "PlanError", "Protected"]
