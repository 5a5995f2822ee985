"""Checking, the warnings: what a pipeline may say but most likely does not mean.

A pass of :mod:`.check` (it runs with the others, on the same :class:`~.check.Checker`); each
finding is a warning — shown with its place, the line and a caret like an error, but it stops
nothing unless ``--strict`` makes it one. They are the mistakes that ``opf check`` would
otherwise accept and the run then fail on, or that silently do nothing:

* a ``run`` word naming a file of the pipeline's folder that nothing stages (the step runs in
  its task folder on an engine, where the path does not exist);
* a ``call`` whose module is not beside the pipeline (nor installed), or has no such function —
  the module's source is read with :mod:`ast`, never imported, so checking runs none of it;
* a pattern in ``in`` (it takes files);
* a job over a pattern whose loop variable no step uses (its files are never staged);
* a pipeline without a job;
* a bare ``>``, ``|``, ``&&`` or ``;`` in a ``run`` line (no shell is involved).

The ones that look at files need the pipeline's folder (``Checker.root``); without it they
are not looked for.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import posixpath
import re
from collections.abc import Mapping
from typing import Protocol

from ..plan import model
from ..source import SourceFile
from . import nodes as n
from .scope import closest, templates_of_step


class Checker(Protocol):
    """What this pass needs of :class:`.check.Checker` (which runs it)."""

    source: SourceFile | None
    root: str | None

    def warn(self, span, message: str) -> None: ...

#: words a shell acts on, which a ``run`` line passes to the program as they are
SHELL_WORDS = frozenset({">", ">>", "<", "|", "||", "&&", ";", "&", "2>", "2>&1", "&>"})
_WILDCARDS = re.compile(r"[*?\[]")
#: programs whose next word is the script they run
_INTERPRETERS = frozenset({"python", "python3", "sh", "bash", "Rscript", "perl", "julia"})


def check_likely_mistakes(pipeline: n.Pipeline, params: Mapping[str, object],
                          c: Checker) -> None:
    """Warn about what would fail or do nothing when run (see the module docstring)."""
    if not pipeline.jobs:
        place = pipeline.name.span if pipeline.name is not None else (
            c.source.span(0, 0) if c.source is not None else None)
        c.warn(place, "this pipeline has no job, so running it does nothing; add one: the "
               "lines 'job NAME {', 'step NAME {' and 'run COMMAND', each block ended by a "
               "line '}'")
    modules: dict[str, _Module] = {}
    files: dict[str, bool] = {}  # a word → whether it names a file (asked once per word)
    for job in pipeline.jobs:
        _unstaged_loop_files(job, c)
        for step in job.steps:
            for item in step.ins:
                _pattern_in(item, c)
            for action in step.actions:
                if isinstance(action, n.Run) and not action.shell:
                    _shell_word(action, c)
                    if c.root is not None:
                        _unstaged_words(job, action, c, files)
                elif isinstance(action, n.Call) and c.root is not None:
                    _call_target(action, c, modules)


def _constant(t: n.Template) -> str | None:
    return "".join(t.parts) if t.is_constant else None  # type: ignore[arg-type]


def _pattern_in(item: n.In, c: Checker) -> None:
    if not isinstance(item.item, n.Template):
        return
    literal = "".join(p for p in item.item.parts if isinstance(p, str))
    if not _WILDCARDS.search(literal):
        return
    shown = "".join(p if isinstance(p, str) else "{" + p.dotted + "}" for p in item.item.parts)
    c.warn(item.span, f"'in' takes files, not patterns, and \"{shown}\" is a pattern; for a "
           f"task per matching file use a job over it (job NAME for f in \"{shown}\"), and "
           "for the files of another job a gather ({JOB.STEP.OUT})")


def _unstaged_loop_files(job: n.Job, c: Checker) -> None:
    if not isinstance(job.source, n.GlobSource) or job.var is None or not job.steps or (
            job.var.value in n.RESERVED):
        return
    var = job.var.value
    for step in job.steps:
        for ref, _alone in templates_of_step(step):
            # a misspelt {strp} is an error of its own: this would only repeat it
            if ref.parts == (var,) or (len(ref.parts) == 1 and closest(ref.parts[0], [var])):
                return
    c.warn(job.var.span, f"no step of job '{job.name.value}' uses '{{{var}}}', so the files "
           "its pattern matches are never staged where the steps run; write "
           f"{{{var}}} where a step reads the file (a job over names, not files, loops over "
           "a list or lines(...))")


def _shell_word(run: n.Run, c: Checker) -> None:
    """The first word of a run line that a shell would act on, written bare (not quoted)."""
    for word in run.words[1:]:
        text = _constant(word.template)
        if text not in SHELL_WORDS:
            continue
        if c.source is not None and word.span is not None:
            at = c.source.offset(word.span.line, word.span.column)
            if c.source.text[at - 1:at] in ("'", '"', "\\"):  # quoted: meant as the word
                continue
        program = _constant(run.words[0].template) or "the program"
        c.warn(word.span, f"'{text}' goes to {program} as a word of its own: a run line starts "
               "the program without a shell, so nothing is redirected, piped or chained; for a "
               "shell, write the line as run sh \"...\" (each {name} in it is quoted for the "
               "shell)")
        return


def _unstaged_words(job: n.Job, run: n.Run, c: Checker, files: dict[str, bool]) -> None:
    """Words naming a file of the pipeline's folder: not staged, so not there when run."""
    assert c.root is not None
    first = _constant(run.words[0].template) if run.words else None
    for k, word in enumerate(run.words):
        text = _constant(word.template)
        if not text or text.startswith("-") or os.path.isabs(text) or "://" in text:
            continue
        norm = posixpath.normpath(text.replace("\\", "/"))
        if norm == ".." or norm.startswith("../") or norm == ".":
            continue
        if norm not in files:
            files[norm] = os.path.isfile(os.path.join(c.root, norm))
        if not files[norm]:
            continue
        script = k == 0 or (k == 1 and first in _INTERPRETERS)
        c.warn(word.span, f"'{text}' is a file in the pipeline's folder, but the step runs in "
               f"its task folder on an engine, where nothing stages it; "
               f"{_declare_hint(job, norm, script)}")


def _declare_hint(job: n.Job, norm: str, script: bool) -> str:
    for s in job.shared:
        path = _constant(s.path)
        if path is not None and posixpath.normpath(path.replace("\\", "/")) == norm:
            return f"write {{{s.name.value}}} instead (the job's shared file '{s.name.value}')"
    taken = {s.name.value for s in job.shared} | {o.name.value for st in job.steps
                                                  for o in st.outs}
    stem = re.sub(r"\W", "_", posixpath.splitext(posixpath.basename(norm))[0]) or "file"
    stem = stem if stem[0].isalpha() or stem[0] == "_" else f"f_{stem}"
    name = next(x for x in ("tool" if script else stem, stem, f"{stem}_file", f"{stem}_2")
                if x not in taken and x not in n.RESERVED)
    return f"declare shared {name} = \"{norm}\" in the job and write {{{name}}}"


def _call_target(call: n.Call, c: Checker, modules: dict[str, _Module]) -> None:
    """A call's module beside the pipeline (or installed), with the function it names."""
    if call.module not in modules:
        modules[call.module] = _module_names(c.root or ".", call.module)
    path, problem, found = modules[call.module]
    if problem is not None:
        c.warn(call.span, problem)
    elif path is not None and found is not None and call.function not in found[0]:
        functions = sorted(x for x in found[1] if not x.startswith("_"))
        close = closest(call.function, functions)
        hint = f"did you mean '{close}'?" if close else (
            f"its functions: {', '.join(functions)}" if functions else "it defines no function")
        c.warn(call.span, f"module '{call.module}' ({path}) has no function "
               f"'{call.function}', so the call would fail; {hint}")


#: a call's module: its file beside the pipeline, a problem with it, and (every name it defines
#: at its top level, the functions and classes among them) — None when they cannot be told
_Module = tuple[str | None, str | None, tuple[frozenset[str], frozenset[str]] | None]


def _module_names(root: str, module: str) -> _Module:
    """What :data:`_Module` says of ``module`` (never imported: its source is parsed)."""
    path = model.module_file(root, module)
    if path is None:
        top = module.split(".")[0]
        beside = os.path.exists(os.path.join(root, top)) or os.path.isfile(
            os.path.join(root, f"{top}.py"))
        if not beside and _installed(top):
            return None, None, None  # an installed package: not read here
        file = module.replace(".", "/") + ".py"
        return None, (f"module '{module}' is not in the pipeline's folder (no {file} beside "
                      "it) nor installed, so the call would fail; check the module's name, "
                      "or put the file there"), None
    try:
        with open(os.path.join(root, path), "rb") as fh:
            tree = ast.parse(fh.read(), filename=path)
    except SyntaxError as exc:
        return path, (f"module '{module}' ({path}) does not parse (line {exc.lineno}: "
                      f"{exc.msg}), so the call would fail; fix the module"), None
    except (OSError, ValueError):
        return path, None, None  # unreadable: the planner says so
    return path, None, _top_level_names(tree)


def _installed(top: str) -> bool:
    try:
        return importlib.util.find_spec(top) is not None  # a top-level name: nothing imported
    except (ImportError, ValueError):
        return False


def _top_level_names(tree: ast.Module) -> tuple[frozenset[str], frozenset[str]] | None:
    """The names a module defines at its top level (also under ``if`` and ``try``), and the
    functions and classes among them; None when they cannot be told (``from x import *``, a
    ``globals()`` or a module ``__getattr__``)."""
    names: set[str] = set()
    functions: set[str] = set()
    body = list(tree.body)
    while body:
        node = body.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
            functions.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                names.update(x.id for x in ast.walk(t) if isinstance(x, ast.Name))
        elif isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                if alias.name == "*":
                    return None
                names.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.If | ast.Try | ast.With | ast.For | ast.While):
            for field in ("body", "orelse", "finalbody", "handlers"):
                body.extend(getattr(node, field, []))
        elif isinstance(node, ast.ExceptHandler):
            body.extend(node.body)
    if "__getattr__" in names or any(isinstance(x, ast.Name) and x.id == "globals"
                                     for x in ast.walk(tree)):
        return None
    return frozenset(names), frozenset(functions)
