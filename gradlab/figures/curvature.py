"""Curvature figures (matplotlib, no torch): data + Axes -> Axes, labels taken from the variables' attrs.

- :func:`plot_sharpness_vs_batch_size`: a sharpness measure against the training batch size (log-log), one
  marker per checkpoint, with the power-law fit of the analysis dataset when given;
- :func:`plot_minibatch_lambda`: λ_max of mini-batch Hessians against m (every trial, mean ± sd), the
  extrapolation λ_full + c·x_m and the full-sample λ_max;
- :func:`plot_interpolation`: Keskar's parametric plot (loss on the left axis, accuracy on a twin axis);
- :func:`sharpness_figures`: which of them a sharpness store gets, by file stem.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from gradlab.analysis.noise_model import finite_population_factor
from gradlab.figures.labels import label_from_attrs
from gradlab.figures.layout import readable_log_ticks


def plot_sharpness_vs_batch_size(ds: Any, ax: Any, *, measure: str = "lambda_max", analysis: Any = None,
                                 subset: str = "all") -> Any:
    """``ds[measure]`` (per checkpoint) against ``train_batch_size`` on log-log axes, with the fit y = a·m^b."""
    y = np.asarray(ds[measure].values, dtype=np.float64)
    m = np.asarray(ds["train_batch_size"].values, dtype=np.float64)
    labels = [str(c) for c in ds["checkpoint"].values]
    markers = "osD^v<>phX*"
    for i, (xi, yi, lab) in enumerate(zip(m, y, labels)):  # a legend entry per checkpoint, never overlapping text
        if np.isfinite(xi) and np.isfinite(yi):
            ax.scatter([xi], [yi], color=f"C{i % 10}", marker=markers[(i // 10) % len(markers)], zorder=3,
                       label=lab if len(labels) <= 12 else None)
    if analysis is not None and measure in [str(v) for v in analysis["measure"].values]:
        sel = dict(measure=measure, x_variable="train_batch_size", subset=subset)
        b = float(analysis["powerlaw_exponent"].sel(sel))
        a = float(analysis["powerlaw_prefactor"].sel(sel))
        lo, hi = float(analysis["powerlaw_exponent_low"].sel(sel)), float(analysis["powerlaw_exponent_high"].sel(sel))
        ok = np.isfinite(m) & (m > 0)
        if np.isfinite(a) and np.isfinite(b) and ok.any():
            grid = np.geomspace(m[ok].min(), m[ok].max(), 50)
            ax.plot(grid, a * grid**b, color="k", lw=1, label=f"fit b = {b:.2f} [{lo:.2f}, {hi:.2f}]")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2)
    ax.set_xscale("log")
    if np.all(y[np.isfinite(y)] > 0):
        ax.set_yscale("log")
    readable_log_ticks(ax)
    ax.set_xlabel(label_from_attrs(ds["train_batch_size"], "training batch size"))
    ax.set_ylabel(label_from_attrs(ds[measure], measure))
    return ax


def plot_minibatch_lambda(ds: Any, ax: Any, *, checkpoint: int | str = 0) -> Any:
    """Mini-batch λ_max against m for one checkpoint: trials, mean ± sd, extrapolation and full-sample λ_max."""
    sel = {"checkpoint": checkpoint} if isinstance(checkpoint, str) else None
    one = ds.sel(sel) if sel else ds.isel(checkpoint=checkpoint)
    m = np.asarray(one["batch_size"].values, dtype=np.float64)
    vals = np.asarray(one["minibatch_lambda_max"].transpose("batch_size", "trial").values, dtype=np.float64)
    for i, mi in enumerate(m):
        ax.scatter(np.full(vals.shape[1], mi), vals[i], s=8, color="C0", alpha=0.4)
    mean = np.nanmean(vals, axis=1)
    sd = np.nanstd(vals, axis=1, ddof=1) if vals.shape[1] > 1 else np.zeros_like(mean)
    ax.errorbar(m, mean, yerr=sd, color="C0", marker="o", capsize=3, label="mean ± sd over trials")
    n = ds.sizes["example"]
    full = float(one["minibatch_lambda_full"]) if "minibatch_lambda_full" in one else np.nan
    slope = float(one["minibatch_slope"]) if "minibatch_slope" in one else np.nan
    if np.isfinite(full) and np.isfinite(slope):
        grid = np.geomspace(m.min(), n, 60)
        ax.plot(grid, full + slope * finite_population_factor(grid, n, replacement=False) / grid, color="C1",
                label=f"extrapolation: lambda_full = {full:.4g}")
    if "lambda_max" in one:
        ax.axhline(float(one["lambda_max"]), color="k", ls="--", lw=1, label="sample lambda_max (Lanczos)")
    ax.set_xscale("log")
    readable_log_ticks(ax, "x")
    ax.set_xlabel(label_from_attrs(ds["batch_size"], "mini-batch size"))
    ax.set_ylabel(f"mini-batch lambda_max [{ds['minibatch_lambda_max'].attrs.get('units', '')}]")
    ax.set_title(f"checkpoint {one['checkpoint'].values}", fontsize=9)
    ax.legend(fontsize=7)
    return ax


def plot_interpolation(ds: Any, ax: Any) -> Any:
    """Keskar's parametric plot: train/test loss (left axis) and accuracy (twin right axis) against α."""
    alpha = np.asarray(ds["alpha"].values, dtype=np.float64)
    for split, style in (("train", "-"), ("test", "--")):
        name = f"interp_{split}_loss"
        if name in ds.variables:
            ax.plot(alpha, ds[name].values, "C0" + style, label=f"{split} loss")
    ax.set_xlabel(label_from_attrs(ds["alpha"], "alpha"))
    units = str(ds["interp_train_loss"].attrs.get("units", ""))
    ax.set_ylabel("loss" if units in ("", "1", "loss") else f"loss [{units}]", color="C0")  # not "loss [loss]"
    twin = ax.twinx()
    for split, style in (("train", "-"), ("test", "--")):
        name = f"interp_{split}_accuracy"
        if name in ds.variables:
            twin.plot(alpha, ds[name].values, "C1" + style, label=f"{split} accuracy")
    twin.set_ylabel("accuracy", color="C1")
    for a in (0.0, 1.0):
        ax.axvline(a, color="grey", lw=0.8, ls=":")
    lines = [ln for ln in ax.get_lines() + twin.get_lines() if not ln.get_label().startswith("_")]
    ax.legend(lines, [ln.get_label() for ln in lines], fontsize=7, loc="upper center")
    return ax


def sharpness_figures(ds: Any, analysis: Any = None) -> list[tuple[str, Callable[[Any], Any]]]:
    """The figures of a sharpness dataset as (file stem, draw(Axes)): sharpness vs batch size always, one
    mini-batch λ_max figure per checkpoint when measured, the interpolation when measured."""
    jobs: list[tuple[str, Callable[[Any], Any]]] = [
        ("sharpness_vs_batch_size", lambda ax: plot_sharpness_vs_batch_size(ds, ax, analysis=analysis))]
    if "minibatch_lambda_max" in ds.variables:
        for c in range(ds.sizes["checkpoint"]):
            jobs.append((f"minibatch_lambda_{c}", lambda ax, c=c: plot_minibatch_lambda(ds, ax, checkpoint=c)))
    if "interp_train_loss" in ds.variables:
        jobs.append(("interpolation", lambda ax: plot_interpolation(ds, ax)))
    return jobs
