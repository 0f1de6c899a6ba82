"""``gradlab probe`` as a job of the one runner (:mod:`gradlab.runner`): its units, their computation and the
per-checkpoint variables.

A unit is a chunk-aligned block of trials of one checkpoint, all batch sizes; its results depend only on (config,
checkpoint index, trials), so a resume (after ``kill -9`` too), ``--workers`` and ``--scheduler`` write the same
bits as one uninterrupted local run.  :meth:`ProbeJob.finalize` rewrites the per-checkpoint variables (moment
estimates, distances) from the stored trials on every run, so resumed and uninterrupted runs agree.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from gradlab.probe.config import ProbeConfig
from gradlab.probe.layout import probe_template
from gradlab.runner import Job, Template, Unit, UnitContext

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeJob(Job):
    """The probe store of one resolved :class:`~gradlab.probe.config.ProbeConfig`."""

    config: ProbeConfig
    kind: ClassVar[str] = "probe"
    # the bar counts (trial, batch size) pairs: a frozen trial serves every m at once, a step trial runs N/m steps
    # per m, so both advance within a unit (per trial, per block of step trials) and a unit's work is trials × |m|
    progress_desc: ClassVar[str] = "probe (trials × batch sizes)"
    progress_unit: ClassVar[str] = "trial×m"

    def config_dict(self) -> dict[str, Any]:
        return self.config.to_dict()

    def template(self) -> Template:
        return probe_template(self.config)

    def fingerprints(self) -> dict[str, str]:
        """The training split's tensors (the pool every trial draws from) and the first checkpoint's model."""
        from gradlab.probe.units import checkpoint_model
        from gradlab.task import data_sha256, model_sha256

        return {"data_content": self.config.data_sha256 or data_sha256(self.state()),
                "model_architecture": model_sha256(checkpoint_model(self.config, 0))}

    def units(self) -> Sequence[Unit]:
        n_m = len(self.config.batch_sizes)
        return [Unit({"checkpoint": c, "trial": slice(t0, t1)}, f"{self.config.checkpoints[c].label}[{t0}:{t1}]",
                     work=(t1 - t0) * n_m)
                for c, t0, t1 in self.config.units()]

    def prepare(self) -> Any:
        from gradlab.probe.units import pool

        return pool(self.config.data, self.config.device, self.config.collate, self.config.data_sha256)

    def state_key(self) -> str:
        # the data's digest too: a process never reuses a pool of data that changed since (a notebook rerun)
        return f"{super().state_key()}:{self.config.data_sha256}"

    def compute(self, state: Any, unit: Unit, ctx: UnitContext) -> dict[str, np.ndarray]:
        c, trials = int(unit.region["checkpoint"]), unit.region["trial"]
        assert isinstance(trials, slice)
        return compute_trials(self.config, state, c, trials.start, trials.stop, tick=ctx.tick)

    def on_result(self, unit: Unit, result: Mapping[str, np.ndarray], ctx: UnitContext) -> dict[str, int]:
        bad = result["nonfinite_count"]
        total = int(bad.sum())
        if total:
            t0 = unit.region["trial"].start  # type: ignore[union-attr]
            trials = sorted({t0 + int(t) for t in np.nonzero(bad)[1]})
            log.warning("checkpoint %s: %d non-finite gradient entries in trials %s (recorded in nonfinite_count; "
                        "their norms are NaN or inf)", self.config.checkpoints[int(unit.region["checkpoint"])].label,
                        total, trials)
        return {"nonfinite": total}

    def finalize(self, writer: Any, ctx: UnitContext) -> None:
        finalize(writer, self.config)


def compute_trials(config: ProbeConfig, pool: Any, c: int, t0: int, t1: int,
                   tick: Callable[[int], Any] | None = None) -> dict[str, np.ndarray]:
    """All per-trial variables of trials ``[t0, t1)`` of checkpoint ``c``, shaped as their store regions (the
    ``checkpoint`` dim dropped).  ``tick(n)`` is called as (trial, batch size) pairs complete: (t1 − t0)·|m| in
    all."""
    from gradlab.probe.protocols import protocol
    from gradlab.probe.sampling import draw_trials
    from gradlab.probe.units import empty_outputs

    idx = draw_trials(config.seed, c, range(t0, t1), config.budget, config.pool_size, config.replacement,
                      config.draws)
    out = empty_outputs(config, t1 - t0)
    out["example_index"][...] = idx
    protocol(config.protocol).compute(config, c, idx, pool, out, tick=tick or _no_tick)
    return out


def _no_tick(n: int = 1) -> None:
    return None


def finalize(writer: Any, config: ProbeConfig) -> None:
    """Write the per-checkpoint variables from the stored trials (moment estimates) and the checkpoint files
    (distances).  Idempotent: a resume rewrites the same values."""
    import torch

    from gradlab.checkpoint import build_model_from, load_checkpoint
    from gradlab.probe.distance import distances
    from gradlab.store import crash_point

    def state(path: str) -> dict[str, Any]:
        net = build_model_from(load_checkpoint(path), model=config.model, model_kwargs=config.model_kwargs,
                               input_shape=config.input_shape, n_classes=config.n_classes)
        return {n: p.detach() for n, p in net.named_parameters()}

    for c, spec in enumerate(config.checkpoints):
        with torch.no_grad():
            d = distances(state(spec.path), state(spec.init_path) if spec.init_path else None, config.layers)
        for name in ("dist_init_layer", "dist_origin_layer", "cos_init_layer", "dist_init", "dist_origin",
                     "cos_init"):
            writer.write(name, {"checkpoint": c}, getattr(d, name))
        if config.protocol == "frozen":
            from gradlab.probe.frozen import checkpoint_estimates

            est = checkpoint_estimates(writer.read("gram_trace", {"checkpoint": c}),
                                       writer.read("gram_sum", {"checkpoint": c}), config.budget, config.pool_size,
                                       config.replacement)
            for name in ("grad_sq_norm", "grad_sq_norm_se", "trace_cov", "trace_cov_se", "b_noise"):
                writer.write(name, {"checkpoint": c}, getattr(est, name))
        crash_point("probe.finalize")
