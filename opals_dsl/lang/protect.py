"""Where no output may be copied back: over the pipeline file, into the run's state folder, or
into the ``opf`` folder of a scratch root the engines work in (:class:`Protected`); nor into a
folder named ``~``, nor over an input reached through a link (:class:`DestinationChecks`, the
planner's checks of every destination once all are known)."""

from __future__ import annotations

import os
import posixpath
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath

from . import nodes as n

#: where a run keeps its state (journal, trace, logs), beside the pipeline file, unless told
STATE_FOLDER = ".opf"


def default_state_dir(pipeline: str | os.PathLike[str]) -> str:
    """The state folder of a pipeline file's runs when none is named: :data:`STATE_FOLDER`
    beside it (absolute)."""
    return os.path.join(os.path.dirname(os.path.abspath(os.fspath(pipeline))), STATE_FOLDER)


def default_scratch() -> str:
    """The scratch root an engine of this machine uses without ``--scratch``:
    ``$OPF_SCRATCH``, else the system temp folder (resolved)."""
    base = os.environ.get("OPF_SCRATCH") or tempfile.gettempdir()
    return os.path.realpath(os.path.expanduser(base))


@dataclass(frozen=True, slots=True)
class Protected:
    """The places no output may be copied back to, as absolute paths:

    * ``pipeline``: the pipeline file (``output "." flat`` with ``out o = "self.opf"`` would
      replace it);
    * ``state``: the run's state folder (journal, logs, trace, lock), and everything in it;
    * ``scratch``: scratch roots, of which the ``opf`` folder is refused — the job and task
      folders the engines create, fill and empty live there, so a result copied back into one
      would be deleted by a task's clean-up. The rest of a scratch root is not opf's (it is
      the system temp folder by default) and is left alone.

    ``opf check`` protects the defaults (:meth:`for_pipeline`); ``opf run`` the state folder
    and scratch root it is given, and then the scratch roots its engines report.
    """

    pipeline: str | None = None
    state: str | None = None
    scratch: tuple[str, ...] = ()

    @classmethod
    def for_pipeline(cls, path: str | os.PathLike[str], *, state: str | None = None,
                     scratch: Iterable[str | None] = (None,)) -> Protected:
        """The defaults for a pipeline file: ``.opf`` beside it unless ``state``; the scratch
        roots ``scratch`` (None: :func:`default_scratch`)."""
        path = os.path.abspath(os.fspath(path))
        roots = [default_scratch() if r is None else os.path.abspath(os.path.expanduser(r))
                 for r in scratch]
        return cls(path, os.path.abspath(state or default_state_dir(path)),
                   tuple(dict.fromkeys(roots)))

    def with_scratch(self, roots: Iterable[str]) -> Protected:
        return Protected(self.pipeline, self.state, tuple(dict.fromkeys([*self.scratch, *roots])))

    @staticmethod
    def forms(path: str) -> tuple[str, ...]:
        """An absolute path as written (normalised) and with its links resolved."""
        norm = os.path.normpath(path)
        real = os.path.realpath(norm)
        return (norm,) if real == norm else (norm, real)

    def _areas(self, root: str | None) -> list[tuple[tuple[str, ...], str]]:
        def shown(path: str) -> str:  # as the pipeline's destinations are shown
            if root is None:
                return path
            rel = os.path.relpath(path, root)
            return path if rel == ".." or rel.startswith("../") else rel

        areas = []
        if self.state:
            areas.append((self.forms(self.state),
                          f"inside the run's state folder '{shown(self.state)}' (its journal, "
                          "logs and trace)"))
        for base in self.scratch:
            work = os.path.join(base, "opf")
            areas.append((self.forms(work),
                          f"inside '{shown(work)}', where the engines keep their job and task "
                          "folders (a task's folder is emptied after its copy-back)"))
        return areas

    def folder_refusal(self, folder: tuple[str, ...], root: str | None = None) -> str | None:
        """Why nothing may be copied back into a folder (its :meth:`forms`), or None; paths
        inside ``root`` are named relative to it."""
        for area, why in self._areas(root):
            for f in folder:
                for a in area:
                    if f == a or f.startswith(a.rstrip("/") + "/"):
                        return why
        return None

    def pipeline_names(self, folder: tuple[str, ...]) -> frozenset[str]:
        """The names under which the pipeline file (as named, and a link's target) lies in a
        folder (its :meth:`forms`): a file of one of these names there may not be written."""
        if self.pipeline is None:
            return frozenset()
        return frozenset(os.path.basename(path) for path in self.forms(self.pipeline)
                         if any(f in self.forms(os.path.dirname(path)) for f in folder))


#: at most this many errors are reported for one declaration (a glob, an out, an in)
REPORT_LIMIT = 3


class DestinationChecks:
    """The planner's checks of the output folders and destinations (a base class of
    :class:`~opals_dsl.lang.lower.Planner`, whose collected destinations and readers it
    reads)."""

    def check_folder(self, text: str, decl: n.Output) -> None:
        """An output folder must not start with ``~``: opf does not expand it (no shell is
        involved), so the results would go to a folder named ``~``."""
        if text[:1] == "~":
            self.error(
                decl.folder.span,
                f"the output folder '{text}' starts with '~', which opf does not expand: the "
                "results would go to a folder named '~' in the pipeline's folder; write the "
                "folder in full (e.g. \"/home/me/results\"), or relative to the pipeline file",
                decl, 1,
            )

    def check_inside(self, text: str, decl: n.Output, task: str) -> None:
        """A task's output folder ``text`` (its template filled in) must lie inside the folder
        the template's fixed start names (``results`` of ``"results/{x}"``): a value may not
        climb out of it with ``..`` (a line of a file, a param), into another project's
        results. A template that starts with a value (``"{results}"``) is left to it."""
        fixed = decl.folder.parts[0] if isinstance(decl.folder.parts[0], str) else ""
        base = posixpath.normpath(fixed.rpartition("/")[0]) if "/" in fixed else ""
        if not base:
            return
        folder = posixpath.normpath(text)
        if folder == base or folder.startswith(base.rstrip("/") + "/"):
            return
        self.error(
            decl.folder.span,
            f"the output folder of task '{task}' is '{text}', which is outside '{base}', the "
            f"folder this output declaration names: a value filled in climbs out of it with "
            f"'..'; use values without '..' (or start the folder with the value, as in "
            f"\"{{results}}\", to let it choose any folder)",
            decl, 1,
        )

    def claim(self, dest: str, job: str, task: str, o: n.Out, step: str) -> None:
        """Output ``o`` of ``task`` is copied back to ``dest``: no other output may go there,
        need it to be a folder or have a folder there, and no stage may read it as an input."""
        clash = file_folder_clash(dest, self.destinations, self.folders)
        if clash is not None and clash[0] not in self.folders_reported:  # once per path
            self.folders_reported.add(clash[0])
            self.error(o.path.span, f"output '{o.name.value}' of task '{task}' (job '{job}') "
                                    f"{clash[1]}", o, REPORT_LIMIT)
        first = self.destinations.get(dest)
        if first is None:
            self.destinations[dest] = (job, task, o, step)
            reader = self.readers.get(dest)
            if reader is not None:
                rjob, rtask, _ = reader
                what = self.reader_what.get(dest)
                who = (f"task '{rtask}' of job '{rjob}'" if rtask is not None
                       else f"job '{rjob}' (a shared file)")
                reads = f"which job '{rjob}' reads as {what}" if what is not None else (
                    f"a file that {who} reads as an input")
                self.error(
                    o.path.span,
                    f"output '{o.name.value}' of task '{task}' (job '{job}') would be copied back "
                    f"to '{dest}', {reads}; a copy-back must not overwrite an input: give the "
                    "output another name or output folder",
                    o,
                )
            return
        fjob, ftask, fout, _ = first
        limit = REPORT_LIMIT
        if fout is o:
            limit = 1  # every task of the job clashes alike: once says it all
            hint = self._clash_hint.get(job, "{task.id}")
            msg = (
                f"tasks '{ftask}' and '{task}' of job '{job}' would both copy output "
                f"'{o.name.value}' back to '{dest}'; make the name differ per task, e.g. "
                f"\"{hint}{PurePosixPath(dest).suffix}\""
            )
        else:
            msg = (
                f"output '{o.name.value}' of task '{task}' (job '{job}') would be copied back to "
                f"'{dest}', where output '{fout.name.value}' of task '{ftask}' (job '{fjob}') "
                "goes too; give one of them another name or output folder"
            )
        self.error(o.path.span, msg, o, limit)

    def check_destinations(self) -> None:
        """No copy-back may write the pipeline file, into the run's state folder or into opf's
        part of a scratch root (see :class:`Protected`), nor over an input reached through a
        link. Checked once per destination folder; a folder is compared as written and with
        its links resolved."""
        if not self.destinations:
            return
        by_folder: dict[str, list[str]] = {}
        for dest in self.destinations:
            folder, _, _ = dest.rpartition("/")
            group = by_folder.get(folder)
            if group is None:
                group = by_folder[folder] = []
            group.append(dest)
        forms_of = {folder: Protected.forms(os.path.join(self.root, folder))
                    for folder in by_folder}
        self.check_linked_inputs(by_folder, forms_of)
        if self.protected is None:
            return
        for folder, dests in by_folder.items():
            forms = forms_of[folder]
            why = self.protected.folder_refusal(forms, self.root)
            names = self.protected.pipeline_names(forms)
            for dest in dests:
                reason = why
                if reason is None and names and posixpath.basename(dest) in names:
                    reason = "which is the pipeline file itself"
                if reason is None:
                    continue
                job, task, o, step = self.destinations[dest]
                self.error(
                    o.path.span,
                    f"output '{o.name.value}' of step '{step}' (job '{job}') would be copied back "
                    f"to '{dest}', {reason}; choose another output folder or file name",
                    ("protected", o), 1,
                )


    def check_linked_inputs(self, by_folder: dict[str, list[str]],
                            forms_of: dict[str, tuple[str, ...]]) -> None:
        """A destination that is an input under another name, through a link in a folder
        (``output "link"`` where ``link`` points at ``data``): the names were compared as
        written when they were claimed (``claim``, ``read``); here, resolved."""
        reader_forms: dict[str, tuple[str, ...]] = {}
        for src in self.readers:
            folder = src.rpartition("/")[0]
            if folder not in reader_forms:
                reader_forms[folder] = Protected.forms(os.path.join(self.root, folder))
        if all(len(f) == 1 for f in (*forms_of.values(), *reader_forms.values())):
            return  # no links: the names as written said it all
        real_inputs = {
            reader_forms[src.rpartition("/")[0]][-1] + "/" + posixpath.basename(src): src
            for src in self.readers
        }
        for folder, dests in by_folder.items():
            real = forms_of[folder][-1]
            for dest in dests:
                src = real_inputs.get(real + "/" + posixpath.basename(dest))
                if src is None or src == dest:
                    continue
                job, task, o, _ = self.destinations[dest]
                rjob, rtask, _ = self.readers[src]
                what = self.reader_what.get(src)
                who = (f"job '{rjob}' as {what}" if what is not None
                       else f"task '{rtask}' of job '{rjob}'" if rtask is not None
                       else f"job '{rjob}' as a shared file")
                self.error(
                    o.path.span,
                    f"output '{o.name.value}' of task '{task}' (job '{job}') would be copied back "
                    f"to '{dest}', which is '{src}' through a link, a file read by {who}; a "
                    "copy-back must not overwrite an input: give the output another name or "
                    "output folder",
                    o,
                )


def overwritten_message(src: str, who: str, claim: tuple[str, str, n.Out, str]) -> str:
    """The error for a file the planner reads (``who`` says how) that a copy-back writes."""
    cjob, ctask, cout, _ = claim
    return (
        f"'{src}' is {who}, and output '{cout.name.value}' of task '{ctask}' (job '{cjob}') "
        "would be copied back over it; a copy-back must not overwrite a file the pipeline "
        "reads: give the output another name or output folder"
    )


def reads_output_message(src: str, job: str, task: str | None,
                         claim: tuple[str, str, n.Out, str]) -> str:
    """The error for an input of a task (or a shared file) that a copy-back writes while
    nothing makes the reader wait for it."""
    cjob, ctask, cout, cstep = claim
    who = f"task '{task}'" if task is not None else f"job '{job}' (a shared file)"
    if cjob == job:
        return (
            f"the input '{src}' of {who} is where output '{cout.name.value}' of task '{ctask}' "
            "of the same job is copied back; a job cannot read its own outputs: write them to "
            "another folder"
        )
    return (
        f"the input '{src}' of {who} is where output '{cout.name.value}' of task '{ctask}' (job "
        f"'{cjob}') is copied back, but nothing makes this task wait for it; name the output "
        f"as {{{cjob}.{cstep}.{cout.name.value}}} (in the command or an 'in' line) instead"
    )


def file_folder_clash(dest: str, destinations: Mapping[str, tuple[str, str, n.Out, str]],
                      folders: dict[str, str]) -> tuple[str, str] | None:
    """That path and the error when destination ``dest`` and another one need one path to be a
    file and a folder at once (``res/a.txt`` and ``res/a.txt/b``), else None; the folders above
    ``dest`` are noted in ``folders`` (folder -> a destination inside it) on the way. Each
    folder is looked at once: a destination claimed later that is a noted folder is found by
    its own call."""
    inside = folders.get(dest)
    if inside is not None:
        return dest, _clash(dest, destinations[inside],
                            f"'{dest}' is the folder of '{inside}', where")
    folder = posixpath.dirname(dest)
    while folder not in ("", "/") and folder not in folders:
        if folder in destinations:
            return folder, _clash(dest, destinations[folder],
                                  f"its folder '{folder}' is a file: that is where")
        folders[folder] = dest
        folder = posixpath.dirname(folder)
    return None


def _clash(dest: str, other: tuple[str, str, n.Out, str], what: str) -> str:
    ojob, otask, oout, _ = other
    return (f"would be copied back to '{dest}', but {what} output '{oout.name.value}' of task "
            f"'{otask}' (job '{ojob}') is copied back; a path cannot be a file and a folder at "
            f"once: give one of them another name or output folder")
