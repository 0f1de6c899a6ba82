"""The estimators on synthetic gradients with known G and Σ (numpy only): unbiased, intervals cover, two-batch."""

from __future__ import annotations

import numpy as np
import pytest

from gradlab.monitor.estimators import EmaRatio, fieller, noise_estimates

D, B = 12, 16


def _truth(seed: int = 0):
    rng = np.random.default_rng(seed)
    G = rng.normal(size=D) * 0.4
    L = rng.normal(size=(D, D)) / np.sqrt(D)
    return G, L, float(G @ G), float(np.trace(L @ L.T))


def _steps(G, L, n_seeds: int, n_steps: int, seed: int):
    """Per-example gradients g (seeds, steps, B, D) drawn i.i.d. from N(G, LLᵀ)."""
    rng = np.random.default_rng(seed)
    return G + rng.normal(size=(n_seeds, n_steps, B, D)) @ L.T


def test_per_example_estimates_are_unbiased():
    G, L, g2_true, tr_true = _truth()
    g = _steps(G, L, 4000, 1, seed=1)[:, 0]
    s1 = (g.sum(1) ** 2).sum(-1)
    s2 = (g ** 2).sum((1, 2))
    g2, tr = noise_estimates(s1, s2, B, B)
    for est, true in ((g2, g2_true), (tr, tr_true)):
        se = est.std() / np.sqrt(est.size)
        assert abs(est.mean() - true) < 4 * se, (est.mean(), true, se)
    # the naive plug-ins are biased: ‖mean g‖² overshoots ‖G‖² by tr Σ / B
    naive = s1 / B**2
    assert naive.mean() - g2_true > 10 * naive.std() / np.sqrt(naive.size)


def test_without_replacement_from_a_finite_pool_is_unbiased():
    rng = np.random.default_rng(3)
    pool = rng.normal(size=(40, D)) + 0.3
    G = pool.mean(0)
    tr_true = float(((pool - G) ** 2).sum(1).mean())  # Σ with 1/n
    g2s, trs = [], []
    for _ in range(6000):
        idx = rng.choice(40, size=B, replace=False)
        g = pool[idx]
        g2, tr = noise_estimates((g.sum(0) ** 2).sum(), (g ** 2).sum(), B, B, pool_size=40)
        g2s.append(g2)
        trs.append(tr)
    for est, true in ((np.array(g2s), float(G @ G)), (np.array(trs), tr_true)):
        assert abs(est.mean() - true) < 4 * est.std() / np.sqrt(est.size)


def test_two_batch_agrees_with_per_example_in_expectation_and_exactly_for_micro_batches_of_one():
    G, L, g2_true, tr_true = _truth()
    g = _steps(G, L, 4000, 1, seed=2)[:, 0]  # (seeds, B, D)
    s1 = (g.sum(1) ** 2).sum(-1)
    k = 4
    micro = g.reshape(g.shape[0], k, B // k, D).sum(2)  # s_j, micro-batches of b = 4
    q = (micro ** 2).sum(-1).sum(-1) / (B // k)
    g2_two, tr_two = noise_estimates(s1, q, B, k)
    g2_pe, tr_pe = noise_estimates(s1, (g ** 2).sum((1, 2)), B, B)
    for two, pe, true in ((g2_two, g2_pe, g2_true), (tr_two, tr_pe, tr_true)):
        se = np.sqrt(two.var() / two.size + pe.var() / pe.size)
        assert abs(two.mean() - pe.mean()) < 4 * se and abs(two.mean() - true) < 4 * two.std() / np.sqrt(two.size)
    assert tr_two.std() > tr_pe.std()  # fewer groups, noisier: the price of not having per-example norms
    # McCandlish et al.'s form with |B_small| = b, |B_big| = B
    b = B // k
    small = ((micro / b) ** 2).sum(-1).mean(1)
    big = s1 / B**2
    np.testing.assert_allclose(g2_two, (B * big - b * small) / (B - b), rtol=1e-10)
    np.testing.assert_allclose(tr_two, (small - big) / (1 / b - 1 / B), rtol=1e-10)


def test_batch_of_one_and_single_group_have_no_estimate():
    g2, tr = noise_estimates(1.0, 1.0, 1, 1)
    assert np.isnan(g2) and np.isnan(tr)
    g2, tr = noise_estimates(4.0, 3.0, 8, 1)
    assert np.isnan(g2) and np.isnan(tr)


@pytest.mark.parametrize("decay", [0.9, 0.97])
def test_smoothed_intervals_cover_95_percent_over_200_seeds(decay):
    """B_noise (Fieller), ‖G‖² and tr Σ (t intervals) of the EMA at the last of 150 stationary steps."""
    G, L, g2_true, tr_true = _truth()
    n_seeds, n_steps = 200, 150
    g = _steps(G, L, n_seeds, n_steps, seed=10 + int(decay * 100))
    s1 = (g.sum(2) ** 2).sum(-1)
    s2 = (g ** 2).sum((2, 3))
    g2, tr = noise_estimates(s1, s2, B, B)  # (seeds, steps)
    ema = EmaRatio(n_parts=n_seeds, decay=decay)
    for t in range(n_steps):
        ema.update(tr[:, t], g2[:, t])
    sm = ema.current()
    cover = {
        "b_noise": ((sm.b_noise_low <= tr_true / g2_true) & (tr_true / g2_true <= sm.b_noise_high)).mean(),
        "grad_sq_norm": ((sm.grad_sq_norm_low <= g2_true) & (g2_true <= sm.grad_sq_norm_high)).mean(),
        "trace_cov": ((sm.trace_cov_low <= tr_true) & (tr_true <= sm.trace_cov_high)).mean(),
    }
    assert all(0.92 <= c <= 0.98 for c in cover.values()), cover
    # the ratio of averages is close to the truth; the average of ratios is not what B_noise means
    assert abs(np.median(sm.b_noise) / (tr_true / g2_true) - 1) < 0.1


def test_ema_skips_missing_steps_and_resumes_exactly():
    rng = np.random.default_rng(0)
    t, g = rng.uniform(1, 2, size=(30, 3)), rng.uniform(0.1, 0.2, size=(30, 3))
    t[5, 1] = np.nan
    a = EmaRatio(3, decay=0.8)
    for k in range(30):
        a.update(t[k], g[k])
    b = EmaRatio(3, decay=0.8)
    for k in range(12):
        b.update(t[k], g[k])
    c = EmaRatio(3, decay=0.8, state=b.state)
    for k in range(12, 30):
        c.update(t[k], g[k])
    np.testing.assert_array_equal(a.current().b_noise, c.current().b_noise)
    assert np.isfinite(a.current().b_noise).all()


def test_fieller_is_unbounded_above_when_the_denominator_may_be_zero():
    low, high = fieller(np.array([10.0]), np.array([0.1]), np.array([1.0]), np.array([0.0]), np.array([1.0]),
                        np.array([1.96]))
    assert high[0] == np.inf and 0 < low[0] < 100
    low, high = fieller(np.array([10.0]), np.array([1.0]), np.array([0.01]), np.array([0.0]), np.array([0.0001]),
                        np.array([1.96]))
    assert low[0] < 10 < high[0] and np.isfinite(high[0])


def test_fieller_with_a_huge_quantile_is_the_whole_line_without_overflow():
    """Two recorded steps far apart give n_eff − 1 ≪ 1 degrees of freedom and a t quantile near 1e200: the
    quadratic's products overflowed (NaN ends and a RuntimeWarning); the interval is then the whole line.
    A moderate quantile gives the textbook roots, unchanged."""
    import warnings

    from gradlab.monitor.estimators import fieller

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        low, high = fieller(np.array([2.0]), np.array([1.0]), np.array([0.1]), np.array([0.01]), np.array([0.05]),
                            np.array([1e200]))
    assert low[0] == -np.inf and high[0] == np.inf
    num, den, vnn, vnd, vdd, q = 2.0, 1.0, 0.1, 0.01, 0.05, 2.0
    a, bh, c = den ** 2 - q ** 2 * vdd, -(num * den - q ** 2 * vnd), num ** 2 - q ** 2 * vnn
    roots = sorted([(-bh - np.sqrt(bh ** 2 - a * c)) / a, (-bh + np.sqrt(bh ** 2 - a * c)) / a])
    low, high = fieller(*(np.array([v]) for v in (num, den, vnn, vnd, vdd, q)))
    assert [low[0], high[0]] == roots


def test_fieller_for_a_nonnegative_ratio_never_reports_a_negative_ray():
    """‖G‖² not distinguishable from 0 and a negative estimate of it (R̂ < 0): the set is two rays, and the true
    tr Σ/‖G‖² ≥ 0 lies in the upper one; the whole line becomes [0, inf)."""
    args = [np.array([v]) for v in (10.0, -0.02, 1.0, 0.0, 0.01, 1.96)]
    low, high = fieller(*args)
    assert low[0] == -np.inf and high[0] < 0  # the textbook branch holding R̂ = −500
    low, high = fieller(*args, nonnegative=True)
    num, den, vnn, vdd, q = 10.0, -0.02, 1.0, 0.01, 1.96
    a, bh, c = den ** 2 - q ** 2 * vdd, -num * den, num ** 2 - q ** 2 * vnn
    r2 = max((-bh - np.sqrt(bh ** 2 - a * c)) / a, (-bh + np.sqrt(bh ** 2 - a * c)) / a)
    assert low[0] == pytest.approx(r2) and r2 > 0 and high[0] == np.inf
    low, high = fieller(*(np.array([v]) for v in (2.0, 1.0, 0.1, 0.01, 0.05, 1e200)), nonnegative=True)
    assert (low[0], high[0]) == (0.0, np.inf)
    low, high = fieller(*(np.array([v]) for v in (2.0, 1.0, 0.1, 0.01, 0.05, 2.0)), nonnegative=True)
    assert 0 < low[0] < 2 < high[0] < np.inf  # bounded: unchanged
