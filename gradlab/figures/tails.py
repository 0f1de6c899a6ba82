"""Tails of the entries of S: pooled magnitude histograms on log counts, and tail indices vs batch size."""

from __future__ import annotations

from typing import Any

import numpy as np

from gradlab.figures.labels import label_from_attrs
from gradlab.figures.layout import note_if_empty


def plot_entry_tails(ads: Any, ax: Any, checkpoint: str) -> Any:
    """Counts of |entries of S| per log-magnitude bin (both signs pooled, over trials), log-log, one line per m.

    Under- and overflow bins are drawn as points at the ends (never clipped into edge bins)."""
    import seaborn as sns

    from gradlab.analysis.tails import magnitude_counts, magnitude_bins

    hist = ads["entry_hist_pooled"].sel(checkpoint=checkpoint)
    edges, *_ = magnitude_bins()
    m = ads["batch_size"].values
    colors = sns.color_palette("rocket_r", len(m))
    for i, mm in enumerate(m):
        counts, over = magnitude_counts(hist.sel(batch_size=mm).values)
        nz = counts > 0
        ax.step(edges[nz], counts[nz], where="post", color=colors[i], lw=1, label=f"m = {mm}")
        if over > 0:
            ax.plot([edges[-1] * 10 ** (1 / 8)], [over], "^", color=colors[i])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("|" + label_from_attrs(ads["bin_lower"]) + "|" if "bin_lower" in ads.coords else "|entry|")
    ax.set_ylabel(label_from_attrs(hist))
    ax.set_title(str(checkpoint), fontsize=9)
    if not note_if_empty(ax, "no entries of S above the underflow bin"):
        ax.legend(fontsize=6, ncol=2)
    return ax


TAIL_QUANTITIES = {
    "hill": ("tail_index_hill", "o", "Hill tail exponent α of |entries|\n(pooled over tensors; smaller: heavier)"),
    "alpha_stable": ("tail_index_alpha_stable", "s", "α-stable index α, defined on (0, 2]\n(smaller: heavier)"),
}


def has_tail_index(ads: Any, quantity: str) -> bool:
    """Whether the analysis dataset holds a finite estimate of ``quantity`` ("hill" or "alpha_stable")."""
    name = TAIL_QUANTITIES[quantity][0]
    return name in ads and bool(np.isfinite(np.asarray(ads[name].values, dtype=np.float64)).any())


def plot_tail_index(ads: Any, ax: Any, quantity: str = "both") -> Any:
    """Tail indices vs batch size with their intervals, per checkpoint, one quantity per panel.

    ``quantity``: ``"hill"`` (the binned Hill estimate of the tail exponent of |entries|: any positive value) or
    ``"alpha_stable"`` (the α-stable index, defined on (0, 2] only: the α = 2 boundary is drawn, and estimates
    above it -- outside the α-stable model, reported unclipped -- get open markers over a grey band) on ``ax``;
    ``"both"`` splits ``ax``'s area into the two panels side by side and returns them.  The two are different
    quantities and never share an axis."""
    if quantity == "both":
        spec = ax.get_subplotspec()
        fig = ax.figure
        ax.remove()
        left, right = (fig.add_subplot(g) for g in spec.subgridspec(1, 2, wspace=0.8))
        return plot_tail_index(ads, left, "hill"), plot_tail_index(ads, right, "alpha_stable")
    if quantity not in TAIL_QUANTITIES:
        raise ValueError(f"quantity must be 'hill', 'alpha_stable' or 'both', got {quantity!r}")
    import seaborn as sns

    name, marker, ylabel = TAIL_QUANTITIES[quantity]
    stable = quantity == "alpha_stable"
    m = ads["batch_size"].values.astype(float)
    colors = sns.color_palette("colorblind", ads.sizes["checkpoint"])
    outside_any = False
    for color, c in zip(colors, ads["checkpoint"].values, strict=False):
        if name not in ads:
            break
        v = np.asarray(ads[name].sel(checkpoint=c).values, dtype=np.float64)
        if not np.isfinite(v).any():
            continue
        lo, hi = ads[f"{name}_low"].sel(checkpoint=c).values, ads[f"{name}_high"].sel(checkpoint=c).values
        err = np.abs(np.stack([v - lo, hi - v]))
        err = np.where(np.isfinite(err), err, 0)
        ax.errorbar(m, v, yerr=err, fmt=marker + "-", color=color, ms=4, capsize=2, lw=1, label=str(c))
        if stable:
            out = np.isfinite(v) & ~((v > 0) & (v <= 2))
            if out.any():
                outside_any = True
                ax.plot(m[out], v[out], marker, ms=7, mfc="white", mec=color, mew=1.2, ls="none")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(label_from_attrs(ads["batch_size"]))
    ax.set_ylabel(ylabel)
    ax.set_title("binned Hill estimate" if not stable else "α-stable index", fontsize=9)
    if note_if_empty(ax, "no Hill estimate: needs entry histograms with enough entries" if not stable else
                     "no α-stable index: needs the vectors S (gradlab probe --keep vectors)"):
        return ax
    if stable:
        ax.axhline(2.0, color="0.25", ls="--", lw=1, label="α = 2 (Gaussian)")
        top = ax.get_ylim()[1]
        if outside_any or top > 2:
            ax.axhspan(2.0, max(top, 2.2), color="0.85", zorder=0, lw=0,
                       label="> 2: outside the α-stable\nmodel (open: unclipped)")
            ax.set_ylim(top=max(top, 2.2))
        ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]))
    ax.legend(fontsize=6, title="checkpoint" if not stable else None, title_fontsize=6)
    return ax
