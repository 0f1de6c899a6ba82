"""The frozen protocol's unit (SCIENCE.md "The two probe protocols"): at fixed θ (eval mode: batch norm uses running
statistics so examples stay independent, dropout off), one per-example Gram matrix per trial
(:mod:`gradlab.probe.gram`) gives every batch size's minibatch gradient norms (:mod:`gradlab.probe.frozen`).
``nonfinite_count`` is the number of non-finite entries of Σᵢ gᵢ over the selected tensors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from gradlab.probe.config import ProbeConfig
from gradlab.probe.units import gram_engine, put_quantities


def compute(config: ProbeConfig, c: int, idx: np.ndarray, pool: Any, out: dict[str, np.ndarray],
            tick: Callable[[int], Any] = lambda n=1: None) -> None:
    """Fill ``out`` (the unit's arrays) for the trials whose draws are the rows of ``idx``, at checkpoint ``c``;
    ``tick(|m|)`` after each trial (one Gram matrix serves every batch size)."""
    import torch

    from gradlab.probe.distance import param_kind
    from gradlab.probe.frozen import frozen_trial, reduction_scale, total_gram
    from gradlab.quantities import TrialInputs, quantities_for
    from gradlab.probe.histogram import ScaledHistograms
    from gradlab.task import index_batch, tensor_leaves

    pool_device = tensor_leaves(pool)[0].device
    order = [n for n in config.layers if n in config.selected]
    engine = gram_engine(config, c)
    quantities = quantities_for("frozen")
    kinds = {n: param_kind(n) for n in order}
    sel_idx = [config.layers.index(n) for n in order]
    for j in range(len(idx)):
        rows = torch.as_tensor(idx[j], device=pool_device)
        res = engine(index_batch(pool, rows))
        total = total_gram(res.gram)  # K over the selected tensors: the norms and the quantities read the same one
        ft = frozen_trial(res.gram, kinds, config.batch_sizes, config.reduction, total=total)
        out["grad_norm"][:, j] = ft.grad_norm
        out["grad_norm_layer"][:, j, sel_idx] = ft.grad_norm_layer
        out["grad_norm_group"][:, j] = ft.grad_norm_group
        out["minibatch_grad_norm"][:, j] = ft.minibatch_grad_norm
        inputs = TrialInputs(config.batch_sizes, config.reduction, config.budget, gram=total,
                             layer_grams=res.gram)
        put_quantities(quantities, inputs, out, j)
        base = torch.cat([res.grad_sum[n].reshape(-1) for n in order])
        # S_m = c_m·base: one log pass serves every batch size's histogram; finiteness does not depend on m
        hist = ScaledHistograms(base) if config.keep != "norms" else None
        bad = hist.nonfinite if hist is not None else int((~torch.isfinite(base)).sum())
        for i, m in enumerate(config.batch_sizes):
            scale = reduction_scale(int(m), config.reduction)
            out["nonfinite_count"][i, j] = bad
            if hist is not None:
                out["entry_hist"][i, j] = hist.counts(scale)
            if config.keep == "vectors":
                out["grad_sum"][i, j] = (base * scale).cpu().numpy()
        tick(len(config.batch_sizes))
