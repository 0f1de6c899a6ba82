"""The figure of a registered per-trial quantity: mean ± standard deviation over trials against batch size,
labelled from the analysis attrs (which come from the quantity's own declaration)."""

from __future__ import annotations

from typing import Any

import numpy as np

from gradlab.figures.labels import label_from_attrs
from gradlab.figures.layout import note_if_empty


def plot_quantity(stats: Any, ax: Any, name: str) -> Any:
    """Mean (markers and line) ± std (error bars) of output ``name`` against batch size, one line per
    checkpoint; a note on the axes when nothing is finite."""
    mean, std = stats[f"{name}_mean"], stats[f"{name}_std"]
    m = np.asarray(mean["batch_size"].values, dtype=float)
    drawn = False
    for ci, c in enumerate(mean["checkpoint"].values):
        y = np.asarray(mean.isel(checkpoint=ci).values, dtype=float)
        e = np.asarray(std.isel(checkpoint=ci).values, dtype=float)
        ok = np.isfinite(y)
        if ok.any():
            ax.errorbar(m[ok], y[ok], yerr=np.where(np.isfinite(e[ok]), e[ok], 0.0), marker="o", ms=4, capsize=2,
                        label=str(c))
            drawn = True
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size m [examples]")
    ax.set_ylabel(label_from_attrs(mean, width=36))
    if not note_if_empty(ax, "no finite value in the finished trials") and drawn:
        ax.legend(title="checkpoint", fontsize="small")
    return ax
