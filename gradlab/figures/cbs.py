"""Figures of a cbs store: loss curves per batch size, the branching ratio, the steps–examples trade-off with its
fit, and B_crit against B_noise per checkpoint.  Each plot function draws into an Axes; labels come from attrs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from gradlab.analysis.interval import Estimate, format_estimate
from gradlab.figures.labels import label_from_attrs

LOSS_WORDS = {"test_loss": ("Held-out loss", "held-out loss"),
              "train_loss": ("Training loss (on the store's fixed training examples)", "training loss")}

CAPTIONS = {
    "cbs_curves": "Held-out loss of the branches against examples seen, one line per batch size (mean over seeds, "
                  "best learning-rate factor; shaded: the range over seeds), one panel per checkpoint. Branches "
                  "that stay together up to the largest batch size mean large batches cost nothing per example; "
                  "lines that fan out upward show where larger batches need more examples for the same loss. "
                  "Dashed: the target loss of the steps–examples fit.",
    "cbs_branching": "Branching estimate (Merrill et al. 2025): relative excess r(m) = L(m)/L(m₀) − 1 of the held-out "
                     "loss after the budget over the smallest batch size's, against batch size (points: mean over "
                     "seeds), with the tolerance ε (dashed). B_crit (vertical line, shaded: its bootstrap interval "
                     "over seeds) is where r crosses ε, interpolated in log m; an interval reaching the right edge "
                     "means the largest batch size was still within tolerance.",
    "cbs_tradeoff": "Steps–examples trade-off (McCandlish et al. 2018): examples E(m) against optimizer steps S(m) "
                    "to reach the target loss, one point per batch size (labels: m), with the fitted hyperbola "
                    "(S/S_min − 1)(E/E_min − 1) = 1 (line) and its asymptotes S_min and E_min (dotted). Batch "
                    "sizes far below B_crit = E_min/S_min sit on the horizontal asymptote (fewer steps at no cost "
                    "in examples), far above it on the vertical one (more examples buy no fewer steps).",
    "cbs_b_noise": "B_crit from both estimators and the noise scale B_noise = tr Σ/‖G‖² per checkpoint, with "
                   "intervals (log scale; a bar drawn up to 10× its point marks an unbounded upper end). If the noise scale predicts the critical batch size the markers of each "
                   "checkpoint line up; McCandlish et al. predict B_crit ≈ B_noise only under their assumptions "
                   "(optimally tuned learning rate, Hessian ∝ identity).",
}


def captions_for(loss: str) -> dict[str, str]:
    """The captions of the figures of an analysis of ``loss`` (``test_loss`` or ``train_loss``): they name the loss
    both estimators read."""
    if loss == "test_loss":
        return dict(CAPTIONS)
    cap, low = LOSS_WORDS[loss]
    held_cap, held_low = LOSS_WORDS["test_loss"]
    return {k: v.replace(held_cap, cap).replace(held_low, low) for k, v in CAPTIONS.items()}


def _say(ax: Any, text: str, blank: str = "xy") -> None:
    """A panel with nothing to draw says why, in the middle of the axes (wrapped); ``blank``: the axes whose
    (meaningless) ticks to hide."""
    import textwrap

    if "x" in blank:
        ax.set_xticks([])
    if "y" in blank:
        ax.set_yticks([])
    ax.text(0.5, 0.5, "\n".join(textwrap.wrap(text, 48)), transform=ax.transAxes, ha="center", va="center",
            fontsize=8, color="0.3")


def _log_or_linear(ax: Any, axis: str, values: np.ndarray) -> bool:
    """Log scale on ``axis`` when every finite value is positive and there is one; else linear.  (Matplotlib
    cannot log-scale an axis without a positive value: "Data cannot be log-scaled".)  Returns whether it is log."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    log = v.size > 0 and bool((v > 0).all())
    if log:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    return log


def plot_curves(ds: Any, L: np.ndarray, c: int, f_index: list[int], ax: Any, target: float | None,
                loss: str = "test_loss") -> Any:
    """The curves ``L`` (C, M, F, R, J) of checkpoint ``c``, of the store's variable ``loss`` (its y-label)."""
    import seaborn as sns

    bs = ds["batch_size"].values
    colors = sns.color_palette("viridis", len(bs))
    seen = np.asarray(ds["examples_seen"].values)
    drawn = L[c, np.arange(len(bs)), f_index]  # (M, R, J)
    for i, m in enumerate(bs):
        if not np.isfinite(drawn[i]).any():  # every branch diverged (or the unit is not done): no line
            continue
        y = L[c, i, f_index[i]]  # (R, J)
        with np.errstate(invalid="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                mean, lo, hi = np.nanmean(y, 0), np.nanmin(y, 0), np.nanmax(y, 0)
        ax.plot(seen[i], mean, color=colors[i], label=f"m = {m}")
        ax.fill_between(seen[i], lo, hi, color=colors[i], alpha=0.15, linewidth=0)
    log = _log_or_linear(ax, "y", drawn)
    if target is not None and math.isfinite(target) and (target > 0 or not log):
        ax.axhline(target, color="k", ls="--", lw=0.8)
    ax.set_xlabel(label_from_attrs(ds["examples_seen"]))
    ax.set_ylabel(label_from_attrs(ds[loss], fallback=loss, width=30))
    ax.set_title(str(ds["checkpoint"].values[c]))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2)
        if log:  # a loss axis spans a fraction of a decade: plain numbers, not 2.3×10⁰
            from gradlab.figures.layout import readable_log_ticks

            readable_log_ticks(ax, "y")
    else:
        _say(ax, "no finite loss to draw: every branch diverged (or no unit is computed yet)")
    return ax


def plot_branching(bs: np.ndarray, sec: dict[str, Any], ax: Any, title: str) -> Any:
    r = np.array([np.nan if v is None else v for v in sec["ratio"]], dtype=float)
    ax.plot(bs, r, "o-", color="C0")
    ax.axhline(sec["epsilon"], color="k", ls="--", lw=0.8, label=f"ε = {sec['epsilon']:g}")
    b = Estimate.from_dict(sec["b_crit"])
    if math.isfinite(b.value) and b.value > 0:
        provisional = sec.get("complete", True) is False
        text = (f"B_crit ≥ {b.value:.3g}" if sec.get("lower_bound") else f"B_crit = {b.format()}")
        ax.axvline(b.value, color="C3", label=text + (" (provisional)" if provisional else ""))
        if b.has_interval and b.low > 0:
            ax.axvspan(b.low, min(b.high, bs[-1] * 1.5), color="C3", alpha=0.15)
    if not np.isfinite(r[1:]).any():  # no ratio to compare: say why (all diverged, or a single batch size)
        _say(ax, b.note or ("one batch size only: nothing to compare it with" if bs.size < 2 else
                            "no batch size has a loss to compare"), blank="y")
    ax.set_xscale("log", base=2)
    ax.set_xlim(bs[0] / 1.5, bs[-1] * 1.5)  # the grid, whatever has a value (no finite r: no data limits)
    ax.set_xlabel("batch size [examples]")
    ax.set_ylabel("relative excess loss r(m)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return ax


def plot_tradeoff(bs: np.ndarray, sec: dict[str, Any], ax: Any, title: str) -> Any:
    S = np.array([np.nan if v is None else v for v in sec["steps"]], dtype=float)
    E = np.array([np.nan if v is None else v for v in sec["examples"]], dtype=float)
    ok = np.isfinite(S) & (S > 0)  # a batch size that never reaches the target (or starts below it) has no point
    ax.plot(S[ok], E[ok], "o", color="C0")
    for m, s, e in zip(bs[ok], S[ok], E[ok]):
        ax.annotate(f"{m:g}", (s, e), fontsize=7, xytext=(3, 3), textcoords="offset points")
    smin, emin = Estimate.from_dict(sec["s_min"]).value, Estimate.from_dict(sec["e_min"]).value
    if smin > 0 and emin > 0:
        b = emin / smin
        mm = np.geomspace(min(bs) / 4, max(bs) * 4, 200)
        ax.plot(smin * (1 + b / mm), emin * (1 + mm / b), color="C3",
                label=f"fit: B_crit = {format_estimate(sec['b_crit'])}")
        ax.axvline(smin, color="C3", ls=":", lw=0.8)
        ax.axhline(emin, color="C3", ls=":", lw=0.8)
    if ok.any():
        ax.set_xscale("log")
        ax.set_yscale("log")
    if not (smin > 0 and emin > 0):  # no fit drawn: the reason (e.g. no batch size reached the target loss)
        why = (Estimate.from_dict(sec["b_crit"]).note
               or next((n for n in sec.get("notes", []) if "S_min" in n), "no fit"))
        if ok.any():  # the points are worth showing: the reason goes above them, the axes make room
            import textwrap

            ax.margins(y=0.6)
            ax.text(0.02, 0.98, "\n".join(textwrap.wrap(why, 60)), transform=ax.transAxes, fontsize=7,
                    color="0.3", va="top")
        else:
            _say(ax, why)
    ax.set_xlabel("steps to target S [steps]")
    ax.set_ylabel("examples to target E [examples]")
    ax.set_title(f"{title}: target loss {sec['target']:.4g}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    return ax


def plot_b_noise(result: dict[str, Any], ax: Any) -> Any:
    labels = list(result["checkpoints"])
    x = np.arange(len(labels))
    rows = result.get("b_noise", {}).get("per_checkpoint", {})
    series = [("branching", lambda p, lab: p["branching"]["b_crit"], "o"),
              ("steps–examples fit", lambda p, lab: (p["tradeoff"] or {}).get("b_crit"), "s"),
              ("B_noise", lambda p, lab: rows.get(lab, {}).get("b_noise"), "D")]
    for k, (name, get, marker) in enumerate(series):
        for i, lab in enumerate(labels):
            d = get(result["checkpoints"][lab], lab)
            if not d:
                continue
            e = Estimate.from_dict(d)
            if not (e.value > 0 and math.isfinite(e.value)):
                continue
            yerr = None
            if e.has_interval:
                hi = e.high if math.isfinite(e.high) else e.value * 10
                yerr = [[e.value - e.low], [hi - e.value]]
            ax.errorbar(x[i] + 0.12 * (k - 1), e.value, yerr=yerr, fmt=marker, color=f"C{k}",
                        label=name if i == 0 else None, capsize=3)
    ax.set_xticks(x, labels)
    if ax.get_legend_handles_labels()[0]:
        ax.set_yscale("log")
    else:
        _say(ax, "no finite B_crit or B_noise to draw (see the notes)", blank="y")
    ax.set_ylabel("batch size [examples]")
    ax.set_xlabel("checkpoint")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    return ax


def _caption_extra(stem: str, per: list[dict[str, Any]]) -> str:
    """What a figure cannot show, said in its caption: checkpoints with units not computed yet (provisional),
    where no batch size reached the target loss, where the trade-off was not estimated, or where every
    smallest-batch branch diverged."""
    out = []
    for p in per:
        if p.get("complete", True) is False:
            missing = ", ".join(f"{m:g}" for m in p.get("missing_batch_sizes", []))
            out.append(f"{p['checkpoint']}: provisional, batch size(s) {missing} not computed yet (no line, no "
                       "point); "
                       + ("B_crit (branching) is only a lower bound." if p["branching"].get("lower_bound") else
                          "the estimates use the computed batch sizes only."))
    if stem in ("cbs_tradeoff", "cbs_curves"):
        for p in per:
            t = p.get("tradeoff")
            if t and not any(t.get("reached", [])):
                out.append(f"{p['checkpoint']}: no batch size reached the target loss {t['target']:.4g} within the "
                           "budget, so there is nothing to fit (steps are never extrapolated).")
            elif t and stem == "cbs_tradeoff" and t["b_crit"].get("value") is None:
                out.append(f"{p['checkpoint']}: no fit ({t['b_crit'].get('note') or 'see the notes'}).")
            elif t is None and stem == "cbs_tradeoff":
                out.append(f"{p['checkpoint']}: not estimated ({p.get('tradeoff_not_estimated') or 'no target'}).")
    if stem in ("cbs_branching", "cbs_curves"):
        for p in per:
            if not any(n > 0 for n in p["branching"].get("n_seeds", [1])[:1]):
                out.append(f"{p['checkpoint']}: every branch at the smallest batch size diverged (or is not "
                           "computed): no reference loss, no branching estimate.")
    return (" " + " ".join(out)) if out else ""


def _save(fig: Any, out: Path, stem: str) -> list[str]:
    names = []
    for ext in ("png", "svg"):
        fig.savefig(out / f"{stem}.{ext}", dpi=120, bbox_inches="tight")
        names.append(f"{stem}.{ext}")
    return names


def render(ds: Any, L: np.ndarray, result: dict[str, Any], out: Path) -> list[str]:
    """Every figure (PNG + SVG), ``captions.json`` and ``report.html``; returns the file names."""
    from matplotlib.figure import Figure

    from gradlab.analysis.cbs import _branching_text, _tradeoff_text
    from gradlab.figures.report import html_report

    per = list(result["checkpoints"].values())
    C, bs = len(per), np.asarray(ds["batch_size"].values, dtype=float)
    fac = list(np.asarray(ds["lr_factor"].values, dtype=float))
    files: list[str] = []
    fig = Figure(figsize=(5.5 * C, 4.2), layout="constrained")
    for c, ax in enumerate(np.atleast_1d(fig.subplots(1, C))):
        plot_curves(ds, L, c, [fac.index(f) for f in per[c]["lr_factor_branching"]], ax, per[c]["target_loss"],
                    loss=result.get("loss", "test_loss"))
    files += _save(fig, out, "cbs_curves")
    fig = Figure(figsize=(5.5 * C, 4.2), layout="constrained")
    for c, ax in enumerate(np.atleast_1d(fig.subplots(1, C))):
        plot_branching(bs, per[c]["branching"], ax, per[c]["checkpoint"])
    files += _save(fig, out, "cbs_branching")
    if any(p["tradeoff"] for p in per):
        fig = Figure(figsize=(5.5 * C, 4.2), layout="constrained")
        for c, ax in enumerate(np.atleast_1d(fig.subplots(1, C))):
            if per[c]["tradeoff"]:
                plot_tradeoff(bs, per[c]["tradeoff"], ax, per[c]["checkpoint"])
            else:
                ax.set_title(per[c]["checkpoint"])
                _say(ax, f"not estimated: {per[c].get('tradeoff_not_estimated') or 'no target loss'}")
        files += _save(fig, out, "cbs_tradeoff")
    fig = Figure(figsize=(max(4.5, 2.2 * C), 4.0), layout="constrained")
    plot_b_noise(result, fig.subplots())
    files += _save(fig, out, "cbs_b_noise")
    texts = captions_for(result.get("loss", "test_loss"))
    captions = {s: texts[s] + _caption_extra(s, per) for s in texts if f"{s}.png" in files}
    (out / "captions.json").write_text(json.dumps(captions, ensure_ascii=False, indent=1))
    rows = []
    noise = result.get("b_noise", {}).get("per_checkpoint", {})
    for p in per:
        n = noise.get(p["checkpoint"], {})
        rows.append([p["checkpoint"], _branching_text(p["branching"]), _tradeoff_text(p), format_estimate(n.get("b_noise")),
                     format_estimate(n.get("branching_over_b_noise")), format_estimate(n.get("tradeoff_over_b_noise"))])
    notes = [*result["notes"], *(f"{p['checkpoint']}: {n}" for p in per for n in
                                 [*p["notes"], *p["branching"]["notes"], *((p["tradeoff"] or {}).get("notes", []))])]
    page = html_report(f"Critical batch size ({LOSS_WORDS.get(result.get('loss', 'test_loss'), ('', 'loss'))[1]})"
                       + ("" if result.get("complete", True) else ": provisional, units not computed yet"), ["checkpoint", "B_crit (branching)", "B_crit (steps–examples)",
                                               "B_noise", "branching / B_noise", "steps–examples / B_noise"],
                       rows, [(f"{s}.png", captions[s]) for s in captions], notes)
    (out / "report.html").write_text(page)
    return [*files, "captions.json", "report.html"]
