"""The step protocol's unit (SCIENCE.md "The two probe protocols"): from θ (train mode), each trial takes N/m SGD
steps per batch size m and sums the minibatch gradients it used (:func:`gradlab.probe.step.step_trials`, all the
unit's trials in lock-step).  ``nonfinite_count`` is the step engine's count over all steps and parameters."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from gradlab.probe.config import ProbeConfig
from gradlab.probe.units import checkpoint_model, entry_outputs, norms_of, put_quantities


def compute(config: ProbeConfig, c: int, idx: np.ndarray, pool: Any, out: dict[str, np.ndarray],
            tick: Callable[[int], Any] = lambda n=1: None) -> None:
    """Fill ``out`` (the unit's arrays) for the trials whose draws are the rows of ``idx``, at checkpoint ``c``;
    ``tick(n)`` as each block of n trials finishes its N/m steps at one batch size m."""
    import torch

    from gradlab.probe.step import step_trials
    from gradlab.quantities import TrialInputs, quantities_for
    from gradlab.task import resolve_loss

    order = [n for n in config.layers if n in config.selected]
    quantities = quantities_for("step")
    sums_by_m: list[list[dict[str, np.ndarray]]] = []
    displacement: list[np.ndarray] = []
    net = checkpoint_model(config, c)
    for i, m in enumerate(config.batch_sizes):
        r = step_trials(net, pool, None, torch.as_tensor(idx), int(m), config.lr,
                        config.reduction, order,  # type: ignore[arg-type]
                        dtype=getattr(torch, config.dtype), device=config.device,
                        loss=resolve_loss(config.loss), on_block=tick)
        for j in range(len(idx)):
            sums = {n: r.grad_sum[n][j] for n in order}
            out["grad_norm"][i, j], out["grad_norm_layer"][i, j], out["grad_norm_group"][i, j] = \
                norms_of(config, sums)
            vec = np.concatenate([sums[n].reshape(-1) for n in order])
            entry_outputs(config, vec, out, i, j)
        out["displacement"][i] = r.displacement
        out["step_grad_norm_mean"][i] = r.step_norm_mean
        out["step_grad_norm_std"][i] = r.step_norm_std
        out["step_grad_norm_max"][i] = r.step_norm_max
        out["nonfinite_count"][i] = r.nonfinite
        if quantities:  # the trial's inputs for the registered step quantities
            sums_by_m.append([{n: r.grad_sum[n][j] for n in order} for j in range(len(idx))])
            displacement.append(r.displacement)
    if quantities:
        for j in range(len(idx)):
            inputs = TrialInputs(config.batch_sizes, config.reduction, config.budget,
                                 step_sums=[sums[j] for sums in sums_by_m],
                                 displacement=np.array([d[j] for d in displacement]))
            put_quantities(quantities, inputs, out, j)
