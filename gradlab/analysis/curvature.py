"""Relationships from a sharpness store: sharpness vs batch size and η/m, vs the generalisation gap, λ_max·η/2.

Pure numpy/scipy/xarray (no torch).  Input: the dataset of a ``gradlab sharpness`` store (one entry per
checkpoint, with coords ``train_batch_size``, ``train_lr``, ``train_optimizer``, ``checkpoint_epoch``, ``run_id``
from checkpoint meta and the evaluated ``train_loss``/``test_loss``).  Sharpness measures: ``lambda_max``,
``hessian_trace`` and every ``eps_sharpness`` (space, ε) entry.  Subsets: ``all`` checkpoints, and ``final``, the
latest-epoch checkpoint of every run.

- Power law y = a·x^b (Jastrzębski et al. 2017: sharpness grows with m and with smaller η/m; Keskar et al. 2017)
  fitted by least squares on log y = log a + b·log x over checkpoints with y > 0, x > 0
  (:func:`gradlab.analysis.power_law.fit_power_law_points`); the 95% interval of b is the Student-t interval of
  the slope (the runs are independent points), and Spearman's ρ with its p-value tests monotonicity without the
  power-law model.  Fewer than 3 usable checkpoints or a constant x give NaN and a note.
- Sharpness vs generalisation gap (test − train loss; Keskar et al.): Spearman ρ, Pearson r and the OLS slope.
- Edge of stability (Cohen et al. 2021): λ_max·η/2 per checkpoint; 1 is the edge for full-batch GD without
  momentum (2/η is the largest stable curvature of GD on a quadratic).
- Early vs late: for every run with at least two epochs, each measure at the earliest and the latest epoch and
  their ratio late/early.
- Mini-batch curvature (when present): mean and standard deviation over trials per batch size, and the
  extrapolated λ_full against the full-sample λ_max.

Example (exact power law y = 2·m^0.5 over four runs)::

    >>> import numpy as np
    >>> fit = fit_power_law_points(np.array([16.0, 64, 256, 1024]), 2 * np.array([16.0, 64, 256, 1024]) ** 0.5,
    ...                            n_boot=200, rng=np.random.default_rng(0))
    >>> round(fit["exponent"], 9), round(fit["prefactor"], 9)
    (0.5, 2.0)
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from gradlab.analysis.interval import json_float
from gradlab.analysis.power_law import fit_power_law_points

SEED_TAG = 7_100
SUBSETS = ("all", "final")
X_VARS = {
    "train_batch_size": ("training batch size m", "examples"),
    "lr_over_batch": ("learning rate over batch size eta/m", "1/examples"),
}


def _values(ds: Any, name: str) -> np.ndarray:
    return np.asarray(ds[name].values, dtype=np.float64) if name in ds.variables else np.full(ds.sizes["checkpoint"],
                                                                                              np.nan)


def sharpness_measures(ds: Any) -> dict[str, tuple[np.ndarray, str, str]]:
    """Every per-checkpoint sharpness measure: name -> (values, long_name, units)."""
    out: dict[str, tuple[np.ndarray, str, str]] = {}
    for name in ("lambda_max", "hessian_trace"):
        if name in ds.variables:
            out[name] = (_values(ds, name), ds[name].attrs.get("long_name", name), ds[name].attrs.get("units", ""))
    if "eps_sharpness" in ds.variables:
        phi = ds["eps_sharpness"]
        for space in phi["space"].values:
            for eps in phi["eps"].values:
                vals = np.asarray(phi.sel(space=space, eps=eps).values, dtype=np.float64)
                out[f"eps_sharpness[{space},eps={float(eps):g}]"] = (
                    vals, f"epsilon-sharpness ({space}, eps={float(eps):g})", phi.attrs.get("units", "%"))
    return out


def final_mask(run_id: np.ndarray, epoch: np.ndarray) -> np.ndarray:
    """True at the latest-epoch checkpoint of every run (the last listed one on ties or unknown epochs)."""
    mask = np.zeros(run_id.size, dtype=bool)
    for run in np.unique(run_id):
        idx = np.flatnonzero(run_id == run)
        ep = np.where(np.isfinite(epoch[idx]), epoch[idx], -np.inf)
        mask[idx[np.flatnonzero(ep == ep.max())[-1]]] = True
    return mask


def _coord(ds: Any, name: str, default: Any) -> np.ndarray:
    if name in ds.coords or name in ds.variables:
        return np.asarray(ds[name].values)
    return np.full(ds.sizes["checkpoint"], default)


def analyze(ds: Any, *, n_boot: int = 999, seed: int = 0, level: float = 0.95,
            **compat: Any) -> tuple[Any, dict[str, Any]]:
    """Relationships of a sharpness dataset: ``(analysis xarray.Dataset, JSON-able summary)``.

    Passing a store path instead of a dataset (``analyze(path, group=..., out_dir=...)``, the hook of
    ``gradlab.analysis.run``) delegates to :func:`analyze_store` and returns its summary dict.
    """
    if isinstance(ds, (str, os.PathLike)):
        return analyze_store(ds, n_boot=n_boot, seed=seed, **compat)  # type: ignore[return-value]
    import xarray as xr

    if "done" in ds.variables:
        ds = ds.isel(checkpoint=np.flatnonzero(np.asarray(ds["done"].values, dtype=bool)))
    C = ds.sizes["checkpoint"]
    labels = [str(v) for v in ds["checkpoint"].values]
    m = _coord(ds, "train_batch_size", np.nan).astype(np.float64)
    lr = _coord(ds, "train_lr", np.nan).astype(np.float64)
    epoch = _coord(ds, "checkpoint_epoch", np.nan).astype(np.float64)
    run_id = np.asarray([str(r) for r in _coord(ds, "run_id", "unknown")])
    optimizer = [str(o) for o in _coord(ds, "train_optimizer", "unknown")]
    gap = _values(ds, "test_loss") - _values(ds, "train_loss")
    with np.errstate(all="ignore"):
        lr_over_batch = lr / m
    lam = _values(ds, "lambda_max")
    eos = lam * lr / 2
    xs = {"train_batch_size": m, "lr_over_batch": lr_over_batch}
    measures = sharpness_measures(ds)
    masks = {"all": np.ones(C, dtype=bool), "final": final_mask(run_id, epoch)}
    rng = np.random.default_rng(np.random.SeedSequence([seed, SEED_TAG]))
    names = list(measures)
    fields = ("exponent", "exponent_low", "exponent_high", "prefactor", "spearman_rho", "spearman_p", "n_points")
    fit = {f: np.full((len(names), len(X_VARS), len(SUBSETS)), np.nan) for f in fields}
    gapfit = {f: np.full((len(names), len(SUBSETS)), np.nan) for f in ("gap_spearman_rho", "gap_spearman_p",
                                                                         "gap_pearson_r", "gap_slope")}
    summary_rel: list[dict[str, Any]] = []
    for i, name in enumerate(names):
        y = measures[name][0]
        for s, subset in enumerate(SUBSETS):
            sel = masks[subset]
            for j, xname in enumerate(X_VARS):
                r = fit_power_law_points(xs[xname][sel], y[sel], n_boot=n_boot, rng=rng, level=level)
                for f in fields:
                    fit[f][i, j, s] = r[f]
                summary_rel.append({"measure": name, "x": xname, "subset": subset,
                                    **{k: (json_float(v) if isinstance(v, float) else v) for k, v in r.items()}})
            g = _gap_relation(gap[sel], y[sel])
            for f, v in g.items():
                gapfit[f][i, s] = v
    early_late = _early_late(run_id, epoch, measures)
    dims_rel = ("measure", "x_variable", "subset")
    units = {n: measures[n][2] for n in names}
    data_vars: dict[str, Any] = {
        "generalization_gap": (("checkpoint",), gap, {"long_name": "generalisation gap (test - train loss)",
                                                      "units": "loss"}),
        "eos_ratio": (("checkpoint",), eos, {"long_name": "edge-of-stability ratio lambda_max*eta/2 (1 = edge)",
                                             "units": "1"}),
        "lr_over_batch": (("checkpoint",), lr_over_batch, {"long_name": X_VARS["lr_over_batch"][0],
                                                           "units": X_VARS["lr_over_batch"][1]}),
        "final_checkpoint": (("checkpoint",), masks["final"], {"long_name": "latest checkpoint of its run",
                                                               "units": "1"}),
        "powerlaw_exponent": (dims_rel, fit["exponent"], {"long_name": "power-law exponent b of sharpness ~ x^b",
                                                          "units": "1"}),
        "powerlaw_exponent_low": (dims_rel, fit["exponent_low"], {"long_name": f"lower {level:.0%} Student-t bound "
                                                                  "of b", "units": "1"}),
        "powerlaw_exponent_high": (dims_rel, fit["exponent_high"], {"long_name": f"upper {level:.0%} Student-t "
                                                                    "bound of b", "units": "1"}),
        "powerlaw_prefactor": (dims_rel, fit["prefactor"], {"long_name": "power-law prefactor a",
                                                            "units": "sharpness units"}),
        "spearman_rho": (dims_rel, fit["spearman_rho"], {"long_name": "Spearman rank correlation of sharpness and x",
                                                         "units": "1"}),
        "spearman_p": (dims_rel, fit["spearman_p"], {"long_name": "p-value of Spearman rho", "units": "1"}),
        "n_points": (dims_rel, fit["n_points"], {"long_name": "checkpoints used in the fit", "units": "1"}),
        "gap_spearman_rho": (("measure", "subset"), gapfit["gap_spearman_rho"],
                             {"long_name": "Spearman rho of sharpness and generalisation gap", "units": "1"}),
        "gap_spearman_p": (("measure", "subset"), gapfit["gap_spearman_p"],
                           {"long_name": "p-value of the gap Spearman rho", "units": "1"}),
        "gap_pearson_r": (("measure", "subset"), gapfit["gap_pearson_r"],
                          {"long_name": "Pearson r of sharpness and generalisation gap", "units": "1"}),
        "gap_slope": (("measure", "subset"), gapfit["gap_slope"],
                      {"long_name": "OLS slope of generalisation gap on sharpness", "units": "loss / sharpness unit"}),
    }
    coords: dict[str, Any] = {
        "checkpoint": ("checkpoint", np.array(labels, dtype=object), {"long_name": "checkpoint", "units": ""}),
        "measure": ("measure", np.array(names, dtype=object), {"long_name": "sharpness measure", "units": ""}),
        "measure_units": ("measure", np.array([units[n] for n in names], dtype=object),
                          {"long_name": "units of the sharpness measure", "units": ""}),
        "x_variable": ("x_variable", np.array(list(X_VARS), dtype=object), {"long_name": "training variable",
                                                                          "units": ""}),
        "subset": ("subset", np.array(SUBSETS, dtype=object), {"long_name": "checkpoints used", "units": ""}),
    }
    if early_late["runs"]:
        coords["run"] = ("run", np.array(early_late["runs"], dtype=object), {"long_name": "training run",
                                                                            "units": ""})
        for key, long in (("early", "sharpness at the earliest epoch"), ("late", "sharpness at the latest epoch"),
                          ("ratio", "late / early sharpness")):
            data_vars[f"sharpness_{key}"] = (("run", "measure"), early_late[key], {"long_name": long,
                                             "units": "1" if key == "ratio" else "sharpness units"})
        data_vars["epoch_early"] = (("run",), early_late["epoch_early"], {"long_name": "earliest epoch",
                                                                          "units": "epoch"})
        data_vars["epoch_late"] = (("run",), early_late["epoch_late"], {"long_name": "latest epoch", "units": "epoch"})
    mb = _minibatch(ds)
    for key, (dims, values, attrs) in mb.items():
        data_vars[key] = (dims, values, attrs)
    if "batch_size" in ds.coords and mb:
        coords["batch_size"] = ("batch_size", np.asarray(ds["batch_size"].values), {"long_name": "mini-batch size m",
                                                                                    "units": "examples"})
    ads = xr.Dataset(data_vars, coords=coords)
    ads.attrs.update({"gradlab_analysis": "curvature", "n_boot": int(n_boot), "seed": int(seed), "level": level,
                      "powerlaw_model": "sharpness = a * x^b, OLS on logs; Student-t interval of the slope "
                                        "(runs independent)"})
    summary = {
        "checkpoints": [{"checkpoint": labels[c], "run_id": str(run_id[c]), "optimizer": optimizer[c],
                         "train_batch_size": json_float(m[c]), "train_lr": json_float(lr[c]),
                         "epoch": json_float(epoch[c]), "lambda_max": json_float(lam[c]),
                         "generalization_gap": json_float(gap[c]), "eos_ratio": json_float(eos[c]),
                         "final": bool(masks["final"][c])} for c in range(C)],
        "relations": summary_rel,
        "gap_relations": [{"measure": n, "subset": sub, **{f: json_float(gapfit[f][i, s]) for f in gapfit}}
                          for i, n in enumerate(names) for s, sub in enumerate(SUBSETS)],
        "early_late": [{"run": r, **{f"{n}_{k}": json_float(early_late[k][a, i]) for i, n in enumerate(names)
                                     for k in ("early", "late", "ratio")}}
                       for a, r in enumerate(early_late["runs"])],
        "edge_of_stability_note": "eos_ratio = lambda_max*eta/2; 1 is the edge for (full-batch) GD without momentum "
                                  "(Cohen et al. 2021); not meaningful for adaptive optimizers",
    }
    if "minibatch_lambda_full" in ads:
        summary["minibatch"] = [{"checkpoint": labels[c],
                                 "lambda_full_extrapolated": json_float(ads["minibatch_lambda_full"].values[c]),
                                 "lambda_max_sample": json_float(lam[c]),
                                 "relative_difference": json_float(ads["minibatch_relative_difference"].values[c])}
                                for c in range(C)]
    return ads, summary


def _gap_relation(gap: np.ndarray, y: np.ndarray) -> dict[str, float]:
    ok = np.isfinite(gap) & np.isfinite(y)
    g, v = gap[ok], y[ok]
    out = {"gap_spearman_rho": math.nan, "gap_spearman_p": math.nan, "gap_pearson_r": math.nan, "gap_slope": math.nan}
    if g.size >= 3 and np.unique(g).size > 1 and np.unique(v).size > 1:
        sr = stats.spearmanr(v, g)
        pr = stats.pearsonr(v, g)
        out.update(gap_spearman_rho=float(sr.statistic), gap_spearman_p=float(sr.pvalue),
                   gap_pearson_r=float(pr.statistic), gap_slope=float(np.polyfit(v, g, 1)[0]))
    return out


def _early_late(run_id: np.ndarray, epoch: np.ndarray, measures: dict[str, Any]) -> dict[str, Any]:
    runs, rows = [], []
    for run in dict.fromkeys(run_id.tolist()):
        idx = np.flatnonzero((run_id == run) & np.isfinite(epoch))
        if idx.size >= 2 and np.unique(epoch[idx]).size >= 2:
            runs.append(str(run))
            rows.append((idx[np.argmin(epoch[idx])], idx[np.argmax(epoch[idx])]))
    names = list(measures)
    early = np.array([[measures[n][0][e] for n in names] for e, _ in rows]).reshape(len(rows), len(names))
    late = np.array([[measures[n][0][la] for n in names] for _, la in rows]).reshape(len(rows), len(names))
    with np.errstate(all="ignore"):
        ratio = late / early
    return {"runs": runs, "early": early, "late": late, "ratio": ratio,
            "epoch_early": np.array([epoch[e] for e, _ in rows]), "epoch_late": np.array([epoch[la] for _, la in rows])}


def _minibatch(ds: Any) -> dict[str, tuple[tuple[str, ...], np.ndarray, dict[str, str]]]:
    if "minibatch_lambda_max" not in ds.variables:
        return {}
    vals = np.asarray(ds["minibatch_lambda_max"].transpose("checkpoint", "batch_size", "trial").values,
                      dtype=np.float64)
    units = ds["minibatch_lambda_max"].attrs.get("units", "")
    with np.errstate(all="ignore"):
        mean = np.nanmean(vals, axis=-1) if vals.size else vals.sum(-1)
        std = np.nanstd(vals, axis=-1, ddof=1) if vals.shape[-1] > 1 else np.full(mean.shape, np.nan)
        full = _values(ds, "minibatch_lambda_full")
        rel = (full - _values(ds, "lambda_max")) / _values(ds, "lambda_max")
    return {
        "minibatch_lambda_mean": (("checkpoint", "batch_size"), mean,
                                  {"long_name": "mean over trials of mini-batch lambda_max", "units": units}),
        "minibatch_lambda_std": (("checkpoint", "batch_size"), std,
                                 {"long_name": "standard deviation over trials of mini-batch lambda_max",
                                  "units": units}),
        "minibatch_lambda_full": (("checkpoint",), full, {"long_name": "extrapolated full-batch lambda_max",
                                                          "units": units}),
        "minibatch_relative_difference": (("checkpoint",), rel,
                                          {"long_name": "(extrapolated - sample lambda_max) / sample lambda_max",
                                           "units": "1"}),
    }


def analyze_store(path: str | os.PathLike, *, group: str | None = None, out_dir: str | os.PathLike | None = None,
                  n_boot: int = 999, seed: int = 0, figures: bool = True) -> dict[str, Any]:
    """Open a sharpness store (or the ``sharpness`` group of a probe store), analyse it, and write
    ``<out_dir>/sharpness-analysis.zarr`` plus figures (PNG) into ``out_dir``; return the JSON-able summary."""
    from gradlab.store import open_store

    ds = open_store(path, kind=None if group else "sharpness", group=group).load()
    ads, summary = analyze(ds, n_boot=n_boot, seed=seed)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        target = out / "sharpness-analysis.zarr"
        ads.to_zarr(target, mode="w", zarr_format=3, consolidated=False)
        summary["analysis_store"] = str(target)
        if figures:
            checks: dict[str, list[str]] = {}
            summary["figures"] = _figures(ds, ads, out, checks)
            summary["figure_captions"] = {Path(p).name: _caption(Path(p).stem, ads) for p in summary["figures"]}
            summary["figure_layout_problems"] = {k: v for k, v in checks.items() if v}
    return summary


def _caption(stem: str, ads: Any = None) -> str:
    if stem == "sharpness_vs_batch_size":
        head = ("λ_max (Lanczos) of each checkpoint against the batch size it was trained with (log–log), one "
                "marker per checkpoint (legend)")
        try:
            b = float(ads["powerlaw_exponent"].sel(measure="lambda_max", x_variable="train_batch_size",
                                                   subset="all"))
        except Exception:  # noqa: BLE001 - no fit in this analysis
            b = float("nan")
        if np.isfinite(b):
            return head + ", with the power-law fit a·m^b over all checkpoints (black; b and its 95% interval in " \
                          "the legend)."
        return head + "; no power law is drawn: a fit needs at least 3 checkpoints with distinct batch sizes."
    if stem.startswith("minibatch_lambda_"):
        return ("λ_max of mini-batch Hessians against the mini-batch size m for one checkpoint: dots are trials, "
                "bars mean ± sd; the orange curve extrapolates to the full sample, the dashed line is the "
                "sample's own λ_max. Small batches see sharper curvature than the full sample.")
    if stem == "interpolation":
        return ("Keskar's parametric plot: loss (left axis) and accuracy (right axis) along θ(α) = (1 − α)·θ_small "
                "+ α·θ_large; α = 0 and α = 1 (dotted) are the two solutions.")
    return stem


def _figures(ds: Any, ads: Any, out: Path, checks: dict[str, list[str]] | None = None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gradlab.figures import curvature as fig

    paths = []
    jobs = [("sharpness_vs_batch_size", lambda ax: fig.plot_sharpness_vs_batch_size(ds, ax, analysis=ads))]
    if "minibatch_lambda_max" in ds.variables:
        for c in range(ds.sizes["checkpoint"]):
            jobs.append((f"minibatch_lambda_{c}", lambda ax, c=c: fig.plot_minibatch_lambda(ds, ax, checkpoint=c)))
    if "interp_train_loss" in ds.variables:
        jobs.append(("interpolation", lambda ax: fig.plot_interpolation(ds, ax)))
    for name, draw in jobs:
        f, ax = plt.subplots(figsize=(5.5, 4), layout="constrained")
        draw(ax)
        if checks is not None:
            from gradlab.figures.layout import overlapping_text

            checks[name] = overlapping_text(f)
        p = out / f"{name}.png"
        f.savefig(p, dpi=120)
        plt.close(f)
        paths.append(str(p))
    return paths
