"""The engine side of ``opf run``: what one ipyparallel engine does with the tasks it is given.

The scheduler (driver side) turns each task of the plan into a request
(:class:`~opals_dsl.plan.wire.TaskRequest`, travelling as plain data) and ships batches of them
to :func:`run_tasks`, which runs inside the engine and answers with one
:class:`~opals_dsl.plan.wire.TaskResult` per request. This module and the ones it imports
(``plan/wire.py``, ``plan/trace.py`` and the engine's helpers in ``runtime/``) use only the standard
library, so it is cheap to import on an engine and carries no driver-side state.

Folders
    Every engine works below a scratch root: the request's ``scratch`` if given, else
    ``$OPF_SCRATCH`` on the engine, else the system temp folder, resolved to an absolute real path
    (:func:`identify` reports it). A job's shared files live in the *job folder*
    ``<scratch>/opf/<pipeline>/<job>/<key>/``, where ``<key>`` is 16 hex digits of a hash of
    what is in it (the pipeline folder, and each shared file's source path, size, modification
    time and name): one folder per content, so runs that stage different shared files (other
    params, another project with the same pipeline name) never share one. Each task works in
    ``<job folder>/<task id>/``, so a command sees the shared files as ``../<name>``. A machine
    is "host name + scratch root": engines with the same pair share job folders.

The four phases of a task, each a node of the plan with one row in the result's ``trace``
    1. *Machine stage* (``stage:JOB``, the Job Prephase): the job folder for this content of
       the shared files, staged once per machine (:mod:`.jobfolders`).
    2. *Task stage* (``stage:JOB/TASK``, the Task Prephase). Every path is checked first: the
       task folder must be one folder inside the job folder, and every ``local``, every declared
       output and every copy-back source must lie inside the task folder (shared names inside
       the job folder); a request that breaks this is refused with failure kind ``stage``. The
       task then takes an exclusive lock (``<pipeline>/<job>/.<key>.tasks/<task id>``, held
       until its copy-back is done): an engine of the same machine still running the same task
       — work a killed driver had handed out, or an engine taken for lost — is waited for, never
       run over; but a holder that stays stopped (``kill -STOP``) for
       :data:`STOPPED_HOLDER_WAIT` seconds fails the stage, naming it.
       A leftover task folder of an earlier attempt is removed, the folder is created and
       every input is copied to its ``local`` path (subfolders such as
       ``dem/strip11/`` are created). Each input is checked before and after its copy: one that
       changes meanwhile (still being written) fails the stage, so a step never reads a torn
       copy. The result's ``staged`` gives each input's ``[size, mtime_ns]`` as copied (plus its
       SHA-256 when the request says ``checksum``, computed while copying), ``shared`` the same
       for the shared files.
    3. *Exec* (``exec:JOB/TASK/STEP``, the Mainphase), one step after the other with the task
       folder as working directory; each step's output goes to ``<logs>/<step>/<task id>.log``
       (``logs``: the request's, the job's log folder; a retry's in ``attempt2/`` ... below the
       step's folder), which starts with the command line. An
       ``argv`` step runs without a shell, each word passed exactly as given, stdin from
       ``/dev/null``; the first word ``python`` means this engine's interpreter,
       a first word containing ``/`` is a path relative to the task folder, any other is looked up
       on the engine's PATH. The folders of the declared outputs (``out x = "sub/f.asc"``) are
       created before the step runs. The environment is the engine's plus ``OPF_TASK``,
       ``OPF_JOB`` and the request's ``run_id`` as ``OPF_RUN_ID``. The step runs in a session
       of its own; what it started ends with it, when it times out, when the engine is
       interrupted, and when the engine dies (``kill -9`` included; :mod:`.steps`). A log that
       cannot be written fails the step with kind ``log``, naming the state folder's disk when
       it is full. A ``call`` step imports ``package.module`` with the pipeline's
       folder on ``sys.path`` and calls ``function(**kwargs)`` in this process, with the working
       directory, ``sys.stdout``/``sys.stderr`` and file descriptors 1 and 2 switched to the task
       folder and the log for the duration and restored afterwards, whatever happens. A module
       imported for a ``call`` is imported afresh when its file changed since, or when this
       pipeline's folder has a module of that name elsewhere (an engine serves many runs). After
       a step, each declared output must exist as a file.
    4. *Copy-back* (``copyback:JOB/TASK``, the Task Postphase). Each ``[local, destination]``
       pair is copied to a temporary beside its destination (joined with the request's
       ``root``; :func:`write_temporaries`), then the task folder is removed. If anything before
       failed, nothing is copied back and the task folder is kept for inspection. The batch
       puts its tasks' copies in place together (:mod:`.landing`): every temporary flushed to
       disk, then each task's renamed into place, then each folder renamed into flushed once;
       each task whose results are on disk gets its receipt, if its request asked for one; only
       then do the results go back. The result's ``outputs`` gives each destination's
       ``[size, mtime_ns]`` as it is on disk (a journal records them). The copy-back's trace
       row ends when its temporaries are written.

Failures
    :func:`run_tasks` does not raise for a task's own failure; the result's ``failure`` says
    which node failed, of what ``kind`` (``stage``, ``not-found``, ``exit``, ``exception``,
    ``missing-output``, ``log``, ``copyback``, ``timeout``), the return code when there is one,
    a one-sentence message, the log file, its last lines (decoded as UTF-8, undecodable bytes
    replaced) and the task folder kept for inspection (None when there is none). Each trace row
    holds ``node``, ``kind``, ``start``/``end`` (``time.time()``), ``status`` (``done``,
    ``cached``, ``failed`` or ``timeout``) and ``bytes`` (bytes copied by a stage or copy-back
    node, the size of the declared outputs for an exec node); the row of the node that failed
    also holds the failure's ``returncode`` and ``message``. A full disk (or quota, or file
    size limit) is named as such in the message, and so is a destination whose folder path runs
    into a file.

Atomic copies
    How a destination only ever appears complete, and how a killed writer's temporaries are
    told from a live one's: :mod:`opals_dsl.runtime.fsatomic`.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

from ..plan.trace import TAIL_LINES, step_log, tail
from ..plan.wire import (
    REUSED,
    TIMEOUT,
    Failure,
    Stage,
    Step,
    TaskRequest,
    TaskResult,
    TraceRow,
    WireError,
)
from .fsatomic import CopyError, Temporary, discard, is_temp_name, write_temporaries
from .jobfolders import MARKER, JobPrephase
from .landing import Landing, Ran, copy_back_failed, settle
from .locks import HeldByStopped, lock, unlock
from .paths import (
    Changing,
    copy_in,
    disk_full,
    first_part,
    inside,
    is_component,
    os_reason,
    remove_tree,
)
from .steps import (
    StepTimedOut,
    call_redirected,
    children,
    end_strays,
    environment,
    exit_message,
    forget_stale_module,
    format_limit,
    keep_lifeline,
    remember_module,
    use_threads,
    wait_step,
)

# absolute scratch base as given -> resolved real path
_SCRATCH: dict[str, str] = {}


def identify(scratch: str | None = None) -> dict[str, Any]:
    """Who and where this engine is: host, process id, scratch root, machine id, interpreter."""
    root = _scratch_root(scratch)
    host = socket.gethostname()
    return {
        "host": host,
        "pid": os.getpid(),
        "scratch": root,
        "machine": f"{host}:{root}",
        "python": sys.executable,
    }


def job_folder(request: dict[str, Any]) -> str:
    """The job folder the task ``request`` (plain data) would use on this engine, for its
    shared files as they are now (the folder need not exist)."""
    req = TaskRequest.from_wire(request)
    task = _Task(req, socket.gethostname())
    task.pick_job_folder(req.machine_stage.node, req.machine_stage)
    return task.job_dir


def run_tasks(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run each task request (:class:`~opals_dsl.plan.wire.TaskRequest` as plain data) in order
    and return one result (:class:`~opals_dsl.plan.wire.TaskResult` as plain data) per request,
    once the batch's results are on disk (:func:`~.landing.settle`).

    A task's own failure (a bad command, a missing output, a copy that fails, a ``call`` that
    raises ...) is reported in its result, never raised; so is a request this engine cannot
    read (another version of opf, say).
    """
    host = socket.gethostname()
    landing = Landing()
    try:
        for request in batch:
            landing.add(_run_one(request, host))
        landing.land()
    except BaseException:  # interrupted: what is not in place yet stays out
        landing.abandon()
        raise
    return [result.to_wire() for result in settle(landing.ran, host)]


def _run_one(data: Any, host: str) -> Ran:
    try:
        task = _Task(TaskRequest.from_wire(data), host)
    except Exception as exc:  # a request without its essentials still gets an answer
        return Ran(_malformed(data, host, exc))
    return Ran(task.run(), receipt=task.req.receipt, copies=task.copies)


def _malformed(data: Any, host: str, exc: Exception) -> TaskResult:
    get = data.get if isinstance(data, dict) else (lambda key, default=None: default)
    scratch = identify(None)["scratch"]
    with contextlib.suppress(Exception):
        scratch = _scratch_root(get("scratch"))
    reason = str(exc) if isinstance(exc, WireError) else f"{type(exc).__name__}: {exc}"
    return TaskResult(
        job=str(get("job")), task=str(get("task")), attempt=int(get("attempt", 0) or 0),
        ok=False, host=host, pid=os.getpid(), scratch=scratch,
        failure=Failure("stage", f"the task request cannot be read: {reason}"),
    )


class _Failed(Exception):
    """Ends a task: carries the result's failure."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


class _Task(JobPrephase):
    def __init__(self, req: TaskRequest, host: str) -> None:
        self.req = req
        self.host = host
        self.pipeline = req.pipeline
        self.job = req.job
        self.task = req.task
        self.root = os.path.abspath(req.root or os.getcwd())
        self.scratch = _scratch_root(req.scratch)
        self.pipeline_dir = os.path.join(self.scratch, "opf", self.pipeline)
        # the job's folders, one per content of its shared files; the machine stage picks one
        self.jobs_dir = os.path.join(self.pipeline_dir, self.job)
        self.job_dir = self.jobs_dir
        self.task_dir = os.path.join(self.job_dir, self.task)
        self.logs = (  # the job's log folder: <step>/<task>.log in it
            os.path.abspath(req.logs)
            if req.logs
            else os.path.join(self.pipeline_dir, ".logs", self.job)
        )
        self.trace: list[TraceRow] = []
        self.step: str | None = None
        # what the result says, keyed by the plan's paths
        self.bytes_staged = 0
        self.bytes_copied = 0
        self.shared: dict[str, list[Any]] = {}
        self.staged: dict[str, list[Any]] = {}
        self.outputs: dict[str, list[Any]] = {}
        self.checksum = req.checksum
        self.task_lock: tuple[str, int] | None = None
        # the copy-back's temporaries, put in place with the batch's: (local, destination, temp)
        self.copies: list[tuple[str, str, Temporary]] = []

    # -- the task --------------------------------------------------------------------------

    def run(self) -> TaskResult:
        ok = False
        failure: Failure | None = None
        try:
            self.machine_stage()
            self.task_stage()
            env = {"OPF_TASK": self.task, "OPF_JOB": self.job}
            if self.req.run_id:
                env["OPF_RUN_ID"] = str(self.req.run_id)
            with environment(env):
                for step in self.req.steps[:self.req.start]:
                    self.close_row(self.open_row(step.node, "exec"), REUSED)
                for step in self.req.steps[self.req.start:]:
                    self.exec_step(step)
            self.copyback()
            ok = True
        except _Failed as failed:
            failure = failed.failure
        except Exception as exc:  # an unforeseen condition is still this task's failure
            failure = self.unexpected(exc)
        except BaseException:  # interrupted (Ctrl-C reaches an engine as SIGINT), or ending
            discard([temp for _, _, temp in self.copies])
            self.copies = []
            if self.task_lock is not None:  # the folder is this task's: nothing in it counts
                with contextlib.suppress(OSError):
                    remove_tree(self.task_dir)
            raise
        finally:
            if self.task_lock is not None:
                unlock(*self.task_lock)
                self.task_lock = None
        if self.trace and self.trace[-1].end is None:
            self.trace[-1].end = time.time()
        return TaskResult(
            job=self.job, task=self.task, attempt=self.req.attempt, ok=ok, host=self.host,
            pid=os.getpid(), scratch=self.scratch, trace=tuple(self.trace), failure=failure,
            bytes_staged=self.bytes_staged, bytes_copied=self.bytes_copied,
            shared=self.shared, staged=self.staged, outputs=self.outputs,
        )

    def open_row(self, node: str, kind: str) -> TraceRow:
        row = TraceRow(node, kind, time.time())
        self.trace.append(row)
        return row

    @staticmethod
    def close_row(row: TraceRow, status: str, nbytes: int = 0) -> None:
        row.end = time.time()
        row.status = status
        row.bytes = nbytes

    def fail(self, node: str, kind: str, message: str, *, step: str | None = None,
             returncode: int | None = None, log: str | None = None) -> _Failed:
        for row in reversed(self.trace):  # the failed node's trace row says why, too
            if row.node == node:
                row.returncode, row.message = returncode, message
                row.status = TIMEOUT if kind == "timeout" else row.status
                break
        return _Failed(Failure(
            kind, message, node=node, step=step, returncode=returncode, log=log,
            tail=tuple(tail(log, TAIL_LINES)) if log else (),
            task_dir=self.task_dir if os.path.isdir(self.task_dir) else None,
        ))

    def unexpected(self, exc: Exception) -> Failure:
        row = self.trace[-1] if self.trace else TraceRow(f"stage:{self.job}", "stage", 0.0)
        kind = {"stage": "stage", "copyback": "copyback"}.get(row.kind, "exception")
        step = log = None
        if row.kind == "exec":
            step = self.step
            log = self.log_file(step)
            if not os.path.isfile(log):
                log = None
        message = f"{row.node} failed unexpectedly: {type(exc).__name__}: {_first_line(exc)}"
        return self.fail(row.node, kind, message, step=step, log=log).failure

    # -- 1. machine stage (Job Prephase) -----------------------------------------------------

    # -- 2. task stage (Task Prephase) -------------------------------------------------------

    def task_stage(self) -> None:
        spec = self.req.task_stage
        node = spec.node
        row = self.open_row(node, "stage")
        pairs = self.check_paths(node, spec)
        locks = os.path.join(self.jobs_dir, f".{os.path.basename(self.job_dir)}.tasks")
        try:
            os.makedirs(locks, exist_ok=True)
            self.task_lock = lock(os.path.join(locks, self.task))
        except HeldByStopped as held:
            raise self.fail(
                node, "stage",
                f"the task folder {self.task_dir} is held by process {held.pid} on this machine, "
                f"which has been stopped for {held.waited:.0f} s (kill -STOP, Ctrl-Z, a "
                f"debugger): most likely an engine that was taken for lost while it ran this "
                f"task. opf does not run over its work: resume it (kill -CONT {held.pid}) or end "
                f"it (kill {held.pid}), then run again") from None
        except OSError as exc:
            raise self.fail(node, "stage", f"cannot lock the task folder {self.task_dir}: "
                                           f"{os_reason(exc, 'scratch')}") from exc
        made = {self.task_dir}
        nbytes = 0
        try:
            try:
                os.mkdir(self.task_dir)
            except FileExistsError:  # left over from an earlier attempt
                remove_tree(self.task_dir)
                os.mkdir(self.task_dir)
        except OSError as exc:
            raise self.fail(node, "stage", f"cannot create the task folder {self.task_dir}: "
                                           f"{os_reason(exc)}") from exc
        for plan_src, src, local, dst in pairs:
            try:
                folder = os.path.dirname(dst)
                if folder not in made:
                    os.makedirs(folder, exist_ok=True)
                    made.add(folder)
                stats = copy_in(src, dst, self.checksum)
            except FileNotFoundError as exc:
                if os.path.exists(src):  # the file is there: its copy's folder is not
                    raise self.fail(node, "stage", f"cannot stage {src} as {local}: "
                                                   f"{os_reason(exc, 'scratch')}") from exc
                raise self.fail(node, "stage", f"input {src} does not exist (any more): it was "
                                               f"deleted or renamed after the plan was "
                                               f"made") from exc
            except Changing as exc:
                raise self.fail(node, "stage", f"input {src} changed while it was being copied "
                                               f"({exc}); it is probably still being written. "
                                               f"Run again when it is complete") from exc
            except OSError as exc:
                raise self.fail(node, "stage", f"cannot stage {src} as {local}: "
                                               f"{os_reason(exc, 'scratch')}") from exc
            nbytes += stats[0]
            self.staged[plan_src] = stats
        self.bytes_staged += nbytes
        self.close_row(row, "done", nbytes)

    def check_paths(self, node: str, spec: Stage) -> list[tuple[str, str, str, str]]:
        """Refuse a request whose folders or files would lie outside where they belong; the
        inputs as (plan source, absolute source, local name, local path)."""
        taken = {MARKER} | {first_part(name) for _, name in self.req.machine_stage.files}
        if not is_component(self.task) or self.task in taken or is_temp_name(self.task):
            raise self.fail(node, "stage", f"the task id {self.task!r} cannot name a folder of "
                                           f"its own inside the job folder {self.job_dir}")
        pairs = []
        for src, local in [*self.inputs_read(spec), *self.reused_outputs()]:
            dst = self.local_path(node, local, "input")
            pairs.append((src, os.path.join(self.root, src), local, dst))
        for ex in self.req.steps:
            if not is_component(ex.step):
                raise self.fail(node, "stage", f"the step name {ex.step!r} cannot name a log "
                                               "file")
            for out in ex.outputs:
                self.local_path(node, out, f"output of step {ex.step}")
        for local, _ in self.req.copyback.files:
            self.local_path(node, local, "file to copy back")
        return pairs

    def inputs_read(self, spec: Stage) -> list[tuple[str, str]]:
        """The task's inputs as (source, local name) that the steps it runs read: all of them,
        unless it resumes at a later step (an input only the earlier steps read, a raw strip
        of several GB, say, is not copied for nothing)."""
        if self.req.start <= 0:
            return list(spec.files)
        read = self.read_by_steps_run()
        return [(src, local) for src, local in spec.files if local in read]

    def reused_outputs(self) -> list[tuple[str, str]]:
        """For a task resumed at a later step: (destination, local name) of each published
        output of the steps it does not run that a step it runs reads."""
        start = self.req.start
        if start <= 0:
            return []
        earlier = {out for ex in self.req.steps[:start] for out in ex.outputs}
        read = self.read_by_steps_run()
        return [(dest, local) for local, dest in self.req.copyback.files
                if local in earlier and local in read]

    def read_by_steps_run(self) -> set[str]:
        """The local names the steps this task runs read."""
        return {name for ex in self.req.steps[self.req.start:] for name in ex.inputs}

    def local_path(self, node: str, local: str, what: str) -> str:
        path = inside(self.task_dir, local)
        if path is None:
            raise self.fail(node, "stage", f"{what} {local!r} does not lie inside the task "
                                           f"folder {self.task_dir}")
        return path

    # -- 3. exec (Mainphase) -----------------------------------------------------------------

    def exec_step(self, ex: Step) -> None:
        step = self.step = ex.step
        node = ex.node
        row = self.open_row(node, "exec")
        row.threads = ex.threads
        log = self.log_file(step)
        for out in ex.outputs:
            folder = os.path.dirname(os.path.join(self.task_dir, out))
            if folder != self.task_dir:
                try:
                    os.makedirs(folder, exist_ok=True)
                except OSError as exc:
                    raise self.fail(node, "exception", f"cannot create the folder of output "
                                                       f"{out} of step {step}: "
                                                       f"{os_reason(exc, 'scratch')}",
                                    step=step) from exc
        use_threads(ex.threads)
        if ex.argv is not None:
            returncode: int | None = self.run_argv(node, step, list(ex.argv), log, ex.timeout)
        elif ex.function:
            returncode = self.run_call(node, step, ex.function, dict(ex.kwargs), log,
                                       ex.timeout)
        else:
            raise self.fail(node, "exception", f"step {step} has neither a command nor a call",
                            step=step)
        missing = []
        nbytes = 0
        for out in ex.outputs:
            try:
                st = os.stat(os.path.join(self.task_dir, out))
            except OSError:
                missing.append(out)
                continue
            if stat.S_ISREG(st.st_mode):
                nbytes += st.st_size
            else:
                missing.append(out)
        if missing:
            raise self.fail(node, "missing-output",
                            f"step {step} finished but did not write {', '.join(missing)}",
                            step=step, returncode=returncode, log=log)
        self.close_row(row, "done", nbytes)

    def log_file(self, step: str) -> str:
        return step_log(self.logs, self.task, step, self.req.attempt)

    def open_log(self, node: str, step: str, log: str, header: str, *,
                 text: bool = False) -> Any:
        """The step's log, opened and begun with ``header`` (its command line); its folder is
        created when the first task of the job and step on this engine finds it missing. A log
        that cannot be written fails the step as a problem of the run's state folder, not of
        the step (a full disk there is named as such)."""
        out: Any = None
        try:
            try:
                out = _open_log(log, text)
            except (FileNotFoundError, NotADirectoryError):
                folder = os.path.dirname(log)
                try:
                    os.makedirs(folder, exist_ok=True)
                except OSError as exc:
                    raise self.fail(node, "log", f"cannot create the log folder {folder} for "
                                                 f"step {step}: {os_reason(exc, 'state')}",
                                    step=step) from exc
                out = _open_log(log, text)
            if text:
                out.write(header)
            else:
                _write(out, header)
        except OSError as exc:
            if out is not None:
                with contextlib.suppress(OSError):
                    out.close()
            raise self.fail(node, "log", f"cannot write the log of step {step} ({log}): "
                                         f"{os_reason(exc, 'state')}", step=step) from exc
        return out

    def timed_out(self, node: str, step: str, timeout: float | None, log: str) -> _Failed:
        limit = format_limit(timeout or 0)
        return self.fail(node, "timeout", f"step {step} timed out after {limit}", step=step,
                         log=log)

    def run_argv(self, node: str, step: str, argv: list[str], log: str,
                 timeout: float | None = None) -> int:
        with self.open_log(node, step, log, "$ " + shlex.join(argv) + "\n") as out:
            program = argv[0] if argv else ""
            if program == "python":
                exe: str | None = sys.executable
            elif "/" in program:
                exe = os.path.normpath(os.path.join(self.task_dir, program))
                if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
                    exe = None
            else:
                exe = shutil.which(program) if program else None
            if exe is None:
                if "/" in program:
                    message = (f"program {program} of step {step} was not found as an "
                               f"executable file in the task folder {self.task_dir}")
                else:
                    message = (f"program {program!r} of step {step} was not found on the "
                               f"engine's PATH ({os.environ.get('PATH', '')})")
                with contextlib.suppress(OSError):
                    _write(out, f"opf: {message}\n")
                out.close()
                raise self.fail(node, "not-found", message, step=step, log=log)
            keep_lifeline()
            before = children()
            try:
                # a session of its own: the step and everything it starts form one process
                # group, which is ended as a whole (see wait_step)
                proc = subprocess.Popen(
                    [exe, *argv[1:]], cwd=self.task_dir, stdin=subprocess.DEVNULL,
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                )
            except OSError as exc:
                message = f"program {exe} of step {step} could not be started: {os_reason(exc)}"
                with contextlib.suppress(OSError):
                    _write(out, f"opf: {message}\n")
                out.close()
                raise self.fail(node, "not-found", message, step=step, log=log) from exc
            code = wait_step(proc, timeout, before)
        if code is None:
            raise self.timed_out(node, step, timeout, log)
        if code != 0:
            message = exit_message(step, code)
            if disk_full(self.logs):
                message += (" (the disk of the run's state folder, which holds the step's log, "
                            "is full)")
            raise self.fail(node, "exit", message, step=step, returncode=code, log=log)
        return code

    def run_call(self, node: str, step: str, function: str, kwargs: dict[str, Any],
                 log: str, timeout: float | None = None) -> None:
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        with self.open_log(node, step, log, f"$ call {function}({args})\n", text=True) as out:
            changed = self.module_changed(function.partition(":")[0])
            if changed is not None:
                with contextlib.suppress(OSError):
                    out.write(changed + "\n")
                    out.close()
                raise self.fail(node, "exception", f"step {step} could not load {function}: "
                                                   f"{changed}", step=step, log=log)
            try:
                fn = self.load(function)
            except Exception as exc:
                with contextlib.suppress(OSError):
                    out.write("".join(traceback.format_exception(exc)))
                with contextlib.suppress(OSError):
                    out.close()
                message = (f"step {step} could not load {function} (pipeline folder "
                           f"{self.root}): {type(exc).__name__}: {_first_line(exc)}")
                raise self.fail(node, "exception", message, step=step, log=log) from exc
            before = children()
            try:
                error = call_redirected(fn, kwargs, out, self.task_dir, timeout)
            finally:  # what the call started and left running ends with it
                end_strays(before)
        if isinstance(error, StepTimedOut):
            raise self.timed_out(node, step, timeout, log)
        if isinstance(error, SystemExit):
            code = error.code if isinstance(error.code, int) else 1
            raise self.fail(node, "exit", f"step {step} called sys.exit({error.code!r})",
                            step=step, returncode=code, log=log)
        if error is not None:
            message = f"step {step} raised {type(error).__name__}: {_first_line(error)}"
            raise self.fail(node, "exception", message, step=step, log=log)

    def load(self, function: str) -> Any:
        module_name, sep, attr = function.partition(":")
        if not sep or not module_name or not attr:
            raise ValueError(f"{function!r} should be written package.module:function")
        if not sys.path or sys.path[0] != self.root:  # this pipeline's modules come first
            with contextlib.suppress(ValueError):
                sys.path.remove(self.root)
            sys.path.insert(0, self.root)
        forget_stale_module(module_name, self.root)
        if module_name not in sys.modules:
            importlib.invalidate_caches()  # files written since the last import attempt
        obj: Any = importlib.import_module(module_name)
        remember_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
        if not callable(obj):
            raise TypeError(f"{function} is not callable")
        return obj

    # -- 4. copy-back (Task Postphase) -------------------------------------------------------

    def copyback(self) -> None:
        spec = self.req.copyback
        node = spec.node
        row = self.open_row(node, "copyback")
        earlier = {out for ex in self.req.steps[:self.req.start] for out in ex.outputs}
        files = [(local, dest) for local, dest in spec.files if local not in earlier]
        pairs = [(os.path.join(self.task_dir, local), os.path.join(self.root, dest))
                 for local, dest in files]
        try:
            temps = write_temporaries(pairs)
        except CopyError as failed:
            (local, _), (_, dst) = files[failed.index], pairs[failed.index]
            raise self.fail(node, "copyback",
                            copy_back_failed(local, dst, failed.error)) from failed.error
        self.copies = [(local, dest, temp) for (local, dest), temp in zip(files, temps,
                                                                          strict=True)]
        nbytes = sum(temp.size for temp in temps)
        self.bytes_copied += nbytes
        with contextlib.suppress(OSError):  # the outputs are safe; a stuck folder is no failure
            remove_tree(self.task_dir)
        self.close_row(row, "done", nbytes)


# -- machinery --------------------------------------------------------------------------------


def _scratch_root(scratch: str | None) -> str:
    base = scratch if scratch is not None else (
        os.environ.get("OPF_SCRATCH") or tempfile.gettempdir())
    base = os.path.expanduser(base)
    if not os.path.isabs(base):  # relative to the engine's working directory, which may change
        return os.path.realpath(base)
    root = _SCRATCH.get(base)
    if root is None:
        root = _SCRATCH[base] = os.path.realpath(base)
    return root


def _open_log(path: str, text: bool) -> Any:
    if text:
        return open(path, "w", buffering=1, encoding="utf-8", errors="backslashreplace")
    return open(path, "wb", buffering=0)


def _write(out: Any, text: str) -> None:
    out.write(text.encode("utf-8", "backslashreplace"))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"
