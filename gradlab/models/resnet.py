"""The CIFAR ResNet of He, Zhang, Ren & Sun (2016), "Deep Residual Learning for Image Recognition", §4.2.

depth = 6n + 2: a 3x3 conv with ``width`` (16) filters, three stages of n basic blocks with width, 2·width and
4·width filters (feature maps 32, 16, 8 for CIFAR; the first block of stages 2 and 3 has stride 2), global
average pooling and a linear layer.  ResNet-20 (n = 3) has 0.27 M parameters, ResNet-32 0.46 M (Table 6).

Shortcuts are **option A**, as the paper uses on CIFAR: identity, and where the shape changes a stride-2
subsampling of the input with the extra channels zero-padded, so shortcuts add no parameters.
``batch_norm=False`` replaces every BN by the identity (the convs then get biases); ``ghost_batch_size`` makes
every BN a ghost batch norm (Hoffer et al. 2017).  Convolutions start from He et al. (2015) normal
initialisation as in the paper; draws come from torch's default generator like any ``nn`` layer, so seed it
(e.g. under ``torch.random.fork_rng``) around construction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from gradlab.errors import UsageError
from gradlab.models.norm import make_norm


def _norm(channels: int, batch_norm: bool, ghost_batch_size: int | None) -> nn.Module:
    return make_norm(channels, dims=2, ghost_batch_size=ghost_batch_size) if batch_norm else nn.Identity()


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), with an option-A shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int, batch_norm: bool, ghost_batch_size: int | None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=not batch_norm)
        self.bn1 = _norm(c_out, batch_norm, ghost_batch_size)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=not batch_norm)
        self.bn2 = _norm(c_out, batch_norm, ghost_batch_size)
        self.stride = stride
        self.pad = c_out - c_in

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """Option A: subsample by ``stride`` and zero-pad the new channels (split evenly, as usual)."""
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images: ``stem`` -> ``stage1..3`` -> global average pool -> ``fc``."""

    def __init__(
        self,
        input_shape: Sequence[int],
        n_classes: int,
        depth: int = 20,
        width: int = 16,
        batch_norm: bool = True,
        ghost_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if int(depth) != depth or depth < 8 or (depth - 2) % 6:
            raise UsageError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...), "
                             f"got {depth}")
        if int(width) < 1:
            raise UsageError(f"CIFAR ResNet width must be >= 1, got {width}")
        if len(input_shape) != 3:
            raise UsageError(f"resnet needs image inputs (C, H, W), got input shape {tuple(input_shape)}")
        n, width = (int(depth) - 2) // 6, int(width)
        self.stem = nn.Sequential(
            nn.Conv2d(int(input_shape[0]), width, 3, padding=1, bias=not batch_norm),
            _norm(width, batch_norm, ghost_batch_size),
            nn.ReLU(),
        )
        stages: list[nn.Sequential] = []
        c = width
        for i, c_out in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(c, c_out, stride, batch_norm, ghost_batch_size))
                c = c_out
            stages.append(nn.Sequential(*blocks))
        self.stage1, self.stage2, self.stage3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, n_classes)
        for m in self.modules():  # He et al. (2015) initialisation, as the paper uses: N(0, 2 / fan_in)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))
