"""The analytic test case: noiseless linear regression, where S(m), E(m) and B_crit are known in closed form.

Model.  Inputs x ~ N(0, I_d), targets y = xᵀw*, per-example loss ℓ = ½(xᵀθ)² with θ = w − w*; the held-out
(population) loss is L(θ) = ½‖θ‖².  Per-example gradients gᵢ = xᵢxᵢᵀθ have G = θ and (Gaussian fourth moments,
E[xxᵀxxᵀ] = (d + 2)I) tr Σ = (d + 1)‖θ‖², so the noise scale B_noise = tr Σ/‖G‖² = d + 1 =: B is the same at every
θ.  One SGD step at batch size m, θ' = (I − ηA)θ with A = (1/m)Σᵢ xᵢxᵢᵀ, has (isotropy)

    E[‖θ'‖² | θ] = q(η, m) ‖θ‖²,   q(η, m) = 1 − 2η + η²(1 + B/m),

so E L_k = L₀ q^k exactly, and in distribution ‖θ'‖²/‖θ‖² = (1 − ηu/m)² + η²uv/m² with u ~ χ²_m and
v ~ χ²_{d−1} independent (the first coordinate along θ and the rest), which is how :func:`simulate` draws it.

Learning-rate rule.  The per-step improvement law of McCandlish et al. (2018) is ΔL/L = ΔL_max/(1 + B/m); the rule
η(m) = the smaller root of q(η, m) = exp(−c/(1 + B/m)) makes it hold exactly in log form, and then

    E L after k steps = L₀ exp(−c k /(1 + B/m)),
    S(m) = (1 + B/m) · log(L₀/L*)/c = S_min (1 + B/m),   E(m) = m S(m) = E_min (1 + m/B),
    S_min = log(L₀/L*)/c,   E_min = B · S_min,   B_crit = E_min/S_min = B = d + 1 = B_noise,

the steps–examples hyperbola (S/S_min − 1)(E/E_min − 1) = 1 exactly.  (The rule is built for the law, so this
is a test of the estimators, not evidence for the law.)  After a budget of N examples (N/m steps) the expected loss
is L₀ exp(−cN/(m + B)), so the branching ratio is r(m) = exp(cN(1/(m₀ + B) − 1/(m + B))) − 1 and the continuous
crossing r(m*) = ε is 1/(m* + B) = 1/(m₀ + B) − log(1 + ε)/(cN).  On a grid the branching estimator interpolates
between grid points, so its estimand is :func:`branching_truth` (the same interpolation of the exact r).
"""

from __future__ import annotations

import math

import numpy as np


def lr_rule(m: np.ndarray | float, B: float, c: float) -> np.ndarray:
    """η(m): the smaller root of 1 − 2η + η²(1 + B/m) = exp(−c/(1 + B/m)) (needs 0 < c < 1)."""
    k = 1 + B / np.asarray(m, dtype=np.float64)
    q = np.exp(-c / k)
    return (1 - np.sqrt(1 - k * (1 - q))) / k


def expected_loss(steps: np.ndarray, m: float, B: float, c: float, L0: float = 1.0) -> np.ndarray:
    """E L after ``steps`` steps at batch size m under :func:`lr_rule`."""
    return L0 * np.exp(-c * np.asarray(steps, dtype=np.float64) / (1 + B / m))


def tradeoff_truth(B: float, c: float, L0: float, target: float) -> tuple[float, float, float]:
    """(S_min, E_min, B_crit) of the closed form."""
    s_min = math.log(L0 / target) / c
    return s_min, B * s_min, float(B)


def branching_truth(batch_sizes: np.ndarray, B: float, c: float, budget: float, epsilon: float) -> float:
    """The branching estimator applied to the exact expected losses after ``budget`` examples."""
    from gradlab.cbs.estimators import branching_crossing

    bs = np.asarray(batch_sizes, dtype=np.float64)
    return float(branching_crossing(np.exp(-c * budget / (bs + B)), bs, epsilon))


def simulate(batch_sizes: np.ndarray, steps: np.ndarray, *, d: int, c: float, seeds: int,
             rng: np.random.Generator, L0: float = 1.0) -> np.ndarray:
    """Per-seed held-out losses ½‖θ_k‖² (seeds, M, J) at eval ``steps`` (M, J) (non-decreasing in j), exact draws."""
    B = d + 1.0
    bs = np.asarray(batch_sizes)
    out = np.empty((seeds, bs.size, steps.shape[1]))
    for i, m in enumerate(bs):
        eta = float(lr_rule(m, B, c))
        k_max = int(steps[i].max())
        u = rng.chisquare(m, size=(seeds, k_max))
        v = rng.chisquare(d - 1, size=(seeds, k_max)) if d > 1 else np.zeros((seeds, k_max))
        log_ratio = np.log((1 - eta * u / m) ** 2 + eta**2 * u * v / m**2)
        cum = np.concatenate([np.zeros((seeds, 1)), np.cumsum(log_ratio, axis=1)], axis=1)
        out[:, i] = L0 * np.exp(cum[:, steps[i]])
    return out
