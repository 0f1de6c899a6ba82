"""Norms across batch sizes: mean with fits, normalised std, and ridge plots of the ‖S‖ histograms.

Inputs are the ``analysis`` group (see ``gradlab.analysis.output``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradlab.figures.labels import label_from_attrs


def _palette(n: int) -> list[Any]:
    import seaborn as sns

    return list(sns.color_palette("colorblind", max(n, 1)))


def plot_norm_vs_batch_size(ads: Any, ax: Any, norm: str = "grad_norm") -> Any:
    """log-log mean norm vs batch size per checkpoint, with the power law c·m^β (dashed) and, for the RMS of
    ‖s_B‖ of frozen stores, the noise model √(m²‖G‖² + m c_m tr Σ) (solid) and B_noise (dotted)."""
    m = ads["batch_size"].values.astype(float)
    mu = ads["power_law_mean"].sel(norm=norm)
    grid = np.geomspace(m.min(), m.max(), 200)
    for color, c in zip(_palette(ads.sizes["checkpoint"]), ads["checkpoint"].values, strict=False):
        y = mu.sel(checkpoint=c).values
        err = None
        if norm == "grad_norm":
            err = ads["grad_norm_std"].sel(checkpoint=c).values
        ax.errorbar(m, y, yerr=err, fmt="o", color=color, ms=4, capsize=2, label=f"{c}")
        beta = ads["beta"].sel(checkpoint=c, norm=norm)
        amp = float(ads["power_law_amplitude"].sel(checkpoint=c, norm=norm))
        lo, hi = float(ads["beta_low"].sel(checkpoint=c, norm=norm)), float(ads["beta_high"].sel(checkpoint=c,
                                                                                                   norm=norm))
        ax.plot(grid, amp * grid ** float(beta), "--", color=color, lw=1,
                label=f"{c}: m^β, β = {float(beta):.3g} [{lo:.3g}, {hi:.3g}]")
        if norm == "minibatch_sum_rms" and "grad_sq_norm_fit" in ads:
            g2 = float(ads["grad_sq_norm_fit"].sel(checkpoint=c))
            tr = float(ads["trace_cov_fit"].sel(checkpoint=c))
            fpf = np.interp(grid, m, ads["finite_population_factor"].values)
            ax.plot(grid, np.sqrt(np.maximum(grid**2 * g2 + grid * fpf * tr, 0)), "-", color=color, lw=1,
                    label=f"{c}: noise model")
            b = float(ads["b_noise_fit"].sel(checkpoint=c))
            if np.isfinite(b) and m.min() <= b <= m.max():
                ax.axvline(b, color=color, ls=":", lw=1, label=f"{c}: B_noise = {b:.3g}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(label_from_attrs(ads["batch_size"]))
    unit = mu.attrs.get("units")
    ylabel = "RMS √(mean ‖s_B‖²)" if norm == "minibatch_sum_rms" else "mean over trials (± 1 sd)" \
        if norm == "grad_norm" else "mean over trials"
    ax.set_ylabel(f"{ylabel} [{unit}]" if unit else ylabel)
    ax.set_title(str(ads["norm"].attrs.get(norm, norm)), fontsize=9)
    ax.legend(fontsize=7)
    return ax


def plot_normalised_std(ads: Any, ax: Any, name: str = "grad_norm") -> Any:
    """The blog's normalised std σ_m·μ_ref/μ_m vs batch size, one line per checkpoint."""
    da = ads[f"{name}_std_normalised"]
    m = ads["batch_size"].values
    for color, c in zip(_palette(ads.sizes["checkpoint"]), ads["checkpoint"].values, strict=False):
        ax.plot(m, da.sel(checkpoint=c).values, "o-", color=color, ms=4, label=str(c))
    ax.set_xscale("log", base=2)
    ax.set_xlabel(label_from_attrs(ads["batch_size"]))
    ax.set_ylabel(label_from_attrs(da))
    ax.legend(fontsize=7)
    return ax


def plot_norm_ridge(ads: Any, ax: Any, checkpoint: str, normalised: bool = True, overlap: float = 1.6) -> Any:
    """Ridge plot: one histogram of ‖S‖ across trials per batch size, stacked upwards with growing m."""
    name = "norm_hist_normalised" if normalised else "norm_hist"
    counts = ads[name].sel(checkpoint=checkpoint)
    lower = ads[f"{name}_lower"].sel(checkpoint=checkpoint).values
    upper = ads[f"{name}_upper"].sel(checkpoint=checkpoint).values
    centres = 0.5 * (lower + upper)
    m = ads["batch_size"].values
    colors = _palette(len(m)) if len(m) <= 10 else list(__import__("seaborn").color_palette("rocket", len(m)))
    for i, mm in enumerate(m):
        c = counts.sel(batch_size=mm).values.astype(float)
        h = c / c.max() * overlap if c.max() > 0 else c
        ax.fill_between(centres, i, i + h, step="mid", color=colors[i], alpha=0.8, lw=0.5, edgecolor="k")
    ax.set_ylim(-0.2, len(m) - 1 + overlap + 0.2)  # the top rows' bars stay inside the axes
    ax.set_xlim(lower.min(), upper.max())
    ax.set_yticks(np.arange(len(m)))
    ax.set_yticklabels([str(v) for v in m], fontsize=7)
    ax.set_ylabel(label_from_attrs(ads["batch_size"]))
    ax.set_xlabel(label_from_attrs(ads[f"{name}_lower"]))
    ax.set_title(str(checkpoint), fontsize=9)
    return ax
