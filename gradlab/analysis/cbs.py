"""Analysis of a cbs store (numpy/xarray only): both critical-batch-size estimators per checkpoint, and
B_crit / B_noise against a probe or monitor store at the same checkpoints.

Per checkpoint (``gradlab.cbs.estimators``; docs/science.md "Critical batch size"):

- the learning-rate factor is chosen per batch size from the store's grid: the lowest mean held-out loss after the
  budget for the branching estimator, the fewest steps to the target for the trade-off fit.  The choice is made on
  the same seeds the intervals resample (a small optimistic bias with a handful of factors; said in the notes);
- branching (Merrill et al. 2025): B_crit from the losses after the budget, tolerance ε;
- steps–examples trade-off (McCandlish et al. 2018): S(m), E(m) to the target loss L* (default: the checkpoint's
  loss minus ``target_fraction`` of the improvement the smallest batch size achieves within the budget) and the
  fit of S = S_min + E_min/m, B_crit = E_min/S_min;
- diverged branches (``diverged_step`` ≥ 0) are left out with the reason;
- units not done (an interrupted store): both estimators use the computed batch sizes only and are provisional
  (``complete`` false, ``missing_batch_sizes``; the branching B_crit a lower bound, "≥ m", when every computed
  batch size up to the first missing one is within ε), said in the notes, the printed line and the captions.

B_noise: from a probe store (``trace_cov``/``grad_sq_norm`` with standard errors; interval of the ratio by the
delta method in log space, covariance ignored) or a monitor store (its smoothed B_noise and interval at the
checkpoint's training step).  Identity first: a probe checkpoint is the cbs one when their SHA-256 agree (a probe
checkpoint of the same label with another SHA-256 is not matched); a monitor store is the checkpoint's run when
the run, seed, batch size, learning rate, optimizer and reduction that both record agree.  A checkpoint that
contradicts the noise store gets no B_noise (said in the notes); when none matches the analysis is refused; where
one side records no identity, the pairing (by label, or by step) is said in the notes.  The ratio B_crit/B_noise
gets an interval by adding the log half-widths of the two independent intervals in quadrature (each side
separately: the intervals are asymmetric).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from gradlab.analysis.interval import Estimate
from gradlab.cbs import estimators as est
from gradlab.errors import UsageError

DEFAULT_EPSILON = 0.05
DEFAULT_TARGET_FRACTION = 0.5


def branch_curves(ds: Any, loss: str) -> tuple[np.ndarray, list[str]]:
    """``loss`` (C, M, F, R, J) with diverged branches and units not done as NaN, and the notes saying so."""
    L = np.asarray(ds[loss].values, dtype=np.float64).copy()
    div = np.asarray(ds["diverged_step"].values)
    done = np.asarray(ds["done"].values, dtype=bool)
    notes = []
    labels, bs, fac = (list(ds[k].values) for k in ("checkpoint", "batch_size", "lr_factor"))
    for c, i in zip(*np.nonzero(~done)):
        notes.append(f"{labels[c]}: batch size {bs[i]} not computed yet (resume the store): missing")
    L[~done] = np.nan
    rule = ds.attrs.get("diverge_rule")  # stores before the L₀ floor: factor × the checkpoint's loss alone
    why = (rule.removeprefix("diverged: ") if isinstance(rule, str) else
           f"loss non-finite or above {ds.attrs.get('diverge_factor', 'the limit')}× the checkpoint's")
    diverged = (div >= 0) & done[:, :, None, None]  # a unit not done holds no diverged_step (reads as its fill)
    for c, i, f in sorted({(c, i, f) for c, i, f, _ in zip(*np.nonzero(diverged))}):
        n = int(diverged[c, i, f].sum())
        notes.append(f"{labels[c]}: batch size {bs[i]}, lr factor {fac[f]:g}: {n} diverged branch(es) excluded "
                     f"({why})")
    L[div >= 0] = np.nan
    return L, notes


def _pick(values: np.ndarray) -> np.ndarray:
    """Index of the smallest finite value along the last axis (0 where none is finite)."""
    v = np.where(np.isfinite(values), values, np.inf)
    return v.argmin(-1)


def checkpoint_losses(ds: Any, loss: str) -> np.ndarray:
    """The loss at each checkpoint (C,): the mean over the done branches of their first evaluation, which every
    branch of a checkpoint shares (θ_c itself), diverged branches included (they diverge later)."""
    first = np.asarray(ds[loss].isel(eval=0).values, dtype=np.float64)  # (C, M, F, R)
    done = np.asarray(ds["done"].values, dtype=bool)[:, :, None, None]
    with np.errstate(invalid="ignore"), est._quiet():
        return np.nanmean(np.where(done & np.isfinite(first), first, np.nan).reshape(first.shape[0], -1), axis=1)


def _batch_list(values: Any) -> str:
    return ", ".join(f"{float(m):g}" for m in values)


def _provisional(d: dict[str, Any], lead: str) -> dict[str, Any]:
    """An estimate dict (summary.json) whose note starts with ``lead``."""
    return {**d, "note": "; ".join(n for n in (lead, d.get("note")) if n)}


def branching_section(final: np.ndarray, bs: np.ndarray, done: np.ndarray, epsilon: float, *, n_boot: int,
                      rng: np.random.Generator) -> dict[str, Any]:
    """Merrill's branching estimate (summary.json form) from ``final`` (M, R) on the batch sizes ``done`` (M,).

    The rule reads r(m) along the grid from the smallest batch size and stops at the first one above ε, so a batch
    size not computed yet can change the estimate only if every batch size before it is within tolerance: the
    estimate uses the contiguous run of computed batch sizes from the smallest (a diverged batch size still counts
    as beyond tolerance, a missing one does not).  When that run is within ε throughout, B_crit ≥ its largest batch
    size is all the store says yet (``lower_bound``); otherwise the point estimate is what the whole grid will give,
    and only its interval (resamples within ε up to the missing batch size: upper end +∞) may narrow later.
    ``complete``/``missing_batch_sizes`` say which; the note begins with "provisional" when incomplete."""
    M = bs.size
    if done.all():
        d = est.branching_estimate(final, bs, epsilon, n_boot=n_boot, rng=rng).to_dict()
        return {**d, "complete": True, "missing_batch_sizes": [], "batch_sizes_used": [float(m) for m in bs],
                "lower_bound": bool(d["censored"])}
    from gradlab.analysis.interval import json_float

    k = int(np.argmin(done))  # batch sizes bs[:k] are computed, bs[k] is not
    missing = bs[~done]
    with np.errstate(invalid="ignore", divide="ignore"), est._quiet():
        mean = np.where(done, np.nanmean(final, axis=-1), np.nan)
        ratio = mean / mean[0] - 1 if done[0] else np.full(M, np.nan)
    n_seeds = np.where(done, np.sum(~np.isnan(final), axis=-1), 0)
    base = {"epsilon": epsilon, "censored": False, "complete": False,
            "missing_batch_sizes": [float(m) for m in missing], "batch_sizes_used": [float(m) for m in bs[:k]],
            "ratio": [json_float(x) for x in ratio], "n_seeds": [int(n) for n in n_seeds]}
    if k < 2:
        why = (f"batch size {bs[0]:g}, the reference, is not computed yet" if k == 0 else
               f"batch size {bs[1]:g}, the next after the smallest, is not computed yet")
        note = (f"provisional: {why} (missing: {_batch_list(missing)}; resume the store): no branching "
                "estimate yet")
        return {**base, "b_crit": Estimate(math.nan, note=note).to_dict(), "grid": None, "lower_bound": False,
                "notes": [note]}
    sub = est.branching_estimate(final[:k], bs[:k], epsilon, n_boot=n_boot, rng=rng)
    notes = [n for n in sub.notes if not n.startswith("every batch size is within")]
    if not math.isfinite(sub.b_crit.value):  # e.g. every branch at the smallest batch size diverged
        lead = f"provisional: batch size(s) {_batch_list(missing)} not computed yet (resume the store)"
    elif sub.censored:
        lead = (f"provisional, a lower bound: batch size(s) {_batch_list(missing)} not computed yet and every "
                f"computed batch size up to {bs[k - 1]:g} is within ε = {epsilon:g}: B_crit ≥ {bs[k - 1]:g} "
                "(resume the store)")
    else:
        lead = (f"provisional: batch size(s) {_batch_list(missing)} not computed yet (resume the store); r crosses ε "
                f"below {bs[k]:g}, so the point estimate stands, but its interval may narrow once they are computed")
    b = sub.b_crit
    b_crit = Estimate(b.value, b.low, b.high, b.level, "; ".join([lead, *notes]))
    return {**base, "b_crit": b_crit.to_dict(), "grid": json_float(sub.grid), "lower_bound": bool(sub.censored),
            "notes": [lead, *notes]}


def tradeoff_section(steps: np.ndarray, curves: np.ndarray, bs: np.ndarray, done: np.ndarray, target: float, *,
                     n_boot: int, rng: np.random.Generator) -> dict[str, Any] | None:
    """McCandlish's trade-off fit (summary.json form) on the batch sizes ``done`` only (the per-batch-size lists
    keep the whole grid: None/False where not computed); None when no batch size is computed."""
    idx = np.flatnonzero(done)
    if idx.size == bs.size:
        d = est.tradeoff_estimate(steps, curves, bs, target, n_boot=n_boot, rng=rng).to_dict()
        return {**d, "complete": True, "missing_batch_sizes": []}
    if idx.size == 0:
        return None
    d = est.tradeoff_estimate(steps[idx], curves[idx], bs[idx], target, n_boot=n_boot, rng=rng).to_dict()
    missing = bs[~done]
    lead = (f"provisional: batch size(s) {_batch_list(missing)} not computed yet: fitted on batch size(s) "
            f"{_batch_list(bs[idx])} only (resume the store)")

    def full(values: list[Any], fill: Any) -> list[Any]:
        out = [fill] * bs.size
        for i, v in zip(idx, values):
            out[i] = v
        return out

    return {**d, "steps": full(d["steps"], None), "examples": full(d["examples"], None),
            "reached": full(d["reached"], False), "notes": [lead, *d["notes"]],
            **{k: _provisional(d[k], lead) for k in ("s_min", "e_min", "b_crit")},
            "complete": False, "missing_batch_sizes": [float(m) for m in missing]}


def analyze_checkpoint(ds: Any, c: int, L: np.ndarray, *, epsilon: float, target_loss: float | None,
                       target_fraction: float, n_boot: int, rng: np.random.Generator,
                       start: float | None = None) -> dict[str, Any]:
    """Both estimators at checkpoint ``c`` from curves ``L`` (C, M, F, R, J); ``start``: the loss at the checkpoint
    (default: from the first evaluation of the branches in ``L`` that did not diverge).  Only the batch sizes whose
    unit is done (``ds["done"]``; all when the dataset has none) enter the estimators; with some not done both are
    provisional (``complete`` false, the missing batch sizes named)."""
    bs = np.asarray(ds["batch_size"].values, dtype=np.float64)
    steps = np.asarray(ds["steps"].values)
    fac = np.asarray(ds["lr_factor"].values, dtype=np.float64)
    Lc = L[c]  # (M, F, R, J)
    M = bs.size
    done = (np.asarray(ds["done"].values[c], dtype=bool) if "done" in ds.variables else np.ones(M, dtype=bool))
    notes: list[str] = []
    with np.errstate(invalid="ignore"), est._quiet():
        final_mean = np.nanmean(Lc[..., -1], axis=-1)  # (M, F)
    f_branch = _pick(final_mean)
    final = Lc[np.arange(M), f_branch, :, -1]  # (M, R)
    branching = branching_section(final, bs, done, epsilon, n_boot=n_boot, rng=rng)
    if start is None:
        with np.errstate(invalid="ignore"), est._quiet():
            start = float(np.nanmean(Lc[..., 0]))
    if target_loss is None:
        best_small = float(np.nanmin(final_mean[0])) if np.isfinite(final_mean[0]).any() else math.nan
        target = start - target_fraction * (start - best_small)
        if not done[0]:  # no curve at the smallest batch size yet to take the default target from
            notes.append(f"the smallest batch size {bs[0]:g} is not computed yet: no default target, the "
                         "steps–examples trade-off is not estimated (resume the store, or give --target-loss)")
            target = math.nan
        elif math.isnan(best_small):  # no curve at the smallest batch size to take the default target from
            notes.append("every branch at the smallest batch size diverged (or is not computed): no default target, "
                         "the steps–examples trade-off is not estimated (give --target-loss)")
            target = math.nan
        elif not (best_small < start):  # the default target would lie above the checkpoint's loss: nothing to reach
            notes.append("the smallest batch size does not improve on the checkpoint's loss within the budget: "
                         "no default target, the steps–examples trade-off is not estimated (give --target-loss)")
            target = math.nan
    else:
        target = float(target_loss)
    tradeoff = None
    f_trade = f_branch
    if math.isfinite(target):
        with np.errstate(invalid="ignore"), est._quiet():
            S_all = est.steps_to_target(steps[:, None, :], np.nanmean(Lc, axis=2), target)  # (M, F)
        f_trade = _pick(S_all)
        curves = Lc[np.arange(M), f_trade]  # (M, R, J)
        tradeoff = tradeoff_section(steps, curves, bs, done, target, n_boot=n_boot, rng=rng)
        if tradeoff is None:
            notes.append("no batch size of this checkpoint is computed yet: the steps–examples trade-off is not "
                         "estimated (resume the store)")
    skipped = notes[-1] if tradeoff is None and notes else None  # why the trade-off is not estimated
    if fac.size > 1:
        notes.append("learning-rate factor chosen per batch size on the same seeds as the intervals (optimistic "
                     "by a little with a few factors)")
    return {"checkpoint": str(ds["checkpoint"].values[c]), "epoch": float(ds["checkpoint_epoch"].values[c]),
            "step": int(ds["checkpoint_step"].values[c]) if "checkpoint_step" in ds.coords else -1,
            "loss_at_checkpoint": start, "lr_factor_branching": [float(fac[i]) for i in f_branch],
            "lr_factor_tradeoff": [float(fac[i]) for i in f_trade],
            "branching": branching, "tradeoff": tradeoff, "complete": bool(done.all()),
            "missing_batch_sizes": [float(m) for m in bs[~done]],
            "target_loss": target, "tradeoff_not_estimated": skipped, "notes": notes}


# ---------------------------------------------------------------------------------------------------------------
# B_noise at the same checkpoints


def b_noise_from_probe(path: str | Path, level: float = 0.95) -> dict[str, tuple[Estimate, str]]:
    """Per probe checkpoint: (B_noise with a delta-method interval, sha256), keyed by label."""
    import json

    from gradlab.store import open_store

    ds = open_store(path, kind="probe")
    if "b_noise" not in ds:
        raise UsageError(f"{path} has no b_noise (a frozen probe store has it); probe with --protocol frozen")
    cfg = json.loads(ds.attrs["config"])
    shas = [c.get("sha256", "") for c in cfg.get("checkpoints", [])]
    from scipy import stats

    z = float(stats.norm.ppf((1 + level) / 2))
    out = {}
    for k, label in enumerate(ds["checkpoint"].values):
        t, g = float(ds["trace_cov"].values[k]), float(ds["grad_sq_norm"].values[k])
        st, sg = float(ds["trace_cov_se"].values[k]), float(ds["grad_sq_norm_se"].values[k])
        if not (t > 0 and g > 0):
            out[str(label)] = (Estimate(math.nan, note="‖G‖² or tr Σ not positive: no B_noise"), shas[k])
            continue
        half = z * math.hypot(st / t, sg / g)
        b = t / g
        out[str(label)] = (Estimate(b, b * math.exp(-half), b * math.exp(half), level,
                                    "delta method in log space, covariance of tr Σ and ‖G‖² ignored"), shas[k])
    return out


def b_noise_from_monitor(path: str | Path, steps: dict[str, int]) -> dict[str, tuple[Estimate, str]]:
    """The monitor's smoothed B_noise at each checkpoint's training step (``steps``: label -> step)."""
    from gradlab.analysis.monitor import estimate_at
    from gradlab.monitor.store import open_monitor

    ds = open_monitor(path).load()
    recorded = np.asarray(ds["step"].values)
    out = {}
    for label, step in steps.items():
        before = recorded[recorded <= step] if step >= 0 else recorded[:0]
        if before.size == 0:
            out[label] = (Estimate(math.nan, note=f"the monitor recorded no step at or before {step}"), "")
            continue
        e = estimate_at(ds, "b_noise", int(before[-1]))
        if int(before[-1]) != step:  # e.g. a checkpoint saved after the last step: the last step's estimate
            e = Estimate(e.value, e.low, e.high, e.level,
                         f"monitor step {int(before[-1])}, the last recorded before the checkpoint's step {step}")
        out[label] = (e, "")
    return out


def ratio(num: Estimate, den: Estimate) -> Estimate:
    """num/den with the log half-widths of two independent intervals added in quadrature, side by side."""
    if not (num.value > 0 and den.value > 0 and math.isfinite(den.value)):
        return Estimate(math.nan, note="B_crit or B_noise missing")
    value = num.value / den.value
    if not (num.has_interval and den.has_interval and num.low > 0 and den.low > 0):
        return Estimate(value, note="no interval (B_crit or B_noise has none)")
    def half(a: float, b: float) -> float:  # log(a/b) ≥ 0 (0 when an interval does not hold its point)
        return math.inf if math.isinf(a) else max(0.0, math.log(a / b))

    lo = math.hypot(half(num.value, num.low), half(den.high, den.value))
    hi = math.hypot(half(num.high, num.value), half(den.value, den.low))
    return Estimate(value, value * math.exp(-lo), value * math.exp(hi) if math.isfinite(hi) else math.inf,
                    num.level, "independent intervals combined in log space")


MONITOR_IDENTITY_KEYS = ("run", "seed", "batch_size", "lr", "optimizer", "reduction")  # what gradlab train records
# in both a checkpoint's meta and its run's monitor config


def monitor_identity(identity: dict[str, Any] | None, monitor_config: dict[str, Any]) -> tuple[bool | None, str]:
    """Whether a checkpoint (its training ``identity``, from the cbs store) comes from the run a monitor store
    watched: True (every key both record agrees), False (one differs: another run), None (no key recorded on both
    sides: not checkable).  The text names the keys compared or the difference."""
    if not identity:
        return None, "the cbs store records no training run for this checkpoint"
    keys = [k for k in MONITOR_IDENTITY_KEYS if k in identity and k in monitor_config]
    diff = [f"{k} {identity[k]!r} vs {monitor_config[k]!r}" for k in keys if identity[k] != monitor_config[k]]
    if diff:
        return False, "checkpoint vs monitor: " + ", ".join(diff)
    if not set(keys) - {"reduction"}:  # every monitor records its reduction: that alone names no run
        return None, ("the checkpoint's meta and the monitor store's config share none of "
                      + ", ".join(k for k in MONITOR_IDENTITY_KEYS if k != "reduction"))
    return True, "same " + ", ".join(keys)


def _noise_section(ds: Any, per: list[dict[str, Any]], noise_store: str | Path) -> dict[str, Any]:
    """B_noise at each checkpoint from ``noise_store``, matched by identity: a probe store by SHA-256 (a label that
    names another file is refused), a monitor store by the training run (then by step).  A checkpoint whose
    identity contradicts the noise store gets no B_noise; when none matches, the analysis is refused (one line)."""
    import json

    from gradlab.store import open_store

    kind = open_store(noise_store).attrs.get("gradlab_store")
    cfg_points = json.loads(ds.attrs["config"])["checkpoints"]
    shas = [c.get("sha256", "") for c in cfg_points]
    idents = [json.loads(c["identity"]) if c.get("identity") else None for c in cfg_points]
    notes: list[str] = []
    rows: dict[str, Any] = {}
    mismatched: list[str] = []
    matched = 0
    if kind == "probe":
        noise = b_noise_from_probe(noise_store)
        by_sha = {sha: (label, e) for label, (e, sha) in noise.items() if sha}
        for p, sha, point in zip(per, shas, cfg_points):
            label = p["checkpoint"]
            if sha and sha in by_sha:
                hit, by = by_sha[sha], "sha256"
            elif label in noise:
                other = noise[label][1]
                if other and sha and other != sha:  # the same label, another file: not this checkpoint
                    why = (f"{noise_store} holds a checkpoint labelled {label!r} with SHA-256 {other[:12]}…, but the "
                           f"cbs store branched from {point.get('path', label)} with SHA-256 {sha[:12]}…")
                    mismatched.append(why)
                    rows[label] = {"note": f"not matched: {why} (another checkpoint)"}
                    continue
                hit, by = (label, noise[label][0]), "label"
                notes.append(f"B_noise of {label!r} paired by label only: "
                             + ("the probe store records no SHA-256 for it" if not other else
                                "the cbs store records no SHA-256 for it") + "; identity not checked")
            else:
                rows[label] = {"note": f"no checkpoint {label!r} (or with its SHA-256) in {noise_store}"}
                continue
            rows[label] = {"matched": hit[0], "by": by, "b_noise": hit[1].to_dict()}
            matched += 1
    elif kind == "monitor":
        from gradlab.monitor.store import open_monitor

        raw = open_monitor(noise_store).attrs.get("config")
        try:
            mon_cfg = json.loads(raw) if isinstance(raw, str) else dict(raw or {})
        except ValueError:
            mon_cfg = {}
        noise = b_noise_from_monitor(noise_store, {p["checkpoint"]: p["step"] for p in per})
        for p, ident in zip(per, idents):
            label = p["checkpoint"]
            same, how = monitor_identity(ident, mon_cfg)
            if same is False:
                why = (f"checkpoint {label!r} comes from another training run than {noise_store} monitored ({how})")
                mismatched.append(why)
                rows[label] = {"note": f"not matched: {why}"}
                continue
            if same is None:
                notes.append(f"B_noise of {label!r} paired with the monitor by training step only ({how}): identity "
                             "not checked")
            rows[label] = {"matched": label, "by": "run and step" if same else "step only", "identity": how,
                           "b_noise": noise[label][0].to_dict()}
            matched += 1
    else:
        raise UsageError(f"{noise_store} is a gradlab {kind!r} store; give a frozen probe or a monitor store")
    if mismatched and not matched:  # every checkpoint is another one: a wrong --noise-store, not a partial match
        raise UsageError(f"--noise-store {noise_store} is not of these checkpoints: {mismatched[0]}; give the "
                         + ("frozen probe store of the same checkpoint files" if kind == "probe" else
                            "monitor.zarr of the run that saved them"))
    notes += [f"no B_noise: {why}" for why in mismatched]
    for p in per:
        row = rows.get(p["checkpoint"], {})
        if "b_noise" not in row:
            continue
        b_noise = Estimate.from_dict(row["b_noise"])
        for name in ("branching", "tradeoff"):
            sec = p.get(name)
            if sec:
                r = ratio(Estimate.from_dict(sec["b_crit"]), b_noise).to_dict()
                if sec.get("complete", True) is False:  # B_crit of an incomplete store: so is the ratio
                    r = _provisional(r, "provisional: B_crit from a store with units not computed yet"
                                     + (", a lower bound" if sec.get("lower_bound") else ""))
                row[f"{name}_over_b_noise"] = r
    return {"store": str(noise_store), "kind": kind, "per_checkpoint": rows, "notes": notes}


def early_vs_late(per: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    """late/early of B_crit (estimator ``name``) between the first and last checkpoints."""
    if len(per) < 2 or not per[0].get(name) or not per[-1].get(name):
        return None
    e, la = Estimate.from_dict(per[0][name]["b_crit"]), Estimate.from_dict(per[-1][name]["b_crit"])
    r = ratio(la, e)
    claim = ("grew" if r.has_interval and r.low > 1 else "shrank" if r.has_interval and r.high < 1 else
             "no change distinguishable")
    complete = all(p[name].get("complete", True) for p in (per[0], per[-1]))
    if not complete:  # a provisional B_crit (a lower bound, or an interval still to narrow): no claim yet
        claim = "not assessed: units not computed yet (resume the store)"
    return {"early": per[0]["checkpoint"], "late": per[-1]["checkpoint"], "ratio": r.to_dict(), "claim": claim,
            "complete": complete}


def analyze_cbs(path: str | Path, out: Path, *, epsilon: float = DEFAULT_EPSILON, target_loss: float | None = None,
                target_fraction: float = DEFAULT_TARGET_FRACTION, loss: str = "test_loss", n_boot: int = 999,
                seed: int = 0, noise_store: str | Path | None = None, figures: bool = True) -> dict[str, Any]:
    """The summary of a cbs store (see the module docs); figures and report into ``out``."""
    from gradlab.store import open_store

    ds = open_store(path, kind="cbs").load()
    check_options(ds, path, epsilon=epsilon, target_loss=target_loss, target_fraction=target_fraction, loss=loss,
                  noise_store=noise_store)
    L, notes = branch_curves(ds, loss)
    starts = checkpoint_losses(ds, loss)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xCB5]))
    per = [analyze_checkpoint(ds, c, L, epsilon=epsilon, target_loss=target_loss, target_fraction=target_fraction,
                              n_boot=n_boot, rng=rng, start=float(starts[c])) for c in range(ds.sizes["checkpoint"])]
    done = np.asarray(ds["done"].values, dtype=bool)
    labels, sizes = [str(x) for x in ds["checkpoint"].values], [int(m) for m in ds["batch_size"].values]
    result: dict[str, Any] = {
        "store": str(path), "gradlab_store": "cbs", "loss": loss, "epsilon": epsilon, "budget": int(ds.attrs["budget"]),
        "batch_sizes": sizes, "seeds": int(ds.sizes["seed"]),
        "complete": bool(done.all()), "units_done": int(done.sum()), "units_total": int(done.size),
        "missing_units": [{"checkpoint": labels[c], "batch_size": sizes[i]} for c, i in zip(*np.nonzero(~done))],
        "checkpoints": {p["checkpoint"]: p for p in per}, "notes": notes,
        "early_vs_late": {n: early_vs_late(per, n) for n in ("branching", "tradeoff")},
    }
    if noise_store is not None:
        result["b_noise"] = _noise_section(ds, per, noise_store)
        result["notes"] = [*notes, *result["b_noise"]["notes"]]  # printed, and in the report
    if figures:
        from gradlab.figures.cbs import render

        out.mkdir(parents=True, exist_ok=True)
        result["figures"] = render(ds, L, result, out)
    return result


def _is_number(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float, np.integer, np.floating))


def check_options(ds: Any, path: str | Path, *, epsilon: float = DEFAULT_EPSILON, target_loss: float | None = None,
                  target_fraction: float = DEFAULT_TARGET_FRACTION, loss: str = "test_loss",
                  noise_store: str | Path | None = None) -> None:
    """Every refusal of :func:`analyze_cbs` that needs no computation, one UsageError each: run before anything is
    written (``gradlab analyze`` calls it before it makes the report folder).  ``ds``: the cbs store (lazy)."""
    if not (_is_number(epsilon) and math.isfinite(epsilon) and epsilon > 0):
        raise UsageError(f"--epsilon must be a finite number > 0 (a relative tolerance, e.g. 0.05), got {epsilon!r}")
    if not (_is_number(target_fraction) and 0 < target_fraction < 1):
        raise UsageError(f"--target-fraction must lie in (0, 1), got {target_fraction!r}")
    if loss not in ("test_loss", "train_loss"):
        raise UsageError(f"--cbs-loss must be test_loss or train_loss, got {loss!r}")
    if target_loss is not None:
        check_target_loss(target_loss, str(ds.attrs.get("loss", "")))
    if not np.asarray(ds["done"].values).any():
        raise UsageError(f"{path} has no finished unit yet; run gradlab cbs (with --resume) first")
    if noise_store is not None:
        from gradlab.store import open_store

        noise = open_store(noise_store)
        kind = noise.attrs.get("gradlab_store")
        if kind not in ("probe", "monitor"):
            raise UsageError(f"{noise_store} is a gradlab {kind!r} store; give a frozen probe or a monitor store")
        if kind == "probe" and "b_noise" not in noise:
            raise UsageError(f"{noise_store} has no b_noise (a frozen probe store has it); probe with --protocol "
                             "frozen")


NONNEGATIVE_LOSSES = ("cross-entropy", "lm", "mse")


def check_target_loss(target: float, loss: str) -> None:
    """A target loss must be a finite number, and > 0 for gradlab's built-in losses (all ≥ 0, and > 0 for any model
    that is not certain and right on every example): a target ≤ 0 is never reached."""
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target):
        raise UsageError(f"--target-loss must be a finite number, got {target!r}")
    if loss in NONNEGATIVE_LOSSES and not target > 0:
        raise UsageError(f"--target-loss must be > 0: the store's {loss} loss is positive, so a target of {target:g} "
                         "is never reached; give a loss between 0 and the checkpoint's loss")


def _grid_bracket(branching: dict[str, Any], batch_sizes: list[Any]) -> str:
    """Where the crossing lies on the grid: the interval above is over seeds, of an interpolation between two
    grid batch sizes, and says nothing of the interpolation itself."""
    g = branching.get("grid")
    if g is None:
        return ""
    g = float(g)
    above = [float(m) for m in batch_sizes if float(m) > g]
    if branching.get("complete", True) is False and branching.get("lower_bound"):
        return f" (grid: ≥ {g:g}, the largest computed batch size so far)"
    if branching.get("censored") or not above:
        return f" (grid: ≥ {g:g}, the largest batch size)"
    return f" (grid: crossing between {g:g} and {min(above):g}, interpolated in log m)"


def _branching_text(b: dict[str, Any]) -> str:
    """B_crit of the branching estimator: "≥ m" for a lower bound, and "provisional" while units are missing."""
    from gradlab.analysis.interval import format_estimate

    text = ("≥ " if b.get("lower_bound") else "") + format_estimate(b["b_crit"])
    if b.get("complete", True) is False and b["b_crit"].get("value") is not None and "provisional" not in text:
        text += (" (provisional" + (", a lower bound" if b.get("lower_bound") else "")
                 + f": batch size(s) {_batch_list(b.get('missing_batch_sizes', []))} not computed yet)")
    return text


def _tradeoff_text(p: dict[str, Any]) -> str:
    """The steps–examples B_crit with its note, or why it was not estimated."""
    from gradlab.analysis.interval import format_estimate

    if p.get("tradeoff"):
        t = p["tradeoff"]
        text = format_estimate(t["b_crit"])
        if t.get("complete", True) is False and t["b_crit"].get("value") is not None and "provisional" not in text:
            text += (f" (provisional: fitted without batch size(s) {_batch_list(t.get('missing_batch_sizes', []))}, "
                     "not computed yet)")
        return text
    return f"not estimated ({p.get('tradeoff_not_estimated') or 'no target loss'})"


def summary_lines(result: dict[str, Any]) -> list[str]:
    """What ``gradlab analyze`` prints for a cbs store: B_crit of both estimators (and B_noise) per checkpoint."""
    from gradlab.analysis.interval import format_estimate

    noise = result.get("b_noise", {}).get("per_checkpoint", {})
    lines = [f"{result['store']}: budget {result['budget']} examples, batch sizes {result['batch_sizes']}, "
             f"{result['seeds']} seeds, loss {result['loss']}"
             + ("" if result.get("complete", True) else
                f"; incomplete: {result['units_done']} of {result['units_total']} units computed (an estimate that "
                "lacks one is marked provisional; resume the store)")]
    for label, p in result["checkpoints"].items():
        line = (f"  {label}: B_crit branching (ε = {result['epsilon']:g}) {_branching_text(p['branching'])}"
                f"{_grid_bracket(p['branching'], result['batch_sizes'])}"
                f"; steps-examples {_tradeoff_text(p)}")
        if label in noise and "b_noise" in noise[label]:
            n = noise[label]
            line += (f"; B_noise {format_estimate(n['b_noise'])}; ratios "
                     f"{format_estimate(n.get('branching_over_b_noise'))}, "
                     f"{format_estimate(n.get('tradeoff_over_b_noise'))}")
        lines.append(line)
    return lines
