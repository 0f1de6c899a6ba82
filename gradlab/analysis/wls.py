"""Weighted least squares with two coefficients, y ≈ a·x₀ + b·x, vectorised over leading axes (bootstrap batches).

Minimising Σᵢ wᵢ (yᵢ − a·x₀ᵢ − b·xᵢ)² gives the normal equations (XᵀWX)(a, b)ᵀ = XᵀWy with X = [x₀, x]::

    [ s₀₀  s₀ₓ ] [a]   [s₀ᵧ]        s₀₀ = Σ w x₀²,  s₀ₓ = Σ w x₀ x,  sₓₓ = Σ w x²,
    [ s₀ₓ  sₓₓ ] [b] = [sₓᵧ],       s₀ᵧ = Σ w x₀ y, sₓᵧ = Σ w x y,

so b = (s₀₀ sₓᵧ − s₀ₓ s₀ᵧ)/det, a = (s₀ᵧ − b s₀ₓ)/s₀₀, det = s₀₀ sₓₓ − s₀ₓ², and Cov(a, b) = (XᵀWX)⁻¹ when the
weights are inverse variances (Aitken 1935; Draper & Smith, "Applied Regression Analysis", ch. 9).  x₀ = 1 is the
straight line a + b·x.  Every weighted fit in gradlab goes through :func:`wls`: the noise model, the power law and
its crossover (:mod:`gradlab.analysis.noise_model`, :mod:`gradlab.analysis.power_law`) and the full-batch λ_max
extrapolation (:mod:`gradlab.curvature.minibatch`).

Example (points on y = 1 + 2x are fitted exactly, whatever the weights)::

    >>> import numpy as np
    >>> x = np.array([0.0, 1.0, 2.0, 4.0]); w = np.array([1.0, 2.0, 0.5, 1.0])
    >>> a, b = wls(x, 1 + 2 * x, w)
    >>> round(float(a), 12), round(float(b), 12)
    (1.0, 2.0)
    >>> X = np.stack([np.ones(4), x], 1)
    >>> bool(np.allclose(wls_covariance(x, w), np.linalg.inv(X.T @ (w[:, None] * X))))
    True
"""

from __future__ import annotations

import numpy as np


def _sums(x: np.ndarray, w: np.ndarray, x0: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if x0 is None:
        return w.sum(-1), (w * x).sum(-1), (w * x * x).sum(-1)
    return (w * x0 * x0).sum(-1), (w * x0 * x).sum(-1), (w * x * x).sum(-1)


def wls(x: np.ndarray, y: np.ndarray, w: np.ndarray, *,
        x0: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) of the weighted least-squares fit y ≈ a·x₀ + b·x over the last axis (x₀ = 1 when None: a line).

    Shapes broadcast; leading axes are independent fits.  Formula in the module doc."""
    s00, s0x, sxx = _sums(x, w, x0)
    s0y = (w * y).sum(-1) if x0 is None else (w * x0 * y).sum(-1)
    sxy = (w * x * y).sum(-1)
    det = s00 * sxx - s0x * s0x
    b = (s00 * sxy - s0x * s0y) / det
    a = (s0y - b * s0x) / s00
    return a, b


def wls_covariance(x: np.ndarray, w: np.ndarray, *, x0: np.ndarray | None = None) -> np.ndarray:
    """(XᵀWX)⁻¹, shape (..., 2, 2), rows and columns (a, b): the covariance of :func:`wls`'s (a, b) when w are the
    inverse variances of y (scale it by the reduced χ² otherwise)."""
    s00, s0x, sxx = _sums(x, w, x0)
    det = s00 * sxx - s0x * s0x
    return np.stack([np.stack([sxx, -s0x], -1), np.stack([-s0x, s00], -1)], -2) / np.asarray(det)[..., None, None]
