"""Keskar's parametric plot: loss and accuracy along θ(α) = (1 − α)·θ_small + α·θ_large, α ∈ [−1, 2].

Keskar et al. (2017), §2.2.1 (after Goodfellow, Vinyals & Saxe 2015): interpolating between a small-batch and a
large-batch solution shows the large-batch minimum as the sharper valley.  Every floating-point entry of the
state dict is interpolated the same way -- parameters *and* batch-norm running statistics (the choice recorded
as ``bn_buffers = "interpolated"``); running variances are clipped below at 0 when α ∉ [0, 1] would make them
negative (batch norm adds its own ε); integer buffers (``num_batches_tracked``) are taken from θ_small.
Losses and accuracies are evaluated in eval mode on the whole train and test splits.  At α = 0 and α = 1 the
interpolated state equals the endpoints exactly, so the endpoints' losses are reproduced exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from gradlab.checkpoint import load_state_strict
from gradlab.curvature.evaluate import evaluate
from gradlab.errors import UsageError

BN_BUFFERS = "interpolated"


def check_compatible(small: Mapping[str, torch.Tensor], large: Mapping[str, torch.Tensor]) -> None:
    """Both states must have the same keys and shapes, else a ``UsageError`` naming the differences."""
    if set(small) != set(large):
        diff = sorted(set(small) ^ set(large))
        raise UsageError(f"--interpolate checkpoints hold different tensors ({diff[:5]}...); give two checkpoints of "
                         "the same architecture")
    shapes = [k for k in small if tuple(small[k].shape) != tuple(large[k].shape)]
    if shapes:
        raise UsageError(f"--interpolate checkpoints differ in shape at {shapes[:5]}; give two checkpoints of the "
                         "same architecture")


def interpolate_state(small: Mapping[str, torch.Tensor], large: Mapping[str, torch.Tensor],
                      alpha: float) -> dict[str, torch.Tensor]:
    """(1 − α)·small + α·large for floating tensors; integer tensors from ``small``; running_var clipped ≥ 0."""
    out = {}
    for k, a in small.items():
        b = large[k]
        if a.is_floating_point():
            v = (1.0 - alpha) * a.double() + alpha * b.double()
            if alpha in (0.0, 1.0):
                v = (a if alpha == 0.0 else b).double()
            if k.endswith("running_var"):
                v = v.clamp_min(0.0)
            out[k] = v.to(a.dtype)
        else:
            out[k] = a.clone()
    return out


def parametric_curve(
    template: nn.Module,
    small: Mapping[str, torch.Tensor],
    large: Mapping[str, torch.Tensor],
    alphas: np.ndarray,
    splits: Mapping[str, Any],
    *,
    loss: Any = "cross_entropy",
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    progress: Callable[[], None] | None = None,
) -> dict[str, np.ndarray]:
    """For each α and each split name s: ``{s}_loss`` and ``{s}_accuracy`` arrays of shape (len(alphas),).

    ``template`` is only used as an architecture: it is deep-copied (by ``evaluate``) after loading the
    interpolated state into a private copy, never modified.
    """
    import copy

    check_compatible(small, large)
    net = copy.deepcopy(template)
    out = {f"{s}_{q}": np.full(len(alphas), np.nan) for s in splits for q in ("loss", "accuracy")}
    for i, alpha in enumerate(np.asarray(alphas, dtype=np.float64)):
        load_state_strict(net, interpolate_state(small, large, float(alpha)), f"interpolation at alpha={alpha}")
        for s, batch in splits.items():  # each split: a batch pytree, e.g. (x, y)
            out[f"{s}_loss"][i], out[f"{s}_accuracy"][i] = evaluate(net, batch, loss=loss, dtype=dtype,
                                                                    device=device)
        if progress is not None:
            progress()
    return out
