from __future__ import annotations

import pytest
import torch
from torch import nn


class SeqNet(nn.Module):
    """Every hooked layer family plus a bare parameter (the torch.func fallback): Embedding → LayerNorm →
    Linear on (B, T, d) → Conv2d on a (B, 1, T, d) view → Linear (B, d) → logits."""

    def __init__(self, vocab: int = 11, d: int = 6, n_classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.norm = nn.LayerNorm(d)
        self.proj = nn.Linear(d, d)
        self.conv = nn.Conv2d(1, 2, kernel_size=3, padding=1)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, d))  # not in a hooked module
        self.head = nn.Linear(2 * d, n_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.proj(self.norm(self.emb(ids))))  # (B, T, d)
        c = torch.tanh(self.conv(h.unsqueeze(1)))  # (B, 2, T, d)
        pooled = (c.mean(2) * self.scale).flatten(1)  # (B, 2d)
        return self.head(pooled)


@pytest.fixture
def seq_task():
    g = torch.Generator().manual_seed(0)
    model = SeqNet().double()
    ids = torch.randint(0, 11, (9, 5), generator=g)
    ids[0, :2] = 0  # padding tokens
    y = torch.randint(0, 3, (9,), generator=g)
    return model, (ids, y)


def per_example_sums(model: nn.Module, loss, batch) -> tuple[dict[str, float], dict[str, float]]:
    """S₁ = ‖Σᵢ gᵢ‖² and S₂ = Σᵢ ‖gᵢ‖² per parameter tensor by a per-example autograd loop (the reference)."""
    x, y = batch
    names = [n for n, _ in model.named_parameters()]
    per = []
    for i in range(y.shape[0]):
        li = loss(model, (x[i:i + 1], y[i:i + 1]))[0]
        per.append(torch.autograd.grad(li, list(model.parameters()), allow_unused=True))
    s1, s2 = {}, {}
    for j, n in enumerate(names):
        gs = [g[j] if g[j] is not None else torch.zeros_like(dict(model.named_parameters())[n]) for g in per]
        tot = sum(gs)
        s1[n] = float((tot**2).sum())
        s2[n] = float(sum((g**2).sum() for g in gs))
    return s1, s2
