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


def plot_tail_index(ads: Any, ax: Any) -> Any:
    """Binned-Hill and α-stable tail indices vs batch size with their intervals, per checkpoint."""
    import seaborn as sns

    m = ads["batch_size"].values.astype(float)
    colors = sns.color_palette("colorblind", ads.sizes["checkpoint"])
    for color, c in zip(colors, ads["checkpoint"].values, strict=False):
        for name, marker in (("tail_index_hill", "o"), ("tail_index_alpha_stable", "s")):
            v = ads[name].sel(checkpoint=c).values
            if not np.isfinite(v).any():
                continue
            lo, hi = ads[f"{name}_low"].sel(checkpoint=c).values, ads[f"{name}_high"].sel(checkpoint=c).values
            err = np.abs(np.stack([v - lo, hi - v]))
            err = np.where(np.isfinite(err), err, 0)
            ax.errorbar(m, v, yerr=err, fmt=marker + "-", color=color, ms=4, capsize=2, lw=1,
                        label=f"{c}: {'Hill (pooled)' if name == 'tail_index_hill' else 'α-stable'}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(label_from_attrs(ads["batch_size"]))
    ax.set_ylabel("tail index α (smaller: heavier tail)")
    if not note_if_empty(ax, "no tail index: the store has neither entry histograms with enough entries nor "
                             "vectors"):
        ax.legend(fontsize=7)
    return ax
