"""The minibatch loss L_B that the autograd engines (loop, generic) differentiate, and that training uses.

L_B = (1/m) Σ_{i∈B} ℓᵢ (reduction ``mean``) or Σ_{i∈B} ℓᵢ (``sum``) of a per-example loss ℓ (:mod:`gradlab.task`).

Example (mean of the per-example cross-entropies)::

    >>> import torch
    >>> from torch import nn
    >>> from gradlab.task import cross_entropy
    >>> net = nn.Linear(2, 3).double()
    >>> x, y = torch.ones(4, 2, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    >>> per = cross_entropy(net, (x, y))
    >>> bool(torch.isclose(minibatch_loss(net, (x, y), cross_entropy, "mean"), per.mean()))
    True
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from gradlab.task import Batch, PerExampleLoss
from gradlab.task import cross_entropy as task_cross_entropy


def minibatch_loss(net: nn.Module, batch: Batch, loss: PerExampleLoss, reduction: str) -> Tensor:
    """L_B = (1/m) Σ ℓᵢ (mean) or Σ ℓᵢ (sum) over the minibatch ``batch``.  The built-in cross-entropy on (x, y)
    with logits (m, C) goes through ``F.cross_entropy(..., reduction=...)`` directly (the same arithmetic as before
    the task contract, so stores stay bitwise identical)."""
    if loss is task_cross_entropy and isinstance(batch, (tuple, list)) and len(batch) == 2 \
            and isinstance(batch[1], Tensor) and batch[1].ndim == 1:
        out = net(batch[0])
        if isinstance(out, Tensor) and out.ndim == 2:
            return F.cross_entropy(out, batch[1], reduction=reduction)
    per = loss(net, batch)
    return per.mean() if reduction == "mean" else per.sum()


class ReducedLoss(nn.Module):
    """The minibatch loss L_B = (1/m) Σ ℓᵢ (mean) or Σ ℓᵢ (sum) of a per-example loss, as a module (so that
    ``torch.func.functional_call`` can swap the parameters of ``net``)."""

    def __init__(self, net: nn.Module, loss: PerExampleLoss, reduction: str) -> None:
        super().__init__()
        self.net = net
        self.loss = loss
        self.reduction = reduction

    def forward(self, batch: Batch) -> Tensor:
        return minibatch_loss(self.net, batch, self.loss, self.reduction)
