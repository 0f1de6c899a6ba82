"""User code for the cbs tests (``--model cbs_user:...``, ``--data cbs_user:...``): models with frozen parameters or
batch norm on the embedded digits, and a small regression task with the mse loss."""

from __future__ import annotations

import torch
from torch import nn


def frozen_mlp(**_: object) -> nn.Module:
    """A Linear/ReLU chain on digits whose first weight is frozen (requires_grad=False)."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    net[1].weight.requires_grad_(False)
    return net


def bn_mlp(**_: object) -> nn.Module:
    """An MLP on digits with a BatchNorm1d (train mode while branches train)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))


def regression_data() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """y = x w + noise, 400 training and 100 held-out examples, float targets (the mse loss)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 5, generator=g)
    y = x @ torch.randn(5, 1, generator=g) + 0.1 * torch.randn(500, 1, generator=g)
    return {"train": (x[:400], y[:400]), "test": (x[400:], y[400:])}


def regression_mlp(**_: object) -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 1))


def save_state(factory, path):  # type: ignore[no-untyped-def]
    """A plain state_dict checkpoint of ``factory()`` (seed 0): gradlab cbs rebuilds it with --model."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.save(factory().state_dict(), path)
    return path


def half_mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """A custom per-example loss fn(model, batch): half the squared error."""
    x, y = batch
    return 0.5 * ((model(x) - y) ** 2).mean(-1)
