"""Figures of a monitor store: B_noise, ‖G‖² and tr Σ against steps (or examples seen), with intervals.

Plot functions take data and an Axes and return the Axes; labels come from the variables' attrs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradlab.figures.labels import label_from_attrs
from gradlab.figures.layout import readable_log_ticks

_COMMON = (
    "Shaded: {level:.0%} intervals (t intervals of the moving averages; Fieller's for B_noise); hatched where the "
    "upper end is unbounded (‖G‖² not distinguishable from 0: B_noise is then only known to be above the band's "
    "lower edge, and the hatching's top is the panel's edge, not data). Non-positive moving averages (a negative "
    "estimate of ‖G‖² when it is near 0) cannot be drawn on the log axis and leave gaps. x-axis: optimizer step "
    "(bottom) and examples seen (top)."
)
CAPTION_NOISE = (
    "Gradient noise during training, from the monitor store, for all parameters and the weight and bias groups. "
    "Top: B_noise = EMA(tr Σ)/EMA(‖G‖²), the batch size above which a larger batch buys little (McCandlish et al. "
    "2018), with dots for the single-step B_simple (noisy and biased, shown for scale only). Middle and bottom: "
    "the moving averages (decay β per recorded step) of the per-step unbiased estimates of ‖G‖² (the squared "
    "norm of the full-data gradient) and tr Σ (the per-example gradient noise). " + _COMMON
)
CAPTION_LAYERS = (
    "B_noise = EMA(tr Σ)/EMA(‖G‖²) for each parameter tensor (one line per tensor, colours in the legend), from "
    "the monitor store: which layers' gradients are noisiest relative to their signal. " + _COMMON
)


def _band(ax: Any, steps: np.ndarray, y: np.ndarray, lo: np.ndarray, hi: np.ndarray, color: Any,
          alpha: float) -> None:
    """The interval band on a log axis: bounded parts filled, unbounded upper ends hatched up to a top edge."""
    pos = y[np.isfinite(y) & (y > 0)]
    top = float(pos.max()) * 10 if pos.size else np.nan
    low = np.where(np.isfinite(lo) & (lo > 0), lo, np.nan)
    bounded = np.isfinite(hi)
    ax.fill_between(steps, low, np.where(bounded, np.minimum(hi, top), np.nan), color=color, alpha=alpha, lw=0)
    if (~bounded & np.isfinite(low)).any():
        ax.fill_between(steps, low, np.where(~bounded, top, np.nan), facecolor="none", edgecolor=color,
                        alpha=alpha * 2, hatch="///", lw=0)


def _positive(y: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(y) & (y > 0), y, np.nan)


def _empty(ax: Any, what: str) -> Any:
    ax.text(0.5, 0.5, f"no recorded step has {what} (see the store's missing flags)", ha="center", va="center",
            transform=ax.transAxes, fontsize=8)
    return ax


def _steps_axis(ds: Any, ax: Any) -> np.ndarray:
    steps = np.asarray(ds["step"].values)
    ax.set_xlabel(label_from_attrs(ds["step"]))
    seen = np.asarray(ds["examples_seen"].values, dtype=np.float64)
    if steps.size >= 2 and np.all(np.diff(seen) > 0) and np.all(np.diff(steps) > 0):
        from matplotlib.ticker import EngFormatter, MaxNLocator

        # extrapolated past the recorded steps (np.interp would clamp: every tick beyond the last step would pile
        # up at the panel's edge, overlapping), a few ticks in short form (120k, not 120000)
        sec = ax.secondary_xaxis("top", functions=(lambda s: _extrapolate(s, steps, seen),
                                                   lambda e: _extrapolate(e, seen, steps)))
        sec.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        sec.xaxis.set_major_formatter(EngFormatter(sep=""))
        sec.set_xlabel(label_from_attrs(ds["examples_seen"]))
    return steps


def _extrapolate(x: Any, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """np.interp, continued linearly beyond both ends (with the slope of the first and last segment)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.interp(x, xp, fp)
    lo = fp[0] + (x - xp[0]) * (fp[1] - fp[0]) / (xp[1] - xp[0])
    hi = fp[-1] + (x - xp[-1]) * (fp[-1] - fp[-2]) / (xp[-1] - xp[-2])
    return np.where(x < xp[0], lo, np.where(x > xp[-1], hi, y))


def plot_series(ds: Any, ax: Any, name: str, groups: tuple[str, ...] = ("all", "weight", "bias"),
                log: bool = True, raw: str | None = None) -> Any:
    """``name`` (e.g. ``b_noise``, ``grad_sq_norm_ema``) per group against step, with ``name_low/high`` bands."""
    import seaborn as sns

    steps = _steps_axis(ds, ax)
    ax.set_ylabel(label_from_attrs(ds[name]))
    colors = sns.color_palette("colorblind", len(groups))
    drawn = 0
    for color, g in zip(colors, groups):
        y = np.asarray(ds[name].sel(group=g).values, dtype=np.float64)
        if log:
            y = _positive(y)
        if not np.isfinite(y).any():
            continue
        drawn += 1
        ax.plot(steps, y, color=color, label=g, lw=1.5)
        if f"{name}_low" in ds:
            lo = np.asarray(ds[f"{name}_low"].sel(group=g).values, dtype=np.float64)
            hi = np.asarray(ds[f"{name}_high"].sel(group=g).values, dtype=np.float64)
            _band(ax, steps, y, lo, hi, color, 0.2)
        if raw is not None and raw in ds:
            r = np.asarray(ds[raw].sel(group=g).values, dtype=np.float64)
            ax.scatter(steps, _positive(r), s=4, color=color, alpha=0.35)
    if not drawn:
        return _empty(ax, "a positive estimate")
    if log:
        ax.set_yscale("log")
        readable_log_ticks(ax, "y")
    ax.legend(fontsize=7, title="group", title_fontsize=7)
    return ax


def plot_layers(ds: Any, ax: Any, name: str = "b_noise_layer") -> Any:
    """``name`` for every parameter tensor against step, with bands."""
    import seaborn as sns

    steps = _steps_axis(ds, ax)
    ax.set_ylabel(label_from_attrs(ds[name]))
    layers = [str(v) for v in ds["layer"].values]
    colors = sns.color_palette("viridis", len(layers))
    base = name.removesuffix("_layer")
    drawn = 0
    for color, layer in zip(colors, layers):
        y = _positive(np.asarray(ds[name].sel(layer=layer).values, dtype=np.float64))
        if not np.isfinite(y).any():
            continue
        drawn += 1
        ax.plot(steps, y, color=color, label=layer, lw=1.2)
        lo_name, hi_name = f"{base}_low_layer", f"{base}_high_layer"
        if lo_name in ds:
            lo = np.asarray(ds[lo_name].sel(layer=layer).values, dtype=np.float64)
            hi = np.asarray(ds[hi_name].sel(layer=layer).values, dtype=np.float64)
            _band(ax, steps, y, lo, hi, color, 0.12)
    if not drawn:
        return _empty(ax, "a positive estimate")
    ax.set_yscale("log")
    readable_log_ticks(ax, "y")
    ax.legend(fontsize=6, title="parameter tensor", title_fontsize=6, ncol=2)
    return ax
