"""Standard error of the commands a launcher runs (``sbatch``, ``ssh``), caught while they run
so that opf can quote it in its own message instead of letting it land above it.

Standard library only."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def stderr_captured(on: bool, echo: bool = True) -> Iterator[list[str]]:
    """Catch what the launcher's commands write to standard error (ipyparallel keeps only
    their standard output): ``sbatch: error: ...`` belongs in opf's message, not above it.
    Yields a list that holds what was caught once the block is left; it is written out again
    (if ``echo``) unless an error is propagating (the error quotes it)."""
    caught: list[str] = []
    if not on:
        yield caught
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        ok = False
        try:
            yield caught
            ok = True
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            caught.append(tmp.read().decode(errors="replace"))
            if ok and echo and caught[0]:
                sys.stderr.write(caught[0])
