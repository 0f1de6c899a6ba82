"""Loss and accuracy of a model on a split, in eval mode, without touching the caller's model."""

from __future__ import annotations

import torch
from torch import nn

from gradlab.curvature.hvp import LOSSES, functional_copy, objective_loss
from gradlab.task import Batch, PerExampleLoss, batch_len, index_batch, inputs_targets, to_run
from gradlab.task import cross_entropy as task_cross_entropy


def evaluate(
    model: nn.Module,
    x: torch.Tensor | Batch,
    y: torch.Tensor | None = None,
    *,
    loss: str | PerExampleLoss = "cross_entropy",
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    chunk_size: int = 1024,
) -> tuple[float, float]:
    """Mean loss (1/n) Σᵢ ℓᵢ and accuracy (fraction of argmax == label for classification with logits (B, C);
    NaN for other losses).  ``x`` with ``y`` None is a batch pytree (:mod:`gradlab.task`).

    Evaluated on an eval-mode copy (batch norm with running statistics, no dropout), in chunks.
    """
    net = functional_copy(model, dtype=dtype, device=device, bn_mode="eval")
    batch = x if y is None else (x, y)
    per_example = objective_loss(loss)
    classify = loss == "cross_entropy" or loss is task_cross_entropy or loss == "cross-entropy"
    n = batch_len(batch)
    total, correct = 0.0, 0
    with torch.no_grad():
        for i0 in range(0, n, chunk_size):
            chunk = to_run(index_batch(batch, slice(i0, i0 + chunk_size)), device=device, dtype=dtype)
            if classify:
                xb, yb = inputs_targets(chunk)
                out = net(xb)
                if not (isinstance(out, torch.Tensor) and out.dim() == 2 and yb.dim() == 1):
                    classify = False
                    total += float(per_example(net, chunk).sum())
                    continue
                total += float(LOSSES["cross_entropy"](out, yb).sum())
                correct += int((out.argmax(1) == yb).sum())
            else:
                total += float(per_example(net, chunk).sum())
    acc = correct / n if classify else float("nan")
    return total / n, acc
