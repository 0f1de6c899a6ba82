"""The blog's per-batch-size statistics of a probe store, as lazy chunked (dask) reductions over trials.

Only finished trials count (``done``).  Per (checkpoint, batch_size[, layer | group]): mean μ_m, standard
deviation σ_m (ddof = 1) and coefficient of variation σ_m/μ_m of ‖S‖, and the blog's normalised mean and std,
μ_m·(μ_ref/μ_m) = μ_ref and σ_m·(μ_ref/μ_m) ("for the same distance moved, how variable is the distance";
ref = the largest batch size by default).  Histograms of ‖S‖ across trials share their bins across batch sizes
within a checkpoint (``dask.array.histogram``); pooled entry histograms are sums of ``entry_hist`` over trials on
the store's fixed bins.  Everything is a sum over trials, so chunked equals one-shot.
"""

from __future__ import annotations

from typing import Any

import numpy as np

NORM_HIST_BINS = 40


def _attrs(da: Any, prefix: str, units: str | None = None) -> dict[str, str]:
    name = da.attrs.get("long_name", da.name)
    return {"long_name": f"{prefix}{name}", "units": da.attrs.get("units", "1") if units is None else units}


def done_mask(ds: Any) -> Any:
    """The (checkpoint, trial) boolean mask of finished units, loaded (it is small)."""
    return ds["done"].load()


def missing_units(ds: Any) -> list[str]:
    """One line per checkpoint with unfinished trials, e.g. ``checkpoint 'late': 3 of 10 trials not done (7..9)``."""
    done = done_mask(ds)
    out = []
    for c in done["checkpoint"].values:
        d = done.sel(checkpoint=c).values
        missing = np.flatnonzero(~d)
        if missing.size:
            trials = done["trial"].values[missing]
            span = f"{trials[0]}..{trials[-1]}" if missing.size > 1 else f"{trials[0]}"
            out.append(f"checkpoint {c!r}: {missing.size} of {d.size} trials not done ({span})")
    return out


def norm_moments(da: Any, done: Any, ref_batch_size: int) -> Any:
    """Mean, std (ddof = 1), CV and the normalised mean and std of ``da`` over done trials (lazy Dataset).

    normalised: scaled by μ_ref/μ_m, with μ_ref the mean at ``ref_batch_size`` (Masters-style "same distance").
    """
    import xarray as xr

    x = da.where(done)
    # Moments from counts, dividing by NaN where a cell has no (or one) value: layers outside --params are all NaN,
    # and 0/0 inside dask's own mean/std would warn.
    n = x.count("trial")
    mean = x.sum("trial", skipna=True) / n.where(n > 0)
    std = np.sqrt(((x - mean) ** 2).sum("trial", skipna=True) / (n - 1).where(n > 1))
    scale = mean.sel(batch_size=ref_batch_size) / mean
    name = da.name
    return xr.Dataset({
        f"{name}_mean": mean.assign_attrs(_attrs(da, "mean over trials of ")),
        f"{name}_std": std.assign_attrs(_attrs(da, "std over trials of ")),
        f"{name}_cv": (std / mean).assign_attrs(_attrs(da, "coefficient of variation of ", "1")),
        f"{name}_mean_normalised": (mean * scale).assign_attrs(
            _attrs(da, f"mean scaled by μ_ref/μ_m (ref m = {ref_batch_size}) of ")),
        f"{name}_std_normalised": (std * scale).assign_attrs(
            _attrs(da, f"std scaled by μ_ref/μ_m (ref m = {ref_batch_size}) of ")),
    })


def minibatch_sq_norm(ds: Any, reduction: str) -> Any:
    """Per (checkpoint, batch_size, trial): the mean over the trial's minibatches of ‖g_B‖² (mean-reduction units).

    ``minibatch_grad_norm`` holds ‖g_B‖ (mean reduction) or ‖s_B‖ = m‖g_B‖ (sum reduction); NaN padding beyond
    N/m is skipped.  Lazy.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    mb = ds["minibatch_grad_norm"]
    q = (mb**2).mean("minibatch", skipna=True)
    if reduction == "sum":
        q = q / ds["batch_size"].astype(np.float64) ** 2
    units = mb.attrs.get("units", "1")
    return q.assign_attrs(long_name="mean squared minibatch gradient norm ‖g_B‖² (mean reduction)",
                          units=f"({units})²")


def pooled_entry_hist(ds: Any, done: Any) -> Any:
    """``entry_hist`` summed over done trials: (checkpoint, batch_size, bin) counts (lazy)."""
    h = ds["entry_hist"].where(done, 0).astype(np.int64).sum("trial")
    return h.assign_attrs(long_name="count of entries of S per bin, pooled over trials", units="count")


def norm_histograms(da: Any, done: Any, scale: Any | None = None, bins: int = NORM_HIST_BINS) -> Any:
    """Histograms of ``da`` (checkpoint, batch_size, trial) over done trials, bins shared within a checkpoint.

    ``scale`` (checkpoint, batch_size) multiplies the values first (the blog's μ_ref/μ_m normalisation).
    Returns a Dataset with ``count`` (checkpoint, batch_size, norm_bin) and edges ``norm_bin_lower``/``_upper``
    (checkpoint, norm_bin).  Two chunked passes: range, then ``dask.array.histogram``.
    """
    import dask
    import dask.array as dsa
    import xarray as xr

    x = da.where(done)
    if scale is not None:
        x = x * scale
    x = x.transpose("checkpoint", "batch_size", "trial")
    lo, hi = dask.compute(x.min(["batch_size", "trial"]).data, x.max(["batch_size", "trial"]).data)
    arr = x.data if isinstance(x.data, dsa.Array) else dsa.from_array(x.data)
    counts, lowers, uppers = [], [], []
    for c in range(x.sizes["checkpoint"]):
        a, b = float(lo[c]), float(hi[c])
        if not np.isfinite(a):
            a, b = 0.0, 1.0
        if b <= a:
            a, b = a - 0.5 * abs(a) - 0.5, b + 0.5 * abs(b) + 0.5
        edges = np.linspace(a, b, bins + 1)
        lowers.append(edges[:-1])
        uppers.append(edges[1:])
        for m in range(x.sizes["batch_size"]):
            v = arr[c, m]
            counts.append(dsa.histogram(v[~dsa.isnan(v)], bins=edges)[0])
    counts = np.asarray(dask.compute(*counts)).reshape(x.sizes["checkpoint"], x.sizes["batch_size"], bins)
    label = da.attrs.get("long_name", da.name) + (" (scaled by μ_ref/μ_m)" if scale is not None else "")
    units = da.attrs.get("units", "1")
    return xr.Dataset(
        {"count": (("checkpoint", "batch_size", "norm_bin"), counts,
                   {"long_name": f"trials per bin of {label}", "units": "count"})},
        coords={"checkpoint": x["checkpoint"].values, "batch_size": x["batch_size"].values,
                "norm_bin_lower": (("checkpoint", "norm_bin"), np.asarray(lowers), {"long_name": label, "units": units}),
                "norm_bin_upper": (("checkpoint", "norm_bin"), np.asarray(uppers), {"long_name": label, "units": units})},
    )
