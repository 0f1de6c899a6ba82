"""The one weighted least-squares helper (gradlab.analysis.wls) against numpy's lstsq, and its users' factor."""

from __future__ import annotations

import numpy as np
import pytest

from gradlab.analysis.noise_model import finite_population_factor
from gradlab.analysis.wls import wls, wls_covariance
from gradlab.curvature.minibatch import noise_factor


def _reference(x0: np.ndarray, x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    design = np.stack([x0, x], 1)
    sw = np.sqrt(w)
    coef = np.linalg.lstsq(design * sw[:, None], y * sw, rcond=None)[0]
    return coef, np.linalg.inv(design.T @ (design * w[:, None]))


@pytest.mark.parametrize("intercept", [True, False])
def test_wls_and_its_covariance_match_lstsq_in_float64(intercept: bool) -> None:
    rng = np.random.default_rng(0)
    x0, x, y, w = rng.random((4, 5, 7)) + 0.1
    if intercept:
        x0 = np.ones_like(x0)
    a, b = wls(x, y, w, x0=None if intercept else x0)  # five independent fits along the leading axis
    cov = wls_covariance(x, w, x0=None if intercept else x0)
    assert a.shape == b.shape == (5,) and cov.shape == (5, 2, 2)
    for i in range(5):
        coef, ref_cov = _reference(x0[i], x[i], y[i], w[i])
        np.testing.assert_allclose([a[i], b[i]], coef, rtol=1e-10)
        np.testing.assert_allclose(cov[i], ref_cov, rtol=1e-10)


def test_wls_covariance_is_the_sampling_covariance_of_the_fit() -> None:
    """With w = 1/σ², (XᵀWX)⁻¹ is Cov(a, b): checked against 4000 simulated data sets."""
    rng = np.random.default_rng(1)
    x = np.array([0.0, 0.5, 1.0, 2.0, 3.0])
    sigma = np.array([0.1, 0.2, 0.1, 0.3, 0.2])
    y = 1.0 + 2.0 * x + sigma * rng.standard_normal((4000, x.size))
    a, b = wls(x, y, 1.0 / sigma**2)
    np.testing.assert_allclose(np.cov(np.stack([a, b])), wls_covariance(x, 1.0 / sigma**2), rtol=0.1)


def test_lambda_extrapolation_uses_the_one_finite_population_factor() -> None:
    m = np.array([1.0, 8, 64, 512])
    np.testing.assert_array_equal(noise_factor(m, 512), finite_population_factor(m, 512, replacement=False) / m)
    np.testing.assert_array_equal(noise_factor(m, None), 1.0 / m)
    with pytest.raises(ValueError, match="pool_size"):
        noise_factor(m, 1)
