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
- diverged branches (``diverged_step`` ≥ 0) are left out with the reason; units not done are missing.

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
    for c, i, f in sorted({(c, i, f) for c, i, f, _ in zip(*np.nonzero(div >= 0))}):
        n = int((div[c, i, f] >= 0).sum())
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


def analyze_checkpoint(ds: Any, c: int, L: np.ndarray, *, epsilon: float, target_loss: float | None,
                       target_fraction: float, n_boot: int, rng: np.random.Generator,
                       start: float | None = None) -> dict[str, Any]:
    """Both estimators at checkpoint ``c`` from curves ``L`` (C, M, F, R, J); ``start``: the loss at the checkpoint
    (default: from the first evaluation of the branches in ``L`` that did not diverge)."""
    bs = np.asarray(ds["batch_size"].values, dtype=np.float64)
    steps = np.asarray(ds["steps"].values)
    fac = np.asarray(ds["lr_factor"].values, dtype=np.float64)
    Lc = L[c]  # (M, F, R, J)
    M = bs.size
    notes: list[str] = []
    with np.errstate(invalid="ignore"), est._quiet():
        final_mean = np.nanmean(Lc[..., -1], axis=-1)  # (M, F)
    f_branch = _pick(final_mean)
    final = Lc[np.arange(M), f_branch, :, -1]  # (M, R)
    branching = est.branching_estimate(final, bs, epsilon, n_boot=n_boot, rng=rng)
    if start is None:
        with np.errstate(invalid="ignore"), est._quiet():
            start = float(np.nanmean(Lc[..., 0]))
    if target_loss is None:
        best_small = float(np.nanmin(final_mean[0])) if np.isfinite(final_mean[0]).any() else math.nan
        target = start - target_fraction * (start - best_small)
        if math.isnan(best_small):  # no curve at the smallest batch size to take the default target from
            notes.append("every branch at the smallest batch size diverged (or is not computed): no default target, "
                         "the steps–examples trade-off is not estimated (give --target-loss)")
            target = math.nan
        elif not (best_small < start):  # the default target would lie above the checkpoint's loss: nothing to reach
            notes.append("the smallest batch size does not improve on the checkpoint's loss within the budget: "
                         "no default target, the steps–examples trade-off is not estimated (give --target-loss)")
            target = math.nan
    else:
        target = float(target_loss)
    if math.isfinite(target):
        with np.errstate(invalid="ignore"), est._quiet():
            S_all = est.steps_to_target(steps[:, None, :], np.nanmean(Lc, axis=2), target)  # (M, F)
        f_trade = _pick(S_all)
        curves = Lc[np.arange(M), f_trade]  # (M, R, J)
        tradeoff = est.tradeoff_estimate(steps, curves, bs, target, n_boot=n_boot, rng=rng)
    else:
        f_trade = f_branch
        tradeoff = None
    skipped = notes[-1] if tradeoff is None and notes else None  # why the trade-off is not estimated
    if fac.size > 1:
        notes.append("learning-rate factor chosen per batch size on the same seeds as the intervals (optimistic "
                     "by a little with a few factors)")
    return {"checkpoint": str(ds["checkpoint"].values[c]), "epoch": float(ds["checkpoint_epoch"].values[c]),
            "step": int(ds["checkpoint_step"].values[c]) if "checkpoint_step" in ds.coords else -1,
            "loss_at_checkpoint": start, "lr_factor_branching": [float(fac[i]) for i in f_branch],
            "lr_factor_tradeoff": [float(fac[i]) for i in f_trade],
            "branching": branching.to_dict(), "tradeoff": tradeoff.to_dict() if tradeoff else None,
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
                row[f"{name}_over_b_noise"] = ratio(Estimate.from_dict(sec["b_crit"]), b_noise).to_dict()
    return {"store": str(noise_store), "kind": kind, "per_checkpoint": rows, "notes": notes}


def early_vs_late(per: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    """late/early of B_crit (estimator ``name``) between the first and last checkpoints."""
    if len(per) < 2 or not per[0].get(name) or not per[-1].get(name):
        return None
    e, la = Estimate.from_dict(per[0][name]["b_crit"]), Estimate.from_dict(per[-1][name]["b_crit"])
    r = ratio(la, e)
    claim = ("grew" if r.has_interval and r.low > 1 else "shrank" if r.has_interval and r.high < 1 else
             "no change distinguishable")
    return {"early": per[0]["checkpoint"], "late": per[-1]["checkpoint"], "ratio": r.to_dict(), "claim": claim}


def analyze_cbs(path: str | Path, out: Path, *, epsilon: float = DEFAULT_EPSILON, target_loss: float | None = None,
                target_fraction: float = DEFAULT_TARGET_FRACTION, loss: str = "test_loss", n_boot: int = 999,
                seed: int = 0, noise_store: str | Path | None = None, figures: bool = True) -> dict[str, Any]:
    """The summary of a cbs store (see the module docs); figures and report into ``out``."""
    from gradlab.store import open_store

    if not (math.isfinite(epsilon) and epsilon > 0):
        raise UsageError(f"--epsilon must be a finite number > 0 (a relative tolerance, e.g. 0.05), got {epsilon}")
    if not 0 < target_fraction < 1:
        raise UsageError(f"--target-fraction must lie in (0, 1), got {target_fraction}")
    if loss not in ("test_loss", "train_loss"):
        raise UsageError(f"--cbs-loss must be test_loss or train_loss, got {loss!r}")
    ds = open_store(path, kind="cbs").load()
    if not np.asarray(ds["done"].values).any():
        raise UsageError(f"{path} has no finished unit yet; run gradlab cbs (with --resume) first")
    if target_loss is not None:
        check_target_loss(target_loss, str(ds.attrs.get("loss", "")))
    L, notes = branch_curves(ds, loss)
    starts = checkpoint_losses(ds, loss)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xCB5]))
    per = [analyze_checkpoint(ds, c, L, epsilon=epsilon, target_loss=target_loss, target_fraction=target_fraction,
                              n_boot=n_boot, rng=rng, start=float(starts[c])) for c in range(ds.sizes["checkpoint"])]
    result: dict[str, Any] = {
        "store": str(path), "gradlab_store": "cbs", "loss": loss, "epsilon": epsilon, "budget": int(ds.attrs["budget"]),
        "batch_sizes": [int(m) for m in ds["batch_size"].values], "seeds": int(ds.sizes["seed"]),
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
    if branching.get("censored") or not above:
        return f" (grid: ≥ {g:g}, the largest batch size)"
    return f" (grid: crossing between {g:g} and {min(above):g}, interpolated in log m)"


def _tradeoff_text(p: dict[str, Any]) -> str:
    """The steps–examples B_crit with its note, or why it was not estimated."""
    from gradlab.analysis.interval import format_estimate

    if p.get("tradeoff"):
        return format_estimate(p["tradeoff"]["b_crit"])
    return f"not estimated ({p.get('tradeoff_not_estimated') or 'no target loss'})"


def summary_lines(result: dict[str, Any]) -> list[str]:
    """What ``gradlab analyze`` prints for a cbs store: B_crit of both estimators (and B_noise) per checkpoint."""
    from gradlab.analysis.interval import format_estimate

    noise = result.get("b_noise", {}).get("per_checkpoint", {})
    lines = [f"{result['store']}: budget {result['budget']} examples, batch sizes {result['batch_sizes']}, "
             f"{result['seeds']} seeds, loss {result['loss']}"]
    for label, p in result["checkpoints"].items():
        line = (f"  {label}: B_crit branching (ε = {result['epsilon']:g}) {format_estimate(p['branching']['b_crit'])}"
                f"{_grid_bracket(p['branching'], result['batch_sizes'])}"
                f"; steps-examples {_tradeoff_text(p)}")
        if label in noise and "b_noise" in noise[label]:
            n = noise[label]
            line += (f"; B_noise {format_estimate(n['b_noise'])}; ratios "
                     f"{format_estimate(n.get('branching_over_b_noise'))}, "
                     f"{format_estimate(n.get('tradeoff_over_b_noise'))}")
        lines.append(line)
    return lines
