"""The chunk of recorded steps computed at once (:func:`gradlab.monitor.rows.chunk_rows`) equals, bit for bit,
the step-by-step rows it replaced (kept here as the reference): missing steps, excluded and non-finite tensors, both
estimators, a finite pool, and more tensors than numpy's pairwise summation block (8)."""

from __future__ import annotations

import numpy as np
import pytest

from gradlab.monitor.estimators import EmaRatio, noise_estimates
from gradlab.monitor.rows import StepCopy, chunk_rows, smoothed_variables
from gradlab.monitor.store import GROUPS


def _reference_row(c, *, excluded, group_masks: np.ndarray, two_batch: bool,
             pool_size: int | None, ema):
    """One step's row (per-part vectors over groups + tensors) and the EMA state after folding it in."""
    s1v = np.where(excluded, np.nan, c.s1)
    qv = np.where(excluded, np.nan, c.q)
    measured = c.missing not in (3, 5)  # those steps measure nothing: their NaN S₁ is not counted
    nonfinite = c.nonfinite + measured * int((~np.isfinite(s1v[~excluded])).sum())
    if two_batch:
        nonfinite += measured * int((~np.isfinite(qv[~excluded])).sum())
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
        "nonfinite_count": np.int64(nonfinite), "missing": np.int8(missing), "wall_time": c.wall_time,
        "gram_sum": np.concatenate([s1g, s1v]), "gram_trace": np.concatenate([qg, qv]), "grad_sq_norm": g2,
        "trace_cov": tr, "b_simple": bs, "update_norm": update, "dist_init": np.concatenate([dsq_g, c.dist]),
        "_ema": ema.state.copy()}


def _reference_chunk(rows, level):
    """The rows stacked, then the smoothing and the split shared with the store's code (not under test here)."""
    stacked = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    return smoothed_variables(stacked, stacked.pop("_ema"), level)


def _copies(rng, n_steps, n_t, pool):
    out = []
    for t in range(n_steps):
        b = int(rng.integers(1, 40)) if pool is None else int(rng.integers(1, pool + 1))
        k = b if rng.random() < 0.7 else int(rng.integers(1, 5))
        s1 = rng.lognormal(size=n_t) * 10 ** rng.uniform(-3, 3)
        q = s1 * rng.uniform(0.5, 3.0, size=n_t)
        if rng.random() < 0.1:
            s1[rng.integers(n_t)] = np.inf
        excluded = rng.random(n_t) < 0.1
        update = None if rng.random() < 0.3 else rng.lognormal(size=n_t)
        out.append(StepCopy(s1=s1, q=q, dist=rng.lognormal(size=n_t), update=update,
                            nonfinite=int(rng.integers(0, 2)) if rng.random() < 0.1 else 0,
                            loss_sum=float(rng.normal() * b), step=t, examples_seen=10 * t, batch_size=b,
                            n_groups=k, missing=int(rng.choice([0, 0, 0, 1, 3, 4, 5])), lr=float(rng.random()),
                            excluded=excluded, wall_time=1e9 + t))
    return out


@pytest.mark.parametrize("n_t", [3, 11, 50])
@pytest.mark.parametrize("two_batch", [False, True])
@pytest.mark.parametrize("pool", [None, 64])
def test_a_chunk_equals_its_steps_row_by_row(n_t, two_batch, pool):
    rng = np.random.default_rng(n_t + 7 * two_batch + (pool or 0))
    kinds = rng.random(n_t) < 0.6
    masks = np.array([[True] * n_t, kinds, ~kinds])
    copies = _copies(rng, 40, n_t, pool)
    ema_ref = EmaRatio(len(GROUPS) + n_t, decay=0.9)
    rows = [_reference_row(c, excluded=c.excluded, group_masks=masks, two_batch=two_batch, pool_size=pool,
                           ema=ema_ref) for c in copies]
    want = _reference_chunk(rows, ema_ref.level)
    ema = EmaRatio(len(GROUPS) + n_t, decay=0.9)
    got = chunk_rows(copies, group_masks=masks, two_batch=two_batch, pool_size=pool, ema=ema)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)  # NaN == NaN, every bit otherwise
    np.testing.assert_array_equal(ema.state, ema_ref.state)
