"""β of ‖·‖ ∝ m^β, the √m range and the crossover: analytic, reference, pure noise, coverage."""

from __future__ import annotations

import numpy as np
import pytest

from gradlab.analysis.power_law import fit_power_law, power_law_statistic
from gradlab.synthetic import draw_trials, make_pool, minibatch_sums

M = np.array([1, 2, 4, 8, 16, 32, 64])


def test_exact_power_law_analytic():
    x = (3.0 * M**0.7)[:, None] * np.array([[0.8, 1.0, 1.2]])
    fit = fit_power_law(x, M, n_boot=0, rng=np.random.default_rng(0))
    assert fit.beta.value == pytest.approx(0.7, abs=1e-12)
    assert fit.amplitude == pytest.approx(3.0, rel=1e-12)
    np.testing.assert_allclose([e.value for e in fit.local_slope], 0.7, atol=1e-12)


def test_crossover_of_two_regime_law_is_a_over_b():
    mu2 = 5.0 * M + 0.25 * M**2  # crossover m = 20
    x = mu2[:, None] * np.array([[0.9, 1.0, 1.1]])
    fit = fit_power_law(x, M, kind="rms", n_boot=0, rng=np.random.default_rng(0))
    assert fit.crossover.value == pytest.approx(20.0, rel=1e-10)


def test_beta_matches_weighted_polyfit_reference():
    rng = np.random.default_rng(5)
    x = (M**0.6)[:, None] * np.exp(0.1 * rng.standard_normal((M.size, 30)))
    mean, var = x.mean(1), x.var(1, ddof=1) / 30
    ref = np.polyfit(np.log(M), np.log(mean), 1, w=mean / np.sqrt(var))[0]  # polyfit weights are 1/σ
    assert power_law_statistic(x, M, "mean")[0] == pytest.approx(ref, rel=1e-10)


def _pure_noise_rms(seed: int, trials: int) -> np.ndarray:
    """Per-trial mean ‖s_B‖² with G = 0 and draws with replacement: E‖s_B‖² = m tr Σ exactly."""
    pool = make_pool(0.0, 10.0, 400, 6, np.random.default_rng(np.random.SeedSequence([seed, 1])))
    index = draw_trials(400, 64, trials, True, seed=seed, checkpoint=0)
    return np.stack([np.mean(np.sum(minibatch_sums(pool, index, m) ** 2, -1), -1) for m in M])


def test_pure_noise_gives_beta_one_half_within_interval():
    fit = fit_power_law(_pure_noise_rms(0, 60), M, kind="rms", quantity="minibatch_sum_rms", n_boot=999,
                        rng=np.random.default_rng(1))
    assert fit.beta.contains(0.5) and fit.beta.contains(fit.beta.value)
    assert fit.p_half > 0.05
    assert fit.sqrt_max_batch_size == 64  # √m holds over the whole grid


def test_pure_noise_beta_interval_coverage_over_200_seeds():
    hits = 0
    for r in range(200):
        fit = fit_power_law(_pure_noise_rms(100 + r, 80), M, kind="rms", n_boot=999,
                            rng=np.random.default_rng(np.random.SeedSequence([7, r])))
        hits += fit.beta.contains(0.5)
    # [0.92, 0.98] over 200 seeds: a calibrated 95% interval passes with probability 0.967 (binomial); one with
    # true coverage 0.90 passes with probability 0.21, 0.85 with 0.002 -- this test catches gross miscalibration
    # only (the BCa bootstrap costs ~0.1 s a seed; more seeds would not fit the suite's budget).
    assert 0.92 <= hits / 200 <= 0.98


def test_crossover_recovers_b_noise_with_replacement():
    pool = make_pool(1.0, 16.0, 400, 6, np.random.default_rng(9))
    index = draw_trials(400, 64, 80, True, seed=4, checkpoint=0)
    r = np.stack([np.mean(np.sum(minibatch_sums(pool, index, m) ** 2, -1), -1) for m in M])
    fit = fit_power_law(r, M, kind="rms", n_boot=999, rng=np.random.default_rng(2))
    assert fit.crossover.contains(16.0)
    assert fit.beta.low > 0.5  # m² term visible: the law is steeper than √m over the grid


def test_crossover_without_replacement_is_b_noise_exactly():
    """Exact E‖s_B‖² = m²‖G‖² + m·c_m·tr Σ, c_m = (n − m)/(n − 1): the finite-population fit returns B_noise.

    Pins issue 15 item 1: the intercept form μ²/m = a + b·m gave tr Σ·n/(n−1) / (‖G‖² − tr Σ/(n−1)) instead."""
    from gradlab.analysis.noise_model import finite_population_factor
    from gradlab.analysis.probe_fits import fit_checkpoint

    m = np.array([1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024])
    n, g2, tr = 1438, 1.0, 417.0
    c = finite_population_factor(m, n, replacement=False)
    q = (g2 + c * tr / m)[:, None] * np.array([[0.9, 1.0, 1.1]])  # per-trial mean ‖g_B‖², exact on average
    fit = fit_checkpoint("c", 0, m, np.sqrt(q), q, pool_size=n, replacement=False, n_boot=0, seed=0)
    assert fit.power_laws["minibatch_sum_rms"].crossover.value == pytest.approx(tr / g2, rel=1e-9)
    assert fit.noise_model.b_noise.value == pytest.approx(tr / g2, rel=1e-9)


def test_crossover_without_replacement_digits_like_draws_cover_b_noise():
    """Monte Carlo, n = 1438, N = 1024 drawn without replacement (the digits probe's shape), B_noise = 417."""
    mm = np.array([1, 4, 16, 64, 256, 1024])
    pool = make_pool(1.0, 417.0, 1438, 8, np.random.default_rng(11))
    index = draw_trials(1438, 1024, 60, False, seed=12, checkpoint=0)
    r = np.stack([np.mean(np.sum(minibatch_sums(pool, index, m) ** 2, -1), -1) for m in mm])
    from gradlab.analysis.noise_model import finite_population_factor

    fit = fit_power_law(r, mm, kind="rms", n_boot=999, rng=np.random.default_rng(3),
                        factor=finite_population_factor(mm, 1438, False))
    assert fit.crossover.contains(417.0), fit.crossover
    assert fit.crossover.high < 520  # the biased intercept form sat near 600
    biased = fit_power_law(r, mm, kind="rms", n_boot=0, rng=np.random.default_rng(3))
    assert biased.crossover.value > 520
