"""Hutchinson's trace: exact on a diagonal Hessian, unbiased against dense float64, 95% intervals cover ~95%."""

from __future__ import annotations

import numpy as np
import torch
from curv_cases import dense_hessian, linreg, tiny_mlp
from scipy import stats

from gradlab.curvature.hutchinson import hutchinson_trace
from gradlab.curvature.hvp import SampleObjective


def test_trace_is_exact_when_the_hessian_is_diagonal():
    # orthogonal design: H = 2XᵀX/n is diagonal, so every Rademacher sample vᵀHv equals tr H
    model, x, y, h = linreg(n=30, d=8, orthogonal=True)
    obj = SampleObjective(model, x, y, loss="mse")
    est = hutchinson_trace(lambda v: obj.hvp(torch.from_numpy(v)).numpy(), 8, 5, rng=np.random.default_rng(0))
    assert abs(est.trace - np.trace(h)) < 1e-8 * np.trace(h)
    assert est.stderr < 1e-8 * np.trace(h)


def test_trace_of_mlp_hessian_agrees_with_dense_within_its_interval(digits):
    model = tiny_mlp(widths=(4,), seed=1)
    x, y = digits.train.x[:50], digits.train.y[:50]
    exact = float(np.trace(dense_hessian(model, x, y)))
    obj = SampleObjective(model, x, y)
    est = hutchinson_trace(lambda v: obj.hvp(torch.from_numpy(v)).numpy(), obj.n_params, 40,
                           rng=np.random.default_rng(2))
    lo, hi = est.interval(0.999)
    assert lo <= exact <= hi
    assert est.n_probes == 40 and obj.hvp_count == 40


def test_95_percent_intervals_cover_the_true_trace_in_about_95_percent_of_seeds():
    rng = np.random.default_rng(0)
    b = rng.standard_normal((24, 24))
    a = b @ b.T / 24 + np.diag(rng.uniform(0, 2, 24))
    truth = np.trace(a)
    n_seeds = 300
    covered = 0
    for s in range(n_seeds):
        est = hutchinson_trace(lambda v: a @ v, 24, 30, rng=np.random.default_rng(np.random.SeedSequence([7, s])))
        lo, hi = est.interval(0.95)
        covered += lo <= truth <= hi
    # binomial(300, 0.95): 99.9% of outcomes lie in [272, 294]
    lo_ok, hi_ok = stats.binom.ppf([0.0005, 0.9995], n_seeds, 0.95)
    assert lo_ok <= covered <= hi_ok, covered
