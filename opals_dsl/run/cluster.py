"""Clusters: the ipyparallel side of ``opf run`` — finding engines, and talking to them.

In: how the user wants to run (:class:`ClusterOptions`: an embedded cluster of ``engines``
engines, or an existing one by ``profile`` or connection file) and the run's state folder. Out:
an :class:`IPyParallelExecutor`, the :class:`opals_dsl.runtime.Executor` the scheduler submits
batches of task requests to, one engine at a time.

Embedded cluster
    ``ipp.Cluster`` with one controller and N local engines. ipyparallel's files (IPYTHONDIR,
    the profile, connection files and logs) live in ``<state>/ipython``, never in the user's
    home. The hub's heartbeat runs every 100 ms (start-up waits for the first beats, so this is
    what makes a cold start take about a second rather than six); it declares an engine lost
    after 5 s without an answer. The engines tolerate a silent hub for a minute. Every process
    of the cluster carries the run's id in its environment (``OPF_RUN_ID``, as the steps do).
    The processes of the cluster (with their creation times, which rules out a reused process
    id) are written to ``<state>/cluster.json`` while it runs, and told to the run's lifeline
    (:mod:`opals_dsl.reaper`), which ends the cluster within seconds if this process dies
    without stopping it (``kill -9``); a run that finds the file — its run and its lifeline
    were killed — stops those processes, and every process carrying that run's id, first. A
    start that is interrupted (Ctrl-C) stops between two of ipyparallel's steps, never inside
    its event loop. On the way out, steps still running (an interrupted run gives them a few
    seconds after SIGINT) are killed with their process groups, the cluster is stopped, and
    every process of the run still alive is ended.

Engines started elsewhere (``--engines ssh:HOST[:N],...``, ``slurm``, ``pbs``, ``mpi``)
    A controller here and engines started by ipyparallel's launchers: :mod:`opals_dsl.launchers`.

Existing cluster (``--profile NAME`` or ``--cluster-file PATH``)
    Only a client is opened (the connection file is passed positionally: ipyparallel ignores
    ``url_file=``); the controller and engines are left running at the end.

Engines
    Before work starts every engine runs :func:`prepare_engine` once: ANSI colours are turned
    off in its tracebacks, :mod:`opals_dsl.engine` is imported and the engine says who and where
    it is (host, scratch root, machine). Work is sent to one engine through its own DirectView,
    so the scheduler chooses the engine. The function shipped is :data:`RUN_TASKS`, an
    :class:`EngineCall` that pickles *by name* (≈300 bytes per message, 6 µs to pack); a
    module-level function would travel as its code object (≈1.6 kB, 60 µs), and would run the
    driver's copy of the code rather than the engine's installed one.

Lost engines
    :meth:`IPyParallelExecutor.discard` kills a lost engine that still runs on this machine (same
    process id and creation time as when it was identified), unless the controller itself is
    out of reach. Replies to requests the client no longer waits for (an engine taken for lost
    that comes back) are dropped, rather than printed by ipyparallel as "stale results".

Memory
    A consumed result is dropped from the client's caches at once; every few hundred messages
    the client's and the views' history lists are cleared and the hub is asked to forget the
    results it still keeps, so a run of 100,000 tasks keeps a flat footprint.

Failures to start or reach a cluster raise :class:`opals_dsl.errors.ClusterError` (exit 3).
Engines import this module to unpickle an :class:`EngineCall`, so at the top it imports only the
standard library and opf modules that do the same (ipyparallel and psutil are imported where
used).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ClusterError
from .events import new_run_id
from .executor import EngineInfo, describe_error
from .fsatomic import write_atomic
from .reaper import MARKER, end_run

#: heartbeat of the embedded controller (ms); start-up takes a few beats
HEARTBEAT_MS = 100
#: beats an engine may miss before the hub drops it (50 × 100 ms = 5 s)
HEARTBEAT_MISSES = 50
#: pings from the hub an engine may miss before it shuts itself down (600 × 100 ms = 1 min)
ENGINE_HEARTBEAT_MISSES = 600
#: consumed messages between two clean-ups of ipyparallel's histories
PURGE_EVERY = 512
#: seconds between two questions to the controller whether it is still there
CONTROLLER_PING_EVERY = 2.0

log = logging.getLogger(__name__)


class EngineCall:
    """A callable that names an engine-side function as ``"package.module:function"``.

    It pickles as that string, so an engine imports and runs its own copy of the function.
    """

    __slots__ = ("target",)

    def __init__(self, target: str) -> None:
        self.target = target

    def __getstate__(self) -> str:
        return self.target

    def __setstate__(self, state: str) -> None:
        self.target = state

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    def __repr__(self) -> str:
        return f"EngineCall({self.target!r})"

    @property
    def __name__(self) -> str:  # ipyparallel labels a task with its function's name
        return self.target.rpartition(":")[2]


RUN_TASKS = EngineCall("opals_dsl.run.engine:run_tasks")
PREPARE = EngineCall("opals_dsl.run.cluster:prepare_engine")


def prepare_engine(scratch: str | None) -> dict[str, Any]:
    """Runs on an engine: plain tracebacks, import the engine module, say who and where it is."""
    with contextlib.suppress(Exception):
        from IPython import get_ipython

        shell = get_ipython()
        if shell is not None:
            shell.run_line_magic("colors", "nocolor")
    from opals_dsl.run import engine

    return engine.identify(scratch)


@dataclass(frozen=True, slots=True)
class ClusterOptions:
    """Where to run: an embedded cluster of ``engines`` engines (None: one per core), or an
    existing cluster named by ``profile`` or by its client connection file ``cluster_file``,
    or engines that opf starts elsewhere (``launch``, :class:`opals_dsl.launchers.LaunchOptions`).
    ``timeout`` bounds connecting and waiting for engines (seconds)."""

    engines: int | None = None
    profile: str | None = None
    cluster_file: str | None = None
    timeout: float = 30.0
    launch: Any = None

    @property
    def embedded(self) -> bool:
        return self.profile is None and self.cluster_file is None


# -- talking to engines ----------------------------------------------------------------------


class IPyParallelExecutor:
    """Submits batches of task requests to chosen engines of an ipyparallel client."""

    def __init__(self, client: Any, *, scratch: str | None = None, timeout: float = 30.0) -> None:
        self.client = client
        self.scratch = scratch
        self.timeout = timeout
        #: the run id its engines carry in their environment (an embedded cluster), if any
        self.run_id: str | None = None
        self._views: dict[int, Any] = {}
        self._engines: dict[int, EngineInfo] = {}
        self._consumed: list[str] = []
        self._purge_next: list[str] = []
        self._ping: tuple[Any, float] | None = None
        self._last_ping = time.monotonic()
        self._unreachable = False
        # engine id -> (pid, creation time) of the engines that run on this machine
        self._local: dict[int, tuple[int, float]] = {}
        _quiet_late_replies(client)
        infos, errors = self._identify(client.ids)
        if errors:
            engine, message = errors[0]
            raise ClusterError(
                f"engine {engine} cannot run opf tasks: {message}\n"
                f"Every engine needs opf installed (the Python package opals_dsl) in the "
                f"Python it runs."
            )
        if not infos:
            raise ClusterError("the cluster has no engines")
        for info in infos:
            self._add(info)

    def _identify(self, ids: Iterable[int]) -> tuple[list[EngineInfo], list[tuple[int, str]]]:
        pending = {}
        errors: list[tuple[int, str]] = []
        for i in ids:
            try:
                pending[i] = self.client[i].apply_async(PREPARE, self.scratch)
            except Exception as exc:  # the engine left meanwhile
                errors.append((i, describe_error(exc)))
        infos = []
        deadline = time.monotonic() + self.timeout
        for i, ar in pending.items():
            try:
                ident = ar.get(timeout=max(0.1, deadline - time.monotonic()))
            except Exception as exc:
                errors.append((i, describe_error(exc)))
                continue
            infos.append(EngineInfo(i, ident["host"], ident["pid"], ident["scratch"],
                                    ident["machine"]))
        return infos, errors

    def _add(self, info: EngineInfo) -> None:
        self._engines[info.id] = info
        view = self.client[info.id]
        view.block = False
        self._views[info.id] = view
        if info.host == socket.gethostname():
            import psutil

            with contextlib.suppress(psutil.Error):
                self._local[info.id] = (info.pid, psutil.Process(info.pid).create_time())

    # the Executor interface

    def engines(self) -> Mapping[int, EngineInfo]:
        return dict(self._engines)

    def submit(self, engine: int, batch: list[dict[str, Any]]) -> Future:
        view = self._views.get(engine)
        if view is None:
            raise LookupError(f"engine {engine} is gone")
        return view.apply_async(RUN_TASKS, batch)

    def is_engine_loss(self, error: BaseException) -> bool:
        if isinstance(error, LookupError):  # rc[id] of an engine that left: IndexError
            return True
        return getattr(error, "ename", None) == "EngineError"

    def release(self, future: Future) -> None:
        client = self.client
        for msg_id in getattr(future, "msg_ids", None) or ():
            client.results.pop(msg_id, None)
            client.metadata.pop(msg_id, None)
            client._futures.pop(msg_id, None)
            client._output_futures.pop(msg_id, None)
            self._consumed.append(msg_id)
        if len(self._consumed) >= PURGE_EVERY:
            self._purge()

    def _purge(self) -> None:
        client = self.client
        consumed, self._consumed = self._consumed, []
        for msg_id in consumed:  # late output messages may have re-created an entry
            client.metadata.pop(msg_id, None)
        outstanding = client.outstanding
        if not outstanding:
            client.history.clear()
            for view in self._views.values():
                view.history.clear()
        else:
            client.history[:] = [m for m in client.history if m in outstanding]
            for view in self._views.values():
                view.history[:] = [m for m in view.history if m in outstanding]
        # the hub learns of a result a moment after we do: forget the previous window's
        old, self._purge_next = self._purge_next, consumed
        if old:
            with contextlib.suppress(Exception):
                client.purge_hub_results(jobs=old)

    def _controller_answers(self) -> bool:
        """Whether the controller still answers: a dead controller tells nobody, the client's
        engine list stays as it was and results never come, so it is asked now and then (a
        queue-status request) and given ``timeout`` seconds to reply."""
        now = time.monotonic()
        if self._ping is not None:
            reply, sent = self._ping
            if not reply.done():
                return now - sent <= self.timeout
            self._ping = None
        if now - self._last_ping >= CONTROLLER_PING_EVERY:
            self._last_ping = now
            try:
                reply = self.client._send(
                    self.client._query_stream, "queue_request",
                    content={"targets": "all", "verbose": False},
                )
            except Exception:
                return False
            self._ping = (reply, now)
        return True

    def refresh(self) -> tuple[list[EngineInfo], list[int]]:
        if not self._controller_answers():
            self._unreachable = True  # the engines are not to blame: leave them be
            gone = sorted(self._engines)  # every engine is out of reach with its controller
            self._engines.clear()
            self._views.clear()
            return [], gone
        try:
            current = set(self.client.ids)
        except Exception:
            return [], []
        gone = sorted(set(self._engines) - current)
        for engine in gone:
            self._engines.pop(engine, None)
            self._views.pop(engine, None)
        new = sorted(current - set(self._engines))
        added: list[EngineInfo] = []
        if new:
            infos, _ = self._identify(new)  # an engine that cannot run tasks is left out
            for info in infos:
                self._add(info)
                added.append(info)
        return added, gone

    def withdraw(self, futures: list[Future]) -> None:
        self.client.abort(jobs=list(futures), block=False)

    def interrupt(self, engines: Iterable[int]) -> None:
        targets = [e for e in engines if e in self._views]
        if targets:
            self.client.send_signal("SIGINT", targets=targets, block=False)

    def discard(self, engine: int) -> str | None:
        """Kill a lost engine's process if it runs on this machine: an engine taken for lost
        (frozen with ``kill -STOP``, swapping, hung) would otherwise hold its task's folder,
        and the task could not run elsewhere on this machine. Its steps die with it (their
        groups are ended by the engine's lifeline)."""
        self._views.pop(engine, None)
        self._engines.pop(engine, None)
        local = self._local.pop(engine, None)
        if local is None or self._unreachable:
            return None
        import psutil

        pid, created = local
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - created) > 0.01:
                return None
            status = proc.status()
            if status in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                return None
            proc.kill()
        except psutil.Error:
            return None
        how = "was stopped" if status == psutil.STATUS_STOPPED else "did not answer"
        return f"its process {pid} on this machine {how}; it was killed, with its steps"

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close(linger=0)


def _quiet_late_replies(client: Any) -> None:
    """Drop replies to requests the client no longer waits for. An engine that was taken for
    lost and comes back (``kill -CONT``) still answers; ipyparallel would print each such
    "stale result" — the whole message — on standard output."""
    handlers = getattr(client, "_queue_handlers", None)
    if not isinstance(handlers, dict):
        return
    for kind, handler in list(handlers.items()):
        def only_awaited(msg: Any, handler: Any = handler) -> None:
            with contextlib.suppress(Exception):
                md = msg.get("metadata") or {}
                if md.get("is_broadcast") and md.get("is_coalescing"):
                    msg_id = md.get("original_msg_id")
                else:
                    msg_id = (msg.get("parent_header") or {}).get("msg_id")
                if msg_id not in client.outstanding:
                    return
            handler(msg)

        handlers[kind] = only_awaited


# -- the embedded cluster --------------------------------------------------------------------


def _proc_record(proc: Any) -> dict[str, Any] | None:
    try:
        return {"pid": proc.pid, "created": proc.create_time()}
    except Exception:
        return None


def _live(records: Iterable[dict[str, Any]]) -> list[Any]:
    """The recorded processes that still run (same pid *and* creation time), with children."""
    import psutil

    found: dict[int, Any] = {}
    for rec in records:
        try:
            proc = psutil.Process(int(rec["pid"]))
            if abs(proc.create_time() - float(rec["created"])) > 0.01:
                continue
            found[proc.pid] = proc
            for child in proc.children(recursive=True):
                found[child.pid] = child
        except (psutil.Error, KeyError, ValueError, TypeError):
            continue
    return list(found.values())


def _kill(procs: list[Any]) -> None:
    import psutil

    for proc in procs:  # SIGKILL is not refused; no need to wait for the zombies' reaping
        with contextlib.suppress(psutil.Error):
            proc.kill()


def stop_leftover_cluster(state_dir: str | Path) -> bool:
    """Stop the embedded cluster an earlier, killed run recorded in ``state_dir``; True if any
    of its processes were still running (and the same for engines it started elsewhere)."""
    from .launchers import stop_leftover_launch

    launched = stop_leftover_launch(state_dir)
    record = Path(state_dir) / "cluster.json"
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return launched
    except (OSError, ValueError):
        data = {}
    if not isinstance(data, dict):
        data = {}
    procs = end_run(data.get("processes") or [], data.get("run_id"), grace=3.0)
    profile_dir = data.get("profile_dir")
    cluster_id = data.get("cluster_id")
    if profile_dir and cluster_id:
        security = Path(profile_dir) / "security"
        for name in (f"cluster-{cluster_id}.json", f"ipcontroller-{cluster_id}-client.json",
                     f"ipcontroller-{cluster_id}-engine.json"):
            with contextlib.suppress(OSError):
                (security / name).unlink()
    with contextlib.suppress(OSError):
        record.unlink()
    return bool(procs) or launched


@contextlib.contextmanager
def _ipython_dir(path: Path | None) -> Iterator[None]:
    """Point IPYTHONDIR at ``path`` for the duration (ipyparallel and its children read it)."""
    if path is None:
        yield
        return
    path.mkdir(parents=True, exist_ok=True)
    with _environ(IPYTHONDIR=str(path)):
        yield


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Set environment variables of this process (its children inherit them) for the
    duration."""
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


class EmbeddedCluster:
    """A controller and ``n`` engines on this machine, owned by this run.

    Every process of the cluster carries the run's ``run_id`` in its environment
    (``OPF_RUN_ID``, which the run's steps carry too), and is told to the run's lifeline
    (:mod:`opals_dsl.reaper`): a small process that ends them all should this process die
    without stopping them. ``interrupted`` is asked while the cluster starts; when it says
    True, the start stops with KeyboardInterrupt (raised here, never inside ipyparallel's event
    loop).
    """

    def __init__(self, state_dir: Path, n: int, timeout: float, run_id: str | None = None,
                 interrupted: Callable[[], bool] | None = None) -> None:
        self.state_dir = state_dir
        self.n = n
        self.timeout = timeout
        self.run_id = run_id
        self.interrupted = interrupted
        self.ipython_dir = state_dir / "ipython"
        self.profile_dir = self.ipython_dir / "profile_opf"
        self.record = state_dir / "cluster.json"
        self.cluster: Any = None
        self.client: Any = None
        self._procs: list[dict[str, Any]] = []
        self._lifeline: subprocess.Popen | None = None

    def _check(self) -> None:
        if self.interrupted is not None and self.interrupted():
            raise KeyboardInterrupt

    def start(self) -> Any:
        import ipyparallel as ipp
        import psutil

        stop_leftover_cluster(self.state_dir)
        self._check()
        self._start_lifeline()
        cluster_id = f"opf-{os.getpid()}-{secrets.token_hex(3)}"
        logger = logging.getLogger(f"{__name__}.ipyparallel")
        logger.propagate = False
        if not logger.handlers:
            logger.addHandler(logging.NullHandler())
        self.cluster = ipp.Cluster(
            n=self.n, profile_dir=str(self.profile_dir), cluster_id=cluster_id, delay=0,
            controller_args=[
                "--ip=127.0.0.1", "--log-level=WARN",
                f"--HeartMonitor.period={HEARTBEAT_MS}",
                f"--HeartMonitor.max_heartmonitor_misses={HEARTBEAT_MISSES}",
            ],
            engine_args=["--log-level=WARN",
                         f"--IPEngine.max_heartbeat_misses={ENGINE_HEARTBEAT_MISSES}"],
            engine_timeout=int(max(1, self.timeout)), log=logger, load_profile=False,
        )
        self.cluster.start_controller_sync()
        self._remember(cluster_id, [self.cluster.controller.process])
        self._check()
        self.cluster.start_engines_sync(self.n)
        engines = [launcher.process for es in self.cluster.engines.values()
                   for launcher in es.launchers.values()]
        self._remember(cluster_id, engines)
        self._check()
        self.client = self.cluster.connect_client_sync()
        waiting = self.client.wait_for_engines(self.n, timeout=self.timeout, block=False)
        while True:
            self._check()
            try:
                waiting.result(timeout=0.1)
                break
            except TimeoutError:
                if waiting.done():
                    raise
        tree = []
        for proc in [self.cluster.controller.process, *engines]:
            with contextlib.suppress(psutil.Error):
                tree.extend(proc.children(recursive=True))
        self._remember(cluster_id, tree)
        return self.client

    def _start_lifeline(self) -> None:
        """The run's lifeline: ends the cluster if this process dies without stopping it."""
        env = {k: v for k, v in os.environ.items() if k != MARKER}
        reaper = Path(__file__).with_name("reaper.py")
        try:
            self._lifeline = subprocess.Popen(
                [sys.executable, str(reaper), "run"], stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                start_new_session=True,
            )
        except OSError:
            self._lifeline = None
            return
        if self.run_id:
            self._tell({"marker": self.run_id})

    def _tell(self, item: dict[str, Any] | None) -> None:
        proc = self._lifeline
        if proc is None or proc.stdin is None:
            return
        try:
            proc.stdin.write((json.dumps(item) + "\n" if item is not None else "done\n")
                             .encode())
            proc.stdin.flush()
        except OSError:
            pass

    def output_tail(self, lines: int = 8) -> str:
        """The last lines the controller and the engines wrote (for a failed start)."""
        if self.cluster is None:
            return ""
        launchers = [("controller", self.cluster.controller)]
        for es in self.cluster.engines.values():
            launchers += [(f"engine {i}", la) for i, la in getattr(es, "launchers", {}).items()]
        parts = []
        for name, launcher in launchers:
            with contextlib.suppress(Exception):
                text = (launcher.get_output() or "").strip()
                if text:
                    tail = "\n".join("  | " + ln for ln in text.splitlines()[-lines:])
                    parts.append(f"{name} said:\n{tail}")
        return "\n".join(parts)

    def _remember(self, cluster_id: str, procs: Iterable[Any]) -> None:
        for proc in procs:
            rec = _proc_record(proc)
            if rec is not None:
                self._procs.append(rec)
                self._tell(rec)
        data = {"cluster_id": cluster_id, "profile_dir": str(self.profile_dir),
                "driver": os.getpid(), "run_id": self.run_id, "processes": self._procs}
        write_atomic(str(self.record), json.dumps(data, indent=1).encode("utf-8"))

    def stop(self) -> None:
        # steps still running (an interrupt that did not reach them in time) are children of
        # the engines, each leading a process group: end them first, so that the engines are
        # free to exit when told
        ours = {rec["pid"] for rec in self._procs}
        leftovers = [p for p in _live(self._procs) if p.pid not in ours]
        for proc in leftovers:
            with contextlib.suppress(OSError):
                if os.getpgid(proc.pid) == proc.pid:
                    os.killpg(proc.pid, 9)
        _kill(leftovers)
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close(linger=0)
            self.client = None
        if self.cluster is not None:
            with contextlib.suppress(Exception):
                self.cluster.stop_cluster_sync()
        # what is left (the engines' nannies linger ~3 s trying to reach the stopped hub,
        # steps a busy engine was running, the engines' lifelines finishing their work)
        # belongs to a cluster already told to stop: every process of the run goes now
        end_run(self._procs, self.run_id, grace=0.5)
        with contextlib.suppress(OSError):
            self.record.unlink()
        if self.cluster is not None:
            self._remove_logs(self.cluster.cluster_id)
        self.cluster = None
        if self._lifeline is not None:
            self._tell(None)  # done: nothing for it to end
            with contextlib.suppress(OSError):
                if self._lifeline.stdin is not None:
                    self._lifeline.stdin.close()
            try:
                self._lifeline.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._lifeline.kill()
                self._lifeline.wait()
            self._lifeline = None

    def _remove_logs(self, cluster_id: str) -> None:
        folder = self.profile_dir / "log"
        with contextlib.suppress(OSError):
            for entry in os.scandir(folder):
                if cluster_id in entry.name or entry.name.startswith("engines"):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)



# -- opening a cluster -----------------------------------------------------------------------


@contextlib.contextmanager
def open_cluster(options: ClusterOptions, state_dir: str | Path, *,
                 scratch: str | None = None, run_id: str | None = None,
                 interrupted: Callable[[], bool] | None = None,
                 ) -> Iterator[IPyParallelExecutor]:
    """Start or reach the cluster ``options`` name and yield an executor for its engines.

    An embedded cluster is stopped on the way out, however the block ends (and by its lifeline
    if this process is killed); every process of it carries ``OPF_RUN_ID=run_id``; a start
    that ``interrupted`` reports interrupted raises KeyboardInterrupt. An existing cluster is
    only disconnected from. Raises :class:`ClusterError` if there is no cluster to use.
    """
    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True)
    if options.launch is not None:
        from .launchers import launched

        yield from launched(options, state, scratch)
    elif options.embedded:
        yield from _embedded(options, state, scratch, run_id, interrupted)
    else:
        yield from _existing(options, state, scratch)


def _embedded(options: ClusterOptions, state: Path, scratch: str | None,
              run_id: str | None, interrupted: Callable[[], bool] | None,
              ) -> Iterator[IPyParallelExecutor]:
    n = options.engines or os.cpu_count() or 1
    run_id = run_id or new_run_id()
    cluster = EmbeddedCluster(state, n, options.timeout, run_id, interrupted)
    executor = None
    marked = _environ(**{MARKER: run_id}) if run_id else contextlib.nullcontext()
    with _ipython_dir(cluster.ipython_dir), marked:
        try:
            try:
                client = cluster.start()
                executor = IPyParallelExecutor(client, scratch=scratch, timeout=options.timeout)
                executor.run_id = run_id
            except ClusterError:
                raise
            except Exception as exc:
                said = cluster.output_tail()
                raise ClusterError(
                    f"could not start a local ipyparallel cluster of {n} engine"
                    f"{'s' if n != 1 else ''}: {describe_error(exc)}"
                    + (f"\n{said}" if said else "")
                ) from exc
            yield executor
        finally:
            cluster.stop()


def _existing(options: ClusterOptions, state: Path,
              scratch: str | None) -> Iterator[IPyParallelExecutor]:
    import ipyparallel as ipp

    if options.cluster_file is not None:
        path = Path(options.cluster_file).expanduser()
        what = f"the ipyparallel controller of connection file {path}"
        if not path.is_file():
            raise ClusterError(f"the connection file {path} does not exist")
        ipython_dir: Path | None = None if os.environ.get("IPYTHONDIR") else state / "ipython"

        def connect() -> Any:
            return ipp.Client(str(path), timeout=options.timeout)
    else:
        what = f"the ipyparallel cluster of profile {options.profile!r}"
        ipython_dir = None

        def connect() -> Any:
            return ipp.Client(profile=options.profile, timeout=options.timeout)

    with _ipython_dir(ipython_dir):
        try:
            client = connect()
        except Exception as exc:
            raise ClusterError(f"cannot reach {what}: {describe_error(exc)}") from exc
        executor = None
        try:
            try:
                client.wait_for_engines(1, timeout=options.timeout)
            except Exception as exc:
                raise ClusterError(
                    f"{what} has no engines (waited {options.timeout:g} s)"
                ) from exc
            executor = IPyParallelExecutor(client, scratch=scratch, timeout=options.timeout)
            yield executor
        finally:
            with contextlib.suppress(Exception):
                client.close(linger=0)
