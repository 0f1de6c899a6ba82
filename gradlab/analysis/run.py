"""``gradlab analyze``: open a store lazily, compute statistics and fits, write ``analysis`` and ``summary.json``.

This is the one orchestration module of the analysis side: it reads a probe store with xarray + dask (chunked
reductions only: stores larger than memory work), hands the small per-trial arrays to the estimators
(``stats``, ``noise_model``, ``power_law``, ``tails``, ``compare``), writes the ``analysis`` group back into the
store (atomically: written beside the store, then renamed into place), ``summary.json``, and -- unless
``figures=False`` -- the figures (PNG and SVG) and a one-page HTML report into ``out_dir`` (the writing itself,
and the claim on ``out_dir``, live in :mod:`gradlab.analysis.persist`).

Sharpness: a store with ``gradlab_store == "sharpness"``, or a probe store with a ``sharpness`` group, is handed to
``gradlab.analysis.curvature.analyze(path, group=..., out_dir=..., n_boot=..., seed=...) -> dict`` when that
module exists (see :func:`analyze_sharpness`).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from gradlab.analysis import stats
from gradlab.analysis.compare import Change, compare_checkpoints, same_draws
from gradlab.analysis.noise_model import noise_model_statistic, finite_population_factor
from gradlab.analysis.power_law import power_law_statistic
from gradlab.analysis.probe_fits import (NOT_MEASURED_FROZEN, SEED_CODES, CheckpointFits, fit_checkpoint,
                                        float_resolution, rng_for)
from gradlab.analysis.tails import (STABLE_RANGE, TailFit, fit_alpha_stable, fit_hill, outside_stable_range,
                                    pooled_block_length, stable_pair_sums)
from gradlab.analysis.interval import Estimate
from gradlab.analysis.persist import (ANALYSIS_GROUP, OUT_MARKER, claim_out_dir, default_out_dir,
                                     remove_old_staging, write_analysis_group, write_summary)
from gradlab.errors import StoreError, UsageError
from gradlab.store import option

log = logging.getLogger(__name__)

REQUIRED = ("grad_norm", "done")  # entry_hist is absent from --keep norms stores


def analyze_store(
    path: str | os.PathLike,
    *,
    out_dir: str | os.PathLike | None = None,
    ref_batch_size: int | None = None,
    n_boot: int = 999,
    seed: int = 0,
    figures: bool = True,
    level: float = 0.95,
    write_store: bool = True,
    cbs_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Analyse a probe (or sharpness) store and return the JSON-safe summary (also written to ``summary.json``).

    Raises :class:`~gradlab.errors.UsageError` for a path that is not a gradlab store, a store with no finished
    unit, an unknown ``ref_batch_size`` or ``n_boot`` < 0.  Unfinished stores are analysed on their done units; the
    summary's ``missing`` lists what is not done.
    """
    from gradlab.store import open_store

    if n_boot < 0:
        raise UsageError(f"--n-boot must be ≥ 0 (0: no intervals); got {n_boot}")
    path = Path(path)
    out = Path(out_dir) if out_dir is not None else default_out_dir(path)
    if path.is_dir() and any(path.glob(".analysis.tmp-*")):
        remove_old_staging(path)  # left inside the store by a killed analyze of an older gradlab
    ds = open_store(path)
    kind = ds.attrs.get("gradlab_store")
    cbs_options = _cbs_options(path, kind, cbs_options)
    if ref_batch_size is not None and kind != "probe":
        raise UsageError(f"{option('ref_batch_size')} applies to probe stores; {path} is a gradlab {kind!r} store: "
                         f"drop {option('ref_batch_size')}")
    _check_options(ds, path, kind, ref_batch_size=ref_batch_size, cbs_options=cbs_options)
    made, marked = not out.exists(), not (out / OUT_MARKER).exists()
    claim_out_dir(out)
    try:
        return _analyze_kind(ds, path, out, kind, ref_batch_size=ref_batch_size, n_boot=n_boot, seed=seed,
                             figures=figures, level=level, write_store=write_store, cbs_options=cbs_options)
    except UsageError:  # refused after the folder was claimed: leave no trace of this call (never an older report)
        if made:
            shutil.rmtree(out, ignore_errors=True)
        elif marked:
            (out / OUT_MARKER).unlink(missing_ok=True)
        raise


CBS_OPTIONS = {"epsilon": "epsilon", "target_loss": "target_loss", "noise_store": "noise_store",
               "cbs_loss": "loss"}  # the option's name -> analyze_cbs's keyword


def _cbs_options(path: Path, kind: Any, options: dict[str, Any] | None) -> dict[str, Any]:
    """The options given (not None) as :func:`gradlab.analysis.cbs.analyze_cbs`'s keywords; refused in one line
    for a store that is not a cbs store (they would be ignored), and for a name that is no option."""
    given = {k: v for k, v in (options or {}).items() if v is not None}
    unknown = sorted(set(given) - set(CBS_OPTIONS))
    if unknown:
        raise UsageError(f"unknown option {unknown[0]!r} of gradlab analyze; the cbs options are "
                         + ", ".join(option(k) for k in CBS_OPTIONS))
    if given and kind != "cbs":
        names = ", ".join(option(k) for k in given)
        raise UsageError(f"{names} {'applies' if len(given) == 1 else 'apply'} to cbs stores (gradlab cbs); "
                         f"{path} is a gradlab {kind!r} store: drop {names}")
    return {CBS_OPTIONS[k]: v for k, v in given.items()}


def _check_options(ds: Any, path: Path, kind: Any, *, ref_batch_size: int | None,
                   cbs_options: dict[str, Any] | None) -> None:
    """The refusals that need no computation, before the report folder is made (bad flags write nothing)."""
    if kind not in ("probe", "sharpness", "monitor", "cbs"):
        raise UsageError(f"{path} is a gradlab {kind!r} store; gradlab analyze reads 'probe', 'sharpness', 'monitor' and 'cbs' stores")
    if kind == "cbs":
        from gradlab.analysis.cbs import check_options

        check_options(ds, path, **(cbs_options or {}))
    elif kind == "probe":
        missing_vars = [v for v in REQUIRED if v not in ds.variables]
        if missing_vars:
            raise UsageError(f"{path} lacks the probe variables {missing_vars}; it was not written by gradlab probe "
                             "(or by an incompatible version): rewrite it with gradlab probe")
        _check_batch_sizes(path, np.asarray(ds["batch_size"].values, dtype=np.int64), ref_batch_size)


def _check_batch_sizes(path: Path, batch_sizes: np.ndarray, ref_batch_size: int | None) -> None:
    if batch_sizes.size < 2:
        raise UsageError(f"{path} holds one batch size (m = {', '.join(map(str, batch_sizes))}): the analysis fits "
                         "laws in the batch size and needs two at least; probe again with several, e.g. "
                         "--batch-sizes 1,4,16,64 (this store's trials read as they are with xarray.open_zarr)")
    if ref_batch_size is not None and int(ref_batch_size) not in batch_sizes:
        raise UsageError(f"--ref-batch-size {ref_batch_size} is not a batch size of {path}; "
                         f"choose one of {', '.join(map(str, batch_sizes))}")


def _analyze_kind(ds: Any, path: Path, out: Path, kind: Any, *, ref_batch_size: int | None, n_boot: int, seed: int,
                  figures: bool, level: float, write_store: bool,
                  cbs_options: dict[str, Any] | None) -> dict[str, Any]:
    """The analysis of a store of ``kind`` into the claimed folder ``out``."""
    if kind == "monitor":  # the live noise monitor's store (gradlab.monitor)
        from gradlab.analysis.monitor import analyze_monitor

        result = analyze_monitor(path, out, figures=figures)
        write_summary(out, result)
        return result
    if kind == "cbs":  # critical batch size (gradlab.analysis.cbs); cbs_options: epsilon, target_loss, noise_store...
        from gradlab.analysis.cbs import analyze_cbs

        result = analyze_cbs(path, out, n_boot=n_boot, seed=seed, figures=figures, **(cbs_options or {}))
        write_summary(out, result)
        return result
    if kind == "sharpness":
        result = {"store": str(path), "gradlab_store": kind,
                  "sharpness": analyze_sharpness(path, None, out, n_boot=n_boot, seed=seed, figures=figures),
                  "notes": []}
        if figures:  # like every other store kind: PNG + SVG figures with captions, and report.html
            result["figures"] = _sharpness_report(path, out, result["sharpness"])
        write_summary(out, result)
        return result
    result = _analyze_probe(ds, path, out, ref_batch_size=ref_batch_size, n_boot=n_boot, seed=seed,
                            figures=figures, level=level, write_store=write_store)
    if (path / "sharpness" / "zarr.json").exists():
        result["sharpness"] = analyze_sharpness(path, "sharpness", out, n_boot=n_boot, seed=seed, figures=figures)
    write_summary(out, result)
    return result


def analyze_sharpness(path: Path, group: str | None, out_dir: Path, *, n_boot: int, seed: int,
                      figures: bool = True) -> dict[str, Any]:
    """Hook for sharpness data: ``gradlab.analysis.curvature.analyze`` if that module is installed.

    Contract: ``analyze(path, *, group, out_dir, n_boot, seed, figures) -> dict`` (JSON-safe); ``group`` is None
    for a sharpness store and ``"sharpness"`` for the group inside a probe store.  A sharpness store's figures
    and report are drawn by :func:`_sharpness_report` (the hook is asked for none); the group's figures by the
    hook when ``figures``.
    """
    if importlib.util.find_spec("gradlab.analysis.curvature") is None:
        if group is None:
            raise UsageError(f"{path} is a sharpness store but this gradlab has no sharpness analysis "
                             "(gradlab.analysis.curvature); update gradlab")
        return {"note": "sharpness group present but gradlab.analysis.curvature is not available"}
    from gradlab.analysis.output import jsonable

    curvature = importlib.import_module("gradlab.analysis.curvature")
    return jsonable(curvature.analyze(path, group=group, out_dir=out_dir, n_boot=n_boot, seed=seed,
                                      figures=figures and group is not None))


def _sharpness_report(path: Path, out: Path, summary: dict[str, Any]) -> list[str]:
    """Figures (PNG + SVG, captions, layout checks) and ``report.html`` of an analysed sharpness store."""
    import xarray as xr

    from gradlab.analysis.render import render_sharpness
    from gradlab.store import open_store

    ds = open_store(path, kind="sharpness").load()
    if "done" in ds.variables:  # the checkpoints the analysis used
        ds = ds.isel(checkpoint=np.flatnonzero(np.asarray(ds["done"].values, dtype=bool)))
    ads = xr.open_zarr(summary["analysis_store"], consolidated=False).load()
    return render_sharpness(ds, ads, summary, out, str(path))


def _attr_bool(v: Any) -> bool:
    return v if isinstance(v, bool) else str(v).lower() in ("true", "1", "yes")


def _analyze_probe(ds: Any, path: Path, out: Path, *, ref_batch_size: int | None, n_boot: int, seed: int,
                   figures: bool, level: float, write_store: bool) -> dict[str, Any]:
    import dask
    import xarray as xr

    protocol = str(ds.attrs.get("protocol", "step"))
    reduction = str(ds.attrs.get("reduction", "mean"))
    replacement = _attr_bool(ds.attrs.get("replacement", True))
    pool_size = ds.attrs.get("pool_size")
    pool_size = int(pool_size) if pool_size is not None else None
    batch_sizes = np.asarray(ds["batch_size"].values, dtype=np.int64)
    _check_batch_sizes(path, batch_sizes, ref_batch_size)
    if ref_batch_size is None:
        ref_batch_size = int(batch_sizes.max())
    notes: list[str] = []
    done = stats.done_mask(ds)
    missing = stats.missing_units(ds)
    notes += [f"unfinished store: {line}; analysed the done trials only" for line in missing]
    n_done = done.sum("trial").values.astype(int)
    labels_all = [str(c) for c in ds["checkpoint"].values]
    if n_done.sum() == 0:
        raise UsageError(f"{path} has no finished trial yet: run (or resume) gradlab probe until some units are done")
    keep = [i for i, n in enumerate(n_done) if n > 0]
    for i, n in enumerate(n_done):
        if n == 0:
            notes.append(f"checkpoint {labels_all[i]!r} has no finished trial: left out")
    ds = ds.isel(checkpoint=keep)
    done = done.isel(checkpoint=keep)
    labels = [labels_all[i] for i in keep]

    # ---- lazy chunked reductions, computed together
    lazy = [stats.norm_moments(ds["grad_norm"], done, ref_batch_size)]
    for name in ("grad_norm_layer", "grad_norm_group"):
        if name in ds:
            lazy.append(stats.norm_moments(ds[name], done, ref_batch_size))
    lazy_ds = xr.merge(lazy, compat="override", join="override")
    if "entry_hist" in ds:
        lazy_ds["entry_hist_pooled"] = stats.pooled_entry_hist(ds, done)
    else:
        notes.append("no entry histograms in the store (probed with --keep norms): tail indices are not computed")
    frozen = protocol == "frozen" and "minibatch_grad_norm" in ds
    if frozen:
        lazy_ds["minibatch_sq_norm_trials"] = stats.minibatch_sq_norm(ds, reduction)
    lazy_ds["grad_norm_trials"] = ds["grad_norm"]
    (computed,) = dask.compute(lazy_ds)
    scale = computed["grad_norm_mean"].sel(batch_size=ref_batch_size) / computed["grad_norm_mean"]
    hist_raw = stats.norm_histograms(ds["grad_norm"], done)
    hist_norm = stats.norm_histograms(ds["grad_norm"], done, scale=scale)

    # ---- per checkpoint fits on small in-memory arrays
    fits: dict[str, CheckpointFits] = {}
    per_trial: dict[str, dict[str, np.ndarray]] = {}
    has_vectors = "grad_sum" in ds
    for ci, label in enumerate(labels):
        d = done.isel(checkpoint=ci).values
        x = computed["grad_norm_trials"].isel(checkpoint=ci).transpose("batch_size", "trial").values[:, d]
        q = (computed["minibatch_sq_norm_trials"].isel(checkpoint=ci).transpose("batch_size", "trial").values[:, d]
             if frozen else None)
        per_trial[label] = {"grad_norm": x, **({"q": q} if q is not None else {})}
        cf = fit_checkpoint(label, keep[ci], batch_sizes, x, q, pool_size=pool_size, replacement=replacement,
                            n_boot=n_boot, seed=seed, level=level,
                            resolution=float_resolution(str(ds.attrs.get("dtype", "float64")),
                                                        int(ds.attrs.get("budget", batch_sizes.max()))))
        for mi, m in enumerate(batch_sizes):
            if frozen and int(m) != ref_batch_size:
                continue  # S only rescales with m: one tail index per checkpoint
            cf.tails[int(m)] = _fit_tails(ds, ci, mi, d, has_vectors, keep[ci], n_boot=n_boot, seed=seed, level=level)
        fits[label] = cf
        for fit_note in _fit_notes(cf):
            notes.append(f"checkpoint {label!r}: {fit_note}")
        notes += _stable_range_notes(label, cf)

    from gradlab.analysis.moments import WHOLE_POOL, whole_pool

    if frozen and whole_pool(int(ds.attrs.get("budget", batch_sizes.max())), pool_size, replacement):
        notes.append(WHOLE_POOL)
    changes: list[Change] = []
    if len(labels) >= 2:
        changes = _compare(ds, done, labels, per_trial, batch_sizes, pool_size, replacement, frozen, n_boot=n_boot,
                           seed=seed, level=level)

    from gradlab.analysis.output import analysis_dataset, summary_dict

    ads = analysis_dataset(ds, computed, hist_raw, hist_norm, fits, changes, batch_sizes=batch_sizes,
                           pool_size=pool_size, replacement=replacement, frozen=frozen,
                           ref_batch_size=ref_batch_size, n_boot=n_boot, seed=seed, level=level)
    result = summary_dict(path, ds, computed, fits, changes, labels=labels, missing=missing, notes=notes,
                          protocol=protocol, reduction=reduction, replacement=replacement, pool_size=pool_size,
                          ref_batch_size=ref_batch_size, n_boot=n_boot, seed=seed, level=level, frozen=frozen)
    if frozen and "gram_trace" in ds and "gram_sum" in ds:
        from gradlab.analysis.moments import headline_estimates

        headline_estimates(ds, done, labels, keep, result, pool_size=pool_size, replacement=replacement,
                           n_boot=n_boot, seed=seed, level=level)
        from gradlab.analysis.monitor import comparison_note, monitor_vs_probe  # the run's monitor.zarr, if any

        pairs = monitor_vs_probe(ds, result)
        if pairs:
            result["monitor_comparison"] = pairs
            result["notes"] += [comparison_note(c) for c in pairs]
    from gradlab.analysis.quantities import add_quantities

    ads = add_quantities(ds, done, ads, result, labels)
    not_measured = dict(NOT_MEASURED_FROZEN) if frozen else {}
    result["not_measured"] = not_measured
    result["notes"] += [f"not shown: {k} ({v})" for k, v in not_measured.items()]
    if write_store:
        try:
            write_analysis_group(path, ads)
            result["analysis_group"] = ANALYSIS_GROUP
        except StoreError as exc:
            result["notes"].append(f"analysis group not written into the store: {exc}")
            result["analysis_group"] = None
    out.mkdir(parents=True, exist_ok=True)
    if figures:
        from gradlab.analysis.render import render_figures

        result["figures"] = render_figures(ds, ads, fits, out, result)
    return result


def _fit_notes(cf: CheckpointFits) -> list[str]:
    notes = set()
    for law in cf.power_laws.values():
        if law.beta.note:
            notes.add(law.beta.note)
    if cf.noise_model and cf.noise_model.grad_sq_norm.note:
        notes.add(cf.noise_model.grad_sq_norm.note)
    return sorted(notes)


def _stable_range_notes(label: str, cf: CheckpointFits) -> list[str]:
    """One note per α-stable estimate (pooled, or one layer's) that falls outside (0, 2] at some batch size, above 2
    and at or below 0 apart: the values are reported unclipped and flagged (``outside_stable_range`` in
    summary.json), and the note says what they mean."""
    found: dict[tuple[str, bool], list[tuple[int, float]]] = {}
    for m, t in sorted(cf.tails.items()):
        for what, e in (("the pooled entries", t.alpha_stable),
                        *((f"layer {name}", e) for name, e in t.alpha_stable_layers.items())):
            if outside_stable_range(e):
                found.setdefault((what, e.value > 2), []).append((m, e.value))
    meaning = {True: "not heavy-tailed in the α-stable sense (consistent with finite variance, α = 2, or with "
                     "dependent entries / few blocks)",
               False: "the estimator is outside its validity (block sums smaller than the entries)"}
    out = []
    for (what, above), hits in found.items():
        lo, hi = min(v for _, v in hits), max(v for _, v in hits)
        vals = f"{lo:.3g}" if lo == hi else f"{lo:.3g} to {hi:.3g}"
        out.append(f"checkpoint {label!r}: α-stable index of {what} is {vals} at m = "
                   f"{', '.join(str(m) for m, _ in hits)}, outside {STABLE_RANGE} (the range of α-stable indices): "
                   f"{meaning[above]}; the α-stable model is not supported there, and the values are reported "
                   "unclipped (flag outside_stable_range in summary.json), not as tail indices")
    return out


def _fit_tails(ds: Any, ci: int, mi: int, d: np.ndarray, has_vectors: bool, ck: int, *, n_boot: int, seed: int,
               level: float) -> TailFit:
    if "entry_hist" not in ds:
        hill, thr, n_tail, ks = Estimate(math.nan, note="needs entry histograms (gradlab probe --keep histograms)"), \
            math.nan, 0, math.nan
    else:
        hist = np.asarray(ds["entry_hist"].isel(checkpoint=ci, batch_size=mi).transpose("bin", "trial").values)[:, d]
        hill, thr, n_tail, ks = fit_hill(hist, n_boot=n_boot, rng=rng_for(seed, ck, SEED_CODES["hill"] + mi),
                                         level=level)
    alpha = Estimate(math.nan, note="needs the vectors S (gradlab probe --keep vectors)")
    per_layer: dict[str, Estimate] = {}
    if has_vectors:
        v = ds["grad_sum"].isel(checkpoint=ci, batch_size=mi).transpose("trial", "vector_element")
        vec = np.asarray(v.values, dtype=np.float64)[d]
        segments = vector_segments(ds)
        spans = [(a, b) for _, a, b in segments]
        if vec.shape[0] >= 2 and any(b - a >= 4 for a, b in spans):
            k1 = pooled_block_length(spans)
            alpha = fit_alpha_stable(stable_pair_sums(vec, spans, k1), k1=k1, n_boot=n_boot,
                                     rng=rng_for(seed, ck, SEED_CODES["alpha_stable"] + mi), level=level)
            if len(segments) > 1:
                for li, (name, a, b) in enumerate(segments):
                    if b - a >= 4:
                        per_layer[name] = fit_alpha_stable(
                            stable_pair_sums(vec[:, a:b]), b - a, n_boot=n_boot, level=level,
                            rng=rng_for(seed, ck, SEED_CODES["alpha_stable_layer"] + 1000 * li + mi))
        else:
            alpha = Estimate(math.nan, note="needs ≥ 2 trials and a layer of ≥ 4 entries in the vectors")
    return TailFit(hill, thr, n_tail, ks, alpha, per_layer)


def vector_segments(ds: Any) -> list[tuple[str, int, int]]:
    """(layer, start, end) of each selected tensor inside ``grad_sum``'s ``vector_element`` (the probe flattens the
    selected tensors in layer order); one segment ``"all"`` when the store does not record the layout."""
    n = int(ds.sizes.get("vector_element", 0))
    try:
        cfg = json.loads(ds.attrs.get("config", "{}"))
        sizes = dict(zip(cfg["layers"], cfg["layer_sizes"], strict=True))
        order = [name for name in cfg["layers"] if name in set(cfg["selected"])]
    except (KeyError, TypeError, ValueError):
        return [("all", 0, n)]
    out, start = [], 0
    for name in order:
        out.append((name, start, start + int(sizes[name])))
        start += int(sizes[name])
    return out if start == n else [("all", 0, n)]


def _compare(ds: Any, done: Any, labels: list[str], per_trial: dict[str, dict[str, np.ndarray]],
             batch_sizes: np.ndarray, pool_size: int | None, replacement: bool, frozen: bool, *, n_boot: int,
             seed: int, level: float) -> list[Change]:
    """Early (first checkpoint) vs late (last checkpoint)."""
    e, la = labels[0], labels[-1]
    paired = False
    if "example_index" in ds:
        de, dl = done.isel(checkpoint=0).values, done.isel(checkpoint=-1).values
        if np.array_equal(de, dl):
            idx = ds["example_index"].isel(checkpoint=[0, -1]).values[:, de]
            paired = same_draws(idx)
    m = batch_sizes.astype(np.float64)
    rng = rng_for(seed, 0, SEED_CODES["compare"])
    changes: list[Change] = []
    if not frozen:  # frozen ‖S‖ = c_m‖Σᵢgᵢ‖: its β is fixed by the reduction (−1 or 0), nothing to compare
        changes += compare_checkpoints(
            per_trial[e]["grad_norm"], per_trial[la]["grad_norm"],
            lambda x: power_law_statistic(x, m, "mean")[:1], ["beta (grad_norm)"], ["difference"],
            labels=(e, la), paired=paired, n_boot=n_boot, rng=rng, level=level)
    else:
        x = finite_population_factor(m, pool_size, replacement) / m

        def noise(qq: np.ndarray) -> np.ndarray:
            a, b = noise_model_statistic(qq, x)[:2]
            return np.stack([b / a, a, b])

        changes += compare_checkpoints(per_trial[e]["q"], per_trial[la]["q"], noise,
                                       ["b_noise", "grad_sq_norm", "trace_cov"], ["ratio"] * 3, labels=(e, la),
                                       paired=paired, n_boot=n_boot, rng=rng, level=level)
        changes += compare_checkpoints(
            per_trial[e]["q"] * m[:, None] ** 2, per_trial[la]["q"] * m[:, None] ** 2,
            lambda r: power_law_statistic(r, m, "rms")[:1], ["beta (minibatch_sum_rms)"], ["difference"],
            labels=(e, la), paired=paired, n_boot=n_boot, rng=rng, level=level)
    return changes
