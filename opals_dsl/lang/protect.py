"""Where no output may be copied back: over the pipeline file, into the run's state folder, or
into the ``opf`` folder of a scratch root the engines work in (:class:`Protected`)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass

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

    def file_refusal(self, folder: tuple[str, ...], name: str) -> str | None:
        """Why the file ``name`` in a folder (its :meth:`forms`) may not be written, or None."""
        if self.pipeline is None:
            return None
        for path in self.forms(self.pipeline):  # the file as named, and a link's target
            if name == os.path.basename(path):
                mine = self.forms(os.path.dirname(path))
                if any(f in mine for f in folder):
                    return "which is the pipeline file itself"
        return None
