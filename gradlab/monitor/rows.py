"""The host side of the recorded steps (numpy only): what a step copied back (:class:`StepCopy`), and the variables
of a chunk of steps with their moving-average estimates, ready for :meth:`gradlab.monitor.store.MonitorStore.append`
(computed once per chunk, for all its steps at once: 0.2 ms per step if done step by step on the training thread).

Parts: the groups (``all``, ``weight``, ``bias``) then every parameter tensor; a per-part variable ``x`` of the
row is split into ``x`` (dims step, group) and ``x_layer`` (step, layer) when the chunk is written.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradlab.analysis.noise_model import finite_population_factor
from gradlab.monitor.estimators import EmaRatio, smooth
from gradlab.monitor.store import GROUPS

#: the store's moving-average variables and the :class:`~gradlab.monitor.estimators.Smoothed` field of each
SMOOTHED = {"grad_sq_norm_ema": "grad_sq_norm", "grad_sq_norm_ema_low": "grad_sq_norm_low",
            "grad_sq_norm_ema_high": "grad_sq_norm_high", "trace_cov_ema": "trace_cov",
            "trace_cov_ema_low": "trace_cov_low", "trace_cov_ema_high": "trace_cov_high", "b_noise": "b_noise",
            "b_noise_low": "b_noise_low", "b_noise_high": "b_noise_high"}


@dataclass(frozen=True)
class StepCopy:
    """What a recorded step copied to the host: per tensor S₁, Q, ‖θ − θ₀‖ and ‖Δθ‖ (NaN where not measured),
    the count of non-finite per-example norms, the summed loss, the step's bookkeeping, which tensors were
    excluded at that step, and when it ended."""

    s1: np.ndarray
    q: np.ndarray
    dist: np.ndarray
    update: np.ndarray | None
    nonfinite: int
    loss_sum: float
    step: int
    examples_seen: int
    batch_size: int
    n_groups: int
    missing: int
    lr: float
    excluded: np.ndarray
    wall_time: float


def _estimates(s1: np.ndarray, q: np.ndarray, b: np.ndarray, k: np.ndarray, pool_size: int | None
               ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`~gradlab.monitor.estimators.noise_estimates` for many steps at once (b, k: (steps, 1)), the same
    float operations element by element; rows with k < 2 or b < 2 are left to the caller."""
    with np.errstate(divide="ignore", invalid="ignore"):
        if pool_size is None:
            return (k * s1 / b - q) / (b * (k - 1)), (q - s1 / b) / (k - 1)
        n = float(pool_size)
        tr = (q - s1 / b) * (n - 1) / (n * (k - 1))
        fpf = finite_population_factor(b, pool_size, replacement=False)  # raises if a batch exceeds the pool
        return (s1 / b - tr * fpf) / b, tr


def chunk_rows(copies: list[StepCopy], *, group_masks: np.ndarray, two_batch: bool, pool_size: int | None,
               ema: EmaRatio) -> dict[str, np.ndarray]:
    """The store's variables for a chunk of recorded steps, computed for all its steps at once (elementwise: the
    same numbers as step by step); the moving averages fold the steps in one by one, in order."""
    ex = np.stack([c.excluded for c in copies])  # (steps, tensors)
    s1v = np.where(ex, np.nan, np.stack([c.s1 for c in copies]))
    qv = np.where(ex, np.nan, np.stack([c.q for c in copies]))
    missing0 = np.array([c.missing for c in copies], dtype=np.int8)
    measured = ~ex & ~np.isin(missing0, (3, 5, 7))[:, None]  # codes 3, 5, 7 measure nothing: NaN is no finding
    nonfinite = np.array([c.nonfinite for c in copies], dtype=np.int64) + (~np.isfinite(s1v) & measured).sum(1)
    if two_batch:
        nonfinite += (~np.isfinite(qv) & measured).sum(1)
    missing = np.where((nonfinite > 0) & (missing0 == 0), np.int8(2), missing0).astype(np.int8)
    inc = group_masks[None] & ~ex[:, None, :]  # (steps, groups, tensors)
    s1a = np.concatenate([np.where(inc, s1v[:, None, :], 0.0).sum(2), s1v], axis=1)
    qa = np.concatenate([np.where(inc, qv[:, None, :], 0.0).sum(2), qv], axis=1)
    b = np.array([float(c.batch_size) for c in copies])[:, None]
    k = np.array([float(c.n_groups) for c in copies])[:, None]
    estimable = (missing == 0) & (b[:, 0] >= 2) & (k[:, 0] >= 2)
    g2, tr = _estimates(s1a, qa, b, k, pool_size)
    g2[~estimable] = np.nan
    tr[~estimable] = np.nan
    states = []
    for t in range(len(copies)):
        ema.update(tr[t], g2[t])
        states.append(ema.state.copy())
    dist = np.stack([c.dist for c in copies])
    upd = np.stack([c.update if c.update is not None else np.full(dist.shape[1], np.nan) for c in copies])
    groups = group_masks[None]
    update = np.concatenate([np.sqrt(np.where(groups, upd[:, None, :] ** 2, 0.0).sum(2)), upd], axis=1)
    update[[c.update is None for c in copies]] = np.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        bs = tr / g2
    stacked: dict[str, np.ndarray] = {
        "step": np.array([c.step for c in copies], dtype=np.int64),
        "examples_seen": np.array([c.examples_seen for c in copies], dtype=np.int64),
        "batch_size": np.array([c.batch_size for c in copies], dtype=np.int64),
        "n_groups": np.array([c.n_groups for c in copies], dtype=np.int64),
        "loss": np.array([c.loss_sum / c.batch_size if c.batch_size else np.nan for c in copies], dtype=np.float64),
        "lr": np.array([c.lr for c in copies], dtype=np.float64),
        "nonfinite_count": nonfinite, "missing": missing,
        "wall_time": np.array([c.wall_time for c in copies], dtype=np.float64),
        "gram_sum": s1a, "gram_trace": qa, "grad_sq_norm": g2, "trace_cov": tr, "b_simple": bs,
        "update_norm": update,
        "dist_init": np.concatenate([np.sqrt(np.where(groups, dist[:, None, :] ** 2, 0.0).sum(2)), dist], axis=1)}
    return smoothed_variables(stacked, np.stack(states), ema.level)


def smoothed_variables(stacked: dict[str, np.ndarray], states: np.ndarray, level: float) -> dict[str, np.ndarray]:
    """``stacked`` (per-step variables over the parts) with the moving averages' estimates from the EMA state of
    each step (steps, 7, parts), every per-part variable split into its groups and ``_layer`` halves."""
    sm = smooth(np.moveaxis(states, 1, 0), level)  # (7, steps, parts)
    stacked["n_eff"] = sm.n_eff[:, 0]
    for name, field in SMOOTHED.items():
        stacked[name] = getattr(sm, field)
    ng = len(GROUPS)
    out: dict[str, np.ndarray] = {}
    for name, v in stacked.items():
        if v.ndim == 2:
            out[name] = np.ascontiguousarray(v[:, :ng], dtype=np.float64)
            out[name + "_layer"] = np.ascontiguousarray(v[:, ng:], dtype=np.float64)
        else:
            out[name] = v
    return out
