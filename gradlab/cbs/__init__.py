"""Critical batch size: branches from checkpoints at many batch sizes, and two estimators of B_crit.

- :mod:`gradlab.cbs.job`: the store's job description for the shared runner (:class:`CbsJob`).
- :mod:`gradlab.cbs.resolve`: every input check, then the job (nothing written).
- :mod:`gradlab.cbs.engine`: branches advanced in lock-step (batched matmuls) or one by one.
- :mod:`gradlab.cbs.estimators`: the branching estimator (Merrill et al. 2025) and the steps–examples
  trade-off fit (McCandlish et al. 2018); numpy only.
- :mod:`gradlab.cbs.nqm`: the analytic test case (closed-form S(m), E(m), B_crit).

Importing this package imports neither torch nor the runner.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def run_cbs(job: Any, out: str | Path, *, resume: bool = False, workers: int | None = None,
            scheduler: str | None = None, progress: bool = True) -> Any:
    """Run (or resume) a cbs job into the store ``out`` with the shared runner; returns its RunSummary."""
    from gradlab.runner import run_job

    return run_job(job, out, resume=resume, workers=workers, scheduler=scheduler, progress=progress)
