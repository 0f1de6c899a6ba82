"""The one evaluator (train, sharpness, interpolation): loss and accuracy of a model on a split, in eval mode,
without changing the caller's model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gradlab.curvature.hvp import functional_copy, objective_loss
from gradlab.task import Batch, PerExampleLoss, batch_len, index_batch, inputs_targets, to_run
from gradlab.task import cross_entropy as task_cross_entropy


def evaluate(
    model: nn.Module,
    x: torch.Tensor | Batch,
    y: torch.Tensor | None = None,
    *,
    loss: str | PerExampleLoss = "cross_entropy",
    dtype: torch.dtype | None = torch.float64,
    device: torch.device | str | None = "cpu",
    chunk_size: int = 1024,
) -> tuple[float, float]:
    """Mean loss (1/n) Σᵢ ℓᵢ and accuracy (fraction of argmax == label for classification with logits (B, C);
    NaN for other losses).  ``x`` with ``y`` None is a batch pytree (:mod:`gradlab.task`).

    Evaluated in eval mode (batch norm with running statistics, no dropout), in chunks of ``chunk_size``: on a copy
    in ``dtype`` on ``device``, or -- with ``dtype`` and ``device`` None (the model's own) -- on the model itself,
    whose training flag is restored (a training loop evaluates its live, possibly hooked, model without copying).
    """
    if dtype is None and device is None:
        was_training = model.training
        model.eval()
        try:
            return _evaluate(model, x, y, loss=loss, dtype=None, device=None, chunk_size=chunk_size)
        finally:
            model.train(was_training)
    net = functional_copy(model, dtype=dtype, device=device, bn_mode="eval")
    return _evaluate(net, x, y, loss=loss, dtype=dtype, device=device, chunk_size=chunk_size)


def _evaluate(net: nn.Module, x: torch.Tensor | Batch, y: torch.Tensor | None, *, loss: str | PerExampleLoss,
              dtype: torch.dtype | None, device: torch.device | str | None, chunk_size: int) -> tuple[float, float]:
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
                total += float(F.cross_entropy(out, yb, reduction="sum"))
                correct += int((out.argmax(1) == yb).sum())
            else:
                total += float(per_example(net, chunk).sum())
    acc = correct / n if classify else float("nan")
    return total / n, acc
