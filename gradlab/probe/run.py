"""``gradlab probe``: resolve and validate a config (:mod:`gradlab.probe.config`), then run it as a job of the one
runner (:class:`gradlab.probe.job.ProbeJob`, :func:`gradlab.runner.run_job`); and ``--dry-run`` planning.

Data flow: checkpoints + data -> :func:`resolve_config` (every check, nothing written) -> :func:`run_probe` (the
runner writes the template, computes every undone unit -- a chunk-aligned block of trials of one checkpoint, all
batch sizes, by the protocol's module in :mod:`gradlab.probe.protocols` -- writes it and marks it done, then the
job's finalize step writes the per-checkpoint variables).  Every unit runs with the torch thread count recorded in
the store (attr ``torch_threads``), so ``--resume`` (after ``kill -9`` too), ``--workers`` and ``--scheduler``
write the same bits as one uninterrupted local run (on machines with the same CPU kind and torch build).

Test hook: ``GRADLAB_PROBE_KILL_AFTER`` = ``done:K`` (or ``write:K``) makes the driver SIGKILL itself right after
the K-th unit is marked done (or after its variables are written but before it is marked done)
(:func:`gradlab.runner.run._kill_hook`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gradlab.errors import UsageError
from gradlab.probe.config import (  # noqa: F401 - the public names of gradlab.probe.run
    DEFAULT_BATCH_SIZES, DTYPES, KEEPS, PROTOCOLS, REDUCTIONS, SEED_DERIVATION, CheckpointSpec, ProbeConfig,
    parse_checkpoint_arg, resolve_config)
from gradlab.probe.job import ProbeJob, compute_trials, finalize  # noqa: F401
from gradlab.probe.layout import store_nbytes, store_sizes, store_variables  # noqa: F401
from gradlab.runner import store_exists_error, torch_threads
from gradlab.store import is_empty_folder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeSummary:
    """What a run did."""

    path: str
    units_computed: int
    units_total: int
    nonfinite: int
    seconds: float


def run_probe(config: ProbeConfig, out: str | os.PathLike, *, resume: bool = False, workers: int | None = None,
              scheduler: str | None = None, progress: bool = False) -> ProbeSummary:
    """Create (or resume) the store at ``out`` and compute every undone unit, then the per-checkpoint variables.

    ``workers``/``scheduler``: run units on a local Dask cluster of that many worker processes, or on the cluster
    at that address; the driver writes.  ``progress``: a progress bar with ETA on stderr.
    """
    from gradlab.runner import run_job

    s = run_job(ProbeJob(config), out, resume=resume, workers=workers, scheduler=scheduler, progress=progress)
    nonfinite = int(s.results.get("nonfinite", 0))
    if nonfinite:
        log.warning("%d non-finite gradient entries in total; see nonfinite_count in %s", nonfinite, out)
    return ProbeSummary(s.path, s.units_computed, s.units_total, nonfinite, s.seconds)


def compute_unit(config: ProbeConfig, c: int, t0: int, t1: int, threads: int | None = None
                 ) -> dict[str, np.ndarray]:
    """All per-trial variables of trials ``[t0, t1)`` of checkpoint ``c``, shaped as their store regions (the
    ``checkpoint`` dim dropped), computed with ``threads`` torch threads.  Depends only on its arguments (and the
    files the config names)."""
    from gradlab.runner.dispatch import prepared_state

    job = ProbeJob(config)
    with torch_threads(threads):
        return compute_trials(config, prepared_state(job), c, t0, t1)


@dataclass(frozen=True)
class ProbePlan:
    """What a run would do: units to compute, an estimated time from a calibration trial, and the store size."""

    units_total: int
    units_todo: int
    seconds_per_trial: float
    estimated_seconds: float
    store_bytes: int
    trials_per_unit: int


def plan_probe(config: ProbeConfig, out: str | os.PathLike, *, resume: bool = False, workers: int = 1) -> ProbePlan:
    """The plan of a run (``--dry-run``): times a calibration unit of the first checkpoint (after a warm-up run of
    one trial) and scales by the trials still to do; writes nothing.

    The step protocol's calibration unit is one engine block of trials (2 on CPU, as the run itself advances
    them): on a digits MLP, timing a lone trial overestimated the run 1.7× on CPU and a block of two about 1.3×
    (the run's units of 8 trials amortise more): the estimate tends to be high.
    """
    units = config.units()
    todo = units
    path = Path(out)
    if resume and (path / "zarr.json").exists():
        import zarr

        done = np.asarray(zarr.open_group(path, mode="r")["done"][...])
        todo = [u for u in units if not bool(done[u[0], u[1]])]
    elif path.exists() and not is_empty_folder(path):
        raise store_exists_error(path)
    n_cal = 1
    if config.protocol == "step":
        from gradlab.probe.step import DEFAULT_TRIALS_PER_BLOCK

        block = DEFAULT_TRIALS_PER_BLOCK.get(torch_device_type(config.device), 2)
        n_cal = max(1, min(config.trials, config.trials_per_unit, block))
    compute_unit(config, 0, 0, 1)  # warm-up: loads data and model
    start = time.perf_counter()
    compute_unit(config, 0, 0, n_cal)
    per_trial = (time.perf_counter() - start) / n_cal
    remaining = sum(t1 - t0 for _, t0, t1 in todo)
    return ProbePlan(len(units), len(todo), per_trial, per_trial * remaining / max(workers, 1),
                     store_nbytes(config), config.trials_per_unit)


def torch_device_type(device: str) -> str:
    """``"cuda:1"`` -> ``"cuda"`` (the device string's type, without importing torch)."""
    return str(device).split(":", 1)[0]


__all__ = ["ProbeConfig", "ProbeJob", "ProbePlan", "ProbeSummary", "UsageError", "compute_unit", "finalize",
           "plan_probe", "resolve_config", "run_probe"]
