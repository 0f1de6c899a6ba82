"""Keskar et al.'s ε-sharpness (Metric 2.1), maximised by L-BFGS-B in the full space or a random subspace.

Keskar, Mudigere, Nocedal, Smelyanskiy & Tang (2017), "On Large-Batch Training for Deep Learning: Generalization
Gap and Sharp Minima", ICLR, §2.2.2.  Full space: with the box

    C_ε = {z ∈ ℝⁿ : |zᵢ| ≤ ε(|θᵢ| + 1)},
    φ(θ, ε) = 100 · (max_{z ∈ C_ε} L(θ + z) − L(θ)) / (1 + L(θ))      (in percent).

Random subspace (Keskar's second variant): z = A y with A ∈ ℝ^{n×p} of i.i.d. N(0, 1) entries drawn from the
unit's generator, and the box is applied to y with Keskar's pseudo-inverse bounds

    |yⱼ| ≤ ε(|(A⁺θ)ⱼ| + 1),    j = 1..p,        A⁺θ = argmin_y ‖A y − θ‖ (least squares).

The maximum is sought by ``scipy.optimize.minimize(method="L-BFGS-B")`` on −L with these bounds, for
``maxiter`` iterations (Keskar used a few; default 10), with the gradient ∇L (or Aᵀ∇L) supplied.  Keskar do not
state the start; we start at the maximiser of the first-order model over the box, y₀ = sign(g)·h (g the gradient
in the search space at z = 0, h the half-widths), because 10 L-BFGS-B iterations from z = 0 can end *below* that
corner on a real network (a regression test pins it); L-BFGS-B is monotone, so φ is never below the first-order
corner.  Both tolerances are 0 so that a nearly flat start does not stop the search at once.  L-BFGS-B finds a
local maximiser, so φ is a lower bound on the true box maximum; for a convex quadratic with every θᵢ ≠ 0 the
result is the maximising corner (tested).  The subspace costs n·p·8 bytes for A.

Example (L = ½ Σ dᵢθᵢ² is maximised at the corner zᵢ = sign(θᵢ)·ε(|θᵢ|+1))::

    >>> import numpy as np
    >>> d, th = np.array([1.0, 4.0]), np.array([0.5, -1.0])
    >>> r = eps_sharpness(lambda t: (0.5 * float(d @ t**2), d * t), th, 1e-3, rng=np.random.default_rng(0))
    >>> zmax = np.sign(th) * 1e-3 * (np.abs(th) + 1)
    >>> l0, l1 = 0.5 * d @ th**2, 0.5 * d @ (th + zmax)**2
    >>> bool(np.isclose(r.phi, 100 * (l1 - l0) / (1 + l0)))
    True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

from gradlab.errors import UsageError

ValueAndGrad = Callable[[np.ndarray], tuple[float, np.ndarray]]


@dataclass(frozen=True)
class EpsSharpness:
    """One ε-sharpness measurement: φ in percent, L(θ), the best L(θ + z) found, L-BFGS-B's work."""

    eps: float
    space: str  # "full" or "subspace"
    subspace_dim: int  # p; n for the full space
    phi: float
    loss: float
    loss_max: float
    n_evals: int
    n_iter: int
    z_norm: float  # ‖z*‖ of the maximiser found


def box_bounds(center: np.ndarray, eps: float) -> np.ndarray:
    """Half-widths ε(|cᵢ| + 1) of Keskar's box around ``center`` (θ in the full space, A⁺θ in a subspace)."""
    return eps * (np.abs(center) + 1.0)


def validate_eps(eps: float, subspace_dim: int | None, n_params: int) -> None:
    """ε > 0 and finite, and 1 ≤ p ≤ n; otherwise a ``UsageError`` naming the fix."""
    if not np.isfinite(eps) or eps <= 0:
        raise UsageError(f"epsilon must be a positive number (Keskar used 1e-3 and 5e-4), got {eps}")
    if subspace_dim is not None and not 1 <= subspace_dim <= n_params:
        raise UsageError(f"subspace dimension {subspace_dim} must be between 1 and the parameter count {n_params}; "
                         "lower --subspace-dim")


def random_basis(n: int, p: int, rng: np.random.Generator) -> np.ndarray:
    """A ∈ ℝ^{n×p} with i.i.d. N(0, 1) entries (Keskar: 'randomly generated columns')."""
    return rng.standard_normal((n, p))


def eps_sharpness(
    value_and_grad: ValueAndGrad,
    theta: np.ndarray,
    eps: float,
    *,
    subspace_dim: int | None = None,
    basis: np.ndarray | None = None,
    rng: np.random.Generator,
    maxiter: int = 10,
) -> EpsSharpness:
    """φ(θ, ε) = 100·(max_{z∈C_ε} L(θ+z) − L(θ))/(1 + L(θ)) (Keskar et al. 2017, Metric 2.1).

    ``value_and_grad(θ') -> (L(θ'), ∇L(θ'))`` in float64.  ``subspace_dim = p`` (or an explicit ``basis`` A)
    maximises over z = A y with |yⱼ| ≤ ε(|(A⁺θ)ⱼ| + 1); otherwise over the full box.
    """
    theta = np.asarray(theta, dtype=np.float64).reshape(-1)
    n = theta.size
    if basis is None and subspace_dim is not None:
        validate_eps(eps, subspace_dim, n)
        basis = random_basis(n, subspace_dim, rng)
    else:
        validate_eps(eps, None if basis is None else basis.shape[1], n)
    loss0, grad0 = value_and_grad(theta)
    if basis is None:
        half = box_bounds(theta, eps)

        def to_z(y: np.ndarray) -> np.ndarray:
            return y

        def back(g: np.ndarray) -> np.ndarray:
            return g
    else:
        center = np.linalg.lstsq(basis, theta, rcond=None)[0]
        half = box_bounds(center, eps)

        def to_z(y: np.ndarray) -> np.ndarray:
            return basis @ y

        def back(g: np.ndarray) -> np.ndarray:
            return basis.T @ g

    def neg(y: np.ndarray) -> tuple[float, np.ndarray]:
        val, grad = value_and_grad(theta + to_z(y))
        return -float(val), -back(np.asarray(grad, dtype=np.float64))

    start = np.sign(back(np.asarray(grad0, dtype=np.float64))) * half
    res = minimize(neg, start, jac=True, method="L-BFGS-B", bounds=list(zip(-half, half)),
                   options={"maxiter": int(maxiter), "ftol": 0.0, "gtol": 0.0})
    loss_max = max(-float(res.fun), float(loss0))
    phi = 100.0 * (loss_max - loss0) / (1.0 + loss0)
    space = "full" if basis is None else "subspace"
    return EpsSharpness(float(eps), space, int(half.size), float(phi), float(loss0), loss_max, int(res.nfev),
                        int(res.nit), float(np.linalg.norm(to_z(res.x))))
