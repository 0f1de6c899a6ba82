"""Figures and the HTML report of an analysed probe store (the only place that saves figure files).

Uses ``matplotlib.figure.Figure`` directly (Agg canvas, no pyplot global state); each figure is saved as PNG
and SVG into the output folder, and ``report.html`` shows them with the fit table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gradlab.analysis.table import HEADER, fit_rows


def _save(fig: Any, out: Path, stem: str) -> list[str]:
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
    labels = [str(c) for c in ads["checkpoint"].values]
    nn = list(ads["norm"].values)
    fig = Figure(figsize=(5.5 * len(nn), 4.2), layout="constrained")
    for ax, n in zip(fig.subplots(1, len(nn), squeeze=False)[0], nn, strict=True):
        norms.plot_norm_vs_batch_size(ads, ax, norm=str(n))
    files += _save(fig, out, "norm_vs_batch_size")

    frozen = result.get("protocol") == "frozen"
    if not frozen:  # a frozen store's ‖S‖ is fixed by construction (result["not_measured"] says why)
        fig = Figure(figsize=(5.5, 4), layout="constrained")
        norms.plot_normalised_std(ads, fig.subplots())
        files += _save(fig, out, "normalised_std")

        for normalised, stem in ((True, "norm_ridge_normalised"), (False, "norm_ridge")):
            fig = Figure(figsize=(4.5 * len(labels), 5), layout="constrained")
            for ax, c in zip(fig.subplots(1, len(labels), squeeze=False)[0], labels, strict=True):
                norms.plot_norm_ridge(ads, ax, c, normalised=normalised)
            files += _save(fig, out, stem)

    if "entry_hist_pooled" in ads:
        tail_ads = ads.sel(batch_size=[int(ads.attrs["ref_batch_size"])]) if frozen else ads
        fig = Figure(figsize=(5 * len(labels), 4), layout="constrained")
        for ax, c in zip(fig.subplots(1, len(labels), squeeze=False)[0], labels, strict=True):
            tails.plot_entry_tails(tail_ads, ax, c)
        files += _save(fig, out, "entry_tails")

        if not frozen:
            fig = Figure(figsize=(5.5, 4), layout="constrained")
            tails.plot_tail_index(ads, fig.subplots())
            files += _save(fig, out, "tail_index")

    layer_vars = [v for v in ("dist_init_layer", "cos_init_layer") if v in ds]
    if layer_vars:
        fig = Figure(figsize=(5 * len(layer_vars), 4), layout="constrained")
        sub = ds[layer_vars].sel(checkpoint=labels).compute()
        for ax, v in zip(fig.subplots(1, len(layer_vars), squeeze=False)[0], layer_vars, strict=True):
            weights.plot_per_layer(sub[v], ax)
        files += _save(fig, out, "weights_per_layer")

    pngs = [f for f in files if f.endswith(".png")]
    page = report.html_report(f"gradlab analysis of {Path(result['store']).name}", HEADER, fit_rows(result), pngs,
                              result.get("notes", []))
    (out / "report.html").write_text(page, encoding="utf-8")
    return [*files, "report.html"]
