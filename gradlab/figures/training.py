"""Figures of training-run stores: grids over batch size × lr, distance vs epoch, stable lr ranges.

Plot functions take data and an Axes and return the Axes; they never save files.
"""

from __future__ import annotations

from typing import Any

from matplotlib.axes import Axes
import numpy as np
import pandas as pd
import seaborn as sns

from gradlab.analysis.training import log_t_fit
from gradlab.figures.labels import label_from_attrs


def plot_grid(table: pd.DataFrame, ax: Axes, title: str, fmt: str = ".3g", cmap: str = "viridis") -> Axes:
    """Heatmap of a batch size × lr table (from :func:`gradlab.analysis.training.grid`)."""
    sns.heatmap(table, annot=True, fmt=fmt, cmap=cmap, ax=ax, cbar=False)
    ax.set_title(title)
    ax.set_xlabel(f"learning rate ({table.columns.name})")
    ax.set_ylabel(f"batch size ({table.index.name})")
    return ax


def plot_distance_vs_epoch(ds: Any, ax: Axes, group: str = "all", fit: bool = True) -> Axes:
    """‖θ_t − θ₀‖ against epoch for every run, log-scaled epochs, with the a + b·ln t fit dashed."""
    da = ds.dist_init.sel(group=group)
    epochs = ds.epoch.values
    palette = sns.color_palette("viridis", ds.sizes["run"])
    for i, run in enumerate(ds.run.values):
        d = da.isel(run=i).values
        ax.plot(epochs[1:], d[1:], marker="o", ms=3, color=palette[i], label=str(run))
        if fit:
            f = log_t_fit(epochs, d)
            if np.isfinite(f.b):
                t = np.geomspace(1, epochs[-1], 50)
                ax.plot(t, f.a + f.b * np.log(t), ls="--", color=palette[i], lw=1)
    ax.set_xscale("log")
    ax.set_xlabel(label_from_attrs(ds.epoch))
    ax.set_ylabel(f"{label_from_attrs(da)} ({group})")
    ax.legend(fontsize="x-small")
    return ax


def plot_stable_lr(ranges: pd.DataFrame, ax: Axes) -> Axes:
    """The range of stable learning rates per batch size (vertical bars on log axes)."""
    ok = ranges.dropna(subset=["lr_min", "lr_max"])
    ax.vlines(ok.batch_size, ok.lr_min, ok.lr_max, lw=6, color="tab:blue")
    ax.scatter(ok.batch_size, ok.lr_min, color="tab:blue", marker="_", s=200)
    ax.scatter(ok.batch_size, ok.lr_max, color="tab:blue", marker="_", s=200)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size [examples]")
    ax.set_ylabel("stable learning rates")
    return ax
