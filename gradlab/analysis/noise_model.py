"""The gradient noise model of McCandlish et al. (2018), fitted by weighted least squares over the batch sizes.

McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch Training" (arXiv:1812.06162):
for a minibatch B of m examples, E‖g_B‖² = ‖G‖² + c_m · tr Σ / m, with c_m = 1 for draws with replacement and
c_m = (n − m)/(n − 1) for draws without replacement from a pool of n examples (equivalently
E‖s_B‖² = m²‖G‖² + m · c_m · tr Σ for sum reduction).  The critical batch size is B_noise = tr Σ / ‖G‖².

Input: ``q[m, t]``, the mean over trial t's N/m minibatches of ‖g_B‖² (mean-reduction units).  The per-m means
q̄_m are regressed on x_m = c_m/m with weights w_m = 1/Var(q̄_m) (the sampling variance across trials;
:func:`gradlab.analysis.wls.wls`), so q̄_m ≈ a + b·x_m gives a = ‖G‖², b = tr Σ.  Intervals come from a bootstrap over trials (the batch sizes of one
trial share its examples, so trials -- not (m, trial) cells -- are the independent units).  Lack of fit:
χ² = Σ_m w_m (q̄_m − a − b x_m)² on M − 2 degrees of freedom; its p-value comes from a bootstrap of the data
re-centred on the fit (the q̄_m of one trial are correlated, so the χ² table would be wrong).

Example (the truth lies on the model, so the fit returns it exactly)::

    >>> import numpy as np
    >>> m = np.array([1, 2, 4, 8]); q = (2.0 + 6.0 / m)[:, None] + np.array([[-1.0, 1.0, 0.0]]) / m[:, None]
    >>> fit = fit_noise_model(q, m, n_boot=0, rng=np.random.default_rng(0))
    >>> round(fit.grad_sq_norm.value, 6), round(fit.trace_cov.value, 6), round(fit.b_noise.value, 6)
    (2.0, 6.0, 3.0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from gradlab.analysis.bootstrap import bootstrap_trials
from gradlab.analysis.interval import Estimate, json_float, reciprocal
from gradlab.analysis.wls import wls


LACK_OF_FIT_TAUTOLOGY = ("not tested: at a fixed θ the noise model is an identity of sampling from the pool (exact "
                         "with or without replacement), so a lack-of-fit test cannot fail")


def finite_population_factor(batch_sizes: np.ndarray, pool_size: int | None, replacement: bool) -> np.ndarray:
    """c_m = (n − m)/(n − 1) for draws without replacement from a pool of n, else 1 (McCandlish et al. 2018).

    The mean of m draws without replacement from n values has variance (σ²/m)·(n − m)/(n − 1) (Cochran 1977,
    "Sampling Techniques", thm 2.2), so E‖g_B‖² = ‖G‖² + c_m tr Σ/m.  This is gradlab's one spelling of the factor
    (the λ_max extrapolation, the figures and the synthetic stores use it too); torch-free, so either side imports
    it.  ``pool_size=None`` means an infinite pool (c_m = 1).

    >>> finite_population_factor(np.array([1, 5, 10]), 10, replacement=False).round(4).tolist()
    [1.0, 0.5556, 0.0]
    """
    m = np.asarray(batch_sizes, dtype=np.float64)
    if replacement or pool_size is None:
        return np.ones_like(m)
    if pool_size < 2 or np.any(m > pool_size):
        raise ValueError(f"pool_size {pool_size} must be ≥ 2 and ≥ every batch size (largest {m.max():g})")
    return (pool_size - m) / (pool_size - 1)


def sampling_weights(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Means over trials (last axis) and weights 1/Var(mean), floored at 1e-12 of the largest variance."""
    n = y.shape[-1]
    mean = y.mean(-1)
    var = y.var(-1, ddof=1) / n if n > 1 else np.ones_like(mean)
    floor = 1e-12 * np.max(var, axis=-1, keepdims=True) + 1e-300
    return mean, 1.0 / np.maximum(var, floor)


def noise_model_statistic(q: np.ndarray, x: np.ndarray) -> np.ndarray:
    """(‖G‖², tr Σ, ‖G‖²/tr Σ, χ²) from q of shape (..., M, trial): the WLS fit of q̄_m = a + b·x_m."""
    mean, w = sampling_weights(q)
    a, b = wls(x, mean, w)
    chi2 = (w * (mean - a[..., None] - b[..., None] * x) ** 2).sum(-1)
    return np.stack([a, b, a / b, chi2])


@dataclass(frozen=True)
class NoiseModelFit:
    """The fitted noise model at one checkpoint (units: those of ‖g_B‖², i.e. of a mean-reduction gradient)."""

    grad_sq_norm: Estimate  # ‖G‖²
    trace_cov: Estimate  # tr Σ
    b_noise: Estimate  # tr Σ / ‖G‖²
    chi2: float
    dof: int
    p_value: float  # lack of fit
    batch_sizes: np.ndarray
    factor: np.ndarray  # c_m
    mean_sq_norm: np.ndarray  # q̄_m
    mean_sq_norm_se: np.ndarray  # standard error of q̄_m
    n_trials: int
    lack_of_fit_note: str | None = None  # why no lack-of-fit test was made (then chi2 and p_value are NaN)

    def predict(self, batch_sizes: np.ndarray, factor: np.ndarray | None = None) -> np.ndarray:
        """E‖g_B‖² = ‖G‖² + c_m tr Σ / m at ``batch_sizes`` (c_m = 1 unless ``factor`` is given)."""
        m = np.asarray(batch_sizes, dtype=np.float64)
        c = np.ones_like(m) if factor is None else factor
        return self.grad_sq_norm.value + c * self.trace_cov.value / m

    def to_dict(self) -> dict[str, Any]:
        lof = ({"chi2": json_float(self.chi2), "dof": self.dof, "p_value": json_float(self.p_value)}
               if self.lack_of_fit_note is None else
               {"chi2": None, "dof": self.dof, "p_value": None, "note": self.lack_of_fit_note})
        return {"grad_sq_norm": self.grad_sq_norm.to_dict(), "trace_cov": self.trace_cov.to_dict(),
                "b_noise": self.b_noise.to_dict(), "lack_of_fit": lof, "n_trials": self.n_trials}


def fit_noise_model(
    q: np.ndarray,
    batch_sizes: np.ndarray,
    *,
    pool_size: int | None = None,
    replacement: bool = True,
    n_boot: int = 999,
    rng: np.random.Generator,
    level: float = 0.95,
    lack_of_fit: bool = True,
) -> NoiseModelFit:
    """Fit E‖g_B‖² = ‖G‖² + c_m tr Σ / m to ``q`` (batch_size, trial) by WLS, with bootstrap-over-trials intervals.

    ``q[i, t]`` is the mean of ‖g_B‖² over the minibatches of trial ``t`` at batch size ``batch_sizes[i]``.
    B_noise's interval is the reciprocal of the interval of ‖G‖²/tr Σ, so that a gradient indistinguishable
    from zero gives an unbounded upper end rather than a meaningless ratio.  ``n_boot = 0`` gives the fit alone.
    ``lack_of_fit=False`` skips the lack-of-fit test: at a fixed θ (the frozen protocol) the model is an identity of
    sampling from the pool, so the test could not fail and measures nothing.
    """
    q = np.asarray(q, dtype=np.float64)
    m = np.asarray(batch_sizes, dtype=np.float64)
    if q.ndim != 2 or q.shape[0] != m.size:
        raise ValueError(f"q must have shape (len(batch_sizes)={m.size}, trials); got {q.shape}")
    if m.size < 2:
        raise ValueError("the noise model needs at least two batch sizes")
    c = finite_population_factor(m, pool_size, replacement)
    x = c / m
    n_trials = q.shape[1]

    def stat(qq: np.ndarray) -> np.ndarray:
        return noise_model_statistic(qq, x)

    if n_boot > 0:
        res = bootstrap_trials([q], stat, n_boot=n_boot, rng=rng, level=level)
        g2, tr, inv = res.estimate(0), res.estimate(1), res.estimate(2)
        chi2 = float(res.value[3])
    else:
        val = stat(q)
        g2, tr, inv = Estimate(float(val[0])), Estimate(float(val[1])), Estimate(float(val[2]))
        chi2 = float(val[3])
    dof = m.size - 2
    note = None
    if not lack_of_fit:
        chi2, p = float("nan"), float("nan")
        note = LACK_OF_FIT_TAUTOLOGY
    else:
        p = lack_of_fit_p_value(q, x, chi2, n_boot=n_boot, rng=rng) if dof > 0 else float("nan")
    b_noise = reciprocal(inv, "the interval of ‖G‖² reaches zero: B_noise has no finite upper bound")
    mean, w = sampling_weights(q)
    return NoiseModelFit(g2, tr, b_noise, chi2, dof, p, m, c, mean, 1.0 / np.sqrt(w), n_trials, note)


def lack_of_fit_p_value(q: np.ndarray, x: np.ndarray, chi2: float, *, n_boot: int,
                        rng: np.random.Generator) -> float:
    """P(χ²* ≥ χ²) under the fitted model: trials resampled from data re-centred on the WLS fit.

    Re-centring (q_mt − q̄_m + â + b̂ x_m) makes the model true while keeping the trials' joint distribution
    across batch sizes, so the bootstrap χ²* has the null distribution of χ² (Efron & Tibshirani 1993, §16).
    """
    if n_boot <= 0 or q.shape[1] < 5:
        return float("nan")
    mean, w = sampling_weights(q)
    a, b = wls(x, mean, w)
    centred = q - mean[:, None] + (a + b * x)[:, None]
    res = bootstrap_trials([centred], lambda qq: noise_model_statistic(qq, x)[3:], n_boot=n_boot, rng=rng,
                           method="percentile")
    if res.distribution is None:
        return float("nan")
    chi2_star = res.distribution[0]
    return float((1 + np.count_nonzero(chi2_star >= chi2)) / (n_boot + 1))
