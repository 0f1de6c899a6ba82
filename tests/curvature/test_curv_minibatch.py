"""Mini-batch λ_max vs m: dense float64 reference per trial, seeds by coordinates, the extrapolation fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from curv_cases import linreg

from gradlab.curvature.hvp import SampleObjective
from gradlab.curvature.lanczos import top_eigenvalues
from gradlab.curvature.minibatch import extrapolate_full_batch, minibatch_lambda_max, noise_factor, trial_rng


def test_minibatch_lambda_max_matches_dense_minibatch_hessians():
    model, x, y, _ = linreg(n=64, d=10, seed=4)
    xn = x.numpy()

    def lambda_of(idx, rng):
        obj = SampleObjective(model, x[torch.from_numpy(idx)], y[torch.from_numpy(idx)], loss="mse")
        return top_eigenvalues(lambda v: obj.hvp(torch.from_numpy(v)).numpy(), obj.n_params, 1, rng=rng,
                               tol=1e-12).eigenvalues[0]

    sizes, trials = [4, 16, 64], 3
    vals = minibatch_lambda_max(lambda_of, 64, sizes, trials, seed=9, checkpoint=2)
    for a, m in enumerate(sizes):
        for t in range(trials):
            idx = np.sort(trial_rng(9, 2, m, t).choice(64, size=m, replace=False))
            h = 2 * xn[idx].T @ xn[idx] / m
            assert vals[a, t] == pytest.approx(np.linalg.eigvalsh(h)[-1], rel=1e-9)
    # m = N is the full-batch Hessian, whatever the trial
    assert np.allclose(vals[2], np.linalg.eigvalsh(2 * xn.T @ xn / 64)[-1], rtol=1e-9)
    # Jensen: λ_max is convex, so small batches overestimate on average
    assert vals[0].mean() > vals[2].mean()


def test_trial_seeds_depend_on_coordinates_not_on_order():
    seen = []

    def lambda_of(idx, rng):
        seen.append(tuple(idx))
        return float(idx.sum())

    a = minibatch_lambda_max(lambda_of, 50, [5, 10], 2, seed=1, checkpoint=0)
    b = minibatch_lambda_max(lambda_of, 50, [10, 5], 2, seed=1, checkpoint=0)
    np.testing.assert_array_equal(a, b[::-1])
    c = minibatch_lambda_max(lambda_of, 50, [5, 10], 2, seed=1, checkpoint=1)
    assert not np.array_equal(a, c)


def test_extrapolation_recovers_exact_linear_model_in_the_noise_factor():
    sizes = [8, 16, 32, 64, 128]
    x = noise_factor(sizes, 512)
    vals = (3.0 + 40.0 * x)[:, None] + np.array([[-0.01, 0.0, 0.01]])  # symmetric spread: means exact
    ext = extrapolate_full_batch(sizes, vals, 512)
    assert ext.lambda_full == pytest.approx(3.0, rel=1e-12)
    assert ext.slope == pytest.approx(40.0, rel=1e-12)
    assert noise_factor([512], 512)[0] == 0.0


def test_extrapolation_stderr_is_calibrated_on_simulated_trials():
    rng = np.random.default_rng(0)
    sizes = [8, 16, 32, 64]
    x = noise_factor(sizes, None)
    # issue 15 item 9: 200 seeds and [0.89, 0.99] passed an interval covering 90% with probability 0.73.  2000
    # seeds and [0.935, 0.965]: a calibrated 95% interval passes with probability 0.997, a 92% one with 0.006.
    hits, n_rep = 0, 2000
    for _ in range(n_rep):
        vals = (2.0 + 5.0 * x)[:, None] + rng.standard_normal((4, 20)) * (0.3 * np.sqrt(x))[:, None]
        ext = extrapolate_full_batch(sizes, vals, None)
        hits += abs(ext.lambda_full - 2.0) <= 1.96 * ext.lambda_full_stderr
    assert 0.935 <= hits / n_rep <= 0.965, hits / n_rep
