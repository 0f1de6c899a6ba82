"""Analysis of a monitor store (numpy/xarray only): the summary, the figures, and the comparison with a probe.

``analyze_monitor(path, out_dir)`` writes ``summary.json`` (via the caller) and the figures ``monitor_noise``
(B_noise, ‖G‖², tr Σ per group against steps and examples seen, with intervals) and ``monitor_layers``
(B_noise per parameter tensor).  ``compare_with_probe`` relates the monitored B_noise at a step to the frozen
probe's estimate at the checkpoint saved at that step: both estimate tr Σ/‖G‖² at (nearly) the same θ, the
monitor from the moving average over recent steps, the probe from many trials at one θ.  ``monitor_vs_probe``
finds the pairs: ``gradlab analyze`` on a frozen probe store of a ``gradlab train`` checkpoint reports them
(``monitor_comparison`` in summary.json, one note line each).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from gradlab.analysis.interval import Estimate
from gradlab.monitor.store import GROUPS, MISSING, open_monitor


def estimate_at(ds: Any, name: str, step: int | None = None, group: str = "all", layer: str | None = None) -> Estimate:
    """The smoothed ``name`` (``b_noise``, ``grad_sq_norm_ema``, ``trace_cov_ema``) at ``step`` (last if None)."""
    i = -1 if step is None else int(np.searchsorted(ds["step"].values, step))
    if step is not None and (i >= ds.sizes["step"] or int(ds["step"].values[i]) != step):
        raise KeyError(f"step {step} was not recorded")
    sel = {"layer": layer} if layer is not None else {"group": group}
    suffix = "_layer" if layer is not None else ""

    def get(v: str) -> float:
        return float(ds[v + suffix].sel(sel).isel(step=i).values)

    level = float(ds.attrs.get("level", 0.95))
    value, low, high = get(name), get(name + "_low"), get(name + "_high")
    note = None
    if name == "b_noise" and high == np.inf:
        note = (f"‖G‖² is not distinguishable from 0 at this step: B_noise is at least {low:.3g}, with no upper "
                "bound" + (" (the point estimate is negative: its EMA of ‖Ĝ‖² is)" if value < 0 else ""))
    elif name == "b_noise" and not np.isfinite(value):
        note = "no estimate: no recorded step with one yet (see missing)"
    return Estimate(value, low, high, level, note)


def compare_with_probe(ds: Any, step: int, probe: Estimate, group: str = "all") -> dict[str, Any]:
    """Whether the monitored B_noise at ``step`` and a probe's B_noise estimate agree (their intervals overlap;
    ``agree`` None when either has no interval)."""
    mon = estimate_at(ds, "b_noise", step, group)
    if not (mon.has_interval and probe.has_interval):  # nothing to judge: neither agreement nor disagreement
        return {"step": int(step), "monitor": mon.to_dict(), "probe": probe.to_dict(), "agree": None}
    overlap = mon.low <= probe.high and probe.low <= mon.high
    return {"step": int(step), "monitor": mon.to_dict(), "probe": probe.to_dict(), "agree": bool(overlap)}


def checkpoint_step(monitor: Any, epoch: float) -> int | None:
    """The optimizer steps a ``gradlab train`` run had taken at the end of ``epoch``: epoch · ⌈n/m⌉ (n the pool
    of the monitor's sampling, m the run's batch size; both recorded in the monitor store).  None if unknown."""
    cfg = _json_attr(monitor.attrs.get("config", "{}"))
    pool, m = int(monitor.attrs.get("pool_size", -1)), cfg.get("batch_size")
    if pool < 1 or not m or not np.isfinite(epoch):
        return None
    return int(round(epoch)) * -(-pool // int(m))


def monitor_vs_probe(probe: Any, result: dict[str, Any]) -> list[dict[str, Any]]:
    """For each checkpoint of an analysed frozen probe store (``result`` from ``gradlab analyze``) written by
    ``gradlab train`` next to a ``monitor.zarr``, the monitored B_noise at the last recorded step ≤ the
    checkpoint's step against the probe's headline B_noise (:func:`compare_with_probe`): both estimate
    tr Σ/‖G‖² of the training pool at (nearly) the checkpoint's θ -- the probe from many trials at that θ, the
    monitor from the moving average over the recent steps (θ moved during them: the monitor lags).  Each entry
    gives both intervals, their relative half-widths and whether they overlap (``agree``)."""
    from gradlab.analysis.interval import Estimate

    out: list[dict[str, Any]] = []
    for ci, label in enumerate(np.asarray(probe["checkpoint"].values).tolist()):
        est = result.get("checkpoints", {}).get(str(label), {}).get("estimates", {}).get("b_noise")
        path = Path(str(probe["checkpoint_path"].values[ci])).parent / "monitor.zarr"
        if est is None or not (path / "zarr.json").exists():
            continue
        mon = open_monitor(path).load()
        step = checkpoint_step(mon, float(probe["checkpoint_epoch"].values[ci]))
        steps = np.asarray(mon["step"].values)
        if step is None or not steps.size or steps[0] > step:
            continue
        at = int(steps[np.searchsorted(steps, step, side="right") - 1])
        probe_est = Estimate(_num(est.get("value")), _num(est.get("low")), _num(est.get("high")),
                             _num(est.get("level", 0.95)))
        cmp = compare_with_probe(mon, at, probe_est)
        widths = {k: (_num(v["high"]) - _num(v["low"])) / (2 * abs(_num(v["value"]))) if _num(v["value"])
                  else float("nan") for k, v in (("monitor", cmp["monitor"]), ("probe", cmp["probe"]))}
        out.append({"checkpoint": str(label), "monitor_store": str(path), "checkpoint_step": step,
                    "steps_before_checkpoint": step - at, "relative_half_width": widths, **cmp})
    return out


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


def comparison_note(c: dict[str, Any]) -> str:
    """One line for ``gradlab analyze``'s output."""
    m, p = ({k: f"{_num(v[k]):.4g}" for k in ("value", "low", "high")} for v in (c["monitor"], c["probe"]))
    verdict = ("no interval to compare" if c["agree"] is None else "agree (intervals overlap)" if c["agree"] else
               "DISAGREE (intervals do not overlap)")
    return (f"monitor vs frozen probe at {c['checkpoint']} (step {c['step']}, {c['steps_before_checkpoint']} before "
            f"the checkpoint): B_noise {m['value']} [{m['low']}, {m['high']}] vs {p['value']} "
            f"[{p['low']}, {p['high']}]: {verdict}")


def summarize(ds: Any) -> dict[str, Any]:
    """JSON-safe summary: steps, examples, the last smoothed estimates per group and tensor, missing steps."""
    steps = np.asarray(ds["step"].values)
    missing = np.asarray(ds["missing"].values)
    out: dict[str, Any] = {
        "gradlab_store": "monitor",
        "recorded_steps": int(steps.size),
        "last_step": int(steps[-1]) if steps.size else None,
        "examples_seen": int(ds["examples_seen"].values[-1]) if steps.size else 0,
        "estimator": ds.attrs.get("estimator"), "sampling": ds.attrs.get("sampling"),
        "smoothing": ds.attrs.get("smoothing"), "interval": ds.attrs.get("interval"),
        "missing": {MISSING[int(c)]: int((missing == c).sum()) for c in np.unique(missing) if int(c) != 0},
        "nonfinite_steps": int((np.asarray(ds["nonfinite_count"].values) > 0).sum()),
        "excluded_params": _json_attr(ds.attrs.get("excluded_params", [])),
        "notes": list(_json_attr(ds.attrs.get("notes", []))),
    }
    if steps.size:
        out["last"] = {g: {n: estimate_at(ds, n, None, g).to_dict()
                           for n in ("b_noise", "grad_sq_norm_ema", "trace_cov_ema")} for g in GROUPS}
        out["last_per_layer"] = {str(layer): estimate_at(ds, "b_noise", None, layer=str(layer)).to_dict()
                                 for layer in ds["layer"].values}
    return out


def _json_attr(v: Any) -> Any:
    return json.loads(v) if isinstance(v, str) else v


def analyze_monitor(path: str | Path, out_dir: Path, *, figures: bool = True) -> dict[str, Any]:
    """Summarise a monitor store and draw its figures into ``out_dir``; returns the JSON-safe summary."""
    from gradlab.errors import UsageError

    ds = open_monitor(path).load()
    if ds.sizes["step"] == 0:
        raise UsageError(f"{path} holds no recorded step yet: train longer (the monitor appends every "
                         f"{ds.attrs.get('chunk_steps')} recorded steps, and at flush()/close())")
    result = {"store": str(path), **summarize(ds)}
    out_dir.mkdir(parents=True, exist_ok=True)
    if figures:
        result["figures"] = render(ds, out_dir)
        result["figures"].append(write_report(ds, result, out_dir))
    return result


def render(ds: Any, out: Path) -> list[str]:
    """The two figures (PNG + SVG) and ``captions.json``."""
    from matplotlib.figure import Figure

    from gradlab.figures.monitor import CAPTION_LAYERS, CAPTION_NOISE, plot_layers, plot_series

    level = float(ds.attrs.get("level", 0.95))
    files: list[str] = []
    fig = Figure(figsize=(7, 9), layout="constrained")
    a, b, c = fig.subplots(3, 1)
    plot_series(ds, a, "b_noise", raw="b_simple")
    plot_series(ds, b, "grad_sq_norm_ema")
    plot_series(ds, c, "trace_cov_ema")
    files += _save(fig, out, "monitor_noise")
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    plot_layers(ds, fig.subplots())
    files += _save(fig, out, "monitor_layers")
    captions = {"monitor_noise": CAPTION_NOISE.format(level=level),
                "monitor_layers": CAPTION_LAYERS.format(level=level)}
    (out / "captions.json").write_text(json.dumps(captions, ensure_ascii=False, indent=1))
    return [*files, "captions.json"]


def write_report(ds: Any, result: dict[str, Any], out: Path) -> str:
    """``report.html``: the last smoothed estimates per group (and per tensor), notes, the two figures."""
    from gradlab.analysis.interval import format_estimate
    from gradlab.figures.report import html_report

    rows = [(g, format_estimate(e["b_noise"]), format_estimate(e["grad_sq_norm_ema"]),
             format_estimate(e["trace_cov_ema"]), e["b_noise"].get("note") or "")
            for g, e in (result.get("last") or {}).items()]
    rows += [(layer, format_estimate(e), "", "", e.get("note") or "")
             for layer, e in (result.get("last_per_layer") or {}).items()]
    caps = json.loads((out / "captions.json").read_text()) if (out / "captions.json").exists() else {}
    notes = [f"{result['recorded_steps']} recorded steps, last step {result['last_step']}, "
             f"{result['examples_seen']} examples seen; {result.get('smoothing')}; {result.get('interval')}",
             *(f"steps without an estimate: {n} × {why}" for why, n in (result.get("missing") or {}).items()),
             *result.get("notes", [])]
    page = html_report(f"gradlab monitor: {Path(result['store']).name}",
                       ["group / tensor (last recorded step)", "B_noise", "‖G‖² (EMA)", "tr Σ (EMA)", "remark"],
                       rows, [(f"{k}.png", v) for k, v in caps.items()], notes)
    (out / "report.html").write_text(page, encoding="utf-8")
    return "report.html"


def _save(fig: Any, out: Path, stem: str) -> list[str]:
    names = []
    for ext in ("png", "svg"):
        fig.savefig(out / f"{stem}.{ext}", dpi=110, bbox_inches="tight")
        names.append(f"{stem}.{ext}")
    return names


__all__ = ["analyze_monitor", "compare_with_probe", "estimate_at", "monitor_vs_probe", "summarize"]
