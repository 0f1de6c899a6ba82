"""Tail indices: binned Hill (geometric MLE) and the α-stable estimator of Mohammadi et al. / Şimşekli et al."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import optimize, stats

from gradlab import schema
from gradlab.analysis.tails import (BIN_RATIO, binned_hill, fit_alpha_stable, fit_hill, magnitude_counts,
                                    stable_pair_sums)


def test_binned_hill_exact_pareto_with_overflow_censoring():
    q = BIN_RATIO**-0.8
    counts = 1e5 * q ** np.arange(40) * (1 - q)
    assert float(binned_hill(counts, 1e5 * q**40, 0)) == pytest.approx(0.8, rel=1e-12)


def test_binned_hill_equals_numerical_likelihood_maximum():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 50, 30).astype(float)
    over = 7.0
    j = np.arange(30)

    def nll(a):
        q = BIN_RATIO ** (-a)
        return -(np.sum(counts * (j * np.log(q) + np.log1p(-q))) + over * 30 * np.log(q))

    ref = optimize.minimize_scalar(nll, bounds=(1e-3, 20), method="bounded", options={"xatol": 1e-10}).x
    assert float(binned_hill(counts, over, 0)) == pytest.approx(ref, rel=1e-6)


def test_magnitude_counts_keep_every_entry_above_underflow():
    v = np.array([-2e5, -3.0, -1e-13, 0.0, 2e-13, 0.5, 7.0, 3e4])
    h, _ = schema.entry_histogram(v)
    counts, over = magnitude_counts(h[:, None])
    assert counts.sum() == 3 and over[0] == 2  # |v| = 3, 0.5, 7 in log bins; 2e5 and 3e4 overflow


def _stable_hist(alpha: float, trials: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    x = stats.levy_stable.rvs(alpha, 0.0, size=(trials, d), random_state=np.random.default_rng(seed))
    return np.stack([schema.entry_histogram(row)[0] for row in x], 1), x


def test_hill_recovers_cauchy_tail_index():
    hist, _ = _stable_hist(1.0, 40, 500, 1)
    est, thr, n_tail, _ = fit_hill(hist, n_boot=999, rng=np.random.default_rng(2))
    assert est.contains(1.0) and est.contains(est.value) and n_tail >= 100 and thr > 0


@pytest.mark.parametrize("alpha", [1.2, 1.7])
def test_alpha_stable_estimator_recovers_alpha(alpha):
    _, x = _stable_hist(alpha, 60, 400, int(alpha * 10))
    est = fit_alpha_stable(stable_pair_sums(x), 400, n_boot=999, rng=np.random.default_rng(3))
    assert est.contains(alpha) and est.contains(est.value)


def test_alpha_stable_gaussian_entries_give_two():
    x = np.random.default_rng(4).standard_normal((60, 400))
    est = fit_alpha_stable(stable_pair_sums(x), 400, n_boot=999, rng=np.random.default_rng(5))
    assert est.contains(2.0)


def test_heavier_tail_at_larger_batch_is_detected():
    light, _ = _stable_hist(1.8, 30, 400, 6)
    heavy, _ = _stable_hist(1.1, 30, 400, 7)
    e_light = fit_hill(light, n_boot=499, rng=np.random.default_rng(8))[0]
    e_heavy = fit_hill(heavy, n_boot=499, rng=np.random.default_rng(9))[0]
    assert e_heavy.high < e_light.low
