"""Figures of a monitor store: B_noise, ‖G‖² and tr Σ against steps (or examples seen), with intervals.

Plot functions take data and an Axes and return the Axes; labels come from the variables' attrs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradlab.figures.labels import label_from_attrs

CAPTION = (
    "Gradient noise during training, from the monitor store. Lines: moving averages (decay β per recorded step) "
    "of the per-step unbiased estimates of ‖G‖² (the squared norm of the full-data gradient) and tr Σ (the "
    "per-example gradient noise), and B_noise = EMA(tr Σ)/EMA(‖G‖²), the batch size above which a larger batch "
    "buys little (McCandlish et al. 2018); shaded: {level:.0%} intervals (Fieller's for B_noise; an upper end "
    "at the top edge means ‖G‖² is not distinguishable from 0); dots: the single-step B_simple, which is noisy "
    "and biased, shown only for scale. Per-tensor panels: the same B_noise for each parameter tensor. "
    "x-axis: optimizer step (bottom) and examples seen (top)."
)


def _steps_axis(ds: Any, ax: Any) -> np.ndarray:
    steps = np.asarray(ds["step"].values)
    ax.set_xlabel(label_from_attrs(ds["step"]))
    seen = np.asarray(ds["examples_seen"].values, dtype=np.float64)
    if steps.size >= 2 and np.all(np.diff(seen) > 0) and np.all(np.diff(steps) > 0):
        sec = ax.secondary_xaxis("top", functions=(lambda s: np.interp(s, steps, seen),
                                                   lambda e: np.interp(e, seen, steps)))
        sec.set_xlabel(label_from_attrs(ds["examples_seen"]))
    return steps


def plot_series(ds: Any, ax: Any, name: str, groups: tuple[str, ...] = ("all", "weight", "bias"),
                log: bool = True, raw: str | None = None) -> Any:
    """``name`` (e.g. ``b_noise``, ``grad_sq_norm_ema``) per group against step, with ``name_low/high`` bands."""
    import seaborn as sns

    steps = _steps_axis(ds, ax)
    colors = sns.color_palette("colorblind", len(groups))
    for color, g in zip(colors, groups):
        y = np.asarray(ds[name].sel(group=g).values, dtype=np.float64)
        if not np.isfinite(y).any():
            continue
        ax.plot(steps, y, color=color, label=g, lw=1.5)
        if f"{name}_low" in ds:
            lo = np.asarray(ds[f"{name}_low"].sel(group=g).values, dtype=np.float64)
            hi = np.asarray(ds[f"{name}_high"].sel(group=g).values, dtype=np.float64)
            top = np.nanmax(np.where(np.isfinite(y), y, np.nan)) * 10
            ax.fill_between(steps, np.where(np.isfinite(lo), lo, np.nan), np.minimum(np.where(
                np.isfinite(hi), hi, top), top), color=color, alpha=0.2, lw=0)
        if raw is not None and raw in ds:
            r = np.asarray(ds[raw].sel(group=g).values, dtype=np.float64)
            ax.scatter(steps, np.where(r > 0, r, np.nan), s=4, color=color, alpha=0.35)
    ax.set_ylabel(label_from_attrs(ds[name]))
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=7, title="group", title_fontsize=7)
    return ax


def plot_layers(ds: Any, ax: Any, name: str = "b_noise_layer") -> Any:
    """``name`` for every parameter tensor against step, with bands."""
    import seaborn as sns

    steps = _steps_axis(ds, ax)
    layers = [str(v) for v in ds["layer"].values]
    colors = sns.color_palette("viridis", len(layers))
    base = name.removesuffix("_layer")
    for color, layer in zip(colors, layers):
        y = np.asarray(ds[name].sel(layer=layer).values, dtype=np.float64)
        if not np.isfinite(y).any():
            continue
        ax.plot(steps, y, color=color, label=layer, lw=1.2)
        lo_name, hi_name = f"{base}_low_layer", f"{base}_high_layer"
        if lo_name in ds:
            lo = np.asarray(ds[lo_name].sel(layer=layer).values, dtype=np.float64)
            hi = np.asarray(ds[hi_name].sel(layer=layer).values, dtype=np.float64)
            top = np.nanmax(y) * 10
            ax.fill_between(steps, lo, np.minimum(np.where(np.isfinite(hi), hi, top), top), color=color, alpha=0.12,
                            lw=0)
    ax.set_ylabel(label_from_attrs(ds[name]))
    ax.set_yscale("log")
    ax.legend(fontsize=6, title="parameter tensor", title_fontsize=6, ncol=2)
    return ax
