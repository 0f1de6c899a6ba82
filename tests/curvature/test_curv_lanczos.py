"""Lanczos top-k and power iteration: exact linear regression, dense float64 MLP Hessian, residuals, bad curvature."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from curv_cases import dense_hessian, linreg, tiny_mlp

from gradlab.curvature.hvp import NonFiniteCurvature, SampleObjective
from gradlab.errors import UsageError
from gradlab.curvature.lanczos import lanczos_full_reorth, lanczos_history, power_iteration, top_eigenvalues


def _matvec(obj: SampleObjective):
    return lambda v: obj.hvp(torch.from_numpy(v)).numpy()


@pytest.mark.parametrize("d,k", [(30, 4), (5, 3)])  # Lanczos (ARPACK) and the dense path for tiny operators
def test_linreg_top_k_eigenvalues_are_exact(d, k):
    model, x, y, h = linreg(n=60, d=d, seed=d)
    obj = SampleObjective(model, x, y, loss="mse")
    res = top_eigenvalues(_matvec(obj), obj.n_params, k, rng=np.random.default_rng(0), tol=1e-12)
    exact = np.sort(np.linalg.eigvalsh(h))[::-1][:k]
    np.testing.assert_allclose(res.eigenvalues, exact, rtol=1e-8)
    assert np.all(res.residuals < 1e-7 * exact[0])
    assert res.converged and res.n_hvp_residual == k
    assert res.method == ("dense" if d <= 2 * k + 1 else "lanczos")


def test_mlp_lambda_max_and_top_k_match_dense_eigvalsh(digits):
    model = tiny_mlp(widths=(5,), seed=3)
    x, y = digits.train.x[:80], digits.train.y[:80]
    exact = np.sort(np.linalg.eigvalsh(dense_hessian(model, x, y)))[::-1]
    obj = SampleObjective(model, x, y, chunk_size=32)
    res = top_eigenvalues(_matvec(obj), obj.n_params, 3, rng=np.random.default_rng(1), tol=1e-10)
    np.testing.assert_allclose(res.eigenvalues, exact[:3], rtol=1e-7)
    # each eigenvector is one: the residual bounds the eigenvalue error
    assert np.all(res.residuals < 1e-6 * exact[0])
    assert res.n_hvp == obj.hvp_count - 3 - res.n_hvp_check  # solver + 3 residual HVPs + the miss check
    assert not res.missed_top and not res.restarted and res.check_eigenvalue <= exact[0] + 1e-9


def test_power_iteration_converges_to_lambda_max_with_a_gap():
    a = np.diag(np.r_[10.0, 5.0, np.linspace(0.1, 1.0, 40)])
    res = power_iteration(lambda v: a @ v, a.shape[0], rng=np.random.default_rng(0), tol=1e-12, maxiter=500)
    assert res.eigenvalue == pytest.approx(10.0, rel=1e-10)
    assert res.converged and res.n_hvp == res.history.size
    # the Rayleigh quotient approaches from below (a lower bound at every step)
    assert np.all(res.history <= 10.0 + 1e-12)
    # residuals ‖Av − λv‖: the distance to the nearest eigenvalue is within each (Weyl), they decay like (5/10)^t
    assert res.residuals.shape == res.history.shape
    assert np.all(np.min(np.abs(res.history[:, None] - np.diag(a)[None, :]), axis=1) <= res.residuals + 1e-12)
    assert res.residuals[-1] < 1e-5 < res.residuals[0]
    assert res.residuals[20] / res.residuals[10] == pytest.approx(0.5 ** 10, rel=0.05)


def test_lanczos_reports_largest_algebraic_eigenvalue_when_negative_ones_dominate():
    a = np.diag(np.r_[-20.0, 3.0, np.linspace(-1, 1, 30)])
    res = top_eigenvalues(lambda v: a @ v, a.shape[0], 1, rng=np.random.default_rng(0))
    assert res.eigenvalues[0] == pytest.approx(3.0, rel=1e-9)


def test_non_finite_hvp_raises_non_finite_curvature():
    with pytest.raises(NonFiniteCurvature, match="non-finite curvature"):
        top_eigenvalues(lambda v: v * np.nan, 30, 1, rng=np.random.default_rng(0))


def test_full_reorth_lanczos_matches_linreg_and_certifies_its_residuals():
    model, x, y, h = linreg(n=80, d=40, seed=7)
    obj = SampleObjective(model, x, y, loss="mse")
    res = lanczos_full_reorth(_matvec(obj), obj.n_params, 3, rng=np.random.default_rng(0), tol=1e-10)
    exact = np.sort(np.linalg.eigvalsh(h))[::-1][:3]
    np.testing.assert_allclose(res.eigenvalues, exact, rtol=1e-8)
    true_res = np.linalg.norm(h @ res.eigenvectors - res.eigenvectors * res.eigenvalues, axis=0)
    np.testing.assert_allclose(res.residuals, true_res, rtol=1e-3, atol=1e-12)
    assert res.converged and res.n_hvp + res.n_hvp_check == obj.hvp_count
    hist = lanczos_history(lambda v: h @ v, 40, 12, rng=np.random.default_rng(0))
    assert np.all(np.diff(hist) >= -1e-12) and hist[-1] <= exact[0] + 1e-12  # Ritz values rise to λ_max


@pytest.mark.parametrize("chunk", [50, 17])
def test_cached_graph_hvps_are_bitwise_those_of_recomputation(digits, chunk):
    model = tiny_mlp(widths=(6,), seed=3)
    x, y = digits.train.x[:50], digits.train.y[:50]
    plain = SampleObjective(model, x, y, chunk_size=chunk, cache_graph=False)
    cached = SampleObjective(model, x, y, chunk_size=chunk, cache_graph=True)
    assert SampleObjective(model, x, y, chunk_size=chunk).cache_graph == (chunk >= 50)  # auto: one chunk only
    h = dense_hessian(model, x, y)
    rng = np.random.default_rng(0)
    for _ in range(3):  # reused graph: every call, not only the first
        v = torch.from_numpy(rng.standard_normal(plain.n_params))
        hv = cached.hvp(v)
        assert torch.equal(hv, plain.hvp(v))
        np.testing.assert_allclose(hv.numpy(), h @ v.numpy(), rtol=1e-10, atol=1e-12)
    theta = plain.theta0 + 0.01  # away from theta0 the cache is not used
    v = torch.from_numpy(rng.standard_normal(plain.n_params))
    assert torch.equal(cached.hvp(v, theta), plain.hvp(v, theta))
    with pytest.raises(UsageError, match="cache_graph"):
        SampleObjective(model, x, y, cache_graph="sometimes")


def _rotated(n: int = 202, top: float = 10.0, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return (q * np.r_[top, 5.0, np.linspace(0.1, 1.0, n - 2)]) @ q.T, q[:, 0]


def test_orthogonal_start_misses_lambda_max_with_a_tiny_residual_and_the_check_catches_it():
    """Issue 15 item 6: a start vector orthogonal to the top eigenvector (kept exactly so by a diagonal H) makes
    ARPACK converge to λ₂ = 5 with a residual of 1e-15 -- the residual bounds the distance to *some* eigenvalue.
    The deflated check run finds θ > λ₁ + ‖r₁‖, and the restart from its Ritz vector finds λ_max = 10."""
    n = 202
    a = np.diag(np.r_[10.0, 5.0, np.linspace(0.1, 1.0, n - 2)])
    v0 = np.random.default_rng(0).standard_normal(n)
    v0[0] = 0.0
    blind = top_eigenvalues(lambda v: a @ v, n, 1, rng=np.random.default_rng(1), v0=v0, check_steps=0)
    assert blind.eigenvalues[0] == pytest.approx(5.0, rel=1e-9) and blind.residuals[0] < 1e-9  # the overclaim
    res = top_eigenvalues(lambda v: a @ v, n, 1, rng=np.random.default_rng(1), v0=v0)
    assert res.restarted and not res.missed_top
    assert res.eigenvalues[0] == pytest.approx(10.0, rel=1e-9)
    assert res.check_eigenvalue <= 5.0 + 1e-9  # after the restart the deflated run sees λ₂ at most


def test_nearly_orthogonal_start_fools_the_reorth_certificate_and_the_check_catches_it():
    """Plain Lanczos stopped by its residual certificate (tol 1e-3, the benchmark's "certified" stop) from a start
    vector with a 1e-8 component along the top eigenvector stops at λ₂ = 5; the check restarts it to λ_max = 10."""
    a, top = _rotated()
    rng = np.random.default_rng(4)
    v0 = rng.standard_normal(a.shape[0])
    v0 -= top * (top @ v0)
    v0 += 1e-8 * np.linalg.norm(v0) * top
    blind = lanczos_full_reorth(lambda v: a @ v, a.shape[0], 1, rng=np.random.default_rng(1), v0=v0, check_steps=0)
    assert blind.converged and blind.eigenvalues[0] == pytest.approx(5.0, rel=1e-3)
    assert blind.residuals[0] <= 1e-3 * blind.eigenvalues[0]  # "certified", yet 50% off λ_max
    res = lanczos_full_reorth(lambda v: a @ v, a.shape[0], 1, rng=np.random.default_rng(1), v0=v0)
    assert res.restarted and not res.missed_top
    assert res.eigenvalues[0] == pytest.approx(10.0, rel=1e-3)


def test_check_gives_no_false_alarm_on_random_starts():
    a, _ = _rotated(top=5.2)
    for s in range(10):
        res = top_eigenvalues(lambda v: a @ v, a.shape[0], 2, rng=np.random.default_rng(s))
        assert not res.restarted and not res.missed_top and res.check_eigenvalue <= 5.0 + 1e-9
        np.testing.assert_allclose(res.eigenvalues, [5.2, 5.0], rtol=1e-9)
