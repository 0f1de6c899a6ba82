"""The noise model E‖g_B‖² = ‖G‖² + c_m tr Σ/m (McCandlish et al. 2018): analytic, reference, coverage."""

from __future__ import annotations

import numpy as np
import pytest

from gradlab.analysis.noise_model import finite_population_factor, fit_noise_model
from gradlab.analysis.wls import wls as wls_line
from gradlab.synthetic import draw_trials, make_pool, minibatch_sq_norms, noise_model_replicate

M = np.array([1, 2, 4, 8, 16, 32, 64])


def test_finite_population_factor_analytic():
    np.testing.assert_allclose(finite_population_factor(np.array([1, 5, 10]), 10, False), [1.0, 5 / 9, 0.0])
    np.testing.assert_array_equal(finite_population_factor(np.array([1, 5]), 10, True), [1.0, 1.0])


def test_exact_model_data_gives_the_truth_without_replacement():
    c = finite_population_factor(M, 100, False)
    q = (2.5 + 40.0 * c / M)[:, None] + np.outer(1.0 / M, [-1.0, 0.0, 1.0])  # symmetric noise: means on the model
    fit = fit_noise_model(q, M, pool_size=100, replacement=False, n_boot=0, rng=np.random.default_rng(0))
    assert fit.grad_sq_norm.value == pytest.approx(2.5, rel=1e-12)
    assert fit.trace_cov.value == pytest.approx(40.0, rel=1e-12)
    assert fit.b_noise.value == pytest.approx(16.0, rel=1e-12)
    assert fit.chi2 == pytest.approx(0.0, abs=1e-18)


def test_wls_line_matches_lstsq_reference():
    rng = np.random.default_rng(1)
    x, y, w = rng.random(9), rng.random(9), rng.random(9) + 0.1
    a, b = wls_line(x, y, w)
    sw = np.sqrt(w)
    ref = np.linalg.lstsq(np.stack([sw, sw * x], 1), sw * y, rcond=None)[0]
    np.testing.assert_allclose([a, b], ref, rtol=1e-12)


def test_simulated_pool_follows_the_model_within_sampling_error():
    """The synthetic pool is exact: mean over many trials of ‖g_B‖² matches ‖G‖² + c_m tr Σ / m."""
    pool = make_pool(1.0, 16.0, 256, 6, np.random.default_rng(2))
    np.testing.assert_allclose(np.sum(pool.mean(0) ** 2), 1.0, rtol=1e-12)
    np.testing.assert_allclose(np.mean(np.sum((pool - pool.mean(0)) ** 2, 1)), 16.0, rtol=1e-12)
    index = draw_trials(256, 64, 2000, False, seed=0, checkpoint=0)
    q = minibatch_sq_norms(pool, index, M)
    expect = 1.0 + finite_population_factor(M, 256, False) * 16.0 / M
    se = q.std(1, ddof=1) / np.sqrt(q.shape[1])
    assert np.all(np.abs(q.mean(1) - expect) < 4 * se)


def test_lack_of_fit_detects_a_wrong_model():
    rng = np.random.default_rng(3)
    q = (1.0 + 16.0 / M + 30.0 / M**2)[:, None] * (1 + 0.05 * rng.standard_normal((M.size, 60)))
    fit = fit_noise_model(q, M, n_boot=499, rng=np.random.default_rng(4))
    assert fit.p_value < 0.01


def test_intervals_cover_the_truth_in_95_percent_of_200_seeds():
    """Coverage of ‖G‖², tr Σ and B_noise (bootstrap over 200 trials, BCa, 999 resamples) over 200 seeds.

    Each seed builds a new exact pool (‖G‖² = 1, tr Σ = 16, n = 512) and draws 200 trials of N = 64 without
    replacement; the lack-of-fit p-value must be uniform enough that p < 0.05 happens in 2-9% of seeds.
    """
    hits, lof, n_rep = np.zeros(3), 0, 200
    for r in range(n_rep):
        fit = noise_model_replicate(np.random.SeedSequence([2024, r]))
        assert fit.grad_sq_norm.contains(fit.grad_sq_norm.value) and fit.b_noise.contains(fit.b_noise.value)
        hits += [fit.grad_sq_norm.contains(1.0), fit.trace_cov.contains(16.0), fit.b_noise.contains(16.0)]
        lof += fit.p_value < 0.05
    coverage = hits / n_rep
    # [0.92, 0.98] over 200 seeds: a calibrated 95% interval passes with probability 0.967 each (binomial); true
    # coverage 0.90 passes with probability 0.21, 0.85 with 0.002: gross miscalibration only.
    assert np.all((coverage >= 0.92) & (coverage <= 0.98)), coverage
    assert 0.02 <= lof / n_rep <= 0.09


def test_too_few_trials_give_no_interval_and_say_so():
    q = (1.0 + 16.0 / M)[:, None] * np.array([[0.9, 1.0, 1.1]])
    fit = fit_noise_model(q, M, n_boot=99, rng=np.random.default_rng(0))
    assert not fit.grad_sq_norm.has_interval and np.isnan(fit.b_noise.low)
    assert "3 trial" in fit.grad_sq_norm.note


def test_interval_never_narrower_than_the_float_resolution_when_budget_is_the_pool():
    """Issue 15 item 7: with budget = pool every trial draws the whole pool, so m = 1 and m = N have zero variance
    across trials and the bootstrap interval of ‖G‖² collapsed below float32 rounding, excluding the truth."""
    from gradlab.analysis.probe_fits import fit_checkpoint, float_resolution
    from gradlab.synthetic import draw_trials, make_pool, minibatch_sq_norms

    m = np.array([1, 2, 4, 8, 16, 32, 64])
    pool = make_pool(1.0, 16.0, 64, 6, np.random.default_rng(0)).astype(np.float32)
    index = draw_trials(64, 64, 40, False, seed=1, checkpoint=0)
    q = minibatch_sq_norms(pool, index, m).astype(np.float64)
    truth = float(np.sum(pool.astype(np.float64).mean(0) ** 2))  # the pool's ‖G‖², float64
    kw = dict(pool_size=64, replacement=False, n_boot=499, seed=0)
    raw = fit_checkpoint("c", 0, m, np.sqrt(q), q, **kw).noise_model.grad_sq_norm
    assert not raw.contains(truth) and raw.high - raw.low < 1e-7 * truth  # the collapse below float32 rounding
    res = float_resolution("float32", 64)
    fit = fit_checkpoint("c", 0, m, np.sqrt(q), q, resolution=res, **kw).noise_model.grad_sq_norm
    assert fit.contains(truth) and fit.high - fit.low >= 2 * res * fit.value * (1 - 1e-12)
    assert "resolution" in fit.note
