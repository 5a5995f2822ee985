"""A step's processes and calls, on an engine: each ``run`` step in a process group of its own
that ends with the step, its engine or its run; each ``call`` step in the engine with its output
redirected to the step's log.

Every step process starts a session of its own, so the step and everything it starts form one
process group; :func:`wait_step` waits for it and, when the step is stopped, ends the group
(SIGTERM, then SIGKILL after :data:`STOP_GRACE` seconds). The groups running now are told to the
engine's *lifeline* (:mod:`opals_dsl.runtime.reaper`, started with the first step), which ends them
should the engine die. A ``call`` imports its module afresh when the module's file changed since,
or when the pipeline's folder has a module of that name elsewhere.

What a step starts outside its group — a program in a session of its own (``setsid``), a
``call`` step's processes, which are the engine's children — ends with the step too, where the
engine adopts orphans (:func:`adopt_orphans`, Linux; every ipyparallel engine opf uses does):
once their parent is gone they are the engine's children, and when the step ends
:func:`end_strays` kills each child the engine did not have before the step. Should the engine
be killed outright, they are not its children yet: every step process carries the engine's mark
(:func:`mark_engine`), by which the lifeline finds them.

Limits: each step's environment tells the libraries it uses how many threads it may take
(:data:`THREAD_VARS`, :func:`use_threads`). A step with a ``timeout`` is waited for with
a deadline; past it, its whole process group is ended (SIGTERM, :data:`STOP_GRACE` seconds,
SIGKILL), grandchildren included. A ``call`` step's deadline is a ``SIGALRM`` timer in the
engine's main thread that raises :class:`StepTimedOut` in the function: Python code stops at the
next bytecode and a ``time.sleep`` or a read is interrupted, but native code that does not
return to Python (a long C loop, a blocking call that retries after signals) runs on until it
does.

Standard library only: engines import it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Any

from .paths import module_files

#: the environment variable that marks an engine process, and so every step it starts
ENGINE_MARK = "OPF_ENGINE_MARK"

#: seconds a step's process group gets between SIGTERM and SIGKILL when it is stopped
STOP_GRACE = 2.0

#: the variables through which OpenMP, BLAS, numexpr and GDAL learn how many threads to use
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
               "NUMEXPR_NUM_THREADS", "GDAL_NUM_THREADS")


class StepTimedOut(BaseException):
    """Raised inside a ``call`` step that ran past its timeout (a BaseException, so that the
    function's own ``except Exception`` does not swallow it)."""


def use_threads(threads: int) -> None:
    """Set :data:`THREAD_VARS` to ``threads`` for the next step, in this process's environment.

    They stay set until a step with another count changes them (not undone after each step
    like the task's variables): in a run of one-thread steps they are set once, and every
    later step costs five lookups. A ``call`` step sees them too, as does a library it loads
    from then on."""
    value = str(threads)
    environ = os.environ
    for name in THREAD_VARS:
        if environ.get(name) != value:
            environ.update(dict.fromkeys(THREAD_VARS, value))
            return


def format_limit(seconds: float) -> str:
    """A timeout as the language writes it: ``90`` → ``"1m30s"``, ``7200`` → ``"2h"``."""
    whole = int(seconds)
    if whole != seconds or whole <= 0:
        return f"{seconds:g}s"
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{v}{u}" for v, u in ((hours, "h"), (minutes, "m"), (secs, "s")) if v]
    return "".join(parts)

# module imported for a call -> (its file, size, mtime_ns) when it was imported
_MODULES: dict[str, tuple[str, int, int]] = {}

# the variables set for a task's steps, and their values in the engine's own environment
_TASK_VARS = ("OPF_TASK", "OPF_JOB", "OPF_RUN_ID")

_ENGINE_ENV = {name: os.environ.get(name) for name in _TASK_VARS}


# process groups of the steps running now, and the lifeline that ends them if this process dies
_GROUPS: set[int] = set()

_LIFELINE: subprocess.Popen | None = None


def wait_step(proc: subprocess.Popen, timeout: float | None = None,
              before: frozenset[int] = frozenset()) -> int | None:
    """Wait for a step started in a session of its own; return its exit status, or None if
    it ran ``timeout`` seconds (None: no limit) and its whole group was ended (SIGTERM,
    :data:`STOP_GRACE` seconds, SIGKILL).

    When the step's process ends, whatever it left running in its process group is killed
    (before the step is reaped, so that the group's id cannot have been reused), and so is
    what left the group, once it is this process's child (:func:`end_strays`; ``before``:
    this process's children before the step started, :func:`children`). If the wait
    is interrupted (Ctrl-C reaching the engine, an engine shutting down), the whole group is
    ended first and the interruption goes on. While the step runs its group is known to this
    process's lifeline, which ends it should this process die.
    """
    pgid = proc.pid
    _watch(pgid)
    timed_out = False
    try:
        try:
            if not _exited(pgid, timeout):
                timed_out = True
                _end_group(pgid)
        except BaseException:
            _end_group(pgid)
            raise
        _killpg(pgid, signal.SIGKILL)
    finally:
        _unwatch(pgid)
        proc.wait()
        end_strays(before, pgid)
    return None if timed_out else proc.returncode


def _exited(pgid: int, timeout: float | None) -> bool:
    """Wait, without reaping it, until the group leader ``pgid`` has ended (True) or
    ``timeout`` seconds have passed (False): a blocking wait without a limit, else polling at
    growing intervals of at most 50 ms."""
    if timeout is None:
        with contextlib.suppress(ChildProcessError):
            os.waitid(os.P_PID, pgid, os.WEXITED | os.WNOWAIT)
        return True
    deadline = time.monotonic() + timeout
    pause = 0.001
    while True:
        try:
            if os.waitid(os.P_PID, pgid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
                return True
        except ChildProcessError:
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(pause, left))
        pause = min(pause * 2, 0.05)


def exit_message(step: str, code: int) -> str:
    """What a step's non-zero exit status ``code`` (negative: the signal) means."""
    if code >= 0:
        return f"step {step} exited with status {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = str(-code)
    message = f"step {step} was killed by signal {name}"
    if name == "SIGXFSZ":
        message += (" (a file grew beyond the file size limit: is the scratch disk or a quota "
                    "full?)")
    return message


# -- strays: processes a step left running outside its process group -----------------------

#: Linux's prctl option that makes a process adopt its descendants' orphans
_PR_SET_CHILD_SUBREAPER = 36

# [True] once this process adopts orphans (adopt_orphans), [False] where it cannot
_ADOPTING: list[bool] = []

#: seconds end_strays waits for a step's group to be gone and its strays to come to this process
STRAY_WAIT = 2.0


def adopt_orphans() -> bool:
    """Make this process the one its descendants' orphans are handed to (Linux's "child
    subreaper"): a step's process that leaves its group (``setsid``, a daemon that forks
    twice) becomes this process's child once its parent ends, where :func:`end_strays` finds
    it. For an engine process only: a process that has children of its own to keep (a driver
    that runs tasks in-process) must not. True if this process adopts them."""
    if not _ADOPTING:
        adopting = False
        if sys.platform.startswith("linux"):
            with contextlib.suppress(Exception):
                import ctypes

                libc = ctypes.CDLL(None, use_errno=True)
                adopting = libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
        _ADOPTING.append(adopting)
    return _ADOPTING[0]


def mark_engine() -> str:
    """Mark this engine process, and so every process its steps start, with
    ``OPF_ENGINE_MARK`` (its process id and random digits): should the engine be killed
    outright, its lifeline ends the processes carrying the mark that left their steps' groups.
    An engine started by a step of another engine replaces that engine's mark with its own. For
    an engine process only, before its first step (its lifeline takes the mark when it
    starts)."""
    mark = _own_mark()
    if not mark:
        mark = os.environ[ENGINE_MARK] = f"{os.getpid()}-{secrets.token_hex(4)}"
    return mark


def _own_mark() -> str:
    """This process's engine mark (:func:`mark_engine`); "" if it has none, or only one
    inherited from another engine."""
    mark = os.environ.get(ENGINE_MARK, "")
    return mark if mark.startswith(f"{os.getpid()}-") else ""


def children() -> frozenset[int]:
    """This process's children now, where this process adopts orphans (else none: there is
    nothing :func:`end_strays` would do): those of the thread that runs the steps and of the
    main thread, to which adopted orphans go."""
    if not (_ADOPTING and _ADOPTING[0]):
        return frozenset()
    found: set[int] = set()
    for tid in {os.getpid(), threading.get_native_id()}:
        with contextlib.suppress(OSError, ValueError):
            with open(f"/proc/self/task/{tid}/children", encoding="ascii") as f:
                found.update(int(pid) for pid in f.read().split())
    return frozenset(found)


def end_strays(before: frozenset[int], pgid: int | None = None) -> list[int]:
    """Kill and reap this process's children that were not ``before`` (:func:`children` when
    the step started) and are not its lifeline: after a step, what it left running outside its
    process group (orphans this process adopted, a ``call`` step's processes). A stray that
    leads a process group is killed with its group. Until :data:`STRAY_WAIT` seconds have
    passed, it looks again while the step's group ``pgid`` still has processes (their children
    come to this process as they die). Returns the strays' process ids. Nothing happens where
    this process does not adopt orphans."""
    if not (_ADOPTING and _ADOPTING[0]):
        return []
    keep = set(before)
    if _LIFELINE is not None:
        keep.add(_LIFELINE.pid)
    ended: list[int] = []
    deadline = time.monotonic() + STRAY_WAIT
    while True:
        strays = [pid for pid in children() if pid not in keep]
        for pid in strays:
            with contextlib.suppress(OSError):
                if os.getpgid(pid) == pid:
                    os.killpg(pid, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGKILL)
        for pid in strays:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        ended += strays
        if not strays and (pgid is None or not _group_left(pgid)):
            return ended
        if time.monotonic() > deadline:
            return ended
        if not strays:
            time.sleep(0.005)


def _group_left(pgid: int) -> bool:
    """Does the process group ``pgid`` still have a process?"""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _end_group(pgid: int) -> None:
    _killpg(pgid, signal.SIGTERM)
    _killpg(pgid, signal.SIGCONT)  # a stopped process sees SIGTERM only once it runs
    deadline = time.monotonic() + STOP_GRACE
    try:
        while time.monotonic() < deadline:
            try:
                if os.waitid(os.P_PID, pgid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
                    break
            except ChildProcessError:
                break
            time.sleep(0.02)
    except BaseException:  # a second interruption: no more grace
        pass
    _killpg(pgid, signal.SIGKILL)


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _watch(pgid: int) -> None:
    _GROUPS.add(pgid)
    _tell(f"+{pgid}\n")


def _unwatch(pgid: int) -> None:
    _GROUPS.discard(pgid)
    _tell(f"-{pgid}\n")


def keep_lifeline() -> None:
    """Have this process's lifeline running before a step starts: a process killed right
    after starting a step, before it could tell a lifeline started only then, would leave the
    step's group to no one."""
    _tell("")


def _tell(line: str) -> None:
    """Tell this process's lifeline (:mod:`opals_dsl.runtime.reaper`, started when first needed and
    again if it died) about a step group."""
    global _LIFELINE
    proc = _LIFELINE
    if proc is not None and proc.poll() is None and proc.stdin is not None:
        try:
            proc.stdin.write(line.encode())
            proc.stdin.flush()
            return
        except OSError:
            pass
    _LIFELINE = proc = _start_lifeline()
    if proc is not None and proc.stdin is not None and _GROUPS:
        with contextlib.suppress(OSError):
            proc.stdin.write("".join(f"+{g}\n" for g in _GROUPS).encode())
            proc.stdin.flush()


def _start_lifeline() -> subprocess.Popen | None:
    # the engine's own environment, without the variables of the task running now: the
    # lifeline serves every task of this engine
    env = {k: v for k, v in os.environ.items() if k not in _TASK_VARS}
    env.update({k: v for k, v in _ENGINE_ENV.items() if v is not None})
    reaper = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reaper.py")
    mark = _own_mark()  # what this engine's steps carry
    try:
        return subprocess.Popen(
            [sys.executable, "-I", "-S", reaper, "groups",
             *([f"{ENGINE_MARK}={mark}"] if mark else [])], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd="/",
            start_new_session=True,
        )
    except OSError:
        return None


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables of this process (its children inherit them), then undo: for
    the steps of one task, and for the embedded cluster's processes as they start.

    Changing ``os.environ`` in place is much cheaper than building a fresh environment mapping
    for every task; an engine runs one task at a time.
    """
    old = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def call_deadline(timeout: float | None) -> Iterator[bool]:
    """Raise :class:`StepTimedOut` in this thread after ``timeout`` seconds (a ``SIGALRM``
    timer); yields whether the limit is enforced (only the main thread receives signals)."""
    if timeout is None or threading.current_thread() is not threading.main_thread():
        yield False
        return

    def expire(signum: int, frame: Any) -> None:
        raise StepTimedOut

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        yield True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def call_redirected(fn: Any, kwargs: dict[str, Any], out: Any,
                     cwd: str, timeout: float | None = None) -> BaseException | None:
    """Call ``fn(**kwargs)`` in ``cwd`` with its output (Python and fd level) going to ``out``.

    Returns the exception it raised (its traceback written to ``out``), or None;
    :class:`StepTimedOut` when it ran past ``timeout`` seconds (:func:`call_deadline`). The
    working directory, ``sys.stdout``/``sys.stderr`` and file descriptors 1 and 2 are restored
    in every case; KeyboardInterrupt passes through after the restore.
    """
    try:
        old_cwd: str | None = os.getcwd()
    except OSError:
        old_cwd = None
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved: list[tuple[int, int]] = []
    old_out, old_err = sys.stdout, sys.stderr
    error: BaseException | None = None
    try:
        for fd in (1, 2):
            try:
                saved.append((fd, os.dup(fd)))
            except OSError:  # the descriptor is closed: nothing to redirect
                continue
            os.dup2(out.fileno(), fd)
        sys.stdout = sys.stderr = out
        os.chdir(cwd)
        with call_deadline(timeout):
            fn(**kwargs)
    except StepTimedOut as exc:
        error = exc
    except SystemExit as exc:
        if exc.code not in (None, 0):
            error = exc
    except Exception as exc:
        tb = exc.__traceback__
        out.write("".join(traceback.format_exception(type(exc), exc,
                                                     tb.tb_next if tb else None)))
        error = exc
    finally:
        with contextlib.suppress(Exception):
            out.flush()
        sys.stdout, sys.stderr = old_out, old_err
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)
        if old_cwd is not None:
            with contextlib.suppress(OSError):
                os.chdir(old_cwd)
    return error


def _module_stamp(path: str) -> tuple[str, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns)


def remember_module(name: str) -> None:
    if name not in _MODULES:
        file = getattr(sys.modules.get(name), "__file__", None)
        stamp = _module_stamp(file) if file else None
        if stamp is not None:
            _MODULES[name] = stamp


def forget_stale_module(name: str, root: str) -> None:
    """Drop a module a ``call`` imported earlier from ``sys.modules`` when its file changed
    since, or when the pipeline in ``root`` has a file of that name elsewhere (an engine serves
    many runs: each must run the code as it is now, from its own pipeline folder)."""
    old = _MODULES.get(name)
    if old is None or name not in sys.modules:
        return
    here = next((p for p in (os.path.join(root, rel) for rel in module_files(name))
                 if os.path.isfile(p)), None)
    now = _module_stamp(old[0])
    if now != old or (here is not None and os.path.realpath(here) != old[0]):
        del sys.modules[name]
        del _MODULES[name]
