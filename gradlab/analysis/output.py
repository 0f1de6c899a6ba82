"""The ``analysis`` group (an xarray Dataset, self-describing) and the JSON summary of an analysed probe store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from gradlab.analysis.compare import Change
from gradlab.analysis.interval import Estimate, json_float
from gradlab.analysis.noise_model import finite_population_factor
from gradlab.analysis.probe_fits import CheckpointFits

NORMS = {"grad_norm": "norm of summed minibatch gradients ‖S‖",
         "minibatch_sum_rms": "RMS minibatch gradient-sum norm √E‖s_B‖²"}


def _units(ds: Any, name: str, default: str = "1") -> str:
    return str(ds[name].attrs.get("units", default)) if name in ds.variables else default


def _est_vars(name: str, dims: tuple[str, ...], ests: np.ndarray, long_name: str, units: str) -> dict[str, Any]:
    """``name``, ``name_low``, ``name_high`` from an object array of Estimates."""
    flat = ests.ravel()
    shape = ests.shape
    out = {}
    for suffix, get, lname in (("", lambda e: e.value, long_name), ("_low", lambda e: e.low, f"lower bound of {long_name}"),
                               ("_high", lambda e: e.high, f"upper bound of {long_name}")):
        vals = np.array([get(e) if e is not None else np.nan for e in flat], dtype=np.float64).reshape(shape)
        out[name + suffix] = (dims, vals, {"long_name": lname, "units": units})
    return out


def _stable_range_attrs(vars_: dict[str, Any], name: str) -> None:
    """Say on an α-stable index variable that values outside (0, 2] are kept as computed, not clipped."""
    vars_[name][2]["alpha_stable_range"] = "(0, 2]"
    vars_[name][2]["comment"] = ("α-stable indices lie in (0, 2]; an estimate outside is kept as computed (not "
                                 "clipped): the α-stable model does not describe those entries (above 2: finite "
                                 "variance, or dependent entries / few blocks)")


def analysis_dataset(ds: Any, computed: Any, hist_raw: Any, hist_norm: Any, fits: dict[str, CheckpointFits],
                     changes: list[Change], *, batch_sizes: np.ndarray, pool_size: int | None, replacement: bool,
                     frozen: bool, ref_batch_size: int, n_boot: int, seed: int, level: float) -> Any:
    """The ``analysis`` group: statistics, histograms, fits with ``_low``/``_high`` bounds, early-vs-late changes."""
    import xarray as xr

    labels = list(fits)
    C, M = len(labels), batch_sizes.size
    norm_units = _units(ds, "grad_norm")
    sq_units = f"({norm_units})²"
    keep = [v for v in computed.data_vars if not v.endswith("_trials")]
    out = computed[keep].copy()
    out = out.assign_coords(checkpoint=np.asarray(labels, dtype=object))
    out["n_trials"] = (("checkpoint",), np.array([fits[c].n_trials for c in labels]),
                       {"long_name": "finished trials analysed", "units": "1"})
    for name, h in (("norm_hist", hist_raw), ("norm_hist_normalised", hist_norm)):
        out[name] = (("checkpoint", "batch_size", "norm_bin"), h["count"].values, h["count"].attrs)
        out[f"{name}_lower"] = (("checkpoint", "norm_bin"), h["norm_bin_lower"].values, h["norm_bin_lower"].attrs)
        out[f"{name}_upper"] = (("checkpoint", "norm_bin"), h["norm_bin_upper"].values, h["norm_bin_upper"].attrs)
    # tails
    hill = np.empty((C, M), dtype=object)
    alpha = np.empty((C, M), dtype=object)
    thr = np.full((C, M), np.nan)
    ntail = np.zeros((C, M), dtype=np.int64)
    for ci, c in enumerate(labels):
        for mi, m in enumerate(batch_sizes):
            t = fits[c].tails.get(int(m))
            if t is not None:  # frozen stores: one tail index, at the reference batch size
                hill[ci, mi], alpha[ci, mi], thr[ci, mi], ntail[ci, mi] = t.hill, t.alpha_stable, t.threshold, t.n_tail
    cm = ("checkpoint", "batch_size")
    vars_: dict[str, Any] = {}
    vars_ |= _est_vars("tail_index_hill", cm, hill,
                       "binned Hill tail index α of the entries of S, pooled over the selected tensors", "1")
    vars_ |= _est_vars("tail_index_alpha_stable", cm, alpha,
                       "α-stable tail index of the entries of S, blocks inside layers (per-layer standardised)", "1")
    _stable_range_attrs(vars_, "tail_index_alpha_stable")
    layer_names = sorted({name for c in labels for t in fits[c].tails.values() for name in t.alpha_stable_layers})
    if layer_names and "layer" in ds.coords:
        all_layers = [str(v) for v in ds["layer"].values]
        per = np.empty((C, M, len(all_layers)), dtype=object)
        for ci, c in enumerate(labels):
            for mi, m in enumerate(batch_sizes):
                t = fits[c].tails.get(int(m))
                for li, name in enumerate(all_layers):
                    per[ci, mi, li] = t.alpha_stable_layers.get(name) if t is not None else None
        vars_ |= _est_vars("tail_index_alpha_stable_layer", (*cm, "layer"), per,
                           "α-stable tail index of the entries of S in one layer", "1")
        _stable_range_attrs(vars_, "tail_index_alpha_stable_layer")
    vars_["hill_threshold"] = (cm, thr, {"long_name": "magnitude where the Hill tail starts", "units": norm_units})
    vars_["hill_n_tail"] = (cm, ntail, {"long_name": "entries above the Hill threshold", "units": "count"})
    # power laws
    norms = [n for n in NORMS if n in fits[labels[0]].power_laws]
    cn, cnm = ("checkpoint", "norm"), ("checkpoint", "norm", "batch_size")
    beta = np.empty((C, len(norms)), dtype=object)
    cross = np.empty((C, len(norms)), dtype=object)
    local = np.empty((C, len(norms), M), dtype=object)
    p_half = np.full((C, len(norms)), np.nan)
    sqrt_max = np.full((C, len(norms)), np.nan)
    amp = np.full((C, len(norms)), np.nan)
    mu = np.full((C, len(norms), M), np.nan)
    for ci, c in enumerate(labels):
        for ni, n in enumerate(norms):
            pl = fits[c].power_laws[n]
            beta[ci, ni], cross[ci, ni], p_half[ci, ni] = pl.beta, pl.crossover, pl.p_half
            sqrt_max[ci, ni], amp[ci, ni], mu[ci, ni] = pl.sqrt_max_batch_size, pl.amplitude, pl.mean
            local[ci, ni, 0] = Estimate(np.nan)
            local[ci, ni, 1:] = pl.local_slope
    vars_ |= _est_vars("beta", cn, beta, "power-law exponent β of norm ∝ m^β", "1")
    vars_ |= _est_vars("crossover", cn, cross, "crossover batch size m_× of norm² = a·m + b·m²", "examples")
    vars_ |= _est_vars("local_slope", cnm, local, "local log-log slope from the previous batch size", "1")
    vars_["beta_p_half"] = (cn, p_half, {"long_name": "p-value of β = ½", "units": "1"})
    vars_["sqrt_law_max_batch_size"] = (cn, sqrt_max, {"long_name": "largest batch size of the √m range",
                                                       "units": "examples"})
    vars_["power_law_amplitude"] = (cn, amp, {"long_name": "amplitude c of norm = c·m^β", "units": norm_units})
    vars_["power_law_mean"] = (cnm, mu, {"long_name": "mean over trials of the norm", "units": norm_units})
    if frozen:
        nm = {c: fits[c].noise_model for c in labels}
        for name, attr, lname, units in (("grad_sq_norm_fit", "grad_sq_norm", "estimate of the pool's ‖G‖²",
                                          sq_units),
                                         ("trace_cov_fit", "trace_cov", "trace of per-example gradient covariance tr Σ",
                                          sq_units),
                                         ("b_noise_fit", "b_noise", "noise batch size B_noise = tr Σ / ‖G‖²",
                                          "examples")):
            ests = np.array([getattr(nm[c], attr) for c in labels] + [None], dtype=object)[:-1]
            vars_ |= _est_vars(name, ("checkpoint",), ests, lname + " (WLS fit of the noise model)", units)
        if all(nm[c].lack_of_fit_note is None for c in labels):
            vars_["lack_of_fit_chi2"] = (("checkpoint",), np.array([nm[c].chi2 for c in labels]),
                                         {"long_name": "lack-of-fit χ² of the noise model", "units": "1"})
            vars_["lack_of_fit_dof"] = (("checkpoint",), np.array([nm[c].dof for c in labels]),
                                        {"long_name": "degrees of freedom of the lack-of-fit χ²", "units": "1"})
            vars_["lack_of_fit_p"] = (("checkpoint",), np.array([nm[c].p_value for c in labels]),
                                      {"long_name": "bootstrap p-value of the lack-of-fit χ²", "units": "1"})
        vars_["minibatch_sq_norm_mean"] = (cm, np.stack([nm[c].mean_sq_norm for c in labels]),
                                           {"long_name": "mean squared minibatch gradient norm ‖g_B‖²",
                                            "units": sq_units})
        vars_["minibatch_sq_norm_se"] = (cm, np.stack([nm[c].mean_sq_norm_se for c in labels]),
                                         {"long_name": "standard error of mean ‖g_B‖²", "units": sq_units})
        vars_["finite_population_factor"] = (("batch_size",), finite_population_factor(batch_sizes, pool_size,
                                                                                       replacement),
                                             {"long_name": "finite-population factor (n − m)/(n − 1)", "units": "1"})
    if changes:
        ch = np.array([c.change for c in changes] + [None], dtype=object)[:-1]
        vars_ |= _est_vars("change", ("change",), ch, "late vs early change (ratio or difference)", "1")
    out = out.assign(vars_)
    out = out.assign_coords(norm=("norm", np.asarray(norms, dtype=object), {"long_name": "norm fitted", **{n: NORMS[n] for n in norms}}))
    if changes:
        out = out.assign_coords(change=("change", np.asarray([c.quantity for c in changes], dtype=object)),
                                change_kind=("change", np.asarray([c.kind for c in changes], dtype=object)))
    for name in ("checkpoint_path", "checkpoint_epoch"):
        if name in ds.coords:
            out = out.assign_coords({name: ("checkpoint", np.asarray(ds[name].values).astype(
                object if ds[name].dtype.kind not in "iuf" else ds[name].dtype), dict(ds[name].attrs))})
    for coord in ("batch_size", "layer", "group", "bin"):
        if coord in out.coords and coord in ds.coords:
            out[coord].attrs.update(ds[coord].attrs)
    for name in ("bin_lower", "bin_upper", "param_kind"):
        if name in ds.coords and ds[name].dims[0] in out.dims:
            out = out.assign_coords({name: (ds[name].dims, np.asarray(ds[name].values).astype(
                object if ds[name].dtype.kind not in "iuf" else ds[name].dtype), dict(ds[name].attrs))})
    for v in out.variables:
        if out[v].dtype.kind in "UT" or str(out[v].dtype).startswith("StringDType"):
            out[v] = out[v].astype(object)
    out.attrs = {"gradlab_analysis": 1, "ref_batch_size": int(ref_batch_size), "n_boot": int(n_boot),
                 "seed": int(seed), "confidence_level": float(level),
                 "interval": "bootstrap over trials (scipy.stats.bootstrap, BCa)"}
    return out.load()


def summary_dict(path: Path, ds: Any, computed: Any, fits: dict[str, CheckpointFits], changes: list[Change], *,
                 labels: list[str], missing: list[str], notes: list[str], protocol: str, reduction: str,
                 replacement: bool, pool_size: int | None, ref_batch_size: int, n_boot: int, seed: int, level: float,
                 frozen: bool) -> dict[str, Any]:
    """The JSON-safe summary: store facts, per-checkpoint statistics and fits, changes, notes."""
    batch_sizes = [int(m) for m in computed["batch_size"].values]
    checkpoints: dict[str, Any] = {}
    for ci, c in enumerate(labels):
        st = computed.isel(checkpoint=ci)
        entry = fits[c].to_dict()
        entry["statistics"] = {
            str(m): {k: json_float(st[f"grad_norm_{k}"].isel(batch_size=mi).item())
                     for k in ("mean", "std", "cv", "mean_normalised", "std_normalised")}
            for mi, m in enumerate(batch_sizes)}
        if frozen:
            entry["probe_estimates"] = {name: json_float(ds[name].isel(checkpoint=ci).values.item())
                                        for name in ("grad_sq_norm", "trace_cov", "b_noise") if name in ds}
        checkpoints[c] = entry
    return jsonable({
        "store": str(path), "gradlab_store": "probe", "protocol": protocol, "reduction": reduction,
        "replacement": replacement, "pool_size": pool_size, "batch_sizes": batch_sizes,
        "ref_batch_size": int(ref_batch_size), "n_boot": int(n_boot), "seed": int(seed), "confidence_level": level,
        "checkpoints": checkpoints, "comparison": [c.to_dict() for c in changes],
        "missing": missing, "notes": notes, "config": json.loads(ds.attrs.get("config", "{}")),
    })


def jsonable(obj: Any) -> Any:
    """Strict-JSON-safe copy: floats through :func:`json_float`, numpy scalars to Python, tuples to lists."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return json_float(float(obj))
    return obj
