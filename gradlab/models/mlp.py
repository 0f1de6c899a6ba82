"""Multi-layer perceptron: the blog's 784-1024-1024-10 ReLU net (input size follows the data)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gradlab.models.norm import make_norm


class MLP(nn.Module):
    """Flatten -> [Linear -> (BatchNorm) -> ReLU] * len(widths) -> Linear.

    Parameters are named ``layers.<i>.weight``/``layers.<i>.bias``; the probe's fast paths rely on every
    parameter living in an ``nn.Linear``.
    """

    def __init__(
        self,
        in_features: int,
        n_classes: int,
        widths: Sequence[int] = (1024, 1024),
        batch_norm: bool = False,
        ghost_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        mods: list[nn.Module] = []
        prev = in_features
        for w in widths:
            mods.append(nn.Linear(prev, int(w)))
            if batch_norm:
                mods.append(make_norm(int(w), dims=1, ghost_batch_size=ghost_batch_size))
            mods.append(nn.ReLU())
            prev = int(w)
        mods.append(nn.Linear(prev, n_classes))
        self.layers = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.flatten(1))
