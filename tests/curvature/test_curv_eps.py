"""Keskar's ε-sharpness: closed forms for a diagonal quadratic (full space and subspace), a real MLP, bad input."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from curv_cases import tiny_mlp
from torch import nn

from gradlab.curvature.eps_sharpness import eps_sharpness
from gradlab.curvature.hvp import SampleObjective
from gradlab.errors import UsageError


def _quadratic(d: np.ndarray):
    return lambda t: (0.5 * float(d @ t**2), d * t)


def _phi(loss0: float, loss_max: float) -> float:
    return 100 * (loss_max - loss0) / (1 + loss0)


@pytest.mark.parametrize("eps", [1e-3, 5e-4, 0.05])
def test_full_space_quadratic_reaches_the_closed_form_corner(eps):
    rng = np.random.default_rng(0)
    d = rng.uniform(0.5, 5.0, 12)
    theta = rng.choice([-1, 1], 12) * rng.uniform(0.1, 2.0, 12)
    # L = ½ Σ dᵢ θᵢ², convex and separable: the max over the box is at zᵢ = sign(θᵢ)·ε(|θᵢ| + 1)
    z = np.sign(theta) * eps * (np.abs(theta) + 1)
    loss0, loss_max = 0.5 * d @ theta**2, 0.5 * d @ (theta + z) ** 2
    res = eps_sharpness(_quadratic(d), theta, eps, rng=np.random.default_rng(1))
    assert res.phi == pytest.approx(_phi(loss0, loss_max), rel=1e-10)
    assert res.loss == pytest.approx(loss0, rel=1e-14) and res.space == "full" and res.subspace_dim == 12
    assert res.z_norm == pytest.approx(np.linalg.norm(z), rel=1e-10)


@pytest.mark.parametrize("maxiter, reaches", [(10, True), (0, False)])
def test_full_space_mixed_curvature_needs_the_optimiser_to_reach_the_closed_form(maxiter, reaches):
    """Issue 15 item 9: the convex separable quadratic's answer is the optimiser's own start (the first-order
    corner), so that test passes with ``maxiter=0``.  Here half the coordinates are concave with their peak
    inside the box: the closed-form max is the far corner on the convex coordinates and the peak cᵢ on the
    concave ones, away from the start.  10 iterations reach it; 0 iterations (the start) fall short."""
    rng = np.random.default_rng(4)
    n = 12
    d = rng.uniform(0.5, 5.0, n)
    convex = np.arange(n) % 2 == 0
    theta = rng.choice([-1, 1], n) * rng.uniform(0.1, 2.0, n)
    eps = 0.05
    half = eps * (np.abs(theta) + 1)
    c = theta + rng.uniform(-0.5, 0.5, n) * half  # concave peaks inside the box

    def f(t):
        return (float(np.where(convex, 0.5 * d * t**2, -0.5 * d * (t - c) ** 2).sum()),
                np.where(convex, d * t, -d * (t - c)))

    z = np.where(convex, np.sign(theta) * half, c - theta)
    loss0, loss_max = f(theta)[0], f(theta + z)[0]
    res = eps_sharpness(f, theta, eps, rng=np.random.default_rng(1), maxiter=maxiter)
    if reaches:
        assert res.phi == pytest.approx(_phi(loss0, loss_max), rel=1e-10)
        assert res.z_norm == pytest.approx(np.linalg.norm(z), rel=1e-8)
    else:
        assert res.loss_max < loss_max - 1e-3


def test_subspace_of_dimension_one_reaches_the_better_endpoint_with_pseudo_inverse_bounds():
    rng = np.random.default_rng(2)
    d = rng.uniform(0.5, 5.0, 20)
    theta = rng.standard_normal(20)
    a = rng.standard_normal((20, 1))
    eps = 1e-2
    h = eps * (abs(float((np.linalg.pinv(a) @ theta)[0])) + 1)  # Keskar: |y| <= ε(|(A⁺θ)| + 1)
    ends = [0.5 * d @ (theta + a[:, 0] * y) ** 2 for y in (-h, h)]
    res = eps_sharpness(_quadratic(d), theta, eps, basis=a, rng=rng)
    assert res.phi == pytest.approx(_phi(0.5 * d @ theta**2, max(ends)), rel=1e-10)
    assert res.space == "subspace" and res.subspace_dim == 1


def test_subspace_maximum_equals_the_best_vertex_of_the_box():
    # a convex function attains its max over a box at a vertex: enumerate all 2^p vertices
    rng = np.random.default_rng(3)
    d = rng.uniform(0.5, 5.0, 40)
    theta = rng.standard_normal(40)
    a = rng.standard_normal((40, 3))
    eps = 1e-3
    half = eps * (np.abs(np.linalg.pinv(a) @ theta) + 1)
    best = max(0.5 * d @ (theta + a @ (np.array(s) * half)) ** 2 for s in itertools.product((-1, 1), repeat=3))
    res = eps_sharpness(_quadratic(d), theta, eps, basis=a, rng=rng)
    assert res.phi == pytest.approx(_phi(0.5 * d @ theta**2, best), rel=1e-8)


def test_lbfgsb_from_zero_ended_below_first_order_corner_on_mlp(digits):
    """Regression: 10 L-BFGS-B iterations started at z = 0 ended below the gradient-sign corner of the box."""
    model = tiny_mlp(widths=(6,), seed=2)
    x, y = digits.train.x[:64], digits.train.y[:64]
    obj = SampleObjective(model, x, y, dtype=torch.float64)
    theta = obj.theta0.numpy()

    def vg(t):
        val, g = obj.value_and_grad(torch.from_numpy(t))
        return val, g.numpy()

    eps = 1e-3
    res = eps_sharpness(vg, theta, eps, rng=np.random.default_rng(0), maxiter=10)
    # brute force: the first-order corner sign(∇L)·ε(|θ|+1), evaluated by a plain float64 forward pass
    g = vg(theta)[1]
    corner = theta + np.sign(g) * eps * (np.abs(theta) + 1)
    net = tiny_mlp(widths=(6,), seed=2).double()
    nn.utils.vector_to_parameters(torch.from_numpy(corner), net.parameters())
    with torch.no_grad():
        corner_loss = float(nn.functional.cross_entropy(net(x.double()), y))
    assert res.loss_max >= corner_loss - 1e-12
    # ... and must improve on its own start (maxiter=0 ends there, and passed the line above: issue 15 item 9)
    start = eps_sharpness(vg, theta, eps, rng=np.random.default_rng(0), maxiter=0)
    assert start.loss_max >= corner_loss - 1e-12
    assert res.loss_max > start.loss_max + 1e-6
    assert res.phi == pytest.approx(_phi(res.loss, res.loss_max), rel=1e-12)
    assert res.phi > 0 and res.z_norm <= np.linalg.norm(eps * (np.abs(theta) + 1)) * (1 + 1e-12)


@pytest.mark.parametrize("eps", [0.0, -1e-3, float("nan"), float("inf")])
def test_non_positive_or_non_finite_eps_is_a_usage_error(eps):
    with pytest.raises(UsageError, match="epsilon must be a positive number"):
        eps_sharpness(_quadratic(np.ones(3)), np.ones(3), eps, rng=np.random.default_rng(0))


def test_subspace_larger_than_parameter_count_is_a_usage_error():
    with pytest.raises(UsageError, match="subspace dimension 4 must be between 1 and the parameter count 3"):
        eps_sharpness(_quadratic(np.ones(3)), np.ones(3), 1e-3, subspace_dim=4, rng=np.random.default_rng(0))
