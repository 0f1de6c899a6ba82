"""Tail indices of the entries of S: a Hill-type estimator on the fixed log bins, and the α-stable estimator.

Binned Hill (Hill 1975, "A simple general approach to inference about the tail of a distribution"; for binned
data Virkar & Clauset 2014, "Power-law distributions in binned empirical data", Ann. Appl. Stat. 8:89).
The store's magnitude bins are geometric with ratio r = 10^(1/8) (``gradlab.schema``).  Above a threshold
edge u, a Pareto tail P(|X| > x) = (x/u)^(−α) puts bin j (|X| ∈ [u r^j, u r^(j+1))) with probability
q^j (1 − q), q = r^(−α): a geometric law.  Its maximum-likelihood fit, with the overflow bin (|X| ≥ 1e4)
right-censored at J, is q̂ = S/(S + k) with S = Σ_j j c_j + J c_over and k = Σ_j c_j, so α̂ = −ln q̂ / ln r
(this is Hill's estimator for data rounded down to the bin edges).  The threshold is the edge minimising the
Kolmogorov–Smirnov distance between the binned tail and its fit, among edges with at least ``min_tail``
entries above (Clauset, Shalizi & Newman 2009, §3.3).  The bootstrap over trials selects the threshold again in
every resample, so the interval includes the uncertainty of that choice.  A store's entry histograms pool every
selected parameter tensor: entries of different layers have different scales, and a scale mixture looks
heavier-tailed than each part, so the pooled Hill index is labelled as such (probe one layer with ``--params``
for a per-layer Hill index).

α-stable (Mohammadi, Mohammadpour & Ogata 2015, "On estimating the tail index and the spectral measure of
multivariate α-stable distributions", Metrika 78:549; used by Şimşekli, Sagun & Gürbüzbalaban 2019, "A
tail-index analysis of stochastic gradient noise in deep neural networks", ICML): for centred symmetric
α-stable X_1..X_K, K = K1·K2, and block sums Y_i = Σ_{j=1}^{K1} X_{(i−1)K1+j},
1/α̂ = (1/ln K1) · ((1/K2) Σ_i ln|Y_i| − (1/K) Σ_k ln|X_k|).  Here X are the entries of S_{2p} − S_{2p+1}, the
difference of two independent trials: the location (the mean gradient) cancels exactly and a difference of two
i.i.d. α-stable variables is symmetric α-stable with the same α (centring by a sample mean would not converge for
α near 1).  Blocks lie inside a pair (K1 = ⌊√d⌋ entries of the d-vector); the per-pair sums of ln|X| and ln|Y|
are additive, so pairs of trials are resampled.  Blocks never cross a layer boundary (``segments``): per layer,
K1 = ⌊√d_l⌋ of the layer's d_l entries; pooled over layers, one K1 = ⌊√min d_l⌋ for every layer, so each layer
contributes ln|X| and ln|Y| in proportion to its size and its scale cancels in mean ln|Y| − mean ln|X| (the
pooled estimate is that of per-layer standardised entries).

An α-stable index is defined on (0, 2] only (α = 2 is the Gaussian).  The estimator is not clipped: an estimate
outside the range is reported as computed, with a note and the flag ``outside_stable_range`` in ``summary.json``
(:func:`stable_range_note`).  Above 2 the entries are not heavy-tailed in the α-stable sense: finite-variance
entries give 2 up to noise, and dependent entries (the output bias of a softmax cross-entropy, whose gradient
entries sum to zero per example, so block sums cancel) or few blocks (a small layer) push it higher.  Such a value
says the α-stable model does not describe the entries, not that they have a tail index above 2.

Example (exact Pareto counts, α = 1.5)::

    >>> import numpy as np
    >>> r = 10 ** (1 / 8); q = r ** -1.5; j = np.arange(60)
    >>> counts = 1e6 * q ** j * (1 - q); over = 1e6 * q ** 60
    >>> round(float(binned_hill(counts, over, 0, r)), 6)
    1.5
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from gradlab import schema
from gradlab.analysis.bootstrap import bootstrap_trials
from gradlab.analysis.interval import Estimate, json_float

BIN_RATIO = 10.0 ** (1.0 / schema.HIST_BINS_PER_DECADE)


def magnitude_bins() -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Map the signed entry bins to magnitude bins.

    Returns (lower magnitude edge of each log bin, index of the log magnitude bin of every signed bin or −1,
    a mask of the overflow bins, the number of log magnitude bins).
    """
    lower, upper = schema.entry_bin_edges()
    mag_lo = np.where(lower >= 0, lower, -upper)
    mag_hi = np.where(lower >= 0, upper, -lower)
    n = (schema.HIST_MAX_EXP - schema.HIST_MIN_EXP) * schema.HIST_BINS_PER_DECADE
    edges = np.logspace(schema.HIST_MIN_EXP, schema.HIST_MAX_EXP, n + 1)
    is_log = (mag_lo >= edges[0]) & np.isfinite(mag_hi) & (mag_hi > mag_lo)
    k = np.full(lower.size, -1)
    k[is_log] = np.rint(np.log10(mag_lo[is_log] / edges[0]) * schema.HIST_BINS_PER_DECADE).astype(int)
    overflow = np.isinf(mag_hi)
    return edges[:-1], k, overflow, n


def magnitude_counts(entry_hist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Counts per log magnitude bin and overflow counts from signed bin counts (bin axis first, any trailing).

    Under-flow and zero bins are dropped: they lie below every threshold.
    """
    h = np.asarray(entry_hist, dtype=np.float64)
    _, k, overflow, n = magnitude_bins()
    out = np.zeros((n, *h.shape[1:]))
    np.add.at(out, k[k >= 0], h[k >= 0])
    return out, h[overflow].sum(0)


def binned_hill(counts: np.ndarray, overflow: np.ndarray | float, start: int, ratio: float = BIN_RATIO) -> np.ndarray:
    """α̂ = −ln q̂/ln r, q̂ = S/(S + k): geometric MLE above magnitude bin ``start`` (bin axis first)."""
    c = np.asarray(counts, dtype=np.float64)[start:]
    j = np.arange(c.shape[0], dtype=np.float64).reshape(-1, *([1] * (c.ndim - 1)))
    s = (j * c).sum(0) + c.shape[0] * np.asarray(overflow, dtype=np.float64)
    k = c.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.log(s / (s + k)) / math.log(ratio)


def ks_distance(counts: np.ndarray, overflow: float, start: int, alpha: float,
                ratio: float = BIN_RATIO) -> float:
    """Largest gap between the binned tail's empirical CDF above ``start`` and the fitted geometric CDF."""
    c = np.append(np.asarray(counts, dtype=np.float64)[start:], overflow)
    total = c.sum()
    q = ratio ** (-alpha)
    emp = np.cumsum(c)[:-1] / total
    fit = 1.0 - q ** np.arange(1, c.size)
    return float(np.max(np.abs(emp - fit))) if emp.size else math.inf


def select_threshold(counts: np.ndarray, overflow: float, min_tail: int = 100) -> int:
    """The magnitude bin where the tail starts: minimal KS distance among bins with ≥ ``min_tail`` entries above.

    Raises ValueError when no bin has ``min_tail`` entries above it.
    """
    c = np.asarray(counts, dtype=np.float64)
    tail = np.cumsum(c[::-1])[::-1] + overflow
    candidates = np.flatnonzero((tail >= min_tail) & (c > 0))
    if candidates.size == 0:
        raise ValueError(f"fewer than {min_tail} nonzero magnitudes: no tail to fit")
    return int(candidates[int(np.argmin(_ks_profile(c, float(overflow), candidates)))])


def _ks_profile(c: np.ndarray, overflow: float, starts: np.ndarray, ratio: float = BIN_RATIO) -> np.ndarray:
    """:func:`ks_distance` at the Hill fit of every start in ``starts`` at once (cumulative sums, one matrix)."""
    n = c.size
    j = np.arange(n, dtype=np.float64)
    a = np.cumsum(c[::-1])[::-1]  # Σ_{i≥s} c_i
    b = np.cumsum((j * c)[::-1])[::-1]  # Σ_{i≥s} i c_i
    s = starts.astype(np.float64)
    big_s = b[starts] - s * a[starts] + (n - s) * overflow
    k = a[starts]
    q = big_s / (big_s + k)  # the fitted geometric ratio r^(−α̂) of each start
    total = k + overflow
    cum = np.concatenate([[0.0], np.cumsum(c)])
    emp = (cum[None, 1:] - cum[starts][:, None]) / total[:, None]  # (start, j): share of the tail in bins s..j
    with np.errstate(divide="ignore", invalid="ignore"):
        fit = 1.0 - q[:, None] ** (j[None, :] - s[:, None] + 1)
    gap = np.where(j[None, :] >= s[:, None], np.abs(emp - fit), 0.0)
    return np.where(starts < n, gap.max(1), np.inf)


STABLE_RANGE = "(0, 2]"


def outside_stable_range(e: Estimate) -> bool | None:
    """Whether the point estimate lies outside the α-stable range (0, 2] (None: no estimate)."""
    if not math.isfinite(e.value):
        return None if math.isnan(e.value) else True
    return not 0.0 < e.value <= 2.0


def stable_range_note(e: Estimate) -> str | None:
    """What an α-stable estimate outside (0, 2] means (None inside the range or without an estimate)."""
    if not outside_stable_range(e):
        return None
    if e.value > 2:
        return (f"estimate {e.value:.3g} outside {STABLE_RANGE}: not heavy-tailed in the α-stable sense, consistent "
                "with finite variance (Gaussian entries give α = 2) or with dependent entries / few blocks; the "
                "α-stable model is not supported and the value is not a tail index")
    return (f"estimate {e.value:.3g} outside {STABLE_RANGE}: the estimator is outside its validity here (mean "
            "ln|block sum| below mean ln|entry|); the α-stable model is not supported")


def _stable_dict(e: Estimate) -> dict[str, Any]:
    return {**e.to_dict(), "outside_stable_range": outside_stable_range(e)}


@dataclass(frozen=True)
class TailFit:
    """Binned Hill tail index with its threshold, and the α-stable index (NaN without vectors)."""

    hill: Estimate
    threshold: float  # magnitude where the fitted tail starts
    n_tail: int
    ks: float
    alpha_stable: Estimate  # pooled over layers, blocks inside layers (per-layer standardised)
    alpha_stable_layers: dict[str, Estimate] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"hill": self.hill.to_dict(), "hill_threshold": json_float(self.threshold), "hill_n_tail": self.n_tail,
                "hill_ks": json_float(self.ks), "hill_pools": "every selected parameter tensor",
                "alpha_stable": _stable_dict(self.alpha_stable), "alpha_stable_range": STABLE_RANGE,
                "alpha_stable_per_layer": {k: _stable_dict(v) for k, v in self.alpha_stable_layers.items()}}


def fit_hill(entry_hist: np.ndarray, *, n_boot: int, rng: np.random.Generator, min_tail: int = 100,
             level: float = 0.95) -> tuple[Estimate, float, int, float]:
    """Binned Hill tail index of ``entry_hist`` (bin, trial) pooled over trials, with a trial bootstrap.

    Returns (α̂ with interval, threshold magnitude, entries above it, KS distance).
    """
    counts, over = magnitude_counts(entry_hist)
    pooled, pooled_over = counts.sum(1), float(over.sum())
    try:
        start = select_threshold(pooled, pooled_over, min_tail)
    except ValueError as exc:
        return Estimate(math.nan, note=str(exc)), math.nan, 0, math.nan
    alpha = float(binned_hill(pooled, pooled_over, start))
    ks = ks_distance(pooled, pooled_over, start, alpha)
    n_tail = int(pooled[start:].sum() + pooled_over)
    sample = np.concatenate([counts, over[None]], axis=0)

    def stat(h: np.ndarray) -> np.ndarray:
        tot = h.sum(-1)  # (*batch, bins + 1)
        flat = tot.reshape(-1, tot.shape[-1])
        out = np.full(flat.shape[0], np.nan)
        for i, row in enumerate(flat):  # the threshold is chosen again in every resample
            try:
                s0 = select_threshold(row[:-1], float(row[-1]), min_tail)
            except ValueError:
                continue
            out[i] = float(binned_hill(row[:-1], row[-1], s0))
        return out.reshape(tot.shape[:-1])[None]

    est = (bootstrap_trials([sample], stat, n_boot=n_boot, rng=rng, level=level).estimate(0) if n_boot > 0
           else Estimate(alpha))
    edges, *_ = magnitude_bins()
    return est, float(edges[start]), n_tail, ks


def stable_pair_sums(vectors: np.ndarray, segments: list[tuple[int, int]] | None = None,
                     k1: int | None = None) -> np.ndarray:
    """Per-pair additive terms of the Mohammadi et al. estimator: (Σ ln|X|, #X, Σ ln|Y|, #Y) × pair.

    ``vectors`` is (trial, d): S of each trial; pair p is X = S_{2p} − S_{2p+1} (an odd last trial is left out).
    ``segments`` are the [start, end) entry ranges of the layers (default: one segment); blocks of ``k1``
    consecutive entries lie inside a segment (default K1 = ⌊√(shortest segment)⌋, see :func:`pooled_block_length`).
    Exact zeros (ln 0) are left out of the sums and counts.
    """
    v = np.asarray(vectors, dtype=np.float64)
    n_pairs = v.shape[0] // 2
    xall = v[0 : 2 * n_pairs : 2] - v[1 : 2 * n_pairs : 2]
    segs = [(0, xall.shape[-1])] if segments is None else [(int(a), int(b)) for a, b in segments]
    if k1 is None:
        k1 = pooled_block_length(segs)
    out = np.zeros((4, n_pairs))
    for a, b in segs:
        k2 = (b - a) // k1
        if k2 < 1:
            continue
        x = xall[:, a : a + k1 * k2]
        y = x.reshape(x.shape[0], k2, k1).sum(-1)
        with np.errstate(divide="ignore"):
            lx, ly = np.log(np.abs(x)), np.log(np.abs(y))
        fx, fy = np.isfinite(lx), np.isfinite(ly)
        out += np.stack([np.where(fx, lx, 0).sum(1), fx.sum(1), np.where(fy, ly, 0).sum(1), fy.sum(1)])
    return out


def pooled_block_length(segments: list[tuple[int, int]]) -> int:
    """K1 shared by every layer: ⌊√d⌋ of the shortest segment with ≥ 4 entries."""
    sizes = [b - a for a, b in segments if b - a >= 4]
    if not sizes:
        raise ValueError(f"the α-stable estimator needs a layer of at least 4 entries; got sizes "
                         f"{[b - a for a, b in segments]}")
    return block_length(min(sizes))


def block_length(d: int) -> int:
    """K1 = ⌊√d⌋ (Şimşekli et al. 2019 take K1 ≈ √K)."""
    if d < 4:
        raise ValueError(f"the α-stable estimator needs vectors of at least 4 entries; got {d}")
    return math.isqrt(d)


def alpha_stable_statistic(sums: np.ndarray, k1: int) -> np.ndarray:
    """α̂ = ln K1 / (mean ln|Y| − mean ln|X|) from per-trial sums (..., 4, trial)."""
    t = sums.sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (math.log(k1) / (t[..., 2] / t[..., 3] - t[..., 0] / t[..., 1]))[None]


def fit_alpha_stable(sums: np.ndarray, d: int | None = None, *, n_boot: int, rng: np.random.Generator,
                     level: float = 0.95, k1: int | None = None) -> Estimate:
    """α of Mohammadi et al. (2015) from :func:`stable_pair_sums` output, with a bootstrap over pairs of trials.

    The block length is ``k1`` (as passed to :func:`stable_pair_sums`), else ⌊√d⌋.  α-stable laws have
    α ∈ (0, 2]; an estimate outside is reported as is, never clipped, with :func:`stable_range_note` in its note.
    """
    if k1 is None:
        if d is None:
            raise ValueError("give the vector length d or the block length k1")
        k1 = block_length(d)

    def stat(s: np.ndarray) -> np.ndarray:
        return alpha_stable_statistic(s, k1)

    if n_boot > 0:  # pairs of trials are resampled: the notes count those
        est = bootstrap_trials([sums], stat, n_boot=n_boot, rng=rng, level=level,
                               unit=lambda n: f"{n} pairs of trials ({2 * n} or {2 * n + 1} trials)").estimate(0)
    else:
        est = Estimate(float(stat(sums)[0]))
    note = stable_range_note(est)
    if note is None:
        return est
    return replace(est, note="; ".join(n for n in (note, est.note) if n))
