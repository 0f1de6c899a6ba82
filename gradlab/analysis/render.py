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
    "tail_index": "Two different tail measures of the entries of S against batch size m (log₂ axis), one colour per "
                  "checkpoint, with 95% intervals, on separate panels with their own y-axes: compare each across "
                  "m and checkpoints, not the two panels' heights. Left: the binned Hill estimate of the tail "
                  "exponent α of |entries| (P(|x| > t) ∝ t^−α above the fitted threshold; pooled over the "
                  "selected tensors), any positive value; smaller means a heavier tail. Right: the α-stable index "
                  "(blocks inside layers), defined only on (0, 2]; the dashed line α = 2 is the Gaussian "
                  "(finite-variance) end of that range, and estimates above it (open markers, grey band) mean the "
                  "entries are not heavy-tailed in the α-stable sense: they are shown unclipped, not as tail "
                  "indices. Smaller means heavier.",
    "tail_index_hill": "The binned Hill estimate of the tail exponent α of the entries' magnitudes |x| "
                       "(P(|x| > t) ∝ t^−α above the fitted threshold; pooled over the selected tensors) against "
                       "batch size m (log₂ axis), one colour per checkpoint, with 95% intervals; any positive value, "
                       "smaller means a heavier tail. No α-stable index is shown: it needs the vectors S "
                       "(gradlab probe --keep vectors).",
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
    caption_of: dict[str, str] = {}  # a figure whose caption depends on what it shows
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

        if not frozen:  # Hill and α-stable are different quantities: separate panels, never one axis
            if tails.has_tail_index(ads, "alpha_stable"):
                fig = Figure(figsize=(10, 4), layout="constrained")
                left, right = fig.subplots(1, 2)
                tails.plot_tail_index(ads, left, "hill")
                tails.plot_tail_index(ads, right, "alpha_stable")
                files += _save(fig, out, checks=checks, stem="tail_index")
            else:
                fig = Figure(figsize=(5.5, 4), layout="constrained")
                tails.plot_tail_index(ads, fig.subplots(), "hill")
                files += _save(fig, out, checks=checks, stem="tail_index")
                caption_of["tail_index"] = CAPTIONS["tail_index_hill"]

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

    captions = {**CAPTIONS, **quantity_captions(), **caption_of}
    pngs = [f for f in files if f.endswith(".png")]
    result["figure_captions"] = {f: captions.get(f.removesuffix(".png"), "") for f in pngs}
    result["figure_layout_problems"] = {k: v for k, v in checks.items() if v}
    page = report.html_report(f"gradlab analysis of {Path(result['store']).name}", HEADER, fit_rows(result),
                              [(f, result["figure_captions"][f]) for f in pngs], result.get("notes", []))
    (out / "report.html").write_text(page, encoding="utf-8")
    return [*files, "report.html"]


def render_sharpness(ds: Any, ads: Any, summary: dict[str, Any], out: Path, store: str) -> list[str]:
    """The figures of a sharpness analysis (PNG + SVG, with layout checks) and its ``report.html``: the
    per-checkpoint numbers and the sharpness-vs-x relations in the table, a caption under every figure.  Sets
    ``figures``, ``figure_captions`` and ``figure_layout_problems`` of ``summary``; returns the file names."""
    from matplotlib.figure import Figure

    from gradlab.analysis.curvature import _caption
    from gradlab.figures import report
    from gradlab.figures.curvature import sharpness_figures

    files: list[str] = []
    checks: dict[str, list[str]] = {}
    for stem, draw in sharpness_figures(ds, ads):
        fig = Figure(figsize=(5.5, 4), layout="constrained")
        draw(fig.subplots())
        files += _save(fig, out, stem, checks)
    pngs = [f for f in files if f.endswith(".png")]
    summary["figures"] = files
    summary["figure_captions"] = {f: _caption(f.removesuffix(".png"), ads) for f in pngs}
    summary["figure_layout_problems"] = {k: v for k, v in checks.items() if v}
    notes = [summary["edge_of_stability_note"]] if summary.get("edge_of_stability_note") else []
    page = report.html_report(f"gradlab sharpness analysis of {Path(store).name}", HEADER, sharpness_rows(summary),
                              [(f, summary["figure_captions"][f]) for f in pngs], notes)
    (out / "report.html").write_text(page, encoding="utf-8")
    return [*files, "report.html"]


def _num(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, str):
        return x
    return f"{x:.{digits}g}"


def sharpness_rows(summary: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """Rows of the sharpness report's table (:data:`gradlab.analysis.table.HEADER`): per checkpoint λ_max, the
    generalisation gap and λ_max·η/2; the power laws sharpness ~ x^b with their intervals; mini-batch λ_full."""
    rows = []
    for c in summary.get("checkpoints", []):
        ck = str(c["checkpoint"])
        trained = f"trained with m = {_num(c.get('train_batch_size'))}, η = {_num(c.get('train_lr'))}, epoch " \
                  f"{_num(c.get('epoch'))} ({c.get('optimizer')})" + ("; latest of its run" if c.get("final") else "")
        rows.append((ck, "λ_max (Lanczos)", _num(c.get("lambda_max")), "—", trained))
        rows.append((ck, "generalisation gap", _num(c.get("generalization_gap")), "—", "test − train loss"))
        rows.append((ck, "λ_max·η/2", _num(c.get("eos_ratio")), "—",
                     "1 = edge of stability of full-batch GD without momentum"))
    for r in summary.get("relations", []):
        if r.get("exponent") is None:
            ci = "no interval"
        else:
            ci = f"[{_num(r.get('exponent_low'))}, {_num(r.get('exponent_high'))}]"
        remark = f"{r.get('n_points')} checkpoints ({r.get('subset')})"
        if r.get("spearman_rho") is not None:
            remark += f"; Spearman ρ = {_num(r['spearman_rho'])}, p = {_num(r.get('spearman_p'), 2)}"
        if r.get("note"):
            remark += f"; {r['note']}"
        rows.append((str(r.get("subset")), f"b of {r['measure']} ∝ {r['x']}^b", _num(r.get("exponent")), ci,
                     remark))
    for mb in summary.get("minibatch", []):
        rows.append((str(mb["checkpoint"]), "λ_full (mini-batch extrapolation)",
                     _num(mb.get("lambda_full_extrapolated")), "—",
                     f"sample λ_max {_num(mb.get('lambda_max_sample'))}; relative difference "
                     f"{_num(mb.get('relative_difference'))}"))
    return rows
