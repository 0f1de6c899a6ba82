"""The host side of a recorded step (numpy only): the row of one step from its copied-back sums, and the rows of a
chunk with their moving-average estimates, ready for :meth:`gradlab.monitor.store.MonitorStore.append`.

Parts: the groups (``all``, ``weight``, ``bias``) then every parameter tensor; a per-part variable ``x`` of the
row is split into ``x`` (dims step, group) and ``x_layer`` (step, layer) when the chunk is written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradlab.monitor.estimators import EmaRatio, noise_estimates, smooth
from gradlab.monitor.store import GROUPS

#: the store's moving-average variables and the :class:`~gradlab.monitor.estimators.Smoothed` field of each
SMOOTHED = {"grad_sq_norm_ema": "grad_sq_norm", "grad_sq_norm_ema_low": "grad_sq_norm_low",
            "grad_sq_norm_ema_high": "grad_sq_norm_high", "trace_cov_ema": "trace_cov",
            "trace_cov_ema_low": "trace_cov_low", "trace_cov_ema_high": "trace_cov_high", "b_noise": "b_noise",
            "b_noise_low": "b_noise_low", "b_noise_high": "b_noise_high"}


@dataclass(frozen=True)
class StepCopy:
    """What a recorded step copied to the host: per tensor S₁, Q, ‖θ − θ₀‖ and ‖Δθ‖ (NaN where not measured),
    the count of non-finite per-example norms, the summed loss, and the step's bookkeeping."""

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


def step_row(c: StepCopy, *, excluded: np.ndarray, group_masks: np.ndarray, two_batch: bool,
             pool_size: int | None, ema: EmaRatio) -> dict[str, Any]:
    """One step's row (per-part vectors over groups + tensors) and the EMA state after folding it in."""
    s1v = np.where(excluded, np.nan, c.s1)
    qv = np.where(excluded, np.nan, c.q)
    nonfinite = c.nonfinite + int((~np.isfinite(s1v[~excluded])).sum())
    if two_batch:
        nonfinite += int((~np.isfinite(qv[~excluded])).sum())
    missing = 2 if nonfinite and c.missing == 0 else c.missing
    inc = group_masks & ~excluded
    s1g = np.where(inc, s1v, 0.0).sum(1)
    qg = np.where(inc, qv, 0.0).sum(1)
    if missing:
        g2 = np.full(len(GROUPS) + s1v.size, np.nan)
        tr = g2.copy()
    else:
        g2, tr = noise_estimates(np.concatenate([s1g, s1v]), np.concatenate([qg, qv]), c.batch_size, c.n_groups,
                                 pool_size)
    ema.update(tr, g2)
    upd_v = c.update if c.update is not None else np.full(s1v.size, np.nan)
    dsq_g = np.sqrt(np.where(group_masks, c.dist ** 2, 0.0).sum(1))
    usq_g = np.sqrt(np.where(group_masks, upd_v ** 2, 0.0).sum(1))
    with np.errstate(divide="ignore", invalid="ignore"):
        bs = tr / g2
    update = np.concatenate([usq_g, upd_v])
    if c.update is None:
        update[:] = np.nan
    return {
        "step": np.int64(c.step), "examples_seen": np.int64(c.examples_seen), "batch_size": np.int64(c.batch_size),
        "n_groups": np.int64(c.n_groups), "loss": c.loss_sum / max(c.batch_size, 1), "lr": c.lr,
        "nonfinite_count": np.int64(nonfinite), "missing": np.int8(missing), "wall_time": time.time(),
        "gram_sum": np.concatenate([s1g, s1v]), "gram_trace": np.concatenate([qg, qv]), "grad_sq_norm": g2,
        "trace_cov": tr, "b_simple": bs, "update_norm": update, "dist_init": np.concatenate([dsq_g, c.dist]),
        "_ema": ema.state.copy()}


def chunk_rows(rows: list[dict[str, Any]], level: float) -> dict[str, np.ndarray]:
    """The store's variables for a chunk of rows: the moving averages' estimates and intervals of every step at
    once from the EMA state each step left (elementwise: the same numbers as step by step)."""
    stacked = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    sm = smooth(np.moveaxis(stacked.pop("_ema"), 1, 0), level)  # (7, steps, parts)
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
