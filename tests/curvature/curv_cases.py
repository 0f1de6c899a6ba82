"""Shared cases for the curvature tests: linear regression, tiny MLPs, dense float64 Hessians, real checkpoints."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gradlab.checkpoint import Recipe, save_checkpoint
from gradlab.models import build_model


def linreg(n: int = 40, d: int = 6, seed: int = 0, orthogonal: bool = False):
    """Mean-MSE linear regression: model, X, y, and the exact Hessian 2XᵀX/n (float64)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    if orthogonal:  # orthogonal columns with distinct norms: XᵀX diagonal
        q, _ = np.linalg.qr(x)
        x = q * np.arange(1, d + 1)
    y = rng.standard_normal((n, 1))
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(rng.standard_normal((1, d))))
    return model, torch.from_numpy(x), torch.from_numpy(y), 2 * x.T @ x / n


def tiny_mlp(in_shape=(1, 8, 8), widths=(6,), seed: int = 0, batch_norm: bool = False) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model("mlp", in_shape, 10, widths=list(widths), batch_norm=batch_norm)


def dense_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Dense float64 Hessian of the mean cross-entropy by ``torch.func.hessian`` on the flat parameters."""
    net = __import__("copy").deepcopy(model).double().eval()
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    sizes = [p.numel() for _, p in net.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    buffers = dict(net.named_buffers())

    def loss(flat: torch.Tensor) -> torch.Tensor:
        params = {n: t.view(s) for n, t, s in zip(names, torch.split(flat, sizes), shapes)}
        out = torch.func.functional_call(net, (params, buffers), (x.double(),))
        return nn.functional.cross_entropy(out, y)

    with warnings.catch_warnings():
        # torch.func.hessian (forward-over-reverse) loads torch's jvp decompositions, which call the deprecated
        # torch.jit.script once per process; that torch-internal warning is not ours to fix.
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=DeprecationWarning)
        return torch.func.hessian(loss)(theta).numpy()


def train_a_bit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, batch: int,
                seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return model


def write_checkpoint(path: Path, model: nn.Module, widths, *, epoch: int, batch_size: int, lr: float,
                     batch_norm: bool = False, tag: str | None = None) -> Path:
    meta = {"dataset": "digits", "epoch": epoch, "batch_size": batch_size, "lr": lr, "optimizer": "sgd",
            "seed": 0, "lr_rule": "none"}
    if tag:
        meta["tag"] = tag
    return save_checkpoint(path, model, Recipe("mlp", {"widths": list(widths), "batch_norm": batch_norm},
                                               (1, 8, 8), 10), meta)
