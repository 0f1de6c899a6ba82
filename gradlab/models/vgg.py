"""VGG-style networks (Simonyan & Zisserman 2014, arXiv:1409.1556) adapted to small images such as CIFAR-10.

``vgg13`` is the net of the VGG13/CIFAR-10 large-batch report (seeds/003): the five conv stages of VGG13, batch
norm (or ghost batch norm) only in the feature extractor, and a small fully connected classifier.  Adaptations
to 32x32 inputs, following the usual CIFAR VGGs: a max pool is skipped once the feature map is 1x1 (so 8x8 digits
and 28x28 MNIST work too), the map is averaged to 1x1, and the classifier is
Linear(c, 512·width) -> ReLU -> Linear(512·width, n_classes) with no dropout (dropout would add its own
gradient noise to every probe).  ``width`` multiplies every channel count (at least 1), so tiny nets run in tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gradlab.errors import UsageError
from gradlab.models.norm import make_norm

# Channel counts per 3x3 conv; "M" is a 2x2 max pool.  Table 1 of Simonyan & Zisserman, configurations A, B, D.
CONFIGS: dict[str, tuple[int | str, ...]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}


class VGG(nn.Module):
    """``features`` ([Conv3x3 -> (BN) -> ReLU]* with pools) -> global average pool -> ``classifier``."""

    def __init__(
        self,
        input_shape: Sequence[int],
        n_classes: int,
        config: str = "vgg13",
        width: float = 1.0,
        batch_norm: bool = True,
        ghost_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if config not in CONFIGS:
            raise UsageError(f"unknown VGG config {config!r}; choose one of {sorted(CONFIGS)}")
        if not width > 0:
            raise UsageError(f"VGG width multiplier must be > 0, got {width}")
        if len(input_shape) != 3:
            raise UsageError(f"vgg needs image inputs (C, H, W), got input shape {tuple(input_shape)}")
        c, h, w = (int(s) for s in input_shape)
        mods: list[nn.Module] = []
        for item in CONFIGS[config]:
            if item == "M":
                if min(h, w) >= 2:
                    mods.append(nn.MaxPool2d(2))
                    h, w = h // 2, w // 2
                continue
            out = max(1, round(int(item) * width))
            mods.append(nn.Conv2d(c, out, kernel_size=3, padding=1, bias=not batch_norm))
            if batch_norm:
                mods.append(make_norm(out, dims=2, ghost_batch_size=ghost_batch_size))
            mods.append(nn.ReLU())
            c = out
        self.features = nn.Sequential(*mods)
        self.pool = nn.AdaptiveAvgPool2d(1)
        hidden = max(1, round(512 * width))
        self.classifier = nn.Sequential(nn.Linear(c, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))
