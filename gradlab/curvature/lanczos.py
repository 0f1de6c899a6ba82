"""λ_max and the top-k Hessian eigenvalues by Lanczos on Hessian-vector products; power iteration for comparison.

Lanczos (implicitly restarted, ARPACK via ``scipy.sparse.linalg.eigsh(which="LA")``) works on any symmetric
operator given as a matvec ``v ↦ H v``.  It returns the k largest *algebraic* Ritz values λ₁ ≥ … ≥ λ_k, and for
each the residual ‖H vⱼ − λⱼ vⱼ‖ (one extra HVP per eigenpair).  What that guarantees, and what it does not:

- some eigenvalue of H lies within ‖rⱼ‖ of λⱼ (Parlett, *The Symmetric Eigenvalue Problem*, §4.5) -- *some*
  eigenvalue, not necessarily the j-th largest; ARPACK stops when every Ritz residual estimate is ≤ tol·|λⱼ|;
- every Ritz value is a Rayleigh quotient, so λ₁ ≤ λ_max always (a lower bound);
- together: λ₁ is within ‖r₁‖ of λ_max *provided the Krylov space did not miss a larger eigenvalue*.  A start
  vector (nearly) orthogonal to the top eigenvector, or a converged cluster, can make Lanczos converge to λ₂
  with a tiny residual: the residual cannot tell.

The miss check (``check_steps`` > 0, on by default): a second short Lanczos run from an independent random start,
deflated against the returned eigenvectors (kept in their orthogonal complement).  Its top Ritz value θ is again a
Rayleigh quotient of H, so θ ≤ λ_max; θ > λ₁ + ‖r₁‖ proves that an eigenvalue above λ₁ was missed.  Then the
solver restarts once from the check's Ritz vector and the check is repeated; ``missed_top`` reports a miss that
survived.  The check catches a miss with high probability, it does not prove there is none: a random start has a
component of order 1/√n along any fixed eigenvector, and ``check_steps`` Lanczos steps amplify it by the
Chebyshev factor of the gap.

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
    check_eigenvalue: float = float("nan")  # top Ritz value of the deflated check run (≤ λ_max); NaN: no check
    n_hvp_check: int = 0
    missed_top: bool = False  # the check still found an eigenvalue above λ₁ + ‖r₁‖ after the restart
    restarted: bool = False  # the check found a miss and the solver restarted from its Ritz vector


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
    v0: np.ndarray | None = None,
    check_steps: int = 10,
) -> EigenResult:
    """The k largest eigenvalues λ₁ ≥ … ≥ λ_k of the symmetric operator H (``matvec``: v ↦ Hv, v ∈ ℝⁿ).

    Lanczos via ``eigsh(which="LA", tol=tol)`` started from ``v0`` (default a Gaussian vector drawn from ``rng``);
    residuals rⱼ = ‖H vⱼ − λⱼ vⱼ‖ cost k more HVPs; the miss check (module doc) costs up to ``check_steps`` more
    (``0``: no check).  For tiny operators (n ≤ 2k + 1, where ARPACK cannot run) H is formed densely from n HVPs
    and diagonalised (exact: no check).  If ARPACK does not converge within ``maxiter`` restarts the converged
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
        n_solver = counted.count
        residuals = _residuals(counted, vals, vecs)
        return EigenResult(np.asarray(vals, dtype=np.float64), vecs, residuals, n_solver, counted.count - n_solver,
                           True, "dense")
    start = rng.standard_normal(n) if v0 is None else np.asarray(v0, dtype=np.float64).reshape(n)
    n_solver = n_residual = n_check = 0
    restarted = missed = False
    theta = np.nan
    for attempt in range(2):
        c0 = counted.count
        vals, vecs, converged = _arpack(counted, n, k, start, tol=tol, maxiter=maxiter, ncv=ncv)
        c1 = counted.count
        residuals = _residuals(counted, vals, vecs)
        c2 = counted.count
        n_solver, n_residual = n_solver + c1 - c0, n_residual + c2 - c1
        if check_steps <= 0 or not np.isfinite(vals[0]):
            break
        theta, u = _deflated_top(counted, vecs, n, check_steps, rng)
        n_check += counted.count - c2
        missed = _missed_top(theta, vals, residuals)
        if not missed or attempt == 1:
            break
        log.warning("Lanczos missed an eigenvalue above %.6g (a deflated check run found %.6g): restarting from "
                    "the check's Ritz vector", vals[0], theta)
        restarted = True
        start = u + vecs[:, np.isfinite(vals)].sum(1)
    if missed:
        log.warning("Lanczos still misses an eigenvalue above %.6g after a restart (check found %.6g)", vals[0], theta)
    return EigenResult(np.asarray(vals, dtype=np.float64), vecs, residuals, n_solver, n_residual, converged,
                       "lanczos", float(theta), n_check, missed, restarted)


def _arpack(counted: _Counted, n: int, k: int, v0: np.ndarray, *, tol: float, maxiter: int | None,
            ncv: int | None) -> tuple[np.ndarray, np.ndarray, bool]:
    op = as_linear_operator(counted, n)
    try:
        vals, vecs = eigsh(op, k=k, which="LA", v0=v0, tol=tol, maxiter=maxiter, ncv=ncv)
        converged = True
    except ArpackNoConvergence as exc:
        vals, vecs, converged = exc.eigenvalues, exc.eigenvectors, False
        log.warning("Lanczos did not converge: %d of %d eigenvalues after %d HVPs", len(vals), k, counted.count)
    order = np.argsort(vals)[::-1]
    vals, vecs = np.asarray(vals)[order], np.asarray(vecs).reshape(n, -1)[:, order]
    if len(vals) < k:  # pad the unconverged tail with NaN
        vals = np.concatenate([vals, np.full(k - len(vals), np.nan)])
        vecs = np.concatenate([vecs, np.full((n, k - vecs.shape[1]), np.nan)], axis=1)
    return vals, vecs, converged


def _residuals(counted: _Counted, vals: np.ndarray, vecs: np.ndarray) -> np.ndarray:
    residuals = np.full(len(vals), np.nan)
    for j in range(len(vals)):
        if np.isfinite(vals[j]):
            residuals[j] = float(np.linalg.norm(counted(vecs[:, j]) - vals[j] * vecs[:, j]))
    return residuals


def _missed_top(theta: float, vals: np.ndarray, residuals: np.ndarray) -> bool:
    """Whether the deflated check's Ritz value θ lies above the reported λ₁ by more than λ₁'s residual bound: an
    eigenvalue above the reported top one exists (Ritz values are lower bounds of the spectrum's top)."""
    return bool(theta > vals[0] + residuals[0] + 1e-12 * abs(vals[0]))


def _deflated_top(counted: _Counted, vecs: np.ndarray, n: int, steps: int,
                  rng: np.random.Generator) -> tuple[float, np.ndarray]:
    """Top Ritz value and vector of ``steps`` Lanczos steps kept orthogonal to the columns of ``vecs``.

    The Ritz value is the Rayleigh quotient of H at a unit vector, hence ≤ λ_max (full reorthogonalisation)."""
    v = vecs[:, np.all(np.isfinite(vecs), axis=0)]
    v, _ = np.linalg.qr(v) if v.size else (v, None)

    def project(x: np.ndarray) -> np.ndarray:
        return x - v @ (v.T @ x) if v.size else x

    q = project(project(rng.standard_normal(n)))
    basis = [q / np.linalg.norm(q)]
    alpha: list[float] = []
    beta: list[float] = []
    for _ in range(max(1, min(steps, n - v.shape[1]))):
        w = project(counted(basis[-1]))
        alpha.append(float(basis[-1] @ w))
        qs = np.asarray(basis)
        for _ in range(2):
            w = project(w - qs.T @ (qs @ w))
        b = float(np.linalg.norm(w))
        if b <= 1e-14 * max(abs(a) for a in alpha) or len(alpha) == steps:
            break
        beta.append(b)
        basis.append(w / b)
    t = np.diag(alpha) + np.diag(beta[: len(alpha) - 1], 1) + np.diag(beta[: len(alpha) - 1], -1)
    theta, s = np.linalg.eigh(t)
    u = np.asarray(basis[: len(alpha)]).T @ s[:, -1]
    return float(theta[-1]), u / np.linalg.norm(u)


def lanczos_full_reorth(
    matvec: Matvec,
    n: int,
    k: int = 1,
    *,
    rng: np.random.Generator,
    tol: float = 1e-3,
    maxiter: int = 100,
    v0: np.ndarray | None = None,
    check_steps: int = 10,
) -> EigenResult:
    """Plain Lanczos with full reorthogonalisation that checks convergence after *every* HVP.

    After j steps the tridiagonal T_j = Q_jᵀ H Q_j has Ritz pairs (θᵢ, Q_j sᵢ) whose residual norms are exactly
    |β_j · (sᵢ)_j| (Golub & Van Loan, *Matrix Computations*, §10.1.4); it stops when the top k satisfy
    |β_j (sᵢ)_j| ≤ tol·|θᵢ| -- the same stopping rule as ARPACK's, without ARPACK's minimum of ``ncv`` (20) HVPs
    before its first check.  As for :func:`top_eigenvalues`, that bounds the distance to *some* eigenvalue; the
    deflated miss check (``check_steps`` HVPs, module doc) guards λ₁ against a missed larger eigenvalue and
    restarts once from the check's Ritz vector when it finds one.  Stores every Lanczos vector: n·j·8 bytes, so
    keep ``maxiter`` modest for big models.  Residuals are the Ritz estimates |β_j (sᵢ)_j| (no extra HVPs).
    :func:`lanczos_history` gives the curve.
    """
    counted = _Counted(matvec)
    start = rng.standard_normal(n) if v0 is None else np.asarray(v0, dtype=np.float64).reshape(n)
    n_solver = n_check = 0
    theta, missed, restarted = np.nan, False, False
    for attempt in range(2):
        c0 = counted.count
        vals, vecs, residuals, _, converged, _ = _lanczos(counted, n, k, start=start, tol=tol, maxiter=maxiter)
        c1 = counted.count
        n_solver += c1 - c0
        if check_steps <= 0 or not np.isfinite(vals[0]):
            break
        theta, u = _deflated_top(counted, vecs, n, check_steps, rng)
        n_check += counted.count - c1
        missed = _missed_top(theta, vals, residuals)
        if not missed or attempt == 1:
            break
        log.warning("Lanczos missed an eigenvalue above %.6g (a deflated check run found %.6g): restarting",
                    vals[0], theta)
        restarted = True
        start = u + vecs[:, np.isfinite(vals)].sum(1)
    return EigenResult(vals, vecs, residuals, n_solver, 0, converged, "lanczos-full-reorth", float(theta), n_check,
                       missed, restarted)


def lanczos_history(matvec: Matvec, n: int, steps: int, *, rng: np.random.Generator) -> np.ndarray:
    """The top Ritz value after each of ``steps`` Lanczos steps (one HVP each), for convergence curves."""
    return _lanczos(_Counted(matvec), n, 1, start=rng.standard_normal(n), tol=0.0, maxiter=steps)[5]


def _lanczos(counted: _Counted, n: int, k: int, *, start: np.ndarray, tol: float,
             maxiter: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, bool, np.ndarray]:
    q = np.array(start, dtype=np.float64)
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
