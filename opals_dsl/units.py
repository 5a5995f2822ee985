"""Numbers for people: durations and byte counts, as the run's summary, its progress lines and
its report write them (the report page's script has its own copy in JavaScript)."""

from __future__ import annotations


def format_bytes(n: int) -> str:
    """``512`` → ``"512 B"``, ``1536`` → ``"1.5 KiB"``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def format_duration(seconds: float) -> str:
    """``0.0123`` → ``"12 ms"``, ``1.234`` → ``"1.23 s"``, ``75.2`` → ``"1 min 15 s"``."""
    if seconds < 0.01:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"
