"""Figures and the HTML report of an analysed probe store (the only place that saves figure files).

Uses ``matplotlib.figure.Figure`` directly (Agg canvas, no pyplot global state); each figure is saved as PNG
and SVG into the output folder, and ``report.html`` shows them with the fit table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gradlab.analysis.table import HEADER, fit_rows


CAPTIONS = {
    "norm_vs_batch_size": "Each panel's norm against batch size m (log–log), one colour per checkpoint: for ‖S‖ "
                          "the mean over trials (error bars: ± 1 standard deviation over trials), for the minibatch "
                          "sum ‖s_B‖ the RMS √(mean ‖s_B‖²) over trials and minibatches; with the power law c·m^β "
                          "(dashed; β and its 95% interval in the legend). For ‖s_B‖ the solid line is the fitted "
                          "noise model √(m²‖G‖² + m·c_m·tr Σ) and the dotted vertical line B_noise: the slope of "
                          "the noise model tends to ½ (√m) well left of B_noise and to 1 well right of it, passing "
                          "through intermediate slopes around it (the local slopes are in summary.json).",
    "normalised_std": "Standard deviation over trials of ‖S‖ scaled by μ_ref/μ_m (the blog's \"same distance "
                      "moved\" normalisation) against batch size m, one line per checkpoint: a rising line means "
                      "larger batches give a more variable displacement for the same mean distance.",
    "norm_ridge_normalised": "Histograms of ‖S‖ across trials, one row per batch size (m grows upwards), scaled "
                             "by μ_ref/μ_m so every row has the reference mean; the row heights are normalised, "
                             "so compare widths and shapes, not heights.",
    "norm_ridge": "Histograms of ‖S‖ across trials, one row per batch size (m grows upwards), unscaled; row "
                  "heights are normalised to the row's peak.",
    "entry_tails": "Counts of |entries of S| per log-magnitude bin (log–log, pooled over trials and over the "
                   "selected tensors), one line per batch size; triangles are the overflow bin. A flatter right "
                   "end means a heavier tail.",
    "tail_index": "Tail indices of the entries of S against batch size with 95% intervals: binned Hill (circles; "
                  "pooled over tensors) and α-stable (squares; blocks inside layers). Smaller means heavier.",
    "weights_per_layer": "Distance from initialisation ‖θ − θ₀‖ and cosine to initialisation per parameter tensor, "
                         "one bar per checkpoint.",
}


def _save(fig: Any, out: Path, stem: str, checks: dict[str, list[str]] | None = None) -> list[str]:
    from gradlab.figures.layout import overlapping_text

    if checks is not None:
        checks[stem] = overlapping_text(fig)
    names = []
    for ext in ("png", "svg"):
        fig.savefig(out / f"{stem}.{ext}", dpi=120, bbox_inches="tight")
        names.append(f"{stem}.{ext}")
    return names


def render_figures(ds: Any, ads: Any, fits: dict[str, Any], out: Path, result: dict[str, Any]) -> list[str]:
    """Draw every figure of the analysis into ``out`` (PNG + SVG) and write ``report.html``; returns file names."""
    from matplotlib.figure import Figure

    from gradlab.figures import norms, report, tails, weights

    files: list[str] = []
    checks: dict[str, list[str]] = {}
    labels = [str(c) for c in ads["checkpoint"].values]
    nn = list(ads["norm"].values)
    fig = Figure(figsize=(5.5 * len(nn), 4.2), layout="constrained")
    for ax, n in zip(fig.subplots(1, len(nn), squeeze=False)[0], nn, strict=True):
        norms.plot_norm_vs_batch_size(ads, ax, norm=str(n))
    files += _save(fig, out, checks=checks, stem="norm_vs_batch_size")

    frozen = result.get("protocol") == "frozen"
    if not frozen:  # a frozen store's ‖S‖ is fixed by construction (result["not_measured"] says why)
        fig = Figure(figsize=(5.5, 4), layout="constrained")
        norms.plot_normalised_std(ads, fig.subplots())
        files += _save(fig, out, checks=checks, stem="normalised_std")

        for normalised, stem in ((True, "norm_ridge_normalised"), (False, "norm_ridge")):
            fig = Figure(figsize=(4.5 * len(labels), 5), layout="constrained")
            for ax, c in zip(fig.subplots(1, len(labels), squeeze=False)[0], labels, strict=True):
                norms.plot_norm_ridge(ads, ax, c, normalised=normalised)
            files += _save(fig, out, stem, checks)

    if "entry_hist_pooled" in ads:
        tail_ads = ads.sel(batch_size=[int(ads.attrs["ref_batch_size"])]) if frozen else ads
        fig = Figure(figsize=(5 * len(labels), 4), layout="constrained")
        for ax, c in zip(fig.subplots(1, len(labels), squeeze=False)[0], labels, strict=True):
            tails.plot_entry_tails(tail_ads, ax, c)
        files += _save(fig, out, checks=checks, stem="entry_tails")

        if not frozen:
            fig = Figure(figsize=(5.5, 4), layout="constrained")
            tails.plot_tail_index(ads, fig.subplots())
            files += _save(fig, out, checks=checks, stem="tail_index")

    layer_vars = [v for v in ("dist_init_layer", "cos_init_layer") if v in ds]
    if layer_vars:
        fig = Figure(figsize=(5 * len(layer_vars), 4), layout="constrained")
        sub = ds[layer_vars].sel(checkpoint=labels).compute()
        for ax, v in zip(fig.subplots(1, len(layer_vars), squeeze=False)[0], layer_vars, strict=True):
            weights.plot_per_layer(sub[v], ax)
        files += _save(fig, out, checks=checks, stem="weights_per_layer")

    from gradlab.analysis.quantities import quantity_captions
    from gradlab.figures.quantities import plot_quantity

    for name in result.get("quantities", {}):  # the registered quantities' outputs, one value per m
        if "batch_size" in ads[f"{name}_mean"].dims:
            fig = Figure(figsize=(5.5, 4), layout="constrained")
            plot_quantity(ads, fig.subplots(), name)
            files += _save(fig, out, checks=checks, stem=f"quantity_{name}")

    captions = {**CAPTIONS, **quantity_captions()}
    pngs = [f for f in files if f.endswith(".png")]
    result["figure_captions"] = {f: captions.get(f.removesuffix(".png"), "") for f in pngs}
    result["figure_layout_problems"] = {k: v for k, v in checks.items() if v}
    page = report.html_report(f"gradlab analysis of {Path(result['store']).name}", HEADER, fit_rows(result),
                              [(f, result["figure_captions"][f]) for f in pngs], result.get("notes", []))
    (out / "report.html").write_text(page, encoding="utf-8")
    return [*files, "report.html"]
