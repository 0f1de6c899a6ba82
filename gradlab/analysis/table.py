"""The compact fit table (CLI and HTML report) built from the JSON summary of ``run.analyze_store``."""

from __future__ import annotations

from typing import Any

HEADER = ("checkpoint", "quantity", "estimate", "95% interval", "remark")


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "nan"
    if isinstance(x, str):
        return x
    return f"{x:.{digits}g}"


def _row(ck: str, name: str, est: dict[str, Any], remark: str = "") -> tuple[str, str, str, str, str]:
    if est["value"] == "inf":  # e.g. a crossover whose m² term is not positive: none within reach
        return ck, name, "none within reach", "—", "; ".join(r for r in (remark, est.get("note") or "") if r)
    if est["low"] is None:
        ci = "no interval"
        remark = "; ".join(r for r in (remark, est.get("note") or "") if r)
    elif est["high"] == "inf":
        ci = f"≥ {_fmt(est['low'])} (no upper bound)"
    else:
        ci = f"[{_fmt(est['low'])}, {_fmt(est['high'])}]"
    return ck, name, _fmt(est["value"]), ci, remark


def _sqrt_range(x: Any) -> str:
    return "√m range: none at this precision" if x is None else f"√m holds up to m = {_fmt(x)}"


def fit_rows(result: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """Rows: per checkpoint β per norm (with p(β=½), the √m range, the crossover), the noise model, changes."""
    rows = []
    for ck, c in result.get("checkpoints", {}).items():
        est = c.get("estimates")
        if est:
            for key, name in (("grad_sq_norm", "‖G‖²"), ("trace_cov", "tr Σ"), ("b_noise", "B_noise")):
                rows.append(_row(ck, name, est[key], "U-statistics of all example pairs (headline)"))
        nm = c.get("noise_model")
        if nm:
            lof = nm["lack_of_fit"]
            same = ("the headline again from the trial means (at fixed θ E‖s_B‖² is an identity of the Gram "
                    "matrix): a consistency check, not independent evidence") if est else ""
            rows.append(_row(ck, "‖G‖² (noise-law fit)", nm["grad_sq_norm"], same))
            rows.append(_row(ck, "tr Σ (noise-law fit)", nm["trace_cov"], same))
            rows.append(_row(ck, "B_noise (noise-law fit)", nm["b_noise"], "; ".join(r for r in (
                same, "" if lof.get("note") else
                f"lack of fit χ²={_fmt(lof['chi2'])} on {lof['dof']} dof, p={_fmt(lof['p_value'], 2)}") if r)))
        for name, pl in c.get("power_law", {}).items():
            rows.append(_row(ck, f"β ({name})", pl["beta"],
                             f"p(β=½)={_fmt(pl['p_beta_half'], 2)}; {_sqrt_range(pl['sqrt_law_max_batch_size'])}"))
            rows.append(_row(ck, f"crossover ({name})", pl["crossover"],
                             "= B_noise (noise-law fit): the same two-term model fitted to the same means"
                             if est and nm and name == "minibatch_sum_rms" else ""))
        tails = c.get("tails", {})
        if tails:
            mmin, mmax = min(tails, key=int), max(tails, key=int)
            for m in dict.fromkeys((mmin, mmax)):
                rows.append(_row(ck, f"Hill α (m={m})", tails[m]["hill"], "pooled over the selected tensors"))
                if tails[m]["alpha_stable"]["value"] is not None:
                    rows.append(_row(ck, f"α-stable (m={m})", tails[m]["alpha_stable"],
                                     "blocks inside layers, per-layer standardised"))
    for name, q in result.get("quantities", {}).items():
        for ck, per in q["checkpoints"].items():
            items = [(f" (m={m})", v) for m, v in per.items()] if "mean" not in per else [("", per)]
            for m, v in (items[0], items[-1]) if len(items) > 1 else items:
                rows.append((ck, f"{q['long_name']}{m}", _fmt(v["mean"]), "—",
                             f"mean ± {_fmt(v['std'])} (sd over {v['n']} trials)"))
    for ch in result.get("comparison", []):
        sym = "×" if ch["kind"] == "ratio" else "Δ"
        rows.append(_row("late/early", f"{sym} {ch['quantity']}", ch["change"], ch["text"]))
    return rows


def format_table(rows: list[tuple[str, ...]], header: tuple[str, ...] = HEADER) -> str:
    """Plain-text table with aligned columns."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)
