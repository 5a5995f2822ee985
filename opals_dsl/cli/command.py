"""The ``opf`` command: argument parsing, exit statuses, and errors rendered for people.

``opf check FILE`` checks a pipeline (``--format json`` or ``github`` for tools), ``opf compile
FILE`` prints its plan (summary, ``--dot``, ``--json``, ``--svg``; ``-o PATH`` is written whole or
not at all), ``opf run FILE`` runs it (see :mod:`opals_dsl.cli.run`), ``opf report``, ``opf runs``
and ``opf clean`` show and prune its runs' records (:mod:`opals_dsl.cli.report`,
:mod:`opals_dsl.cli.runs`), ``opf fmt FILE...`` lays files out (see :mod:`opals_dsl.lang.fmt`).
Exit statuses: 0 done, 1 a task failed (or, for ``opf fmt --check``, a file would change), 2
the pipeline or the command line is invalid, 3 no cluster, 141 stdout was closed early (``opf
compile --json | head``: no message, the status a shell shows for a program that SIGPIPE
ended).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import traceback
from collections.abc import Iterator
from typing import TYPE_CHECKING, TextIO

from .. import __version__
from ..errors import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_INVALID,
    OpfError,
    UsageError,
    not_utf8,
)
from ..plan import model
from ..source import NotARegularFile, SourceTooLarge
from .common import (
    add_only,
    add_strict,
    error_line,
    not_written,
    only,
    parse_params,
    show_warnings,
    state_of,
    warning_line,
)

if TYPE_CHECKING:  # the compiler is imported when a pipeline is compiled: `opf run` starts its
    from ..lang.compile import Loaded  # cluster meanwhile


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # exit 2 with usage, as argparse does, minus noise
        self.print_usage(sys.stderr)
        print(error_line(message + _meant(self, message)), file=sys.stderr)
        raise SystemExit(EXIT_INVALID)

    def parse_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def,override]
        """As argparse's, but an unknown option is reported by the command's own parser, which
        knows the options it could have meant."""
        found, extra = self.parse_known_args(args, namespace)
        if extra:
            command = getattr(found, "command", None)
            parser = self._commands.get(command, self) if command else self
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return found

    _commands: dict[str, argparse.ArgumentParser] = {}


def _meant(parser: argparse.ArgumentParser, message: str) -> str:
    """"; did you mean ...?" for a misspelt command or option in argparse's ``message``."""
    from ..lang.scope import did_you_mean

    choice = re.search(r"invalid choice: '(.*?)' \(choose from (.*)\)$", message)
    if choice:
        return did_you_mean(choice[1], re.findall(r"'([^']*)'", choice[2]))
    unknown = re.match(r"unrecognized arguments: (-\S+)", message)
    if not unknown:
        return ""
    word = unknown[1].split("=")[0]
    for action in parser._actions:  # --json, where the command says --format json
        if action.option_strings and action.choices and word.lstrip("-") in action.choices:
            return f"; did you mean '{action.option_strings[0]} {word.lstrip('-')}'?"
    return did_you_mean(word, [s for a in parser._actions for s in a.option_strings])


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="the pipeline file (.opf)")
    p.add_argument(
        "--param", "-p", action="append", metavar="NAME=VALUE",
        help="set a parameter (repeatable); converted to the type of its default",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="opf",
        description="opf: declarative pipelines for large geodata, compiled to an explicit plan "
        "and run on ipyparallel engines.",
    )
    parser.add_argument("--version", action="version", version=f"opf {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    parser._commands = sub.choices

    p = sub.add_parser("check", help="check a pipeline file and report every mistake")
    _add_common(p)
    add_strict(p)
    p.add_argument(
        "--format", choices=("text", "json", "github"), default="text",
        help="how to report: text for people (default), json (a list of findings on stdout) "
        "or github (workflow annotations on stdout); the exit status is the same",
    )

    p = sub.add_parser("compile", help="compile a pipeline to its plan (summary, DOT, JSON, SVG)")
    _add_common(p)
    add_only(p)
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--dot", action="store_true", help="write the plan as Graphviz DOT")
    fmt.add_argument("--json", action="store_true", help="write the plan as node-link JSON")
    fmt.add_argument("--svg", action="store_true", help="render the plan to SVG (needs Graphviz)")
    p.add_argument(
        "--level", choices=("task", "job"), default="task",
        help="draw every task (default) or one node per job step (for large plans)",
    )
    p.add_argument("-o", "--output", metavar="PATH", help="write to PATH instead of stdout")
    p.add_argument(
        "--status", action="store_true",
        help="with --dot or --svg: colour each task by what 'opf run' would do with it "
        "(grey: unchanged, skipped; yellow: runs), as 'opf run --dry-run' prints it",
    )
    p.add_argument(
        "--state", metavar="DIR",
        help="with --status: the run's state folder (default: .opf beside FILE)",
    )
    p.add_argument(
        "--checksum", action="store_true",
        help="with --status: compare inputs by content, as 'opf run --checksum' does",
    )

    from . import report

    p = sub.add_parser("report", help="write an HTML report of a run: timeline, summary, plan")
    report.add_arguments(p)

    from . import runs as history

    p = sub.add_parser("runs", help="list the recorded runs of a pipeline")
    history.add_arguments(p, clean=False)
    p = sub.add_parser("clean", help="remove old runs' records and the pipeline's scratch "
                       "folder")
    history.add_arguments(p, clean=True)

    from . import run as runcmd

    p = sub.add_parser("run", help="run a pipeline on ipyparallel engines")
    _add_common(p)
    add_only(p)
    runcmd.add_arguments(p)

    from . import fmt as formatter

    p = sub.add_parser("fmt", help="rewrite pipeline files in opf's one layout (comments kept)")
    formatter.add_arguments(p)
    return parser


def summary(counts: model.PlanCounts) -> str:
    """``NAME: J jobs, T tasks, S step runs``."""
    jobs, tasks, steps = counts.jobs, counts.tasks, counts.steps
    return (
        f"{counts.pipeline}: {jobs} job{'s' if jobs != 1 else ''}, "
        f"{tasks} task{'s' if tasks != 1 else ''}, {steps} step run"
        f"{'s' if steps != 1 else ''}"
    )


#: how text that names files is written: a file name that is not UTF-8 (Python holds its
#: bytes as lone surrogates) is written as its escape ``\udcff``, which is what JSON reads
#: back as that very name (and shows it in DOT), instead of failing half-way through
ERRORS = "backslashreplace"


@contextlib.contextmanager
def _output(output: str | None, whole: bool = False) -> Iterator[TextIO]:
    """The text stream to write a result to: ``output``, written so that it appears only
    complete (a temporary beside it, renamed into place when done), or stdout. A device or pipe
    named as ``output`` is written into as it is (see
    :func:`~opals_dsl.runtime.fsatomic.output_target`). ``whole``: stdout or a pipe gets the
    text only once the block has written all of it (held in memory, beyond
    :data:`SPOOL_MEMORY` in a temporary file), so a block that fails writes nothing there; a
    terminal or ``/dev/null`` gets it as it comes."""
    if not output:
        with _spooled(sys.stdout, whole) as fh:
            yield fh
        return
    from ..runtime.fsatomic import output_target, replacing

    if os.path.isdir(output):
        raise UsageError(f"-o {output} is a folder; name a file to write")
    target, atomic = output_target(output)
    try:
        if not atomic:  # a device or pipe (-o /dev/null): written into, never replaced
            with open(target, "w", encoding="utf-8", errors=ERRORS) as fh, \
                    _spooled(fh, whole) as into:
                yield into
            return
        with replacing(target, 0o644) as tmp, \
                open(tmp, "w", encoding="utf-8", errors=ERRORS) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:  # a missing folder, no permission, a full disk, ...
        raise UsageError(not_written(output, target, exc)) from None


#: how much of a result :func:`_output` holds in memory before it goes to a temporary file
SPOOL_MEMORY = 64 << 20


@contextlib.contextmanager
def _spooled(out: TextIO, whole: bool) -> Iterator[TextIO]:
    """``out`` itself, or with ``whole`` a spool copied into ``out`` when the block ends
    without an error. A terminal or ``/dev/null`` (a character device) keeps nothing that a
    cut text could mislead, so it gets the text as it comes."""
    if not whole or _is_device(out):
        yield out
        return
    import tempfile

    from ..runtime.paths import NO_ROOM, os_reason

    with tempfile.SpooledTemporaryFile(SPOOL_MEMORY, mode="w+", encoding="utf-8",
                                       errors=ERRORS) as spool:
        try:
            yield spool  # type: ignore[misc]
            spool.flush()
        except OSError as exc:
            if exc.errno not in NO_ROOM:
                raise
            raise UsageError(
                f"the text is held in a temporary file until it is complete, and there is no "
                f"room for it in {tempfile.gettempdir()}: {os_reason(exc, 'temp')}; nothing "
                f"was written. Write it to a file with -o FILE, or set TMPDIR to a folder with "
                f"room") from None
        spool.seek(0)
        shutil.copyfileobj(spool, out, 1 << 20)  # type: ignore[misc]


def _is_device(out: TextIO) -> bool:
    try:
        return stat.S_ISCHR(os.fstat(out.fileno()).st_mode)
    except (OSError, ValueError, io.UnsupportedOperation):  # no descriptor: a file in memory
        return False


def _write(text: str, output: str | None) -> None:
    with _output(output) as fh:
        fh.write(text)


def cmd_check(args: argparse.Namespace) -> int:
    from ..lang.compile import count_plan, load

    loaded = load(args.file, parse_params(args.param), strict=args.strict)
    counts = count_plan(loaded)  # planned in full, but never held as a graph
    show_warnings(loaded.warnings)
    print(f"{args.file}: ok — {summary(counts)}")
    return 0


def _file_problem(exc: Exception, file: str) -> str:
    """What the command line says when a pipeline file cannot be read (as :func:`main` does)."""
    if isinstance(exc, FileNotFoundError):
        return f"no such file: {exc.filename}"
    if isinstance(exc, UnicodeDecodeError):
        return not_utf8(file, exc)
    if isinstance(exc, IsADirectoryError):
        return f"{exc.filename} is a folder, not a pipeline file"
    return f"{getattr(exc, 'filename', None) or ''}: {getattr(exc, 'strerror', None) or exc}"


def cmd_check_report(args: argparse.Namespace) -> int:
    """``opf check --format json|github``: every finding, with its place, on stdout."""
    from ..errors import PipelineError, by_place, finding, render_findings
    from ..lang.compile import load, plan

    status = 0
    try:
        loaded = load(args.file, parse_params(args.param), strict=args.strict)
        found = [finding(d, args.file) for d in loaded.warnings]
        plan(loaded)
    except PipelineError as exc:
        found = [finding(d, args.file) for d in by_place([*exc.warnings, *exc.diagnostics])]
        status = exc.exit_code
    except OpfError as exc:
        found = [finding(str(exc), args.file)]
        status = exc.exit_code
    except (OSError, UnicodeDecodeError) as exc:
        found = [finding(_file_problem(exc, args.file), args.file)]
        status = EXIT_INVALID
    sys.stdout.write(render_findings(found, args.format))
    return status


def cmd_compile(args: argparse.Namespace) -> int:
    from ..lang.compile import load

    loaded = load(args.file, parse_params(args.param))
    status = _compile(args, loaded)
    show_warnings(loaded.warnings)  # as opf check shows them: on stderr, after the plan
    return status


def _compile(args: argparse.Namespace, loaded: Loaded) -> int:
    from ..lang.compile import plan
    from ..plan.dot import to_dot, to_job_dot
    from ..plan.graph import write_json

    if args.level == "job" and not (args.dot or args.svg):
        raise UsageError("--level job draws one node per job step: use it with --dot or --svg")
    whole = not args.status and not getattr(args, "only", None)
    if whole and (args.json or not (args.dot or args.svg)):
        return _compile_json(args, loaded) if args.json else _compile_summary(loaded)
    graph = only(plan(loaded), args)
    status = None
    if args.status:
        if not (args.dot or args.svg) or args.level == "job":
            raise UsageError("--status colours the drawing of every task: use it with --dot or "
                         "--svg, without --level job")
        from ..runtime.journal import Journal
        from ..runtime.resume import Resume

        journal = Journal.read(state_of(args), graph, checksum=args.checksum)
        status = Resume(journal).node_status()
        for warning in journal.warnings():
            print(warning_line(warning), file=sys.stderr)
    if args.json:  # streamed: a plan of 100,000 tasks is never one string in memory
        with _output(args.output) as fh:
            write_json(graph, fh)
        return 0
    if args.dot or args.svg:
        dot = to_job_dot(graph) if args.level == "job" else to_dot(graph, status)
        if args.dot:
            _write(dot, args.output)
            return 0
        exe = shutil.which("dot")
        if exe is None:
            raise UsageError(
                "--svg needs Graphviz's 'dot' program, which is not on PATH; install Graphviz "
                "(e.g. 'apt-get install graphviz') or write DOT with --dot"
            )
        svg = subprocess.run([exe, "-Tsvg"], input=dot, capture_output=True,
                             encoding="utf-8", errors=ERRORS)
        if svg.returncode != 0:
            raise UsageError(f"Graphviz failed: {svg.stderr.strip()}")
        _write(svg.stdout, args.output)
        return 0
    print(summary(model.PlanCounts.of(graph)))
    return 0


def _compile_summary(loaded: Loaded) -> int:
    """``opf compile`` of a whole plan without an output format: its size, never holding it."""
    from ..lang.compile import count_plan

    print(summary(count_plan(loaded)))
    return 0


def _compile_json(args: argparse.Namespace, loaded: Loaded) -> int:
    """``opf compile --json`` of a whole plan: written while it is planned, never held (a
    plan of a million tasks takes a fraction of the memory), and only once it is whole."""
    from ..lang.compile import write_plan

    with _output(args.output, whole=True) as fh:
        write_plan(loaded, fh)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``opf ARGS``: run the command; its exit status. Every error is rendered here."""
    if isinstance(sys.stdout, io.TextIOWrapper):  # file names that are not UTF-8, see ERRORS
        sys.stdout.reconfigure(errors=ERRORS)
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except BrokenPipeError:
        return _stdout_closed()
    except KeyboardInterrupt:
        print("opf: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - every error ends here, rendered once
        text, status = _explain(exc, getattr(args, "file", None))
        print(text, file=sys.stderr)
        return status


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "check" and args.format != "text":
        return cmd_check_report(args)
    if args.command == "check":
        return cmd_check(args)
    if args.command == "compile":
        return cmd_compile(args)
    if args.command == "report":
        from . import report

        return report.main(args)
    if args.command in ("runs", "clean"):
        from . import runs as history

        return history.runs_main(args) if args.command == "runs" else history.clean_main(args)
    if args.command == "fmt":
        from . import fmt as formatter

        return formatter.main(args)
    from . import run as runcmd

    return runcmd.main(args)


def _explain(exc: Exception, file: str | None) -> tuple[str, int]:
    """What a person reads about an error, and the exit status it gives.

    An :class:`~opals_dsl.errors.OpfError` renders itself; the few operating-system errors a
    person causes (a file that is not there or not text, a full memory) are said in words;
    anything else is a bug in opf: shown with its traceback, exit 70."""
    if isinstance(exc, OpfError):
        return exc.render(), exc.exit_code
    if isinstance(exc, NotARegularFile | SourceTooLarge):
        return error_line(str(exc)), EXIT_INVALID
    if isinstance(exc, MemoryError):
        return error_line("out of memory; the pipeline or its parameters ask for more than "
                          "this machine has"), EXIT_INVALID
    if isinstance(exc, OSError | UnicodeDecodeError):
        return error_line(_file_problem(exc, file or "")), EXIT_INVALID
    trace = "".join(traceback.format_exception(exc)).rstrip()
    return (f"opf: internal error: {type(exc).__name__}: {exc}\n"
            f"This is a bug in opf, not in your pipeline; please report it with what follows.\n"
            f"{trace}"), EXIT_INTERNAL


#: the status of a program whose output was closed early (``opf compile --json | head``): what a
#: shell shows for one that SIGPIPE ended, as ``yes | head`` does
EXIT_PIPE = 128 + signal.SIGPIPE


def _stdout_closed() -> int:
    """The reader of stdout went away: end quietly, as Unix tools do. What is still buffered
    for stdout goes nowhere, so that flushing it at exit raises nothing."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return EXIT_PIPE
