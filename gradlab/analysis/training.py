"""Analyses of training-run stores (``gradlab train``): grids, distance-vs-epoch laws, stable learning rates.

Pure numpy/scipy/pandas/xarray (no torch).  Inputs are run stores opened with
:func:`gradlab.store.open_store` (dims ``run``, ``epoch``, ``layer``, ``group``; per-run coords ``batch_size``,
``lr``, ``seed``, ``optimizer``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.stats


def final_table(ds: Any, epoch: int | None = None) -> pd.DataFrame:
    """One row per run at ``epoch`` (default: the last): accuracies, losses, generalisation gap, distances.

    ``gen_gap`` = test loss − train loss; ``dist_init_weight``/``dist_init_bias`` are ‖θ − θ₀‖ over weights and over
    biases (the blog's W and B distances); ``trained`` is True when the run did not diverge and its final training
    loss is below its initial one.
    """
    e = int(ds.epoch.values[-1]) if epoch is None else int(epoch)
    at = ds.sel(epoch=e)
    at0 = ds.sel(epoch=0)
    df = pd.DataFrame({
        "run": [str(v) for v in ds.run.values],
        "batch_size": ds.batch_size.values.astype(int),
        "lr": ds.lr.values.astype(float),
        "seed": ds.seed.values.astype(int),
        "optimizer": [str(v) for v in ds.optimizer.values],
        "train_acc": at.train_acc.values,
        "test_acc": at.test_acc.values,
        "train_loss": at.train_loss.values,
        "test_loss": at.test_loss.values,
        "initial_train_loss": at0.train_loss.values,
        "dist_init_all": at.dist_init.sel(group="all").values,
        "dist_init_weight": at.dist_init.sel(group="weight").values,
        "dist_init_bias": at.dist_init.sel(group="bias").values,
        "dist_origin_all": at.dist_origin.sel(group="all").values,
        "diverged_epoch": ds.diverged_epoch.values.astype(int),
    })
    df["gen_gap"] = df.test_loss - df.train_loss
    df["trained"] = (df.diverged_epoch < 0) & (df.train_loss < df.initial_train_loss)
    df["epoch"] = e
    return df


def grid(df: pd.DataFrame, value: str, index: str = "batch_size", columns: str = "lr") -> pd.DataFrame:
    """``value`` averaged over seeds on an ``index`` × ``columns`` grid (e.g. batch size × learning rate);
    diverged cells stay in the grid as NaN."""
    return df.pivot_table(values=value, index=index, columns=columns, aggfunc="mean", dropna=False)


@dataclass(frozen=True)
class LogFit:
    """d(t) = a + b·ln t fitted over epochs t ≥ ``t_min``; ``b_lo``/``b_hi`` is the 95% interval of the slope."""

    a: float
    b: float
    b_lo: float
    b_hi: float
    r2: float
    n: int


def log_t_fit(epochs: np.ndarray, distance: np.ndarray, t_min: int = 1) -> LogFit:
    """Least-squares fit of distance from init against log epoch (Hoffer et al. 2017: ‖θ_t − θ₀‖ ~ log t).

    The slope interval is the t-distribution interval of ordinary least squares (``scipy.stats.linregress``).
    """
    t = np.asarray(epochs, dtype=float)
    d = np.asarray(distance, dtype=float)
    keep = (t >= t_min) & np.isfinite(d)
    t, d = t[keep], d[keep]
    if t.size < 3:
        return LogFit(np.nan, np.nan, np.nan, np.nan, np.nan, int(t.size))
    res = scipy.stats.linregress(np.log(t), d)
    q = scipy.stats.t.ppf(0.975, t.size - 2)
    return LogFit(float(res.intercept), float(res.slope), float(res.slope - q * res.stderr),
                  float(res.slope + q * res.stderr), float(res.rvalue**2), int(t.size))


def log_t_fits(ds: Any, group: str = "all") -> pd.DataFrame:
    """:func:`log_t_fit` of ``dist_init`` (over ``group``) for every run of a store."""
    rows = []
    for i, run in enumerate(ds.run.values):
        fit = log_t_fit(ds.epoch.values, ds.dist_init.isel(run=i).sel(group=group).values)
        rows.append({"run": str(run), "batch_size": int(ds.batch_size.values[i]), "lr": float(ds.lr.values[i]),
                     "optimizer": str(ds.optimizer.values[i]), **fit.__dict__})
    return pd.DataFrame(rows)


def stable_lr_range(df: pd.DataFrame, min_test_acc: float | None = None) -> pd.DataFrame:
    """Per batch size, the smallest and largest learning rate whose runs all trained stably (Masters & Luschi).

    A (batch size, lr) cell is stable when every seed's run ``trained`` (no divergence and the training loss fell)
    and, if ``min_test_acc`` is given, reached at least that test accuracy.  ``n_stable`` counts stable cells;
    the range is NaN when none is.
    """
    ok = df.trained if min_test_acc is None else df.trained & (df.test_acc >= min_test_acc)
    cell = df.assign(ok=ok).groupby(["batch_size", "lr"]).ok.all().reset_index()
    rows = []
    for m, sub in cell.groupby("batch_size"):
        good = sub.lr[sub.ok]
        rows.append({"batch_size": int(m), "lr_min": float(good.min()) if len(good) else np.nan,
                     "lr_max": float(good.max()) if len(good) else np.nan, "n_stable": int(len(good)),
                     "n_tried": int(len(sub))})
    return pd.DataFrame(rows)
