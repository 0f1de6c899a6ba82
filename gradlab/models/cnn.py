"""A small CNN: [Conv3x3 -> ReLU -> (BatchNorm) -> MaxPool2] per entry of ``channels``, then a 2-layer head.

Works for 1x8x8 digits, 1x28x28 MNIST and 3x32x32 CIFAR: a block pools only while the feature map is at least
2x2, and the head's input size follows the input shape.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gradlab.errors import UsageError
from gradlab.models.norm import make_norm


class SmallCNN(nn.Module):
    """``features`` (conv blocks) -> flatten -> ``classifier`` (Linear -> ReLU -> Linear).

    Convolutions are 3x3 with padding 1 (size-preserving); each block ends with a 2x2 max pool while the map is
    at least 2x2.  ``batch_norm`` puts a BatchNorm2d (or ghost batch norm with ``ghost_batch_size``) after each
    ReLU, as in conv-relu-bn-pool.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        n_classes: int,
        channels: Sequence[int] = (32, 64),
        hidden: int = 128,
        batch_norm: bool = False,
        ghost_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise UsageError(f"cnn needs image inputs (C, H, W), got input shape {tuple(input_shape)}")
        if not channels or any(int(c) < 1 for c in channels) or int(hidden) < 1:
            raise UsageError(f"cnn needs channels >= 1 and hidden >= 1, got channels={channels}, hidden={hidden}")
        c, h, w = (int(s) for s in input_shape)
        mods: list[nn.Module] = []
        for out in (int(c_) for c_ in channels):
            mods += [nn.Conv2d(c, out, kernel_size=3, padding=1), nn.ReLU()]
            if batch_norm:
                mods.append(make_norm(out, dims=2, ghost_batch_size=ghost_batch_size))
            if min(h, w) >= 2:
                mods.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            c = out
        self.features = nn.Sequential(*mods)
        self.classifier = nn.Sequential(nn.Linear(c * h * w, int(hidden)), nn.ReLU(), nn.Linear(int(hidden), n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))
