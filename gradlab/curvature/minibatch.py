"""λ_max of mini-batch Hessians vs the batch size m, and its extrapolation to the full-batch value.

For a pool of N examples (the fixed sample) and a batch size m, one trial draws m examples without replacement
and measures λ_max(H_B) of the mini-batch loss L_B = (1/m) Σ_{i∈B} ℓᵢ by Lanczos.  Each trial's generator is
``numpy.random.default_rng(SeedSequence([seed, SEED_TAG, checkpoint, m, trial]))``: it draws the batch and the
Lanczos start vector, so results do not depend on order, resume or workers.

Extrapolation model.  H_B = H + E with E[E] = 0 and Cov[E] ∝ x_m = (1/m)(N − m)/(N − 1) (the without-replacement
variance factor, 0 at m = N).  Second-order perturbation theory gives
E[λ_max(H_B)] ≈ λ_max(H) + Σ_{j>1} E[(vⱼᵀ E v₁)²]/(λ₁ − λⱼ) = λ_full + c·x_m (Jensen: λ_max is convex, so c ≥ 0),
valid while the noise is small against the spectral gap.  We fit mean_m = λ_full + c·x_m by weighted least
squares with weights T/s_m² (s_m the across-trial standard deviation; equal weights when T = 1 or s_m = 0) and
report λ_full with its standard error from the WLS covariance (XᵀWX)⁻¹ (:func:`gradlab.analysis.wls.wls`; scaled by
the reduced χ² when it exceeds 1).
With draws from an infinite population (``pool_size=None``) x_m = 1/m.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from gradlab.analysis.noise_model import finite_population_factor
from gradlab.analysis.wls import wls, wls_covariance
from gradlab.schema.sharpness import EXTRAPOLATION_MODEL

SEED_TAG = 5_000  # separates these streams from other uses of the same (seed, checkpoint)

# lambda_of(indices into the pool, generator) -> λ_max of that mini-batch's Hessian
LambdaOf = Callable[[np.ndarray, np.random.Generator], float]


def trial_rng(seed: int, checkpoint: int, batch_size: int, trial: int) -> np.random.Generator:
    """The generator of one (checkpoint, batch size, trial) unit."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), SEED_TAG, int(checkpoint), int(batch_size),
                                                         int(trial)]))


def minibatch_lambda_max(
    lambda_of: LambdaOf,
    pool_size: int,
    batch_sizes: Sequence[int],
    trials: int,
    *,
    seed: int,
    checkpoint: int,
    progress: Callable[[], None] | None = None,
) -> np.ndarray:
    """λ_max(H_B) for every batch size and trial: an array (len(batch_sizes), trials).

    Trial t at batch size m draws B ⊂ {0..pool_size−1}, |B| = m, without replacement from ``trial_rng``.
    """
    out = np.full((len(batch_sizes), trials), np.nan)
    for a, m in enumerate(batch_sizes):
        if not 1 <= m <= pool_size:
            raise ValueError(f"batch size {m} must be in [1, {pool_size}]")
        for t in range(trials):
            rng = trial_rng(seed, checkpoint, m, t)
            idx = np.sort(rng.choice(pool_size, size=m, replace=False))
            out[a, t] = lambda_of(idx, rng)
            if progress is not None:
                progress()
    return out


@dataclass(frozen=True)
class Extrapolation:
    """Fit of mean_m λ_max(H_B) = λ_full + c·x_m: the intercept, its standard error, the slope, reduced χ²."""

    lambda_full: float
    lambda_full_stderr: float
    slope: float
    chi2_reduced: float
    model: str = EXTRAPOLATION_MODEL


def noise_factor(batch_sizes: Sequence[int] | np.ndarray, pool_size: int | None) -> np.ndarray:
    """x_m = c_m/m with c_m = (N − m)/(N − 1) (:func:`gradlab.analysis.noise_model.finite_population_factor`)
    without replacement from N examples; 1/m for an infinite pool (``pool_size=None``)."""
    m = np.asarray(batch_sizes, dtype=np.float64)
    return finite_population_factor(m, pool_size, replacement=pool_size is None) / m


def extrapolate_full_batch(batch_sizes: Sequence[int], values: np.ndarray, pool_size: int | None) -> Extrapolation:
    """WLS fit of mean_m = λ_full + c·x_m over the batch sizes (``values``: (n_sizes, trials), NaN ignored)."""
    vals = np.asarray(values, dtype=np.float64)
    x = noise_factor(batch_sizes, pool_size)
    keep = np.isfinite(vals).sum(axis=1) > 0
    x, vals = x[keep], vals[keep]
    if np.unique(x).size < 2:
        return Extrapolation(np.nan, np.nan, np.nan, np.nan)
    counts = np.isfinite(vals).sum(axis=1)
    mean = np.nanmean(vals, axis=1)
    var = np.array([np.nanvar(v, ddof=1) if c > 1 else np.nan for v, c in zip(vals, counts)])
    ok = np.isfinite(var) & (var > 0)
    if ok.all():
        w = counts / var
    else:
        w = np.ones_like(mean)
    lam_full, slope = wls(x, mean, w)
    resid = (mean - lam_full - slope * x) * np.sqrt(w)
    dof = len(mean) - 2
    chi2 = float(resid @ resid / dof) if dof > 0 else np.nan
    cov = wls_covariance(x, w)
    if not ok.all():  # unweighted: scale by the residual variance
        cov = cov * (chi2 if np.isfinite(chi2) else np.nan)
    elif np.isfinite(chi2) and chi2 > 1:
        cov = cov * chi2
    return Extrapolation(float(lam_full), float(np.sqrt(cov[0, 0])), float(slope), chi2)
