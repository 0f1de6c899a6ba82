"""λ_max and the top-k Hessian eigenvalues by Lanczos on Hessian-vector products; power iteration for comparison.

Lanczos (implicitly restarted, ARPACK via ``scipy.sparse.linalg.eigsh(which="LA")``) works on any symmetric
operator given as a matvec ``v ↦ H v``.  It returns the k largest *algebraic* eigenvalues λ₁ ≥ … ≥ λ_k, and for
each the residual ‖H vⱼ − λⱼ vⱼ‖ (one extra HVP per eigenpair), which bounds the eigenvalue error:
some eigenvalue of H lies within ‖r‖ of λⱼ (Parlett, *The Symmetric Eigenvalue Problem*, §4.5).  ARPACK stops
when every Ritz residual estimate is ≤ tol·|λⱼ|, so the relative error of λ₁ is at most ``tol``.

Power iteration v ← Hv/‖Hv‖ with the Rayleigh quotient λ = vᵀHv converges to the eigenvalue of largest
*magnitude* at the rate (λ₂/λ₁)^{2t}; its usual stop, |λ_t − λ_{t−1}| < tol·|λ_t| (PyHessian's rule), often
fires while λ_t is still several tol low.  On this machine's 1.9M-parameter MLP Lanczos needed 17–21 HVPs where
power iteration needed 32–151 to reach a true 1e-3 (``benchmarks/bench_lanczos.py``).

Example (a dense symmetric matrix)::

    >>> import numpy as np
    >>> a = np.diag([5.0, 3.0, 1.0] + [0.1] * 30)
    >>> res = top_eigenvalues(lambda v: a @ v, 33, k=2, rng=np.random.default_rng(0))
    >>> np.round(res.eigenvalues, 8).tolist()
    [5.0, 3.0]
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

from gradlab.curvature.hvp import NonFiniteCurvature

log = logging.getLogger(__name__)

Matvec = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class EigenResult:
    """Top-k eigenpairs: ``eigenvalues`` descending, ``residuals`` ‖Hv − λv‖, HVPs used by the solver and the
    residual check, and whether the solver met its tolerance."""

    eigenvalues: np.ndarray
    eigenvectors: np.ndarray  # (n, k), columns unit-norm
    residuals: np.ndarray
    n_hvp: int
    n_hvp_residual: int
    converged: bool
    method: str


@dataclass(frozen=True)
class PowerResult:
    """Power iteration: the final Rayleigh quotient, HVPs used, every Rayleigh quotient on the way, and every
    residual ‖Hv − λv‖ (v of unit norm; the same certificate as Lanczos's Ritz residual: some eigenvalue lies within
    it of λ)."""

    eigenvalue: float
    n_hvp: int
    history: np.ndarray
    converged: bool
    residuals: np.ndarray


class _Counted:
    """Wrap a matvec: float64 in and out, count calls, refuse non-finite results."""

    def __init__(self, matvec: Matvec) -> None:
        self.matvec = matvec
        self.count = 0

    def __call__(self, v: np.ndarray) -> np.ndarray:
        self.count += 1
        out = np.asarray(self.matvec(np.ascontiguousarray(np.asarray(v, dtype=np.float64).reshape(-1))),
                         dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(out)):
            raise NonFiniteCurvature("a Hessian-vector product came out NaN or infinite (non-finite curvature); "
                                     "check the checkpoint, or measure in --dtype float64")
        return out


def as_linear_operator(matvec: Matvec, n: int) -> LinearOperator:
    """A symmetric scipy ``LinearOperator`` of shape (n, n) and dtype float64 from ``v ↦ H v``."""
    def mv(v: np.ndarray) -> np.ndarray:
        return np.asarray(matvec(np.asarray(v, dtype=np.float64).reshape(-1)), dtype=np.float64)

    return LinearOperator((n, n), matvec=mv, rmatvec=mv, dtype=np.float64)


def top_eigenvalues(
    matvec: Matvec,
    n: int,
    k: int = 1,
    *,
    rng: np.random.Generator,
    tol: float = 1e-9,
    maxiter: int | None = None,
    ncv: int | None = None,
) -> EigenResult:
    """The k largest eigenvalues λ₁ ≥ … ≥ λ_k of the symmetric operator H (``matvec``: v ↦ Hv, v ∈ ℝⁿ).

    Lanczos via ``eigsh(which="LA", tol=tol)`` started from a Gaussian vector drawn from ``rng``; residuals
    rⱼ = ‖H vⱼ − λⱼ vⱼ‖ cost k more HVPs.  For tiny operators (n ≤ 2k + 1, where ARPACK cannot run) H is formed
    densely from n HVPs and diagonalised.  If ARPACK does not converge within ``maxiter`` restarts the converged
    part is returned with ``converged=False`` (and logged).
    """
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    counted = _Counted(matvec)
    if n <= 2 * k + 1:
        dense = np.column_stack([counted(e) for e in np.eye(n)])
        dense = (dense + dense.T) / 2
        vals, vecs = np.linalg.eigh(dense)
        vals, vecs = vals[::-1][:k], vecs[:, ::-1][:, :k]
        converged, method = True, "dense"
    else:
        v0 = rng.standard_normal(n)
        op = as_linear_operator(counted, n)
        try:
            vals, vecs = eigsh(op, k=k, which="LA", v0=v0, tol=tol, maxiter=maxiter, ncv=ncv)
            converged = True
        except ArpackNoConvergence as exc:
            vals, vecs, converged = exc.eigenvalues, exc.eigenvectors, False
            log.warning("Lanczos did not converge: %d of %d eigenvalues after %d HVPs", len(vals), k, counted.count)
        order = np.argsort(vals)[::-1]
        vals, vecs = np.asarray(vals)[order], np.asarray(vecs)[:, order]
        method = "lanczos"
        if len(vals) < k:  # pad the unconverged tail with NaN
            vals = np.concatenate([vals, np.full(k - len(vals), np.nan)])
            vecs = np.concatenate([vecs, np.full((n, k - vecs.shape[1]), np.nan)], axis=1)
    n_solver = counted.count
    residuals = np.full(k, np.nan)
    for j in range(k):
        if np.isfinite(vals[j]):
            residuals[j] = float(np.linalg.norm(counted(vecs[:, j]) - vals[j] * vecs[:, j]))
    return EigenResult(np.asarray(vals, dtype=np.float64), vecs, residuals, n_solver, counted.count - n_solver,
                       converged, method)


def lanczos_full_reorth(
    matvec: Matvec,
    n: int,
    k: int = 1,
    *,
    rng: np.random.Generator,
    tol: float = 1e-3,
    maxiter: int = 100,
) -> EigenResult:
    """Plain Lanczos with full reorthogonalisation that checks convergence after *every* HVP.

    After j steps the tridiagonal T_j = Q_jᵀ H Q_j has Ritz pairs (θᵢ, Q_j sᵢ) whose residual norms are exactly
    |β_j · (sᵢ)_j| (Golub & Van Loan, *Matrix Computations*, §10.1.4); it stops when the top k satisfy
    |β_j (sᵢ)_j| ≤ tol·|θᵢ| -- the same certificate as ARPACK's, without ARPACK's minimum of ``ncv`` (20) HVPs
    before its first check.  Stores every Lanczos vector: n·j·8 bytes, so keep ``maxiter`` modest for big models.
    Residuals are the Ritz estimates |β_j (sᵢ)_j| (no extra HVPs).  :func:`lanczos_history` gives the curve.
    """
    vals, vecs, residuals, n_hvp, converged, _ = _lanczos(matvec, n, k, rng=rng, tol=tol, maxiter=maxiter)
    return EigenResult(vals, vecs, residuals, n_hvp, 0, converged, "lanczos-full-reorth")


def lanczos_history(matvec: Matvec, n: int, steps: int, *, rng: np.random.Generator) -> np.ndarray:
    """The top Ritz value after each of ``steps`` Lanczos steps (one HVP each), for convergence curves."""
    return _lanczos(matvec, n, 1, rng=rng, tol=0.0, maxiter=steps)[5]


def _lanczos(matvec: Matvec, n: int, k: int, *, rng: np.random.Generator, tol: float,
             maxiter: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, bool, np.ndarray]:
    counted = _Counted(matvec)
    q = rng.standard_normal(n)
    basis = [q / np.linalg.norm(q)]
    alpha: list[float] = []
    beta: list[float] = []
    history: list[float] = []
    converged = False
    theta = s = np.empty(0)
    for j in range(min(maxiter, n)):
        w = counted(basis[-1])
        alpha.append(float(basis[-1] @ w))
        qs = np.asarray(basis)
        for _ in range(2):  # full reorthogonalisation, twice is enough (Parlett's "twice is enough")
            w = w - qs.T @ (qs @ w)
        b = float(np.linalg.norm(w))
        t = np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1)
        theta, s = np.linalg.eigh(t)
        history.append(float(theta[-1]))
        top = min(k, len(theta))
        res = np.abs(b * s[-1, ::-1][:top])
        invariant = b <= 1e-14 * abs(theta[-1])  # the Krylov space is invariant: the Ritz values are exact
        if (len(theta) >= k and np.all(res <= tol * np.abs(theta[::-1][:k]))) or invariant:
            converged = len(theta) >= k
            break
        beta.append(b)
        basis.append(w / b)
    m = len(alpha)
    vecs = np.asarray(basis[:m]).T @ s[:, ::-1][:, :k]
    vals = theta[::-1][:k]
    b_last = float(np.linalg.norm(w))
    residuals = np.abs(b_last * s[-1, ::-1][:k])
    if len(vals) < k:
        vals = np.concatenate([vals, np.full(k - len(vals), np.nan)])
    return vals, vecs, residuals, counted.count, converged, np.asarray(history)


def power_iteration(
    matvec: Matvec,
    n: int,
    *,
    rng: np.random.Generator,
    tol: float = 1e-3,
    maxiter: int = 1000,
) -> PowerResult:
    """Power iteration v ← Hv/‖Hv‖ with Rayleigh quotient λ_t = v_tᵀ H v_t (one HVP per step).

    Stops when |λ_t − λ_{t−1}| < tol·|λ_t| (the usual rule, as in PyHessian) or after ``maxiter`` HVPs; pass
    ``tol=0`` to run all ``maxiter`` steps and read the convergence curve from ``history``.  Converges to the
    eigenvalue of largest magnitude, which is λ_max only when λ_max ≥ |λ_min|.
    """
    counted = _Counted(matvec)
    v = rng.standard_normal(n)
    v /= np.linalg.norm(v)
    history: list[float] = []
    residuals: list[float] = []
    converged = False
    for _ in range(maxiter):
        hv = counted(v)
        lam = float(v @ hv)
        history.append(lam)
        residuals.append(float(np.linalg.norm(hv - lam * v)))
        if len(history) > 1 and abs(lam - history[-2]) < tol * abs(lam):
            converged = True
            break
        norm = np.linalg.norm(hv)
        if norm == 0:
            converged = True
            break
        v = hv / norm
    return PowerResult(history[-1], counted.count, np.asarray(history), converged, np.asarray(residuals))
