"""Exact per-example Gram matrices of the layers of modern models (Linear on (B, T, d), Embedding, LayerNorm,
RMSNorm, GroupNorm, Conv1d/2d, eval-mode BatchNorm) against float64 per-example autograd loops, both exact forms
(ghost and materialised) of every layer, the fast path actually taken, and the engine's call contract."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradlab.errors import UsageError
from gradlab.probe import gram_layers
from gradlab.probe.gram import GramEngine
from gradlab.task import cross_entropy, index_batch, lm, mse, to_run


def per_example_grads(model: nn.Module, loss, batch) -> dict[str, torch.Tensor]:
    """(N, p) per-example gradients: one torch.autograd.grad of ℓᵢ per example, float64, eval mode."""
    net = copy.deepcopy(model).double().eval()
    for p in net.parameters():
        p.requires_grad_(True)
    batch = to_run(batch, dtype=torch.float64)
    names, params = zip(*net.named_parameters())
    n = len(next(iter(batch.values())) if isinstance(batch, dict) else batch[0])
    rows = []
    for i in range(n):
        g = torch.autograd.grad(loss(net, index_batch(batch, slice(i, i + 1))).sum(), params, allow_unused=True)
        rows.append([torch.zeros_like(p).flatten() if gi is None else gi.flatten() for p, gi in zip(params, g)])
    return {name: torch.stack([r[k] for r in rows]) for k, name in enumerate(names)}


def check(model: nn.Module, batch, loss=cross_entropy, chunk_size: int = 5, **kw) -> GramEngine:
    """Every parameter's K and Σᵢ gᵢ equal the float64 per-example autograd values to 1e-12 relative."""
    names = [n for n, _ in model.named_parameters()]
    engine = GramEngine(model, names, loss=loss, dtype=torch.float64, chunk_size=chunk_size, **kw)
    res = engine(batch)
    ref = per_example_grads(model, loss, batch)
    # 1e-12 relative to the largest entry of any of the model's Gram matrices (a tensor whose gradient vanishes
    # analytically, e.g. an attention key bias, has reference values of pure rounding, ~1e-18)
    k_scale = max(float((g @ g.T).abs().max()) for g in ref.values())
    s_scale = max(float(g.sum(0).abs().max()) for g in ref.values())
    for n in names:
        g = ref[n]
        torch.testing.assert_close(res.gram[n], g @ g.T, rtol=1e-12, atol=1e-12 * k_scale, msg=n)
        torch.testing.assert_close(res.grad_sum[n].reshape(-1), g.sum(0), rtol=1e-12, atol=1e-12 * s_scale, msg=n)
    engine.result = res
    return engine


@pytest.fixture(params=["auto", "ghost", "materialise"])
def form(request, monkeypatch):
    """Run a test with the cost model's choice, or every layer forced to one exact form."""
    if request.param != "auto":
        choose_pos = gram_layers.PositionsGram._choose
        choose_emb = gram_layers.EmbeddingGram._choose

        def pos(self, a, d):
            choose_pos(self, a, d)
            self.mode = request.param if "weight" in self.names and not self.tied else self.mode

        def emb(self, *args):
            choose_emb(self, *args)
            self.mode = self.mode if self.tied else request.param  # a tied matrix is always materialised

        monkeypatch.setattr(gram_layers.PositionsGram, "_choose", pos)
        monkeypatch.setattr(gram_layers.EmbeddingGram, "_choose", emb)
    return request.param


def modes(engine: GramEngine) -> set[str]:
    return {h.mode for h in engine._layers.values() if isinstance(h, (gram_layers.PositionsGram,
                                                                      gram_layers.EmbeddingGram))}


# ----- a tiny GPT: token + position embeddings, LayerNorm, causal self-attention, MLP, tied or untied head -----

class Block(nn.Module):
    def __init__(self, d: int, heads: int, block: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.proj = (nn.Linear(d, d) for _ in range(4))
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.register_buffer("mask", torch.tril(torch.ones(block, block, dtype=torch.bool)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = (f(h).reshape(b, t, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.heads)
        att = att.masked_fill(~self.mask[:t, :t], float("-inf")).softmax(-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 11, d: int = 8, block: int = 6, layers: int = 2, tied: bool = False,
                 padding_idx: int | None = None) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d, padding_idx=padding_idx)
        self.wpe = nn.Embedding(block, d)
        self.blocks = nn.Sequential(*(Block(d, 2, block) for _ in range(layers)))
        self.ln_f = nn.RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.wte.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.head(self.ln_f(self.blocks(self.wte(ids) + self.wpe(pos))))


def lm_batch(n: int = 9, t: int = 6, vocab: int = 11, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, t), generator=g)
    labels = torch.randint(0, vocab, (n, t), generator=g)
    labels[::2, :2] = -100  # ignored positions (ℓᵢ is the mean over the others)
    labels[1, 1:] = -100
    return ids, labels


def test_gpt_every_layer_takes_a_layer_identity(form):
    torch.manual_seed(0)
    net = TinyGPT()
    engine = check(net, lm_batch(), loss=lm, chunk_size=4)
    assert engine.result.fallback == ()  # position embedding included: it is an Embedding called once on arange
    assert form == "auto" or modes(engine) == {form}


def test_gpt_with_a_tied_head_sums_both_uses_of_the_shared_matrix(form):
    """Language-model weight tying (the Embedding's matrix is the Linear head's): gᵢ is the sum of both uses'."""
    torch.manual_seed(1)
    net = TinyGPT(tied=True, layers=1)
    engine = check(net, lm_batch(n=6), loss=lm)
    assert engine.result.fallback == ()
    assert engine._layers["wte"].mode == engine._layers["head"].mode == "materialise"  # forced for the sum


def test_embedding_padding_idx_gets_no_gradient(form):
    torch.manual_seed(2)
    net = TinyGPT(padding_idx=0, layers=1)
    ids, labels = lm_batch(n=7)
    ids[:, ::2] = 0
    engine = check(net, (ids, labels), loss=lm)
    assert engine.result.fallback == ()
    assert float(engine.result.gram["wte.weight"].abs().max()) > 0


def test_embedding_in_a_dict_batch_with_a_user_loss():
    """A Hugging Face-style dict batch and a per-example loss that reads it; Embedding on (B,) ids (T = 1); the
    PReLU falls back, so vmap maps over the dict too."""

    def loss(model: nn.Module, batch: dict) -> torch.Tensor:
        return F.cross_entropy(model(batch["input_ids"]), batch["labels"], reduction="none")

    torch.manual_seed(3)
    net = nn.Sequential(nn.Embedding(13, 6), nn.PReLU(), nn.Linear(6, 4))
    g = torch.Generator().manual_seed(3)
    batch = {"input_ids": torch.randint(0, 13, (10,), generator=g), "labels": torch.randint(0, 4, (10,), generator=g)}
    assert check(net, batch, loss=loss).result.fallback == ("1.weight",)


# ----- convolutions, batch norm in eval mode, group norm -----

def test_conv2d_with_eval_batch_norm(form):
    torch.manual_seed(4)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding="same"), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
        nn.Conv2d(4, 6, 3, stride=2, dilation=1, groups=2, padding=1, padding_mode="reflect"), nn.BatchNorm2d(6),
        nn.ReLU(), nn.Conv2d(6, 6, 2, groups=6, bias=False), nn.GroupNorm(3, 6), nn.Flatten(), nn.Linear(24, 5))
    for m in net:
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    g = torch.Generator().manual_seed(4)
    batch = (torch.randn(11, 2, 6, 6, generator=g), torch.randint(0, 5, (11,), generator=g))
    engine = check(net, batch, chunk_size=4)
    assert engine.result.fallback == ()
    assert form == "auto" or modes(engine) == {form}


def test_conv1d_regression_with_mse(form):
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv1d(3, 8, 3, padding=1), nn.Tanh(),
                        nn.Conv1d(8, 4, 3, stride=2, padding=1, padding_mode="circular"), nn.Tanh(),
                        nn.Conv1d(4, 2, 1), nn.Flatten(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(5)
    batch = (torch.randn(9, 3, 8, generator=g), torch.randn(9, 3, generator=g))
    engine = check(net, batch, loss=mse)
    assert engine.result.fallback == ()
    assert form == "auto" or modes(engine) == {form}


def test_mse_regression_with_layer_norm_and_rms_norm_on_sequences(form):
    torch.manual_seed(6)
    net = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 7), nn.RMSNorm(7),
                        nn.Linear(7, 2))
    g = torch.Generator().manual_seed(6)
    batch = (torch.randn(8, 3, 5, generator=g), torch.randn(8, 3, 2, generator=g))  # (B, T, d): targets per position
    engine = check(net, batch, loss=mse, chunk_size=3)
    assert engine.result.fallback == ()
    assert form == "auto" or modes(engine) == {form}


# ----- a model that is itself one layer -----

def test_bare_linear_on_tabular_data_takes_the_fast_path():
    """Regression (issue 12): a bare nn.Linear (module name "") never matched "weight" and always fell back."""
    torch.manual_seed(7)
    net = nn.Linear(12, 4)
    g = torch.Generator().manual_seed(7)
    batch = (torch.randn(20, 12, generator=g), torch.randint(0, 4, (20,), generator=g))
    engine = check(net, batch, chunk_size=6)
    assert engine.result.fallback == () and set(engine._layers) == {""}


def test_layers_without_an_identity_fall_back():
    torch.manual_seed(8)
    net = nn.Sequential(nn.Linear(4, 6), nn.PReLU(6), nn.Linear(6, 3))
    g = torch.Generator().manual_seed(8)
    batch = (torch.randn(7, 4, generator=g), torch.randint(0, 3, (7,), generator=g))
    assert check(net, batch).result.fallback == ("1.weight",)


def test_weight_also_used_outside_its_module_is_caught_by_the_self_check():
    class Functional(nn.Module):  # the embedding matrix is reused by F.linear: one owner, two uses
        def __init__(self) -> None:
            super().__init__()
            self.wte = nn.Embedding(9, 5)
            self.ln = nn.LayerNorm(5)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return F.linear(self.ln(self.wte(ids)), self.wte.weight)

    torch.manual_seed(9)
    ids, labels = lm_batch(n=6, vocab=9)
    engine = check(Functional(), (ids, labels), loss=lm)
    assert engine.result.fallback == ("wte.weight",)


def test_loss_that_vmap_cannot_trace_falls_back_to_one_backward_per_example():
    def loss(model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        if bool((y < 0).any()):  # reads a tensor value: not traceable by vmap
            raise ValueError("negative label")
        return F.cross_entropy(model(x), y, reduction="none")

    torch.manual_seed(10)
    net = nn.Sequential(nn.Linear(4, 5), nn.PReLU(), nn.Linear(5, 3))
    g = torch.Generator().manual_seed(10)
    batch = (torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g))
    engine = check(net, batch, loss=loss)
    assert engine.result.fallback == ("1.weight",) and not engine._use_vmap


# ----- copy=False: the caller's model, in place -----

def test_in_place_engine_leaves_the_model_as_it_was():
    torch.manual_seed(11)
    net = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.PReLU(), nn.Linear(6, 3)).double().train()
    net[0].bias.requires_grad_(False)
    flags = [p.requires_grad for p in net.parameters()]
    before = copy.deepcopy(net.state_dict())
    g = torch.Generator().manual_seed(11)
    batch = (torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g))
    engine = check(net, batch, copy=False)
    assert engine.model is net and net.training
    assert [p.requires_grad for p in net.parameters()] == flags and all(p.grad is None for p in net.parameters())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not any(m._forward_hooks for m in net.modules())
    assert engine.result.fallback == ("2.weight",)


def test_in_place_engine_refuses_batch_norm_with_batch_statistics():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).train()
    engine = GramEngine(net, ["0.weight"], copy=False)
    with pytest.raises(UsageError, match="batch statistics"):
        engine((torch.randn(4, 3), torch.randint(0, 2, (4,))))
    assert not any(m._forward_hooks for m in net.modules())
    with pytest.raises(UsageError, match="float64"):
        GramEngine(net.eval(), ["0.weight"], copy=False, dtype=torch.float64)((torch.randn(4, 3),
                                                                                torch.randint(0, 2, (4,))))


def test_integer_inputs_are_not_cast_and_the_callers_model_is_not_touched():
    torch.manual_seed(12)
    net = TinyGPT(layers=1)
    before = copy.deepcopy(net.state_dict())
    ids, labels = lm_batch(n=4)
    res = GramEngine(net, ["wte.weight", "head.weight"], loss=lm)((ids, labels))
    assert res.gram["wte.weight"].dtype == torch.float64 and ids.dtype == torch.int64
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_float32_engine_keeps_the_fast_path_on_an_mlp(digits, tiny_mlp):
    """Regression: the first-call self-check compared float32 Grams (stored as float64) at float64 tolerance, so
    every float32 run of the frozen protocol fell back to per-example gradients (a digits probe: 0.2 -> 111 s per
    trial)."""
    from gradlab.probe.gram import GramEngine

    names = [n for n, _ in tiny_mlp.named_parameters()]
    res = GramEngine(tiny_mlp, names, dtype=torch.float32)(digits.train.x[:16], digits.train.y[:16])
    assert res.fallback == ()
