"""Per-step noise-scale estimators and their smoothing (numpy only: the analysis side imports this without torch).

One step sees a batch of B examples split into k groups j of b_j examples (Σ_j b_j = B) and measures

    S₁ = ‖Σᵢ gᵢ‖²                (the squared norm of the summed gradient of the step)
    Q  = Σ_j ‖s_j‖² / b_j        (s_j = Σ_{i∈j} gᵢ, the summed gradient of group j)

Per-example norms are the case b_j = 1, k = B (Q = Σᵢ ‖gᵢ‖², the trace of the per-example Gram matrix); the
micro-batches of gradient accumulation or the ranks of data-parallel training are the general case (McCandlish
et al. 2018, appendix A: the "two-batch" estimator from |B_small| = b and |B_big| = B).

Sampling model **with replacement** (examples i.i.d. from the data distribution: E gᵢ = G, Cov gᵢ = Σ, the default):
E‖s_j‖² = b_j²‖G‖² + b_j tr Σ, so E Q = B‖G‖² + k tr Σ and E S₁/B = B‖G‖² + tr Σ, whence the unbiased

    tr Σ^  = (Q − S₁/B) / (k − 1)
    ‖G‖²^ = (k S₁/B − Q) / (B (k − 1))

(k = B: tr Σ^ = (S₂ − S₁/B)/(B − 1), ‖G‖²^ = (S₁ − S₂)/(B(B − 1)), the U-statistic over pairs i ≠ j).
**Without replacement** from a pool of n examples (one shuffled epoch: every batch is a uniform draw without
replacement; Σ is then the population covariance, 1/n): E‖s‖² = m²‖G‖² + m tr Σ (n − m)/(n − 1) for a draw of m,
whence tr Σ^ = (Q − S₁/B)(n − 1)/(n(k − 1)) and ‖G‖²^ = (S₁/B − tr Σ^ (n − B)/(n − 1))/B.  Both are exactly
unbiased for one step; B_simple = tr Σ^/‖G‖²^ is a ratio and is not.

Smoothing (:class:`EmaRatio`): exponential moving averages with decay β per *recorded* step of the per-step
‖G‖²^ and tr Σ^, normalised by the sum of the weights (bias-corrected, as Adam), and B_noise = EMA(tr Σ^) /
EMA(‖G‖²^) -- a ratio of averages, never an average of ratios (SCIENCE.md).  Intervals treat the recorded steps in
the window as independent draws of one (‖G‖², tr Σ) (true when θ moves little over ~1/(1−β) recorded steps):
weighted means with variance Σw²·s² (s² the reliability-weighted sample variance), Student t quantiles with
n_eff − 1 degrees of freedom (n_eff = (Σw)²/Σw²), and Fieller's interval for the ratio (unbounded above when
‖G‖² is not distinguishable from 0).  Every state entry is an exponentially weighted sum, so the state after a
resume equals the state of an uninterrupted run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gradlab.analysis.noise_model import finite_population_factor

#: names of the exponentially weighted sums kept per part (in this order in the state array)
EMA_STATE = ("w", "w2", "wt", "wg", "wtt", "wtg", "wgg")


def noise_estimates(s1: np.ndarray | float, q: np.ndarray | float, batch_size: int, n_groups: int,
                    pool_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Unbiased (‖G‖²^, tr Σ^) of one step from S₁ = ‖Σᵢ gᵢ‖², Q = Σ_j ‖s_j‖²/b_j, B examples in k groups.

    ``pool_size`` None: examples drawn with replacement (i.i.d.); an int n: one draw without replacement from n
    examples (Σ with 1/n).  Returns NaN where k < 2 (no variance estimate).

    >>> [float(v) for v in noise_estimates(s1=2.0, q=2.0, batch_size=2, n_groups=2)]   # g₁ = (1, 0), g₂ = (0, 1)
    [0.0, 1.0]
    """
    s1 = np.asarray(s1, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    b, k = float(batch_size), float(n_groups)
    if n_groups < 2 or batch_size < 2:
        nan = np.full(np.broadcast(s1, q).shape, np.nan)
        return nan, nan.copy()
    if pool_size is None:
        tr = (q - s1 / b) / (k - 1)
        g2 = (k * s1 / b - q) / (b * (k - 1))
        return g2, tr
    n = float(pool_size)
    if pool_size < batch_size or pool_size < 2:
        raise ValueError(f"pool_size {pool_size} must be ≥ the batch size {batch_size} and ≥ 2")
    tr = (q - s1 / b) * (n - 1) / (n * (k - 1))
    g2 = (s1 / b - tr * float(finite_population_factor(np.array([b]), pool_size, replacement=False)[0])) / b
    return g2, tr


@dataclass(frozen=True)
class Smoothed:
    """Smoothed estimates of one step per part, with ``level`` intervals (arrays over parts)."""

    grad_sq_norm: np.ndarray
    grad_sq_norm_low: np.ndarray
    grad_sq_norm_high: np.ndarray
    trace_cov: np.ndarray
    trace_cov_low: np.ndarray
    trace_cov_high: np.ndarray
    b_noise: np.ndarray
    b_noise_low: np.ndarray
    b_noise_high: np.ndarray
    n_eff: np.ndarray


def _t_quantile(level: float, df: np.ndarray) -> np.ndarray:
    from scipy.special import stdtrit

    df = np.asarray(df, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.where(df > 0, stdtrit(np.where(df > 0, df, 1.0), 0.5 + level / 2), np.nan)


def fieller(num: np.ndarray, den: np.ndarray, v_nn: np.ndarray, v_nd: np.ndarray, v_dd: np.ndarray,
            q: np.ndarray, nonnegative: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Fieller's interval for num/den from the (co)variances of the two means and the quantile ``q``.

    The set {R : (num − R·den)² ≤ q²(v_nn − 2R v_nd + R² v_dd)}: bounded when den is significantly ≠ 0;
    two rays (−inf, r₁] ∪ [r₂, +inf) when it is not (reported: the ray holding R̂); (−inf, +inf) when nothing is
    excluded.  ``nonnegative``: the true ratio is ≥ 0 (tr Σ/‖G‖²), and an unbounded set is reported as its part
    in [0, +inf): [max(r₂, 0), +inf) when r₁ < 0, else [0, +inf) (the hull of [0, r₁] ∪ [r₂, +inf)), and
    [0, +inf) for the whole line -- never a ray of impossible negative values because R̂ < 0.
    """
    num, den, v_nn, v_nd, v_dd, q = np.broadcast_arrays(*(np.asarray(x, dtype=np.float64)
                                                         for x in (num, den, v_nn, v_nd, v_dd, q)))
    with np.errstate(over="ignore", invalid="ignore"):
        q2 = q * q
        a = den * den - q2 * v_dd
        bh = -(num * den - q2 * v_nd)  # b/2
        c = num * num - q2 * v_nn
        disc = bh * bh - a * c
    # a huge quantile (a t quantile with n_eff − 1 ≪ 1 degrees of freedom, e.g. two recorded steps far apart) or
    # huge values overflow the products: solve the same quadratic divided by q² there (the same roots and signs)
    finite = np.isfinite(num) & np.isfinite(den) & np.isfinite(v_nn) & np.isfinite(v_nd) & np.isfinite(v_dd) & \
        np.isfinite(q) & (q > 0)
    redo = finite & ~(np.isfinite(a) & np.isfinite(bh) & np.isfinite(c) & np.isfinite(disc))
    if redo.any():
        with np.errstate(over="ignore", invalid="ignore"):
            nq, dq = num[redo] / q[redo], den[redo] / q[redo]
            a, bh, c, disc = a.copy(), bh.copy(), c.copy(), disc.copy()
            a[redo] = dq * dq - v_dd[redo]
            bh[redo] = -(nq * dq - v_nd[redo])
            c[redo] = nq * nq - v_nn[redo]
            disc[redo] = bh[redo] * bh[redo] - a[redo] * c[redo]
    low = np.full(num.shape, np.nan)
    high = np.full(num.shape, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        sq = np.sqrt(np.maximum(disc, 0.0))
        r1 = (-bh - sq) / a
        r2 = (-bh + sq) / a
    bounded = (a > 0) & (disc >= 0)
    low[bounded] = np.minimum(r1, r2)[bounded]
    high[bounded] = np.maximum(r1, r2)[bounded]
    # a ≤ 0: the accepted set is outside (r1, r2) -- report the branch holding the point estimate
    open_ = (a <= 0) & (disc > 0) & np.isfinite(q)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = num / den
        lo_root, hi_root = np.minimum(r1, r2), np.maximum(r1, r2)
    allr = (a <= 0) & (disc <= 0) & np.isfinite(q)
    if nonnegative:
        neg = open_ & (lo_root < 0)
        low[neg], high[neg] = np.maximum(hi_root[neg], 0.0), np.inf
        rest = (open_ & ~neg) | allr
        low[rest], high[rest] = 0.0, np.inf
        return low, high
    up = open_ & (ratio >= hi_root)
    down = open_ & ~up
    low[up], high[up] = hi_root[up], np.inf
    low[down], high[down] = -np.inf, lo_root[down]
    low[allr], high[allr] = -np.inf, np.inf
    return low, high


class EmaRatio:
    """Exponentially weighted sums of per-step (tr Σ^ = t, ‖G‖²^ = g) for ``n_parts`` parts, and the smoothed
    ‖G‖², tr Σ and B_noise = EMA(t)/EMA(g) with intervals (module docstring).  ``update`` skips NaN entries.

    >>> ema = EmaRatio(n_parts=1, decay=0.5)
    >>> for t, g in [(10.0, 1.0), (12.0, 1.0)]:
    ...     ema.update(np.array([t]), np.array([g]))
    >>> round(float(ema.current().b_noise[0]), 4)     # (0.5·10 + 12)/(0.5 + 1) / 1
    11.3333
    """

    def __init__(self, n_parts: int, decay: float = 0.95, level: float = 0.95,
                 state: np.ndarray | None = None) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.level = float(level)
        self.state = np.zeros((len(EMA_STATE), n_parts)) if state is None else np.array(state, dtype=np.float64)

    def update(self, trace_cov: np.ndarray, grad_sq_norm: np.ndarray) -> None:
        """Fold in one recorded step (NaN entries: the part's sums are decayed but get no new term)."""
        t = np.asarray(trace_cov, dtype=np.float64)
        g = np.asarray(grad_sq_norm, dtype=np.float64)
        ok = np.isfinite(t) & np.isfinite(g)
        t0, g0 = np.where(ok, t, 0.0), np.where(ok, g, 0.0)
        one = ok.astype(np.float64)
        beta = self.decay
        decays = np.array([beta, beta * beta, beta, beta, beta, beta, beta])[:, None]
        terms = np.stack([one, one, t0, g0, t0 * t0, t0 * g0, g0 * g0])
        self.state = self.state * decays + terms

    def current(self) -> Smoothed:
        return smooth(self.state, self.level)


def smooth(state: np.ndarray, level: float) -> Smoothed:
    """The smoothed estimates and intervals of :class:`EmaRatio` from its state (7, ...) -- any trailing shape, e.g.
    (7, steps, parts) for the states of many recorded steps at once: every operation is elementwise."""
    w, w2, wt, wg, wtt, wtg, wgg = np.asarray(state, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mt, mg = wt / w, wg / w
        sum_w2 = w2 / (w * w)  # Σ w̃² with normalised weights w̃ = w/Σw
        n_eff = 1.0 / sum_w2
        # reliability-weighted sample (co)variances, unbiased for i.i.d. steps: Σw̃(x−x̄)² / (1 − Σw̃²)
        denom = 1.0 - sum_w2
        s_tt = (wtt / w - mt * mt) / denom
        s_tg = (wtg / w - mt * mg) / denom
        s_gg = (wgg / w - mg * mg) / denom
        v_tt, v_tg, v_gg = sum_w2 * s_tt, sum_w2 * s_tg, sum_w2 * s_gg
        q = _t_quantile(level, np.where(np.isfinite(n_eff), n_eff - 1.0, 0.0))
        se_t, se_g = np.sqrt(np.maximum(v_tt, 0.0)), np.sqrt(np.maximum(v_gg, 0.0))
        low, high = fieller(mt, mg, v_tt, v_tg, v_gg, q, nonnegative=True)
        ratio = mt / mg
    return Smoothed(mg, mg - q * se_g, mg + q * se_g, mt, mt - q * se_t, mt + q * se_t, ratio, low, high, n_eff)


def ema_n_eff(decay: float) -> float:
    """The asymptotic effective number of recorded steps of an EMA: (1 + β)/(1 − β)."""
    return math.inf if decay >= 1 else (1 + decay) / (1 - decay)
