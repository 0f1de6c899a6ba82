"""Where units are computed: in this process, or as Dask tasks (a local cluster or a running scheduler).

On Dask, the job travels once to every worker (scattered, broadcast) and each worker process builds the job's
heavy state (:meth:`gradlab.runner.Job.prepare`: models, checkpoints, data) once, caching it across its units; a
task carries only the unit and returns compact numpy arrays.  At most two units per worker are in flight, so the
driver -- the single writer of the store -- holds bounded memory.  Tasks are submitted with ``pure=False``
(identical arguments must not collapse into one task).
"""

from __future__ import annotations

import logging
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
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        cluster = LocalCluster(n_workers=int(workers or 1), threads_per_worker=1, processes=True,
                               dashboard_address=None)
    return Client(cluster), cluster


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
