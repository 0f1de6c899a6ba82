"""The power law ‖·‖ ∝ m^β across batch sizes: β with an interval, the √m range and the crossover.

For m ≪ B_noise a summed minibatch gradient is noise-dominated, ‖s_B‖ ≈ √(m tr Σ) (β = ½), and for m ≫ B_noise
it grows like m (β = 1) (McCandlish et al. 2018; the blog's "norm ∝ √m", Goodfellow's O(√m) from the other
side).  Given per-trial norms ``x[m, t]``:

- ``kind="mean"``: μ_m = mean over trials of x (x = ‖S‖ of a trial, the blog's statistic);
- ``kind="rms"``: μ_m = √(mean over trials of x) with x the per-trial mean of ‖s_B‖² (RMS of ‖s_B‖).

β is the weighted least-squares slope of log μ_m on log m (weights 1/Var(log μ̂_m) by the delta method).
Local slopes between neighbouring batch sizes and slopes of every prefix m_1..m_k are computed too; the √m
range is the longest prefix whose slopes' intervals all contain ½.  The crossover is m_× = a/b from the
two-regime law μ_m² = a·m + b·m² (fitted by WLS as μ_m²/m = a + b·m): where the m² term equals the m term, the
local slope is ¾, and for the RMS of ‖s_B‖ drawn with replacement m_× = B_noise exactly.  Drawn without
replacement from a pool of n (the probe's default), E‖s_B‖² = m²‖G‖² + m·c_m·tr Σ with c_m = (n − m)/(n − 1), so
the intercept form would estimate tr Σ·n/(n − 1) / (‖G‖² − tr Σ/(n − 1)), biased upward; given ``factor`` = c_m
the fit is the finite-population form μ_m²/m = a·c_m + b·m (WLS, no intercept), whose a/b is again B_noise.  Its
interval is the reciprocal of the interval of b/a (b ≤ 0: no crossover within reach, upper end ``inf``).
The test of β = ½ uses the bootstrap standard error: z = (β̂ − ½)/se, p = 2(1 − Φ(|z|)).

Intervals: a BCa bootstrap over trials (:func:`gradlab.analysis.bootstrap.bootstrap_trials`; trials are the
independent units), NaN bounds with a note when it cannot be computed (fewer than 5 trials, degenerate resamples).
The same law fitted to independent points, one per training run (sharpness against the training batch size,
:func:`fit_power_law_points`, used by :mod:`gradlab.analysis.curvature`), has no trials to resample: its interval is
the Student-t interval of the least-squares slope, exact for independent Gaussian errors of log y (a paired BCa
or percentile bootstrap over six points gave no interval in 10% of 400 seeds, a resample with one distinct x, and
covered a true exponent in 91% of the others; issue 15 item 9).  Both fits go through the one weighted
least-squares helper :func:`gradlab.analysis.wls.wls`.

Example (exact √m data)::

    >>> import numpy as np
    >>> m = np.array([1, 2, 4, 8, 16]); x = np.sqrt(3.0 * m)[:, None] * np.array([[0.9, 1.0, 1.1]])
    >>> round(fit_power_law(x, m, n_boot=0, rng=np.random.default_rng(0)).beta.value, 9)
    0.5
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from gradlab.analysis.bootstrap import bootstrap_trials
from gradlab.analysis.interval import Estimate, reciprocal
from gradlab.analysis.wls import wls


def _log_mean_and_var(x: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """log μ_m, Var(log μ̂_m), μ_m², Var(μ̂_m²) from x (..., M, trial)."""
    n = x.shape[-1]
    mean = x.mean(-1)
    var_mean = x.var(-1, ddof=1) / n if n > 1 else np.ones_like(mean)
    if kind == "mean":
        mu2 = mean**2
        return np.log(mean), var_mean / mu2, mu2, 4.0 * mu2 * var_mean
    if kind == "rms":
        return 0.5 * np.log(mean), var_mean / (4.0 * mean**2), mean, var_mean
    raise ValueError(f"kind must be 'mean' or 'rms', got {kind!r}")


def _floor(var: np.ndarray) -> np.ndarray:
    return np.maximum(var, 1e-12 * np.max(var, axis=-1, keepdims=True) + 1e-300)


def power_law_statistic(x: np.ndarray, batch_sizes: np.ndarray, kind: str,
                        factor: np.ndarray | None = None) -> np.ndarray:
    """Stacked outputs [β, prefix slopes k=2..M, local slopes, b/a] from x (..., M, trial).

    ``factor``: the finite-population factors c_m of the crossover fit μ²/m = a·c_m + b·m (None: c_m = 1)."""
    logm = np.log(np.asarray(batch_sizes, dtype=np.float64))
    logmu, var_log, mu2, var_mu2 = _log_mean_and_var(x, kind)
    w = 1.0 / _floor(var_log)
    M = logm.size
    prefix = [wls(logm[:k], logmu[..., :k], w[..., :k])[1] for k in range(2, M + 1)]
    local = np.diff(logmu, axis=-1) / np.diff(logm)
    m = np.exp(logm)
    wc = 1.0 / _floor(var_mu2 / m**2)
    a, b = wls(m, mu2 / m, wc, x0=None if factor is None else np.asarray(factor, dtype=np.float64))
    return np.concatenate([prefix[-1][None], np.stack(prefix), np.moveaxis(local, -1, 0), (b / a)[None]])


@dataclass(frozen=True)
class PowerLawFit:
    """β of ‖·‖ ∝ m^β, its test against ½, the √m range and the crossover, at one checkpoint."""

    quantity: str
    beta: Estimate
    beta_se: float
    p_half: float  # two-sided p-value of β = ½
    local_slope: list[Estimate]  # between batch_sizes[i] and batch_sizes[i + 1]
    prefix_slope: list[Estimate]  # fit over batch_sizes[: k + 2]
    sqrt_max_batch_size: float  # largest m of the √m range (NaN: none)
    crossover: Estimate  # m_× = a/b of μ² = a m + b m²
    batch_sizes: np.ndarray
    mean: np.ndarray  # μ_m
    amplitude: float  # c of the fitted μ = c·m^β

    def to_dict(self) -> dict[str, Any]:
        from gradlab.analysis.interval import json_float

        return {"quantity": self.quantity, "beta": self.beta.to_dict(), "beta_se": json_float(self.beta_se),
                "p_beta_half": json_float(self.p_half),
                "sqrt_law_max_batch_size": json_float(self.sqrt_max_batch_size),
                "crossover": self.crossover.to_dict(),
                "local_slope": [{"from": int(a), "to": int(b), **e.to_dict()} for a, b, e in
                                zip(self.batch_sizes[:-1], self.batch_sizes[1:], self.local_slope, strict=True)]}


def fit_power_law(
    x: np.ndarray,
    batch_sizes: np.ndarray,
    *,
    kind: str = "mean",
    quantity: str = "grad_norm",
    n_boot: int = 999,
    rng: np.random.Generator,
    level: float = 0.95,
    factor: np.ndarray | None = None,
) -> PowerLawFit:
    """Fit ‖·‖ ∝ m^β to ``x`` (batch_size, trial) with bootstrap-over-trials intervals (see the module doc).

    ``factor``: c_m = (n − m)/(n − 1) when the examples were drawn without replacement from a pool of n (the
    crossover is then fitted in the finite-population form); None for draws with replacement."""
    x = np.asarray(x, dtype=np.float64)
    m = np.asarray(batch_sizes, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] != m.size or m.size < 2:
        raise ValueError(f"x must have shape (len(batch_sizes) ≥ 2, trials); got {x.shape} for {m.size} sizes")
    M = m.size

    def stat(xx: np.ndarray) -> np.ndarray:
        return power_law_statistic(xx, m, kind, factor)

    if n_boot > 0:
        res = bootstrap_trials([x], stat, n_boot=n_boot, rng=rng, level=level)
        est = [res.estimate(i) for i in range(res.value.size)]
        se = float(res.standard_error[0])
    else:
        est = [Estimate(float(v)) for v in stat(x)]
        se = math.nan
    beta, prefix, local, inv_cross = est[0], est[1:M], est[M:2 * M - 1], est[2 * M - 1]
    p_half = math.erfc(abs(beta.value - 0.5) / se / math.sqrt(2)) if se > 0 else math.nan
    sqrt_max = math.nan
    for k, e in enumerate(prefix):
        if not e.contains(0.5):
            break
        sqrt_max = float(m[k + 1])
    crossover = reciprocal(inv_cross, "the m² term's interval reaches zero: the crossover may lie beyond reach")
    logmu = _log_mean_and_var(x, kind)[0]
    w = 1.0 / _floor(_log_mean_and_var(x, kind)[1])
    log_c, _ = wls(np.log(m), logmu, w)
    return PowerLawFit(quantity, beta, se, p_half, local, prefix, sqrt_max, crossover, m, np.exp(logmu),
                       float(np.exp(log_c)))


def fit_power_law_points(x: np.ndarray, y: np.ndarray, *, n_boot: int, rng: np.random.Generator,
                         level: float = 0.95) -> dict[str, Any]:
    """y = a·x^b fitted to independent points (one per run) by least squares on log y = log a + b·log x, a
    Student-t interval for b, and Spearman's ρ (``scipy.stats.spearmanr``) on the same points.

    Points with x ≤ 0, y ≤ 0 or non-finite values are dropped.  The interval is b̂ ± t_{n−2, (1+level)/2}·se with
    se² = Σ rᵢ² / (n − 2) / Σ (log xᵢ − mean)² (r the residuals of log y), exact for independent Gaussian errors of
    log y; a note says so below 8 points.  Fewer than 3 usable points or a constant x give NaN and a note.
    ``n_boot`` = 0 means "no interval"; ``rng`` is unused (kept for the callers).  Keys: ``exponent``,
    ``exponent_low``, ``exponent_high``, ``prefactor``, ``spearman_rho``, ``spearman_p``, ``n_points``, ``note``.

    >>> m = np.array([16.0, 64, 256, 1024])
    >>> fit = fit_power_law_points(m, 2 * m**0.5, n_boot=1, rng=np.random.default_rng(0))
    >>> round(fit["exponent"], 9), round(fit["prefactor"], 9), round(fit["exponent_high"] - 0.5, 9)
    (0.5, 2.0, 0.0)
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    x, y = x[ok], y[ok]
    out: dict[str, Any] = {"n_points": int(x.size), "exponent": math.nan, "exponent_low": math.nan,
                           "exponent_high": math.nan, "prefactor": math.nan, "spearman_rho": math.nan,
                           "spearman_p": math.nan, "note": None}
    if x.size < 3 or np.unique(x).size < 2:
        out["note"] = f"{x.size} usable checkpoint(s) with {np.unique(x).size} distinct x: need >= 3 and >= 2"
        return out
    lx, ly = np.log(x), np.log(y)
    a, b = (float(v) for v in wls(lx, ly, np.ones_like(lx)))
    out.update(exponent=b, prefactor=float(np.exp(a)))
    if np.unique(y).size > 1:
        res = stats.spearmanr(x, y)
        out.update(spearman_rho=float(res.statistic), spearman_p=float(res.pvalue))
    if n_boot > 0:
        resid = ly - (a + b * lx)
        sxx = float(((lx - lx.mean()) ** 2).sum())
        dof = x.size - 2
        se = math.sqrt(float(resid @ resid) / dof / sxx)
        half = float(stats.t.ppf(0.5 + level / 2, dof)) * se
        out.update(exponent_low=b - half, exponent_high=b + half)
        if x.size < 8:
            out["note"] = (f"only {x.size} checkpoints: the t interval assumes independent Gaussian errors of "
                           "log y")
    return out
