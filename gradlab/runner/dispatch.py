"""Where units are computed: in this process, or as Dask tasks (a local cluster or a running scheduler).

On Dask, the job travels once to every worker (scattered, broadcast) and each worker process builds the job's
heavy state (:meth:`gradlab.runner.Job.prepare`: models, checkpoints, data) once, caching it across its units; a
task carries only the unit and returns compact numpy arrays.  At most two units per worker are in flight, so the
driver -- the single writer of the store -- holds bounded memory.  Tasks are submitted with ``pure=False``
(identical arguments must not collapse into one task).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from gradlab.errors import UsageError
from gradlab.runner.job import Job, Unit, UnitContext
from gradlab.runner.threads import torch_threads

log = logging.getLogger(__name__)

_STATES: OrderedDict[str, Any] = OrderedDict()  # per process: the prepared state of the last few jobs
_MAX_STATES = 2


def prepared_state(job: Job) -> Any:
    """The job's :meth:`~gradlab.runner.Job.prepare` state, built once per process (kept for the two most
    recent jobs)."""
    key = job.state_key()
    if key in _STATES:
        _STATES.move_to_end(key)
        return _STATES[key]
    state = job.prepare()
    _STATES[key] = state
    while len(_STATES) > _MAX_STATES:
        _STATES.popitem(last=False)
    return state


def seed_state(job: Job, state: Any) -> None:
    """Cache an already-built state for ``job`` in this process (the driver built it while validating)."""
    _STATES[job.state_key()] = state
    _STATES.move_to_end(job.state_key())
    while len(_STATES) > _MAX_STATES:
        _STATES.popitem(last=False)


def compute_unit(job: Job, unit: Unit, threads: int | None, ctx: UnitContext | None = None
                 ) -> Mapping[str, np.ndarray]:
    """One unit's arrays, computed with ``threads`` torch threads (see :func:`gradlab.runner.torch_threads`)."""
    with torch_threads(threads if job.threads() else None):
        return job.compute(prepared_state(job), unit, ctx or UnitContext())


def local_results(job: Job, todo: Sequence[Unit], threads: int | None, ctx: UnitContext
                  ) -> Iterator[tuple[Unit, Mapping[str, np.ndarray]]]:
    for unit in todo:
        yield unit, compute_unit(job, unit, threads, ctx)


def check_dispatch(workers: int | None, scheduler: str | None) -> None:
    if workers is not None and int(workers) < 1:
        raise UsageError(f"--workers must be >= 1, got {workers}")
    if workers and scheduler:
        raise UsageError("give --workers or --scheduler, not both")


def check_travels(job: Job) -> None:
    """Refuse a job that names live Python objects (``live:`` specs of :mod:`gradlab.api`): they exist only in this
    process and cannot travel to Dask workers."""
    from gradlab.provenance import canonical_json

    if '"live:' in canonical_json(job.config_dict()):
        raise live_objects_error()


def live_objects_error() -> UsageError:
    return UsageError("live objects (a model, data or loss given as Python objects) cannot travel to Dask "
                      "workers; pass importable 'pkg.module:factory' names, or run without workers")


def dask_client(workers: int | None, scheduler: str | None) -> tuple[Any, Any]:
    """A Dask client on the cluster at ``scheduler``, or on a new local cluster of ``workers`` processes (one
    thread each)."""
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            return Client(scheduler, timeout="10s"), None
        except (OSError, TimeoutError) as exc:
            raise UsageError(f"cannot reach the Dask scheduler at {scheduler!r} ({exc}); check --scheduler") from None
    logging.getLogger("distributed").setLevel(max(logging.getLogger("distributed").level, logging.WARNING))
    import dask

    # Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which also freezes glibc's mmap threshold at
    # 128 KiB: every large torch temporary is then mmapped, page-faulted and unmapped again, and a frozen probe ran
    # 2x slower on a worker than in the driver (benchmarks/bench_dask.py).  Our workers keep glibc's defaults.
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
                          "distributed.worker.multiprocessing-method": _start_method()}):
        cluster = LocalCluster(n_workers=int(workers or 1), threads_per_worker=1, processes=True,
                               dashboard_address=None)
    return Client(cluster), cluster


#: imported once by the fork server, so that workers forked from it start with them loaded
WORKER_PRELOAD = ("torch", "numpy", "gradlab.runner.dispatch", "gradlab.probe.job", "gradlab.curvature.job",
                  "gradlab.train_job", "gradlab.cbs.job")


def prestart_local_workers() -> None:
    """Start the fork server now (``gradlab ... --workers N``, right after the command line is parsed), so that
    it imports torch and gradlab on another core while this process imports and validates; never raises."""
    try:
        _start_method()
    except Exception:  # noqa: BLE001 - an optimisation only: the cluster starts its workers either way
        log.debug("could not start the fork server early", exc_info=True)


def _start_method() -> str:
    """How local workers start: forked from a fork server (Linux, macOS; Python 3.14's default on Linux) that
    imported torch and gradlab once, else spawned.

    A spawned worker imports distributed, torch and gradlab itself and takes 0.7 s to close; a forked one starts
    with them loaded and closes at once (a fresh ``gradlab probe --workers 2`` of 8 frozen trials: 7.1 s against
    8.4 s), and in a process that runs several distributed commands (a notebook, the benchmarks) the fork server
    starts once.  The fork server is a fresh process that has run no torch operation (no thread pool to inherit),
    started with Dask's ``distributed.nanny.pre-spawn-environ`` variables (one BLAS/OpenMP thread, as spawned
    workers get them) except ``MALLOC_TRIM_THRESHOLD_``.
    """
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return "spawn"
    try:
        import dask
        from distributed.utils import get_mp_context

        with dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"}):
            ctx = get_mp_context()  # distributed's own preload list, set once per process
        from multiprocessing import forkserver

        current = list(getattr(forkserver._forkserver, "_preload_modules", []) or [])
        wanted = [m for m in WORKER_PRELOAD if importlib.util.find_spec(m.split(".")[0]) is not None]
        ctx.set_forkserver_preload(current + [m for m in wanted if m not in current])
        env = {k: os.environ.get(k, str(v)) for k, v in dask.config.get("distributed.nanny.pre-spawn-environ").items()
               if v is not None and k != "MALLOC_TRIM_THRESHOLD_"}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # the fork server's environment is its workers' (not the nanny's at spawn)
        try:
            forkserver.ensure_running()  # a no-op when it runs already
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    except Exception:  # noqa: BLE001 - any surprise in these internals: spawn, as distributed does by default
        log.debug("no fork server for the workers; they are spawned", exc_info=True)
        return "spawn"
    return "forkserver"


def dask_results(client: Any, job: Job, todo: Sequence[Unit], threads: int | None
                 ) -> Iterator[tuple[Unit, Mapping[str, np.ndarray]]]:
    """Submit units with at most two per worker in flight; yield results as they complete."""
    from distributed import as_completed

    n_workers = max(1, len(client.scheduler_info().get("workers", {})))
    remote_job = client.scatter(job, broadcast=True, hash=False)
    pending = list(todo)
    ac = as_completed()
    units: dict[Any, Unit] = {}

    def submit() -> None:
        unit = pending.pop(0)
        fut = client.submit(compute_unit, remote_job, unit, threads, pure=False)
        units[fut.key] = unit
        ac.add(fut)

    for _ in range(min(2 * n_workers, len(pending))):
        submit()
    for fut in ac:
        result = fut.result()
        unit = units.pop(fut.key)
        fut.release()
        if pending:
            submit()
        yield unit, result
