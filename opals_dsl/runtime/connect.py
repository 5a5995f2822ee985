"""Opening a cluster, whichever kind ``ClusterOptions`` names: an embedded one started here
(:class:`~opals_dsl.runtime.cluster.EmbeddedCluster`), engines started elsewhere
(:mod:`.launchers`), or an existing cluster reached through its profile or connection file."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import ClusterError
from .cluster import MARKER, ClusterOptions, EmbeddedCluster, using_ipython_dir
from .events import new_run_id
from .executor import IPyParallelExecutor, describe_error
from .launchers import launched
from .steps import environment
from .timeline import NoTimeline, Timeline


@contextlib.contextmanager
def open_cluster(options: ClusterOptions, state_dir: str | Path, *,
                 scratch: str | None = None, run_id: str | None = None,
                 interrupted: Callable[[], bool] | None = None,
                 timeline: Timeline | None = None,
                 count: Callable[[], int] | None = None,
                 needed: Callable[[], int | None] = lambda: None,
                 ) -> Iterator[IPyParallelExecutor]:
    """Start or reach the cluster ``options`` name and yield an executor for its engines.

    An embedded cluster is stopped on the way out, however the block ends (and by its lifeline
    if this process is killed); every process of it carries ``OPF_RUN_ID=run_id``; a start
    that ``interrupted`` reports interrupted raises KeyboardInterrupt; its phases (cluster
    start, engines ready, stop) are marked on ``timeline``; ``count``, if given, says how many
    engines an embedded cluster starts once its controller is launched, ``needed`` how many
    engines a launched one needs at most, if known by the time its hosts have answered (a host
    of ``ssh:`` without ``:N`` starts no more). An existing cluster is only
    disconnected from. Raises :class:`ClusterError` if there is no cluster to use.
    """
    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True)
    if options.launch is not None:
        yield from launched(options, state, scratch, timeline or NoTimeline(), needed)
    elif options.embedded:
        yield from _embedded(options, state, scratch, run_id, interrupted,
                             timeline or NoTimeline(), count)
    else:
        yield from _existing(options, state, scratch)


def _embedded(options: ClusterOptions, state: Path, scratch: str | None,
              run_id: str | None, interrupted: Callable[[], bool] | None,
              timeline: Timeline, count: Callable[[], int] | None,
              ) -> Iterator[IPyParallelExecutor]:
    run_id = run_id or new_run_id()
    cluster = EmbeddedCluster(state, options.engines or os.cpu_count() or 1, options.timeout,
                              run_id, interrupted, timeline, count)
    executor = None
    marked = environment({MARKER: run_id}) if run_id else contextlib.nullcontext()
    with using_ipython_dir(cluster.ipython_dir), marked:
        try:
            try:
                client = cluster.start()
                executor = IPyParallelExecutor(client, scratch=scratch, timeout=options.timeout)
                executor.run_id = run_id
                timeline.mark("engines ready", cluster.launched_at,
                              note=f"{cluster.n} engine{'s' if cluster.n != 1 else ''} "
                                   f"registered and prepared")
            except ClusterError:
                raise
            except Exception as exc:
                said = cluster.output_tail()
                n = cluster.n
                raise ClusterError(
                    f"could not start a local ipyparallel cluster of {n} engine"
                    f"{'s' if n != 1 else ''}: {describe_error(exc)}"
                    + (f"\n{said}" if said else "")
                ) from exc
            yield executor
        finally:
            with timeline.phase("stop"):
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
        _check_profile(str(options.profile))

        def connect() -> Any:
            return ipp.Client(profile=options.profile, timeout=options.timeout)

    with using_ipython_dir(ipython_dir):
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


def _check_profile(name: str) -> None:
    """Refuse a profile whose folder does not exist, or whose controller has left no
    connection file, naming the folder and how to start its cluster."""
    from IPython.paths import get_ipython_dir

    folder = Path(get_ipython_dir()) / f"profile_{name}"
    start = f"start one with 'ipcluster start --profile={name}'"
    if not folder.is_dir():
        raise ClusterError(f"there is no ipyparallel profile {name!r} (no folder {folder}); "
                           f"{start}, or leave out --profile for a cluster of this machine")
    if not (folder / "security" / "ipcontroller-client.json").is_file():
        raise ClusterError(f"no cluster of profile {name!r} is running (no "
                           f"{folder / 'security' / 'ipcontroller-client.json'}); {start}")
