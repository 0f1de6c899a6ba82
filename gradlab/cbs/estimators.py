"""Two estimators of the critical batch size from branch loss curves, with bootstrap intervals over seeds.

Both read per-seed losses; seeds are the independent units (each seed has its own example stream, shared by every
batch size, so resampling seeds keeps the pairing between batch sizes).  Diverged branches are NaN here and left
out of every mean (the caller says which and why).  numpy only.

**Branching** (Merrill et al. 2025, "Critical batch size revisited"): with L̄(m) the mean over seeds of the loss
after the same number of examples and r(m) = L̄(m)/L̄(m₀) − 1 (m₀ the smallest batch size), B_crit is the largest
batch size whose loss stays within the tolerance ε of the small-batch branch.  On a grid m₀ < m₁ < … the estimate
is the point where r crosses ε, interpolated linearly in r against log m between the last grid point of the
contiguous run from m₀ with r ≤ ε and the first one above it (``grid`` keeps that last grid point).  When every
batch size is within tolerance the estimate is censored: B_crit ≥ the largest batch size (upper end +∞).

**Steps–examples trade-off** (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training"): to reach a
target loss L*, batch size m takes S(m) steps and E(m) = m·S(m) examples, and (S/S_min − 1)(E/E_min − 1) = 1.
Its solution is S(m) = S_min(1 + B_crit/m), E(m) = E_min(1 + m/B_crit) with B_crit = E_min/S_min, i.e. S is
linear in 1/m: S = a + b/m with a = S_min, b = E_min.  S(m) is where the mean loss curve first reaches L*,
interpolated linearly in log L between the two evaluations around the crossing (exact when log E[L] is linear in
steps between them); a batch size that never reaches L* within the budget is reported as such and left out of the
fit (never extrapolated).  The fit is weighted least squares with weights 1/S(m)² (relative errors: S spans
orders of magnitude), in closed form.

Intervals: bootstrap over seeds, Hesterberg's (2015) expanded percentile interval (:func:`expanded_alpha`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradlab.analysis.interval import Estimate

MIN_SEEDS_FOR_INTERVAL = 5


def _resamples(n_seeds: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, n_seeds, size=(n_boot, n_seeds))


def expanded_alpha(n: int, level: float) -> float:
    """The tail probability of Hesterberg's expanded percentile interval for n seeds: Φ(−√(n/(n−1))·t_{n−1}),
    with t_{n−1} the (1 + level)/2 Student quantile (the plain percentile interval undercovers with few seeds:
    88% for 95% nominal with 12 seeds on the analytic case)."""
    from scipy import stats

    return float(stats.norm.cdf(-math.sqrt(n / (n - 1)) * stats.t.ppf((1 + level) / 2, n - 1)))


def _percentile(dist: np.ndarray, level: float, n: int) -> tuple[float, float]:
    """Order statistics at the expanded tail probability (±inf resamples allowed: a censored tail gives ±inf)."""
    a = expanded_alpha(n, level)
    d = np.sort(dist[~np.isnan(dist)])
    if d.size == 0:
        return math.nan, math.nan
    lo = int(np.clip(np.floor(a * d.size), 0, d.size - 1))
    hi = int(np.clip(np.ceil((1 - a) * d.size) - 1, 0, d.size - 1))
    return float(d[lo]), float(d[hi])


# ---------------------------------------------------------------------------------------------------------------
# branching (Merrill et al. 2025)


def branching_crossing(mean_loss: np.ndarray, batch_sizes: np.ndarray, epsilon: float) -> np.ndarray:
    """The interpolated crossing of r(m) = L̄(m)/L̄(m₀) − 1 over ε for each row of ``mean_loss`` (..., M).

    Returns (...,) floats; +inf marks a censored row (every batch size within tolerance: B_crit ≥ max m); a NaN
    loss at some m (every branch there diverged) counts as beyond tolerance; batch sizes not computed yet are the
    caller's to leave out (:func:`gradlab.analysis.cbs.branching_section`)."""
    L = np.asarray(mean_loss, dtype=np.float64)
    logm = np.log(np.asarray(batch_sizes, dtype=np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = L / L[..., :1] - 1
    r = np.where(np.isnan(r), np.inf, r)
    r[..., 0] = 0.0
    above = r > epsilon
    first = np.where(above.any(-1), above.argmax(-1), -1)
    out = np.full(L.shape[:-1], np.inf)
    hit = first > 0
    i = np.where(hit, first, 1)
    r0 = np.take_along_axis(r, (i - 1)[..., None], -1)[..., 0]
    r1 = np.take_along_axis(r, i[..., None], -1)[..., 0]
    with np.errstate(invalid="ignore", divide="ignore"):  # r1 = r0 only in rows without a crossing (unused)
        t = np.where(np.isfinite(r1), (epsilon - r0) / (r1 - r0), 0.0)
    out[hit] = np.exp(logm[i - 1][hit] + t[hit] * (logm[i] - logm[i - 1])[hit])
    return out


@dataclass(frozen=True)
class BranchingResult:
    b_crit: Estimate  # interpolated crossing; value +inf is never reported: censored -> value = max m, note
    grid: float  # the largest grid batch size of the contiguous run within tolerance
    censored: bool
    ratio: np.ndarray  # r(m) from all seeds
    epsilon: float
    n_seeds: np.ndarray  # non-diverged seeds per batch size
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        from gradlab.analysis.interval import json_float

        return {"b_crit": self.b_crit.to_dict(), "grid": json_float(self.grid), "censored": self.censored,
                "ratio": [json_float(x) for x in self.ratio], "epsilon": self.epsilon,
                "n_seeds": [int(n) for n in self.n_seeds], "notes": self.notes}


def branching_estimate(final: np.ndarray, batch_sizes: Any, epsilon: float, *, n_boot: int = 999,
                       rng: np.random.Generator | None = None, level: float = 0.95) -> BranchingResult:
    """Merrill's branching estimate from ``final`` (M, R): the loss of every (batch size, seed) after the same
    number of examples (NaN for a diverged branch); percentile bootstrap over seeds (paired across m)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    final = np.asarray(final, dtype=np.float64)
    bs = np.asarray(batch_sizes, dtype=np.float64)
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    notes: list[str] = []
    with np.errstate(invalid="ignore"), _quiet():
        mean = np.nanmean(final, axis=-1)
    n_ok = np.sum(~np.isnan(final), axis=-1)
    if bs.size < 2:  # nothing to compare the smallest batch size with
        note = f"one batch size only ({bs[0]:g}): the branching estimate compares batch sizes; give at least two"
        return BranchingResult(Estimate(math.nan, note=note), math.nan, False, np.zeros(bs.size), epsilon, n_ok,
                               [note])
    if n_ok[0] == 0:
        return BranchingResult(Estimate(math.nan, note="every branch at the smallest batch size diverged "
                                                        "(or is not computed): no reference loss"),
                               math.nan, False, np.full(bs.size, np.nan), epsilon, n_ok, ["no reference branch"])
    if not mean[0] > 0:  # r(m) = L̄(m)/L̄(m₀) − 1 is a relative excess only over a positive loss (a custom loss)
        note = (f"the loss at the smallest batch size is {mean[0]:.4g} ≤ 0: the relative excess r(m) = "
                "L(m)/L(m₀) − 1 needs a positive loss; no branching estimate")
        return BranchingResult(Estimate(math.nan, note=note), math.nan, False, np.full(bs.size, np.nan), epsilon, n_ok,
                               [note])
    for m, k in zip(bs, n_ok):
        if k < final.shape[-1]:
            notes.append(f"batch size {m:g}: {final.shape[-1] - k} diverged branch(es) left out"
                         + (" (all: counted as beyond tolerance)" if k == 0 else ""))
    value = float(branching_crossing(mean, bs, epsilon))
    ratio = mean / mean[0] - 1
    within = np.concatenate([[True], (ratio[1:] <= epsilon)])
    run = int(np.argmin(within)) if not within.all() else bs.size
    grid = float(bs[run - 1])
    censored = math.isinf(value)
    if censored:
        notes.append(f"every batch size is within ε = {epsilon:g}: B_crit ≥ {bs[-1]:g} (censored: add larger "
                     "batch sizes)")
        value = float(bs[-1])
    R = final.shape[-1]
    if R < MIN_SEEDS_FOR_INTERVAL or n_boot == 0:
        notes.append(f"{R} seed(s): no interval (needs at least {MIN_SEEDS_FOR_INTERVAL} seeds)" if n_boot else
                     "no bootstrap (n_boot = 0)")
        return BranchingResult(Estimate(value, note="; ".join(notes)), grid, censored, ratio, epsilon, n_ok, notes)
    idx = _resamples(R, n_boot, rng)
    with np.errstate(invalid="ignore"), _quiet():
        boot_mean = np.nanmean(final[:, idx], axis=-1).T  # (n_boot, M)
    dist = branching_crossing(boot_mean, bs, epsilon)
    # a censored resample says B_crit ≥ max m: it counts as max m for the lower end and as +inf for the upper end
    low = _percentile(np.where(np.isinf(dist), bs[-1], dist), level, R)[0]
    high = _percentile(dist, level, R)[1]
    return BranchingResult(Estimate(value, low, high, level, "; ".join(notes) or None), grid, censored, ratio,
                           epsilon, n_ok, notes)


# ---------------------------------------------------------------------------------------------------------------
# steps–examples trade-off (McCandlish et al. 2018)


def steps_to_target(steps: np.ndarray, loss: np.ndarray, target: float) -> np.ndarray:
    """Steps at which each curve first reaches ``target``; ``steps`` (M, J) eval steps, ``loss`` (..., M, J).

    Interpolated linearly in log loss (in loss when a value is ≤ 0) between the evaluations around the first
    crossing; NaN where the curve never reaches the target; 0 where it starts at or below it.
    """
    L = np.asarray(loss, dtype=np.float64)
    s = np.broadcast_to(np.asarray(steps, dtype=np.float64), L.shape)
    reached = L <= target
    first = np.where(reached.any(-1), reached.argmax(-1), -1)
    j = np.maximum(first, 1)
    l0 = np.take_along_axis(L, (j - 1)[..., None], -1)[..., 0]
    l1 = np.take_along_axis(L, j[..., None], -1)[..., 0]
    s0 = np.take_along_axis(s, (j - 1)[..., None], -1)[..., 0]
    s1 = np.take_along_axis(s, j[..., None], -1)[..., 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        use_log = (l0 > 0) & (l1 > 0) & (target > 0)
        f_log = (np.log(np.where(use_log, l0, 1.0)) - math.log(target if target > 0 else 1.0)) / (
            np.log(np.where(use_log, l0, 1.0)) - np.log(np.where(use_log, l1, 1.0)))
        f_lin = (l0 - target) / (l0 - l1)
        f = np.where(use_log, f_log, f_lin)
    out = s0 + np.clip(np.nan_to_num(f, nan=1.0), 0, 1) * (s1 - s0)
    out = np.where(first == 0, 0.0, out)
    return np.where(first < 0, np.nan, out)


def fit_tradeoff(S: np.ndarray, batch_sizes: Any) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least squares of S = a + b/m (weights 1/S²) for each row of S (..., M), NaN entries left out.

    Returns (S_min, E_min) = (a, b), NaN where fewer than two batch sizes have an S.
    """
    S = np.asarray(S, dtype=np.float64)
    x = 1.0 / np.asarray(batch_sizes, dtype=np.float64)
    ok = np.isfinite(S) & (S > 0)
    w = np.where(ok, 1.0 / np.where(ok, S, 1.0) ** 2, 0.0)
    Sv = np.where(ok, S, 0.0)
    sw, sx, sxx = w.sum(-1), (w * x).sum(-1), (w * x * x).sum(-1)
    sy, sxy = (w * Sv).sum(-1), (w * x * Sv).sum(-1)
    det = sw * sxx - sx * sx
    with np.errstate(invalid="ignore", divide="ignore"):
        a = (sxx * sy - sx * sxy) / det
        b = (sw * sxy - sx * sy) / det
    bad = ok.sum(-1) < 2
    return np.where(bad, np.nan, a), np.where(bad, np.nan, b)


def _no_fit(target: float, bs: np.ndarray, reached: np.ndarray, usable: np.ndarray, curve: np.ndarray) -> str:
    """Why fewer than two batch sizes give a step count, and which way to move the target loss: a loss that is not
    reached needs a *higher* target (a higher loss is reached sooner) or a larger budget; a curve that starts at or
    below the target needs a *lower* one; a batch size whose every branch diverged has no curve at all."""
    at_start = reached & ~usable
    if not curve.any():
        return ("every branch of every batch size diverged (or is not computed): no curve to reach any target; "
                "no fit")
    if not reached.any():
        return (f"no batch size reaches the target loss {target:.4g} within the budget (none extrapolated"
                + (f"; {', '.join(f'{m:g}' for m in bs[~curve])}: no curve, every branch diverged or not computed"
                   if (~curve).any() else "")
                + "): no fit; raise the target loss (a higher loss is reached sooner) or the budget")
    parts = []
    if usable.any():
        parts.append(f"only batch size {bs[usable][0]:g} reaches the target loss {target:.4g} after a positive number "
                     "of steps (the fit needs two)")
    if at_start.any():
        parts.append(f"batch size(s) {', '.join(f'{m:g}' for m in bs[at_start])} start at or below the target loss "
                     f"{target:.4g} (lower the target loss, below the checkpoint's)")
    if (~reached & curve).any():
        parts.append(f"batch size(s) {', '.join(f'{m:g}' for m in bs[~reached & curve])} never reach it within the "
                     "budget (none extrapolated; raise the target loss or the budget)")
    if (~curve).any():
        parts.append(f"batch size(s) {', '.join(f'{m:g}' for m in bs[~curve])}: no curve (every branch diverged, "
                     "or not computed)")
    return "; ".join(parts) + ": no fit"


@dataclass(frozen=True)
class TradeoffResult:
    target: float
    steps: np.ndarray  # S(m), NaN where not reached
    examples: np.ndarray  # E(m) = m S(m)
    reached: np.ndarray
    s_min: Estimate
    e_min: Estimate
    b_crit: Estimate
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        from gradlab.analysis.interval import json_float

        return {"target": self.target, "steps": [json_float(x) for x in self.steps],
                "examples": [json_float(x) for x in self.examples], "reached": [bool(r) for r in self.reached],
                "n_reached": int(np.sum(self.reached)),
                "s_min": self.s_min.to_dict(), "e_min": self.e_min.to_dict(), "b_crit": self.b_crit.to_dict(),
                "notes": self.notes}


def tradeoff_estimate(steps: np.ndarray, loss: np.ndarray, batch_sizes: Any, target: float, *, n_boot: int = 999,
                      rng: np.random.Generator | None = None, level: float = 0.95) -> TradeoffResult:
    """McCandlish's trade-off fit from per-seed curves ``loss`` (M, R, J) at eval ``steps`` (M, J) (NaN curves for
    diverged branches); S(m) from the mean curve over seeds, percentile bootstrap over seeds."""
    rng = rng if rng is not None else np.random.default_rng(0)
    loss = np.asarray(loss, dtype=np.float64)
    bs = np.asarray(batch_sizes, dtype=np.float64)
    M, R, _ = loss.shape
    notes: list[str] = []
    with np.errstate(invalid="ignore"), _quiet():
        mean = np.nanmean(loss, axis=1)
    S = steps_to_target(steps, mean, target)
    reached = np.isfinite(S)
    n_reached = int(reached.sum())
    curve = np.isfinite(mean).any(-1)  # False: every branch of that batch size diverged (or is missing)
    for m, r, s, has in zip(bs, reached, S, curve):
        if not has:
            notes.append(f"batch size {m:g}: no curve (every branch diverged, or the unit is not computed): left out")
        elif not r and n_reached:
            notes.append(f"batch size {m:g}: target loss {target:.4g} not reached within the budget (left out, "
                         "not extrapolated)")
        elif r and s == 0:
            notes.append(f"batch size {m:g}: the curve starts at or below the target")
    a, b = (float(v) for v in fit_tradeoff(S, bs))
    usable = reached & (S > 0)  # what the fit uses: a curve that starts at or below the target says nothing
    if int(usable.sum()) < 2:
        notes.append(_no_fit(target, bs, reached, usable, curve))
        nan = Estimate(math.nan, note=notes[-1])
        return TradeoffResult(target, S, bs * S, reached, nan, nan, nan, notes)
    if int(reached.sum()) == 2:
        notes.append("only 2 batch sizes reach the target: the fit passes through them exactly (no check of the law)")
    value = b / a if a > 0 else math.inf
    if a <= 0:
        notes.append("fitted S_min ≤ 0: B_crit is unbounded (the steps do not level off at large batch sizes)")
    if R < MIN_SEEDS_FOR_INTERVAL or n_boot == 0:
        why = f"{R} seed(s): no interval" if n_boot else "no bootstrap (n_boot = 0)"
        return TradeoffResult(target, S, bs * S, reached, Estimate(a, note=why), Estimate(b, note=why),
                              Estimate(value, note=why), [*notes, why])
    idx = _resamples(R, n_boot, rng)
    with np.errstate(invalid="ignore"), _quiet():
        boot = np.nanmean(loss[:, idx, :], axis=2).transpose(1, 0, 2)  # (n_boot, M, J)
    Sb = steps_to_target(steps, boot, target)
    lost = float(np.mean(np.isfinite(Sb[:, reached]).sum(-1) < reached.sum()))
    if lost > 0:
        notes.append(f"{lost:.0%} of bootstrap resamples lost a batch size that reaches the target (fitted on the rest)")
    ab, bb = fit_tradeoff(np.where(reached, Sb, np.nan), bs)
    with np.errstate(invalid="ignore", divide="ignore"):
        cb = np.where(ab > 0, bb / ab, np.inf)
    note = "; ".join(notes) or None
    return TradeoffResult(target, S, bs * S, reached, Estimate(a, *_percentile(ab, level, R), level, note),
                          Estimate(b, *_percentile(bb, level, R), level, note),
                          Estimate(value, *_percentile(cb, level, R), level, note), notes)


class _quiet:
    """Silence numpy's 'mean of empty slice' warnings (all-NaN columns are handled explicitly)."""

    def __enter__(self) -> None:
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc: object) -> None:
        self._w.__exit__(*exc)
