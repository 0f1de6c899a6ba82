"""‖G‖², tr Σ and B_noise from the per-trial U-statistics of a frozen store, with bootstrap-over-trials intervals.

The headline estimates of a frozen store.  Per trial, with T₁ = Σᵢ‖gᵢ‖² (``gram_trace``) and T₂ = ‖Σᵢgᵢ‖²
(``gram_sum``) of its N examples, Q̂ = T₁/N and U = (T₂ − T₁)/(N(N − 1)) (the mean off-diagonal Gram entry) give
unbiased estimates of the pool's ‖G‖² = U (with replacement) or ((n − 1)·U + Q̂)/n (without, pool of n) and
tr Σ = Q̂ − ‖G‖² (McCandlish et al. 2018, App. A; the derivation is in ``gradlab.probe.frozen``).  They use every
pair of the trial's examples, so they are more efficient than the weighted least-squares fit of the noise law
(``noise_model``), which sees only the minibatch norms of the chosen partitions and is kept as a check of the law.
Averages over trials stay unbiased; B_noise = tr Σ/‖G‖² is their ratio (consistent, not unbiased), and its
interval is the reciprocal of the interval of ‖G‖²/tr Σ, as in ``noise_model``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradlab.analysis.bootstrap import bootstrap_trials
from gradlab.analysis.interval import Estimate, reciprocal

HEADLINE = ("‖G‖², tr Σ and B_noise: the U-statistic estimates (every pair of each trial's examples; unbiased for "
            "‖G‖² and tr Σ); the noise_model WLS fit uses only the partitions' minibatch norms and checks the law")


def trial_moments(gram_trace: np.ndarray, gram_sum: np.ndarray, budget: int, pool_size: int | None,
                  replacement: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-trial unbiased (‖G‖², tr Σ) from T₁ and T₂ (see the module doc)."""
    t1, t2 = np.asarray(gram_trace, dtype=np.float64), np.asarray(gram_sum, dtype=np.float64)
    n_ex = float(budget)
    q = t1 / n_ex
    u = (t2 - t1) / (n_ex * (n_ex - 1))
    g2 = u if replacement or pool_size is None else ((pool_size - 1) * u + q) / pool_size
    return g2, q - g2


WHOLE_POOL = ("every trial holds the whole pool (budget = pool size, drawn without replacement): ‖G‖², tr Σ and "
              "B_noise are the pool's exact values, the same in every trial (their intervals are the floating-point "
              "resolution, not a sampling interval); trials differ only in how the pool is split into minibatches; "
              "for an interval over draws from the pool, probe with a budget below the pool size")


def whole_pool(budget: int, pool_size: int | None, replacement: bool) -> bool:
    """Whether every trial of a frozen store draws the whole pool (without replacement, budget = pool size)."""
    return not replacement and pool_size is not None and int(budget) >= int(pool_size)


def _exact(value: float, resolution: float, level: float) -> Estimate:
    """A value exact up to the arithmetic: the interval is its floating-point resolution."""
    half = abs(value) * resolution
    return Estimate(value, value - half, value + half, level, WHOLE_POOL)


def moment_estimates(gram_trace: np.ndarray, gram_sum: np.ndarray, budget: int, pool_size: int | None,
                     replacement: bool, *, n_boot: int, rng: np.random.Generator,
                     level: float = 0.95, resolution: float = 0.0) -> dict[str, Estimate]:
    """{"grad_sq_norm", "trace_cov", "b_noise"} with bootstrap-over-trials intervals (``n_boot`` = 0: none).
    When every trial holds the whole pool (:func:`whole_pool`) the values are exact: no bootstrap, the interval is
    ``resolution`` (relative) wide either side, and the note says so."""
    g2, tr = trial_moments(gram_trace, gram_sum, budget, pool_size, replacement)
    if whole_pool(budget, pool_size, replacement) and g2.size:  # every trial: the same N examples
        g, t = float(g2.mean()), float(tr.mean())
        return {k: _exact(v, resolution, level) for k, v in
                (("grad_sq_norm", g), ("trace_cov", t), ("b_noise", t / g if g else float("nan")))}
    sample = np.stack([g2, tr])

    def stat(s: np.ndarray) -> np.ndarray:  # (*batch, 2, trial) -> (3, *batch)
        mean = s.mean(-1)
        return np.stack([mean[..., 0], mean[..., 1], mean[..., 0] / mean[..., 1]])

    if n_boot > 0 and budget >= 2:
        res = bootstrap_trials([sample], stat, n_boot=n_boot, rng=rng, level=level)
        g, t, inv = res.estimate(0), res.estimate(1), res.estimate(2)
    else:
        v = stat(sample)
        g, t, inv = Estimate(float(v[0])), Estimate(float(v[1])), Estimate(float(v[2]))
    return {"grad_sq_norm": g, "trace_cov": t,
            "b_noise": reciprocal(inv, "the interval of ‖G‖² reaches zero: B_noise has no finite upper bound")}


def headline_estimates(ds: Any, done: Any, labels: list[str], index: list[int], result: dict[str, Any], *,
                       pool_size: int | None, replacement: bool, n_boot: int, seed: int, level: float) -> None:
    """Put the headline U-statistic estimates of every checkpoint (from its finished trials' ``gram_trace`` and
    ``gram_sum``) into ``result["checkpoints"][label]["estimates"]``; ``index``: each label's checkpoint index in
    the store (it seeds the bootstrap)."""
    from gradlab.analysis.probe_fits import SEED_CODES, float_resolution, rng_for

    result["headline"] = HEADLINE
    budget = int(ds.attrs.get("budget", ds["batch_size"].values.max()))
    for ci, label in enumerate(labels):
        d = done.isel(checkpoint=ci).values
        t1 = np.asarray(ds["gram_trace"].isel(checkpoint=ci).values, dtype=np.float64)[d]
        t2 = np.asarray(ds["gram_sum"].isel(checkpoint=ci).values, dtype=np.float64)[d]
        ests = moment_estimates(t1, t2, budget, pool_size, replacement, n_boot=n_boot, level=level,
                                rng=rng_for(seed, index[ci], SEED_CODES["moments"]),
                                resolution=float_resolution(str(ds.attrs.get("dtype", "float64")), budget))
        result["checkpoints"][label]["estimates"] = {k: e.to_dict() for k, e in ests.items()}
