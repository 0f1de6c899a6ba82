"""Per-example Gram matrices against per-example autograd loops in float64 (linear identity and torch.func
fallback), summed gradients, and the caller's model left untouched."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradlab.models import build_model
from gradlab.probe.gram import GramEngine, sym_gram


def per_example_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """(N, p) per-example gradients by one backward per example (float64, eval mode)."""
    net = copy.deepcopy(model).double().eval()
    rows: dict[str, list[torch.Tensor]] = {n: [] for n, _ in net.named_parameters()}
    for i in range(x.shape[0]):
        net.zero_grad()
        F.cross_entropy(net(x[i:i + 1].double()), y[i:i + 1], reduction="sum").backward()
        for n, p in net.named_parameters():
            rows[n].append(p.grad.detach().flatten().clone())
    return {n: torch.stack(v) for n, v in rows.items()}


def _check(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk_size: int) -> tuple[str, ...]:
    names = [n for n, _ in model.named_parameters()]
    res = GramEngine(model, names, dtype=torch.float64, chunk_size=chunk_size)(x, y)
    ref = per_example_grads(model, x, y)
    for n in names:
        g = ref[n]
        torch.testing.assert_close(res.gram[n], g @ g.T, rtol=1e-10, atol=1e-12, msg=n)
        torch.testing.assert_close(res.grad_sum[n].reshape(-1), g.sum(0), rtol=1e-10, atol=1e-12, msg=n)
    return res.fallback


def test_linear_identity_matches_per_example_autograd(digits):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        net = build_model("mlp", (1, 8, 8), 10, widths=[16, 12])
    x, y = digits.train.x[:40], digits.train.y[:40]
    assert _check(net, x, y, chunk_size=16) == ()  # every tensor via (aᵢ·aⱼ)(δᵢ·δⱼ), weights and biases


def test_batch_norm_and_convolutions_match_per_example_autograd(digits):
    """Issue 12 gave eval-mode batch norm and convolutions their own identities (they used the fallback)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        mlp = build_model("mlp", (1, 8, 8), 10, widths=[8], batch_norm=True)
        cnn = build_model("cnn", (1, 8, 8), 10, channels=[3], hidden=8)
    mlp.layers[1].running_mean.uniform_(-0.5, 0.5)  # eval-mode batch norm uses running statistics
    x, y = digits.train.x[:24], digits.train.y[:24]
    assert _check(mlp, x, y, chunk_size=10) == ()
    assert _check(cnn, x, y, chunk_size=7) == ()


def fallback_net() -> nn.Module:
    """Transposed convolution and PReLU: layers without an identity, so every one of their tensors falls back."""
    return nn.Sequential(nn.ConvTranspose2d(1, 2, 3, stride=2), nn.PReLU(2), nn.Flatten(), nn.Linear(2 * 17 * 17, 10))


def test_fallback_for_layers_without_an_identity_matches_per_example_autograd(digits):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        net = fallback_net()
    x, y = digits.train.x[:24], digits.train.y[:24]
    assert _check(net, x, y, chunk_size=7) == ("0.weight", "0.bias", "1.weight")


def test_linear_called_twice_falls_back():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(5, 5)
            self.b = nn.Linear(5, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.tanh(self.a(torch.tanh(self.a(x.flatten(1))))))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        net = Twice()
        x, y = torch.randn(9, 5), torch.randint(0, 3, (9,))
    assert set(_check(net, x, y, chunk_size=4)) == {"a.weight", "a.bias"}


def test_tied_linear_weights_fall_back():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        net = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
        net[2].weight = net[0].weight  # one tensor used by two layers: the identity would miss one use
        x, y = torch.randn(6, 4), torch.randint(0, 4, (6,))
    assert "0.weight" in _check(net, x, y, chunk_size=4)


def test_callers_model_is_not_mutated(digits):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        net = build_model("mlp", (1, 8, 8), 10, widths=[8], batch_norm=True)
    net.train()
    before = copy.deepcopy(net.state_dict())
    GramEngine(net, ["layers.0.weight"])(digits.train.x[:8], digits.train.y[:8])
    assert net.training and all(p.grad is None for p in net.parameters())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.requires_grad for p in net.parameters())


def test_unknown_parameter_is_refused():
    with pytest.raises(ValueError, match="not in the model"):
        GramEngine(nn.Linear(2, 2), ["nope"])


def test_engine_without_summed_gradients_gives_the_same_grams(digits):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(6)
        net = build_model("mlp", (1, 8, 8), 10, widths=[8])
    names = [n for n, _ in net.named_parameters()]
    x, y = digits.train.x[:12], digits.train.y[:12]
    full = GramEngine(net, names, dtype=torch.float64)(x, y)
    lean = GramEngine(net, names, dtype=torch.float64, grad_sum=False)(x, y)
    assert lean.grad_sum == {} and all(torch.equal(full.gram[n], lean.gram[n]) for n in names)


@pytest.mark.parametrize("n,d", [(1, 4), (256, 3), (257, 5), (1000, 30), (1024, 7)])
def test_sym_gram_equals_the_full_product(n, d):
    x = torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    g = sym_gram(x)
    torch.testing.assert_close(g, x @ x.T, rtol=1e-12, atol=1e-12)
    h = n // 2
    if n > 256:  # the mirrored block is the transpose of the computed one, bit for bit
        assert torch.equal(g[:h, h:], g[h:, :h].T)


@pytest.mark.parametrize("budget_rows", [1, 3, 10])  # Γ for all 24 examples does not fit: blocks of 1, 1, 5 rows
def test_fallback_in_row_blocks_under_a_memory_budget_matches_per_example_autograd(digits, budget_rows):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        cnn = fallback_net()
    names = [n for n, _ in cnn.named_parameters()]
    x, y = digits.train.x[:24], digits.train.y[:24]
    full = GramEngine(cnn, names, dtype=torch.float64, chunk_size=7)(x, y)
    assert len(full.fallback) == 3
    row_bytes = 8 * sum(p.numel() for n, p in cnn.named_parameters() if n in full.fallback)
    blocked = GramEngine(cnn, names, dtype=torch.float64, chunk_size=7, max_fallback_bytes=budget_rows * row_bytes)
    res = blocked(x, y)
    ref = per_example_grads(cnn, x, y)
    for n in full.fallback:
        torch.testing.assert_close(res.gram[n], full.gram[n], rtol=1e-12, atol=1e-14, msg=n)
        torch.testing.assert_close(res.gram[n], ref[n] @ ref[n].T, rtol=1e-10, atol=1e-12, msg=n)
        torch.testing.assert_close(res.grad_sum[n].reshape(-1), ref[n].sum(0), rtol=1e-10, atol=1e-12, msg=n)
