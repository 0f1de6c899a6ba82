"""``gradlab demo``: the whole study on the embedded digits in one command (the README's main job).

Steps, each a library call whose store lands in ``out`` and is skipped when already complete (so a rerun with
``--resume`` after a crash continues where it stopped):

1. ``train``: the blog's MLP (2×1024 ReLU) at two batch sizes with SGD, init/early/late checkpoints
   (:func:`gradlab.train.train_grid`);
2. ``probe`` the large-batch run's early and late checkpoints with both protocols -- ``frozen`` (every minibatch
   gradient norm from per-example Gram matrices, all parameters) and ``step`` (the blog's gradient competition,
   the last layer's summed gradient kept as vectors) (:func:`gradlab.probe.run.run_probe`);
3. ``sharpness`` of the early and late checkpoints of both runs: λ_max and top eigenvalues, Hessian trace,
   ε-sharpness, mini-batch λ_max, and the interpolation between the small- and large-batch solutions
   (:func:`gradlab.curvature.run.run_sharpness`);
4. ``analyze`` every store into ``out/report`` (figures, ``summary.json``, one HTML page per store and an index).

The sizes are chosen to finish in under 10 minutes on a 2-core CPU; ``quick`` shrinks them for tests.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradlab.errors import UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    widths: tuple[int, ...] = (1024, 1024)
    train_batch_sizes: tuple[int, int] = (32, 256)
    lr: float = 0.05
    epochs: int = 30
    early_epoch: int = 2
    probe_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
    budget: int = 1024
    frozen_trials: int = 200
    step_trials: int = 24
    step_params: str = r"^layers\.4\."
    sharpness_samples: int = 512
    minibatch_sizes: tuple[int, ...] = (32, 256)
    minibatch_trials: int = 3
    n_boot: int = 999
    seed: int = 0

    @classmethod
    def quick(cls) -> DemoConfig:
        """A small version for tests: narrow MLP, few epochs and trials."""
        return cls(widths=(32, 32), epochs=3, probe_batch_sizes=(1, 4, 16, 64, 256), budget=256, frozen_trials=24,
                   step_trials=8, sharpness_samples=128, minibatch_sizes=(16, 64), minibatch_trials=2, n_boot=99)


def _done(store: Path) -> bool:
    """True when ``store`` exists and every unit of its done mask is set."""
    if not (store / "zarr.json").exists():
        return False
    from gradlab.store import open_store

    return bool(open_store(store).done.values.all())


def run_demo(out: str | Path, *, cfg: DemoConfig | None = None, resume: bool = False,
             progress: bool = True) -> dict[str, Any]:
    """Run every step of the demo into ``out``; returns the report's index (also written as ``summary.json``)."""
    from gradlab.analysis.run import analyze_store
    from gradlab.curvature.run import SharpnessConfig, run_sharpness
    from gradlab.figures.report import html_report
    from gradlab.probe.run import resolve_config, run_probe
    from gradlab.train import TrainConfig, train_grid

    cfg = cfg or DemoConfig()
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not resume:
        raise UsageError(f"{out} is not empty; pass --resume to continue an earlier demo there, or choose another "
                         "--out")
    small, large = cfg.train_batch_sizes
    train_cfg = TrainConfig(model="mlp", model_kwargs={"widths": list(cfg.widths)}, data="digits",
                            batch_sizes=(small, large), lrs=(cfg.lr,), seeds=(cfg.seed,), epochs=cfg.epochs,
                            checkpoint_epochs=(cfg.early_epoch, cfg.epochs))
    train_dir = out / "train"
    if not _done(train_dir / "train.zarr"):
        _say(progress, f"[1/4] training the MLP at batch sizes {small} and {large} for {cfg.epochs} epochs")
        train_grid(train_cfg, train_dir, resume=True, show_progress=progress)

    def ckpt(m: int, epoch: int) -> Path:
        return train_dir / "runs" / f"bs{m}_lr{cfg.lr:g}_seed{cfg.seed}_sgd" / f"epoch{epoch:03d}.pt"

    early, late = cfg.early_epoch, cfg.epochs
    probe_ckpts = [f"early={ckpt(large, early)}", f"late={ckpt(large, late)}"]
    stores: dict[str, Path] = {}
    for protocol, trials, params, keep in (("frozen", cfg.frozen_trials, ".", "histograms"),
                                           ("step", cfg.step_trials, cfg.step_params, "vectors")):
        store = out / f"{protocol}.zarr"
        stores[protocol] = store
        if _done(store):
            continue
        _say(progress, f"[2/4] probe, {protocol} protocol: {trials} trials × {len(cfg.probe_batch_sizes)} batch sizes")
        pcfg = resolve_config(probe_ckpts, data="digits", init=str(ckpt(large, 0)), batch_sizes=cfg.probe_batch_sizes,
                              budget=cfg.budget, trials=trials, protocol=protocol, reduction="mean", lr=cfg.lr,
                              params=params, keep=keep, seed=cfg.seed)
        run_probe(pcfg, store, resume=True, progress=progress)

    sharp = out / "sharpness.zarr"
    stores["sharpness"] = sharp
    if not _done(sharp):
        _say(progress, "[3/4] sharpness: Lanczos, Hutchinson, eps-sharpness, mini-batch lambda_max, interpolation")
        scfg = SharpnessConfig(
            checkpoints=tuple(str(ckpt(m, e)) for m in (small, large) for e in (early, late)),
            data="digits", samples=cfg.sharpness_samples, top_k=3, hutchinson_probes=20, eps=(1e-3, 5e-4),
            minibatch_sizes=tuple(cfg.minibatch_sizes), minibatch_trials=cfg.minibatch_trials,
            interpolate=(str(ckpt(small, late)), str(ckpt(large, late))), alpha_points=13, seed=cfg.seed,
            dtype="float32")
        run_sharpness(scfg, sharp, resume=True)

    _say(progress, "[4/4] analysing the stores into report/")
    report = out / "report"
    summaries: dict[str, Any] = {}
    for name, store in stores.items():
        summaries[name] = analyze_store(store, out_dir=report / name, n_boot=cfg.n_boot, seed=cfg.seed)
    index = {"train_store": str(train_dir / "train.zarr"), "stores": {k: str(v) for k, v in stores.items()},
             "summaries": summaries}
    (report / "summary.json").write_text(json.dumps(index, indent=2, allow_nan=False, default=str))
    (report / "results_table.md").write_text(results_table(summaries, cfg))
    figures = []
    for name, summary in summaries.items():
        files = summary.get("figures") or summary.get("sharpness", {}).get("figures") or []
        captions = summary.get("figure_captions") or summary.get("sharpness", {}).get("figure_captions") or {}
        figures += [(f"{name}/{Path(f).name}", captions.get(Path(f).name, "")) for f in files
                    if str(f).endswith(".png")]
    rows = [[name, str(stores[name]), f"{name}/summary.json"] for name in stores]
    notes = [f"{name}: {note}" for name, s in summaries.items() for note in s.get("notes", [])]
    (report / "index.html").write_text(html_report("gradlab demo", ["store", "path", "summary"], rows, figures,
                                                   notes=notes))
    return index


def results_table(summaries: dict[str, Any], cfg: DemoConfig) -> str:
    """The README's results table (Markdown), generated from the demo's summaries so that it cannot drift:
    headline ‖G‖², tr Σ, B_noise (U-statistics), β and crossover of ‖s_B‖ (frozen store), λ_max per run."""
    from gradlab.analysis.interval import Estimate

    ck = summaries["frozen"]["checkpoints"]

    def est(d: dict[str, Any]) -> str:
        return Estimate.from_dict(d).format(3)

    early, late = cfg.early_epoch, cfg.epochs
    m_max = max(cfg.probe_batch_sizes)
    lines = [f"| | early (epoch {early}) | late (epoch {late}) |", "|---|---|---|"]
    for key, name in (("grad_sq_norm", "‖G‖² (unbiased estimate, U-statistics)"),
                      ("trace_cov", "tr Σ (per-example gradient noise)"), ("b_noise", "B_noise = tr Σ/‖G‖²")):
        lines.append(f"| {name} | {est(ck['early']['estimates'][key])} | {est(ck['late']['estimates'][key])} |")
    pl = {c: ck[c]["power_law"]["minibatch_sum_rms"] for c in ("early", "late")}
    lines.append(f"| β of ‖s_B‖ ∝ m^β over m = 1…{m_max} | {est(pl['early']['beta'])} | {est(pl['late']['beta'])} |")
    lines.append(f"| crossover m_× of ‖s_B‖² = a·c_m·m + b·m² (B_noise again: a consistency check) | "
                 f"{est(pl['early']['crossover'])} | "
                 f"{est(pl['late']['crossover'])} |")
    sharp = summaries.get("sharpness", {}).get("sharpness", {}).get("checkpoints", [])
    small, large = cfg.train_batch_sizes
    lam = {(c["train_batch_size"], c["epoch"]): c["lambda_max"] for c in sharp}
    if lam:
        cells = [" / ".join(f"{lam.get((float(b), float(e)), float('nan')):.3g}" for b in (small, large))
                 for e in (early, late)]
        lines.append(f"| λ_max of the training loss (batch {small} run / batch {large} run) | {cells[0]} | "
                     f"{cells[1]} |")
    return "\n".join(lines) + "\n"


def _say(progress: bool, message: str) -> None:
    log.info(message)
    if progress:
        import sys

        print(message, file=sys.stderr, flush=True)
