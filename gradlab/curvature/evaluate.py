"""Loss and accuracy of a model on a split, in eval mode, without touching the caller's model."""

from __future__ import annotations

import torch
from torch import nn

from gradlab.curvature.hvp import LOSSES, functional_copy


def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    loss: str = "cross_entropy",
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    chunk_size: int = 1024,
) -> tuple[float, float]:
    """Mean loss (1/n) Σᵢ ℓᵢ and accuracy (fraction of argmax == label; NaN for non-classification losses).

    Evaluated on an eval-mode copy (batch norm with running statistics, no dropout), in chunks.
    """
    net = functional_copy(model, dtype=dtype, device=device, bn_mode="eval")
    per_example = LOSSES[loss]
    n = int(x.shape[0])
    total, correct = 0.0, 0
    with torch.no_grad():
        for i0 in range(0, n, chunk_size):
            xb = x[i0:i0 + chunk_size].to(device=device, dtype=dtype)
            yb = y[i0:i0 + chunk_size].to(device)
            out = net(xb)
            total += float(per_example(out, yb if loss == "cross_entropy" else yb.to(dtype)).sum())
            if loss == "cross_entropy":
                correct += int((out.argmax(1) == yb).sum())
    acc = correct / n if loss == "cross_entropy" else float("nan")
    return total / n, acc
