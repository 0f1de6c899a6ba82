"""Batch norm and ghost batch norm (Hoffer et al. 2017): statistics over virtual batches of a fixed size."""

from __future__ import annotations

import torch
from torch import nn


class GhostBatchNorm(nn.Module):
    """Batch norm whose training statistics come from virtual batches of ``ghost_batch_size`` examples.

    In training mode the batch is split into chunks of ``ghost_batch_size`` (the last may be smaller) and each is
    normalised with its own mean and variance, so the batch-norm batch is independent of the SGD batch.  Running
    statistics are updated once per chunk; evaluation mode uses them exactly like ``nn.BatchNorm``.
    """

    def __init__(self, num_features: int, ghost_batch_size: int, dims: int = 1, momentum: float = 0.1) -> None:
        super().__init__()
        if ghost_batch_size < 1:
            raise ValueError(f"ghost_batch_size must be >= 1, got {ghost_batch_size}")
        self.ghost_batch_size = int(ghost_batch_size)
        self.bn = nn.BatchNorm1d(num_features, momentum=momentum) if dims == 1 else nn.BatchNorm2d(num_features,
                                                                                                     momentum=momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.shape[0] <= self.ghost_batch_size:
            return self.bn(x)
        return torch.cat([self.bn(chunk) for chunk in x.split(self.ghost_batch_size, dim=0)], dim=0)


def make_norm(num_features: int, dims: int, ghost_batch_size: int | None = None) -> nn.Module:
    """``nn.BatchNorm1d/2d``, or :class:`GhostBatchNorm` when a virtual batch size is given."""
    if ghost_batch_size:
        return GhostBatchNorm(num_features, ghost_batch_size, dims=dims)
    return nn.BatchNorm1d(num_features) if dims == 1 else nn.BatchNorm2d(num_features)
