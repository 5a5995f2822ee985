"""A run shown in a Jupyter notebook: a progress bar with the counts, the failures and
warnings below it, and the outcome at the end — ipywidgets, when a kernel runs the code and
ipywidgets is installed (:func:`widget_progress`; otherwise the caller shows plain lines).
"""

from __future__ import annotations

import html
import sys
from collections.abc import Mapping

from ..plan.model import Task
from .events import Counts, RunListener, RunSummary, TaskFailure
from .executor import EngineInfo
from .progress import count, failure_report, outcome_line


def in_kernel() -> bool:
    """Whether this code runs in a Jupyter kernel (a notebook's cell)."""
    shell = sys.modules.get("IPython")
    get = getattr(shell, "get_ipython", None)
    return bool(get and getattr(get(), "kernel", None) is not None)


def widget_progress(title: str) -> RunListener | None:
    """A :class:`WidgetProgress` when this code runs in a notebook's kernel with ipywidgets
    installed, else None."""
    if not in_kernel():
        return None
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return None
    return WidgetProgress(title)


class WidgetProgress(RunListener):
    """The run as widgets in the cell's output: see the module docstring."""

    def __init__(self, title: str) -> None:
        import ipywidgets as widgets
        from IPython.display import display

        self.title = title
        self.total = 0
        self.bar = widgets.IntProgress(value=0, min=0, max=1, description=title,
                                       bar_style="info")
        self.label = widgets.HTML(value="starting")
        self.log = widgets.Output()
        display(widgets.VBox([widgets.HBox([self.bar, self.label]), self.log]))

    def _line(self, text: str) -> None:
        self.log.append_stdout(text + "\n")

    def warning(self, message: str) -> None:
        self._line(f"warning: {message}")

    def resuming(self, to_run: int, unchanged: int) -> None:
        if unchanged:
            self._line(f"{unchanged} of {count(to_run + unchanged, 'task')} unchanged since "
                       f"the last run; {to_run} to run")

    def run_started(self, total: int, engines: Mapping[int, EngineInfo]) -> None:
        self.total = total
        self.bar.max = max(1, total)
        machines = len({e.machine for e in engines.values()})
        self.label.value = html.escape(
            f"{count(total, 'task')} on {count(len(engines), 'engine')} "
            f"({count(machines, 'machine')})")

    def counts_changed(self, counts: Counts) -> None:
        self.bar.value = counts.done + counts.skipped
        self.label.value = html.escape(
            f"{counts.done + counts.skipped}/{counts.total} · on engines {counts.running} · "
            f"failed {counts.failed} · engines busy {counts.engines_busy}/{counts.engines}")

    def task_failed(self, task: Task, failure: TaskFailure) -> None:
        self._line(failure_report(task, failure))

    def run_finished(self, summary: RunSummary) -> None:
        self.bar.value = self.bar.max if summary.exit_code == 0 else self.bar.value
        self.bar.bar_style = "success" if summary.exit_code == 0 else "danger"
        self.label.value = html.escape(f"{self.title}: {outcome_line(summary)}")


__all__ = ["WidgetProgress", "in_kernel", "widget_progress"]
