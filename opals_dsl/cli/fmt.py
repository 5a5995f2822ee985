"""``opf fmt FILE...``: rewrite pipeline files in opf's one layout (:mod:`opals_dsl.lang.fmt`).

Exit status: 0 done (or nothing to change), 1 with ``--check`` when a file would change, 2 when
a file cannot be read or does not parse (it is left as it was). Every file is looked at, also
after one fails; a file is rewritten only complete (a temporary renamed into place), keeping its
permissions, and a link keeps pointing at its file.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

from ..errors import EXIT_INVALID, MAX_SHOWN, FormatError, PipelineError, not_utf8
from ..runtime.fsatomic import write_atomic
from .common import error_line


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``opf fmt FILE... [--check] [--diff]``."""
    p.add_argument(
        "files", nargs="+", metavar="FILE",
        help="pipeline files, or folders (every .opf file in them); '-' formats standard input "
        "to standard output",
    )
    p.add_argument("--check", action="store_true",
                   help="change nothing; exit 1 if a file would be reformatted")
    p.add_argument("--diff", action="store_true",
                   help="change nothing; print what would change as a unified diff")


def _files(names: list[str]) -> Iterator[tuple[str, str | None]]:
    """Each file to format, with the problem that stops it (a folder without .opf files)."""
    for name in names:
        path = Path(name)
        if name == "-" or not path.is_dir():
            yield name, None
            continue
        found = sorted(
            p for p in path.rglob("*.opf")
            if p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not found:
            yield name, f"{name} holds no .opf file"
        for p in found:
            yield str(p), None


def _write(path: str, text: str) -> None:
    target = os.path.realpath(path)  # a link stays a link: its file is rewritten
    mode = stat.S_IMODE(os.stat(target).st_mode)
    # a file its owner made read-only, or one this user may not write, is not replaced by a
    # new file of this user's (the folder would allow it)
    if not mode & 0o222 or not os.access(target, os.W_OK):
        raise PermissionError(errno.EACCES, "the file is read-only (chmod u+w to format it)")
    write_atomic(target, text.encode("utf-8"))
    if stat.S_IMODE(os.stat(target).st_mode) != mode:
        os.chmod(target, mode)


def _read(name: str, shown: str) -> tuple[str, str] | None:
    """The text of a file and its formatted text; None (said on stderr) if it cannot be."""
    try:
        if name == "-":
            text = sys.stdin.buffer.read().decode("utf-8")
        else:
            with open(name, "rb") as fh:  # decoded whole: a bad byte is found by its line
                text = fh.read().decode("utf-8")
        from ..lang.fmt import format_text  # here: every `opf` command builds this parser

        return text, format_text(text, shown)
    except PipelineError as exc:
        for d in exc.diagnostics[:MAX_SHOWN]:
            print(d.render(), file=sys.stderr)
        count = len(exc.diagnostics)
        print(f"opf: {shown}: not formatted: fix the error{'s' if count != 1 else ''} "
              "above first", file=sys.stderr)
    except FormatError as exc:
        print(exc.render(), file=sys.stderr)
    except FileNotFoundError:
        print(error_line(f"no such file: {shown}"), file=sys.stderr)
    except UnicodeDecodeError as exc:
        print(error_line(not_utf8(shown, exc)), file=sys.stderr)
    except OSError as exc:
        print(error_line(f"{shown}: {exc.strerror or exc}"), file=sys.stderr)
    return None


def _one(name: str, args: argparse.Namespace) -> int:
    """Format one file as the options say; its exit status."""
    shown = "<stdin>" if name == "-" else name
    read = _read(name, shown)
    if read is None:
        return EXIT_INVALID
    text, formatted = read
    if name == "-" and not (args.check or args.diff):
        sys.stdout.write(formatted)
        return 0
    if formatted == text:
        return 0
    if args.diff:
        sys.stdout.writelines(difflib.unified_diff(
            text.splitlines(keepends=True), formatted.splitlines(keepends=True),
            fromfile=shown, tofile=f"{shown} (formatted)",
        ))
    if args.check:
        print(f"would reformat {shown}", file=sys.stderr)
        return 1
    if not args.diff:
        try:
            _write(name, formatted)
        except OSError as exc:
            print(error_line(f"{shown}: cannot write: {exc.strerror or exc}"), file=sys.stderr)
            return EXIT_INVALID
        print(f"reformatted {shown}", file=sys.stderr)
    return 0


def main(args: argparse.Namespace) -> int:
    """``opf fmt``: every file formatted (or checked); the worst exit status of them."""
    status = 0
    for name, problem in _files(args.files):
        if problem is not None:
            print(error_line(problem), file=sys.stderr)
            status = EXIT_INVALID
            continue
        status = max(status, _one(name, args))
    return status
