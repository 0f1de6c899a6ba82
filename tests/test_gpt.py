"""The zoo's ``gpt``: shapes, causality, attention against torch's fused kernel, double backward (HVP against finite
differences of gradients), torch.func per-example gradients against an autograd loop, seeded init, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from gradlab.errors import UsageError
from gradlab.models import build_model
from gradlab.models.gpt import GPT, GPTConfig
from gradlab.task import lm

TINY = {"n_layer": 2, "n_head": 2, "n_embd": 16}
VOCAB, T = 11, 12


def _gpt(seed: int = 0, dtype: torch.dtype = torch.float64, **kw: object) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model("gpt", (T,), VOCAB, **{**TINY, **kw}).to(dtype)


def _ids(n: int, t: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def _mean_lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).transpose(1, 2), y)


def test_shapes_defaults_and_every_parameter_gets_a_gradient() -> None:
    model = _gpt(dtype=torch.float32)
    assert model.config.block_size == T and model.config.vocab_size == VOCAB
    x = _ids(3)
    out = model(x)
    assert out.shape == (3, T, VOCAB) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert model(x[:, :5]).shape == (3, 5, VOCAB)  # shorter than block_size is fine
    out.square().sum().backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert all(isinstance(m, (nn.Linear, nn.Embedding, nn.LayerNorm)) for m in model.modules()
               if next(m.parameters(recurse=False), None) is not None)
    assert "blocks.0.attn.causal" not in model.state_dict()  # the mask is not a checkpointed tensor


def test_the_lm_loss_takes_its_logits() -> None:
    model, x = _gpt(), _ids(4)
    y = torch.roll(x, -1, dims=1)
    per_example = lm(model, (x, y))
    assert per_example.shape == (4,)
    torch.testing.assert_close(per_example.mean(), _mean_lm_loss(model, x, y))


@pytest.mark.parametrize("t", [0, 5, T - 2])
def test_changing_later_tokens_leaves_earlier_logits_unchanged(t: int) -> None:
    model = _gpt()
    x = _ids(2)
    x2 = x.clone()
    x2[:, t + 1:] = (x2[:, t + 1:] + 1 + _ids(2, T - t - 1, seed=7) % (VOCAB - 1)) % VOCAB  # every later token differs
    a, b = model(x), model(x2)
    torch.testing.assert_close(a[:, :t + 1], b[:, :t + 1], rtol=0, atol=1e-12)
    assert (a[:, t + 1] - b[:, t + 1]).abs().max() > 1e-6  # and the next position does see its own token


def test_attention_equals_torch_fused_causal_attention() -> None:
    """The explicit masked softmax against ``F.scaled_dot_product_attention(is_causal=True)`` as the reference."""
    model = _gpt()
    attn = model.blocks[0].attn
    x = torch.randn(3, T, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    b, t, c, h = 3, T, 16, 2

    def heads(lin: nn.Linear) -> torch.Tensor:
        return lin(x).view(b, t, h, c // h).transpose(1, 2)

    ref = F.scaled_dot_product_attention(heads(attn.q), heads(attn.k), heads(attn.v), is_causal=True)
    ref = attn.proj(ref.transpose(1, 2).reshape(b, t, c))
    torch.testing.assert_close(attn(x), ref, rtol=1e-12, atol=1e-12)


def test_double_backward_hvp_matches_finite_differences_of_the_gradient() -> None:
    model = _gpt()
    x = _ids(4)
    y = torch.roll(x, -1, dims=1)
    params = [p for p in model.parameters()]
    gen = torch.Generator().manual_seed(3)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    g = torch.autograd.grad(_mean_lm_loss(model, x, y), params, create_graph=True)
    hvp = torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g, v)), params)

    def grad_at(sign: float, eps: float = 1e-6) -> list[torch.Tensor]:
        with torch.no_grad():
            for p, vi in zip(params, v):
                p.add_(sign * eps * vi)
        out = torch.autograd.grad(_mean_lm_loss(model, x, y), params)
        with torch.no_grad():
            for p, vi in zip(params, v):
                p.sub_(sign * eps * vi)
        return list(out)

    plus, minus = grad_at(1.0), grad_at(-1.0)
    fd = torch.cat([((a - b) / 2e-6).flatten() for a, b in zip(plus, minus)])
    exact = torch.cat([h.flatten() for h in hvp])
    assert exact.norm() > 1e-3
    assert (exact - fd).norm() / exact.norm() < 1e-7


def test_vmap_per_example_gradients_equal_an_autograd_loop() -> None:
    model = _gpt()
    x = _ids(5)
    y = torch.roll(x, -1, dims=1)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return _mean_lm_loss(lambda ids: functional_call(model, p, (ids,)), xi[None], yi[None])

    batched = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    for i in range(x.shape[0]):
        ref = torch.autograd.grad(_mean_lm_loss(model, x[i:i + 1], y[i:i + 1]), list(model.parameters()))
        for (name, _), r in zip(model.named_parameters(), ref):
            torch.testing.assert_close(batched[name][i], r, rtol=1e-10, atol=1e-12)


def test_init_is_deterministic_by_seed() -> None:
    a, b, c = _gpt(seed=4), _gpt(seed=4), _gpt(seed=5)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.wte.weight, c.wte.weight)


def test_tied_weights_share_the_embedding() -> None:
    untied, tied = _gpt(), _gpt(tie_weights=True)
    assert tied.head.weight is tied.wte.weight and untied.head.weight is not untied.wte.weight
    n = sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters())
    assert n == VOCAB * TINY["n_embd"]


def test_dropout_is_random_in_training_only() -> None:
    model = _gpt(dropout=0.5)
    x = _ids(2)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


@pytest.mark.parametrize(("shape", "kw", "match"), [
    ((T,), {"n_embd": 10, "n_head": 4}, "divisible by n_head"),
    ((T,), {"n_layer": 0}, "n_layer to be a positive integer"),
    ((T,), {"dropout": 1.0}, "dropout"),
    ((T,), {"heads": 2}, "bad keyword arguments"),
    ((1, 8, 8), {}, r"token inputs of shape \(N, T\)"),
    ((T,), {"block_size": T - 1}, "shorter than the data's sequences"),
])
def test_bad_kwargs_are_one_line_usage_errors(shape: tuple[int, ...], kw: dict, match: str) -> None:
    with pytest.raises(UsageError, match=match) as info:
        build_model("gpt", shape, VOCAB, **kw)
    assert "\n" not in str(info.value)


def test_float_inputs_and_too_long_sequences_are_refused() -> None:
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=4, n_layer=1, n_head=1, n_embd=4))
    with pytest.raises(UsageError, match="integer dtype"):
        model(torch.zeros(2, 4))
    with pytest.raises(UsageError, match="block_size is 4"):
        model(torch.zeros(2, 5, dtype=torch.long))


def test_default_gpt_on_shakespeare_char_scores_every_character() -> None:
    from gradlab.datasets import load_data

    data = load_data("shakespeare-char")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model("gpt", data.input_shape, data.n_classes)
    assert (model.config.n_layer, model.config.n_head, model.config.n_embd, model.config.block_size) == (2, 4, 64, 64)
    assert sum(p.numel() for p in model.parameters()) == 113_920
    losses = lm(model, (data.train.x[:4], data.train.y[:4]))
    assert losses.shape == (4,)  # at init every character is about equally likely: loss ≈ ln 76
    torch.testing.assert_close(losses, torch.full((4,), float(torch.log(torch.tensor(76.0)))), rtol=0, atol=0.05)
