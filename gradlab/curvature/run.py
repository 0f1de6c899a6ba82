"""``gradlab sharpness``: validate and load everything (:mod:`gradlab.curvature.config`), then run the job
(:class:`gradlab.curvature.job.SharpnessJob`) on the one runner (:func:`gradlab.runner.run_job`).

Everything the user can get wrong is checked *before* the store is created (ε ≤ 0, a subspace larger than the
parameter count, batch sizes larger than the sample, a loss that is not twice differentiable, non-finite loss,
gradient or curvature at any checkpoint): a refused run leaves nothing on disk.  The store's table of variables is
in :mod:`gradlab.curvature.config`.  The checkpoints' SHA-256 are recorded; a resume after one changed is refused.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from gradlab.curvature.config import (  # noqa: F401 - the public names of gradlab.curvature.run
    CACHE_GRAPH, DTYPES, HESSIAN_UNITS, STORE_KIND, TAG_EPS, TAG_HUTCHINSON, TAG_LANCZOS, TAG_PREFLIGHT, TAG_SAMPLE,
    SharpnessConfig, _Prepared, applied_lr, prepare, validate)
from gradlab.curvature.job import SharpnessJob, resolved
from gradlab.curvature.layout import _template, alphas_for, config_dict  # noqa: F401
from gradlab.runner import store_exists_error
from gradlab.store import is_empty_folder


def run_sharpness(
    config: SharpnessConfig,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    progress: Callable[[str], None] | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
) -> Path:
    """Validate, create (or resume) the store at ``out``, and measure every unfinished checkpoint.

    ``progress``: called with one line per step (and a bar of Hessian-vector products on stderr); None: quiet."""
    from gradlab.runner import run_job

    out = Path(out)
    if out.exists() and not resume and not is_empty_folder(out):
        raise store_exists_error(out)
    prep = prepare(config)
    job = SharpnessJob(resolved(config, prep))
    run_job(job, out, resume=resume, progress=progress is not None, say=progress, state=prep, workers=workers,
            scheduler=scheduler)
    return out
