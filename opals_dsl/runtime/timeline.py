"""Where the fixed time of a run goes: phases (imports, compile, cluster start, engines ready,
run, stop) with their start and end, measured from the moment the process started.

In: :meth:`Timeline.phase` (a context manager) or :meth:`Timeline.mark` from any thread — the
embedded cluster starts in a thread of its own while the pipeline compiles, so phases overlap.
Out: :meth:`Timeline.lines`, what ``opf run -v`` prints on standard error. Standard library
only (the process's start time comes from ``/proc``, else from psutil, else the timeline starts
when it is made).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator


def _process_start() -> float:
    """The process's start time, on the clock of :func:`time.time`.

    On Linux from its start in clock ticks since boot (``/proc/self/stat``) against the time
    since boot now: exact to a tick (psutil's ``create_time`` adds the boot time, which Linux
    gives in whole seconds only, so it may be off by most of a second)."""
    try:
        with open("/proc/self/stat", "rb") as fh:
            fields = fh.read().rpartition(b")")[2].split()
        ticks = int(fields[19])  # field 22 of the file; the first two end with ")"
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - max(0.0, age)
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import psutil

        return psutil.Process(os.getpid()).create_time()
    except Exception:  # noqa: BLE001 - no psutil, or no /proc: count from here
        return time.time()


class Timeline:
    """Phases of a run, each ``(name, start, end, note)`` in seconds since the process
    started. A phase may be marked more than once (the last one counts) or never."""

    def __init__(self) -> None:
        self.origin = _process_start()
        # perf_counter is monotonic and precise; anchor it to the process's start once
        self._offset = time.time() - self.origin - time.perf_counter()
        self._phases: dict[str, tuple[float, float, str]] = {}
        self._lock = threading.Lock()

    def now(self) -> float:
        """Seconds since the process started."""
        return time.perf_counter() + self._offset

    def mark(self, name: str, start: float, end: float | None = None, note: str = "") -> None:
        with self._lock:
            self._phases[name] = (start, self.now() if end is None else end, note)

    @contextlib.contextmanager
    def phase(self, name: str, note: str = "") -> Iterator[None]:
        start = self.now()
        try:
            yield
        finally:
            self.mark(name, start, note=note)

    def get(self, name: str) -> tuple[float, float, str] | None:
        with self._lock:
            return self._phases.get(name)

    def lines(self) -> list[str]:
        """The phases in order of their start, and the total so far."""
        with self._lock:
            phases = sorted(self._phases.items(), key=lambda item: (item[1][0], item[1][1]))
        out = ["time since opf started (seconds):"]
        for name, (start, end, note) in phases:
            out.append(f"  {name:<15} {start:6.2f} → {end:6.2f}  {end - start:6.2f} s"
                       + (f"  ({note})" if note else ""))
        out.append(f"  {'total':<15} {'':6}   {self.now():6.2f}")
        return out


class NoTimeline(Timeline):
    """A timeline that keeps nothing (the default: measuring costs nothing then)."""

    def __init__(self) -> None:
        self.origin = 0.0
        self._offset = 0.0
        self._phases = {}
        self._lock = threading.Lock()

    def mark(self, name: str, start: float, end: float | None = None, note: str = "") -> None:
        return None
